"""The built-in synthetic world: a procedurally generated multimodal corpus with known facts.

A tiny MM1 can learn this world in minutes on a CPU. Every image is a *scene*: 1–4 coloured shapes
at named positions (plus, for "text-rich" images, a rendered word or number) on a plain or lightly
textured background. Because the facts of every scene are known, captions, interleaved documents,
VQA answers and evaluation references can all be generated — and grounded answers checked.

`write_world(out_dir, seed, size)` writes the world to disk in the formats users bring (REFERENCE
§3), so that it is read back through the same readers as real data (`mm1.data.sources`):

    world.json                          manifest (counts, vocabulary, relative paths of everything)
    tokenizer.json                      byte-level BPE trained on the world's training text
    captions/00000.tar …                img2dataset WebDataset shards, noisy web "alt-text"
    captions_vecap/00000.tar …          the same layout, detailed re-captions (VeCap-style)
    interleaved/00000.parquet …         OBELICS-style parquet, image bytes embedded
    interleaved_mmc4/00000.jsonl …      MMC4-style jsonl + interleaved_mmc4/images/
    text/00000.jsonl …                  text-only documents (`text` field)
    sft/llava.json, sft/images/         LLaVA SFT conversations (+ sft/datasets.yaml, LLaVA-NeXT)
    eval/{val,support}/images/          held-out evaluation images (disjoint scenes)
    eval/{val,support}/captions.json    COCO-captions format, 5 references per image
    eval/{val,support}/vqa_questions.json, vqa_annotations.json   VQAv2 format, 10 answers

Evaluation scenes are disjoint from training scenes by construction: every scene's visible
content (objects, text, background) hashes to a split, and generators only keep scenes of the
split they write (`scene_split`). Files are byte-identical for the same seed and size.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mm1.data.scenes import (
    BACKGROUNDS,
    COLORS,
    MAX_NUMBER,
    POSITIONS,
    SHAPE_CORNERS,
    SHAPES,
    SIZE_NAMES,
    SIZES,
    SPECIAL_TOKENS,
    TEXTURES,
    WORDS,
    WORLD_FORMAT_VERSION,
    Scene,
    alt_text,
    interleaved_document,
    reference_captions,
    render_scene,
    sample_scene,
    scene_questions,
    sft_conversation,
    text_document,
    vecap_caption,
    vqa_answers,
)

# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def _jpeg(img: Image.Image) -> bytes:
    # fixed settings: the same pixels always give the same bytes
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, subsampling=0, optimize=False, progressive=False)
    return buf.getvalue()


def train_world_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Any:
    """Train a byte-level BPE tokenizer (HF `tokenizers`) on `texts`.

    Special tokens `<s>`, `</s>`, `<pad>`, `<image>`, `<|endofchunk|>` get ids 0–4. Any byte
    sequence can be encoded (the full byte alphabet is in the vocabulary). No normaliser and no
    post-processor: adding BOS/EOS is the tokenizer wrapper's job. Deterministic for the same input.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    cleaned = (t.replace("<image>", " ") for t in texts)
    tok.train_from_iterator(cleaned, trainer)
    return tok


# ----------------------------------------------------------------------------------------------
# Writing the world
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Preset:
    shards: int
    captions_per_shard: int
    vecap_per_shard: int
    interleaved_per_shard: int
    mmc4_per_shard: int
    text_per_shard: int
    sft: int
    val_images: int
    support_images: int
    questions_per_image: int = 3
    row_group_size: int = 64


PRESETS: dict[str, _Preset] = {
    "tiny": _Preset(4, 64, 64, 16, 6, 32, 128, 64, 32),
    "small": _Preset(8, 1000, 500, 400, 40, 250, 3000, 500, 200),
    "medium": _Preset(16, 2000, 1000, 1000, 80, 600, 12000, 1000, 500),
}

_MTIME = 946684800  # 2000-01-01: fixed member mtimes make tar shards byte-identical
_URL = "https://world.mm1.invalid"
_OWNED = (
    "captions",
    "captions_vecap",
    "interleaved",
    "interleaved_mmc4",
    "text",
    "sft",
    "eval",
    "tokenizer.json",
    "world.json",
)


def _rng(seed: int, *keys: object) -> random.Random:
    h = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = _MTIME
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(data))
    tmp.replace(path)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


