"""The synthetic world's benchmark-style SFT conversations: short answers in the form of the SFT
suite's tasks, on training scenes, as LLaVA-1.5's mixture holds VQAv2, GQA, OCR-VQA and
TextCaps training questions with the same "single word or phrase" prompt its evaluation uses.

    sft/tasks/llava.json, sft/tasks/images/

Three kinds: object presence (POPE's question, a yes and a no per image), questions over two or three pictures (which has the most objects, how many in all),
and reading the written text. Written from their own RNG stream (`world_rng(seed, "sft_tasks",
i)`) and never fed to the world's tokenizer, so adding them leaves every other file of a world
byte-identical.

Presence negatives are POPE's random and adversarial ones, never its popular ones: those repeat
the same few objects, so a model learns their answer from the question alone (trained on them,
the demo model scored 62% accuracy on POPE with every image swapped for another query's).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from mm1.data.scenes import Scene, render_scene, sample_scene, scene_questions
from mm1.data.scenes.scene import capitalized
from mm1.data.sft_eval import multi_image_question, presence_pair, presence_question
from mm1.data.synthetic_writers import jpeg, world_rng

TASKS_DIR = "sft/tasks"
TASKS_FILE = "llava.json"
SIZES = {"tiny": 64, "small": 3000, "medium": 6000}
KINDS = ("presence", "multi_image", "reading")
WEIGHTS = (40, 30, 30)
SHORT_SUFFIX = "Answer the question using a single word or phrase."
TRAIN_NEGATIVES = ("random", "adversarial")


def _short(question: str, images: int) -> str:
    tags = "\n".join(["<image>"] * images)
    return f"{tags}\n{question}\n{SHORT_SUFFIX}"


def _conversation(
    kind: str, i: int, rng: random.Random
) -> tuple[list[Scene], list[tuple[str, str]]]:
    """(scenes, [(question, answer)]) of one record; the first question carries the images."""
    if kind == "presence":
        scene = sample_scene(rng, "train", text_rich=False)
        pair = presence_pair(scene, TRAIN_NEGATIVES[i % 2], [], rng)
        turns = [(presence_question(c, s), capitalized(label)) for (c, s), label in pair]
        return [scene], turns
    if kind == "multi_image":
        scenes, question, answer, _ = multi_image_question(rng, "train", most=rng.random() < 0.5)
        return scenes, [(question, capitalized(answer))]
    scene = sample_scene(rng, "train", text_rich=True)
    qa = next(q for q in scene_questions(scene, rng, 9) if q.kind == "text")
    return [scene], [(qa.question, qa.answer)]


def tasks_path(world: str | Path) -> Path:
    return Path(world) / TASKS_DIR / TASKS_FILE


def write_sft_tasks(
    world: str | Path, seed: int, size: str = "small", image_size: int = 64
) -> dict[str, Any]:
    """Write the conversations under `world/sft/tasks` and return their manifest entry (the
    shape of the world's other sources)."""
    out = Path(world) / TASKS_DIR
    (out / "images").mkdir(parents=True, exist_ok=True)
    n = SIZES.get(size, SIZES["small"])
    records, kinds, n_images = [], Counter(), 0
    for i in range(n):
        rng = world_rng(seed, "sft_tasks", i)
        kind = rng.choices(KINDS, weights=WEIGHTS)[0]
        scenes, qa_pairs = _conversation(kind, i, rng)
        files = []
        for j, sc in enumerate(scenes):
            fname = f"{i:06d}_{j}.jpg"
            (out / "images" / fname).write_bytes(jpeg(render_scene(sc, image_size)))
            files.append(fname)
        n_images += len(files)
        turns = []
        for k, (q, a) in enumerate(qa_pairs):
            question = _short(q, len(files)) if k == 0 else f"{q}\n{SHORT_SUFFIX}"
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": a}]
        rec: dict[str, Any] = {"id": f"world-sft-task-{i:06d}"}
        rec["image"] = files[0] if len(files) == 1 else files
        rec["conversations"] = turns
        rec["kind"] = kind
        rec["scenes"] = [sc.to_dict() for sc in scenes]
        records.append(rec)
        kinds[kind] += 1
    path = out / TASKS_FILE
    tmp = path.with_suffix(".tmp")  # the file's presence marks a complete set
    tmp.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return {
        "kind": "sft",
        "format": "llava",
        "shards": [f"{TASKS_DIR}/{TASKS_FILE}"],
        "image_folder": f"{TASKS_DIR}/images",
        "records": n,
        "images": n_images,
        "conversation_kinds": dict(sorted(kinds.items())),
    }


def ensure_sft_tasks(world: str | Path) -> Path:
    """The conversations file of `world`, written first if the world has none yet (a world
    written before they existed; its other files are not touched)."""
    from mm1.data.synthetic import WorldManifest

    path = tasks_path(world)
    if not path.is_file():
        m = WorldManifest.load(world)
        print(f"writing the benchmark-style SFT conversations to {path.parent} ...", flush=True)
        write_sft_tasks(world, m.seed, m.size, m.image_size)
    return path
