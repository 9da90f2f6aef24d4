"""The synthetic world's SFT evaluation suite files: five tasks mirroring MM1's SFT benchmarks,
on held-out scenes, in the formats users bring for the real benchmarks.

Written under `eval/sft/` of a world, beside (never over) its other files, from their own RNG
stream (`world_rng(seed, "sft_eval", task, split, i)`): adding them to an existing world leaves
every earlier file byte-identical, and the same world seed always gives the same bytes.
Queries use `val` scenes, few-shot demonstrations `support` scenes (`scene_split`).

    eval/sft/images/                         every image of the suite
    eval/sft/{val,support}/vqav2_*.json      VQAv2 questions + annotations (10 answers)
    eval/sft/{val,support}/textvqa_*.json    the same format, questions about the written text
    eval/sft/{val,support}/pope.jsonl        POPE: question_id, image, text, label, category
    eval/sft/{val,support}/multi_*.json      VQAv2 with `images` (2-3 file names) per question
    eval/sft/{val,support}/bench_*.jsonl     LLaVA-Bench questions (question_id, image, text,
                                             category) + references (question_id, text per line)
    eval/sft/suite.yaml                      the task file naming all of the above (written last)
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from mm1.data.scenes import (
    COLORS,
    SHAPES,
    Scene,
    reference_captions,
    render_scene,
    sample_scene,
    scene_questions,
    vqa_answers,
)
from mm1.data.scenes.scene import capitalized, count_word, with_article
from mm1.data.synthetic_writers import jpeg, world_rng

SUITE_DIR = "eval/sft"
SUITE_FILE = "suite.yaml"
# (queries, demonstrations) per task, by world size.
SUITE_SIZES = {"tiny": (24, 12), "small": (200, 100), "medium": (400, 200)}
ORDINALS = ("first", "second", "third")
POPE_CATEGORIES = ("random", "popular", "adversarial")
BENCH_PROMPTS = (
    "Describe this image in detail.",
    "What do you see in this picture? Describe it.",
    "Write a detailed description of the image.",
)


class _Writer:
    def __init__(self, root: Path, seed: int, image_size: int) -> None:
        self.root, self.seed, self.image_size = root, seed, image_size
        self.images = root / SUITE_DIR / "images"

    def rng(self, task: str, split: str, i: int) -> random.Random:
        return world_rng(self.seed, "sft_eval", task, split, i)

    def image(self, scene: Scene, name: str) -> str:
        (self.images / name).write_bytes(jpeg(render_scene(scene, self.image_size)))
        return name

    def write(self, split: str, name: str, obj: Any) -> str:
        path = self.root / SUITE_DIR / split / name
        if name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in obj))
        else:
            path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
        return f"{split}/{name}"


def _vqa_files(questions: list[dict], annotations: list[dict], split: str) -> tuple[dict, dict]:
    info = {"description": f"mm1 synthetic world, SFT suite, {split} split", "version": "1.0"}
    return (
        {"info": info, "task_type": "Open-Ended", "questions": questions},
        {"info": info, "annotations": annotations},
    )


def _annotation(qid: int, image_id: int, answers: list[str], answer_type: str) -> dict:
    counts = Counter(answers)
    return {
        "question_id": qid,
        "image_id": image_id,
        "answer_type": answer_type,
        "multiple_choice_answer": counts.most_common(1)[0][0],
        "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)],
    }


def _short_vqa(w: _Writer, task: str, split: str, n: int, base: int, text_rich: bool) -> dict:
    """One question per scene: VQAv2-style (any kind but the written text), or TextVQA-style
    (what the text-rich scene's text says)."""
    questions, anns = [], []
    for i in range(n):
        rng = w.rng(task, split, i)
        scene = sample_scene(rng, split, text_rich=text_rich)
        qas = scene_questions(scene, rng, 9)
        pick = [q for q in qas if (q.kind == "text") == text_rich]
        qa = pick[0]
        image_id = base + i + 1
        fname = w.image(scene, f"{task}_{split}_{image_id:08d}.jpg")
        qid = image_id * 10
        questions.append(
            {"image_id": image_id, "question": qa.question, "question_id": qid, "file_name": fname}
        )
        anns.append(_annotation(qid, image_id, vqa_answers(qa, rng), qa.answer_type))
    q, a = _vqa_files(questions, anns, split)
    return {
        "questions": w.write(split, f"{task}_questions.json", q),
        "annotations": w.write(split, f"{task}_annotations.json", a),
    }


def popular_pairs(scenes: list[Scene]) -> list[tuple[str, str]]:
    """(colour, shape) pairs by how often `scenes` show them, most frequent first (POPE's
    "popular" negatives)."""
    frequency = Counter((o.color, o.shape) for sc in scenes for o in sc.objects)
    return [pair for pair, _ in frequency.most_common()]


def presence_pair(
    scene: Scene, category: str, popular: list[tuple[str, str]], rng: random.Random
) -> list[tuple[tuple[str, str], str]]:
    """POPE's two questions about `scene`, in random order: ((colour, shape), "yes") for an
    object it shows, ((colour, shape), "no") for one it does not, drawn at random, among the
    most frequent (`popular`), or sharing the colour or shape of a shown object (adversarial)."""
    shown = {(o.color, o.shape) for o in scene.objects}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in shown]
    if category == "popular":
        negative = next(p for p in popular if p not in shown)
    elif category == "adversarial":
        near = [(c, s) for c, s in absent if any(c == a or s == b for a, b in shown)]
        negative = rng.choice(near or absent)
    else:
        negative = rng.choice(absent)
    positive = rng.choice(sorted(shown))
    pair = [(positive, "yes"), (negative, "no")]
    rng.shuffle(pair)
    return pair