@dataclass
class WorldManifest:
    """What `write_world` wrote. Paths in `sources`/`eval` are relative to `root`."""

    root: Path
    seed: int
    size: str
    image_size: int
    sources: dict[str, dict[str, Any]]
    eval: dict[str, dict[str, Any]]
    vocabulary: dict[str, Any]
    tokenizer: str = "tokenizer.json"
    special_tokens: list[str] = field(default_factory=lambda: list(SPECIAL_TOKENS))
    format_version: int = WORLD_FORMAT_VERSION
    text_scale: float = 1.0

    def path(self, rel: str | Path) -> Path:
        return self.root / rel

    def shards(self, source: str) -> list[Path]:
        return [self.root / s for s in self.sources[source]["shards"]]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.tokenizer

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        return d

    @classmethod
    def load(cls, path: str | Path) -> WorldManifest:
        """Load from a world directory or its `world.json`."""
        p = Path(path)
        if p.is_dir():
            p = p / "world.json"
        data = json.loads(p.read_text())
        return cls(root=p.parent, **data)


def _write_captions(
    root: Path, name: str, style: str, seed: int, preset: _Preset, image_size: int, texts: list[str]
) -> dict[str, Any]:
    d = root / name
    d.mkdir(parents=True)
    per_shard = preset.captions_per_shard if style == "alt" else preset.vecap_per_shard
    shards = []
    for shard in range(preset.shards):
        members: list[tuple[str, bytes]] = []
        for i in range(per_shard):
            rng = _rng(seed, name, shard, i)
            scene = sample_scene(rng, "train")
            jpg = _jpeg(render_scene(scene, image_size))
            alt = alt_text(scene, rng)
            recap = vecap_caption(scene, rng)
            caption = alt if style == "alt" else recap
            texts.append(caption)
            key = f"{shard:05d}{i:04d}"
            meta = {
                "url": f"{_URL}/{name}/{key}.jpg",
                "caption": caption,
                "key": key,
                "status": "success",
                "error_message": None,
                "width": image_size,
                "height": image_size,
                "original_width": image_size,
                "original_height": image_size,
                "exif": "{}",
                "sha256": hashlib.sha256(jpg).hexdigest(),
                "caption_style": "alt-text" if style == "alt" else "recaption",
                "alt_text": alt,
                "recaption": recap,
                "scene": scene.to_dict(),
            }
            members += [
                (f"{key}.jpg", jpg),
                (f"{key}.txt", caption.encode()),
                (f"{key}.json", _dumps(meta).encode()),
            ]
        _write_tar(d / f"{shard:05d}.tar", members)
        shards.append(f"{name}/{shard:05d}.tar")
    n = per_shard * preset.shards
    return {
        "kind": "captions",
        "format": "wds",
        "caption_style": "alt-text" if style == "alt" else "recaption",
        "shards": shards,
        "records": n,
        "records_per_shard": [per_shard] * preset.shards,
        "images": n,
    }


def _write_obelics(
    root: Path,
    seed: int,
    preset: _Preset,
    image_size: int,
    texts: list[str],
    text_scale: float = 0.0,
) -> dict[str, Any]:
    name = "interleaved"
    d = root / name
    d.mkdir(parents=True)
    schema = pa.schema(
        [
            ("images", pa.list_(pa.binary())),
            ("texts", pa.list_(pa.string())),
            ("metadata", pa.string()),
            ("general_metadata", pa.string()),
        ]
    )
    shards, n_images, doc_types = [], 0, Counter()
    for shard in range(preset.shards):
        cols: dict[str, list[Any]] = {k: [] for k in schema.names}
        for i in range(preset.interleaved_per_shard):
            rng = _rng(seed, name, shard, i)
            doc_type, parts = interleaved_document(rng, "train", text_scale)
            doc_types[doc_type] += 1
            url = f"{_URL}/docs/{shard:05d}/{i:05d}.html"
            images, txts, metadata = [], [], []
            for j, p in enumerate(parts):
                if isinstance(p, Scene):
                    src = f"{_URL}/docs/{shard:05d}/{i:05d}_{j}.jpg"
                    images.append(_jpeg(render_scene(p, image_size)))
                    txts.append(None)
                    metadata.append(
                        {
                            "document_url": url,
                            "unformatted_src": src,
                            "src": src,
                            "formatted_filename": f"{i:05d}_{j}",
                            "alt_text": "",
                            "original_width": image_size,
                            "original_height": image_size,
                            "scene": p.to_dict(),
                        }
                    )
                    n_images += 1
                else:
                    images.append(None)
                    txts.append(p)
                    metadata.append(None)
                    texts.append(p)
            cols["images"].append(images)
            cols["texts"].append(txts)
            cols["metadata"].append(_dumps(metadata))
            cols["general_metadata"].append(
                _dumps({"url": url, "doc_type": doc_type, "world_seed": seed, "id": f"{shard}-{i}"})
            )
        table = pa.Table.from_pydict(cols, schema=schema)
        pq.write_table(table, d / f"{shard:05d}.parquet", row_group_size=preset.row_group_size)
        shards.append(f"{name}/{shard:05d}.parquet")
    n = preset.interleaved_per_shard * preset.shards
    return {
        "kind": "interleaved",
        "format": "obelics",
        "shards": shards,
        "records": n,
        "records_per_shard": [preset.interleaved_per_shard] * preset.shards,
        "images": n_images,
        "doc_types": dict(sorted(doc_types.items())),
    }


