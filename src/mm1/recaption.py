"""`mm1 recaption CHECKPOINT --in SHARDS --out DIR`: new WebDataset caption shards whose
captions a trained mm1 model wrote (VeCap's pipeline shape: the image in, a detailed caption
out, the web alt-text kept beside it).

Each input shard becomes the output shard of the same name, written whole to a temporary file
and renamed, so a finished shard is never redone and an interrupted run resumes at the first
missing one. What decides the captions (the model and its checkpoint step or export
fingerprint, fuse, max_new_tokens, decoding, the input shards) is recorded in the manifest
before the first shard is written; a rerun into a non-empty --out resumes only when they are
the same, and is refused otherwise (shards made two ways must never share one folder).

A sample keeps its image bytes and json; its `.txt` (and the json's `caption`) becomes the
generated caption, or with `fuse` the generated caption followed by the original one (an empty
generation keeps the original); the json gains `original_caption`, `generated_caption`,
`caption_style` and `recaptioned_by`. Captions are generated greedily in batches, prompted as
the model saw captions in pre-training (the image, then the text to its end-of-sequence token).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mm1.checkpoint import (
    CHECKPOINTS_DIR,
    EXPORT_WEIGHTS,
    MODEL_CONFIG,
    is_checkpoint,
    is_export,
    is_run,
    latest_checkpoint,
    step_of,
)
from mm1.config import ConfigError
from mm1.data.caption_splits import tar_samples
from mm1.data.sources.base import IMAGE_EXTS, BadImage, image_from_bytes
from mm1.data.tokenizer import ENDOFCHUNK_TOKEN, IMAGE_TOKEN, tokenize_prompt
from mm1.fs import atomic_write_text
from mm1.models.generation import check_prompt_fits, generate
from mm1.pretrained import Pretrained, check_dtype, check_runtime, dtype_name, load_pretrained

MANIFEST = "recaption.json"
# The manifest keys that decide the captions: a rerun resumes only where all of them match.
RUN_KEYS = ("model", "fuse", "max_new_tokens", "decoding", "dtype", "input_shards")
# Export files hashed whole into its fingerprint (small; the weights are sampled: see below).
_EXPORT_SMALL_FILES = (
    MODEL_CONFIG,
    "tokenizer.json",
    "mm1_tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "prompt_format.json",
)
_SAMPLE_BYTES = 4 << 20


@dataclass
class RecaptionSettings:
    batch_size: int = 32
    max_new_tokens: int = 40
    fuse: bool = False
    compile: bool = False  # decode steps compiled at fixed shapes (a CUDA graph on GPU)
    # The model's precision: part of the run's settings (a resume in another would mix
    # captions of two models); the device is not.
    dtype: str = "float32"

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: give 1 or more")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens}: give 1 or more")
        check_dtype(self.dtype)


def input_shards(spec: str | Path) -> list[Path]:
    """A directory's *.tar shards, one tar file, or a glob; sorted."""
    p = Path(spec)
    if p.is_dir():
        found = sorted(p.glob("*.tar"))
    elif p.is_file():
        found = [p]
    else:
        found = sorted(Path(x) for x in glob.glob(str(spec)) if x.endswith(".tar"))
    if not found:
        raise FileNotFoundError(f"--in {spec}: no .tar shards there")
    return found


def _check_distinct_names(spec: str | Path, shards: list[Path]) -> None:
    """Each input shard is written to --out under its own file name: two of one name (a glob
    over several folders) would overwrite each other."""
    seen: dict[str, Path] = {}
    for s in shards:
        if s.name in seen:
            raise ConfigError(
                f"--in {spec}: two shards named {s.name} ({seen[s.name]} and {s}) would both be "
                f"written to --out as {s.name}; give shards with distinct file names"
            )
        seen[s.name] = s


