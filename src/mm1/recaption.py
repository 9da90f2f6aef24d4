"""`mm1 recaption CHECKPOINT --in SHARDS --out DIR`: new WebDataset caption shards whose
captions a trained mm1 model wrote (VeCap's pipeline shape: the image in, a detailed caption
out, the web alt-text kept beside it).

Each input shard becomes the output shard of the same name, written whole to a temporary file
and renamed, so a finished shard is never redone and an interrupted run resumes at the first
missing one. A sample keeps its image bytes and json; its `.txt` (and the json's `caption`)
becomes the generated caption, or with `fuse` the generated caption followed by the original
one (an empty generation keeps the original); the json gains `original_caption`,
`generated_caption`, `caption_style` and `recaptioned_by`. Captions are generated greedily in batches, prompted as the model saw
captions in pre-training (the image, then the text to its end-of-sequence token).
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mm1.data.caption_splits import tar_samples
from mm1.data.sources.base import IMAGE_EXTS, BadImage, image_from_bytes
from mm1.data.tokenizer import ENDOFCHUNK_TOKEN, IMAGE_TOKEN, tokenize_prompt
from mm1.models.generation import generate
from mm1.pretrained import Pretrained, load_pretrained

MANIFEST = "recaption.json"


@dataclass
class RecaptionSettings:
    batch_size: int = 32
    max_new_tokens: int = 40
    fuse: bool = False
    compile: bool = False  # decode steps compiled at fixed shapes (a CUDA graph on GPU)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size}: give 1 or more")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: give 1 or more")


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


@torch.inference_mode()
def caption_images(
    p: Pretrained, images: Sequence[Image.Image], max_new_tokens: int, compile: bool = False
) -> list[str]:
    """Greedy captions of `images`, one batched generation (its decode steps compiled with
    `compile`)."""
    fmt, tok = p.prompt_format, p.tokenizer
    prompts = [tokenize_prompt(IMAGE_TOKEN, [im], tok, fmt) for im in images]
    pixels = fmt.pixel_values(p.processor, list(images))
    stops = [tok.eos_id]
    chunk_end = tok.token_to_id(ENDOFCHUNK_TOKEN)
    if chunk_end is not None:
        stops.append(chunk_end)
    outs = generate(
        p.model,
        prompts,
        pixels,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=tok.pad_id,
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


def recaption(
    checkpoint: str | Path,
    inputs: str | Path,
    out_dir: str | Path,
    settings: RecaptionSettings | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Re-caption every shard of `inputs` into `out_dir` (skipping shards already written);
    returns and writes `out_dir/recaption.json` (settings, counts per shard)."""
    settings = settings or RecaptionSettings()
    settings.validate()
    shards = input_shards(inputs)
    out = Path(out_dir)
    if any(out.resolve() == s.parent.resolve() for s in shards):
        raise ValueError(f"--out {out_dir} is where the input shards are: give a new directory")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    done = manifest.get("shards", {})
    todo = [s for s in shards if not (out / s.name).is_file()]
    record = {
        "checkpoint": str(checkpoint),
        "inputs": str(inputs),
        "fuse": settings.fuse,
        "max_new_tokens": settings.max_new_tokens,
        "decoding": "greedy",
        "shards": done,
    }
    if not todo:
        return record
    p = load_pretrained(checkpoint)
    total = sum(sum(1 for _ in tar_samples(s)) for s in todo)
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
            manifest_path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record