def _write_mmc4(
    root: Path,
    seed: int,
    preset: _Preset,
    image_size: int,
    texts: list[str],
    text_scale: float = 0.0,
) -> dict[str, Any]:
    """MMC4-style: each image is matched to the sentence that follows it ("before" placement)."""
    name = "interleaved_mmc4"
    d = root / name
    (d / "images").mkdir(parents=True)
    shards, n_images = [], 0
    for shard in range(preset.shards):
        lines = []
        for i in range(preset.mmc4_per_shard):
            rng = _rng(seed, name, shard, i)
            _, parts = interleaved_document(rng, "train", text_scale)
            text_list: list[str] = []
            image_info = []
            pending: list[Scene] = []
            for p in parts:
                if isinstance(p, Scene):
                    pending.append(p)
                    continue
                for sc in pending:
                    fname = f"{shard:05d}_{i:05d}_{len(image_info)}.jpg"
                    (d / "images" / fname).write_bytes(_jpeg(render_scene(sc, image_size)))
                    image_info.append(
                        {
                            "image_name": fname,
                            "raw_url": f"{_URL}/mmc4/{fname}",
                            "matched_text_index": len(text_list),
                            "matched_sim": round(0.25 + 0.1 * rng.random(), 4),
                            "scene": sc.to_dict(),
                        }
                    )
                pending = []
                text_list.append(p)
                texts.append(p)
            if pending:  # trailing images (no following sentence): match the last sentence
                for sc in pending:
                    fname = f"{shard:05d}_{i:05d}_{len(image_info)}.jpg"
                    (d / "images" / fname).write_bytes(_jpeg(render_scene(sc, image_size)))
                    image_info.append(
                        {
                            "image_name": fname,
                            "raw_url": f"{_URL}/mmc4/{fname}",
                            "matched_text_index": len(text_list) - 1,
                            "matched_sim": round(0.25 + 0.1 * rng.random(), 4),
                            "scene": sc.to_dict(),
                        }
                    )
            n_images += len(image_info)
            lines.append(
                _dumps(
                    {
                        "url": f"{_URL}/mmc4/{shard:05d}/{i:05d}.html",
                        "text_list": text_list,
                        "image_info": image_info,
                        "could_have_url_duplicate": 0,
                    }
                )
            )
        (d / f"{shard:05d}.jsonl").write_text("\n".join(lines) + "\n")
        shards.append(f"{name}/{shard:05d}.jsonl")
    n = preset.mmc4_per_shard * preset.shards
    return {
        "kind": "interleaved",
        "format": "mmc4",
        "shards": shards,
        "image_dir": f"{name}/images",
        "image_position": "before",
        "records": n,
        "records_per_shard": [preset.mmc4_per_shard] * preset.shards,
        "images": n_images,
    }


def _write_text(
    root: Path, seed: int, preset: _Preset, texts: list[str], text_scale: float = 0.0
) -> dict[str, Any]:
    name = "text"
    d = root / name
    d.mkdir(parents=True)
    shards = []
    for shard in range(preset.shards):
        lines = []
        for i in range(preset.text_per_shard):
            topics, text = text_document(_rng(seed, name, shard, i), text_scale)
            texts.append(text)
            lines.append(
                _dumps({"id": f"text-{shard:05d}-{i:05d}", "text": text, "topics": topics})
            )
        (d / f"{shard:05d}.jsonl").write_text("\n".join(lines) + "\n")
        shards.append(f"{name}/{shard:05d}.jsonl")
    n = preset.text_per_shard * preset.shards
    return {
        "kind": "text",
        "format": "text",
        "field": "text",
        "shards": shards,
        "records": n,
        "records_per_shard": [preset.text_per_shard] * preset.shards,
    }