def presence_question(color: str, shape: str) -> str:
    return f"Is there {with_article(color)} {color} {shape} in the image?"


def _pope(w: _Writer, split: str, n: int, base: int) -> dict:
    """POPE: per scene one question about an object it shows (yes) and one about an object it
    does not (no), the three kinds of negatives in turn (`presence_pair`)."""
    scenes = [sample_scene(w.rng("pope", split, i), split, text_rich=False) for i in range(n)]
    popular = popular_pairs(scenes)
    records = []
    for i, scene in enumerate(scenes):
        rng = w.rng("pope_questions", split, i)
        image_id = base + i + 1
        fname = w.image(scene, f"pope_{split}_{image_id:08d}.jpg")
        category = POPE_CATEGORIES[i % 3]
        for k, ((color, shape), label) in enumerate(presence_pair(scene, category, popular, rng)):
            records.append(
                {
                    "question_id": image_id * 10 + k,
                    "image": fname,
                    "text": presence_question(color, shape),
                    "label": label,
                    "category": category,
                }
            )
    return {"questions": w.write(split, "pope.jsonl", records)}


def multi_image_question(
    rng: random.Random, split: str, most: bool
) -> tuple[list[Scene], str, str, str]:
    """Two or three scenes and a short-answer question over them: which picture has the most
    objects (`most`; the scenes are drawn until one picture has strictly the most), or how many
    objects they show together. Returns (scenes, question, answer, VQA answer type)."""
    k = rng.randint(2, 3)
    while True:
        scenes = [sample_scene(rng, split, text_rich=False) for _ in range(k)]
        counts = [sc.count for sc in scenes]
        if not most or counts.count(max(counts)) == 1:
            break
    if most:
        best = ORDINALS[counts.index(max(counts))]
        return scenes, "Which picture has the most objects?", best, "other"
    total = sum(counts)
    return scenes, "How many objects are there in all the pictures together?", str(total), "number"


