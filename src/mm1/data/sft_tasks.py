"""The synthetic world's benchmark-style SFT conversations: short answers in the form of the SFT
suite's tasks, on training scenes, as LLaVA-1.5's mixture holds VQAv2, GQA, OCR-VQA and
TextCaps training questions with the same "single word or phrase" prompt its evaluation uses.

    sft/tasks/llava.json, sft/tasks/images/        three kinds, below
    sft/presence/llava.json, sft/presence/images/  object presence, answers independent

The tasks file holds three kinds: object presence (POPE's question, a yes and a no per image),
questions over two or three pictures (which has the most objects, how many in all), and reading
the written text. Its paired presence answers give the second away once the first is known, so
a model can fit them without looking; the presence file asks two questions per scene, each
answer decided by its own coin, so only the picture tells it (docs/sft.md, runs G to K). Both
are written from their own RNG streams (`world_rng(seed, "sft_tasks" | "sft_presence", i)`) and
never fed to the world's tokenizer, so adding them leaves every other file of a world
byte-identical.

Presence negatives are POPE's random and adversarial ones, never its popular ones: those repeat
the same few objects, so a model learns their answer from the question alone (trained on them,
the demo model scored 62% accuracy on POPE with every image swapped for another query's).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mm1.data.scenes import Scene, render_scene, sample_scene, scene_questions
from mm1.data.scenes.documents import SHORT_SUFFIX
from mm1.data.scenes.scene import capitalized
from mm1.data.sft_eval import multi_image_question, presence_pair, presence_question
from mm1.data.synthetic_writers import jpeg, world_rng
from mm1.fs import atomic_write_text

TASKS_DIR = "sft/tasks"
PRESENCE_DIR = "sft/presence"
TASKS_FILE = "llava.json"
SIZES = {"tiny": 64, "small": 3000, "medium": 6000}
PRESENCE_SIZES = {"tiny": 64, "small": 6000, "medium": 12000}
PRESENCE_QUESTIONS = 2
KINDS = ("presence", "multi_image", "reading")
WEIGHTS = (40, 30, 30)
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


def presence_path(world: str | Path) -> Path:
    return Path(world) / PRESENCE_DIR / TASKS_FILE


def _presence_conversation(rng: random.Random) -> tuple[list[Scene], list[tuple[str, str]]]:
    """One training scene and two presence questions about it, each answer "yes" (an object it
    shows) or "no" (an absent one, random or adversarial) by its own coin."""
    scene = sample_scene(rng, "train", text_rich=False)
    turns = []
    for _ in range(PRESENCE_QUESTIONS):
        category = TRAIN_NEGATIVES[rng.random() < 0.5]
        by_label = {label: cs for cs, label in presence_pair(scene, category, [], rng)}
        label = "yes" if rng.random() < 0.5 else "no"
        turns.append((presence_question(*by_label[label]), capitalized(label)))
    return [scene], turns


def _write_records(
    world: str | Path,
    rel: str,
    n: int,
    conversation: Callable[[int], tuple[str, list[Scene], list[tuple[str, str]]]],
    prefix: str,
    image_size: int,
) -> dict[str, Any]:
    """Write `n` records `conversation(i) = (kind, scenes, [(question, answer)])` as LLaVA JSON
    under `world/rel` (the images beside it) and return the world-manifest entry."""
    out = Path(world) / rel
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, kinds, n_images = [], Counter(), 0
    for i in range(n):
        kind, scenes, qa_pairs = conversation(i)
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
        rec: dict[str, Any] = {"id": f"{prefix}-{i:06d}"}
        rec["image"] = files[0] if len(files) == 1 else files
        rec["conversations"] = turns
        rec["kind"] = kind
        rec["scenes"] = [sc.to_dict() for sc in scenes]
        records.append(rec)
        kinds[kind] += 1
    path = out / TASKS_FILE
    # atomically: the file's presence marks a complete set
    atomic_write_text(path, json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    return {
        "kind": "sft",
        "format": "llava",
        "shards": [f"{rel}/{TASKS_FILE}"],
        "image_folder": f"{rel}/images",
        "records": n,
        "images": n_images,
        "conversation_kinds": dict(sorted(kinds.items())),
    }


def write_sft_tasks(
    world: str | Path, seed: int, size: str = "small", image_size: int = 64
) -> dict[str, Any]:
    """Write the conversations under `world/sft/tasks` and return their manifest entry (the
    shape of the world's other sources)."""

    def conversation(i: int) -> tuple[str, list[Scene], list[tuple[str, str]]]:
        rng = world_rng(seed, "sft_tasks", i)
        kind = rng.choices(KINDS, weights=WEIGHTS)[0]
        return (kind, *_conversation(kind, i, rng))

    n = SIZES.get(size, SIZES["small"])
    return _write_records(world, TASKS_DIR, n, conversation, "world-sft-task", image_size)


def write_sft_presence(
    world: str | Path, seed: int, size: str = "small", image_size: int = 64
) -> dict[str, Any]:
    """Write the presence conversations under `world/sft/presence` and return their manifest
    entry."""

    def conversation(i: int) -> tuple[str, list[Scene], list[tuple[str, str]]]:
        return ("presence", *_presence_conversation(world_rng(seed, "sft_presence", i)))

    n = PRESENCE_SIZES.get(size, PRESENCE_SIZES["small"])
    return _write_records(world, PRESENCE_DIR, n, conversation, "world-sft-presence", image_size)


def _ensure(path: Path, world: str | Path, write: Callable[..., dict[str, Any]]) -> Path:
    from mm1.data.synthetic import WorldManifest

    if not path.is_file():
        m = WorldManifest.load(world)
        print(f"writing the benchmark-style SFT conversations to {path.parent} ...", flush=True)
        write(world, m.seed, m.size, m.image_size)
    return path


def ensure_sft_tasks(world: str | Path) -> Path:
    """The conversations file of `world`, written first if the world has none yet (a world
    written before they existed; its other files are not touched)."""
    return _ensure(tasks_path(world), world, write_sft_tasks)


def ensure_sft_presence(world: str | Path) -> Path:
    """The presence conversations of `world`, written first if the world has none yet."""
    return _ensure(presence_path(world), world, write_sft_presence)