def _write_sft(
    root: Path, seed: int, preset: _Preset, image_size: int, texts: list[str]
) -> dict[str, Any]:
    name = "sft"
    d = root / name
    (d / "images").mkdir(parents=True)
    records, n_images, kinds = [], 0, Counter()
    for i in range(preset.sft):
        kind, scenes, turns = sft_conversation(_rng(seed, name, i))
        kinds[kind] += 1
        files = []
        for j, sc in enumerate(scenes):
            fname = f"{i:06d}_{j}.jpg"
            (d / "images" / fname).write_bytes(_jpeg(render_scene(sc, image_size)))
            files.append(fname)
        n_images += len(files)
        rec: dict[str, Any] = {"id": f"world-sft-{i:06d}"}
        if len(files) == 1:
            rec["image"] = files[0]
        elif files:
            rec["image"] = files
        rec["conversations"] = turns
        rec["kind"] = kind
        if scenes:
            rec["scenes"] = [sc.to_dict() for sc in scenes]
        records.append(rec)
        texts.extend(t["value"] for t in turns)
    (d / "llava.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    (d / "datasets.yaml").write_text(
        "# LLaVA-NeXT data YAML; paths are relative to this file.\n"
        "datasets:\n"
        "  - json_path: llava.json\n"
        "    sampling_strategy: all\n"
        "    image_folder: images\n"
    )
    return {
        "kind": "sft",
        "format": "llava",
        "shards": [f"{name}/llava.json"],
        "image_folder": f"{name}/images",
        "yaml": f"{name}/datasets.yaml",
        "records": preset.sft,
        "images": n_images,
        "conversation_kinds": dict(sorted(kinds.items())),
    }


def _write_eval(
    root: Path, split: str, n_images: int, seed: int, preset: _Preset, image_size: int
) -> dict[str, Any]:
    d = root / "eval" / split
    (d / "images").mkdir(parents=True)
    id_base = 0 if split == "val" else 500_000
    coco_images, coco_anns, questions, vqa_anns = [], [], [], []
    for i in range(n_images):
        rng = _rng(seed, "eval", split, i)
        scene = sample_scene(rng, split)
        image_id = id_base + i + 1
        fname = f"world_{split}_{image_id:012d}.jpg"
        (d / "images" / fname).write_bytes(_jpeg(render_scene(scene, image_size)))
        coco_images.append(
            {
                "id": image_id,
                "file_name": fname,
                "width": image_size,
                "height": image_size,
                "scene": scene.to_dict(),
            }
        )
        for ref in reference_captions(scene, rng, 5):
            coco_anns.append({"id": len(coco_anns) + 1, "image_id": image_id, "caption": ref})
        for k, qa in enumerate(scene_questions(scene, rng, preset.questions_per_image)):
            qid = image_id * 1000 + k
            questions.append({"image_id": image_id, "question": qa.question, "question_id": qid})
            answers = vqa_answers(qa, rng)
            conf = [rng.choices(("yes", "maybe", "no"), weights=(85, 12, 3))[0] for _ in answers]
            counts = Counter(answers)
            top = max(counts.values())
            mc = qa.answer if counts[qa.answer] == top else counts.most_common(1)[0][0]
            vqa_anns.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": qa.question_type,
                    "answer_type": qa.answer_type,
                    "multiple_choice_answer": mc,
                    "answers": [
                        {"answer": a, "answer_confidence": c, "answer_id": j + 1}
                        for j, (a, c) in enumerate(zip(answers, conf))
                    ],
                }
            )
    info = {"description": f"mm1 synthetic world, {split} split", "version": "1.0", "seed": seed}
    files = {
        "captions.json": {
            "info": info,
            "licenses": [],
            "type": "captions",
            "images": coco_images,
            "annotations": coco_anns,
        },
        "vqa_questions.json": {
            "info": info,
            "license": {},
            "task_type": "Open-Ended",
            "data_type": "world",
            "data_subtype": split,
            "questions": questions,
        },
        "vqa_annotations.json": {
            "info": info,
            "license": {},
            "data_type": "world",
            "data_subtype": split,
            "annotations": vqa_anns,
        },
    }
    for fname, obj in files.items():
        (d / fname).write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    rel = f"eval/{split}"
    return {
        "image_dir": f"{rel}/images",
        "coco_captions": f"{rel}/captions.json",
        "vqa_questions": f"{rel}/vqa_questions.json",
        "vqa_annotations": f"{rel}/vqa_annotations.json",
        "images": n_images,
        "captions": len(coco_anns),
        "questions": len(questions),
    }