def model_identity(checkpoint: str | Path) -> dict[str, Any]:
    """What tells this model's captions from another's, without loading it: its resolved path
    and, for a run directory, the step of its newest complete checkpoint (the one loaded), or,
    for an export, a fingerprint of its files. ConfigError when it is not a model."""
    p = Path(checkpoint)
    if not p.exists():
        raise ConfigError(f"checkpoint {p}: does not exist")
    if is_export(p):
        h = hashlib.sha256()
        weights = p / EXPORT_WEIGHTS
        size = weights.stat().st_size
        h.update(str(size).encode())
        # Hashing multi-GB weights whole would add minutes to every start: the head (the
        # safetensors header: names, shapes, offsets, then the first tensors) and the tail
        # with the size tell two exports apart; the small files are hashed whole.
        with open(weights, "rb") as f:
            h.update(f.read(_SAMPLE_BYTES))
            f.seek(max(size - _SAMPLE_BYTES, 0))
            h.update(f.read(_SAMPLE_BYTES))
        for name in _EXPORT_SMALL_FILES:
            if (p / name).is_file():
                h.update(name.encode() + b"\0" + (p / name).read_bytes())
        return {"path": str(p.resolve()), "export_sha256": h.hexdigest()[:16]}
    if is_run(p):
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise ConfigError(
                f"checkpoint {p}: a run directory without a complete checkpoint under "
                f"{CHECKPOINTS_DIR}/"
            )
        return {"path": str(p.resolve()), "step": step_of(ckpt)}
    if is_checkpoint(p):  # one of a run's checkpoints: its step is in its name
        return {"path": str(p.resolve()), "step": step_of(p)}
    raise ConfigError(
        f"checkpoint {p}: neither an exported model ({EXPORT_WEIGHTS} + {MODEL_CONFIG}) nor a "
        f"run directory with {CHECKPOINTS_DIR}/"
    )


def _describe(key: str, value: Any) -> str:
    if key == "model" and isinstance(value, dict):
        which = (
            f"step {value['step']}" if "step" in value else f"export {value.get('export_sha256')}"
        )
        return f"{value.get('path')} ({which})"
    if key == "input_shards" and isinstance(value, list):
        return f"{len(value)} shards from {value[0] if value else '-'}"
    return value if isinstance(value, str) else json.dumps(value)


