"""The synthetic world in each of the formats users bring (REFERENCE §3): one writer per
source (WebDataset captions, OBELICS parquet, MMC4 jsonl, text jsonl, LLaVA SFT, COCO / VQAv2
evaluation files), the size presets, and the helpers that make every file byte-identical for the
same seed. `mm1.data.synthetic.write_world` calls them."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mm1.data.scenes import (
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


@dataclass(frozen=True)
class Preset:
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


PRESETS: dict[str, Preset] = {
    "tiny": Preset(4, 64, 64, 16, 6, 32, 128, 64, 32),
    "small": Preset(8, 1000, 500, 400, 40, 250, 3000, 500, 200),
    "medium": Preset(16, 2000, 1000, 1000, 80, 600, 12000, 1000, 500),
}

_MTIME = 946684800  # 2000-01-01: fixed member mtimes make tar shards byte-identical
_URL = "https://world.mm1.invalid"


T = TypeVar("T")
Tick = Callable[[float], None]  # progress within a writer, 0..1


def no_tick(fraction: float) -> None:
    pass


def ticking(items: Sequence[T], tick: Tick) -> Iterator[T]:
    """`items`, calling `tick(done / total)` after the loop body of each one."""
    for k, item in enumerate(items):
        yield item
        tick((k + 1) / len(items))


def world_rng(seed: int, *keys: object) -> random.Random:
    h = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
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


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def jpeg(img: Image.Image) -> bytes:
    # fixed settings: the same pixels always give the same bytes
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, subsampling=0, optimize=False, progressive=False)
    return buf.getvalue()


def write_captions(
    root: Path,
    name: str,
    style: str,
    seed: int,
    preset: Preset,
    image_size: int,
    texts: list[str],
    tick: Tick = no_tick,
) -> dict[str, Any]:
    d = root / name
    d.mkdir(parents=True)
    per_shard = preset.captions_per_shard if style == "alt" else preset.vecap_per_shard
    shards = []
    for shard in ticking(range(preset.shards), tick):
        members: list[tuple[str, bytes]] = []
        for i in range(per_shard):
            rng = world_rng(seed, name, shard, i)
            scene = sample_scene(rng, "train")
            jpg = jpeg(render_scene(scene, image_size))
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
                (f"{key}.json", dumps(meta).encode()),
            ]
        write_tar(d / f"{shard:05d}.tar", members)
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


def write_obelics(
    root: Path,
    seed: int,
    preset: Preset,
    image_size: int,
    texts: list[str],
    text_scale: float = 0.0,
    tick: Tick = no_tick,
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
    for shard in ticking(range(preset.shards), tick):
        cols: dict[str, list[Any]] = {k: [] for k in schema.names}
        for i in range(preset.interleaved_per_shard):
            rng = world_rng(seed, name, shard, i)
            doc_type, parts = interleaved_document(rng, "train", text_scale)
            doc_types[doc_type] += 1
            url = f"{_URL}/docs/{shard:05d}/{i:05d}.html"
            images, txts, metadata = [], [], []
            for j, p in enumerate(parts):
                if isinstance(p, Scene):
                    src = f"{_URL}/docs/{shard:05d}/{i:05d}_{j}.jpg"
                    images.append(jpeg(render_scene(p, image_size)))
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
            cols["metadata"].append(dumps(metadata))
            cols["general_metadata"].append(
                dumps({"url": url, "doc_type": doc_type, "world_seed": seed, "id": f"{shard}-{i}"})
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


def write_mmc4(
    root: Path,
    seed: int,
    preset: Preset,
    image_size: int,
    texts: list[str],
    text_scale: float = 0.0,
    tick: Tick = no_tick,
) -> dict[str, Any]:
    """MMC4-style: each image is matched to the sentence that follows it ("before" placement)."""
    name = "interleaved_mmc4"
    d = root / name
    (d / "images").mkdir(parents=True)
    shards, n_images = [], 0
    for shard in ticking(range(preset.shards), tick):
        lines = []
        for i in range(preset.mmc4_per_shard):
            rng = world_rng(seed, name, shard, i)
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
                    (d / "images" / fname).write_bytes(jpeg(render_scene(sc, image_size)))
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
                    (d / "images" / fname).write_bytes(jpeg(render_scene(sc, image_size)))
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
                dumps(
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


def write_text(
    root: Path,
    seed: int,
    preset: Preset,
    texts: list[str],
    text_scale: float = 0.0,
    tick: Tick = no_tick,
) -> dict[str, Any]:
    name = "text"
    d = root / name
    d.mkdir(parents=True)
    shards = []
    for shard in ticking(range(preset.shards), tick):
        lines = []
        for i in range(preset.text_per_shard):
            topics, text = text_document(world_rng(seed, name, shard, i), text_scale)
            texts.append(text)
            lines.append(dumps({"id": f"text-{shard:05d}-{i:05d}", "text": text, "topics": topics}))
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


def write_sft(
    root: Path, seed: int, preset: Preset, image_size: int, texts: list[str], tick: Tick = no_tick
) -> dict[str, Any]:
    name = "sft"
    d = root / name
    (d / "images").mkdir(parents=True)
    records, n_images, kinds = [], 0, Counter()
    for i in ticking(range(preset.sft), tick):
        kind, scenes, turns = sft_conversation(world_rng(seed, name, i))
        kinds[kind] += 1
        files = []
        for j, sc in enumerate(scenes):
            fname = f"{i:06d}_{j}.jpg"
            (d / "images" / fname).write_bytes(jpeg(render_scene(sc, image_size)))
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


def write_eval(
    root: Path,
    split: str,
    n_images: int,
    seed: int,
    preset: Preset,
    image_size: int,
    tick: Tick = no_tick,
) -> dict[str, Any]:
    d = root / "eval" / split
    (d / "images").mkdir(parents=True)
    id_base = 0 if split == "val" else 500_000
    coco_images, coco_anns, questions, vqa_anns = [], [], [], []
    for i in ticking(range(n_images), tick):
        rng = world_rng(seed, "eval", split, i)
        scene = sample_scene(rng, split)
        image_id = id_base + i + 1
        fname = f"world_{split}_{image_id:012d}.jpg"
        (d / "images" / fname).write_bytes(jpeg(render_scene(scene, image_size)))
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