def _multi(w: _Writer, split: str, n: int, base: int) -> dict:
    """Two or three pictures per question: which has the most objects, or how many in all."""
    questions, anns = [], []
    for i in range(n):
        rng = w.rng("multi", split, i)
        scenes, question, answer, kind = multi_image_question(rng, split, most=i % 2 == 0)
        qid = base + i + 1
        files = [w.image(sc, f"multi_{split}_{qid:08d}_{j}.jpg") for j, sc in enumerate(scenes)]
        if kind == "other":
            answers = [answer] * 8 + [f"the {answer} one", f"{answer} picture"]
        else:
            answers = [answer] * 8 + [count_word(int(answer)), f"{answer} objects"]
        rng.shuffle(answers)
        questions.append(
            {"image_id": qid, "images": files, "question": question, "question_id": qid}
        )
        anns.append(_annotation(qid, qid, answers, kind))
    q, a = _vqa_files(questions, anns, split)
    return {
        "questions": w.write(split, "multi_questions.json", q),
        "annotations": w.write(split, "multi_annotations.json", a),
    }


def _bench(w: _Writer, split: str, n: int, base: int) -> dict:
    """LLaVA-Bench style: detailed descriptions (5 references) and long-form answers to
    questions (the full-sentence answer as reference), alternating."""
    questions, refs = [], []
    for i in range(n):
        rng = w.rng("bench", split, i)
        scene = sample_scene(rng, split)
        qid = base + i + 1
        fname = w.image(scene, f"bench_{split}_{qid:08d}.jpg")
        if i % 2 == 0:
            text, category = rng.choice(BENCH_PROMPTS), "detail"
            answers = [capitalized(r) for r in reference_captions(scene, rng, 5)]
        else:
            qa = scene_questions(scene, rng, 1)[0]
            text, category, answers = qa.question, "conv", [qa.long]
        questions.append({"question_id": qid, "image": fname, "text": text, "category": category})
        refs += [{"question_id": qid, "text": a} for a in answers]
    return {
        "questions": w.write(split, "bench_questions.jsonl", questions),
        "references": w.write(split, "bench_references.jsonl", refs),
    }


def suite_file(world: str | Path) -> Path:
    return Path(world) / SUITE_DIR / SUITE_FILE


def write_sft_eval(world: str | Path, seed: int, size: str = "small", image_size: int = 64) -> Path:
    """Write the suite's files under `world/eval/sft` (replacing an earlier suite there) and
    return its task file."""
    import shutil

    import yaml

    root = Path(world)
    out = root / SUITE_DIR
    if out.exists():
        shutil.rmtree(out)
    for d in ("images", "val", "support"):
        (out / d).mkdir(parents=True)
    w = _Writer(root, seed, image_size)
    n_query, n_support = SUITE_SIZES.get(size, SUITE_SIZES["small"])
    files: dict[str, dict[str, dict]] = {}
    for split, n, base in (("val", n_query, 0), ("support", n_support, 5_000_000)):
        files.setdefault("sft_vqav2", {})[split] = _short_vqa(w, "vqav2", split, n, base, False)
        files.setdefault("sft_textvqa", {})[split] = _short_vqa(w, "textvqa", split, n, base, True)
        files.setdefault("sft_pope", {})[split] = _pope(w, split, n, base)
        files.setdefault("sft_multi", {})[split] = _multi(w, split, n, base)
        files.setdefault("sft_bench", {})[split] = _bench(w, split, n, base)
    kinds = {
        "sft_vqav2": "vqa",
        "sft_textvqa": "vqa",
        "sft_pope": "pope",
        "sft_multi": "multi",
        "sft_bench": "long",
    }
    tasks = [
        {
            "name": name,
            "kind": kinds[name],
            "query": {"image_dir": "images", **by_split["val"]},
            "support": {"image_dir": "images", **by_split["support"]},
        }
        for name, by_split in files.items()
    ]
    header = "# The synthetic world's SFT evaluation suite (mm1.data.sft_eval); paths relative.\n"
    path = out / SUITE_FILE
    path.write_text(header + yaml.safe_dump(tasks, sort_keys=False))  # last: marks completion
    return path


def ensure_sft_eval(world: str | Path) -> Path:
    """The suite's task file of `world`, written first if the world has none yet (the world's
    own files are not touched)."""
    from mm1.data.synthetic import WorldManifest

    path = suite_file(world)
    if not path.is_file():
        m = WorldManifest.load(world)
        print(f"writing the SFT evaluation suite to {path.parent} ...", flush=True)
        write_sft_eval(world, m.seed, m.size, m.image_size)
    return path