def _check_resumable(out: Path, manifest_path: Path, run: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a non-empty --out when it records a run of these same settings (to
    resume); ConfigError otherwise, naming what differs. {} for an absent or empty --out."""
    if not out.exists():
        return {}
    if not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory; give a directory")
    if not any(out.iterdir()):
        return {}
    fresh = "give a new --out (or remove this one to start over)"
    try:
        old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    except (ValueError, UnicodeDecodeError):
        old = None
    if isinstance(old, dict):
        old.setdefault("dtype", "float32")  # manifests written before --dtype: fp32 runs
    if not isinstance(old, dict) or any(k not in old for k in RUN_KEYS):
        raise ConfigError(
            f"--out {out}: not empty and holds no {MANIFEST} recording the settings of a "
            f"recaption run, so its files cannot be resumed; {fresh}"
        )
    diffs = [
        f"{k} {_describe(k, old[k])}, now {_describe(k, run[k])}"
        for k in RUN_KEYS
        if old[k] != run[k]
    ]
    if diffs:
        raise ConfigError(
            f"--out {out}: holds shards made with other settings ({'; '.join(diffs)}); {fresh}"
        )
    return old


def _count_samples(shard: Path) -> int:
    """The shard's sample count; ConfigError when it is not a readable tar (checked for every
    shard to do before the model loads, so a bad --in costs no load and no half-made --out)."""
    try:
        return sum(1 for _ in tar_samples(shard))
    except (tarfile.TarError, EOFError, zlib.error) as err:
        why = (str(err).splitlines() or [type(err).__name__])[0].rstrip(":")
        raise ConfigError(f"--in {shard}: not a readable tar shard ({why})") from None


def _write_json(path: Path, record: dict[str, Any]) -> None:
    # Atomic: an interrupted write must not lose the settings a resume is checked against.
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")


@torch.inference_mode()
def caption_images(
    p: Pretrained, images: Sequence[Image.Image], max_new_tokens: int, compile: bool = False
) -> list[str]:
    """Greedy captions of `images`, one batched generation (its decode steps compiled with
    `compile`)."""
    fmt, tok = p.prompt_format, p.tokenizer
    prompts = [tokenize_prompt(IMAGE_TOKEN, [im], tok, fmt) for im in images]
    pixels = fmt.pixel_values(p.processor, list(images))
    crops, sizes = fmt.image_info(list(images))  # a tiled or fuyu layout reads them
    stops = [tok.eos_id]
    chunk_end = tok.token_to_id(ENDOFCHUNK_TOKEN)
    if chunk_end is not None:
        stops.append(chunk_end)
    # a caption stops at the model's context, as generate, chat and serve stop there (the cache
    # was sized for every token asked: --max-new-tokens 100000 took minutes to start)
    room = check_prompt_fits(max(map(len, prompts)), p.model.cfg.decoder.max_seq_len)
    outs = generate(
        p.model,
        prompts,
        pixels,
        max_new_tokens=min(max_new_tokens, room),
        eos_token_id=stops,
        pad_token_id=tok.pad_id,
        image_crops=crops,
        image_sizes=sizes,
        compile=compile,
    )
    captions = []
    for out in outs:
        out = out[: next((i for i, t in enumerate(out) if t in stops), len(out))]
        captions.append(" ".join(tok.decode(out).split()))
    return captions


def _image(group: dict[str, bytes], where: str) -> tuple[str, Image.Image] | None:
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    if ext is None:
        return None
    try:
        return ext, image_from_bytes(group[ext], where)
    except BadImage:
        return None


def _fused(generated: str, original: str) -> str:
    return f"{generated.rstrip(' .')}. {original}" if original else generated


def recaption_shard(
    p: Pretrained, shard: Path, out: Path, settings: RecaptionSettings, source: str, tick: Any
) -> dict[str, int]:
    """Write `out`: every sample of `shard` with a generated caption; samples without a
    decodable image are copied unchanged and counted."""
    samples = list(tar_samples(shard))
    members: list[tuple[str, bytes]] = []
    counts = {"recaptioned": 0, "copied_without_image": 0, "empty_generation": 0}
    for start in range(0, len(samples), settings.batch_size):
        batch = samples[start : start + settings.batch_size]
        decoded = [_image(group, f"{shard}:{key}") for key, group in batch]
        images = [d[1] for d in decoded if d is not None]
        captions = iter(
            caption_images(p, images, settings.max_new_tokens, settings.compile) if images else []
        )
        for (key, group), d in zip(batch, decoded, strict=True):
            if d is None:
                members += [(f"{key}.{ext}", data) for ext, data in group.items()]
                counts["copied_without_image"] += 1
                continue
            generated = next(captions)
            meta = json.loads(group["json"]) if "json" in group else {}
            original = group["txt"].decode("utf-8", "replace") if "txt" in group else ""
            original = original or str(meta.get("caption") or "")
            caption = _fused(generated, original) if settings.fuse else generated
            style = "fused" if settings.fuse else "recaption"
            if not generated:  # a sample without a caption would be skipped by the reader
                caption, style = original, "original"
                counts["empty_generation"] += 1
            meta.update(
                caption=caption,
                original_caption=original,
                generated_caption=generated,
                caption_style=style,
                recaptioned_by=source,
            )
            members.append((f"{key}.{d[0]}", group[d[0]]))
            members.append((f"{key}.txt", caption.encode()))
            members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
            extra = set(group) - {d[0], "txt", "json"}
            members += [(f"{key}.{ext}", group[ext]) for ext in sorted(extra)]
            counts["recaptioned"] += 1
        tick(len(batch))
    _write_tar(out, members)
    return counts


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    tmp.replace(path)


def _run_record(
    checkpoint: str | Path, inputs: str | Path, out: Path, settings: RecaptionSettings
) -> tuple[list[Path], dict[str, Any]]:
    """The input shards, checked, and the manifest of a run with these settings (no shard done
    yet). ConfigError / FileNotFoundError for a model or inputs that cannot be used."""
    model = model_identity(checkpoint)
    shards = input_shards(inputs)
    _check_distinct_names(inputs, shards)
    if any(out.resolve() == s.parent.resolve() for s in shards):
        raise ConfigError(f"--out {out} is where the input shards are: give a new directory")
    record: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "model": model,
        "inputs": str(inputs),
        "input_shards": [str(s.resolve()) for s in shards],
        "fuse": settings.fuse,
        "max_new_tokens": settings.max_new_tokens,
        "decoding": "greedy",
        "dtype": dtype_name(settings.dtype),
        "shards": {},
    }
    return shards, record


def _done_shards(manifest: dict[str, Any], out: Path) -> dict[str, Any]:
    """The shards done: written and counted in the manifest (a shard renamed into place just
    before an interruption, its counts unrecorded, is redone: the same settings write the same
    shard)."""
    shards = manifest.get("shards", {})
    return {name: counts for name, counts in shards.items() if (out / name).is_file()}


def is_complete(
    checkpoint: str | Path,
    inputs: str | Path,
    out_dir: str | Path,
    settings: RecaptionSettings | None = None,
) -> bool:
    """Whether `recaption` with these arguments has nothing left to do: `out_dir` records a run
    of the same model and settings over the same inputs, with every shard done. False where it
    would refuse or fail (it then says why)."""
    settings = settings or RecaptionSettings()
    out = Path(out_dir)
    try:
        shards, record = _run_record(checkpoint, inputs, out, settings)
        old = _check_resumable(out, out / MANIFEST, record)
    except (ConfigError, FileNotFoundError):
        return False
    done = _done_shards(old, out)
    return bool(old) and all(s.name in done for s in shards)


def recaption(
    checkpoint: str | Path,
    inputs: str | Path,
    out_dir: str | Path,
    settings: RecaptionSettings | None = None,
    *,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Re-caption every shard of `inputs` into `out_dir` (resuming a run of the same settings
    there, refusing one of others); returns and writes `out_dir/recaption.json` (settings,
    counts per shard). The returned record also holds `this_run`: what this call generated
    (`shards`, `captions`, `already_done`), not written to the manifest.

    Everything the user gave is checked, and the model loaded, before --out is created."""
    settings = settings or RecaptionSettings()
    settings.validate()
    check_runtime(device, settings.dtype)
    out = Path(out_dir)
    manifest_path = out / MANIFEST
    shards, record = _run_record(checkpoint, inputs, out, settings)
    old = _check_resumable(out, manifest_path, record)
    done = _done_shards(old, out)
    record["shards"] = done
    todo = [s for s in shards if s.name not in done]
    this_run = {"shards": 0, "captions": 0, "already_done": len(shards) - len(todo)}
    if not todo:
        return {**record, "this_run": this_run}
    total = sum(_count_samples(s) for s in todo)
    p = load_pretrained(checkpoint, device, settings.dtype)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(manifest_path, record)  # the settings, before any shard
    with Progress(
        TextColumn("[bold]recaption {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not progress,
    ) as bar:
        task = bar.add_task("", total=total)
        for shard in todo:
            bar.update(task, description=shard.name)
            counts = recaption_shard(
                p,
                shard,
                out / shard.name,
                settings,
                str(checkpoint),
                lambda n: bar.advance(task, n),
            )
            done[shard.name] = counts
            _write_json(manifest_path, record)
            this_run["shards"] += 1
            this_run["captions"] += counts["recaptioned"]
    return {**record, "this_run": this_run}