def _prepare_dir(root: Path) -> None:
    if root.exists() and any(root.iterdir()):
        if not (root / "world.json").exists():
            raise FileExistsError(
                f"{root} exists, is not empty and holds no world.json: refusing to write a "
                "synthetic world into it (choose an empty or new directory)"
            )
        for name in _OWNED:
            p = root / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    root.mkdir(parents=True, exist_ok=True)


def _vocabulary() -> dict[str, Any]:
    return {
        "shapes": list(SHAPES),
        "shape_corners": dict(SHAPE_CORNERS),
        "colors": {k: list(v) for k, v in COLORS.items()},
        "sizes": list(SIZES),
        "positions": list(POSITIONS),
        "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()},
        "textures": list(TEXTURES),
        "words": list(WORDS),
        "numbers": [0, MAX_NUMBER],
        "max_objects": 4,
    }


def write_world(
    out_dir: str | Path,
    seed: int = 0,
    size: str = "tiny",
    image_size: int = 64,
    vocab_size: int = 1024,
    text_scale: float = 1.0,
    progress: bool = False,
) -> WorldManifest:
    """Write the synthetic world of `size` ("tiny", "small" or "medium") to `out_dir`.

    `text_scale` sets how much text surrounds the images: 1.0 (default) gives web-like
    interleaved pages and long text documents (about one text token per image token at 144
    image tokens, enough to fill 4096-token sequences under a 16-image cap); 0 gives compact
    documents (more images per token: faster visual learning in a CPU demo).

    Deterministic: the same arguments give byte-identical files. `progress` shows a bar.
    `out_dir` must be new, empty, or a previous world (whose files are replaced). `world.json` is
    written last, so its presence means the world is complete.
    """
    if size not in PRESETS:
        raise ValueError(f"unknown world size {size!r}: expected one of {', '.join(SIZE_NAMES)}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    if text_scale < 0:
        raise ValueError(f"text_scale must be >= 0, got {text_scale}")
    preset = PRESETS[size]
    root = Path(out_dir)
    _prepare_dir(root)
    texts: list[str] = []
    stages: dict[str, Callable[[], dict[str, Any]]] = {
        "captions": lambda: _write_captions(
            root, "captions", "alt", seed, preset, image_size, texts
        ),
        "captions_vecap": lambda: _write_captions(
            root, "captions_vecap", "recap", seed, preset, image_size, texts
        ),
        "interleaved": lambda: _write_obelics(root, seed, preset, image_size, texts, text_scale),
        "interleaved_mmc4": lambda: _write_mmc4(root, seed, preset, image_size, texts, text_scale),
        "text": lambda: _write_text(root, seed, preset, texts, text_scale),
        "sft": lambda: _write_sft(root, seed, preset, image_size, texts),
        "eval/val": lambda: _write_eval(root, "val", preset.val_images, seed, preset, image_size),
        "eval/support": lambda: _write_eval(
            root, "support", preset.support_images, seed, preset, image_size
        ),
    }
    written: dict[str, dict[str, Any]] = {}
    with Progress(
        TextColumn("[bold]synthetic world"),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        disable=not progress,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=len(stages) + 1)
        for name, write in stages.items():
            bar.update(task, description=name)
            written[name] = write()
            bar.advance(task)
        bar.update(task, description="tokenizer")
        tok = train_world_tokenizer(texts, vocab_size)
        tok.save(str(root / "tokenizer.json"))
        bar.advance(task)
    sources = {k: v for k, v in written.items() if not k.startswith("eval/")}
    evals = {k.split("/")[1]: v for k, v in written.items() if k.startswith("eval/")}
    manifest = WorldManifest(
        root=root,
        seed=seed,
        size=size,
        image_size=image_size,
        text_scale=text_scale,
        sources=sources,
        eval=evals,
        vocabulary=_vocabulary(),
    )
    (root / "world.json").write_text(
        json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    )
    return manifest
