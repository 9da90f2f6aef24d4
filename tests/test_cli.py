"""The `mm1` command end to end on a tiny trained run: info, data, convert, generate, eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def mm1(*args: str, timeout: float = 300) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "mm1.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    world = tmp / "world"
    mm1("data", "synth", "--out", str(world), "--size", "tiny")
    run_dir = tmp / "run"
    mm1(
        "train",
        str(ROOT / "configs" / "demo.yaml"),
        f"data.world={world}",
        f"train.run_dir={run_dir}",
        "train.steps=3",
        "train.save_every=3",
        "train.val_every=0",
        "train.tensorboard=false",
        "train.progress=false",
        "data.num_workers=0",
    )
    return run_dir


def test_info_reports_components() -> None:
    out = mm1("info", str(ROOT / "configs" / "models" / "mm1_3b.yaml"))
    for word in ("vision encoder", "connector", "decoder", "144 image tokens", "peak learning"):
        assert word in out


def test_data_inspect_and_stats(run) -> None:
    world = run.parent / "world"
    out = mm1("data", "inspect", str(world / "captions"), "--format", "wds", "-n", "2")
    assert '"format": "wds"' in out
    whole = json.loads(mm1("data", "inspect", str(world), "-n", "1"))
    sample = whole["sources"]["text"]["samples"][0]
    assert sample["text_tokens"] > 0 and whole["sources"]["captions"]["records"] > 0
    stats = json.loads(
        mm1(
            "data",
            "stats",
            str(ROOT / "configs" / "demo.yaml"),
            f"data.world={world}",
            "--json",
            "--sequences",
            "20",
        )
    )
    assert stats["packing_efficiency"] > 0.9 and set(stats["mixture"]) == {
        "captions",
        "interleaved",
        "text",
    }


def test_convert_generate_and_eval(run, tmp_path) -> None:
    export = tmp_path / "export"
    mm1("convert", str(run), "--export", str(export), "--to-hf", str(tmp_path / "hf"))
    assert (export / "model.safetensors").exists() and (export / "model.json").exists()
    assert (tmp_path / "hf" / "decoder" / "config.json").exists()
    assert (tmp_path / "hf" / "vision" / "config.json").exists()

    image = next((run.parent / "world" / "eval" / "val" / "images").iterdir())
    out = mm1(
        "generate",
        str(export),
        "--image",
        str(image),
        "--prompt",
        "<image>Output:",
        "--max-new-tokens",
        "4",
    )
    assert isinstance(out, str)

    out_dir = tmp_path / "eval"
    # the run's own world is found from its saved config: no --world needed
    mm1(
        "eval",
        str(run),
        "--shots",
        "0,2",
        "--seeds",
        "1",
        "--max-examples",
        "4",
        "--out",
        str(out_dir),
    )
    results = json.loads((out_dir / "results.json").read_text())
    assert set(results["tasks"]) == {"synth_coco", "synth_vqa"}
    assert (out_dir / "results.md").exists() and (out_dir / "scores_vs_shots.png").exists()
