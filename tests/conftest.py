"""Builders the tests of several modules share, as fixtures (no test module imports another)."""

from __future__ import annotations

import functools
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mm1.config import DecoderConfig, ModelConfig, VisionConfig, validate_model


def _tiny_model_config(connector: str = "avgpool", **decoder) -> ModelConfig:
    q = 0 if connector in ("linear", "mlp") else 4
    cfg = ModelConfig(
        vision=VisionConfig(
            image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, act="gelu"
        ),
        connector={"type": connector, "num_tokens": q, "hidden": 32, "depth": 1, "heads": 2},
        decoder=DecoderConfig(
            **{
                "vocab_size": 64,
                "dim": 32,
                "layers": 2,
                "heads": 4,
                "kv_heads": 2,
                "ffn_dim": 64,
                "max_seq_len": 256,
                **decoder,
            }
        ),
    )
    validate_model(cfg)
    return cfg


def _truncated_jpeg(path: Path, like: Path) -> Path:
    """A JPEG of the image at `like`, cut in half (PIL: "image file is truncated")."""
    buf = io.BytesIO()
    with Image.open(like) as im:
        im.convert("RGB").save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.fixture(scope="session")
def tiny_model_config() -> Callable[..., ModelConfig]:
    """`tiny_model_config(connector="avgpool", **decoder_options)`: a validated tiny model."""
    return _tiny_model_config


@pytest.fixture(scope="session")
def truncated_jpeg() -> Callable[[Path, Path], Path]:
    """`truncated_jpeg(path, like)`: writes a JPEG of `like` cut in half to `path`."""
    return _truncated_jpeg


ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, each worker's torch (and every process a test starts) gets its share of the
    cores. torch's default, a thread per core in every worker, oversubscribes them: two
    workers of two threads on two cores ran tests/models' files 2-4.6x slower than one thread
    each, their OpenMP threads spinning in each other's way."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def _copy_of_world(cache: Path, dest: Path, **settings: Any) -> Path:
    from mm1.data.synthetic import write_world

    written = cache / ("-".join(f"{k}={v}" for k, v in sorted(settings.items())) or "defaults")
    if not (written / "world.json").exists():
        write_world(written, **settings)
    shutil.copytree(written, dest, dirs_exist_ok=True)
    return dest


@pytest.fixture(scope="session")
def world_copy(tmp_path_factory) -> Callable[..., Path]:
    """`world_copy(dest, **write_world_settings)`: the synthetic world those settings write
    (tiny, seed 0 by default), at `dest`. A world is deterministic, so each is written once per
    session and copied: a copy takes 40 ms, writing the tiny world 1.6 s."""
    return functools.partial(_copy_of_world, tmp_path_factory.getbasetemp() / "worlds")


def _tiny_train_args(run_dir: Path) -> list[str]:
    """`mm1 train` of the tiny run: 3 steps on the demo preset, its world next to the run."""
    return [
        "train",
        str(ROOT / "configs" / "demo.yaml"),
        f"data.world={run_dir.parent / 'world'}",
        f"train.run_dir={run_dir}",
        "train.steps=3",
        "train.save_every=3",
        "train.val_every=0",
        "train.tensorboard=false",
        "train.progress=false",
        "data.num_workers=0",
    ]


@pytest.fixture(scope="session")
def tiny_train_args() -> Callable[[Path], list[str]]:
    """`tiny_train_args(run_dir)`: the `mm1 train` arguments of the CLI tests' tiny run."""
    return _tiny_train_args


def _greedy_chat_answer(
    p: Any, content: str, image_paths: list[Path], template: str, max_new: int
) -> tuple[str, int, int]:
    """A chat answer by another road than `mm1 chat` / `mm1 serve`: the template's text with
    `<image>` tags, written as a generation prompt with the images' slots, greedy `generate`
    cut at its stop token. (answer, prompt tokens, tokens generated including the stop)."""
    from mm1.data.sources import decode_image
    from mm1.data.tokenizer import tokenize_prompt
    from mm1.models import generation

    tok = p.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=False,
        chat_template=template,
    )
    pics = [decode_image(path.read_bytes()) for path in image_paths]
    ids = tokenize_prompt(text, pics, tok, p.prompt_format)
    stops = [tok.eos_id, *(tok.token_to_id(t) for t in tok.end_of_turn_tokens())]
    out = generation.generate(
        p.model,
        [ids],
        p.processor(pics) if pics else None,
        max_new_tokens=max_new,
        eos_token_id=stops,
        pad_token_id=tok.pad_id,
    )[0]
    n = len(out)
    out = out[: next((i for i, t in enumerate(out) if t in stops), len(out))]
    return tok.decode(out), len(ids), n


@pytest.fixture(scope="session")
def greedy_chat_answer() -> Callable[..., tuple[str, int, int]]:
    """`greedy_chat_answer(pretrained, content, image_paths, template_source, max_new)`."""
    return _greedy_chat_answer


@pytest.fixture(autouse=True)
def _fresh_warning_counts() -> None:
    """Data warnings are rate-limited per reason and process: a test that checks one must not
    depend on how many other tests (in the same pytest worker) logged it before."""
    from mm1.data.sources.base import reset_warning_counts

    reset_warning_counts()


@pytest.fixture(autouse=True)
def _default_read_caps() -> None:
    """The readers' caps are process-wide (each loader sets them in its workers): a test that
    ran a loader with small caps must not leave them to the next test."""
    from mm1.data.sources.base import DEFAULT_MAX_TEXT_CHARS, set_max_text_chars
    from mm1.data.sources.decode import DEFAULT_MAX_IMAGE_PIXELS, set_max_image_pixels

    set_max_text_chars(DEFAULT_MAX_TEXT_CHARS)
    set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)
