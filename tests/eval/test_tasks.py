"""Task loading from COCO-captions / VQAv2 files, the registry, and loud failures on missing images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import mm1.eval.tasks as tasks_mod
from mm1.config import ConfigError
from mm1.eval.metrics import caption_scores, vqa_accuracy_corpus
from mm1.eval.tasks import (
    CaptionTask,
    SplitFiles,
    TaskSpec,
    VQATask,
    load_task,
    register_synthetic_world,
    register_task,
    register_task_file,
    synthetic_task_specs,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, world_copy) -> Path:
    """The tiny synthetic world (a copy of the session's)."""
    root = world_copy(tmp_path_factory.mktemp("world"))
    return root


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks_mod, "TASKS", {})


def test_synthetic_caption_task(world: Path) -> None:
    task = load_task("synth_coco", world=world)
    captions = json.loads((world / "eval/val/captions.json").read_text())
    assert isinstance(task, CaptionTask) and task.kind == "caption" and task.metric == "CIDEr"
    assert len(task.query) == len(captions["images"]) == 64
    assert len(task.support) == 32
    first = task.query[0]
    refs = [a["caption"] for a in captions["annotations"] if a["image_id"] == 1]
    assert first.id == "1" and list(first.references) == refs and first.target == refs[0]
    assert first.image == world / "eval/val/images" / captions["images"][0]["file_name"]
    assert all(e.image.is_file() for e in task.query + task.support)
    # queries and demonstrations come from different images
    assert not {e.image for e in task.query} & {e.image for e in task.support}


def test_synthetic_vqa_task_finds_images_by_id(world: Path) -> None:
    task = load_task("synth_vqa", world=world)
    qs = json.loads((world / "eval/val/vqa_questions.json").read_text())["questions"]
    anns = {
        a["question_id"]: a
        for a in json.loads((world / "eval/val/vqa_annotations.json").read_text())["annotations"]
    }
    assert isinstance(task, VQATask) and len(task.query) == len(qs) == 188
    files = {
        img["id"]: img["file_name"]
        for img in json.loads((world / "eval/val/captions.json").read_text())["images"]
    }
    for ex, q in zip(task.query, qs):
        assert ex.id == str(q["question_id"]) and ex.question == q["question"]
        # VQA questions carry no file name: the image is found by the digits of its id
        assert ex.image.name == files[q["image_id"]]
        ann = anns[q["question_id"]]
        assert list(ex.references) == [a["answer"] for a in ann["answers"]]
        assert ex.target == ann["answers"][0]["answer"]  # OpenFlamingo's demo answer


def test_registry(world: Path) -> None:
    with pytest.raises(KeyError, match="world"):
        load_task("synth_coco")
    assert register_synthetic_world(world) == ["synth_coco", "synth_vqa"]
    assert tasks_mod.list_tasks() == ["synth_coco", "synth_vqa"]
    assert len(load_task("synth_vqa").query) == 188
    spec = synthetic_task_specs(world)["synth_coco"]
    # a real task registered by its files, as a dict with paths relative to a root
    d = {
        "name": "my_coco",
        "kind": "caption",
        "query": {"captions": "eval/val/captions.json", "image_dir": "eval/val/images"},
        "support": {"captions": "eval/support/captions.json", "image_dir": "eval/support/images"},
    }
    register_task(TaskSpec.from_dict(d, root=world))
    mine = load_task("my_coco")
    assert [e.id for e in mine.query] == [e.id for e in spec.load().query]
    with pytest.raises(ValueError, match="already registered"):
        register_task(TaskSpec("my_coco", "caption", SplitFiles(world, captions="x.json")))
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        load_task("nope")
    with pytest.raises(ValueError, match="kind"):
        TaskSpec("bad", "detection", SplitFiles(world))
    with pytest.raises(ValueError, match="questions"):
        TaskSpec("bad", "vqa", SplitFiles(world, captions="c.json"))


def test_missing_caption_images_fail_loudly(world: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    src = world / "eval/val/images"
    names = sorted(p.name for p in src.iterdir())
    for name in names[:60]:  # 4 of 64 images missing
        shutil.copy(src / name, images / name)
    with pytest.raises(FileNotFoundError) as err:
        CaptionTask.from_files("partial", world / "eval/val/captions.json", images)
    msg = str(err.value)
    assert "4 of 64 images are missing" in msg and names[60] in msg and "partial" in msg


def test_missing_vqa_images_fail_loudly(world: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(world / "eval/val/images", images)
    gone = sorted(images.iterdir())[:2]
    for p in gone:
        p.unlink()
    with pytest.raises(FileNotFoundError, match="images are missing") as err:
        VQATask.from_files(
            "vqa",
            world / "eval/val/vqa_questions.json",
            world / "eval/val/vqa_annotations.json",
            images,
        )
    msg = str(err.value)
    # counted per image (2 of the 64 images), and the questions they hold
    assert "2 of 64 images are missing" in msg and "(6 of 188 questions)" in msg
    assert "<image id 1>" in msg and "<image id 2>" in msg


def test_a_file_of_the_wrong_kind_names_the_task_and_its_key(world: Path, tmp_path: Path) -> None:
    """A task key naming another kind's file (or no JSON) is the spec's mistake: a one-line
    ConfigError naming the task and the key, whichever split it is in."""
    val, support = world / "eval/val", world / "eval/support"
    with pytest.raises(ConfigError, match=r"^task 'c': query\.captions: .*not a COCO captions"):
        CaptionTask.from_files("c", val / "vqa_questions.json", val / "images")
    with pytest.raises(ConfigError, match=r"^task 'c': support\.captions: .*not a COCO captions"):
        CaptionTask.from_files(
            "c", val / "captions.json", val / "images", support / "vqa_annotations.json"
        )
    (tmp_path / "q.json").write_text("not json")
    with pytest.raises(ConfigError, match=r"^task 'v': query\.questions: .*q\.json: not a JSON"):
        VQATask.from_files("v", tmp_path / "q.json", val / "vqa_annotations.json", val / "images")
    with pytest.raises(ConfigError, match=r"^task 'v': query\.annotations: .*not a VQAv2 annot"):
        VQATask.from_files(
            "v", val / "vqa_questions.json", val / "vqa_questions.json", val / "images"
        )
    # a file with the right top-level key but another kind's records (COCO captions also hold
    # `annotations`): the first record lacking a field is named, not a KeyError
    with pytest.raises(ConfigError, match=r"query\.annotations: .*annotations\[0\] has no `qu"):
        VQATask.from_files("v", val / "vqa_questions.json", val / "captions.json", val / "images")
    coco = json.loads((val / "captions.json").read_text())
    del coco["images"][3]["file_name"]
    (tmp_path / "c.json").write_text(json.dumps(coco))
    with pytest.raises(ConfigError, match=r"images\[3\] has no `file_name`\)$"):
        CaptionTask.from_files("c", tmp_path / "c.json", val / "images")


def test_a_task_file_naming_a_task_twice_is_refused(world: Path, tmp_path: Path) -> None:
    val = world / "eval/val"
    task = {
        "name": "c",
        "kind": "caption",
        "query": {"captions": str(val / "captions.json"), "image_dir": str(val / "images")},
    }
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump([task, {**task, "name": "d"}, task]))
    with pytest.raises(ConfigError) as err:
        register_task_file(path)
    assert str(err.value) == f"{path}: task names must be distinct; named more than once: c"


def test_vqa_image_pattern_and_file_name_keys(world: Path, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    qs = json.loads((world / "eval/val/vqa_questions.json").read_text())
    anns = json.loads((world / "eval/val/vqa_annotations.json").read_text())
    qs["questions"] = qs["questions"][:6]
    for q in qs["questions"]:
        src = world / f"eval/val/images/world_val_{q['image_id']:012d}.jpg"
        shutil.copy(src, images / f"COCO_val2014_{q['image_id']:012d}.jpg")
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(anns))
    task = VQATask.from_files(
        "p",
        tmp_path / "q.json",
        tmp_path / "a.json",
        images,
        image_pattern="COCO_val2014_{image_id:012d}.jpg",
    )
    assert len(task.query) == 6  # only annotated questions that are asked
    assert task.query[0].image.name == "COCO_val2014_000000000001.jpg"
    # a per-question file name (TextVQA / VizWiz conversions) wins over everything else
    for q in qs["questions"]:
        q["image"] = f"COCO_val2014_{q['image_id']:012d}.jpg"
        q["image_id"] = f"img{q['image_id']}"
    (tmp_path / "q2.json").write_text(json.dumps(qs))
    task2 = VQATask.from_files("p2", tmp_path / "q2.json", tmp_path / "a.json", images)
    assert [e.image for e in task2.query] == [e.image for e in task.query]


def test_scores_are_the_metrics(world: Path) -> None:
    cap = load_task("synth_coco", world=world)
    some = cap.query[:10]
    preds = {
        e.id: e.references[(i + 1) % 5] if i % 3 else "a red circle" for i, e in enumerate(some)
    }
    score, per = cap.score(preds, some)
    expected = caption_scores({e.id: list(e.references) for e in some}, preds)["CIDEr"]
    assert score == pytest.approx(100 * expected, abs=1e-9) and set(per) == set(preds)
    vqa = load_task("synth_vqa", world=world)
    preds = {e.id: e.target if i % 2 else "no" for i, e in enumerate(vqa.query)}
    score, per = vqa.score(preds)
    assert score == vqa_accuracy_corpus(preds, {e.id: list(e.references) for e in vqa.query})[0]
    assert 30 < score < 80
