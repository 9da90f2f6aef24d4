"""The SFT evaluation suite: POPE's metric against hand-computed values, the world's suite files
(deterministic, balanced, beside the world's own files), tasks loaded from user files, prompts."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mm1.config import ConfigError
from mm1.data.prompt_format import PromptFormat
from mm1.data.sft_eval import ensure_sft_eval, write_sft_eval
from mm1.data.synthetic import train_world_tokenizer
from mm1.data.tokenizer import Tokenizer
from mm1.eval.metrics import pope_answer, pope_scores
from mm1.eval.suite import SHORT_SUFFIX, SuitePrompter, _demos, prior_scores
from mm1.eval.suite_tasks import SuiteExample, SuiteTask, load_suite

# --------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("No, there is none.", "no"),
        ("There is not a cat", "no"),
        ("Yes. No cat though.", "yes"),  # only the first sentence counts
        ("Nothing", "yes"),  # "Nothing" is not the word "no"
        ("", "yes"),
    ],
)
def test_pope_answer(text, said) -> None:
    assert pope_answer(text) == said


def test_pope_scores_hand_computed() -> None:
    labels = {1: "yes", 2: "yes", 3: "yes", 4: "no", 5: "no", 6: "no", 7: "no", 8: "yes"}
    preds = {1: "Yes", 2: "yes", 3: "No", 4: "Yes", 5: "no", 6: "No.", 7: "no", 8: "no"}
    # TP = 2 (1, 2), FN = 2 (3, 8), FP = 1 (4), TN = 3 (5, 6, 7)
    s = pope_scores(preds, labels)
    assert s["accuracy"] == pytest.approx(100 * 5 / 8)
    assert s["precision"] == pytest.approx(100 * 2 / 3)
    assert s["recall"] == pytest.approx(100 * 2 / 4)
    p, r = 2 / 3, 2 / 4
    assert s["f1"] == pytest.approx(100 * 2 * p * r / (p + r))  # 57.14...
    assert s["yes_ratio"] == pytest.approx(100 * 3 / 8)


def test_pope_task_reports_accuracy_per_category() -> None:
    """POPE's kinds of negatives scored apart, beside the pooled metrics."""
    rows = [  # (id, label, category, prediction)
        ("1", "yes", "random", "Yes"),
        ("2", "no", "random", "No"),
        ("3", "yes", "adversarial", "Yes"),
        ("4", "no", "adversarial", "Yes"),
        ("5", "no", "adversarial", "Yes"),
        ("6", "yes", "popular", "No"),
    ]
    examples = [SuiteExample(i, (), "q", (label,), label, cat) for i, label, cat, _ in rows]
    task = SuiteTask("pope", "pope", examples)
    scores, per = task.score({i: p for i, _, _, p in rows}, examples)
    assert scores["accuracy"] == pytest.approx(100 * 3 / 6)
    assert scores["accuracy_random"] == 100.0
    assert scores["accuracy_adversarial"] == pytest.approx(100 / 3)
    assert scores["accuracy_popular"] == 0.0
    assert per == {"1": 100.0, "2": 100.0, "3": 100.0, "4": 0.0, "5": 0.0, "6": 0.0}
    plain = [SuiteExample(e.id, (), "q", e.references, e.target) for e in examples]
    pooled, _ = task.score({i: p for i, _, _, p in rows}, plain)
    assert not [k for k in pooled if k.startswith("accuracy_")]


def test_vqa_task_reports_accuracy_per_answer_type() -> None:
    """The official VQA evaluation's per-answer-type accuracy: the mean of the per-question
    accuracies (min(#matching answers / 3, 1) averaged over the 10 leave-one-out subsets) of
    each type, x100, rounded to 2 decimals."""
    ten = lambda a, k, b: (a,) * k + (b,) * (10 - k)  # noqa: E731
    rows = [  # (id, answers, answer type, prediction)
        ("1", ten("yes", 10, "no"), "yes/no", "Yes"),  # 1
        ("2", ten("yes", 2, "no"), "yes/no", "yes"),  # 2 of 10 say yes: 0.6
        ("3", ten("3", 10, "4"), "number", "three"),  # "three" is normalised to "3": 1
        ("4", ten("red", 1, "blue"), "other", "red"),  # 0.3
        ("5", ten("red", 10, "blue"), "other", "green"),  # 0
    ]
    examples = [SuiteExample(i, (), "q", refs, refs[0], t) for i, refs, t, _ in rows]
    task = SuiteTask("vqa", "vqa", examples)
    scores, per = task.score({i: p for i, _, _, p in rows}, examples)
    assert per == pytest.approx({"1": 100.0, "2": 60.0, "3": 100.0, "4": 30.0, "5": 0.0})
    assert scores["VQA accuracy"] == 58.0
    assert scores["accuracy_yes/no"] == 80.0
    assert scores["accuracy_number"] == 100.0
    assert scores["accuracy_other"] == 15.0


def test_pope_scores_edge_cases() -> None:
    labels = {"a": "yes", "b": "no"}
    always_no = pope_scores({"a": "no", "b": "no"}, labels)
    assert always_no == {
        "accuracy": 50.0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "yes_ratio": 0.0,
    }
    always_yes = pope_scores({"a": "yes", "b": "yes"}, labels)
    assert always_yes["f1"] == pytest.approx(100 * 2 * 0.5 / 1.5)
    with pytest.raises(ValueError, match="without a prediction"):
        pope_scores({"a": "yes"}, labels)
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_scores({"a": "yes"}, {"a": "maybe"})


# --------------------------------------------------------------------------------------------
# The world's suite files
# --------------------------------------------------------------------------------------------


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A stand-in world: a manifest and one file of its own; the suite is added beside them."""
    root = tmp_path_factory.mktemp("world")
    manifest = {
        "seed": 3,
        "size": "tiny",
        "image_size": 64,
        "sources": {},
        "eval": {},
        "vocabulary": {},
    }
    (root / "world.json").write_text(json.dumps(manifest))
    (root / "eval" / "val").mkdir(parents=True)
    (root / "eval" / "val" / "captions.json").write_text("{}")
    before = _digest(root)
    ensure_sft_eval(root)
    after = _digest(root)
    assert {k: v for k, v in after.items() if not k.startswith("eval/sft/")} == before
    return root


def test_suite_files_are_deterministic(world, tmp_path) -> None:
    write_sft_eval(tmp_path, seed=3, size="tiny", image_size=64)
    mine = _digest(tmp_path / "eval" / "sft")
    theirs = _digest(world / "eval" / "sft")
    assert mine == theirs
    write_sft_eval(tmp_path, seed=4, size="tiny", image_size=64)
    assert _digest(tmp_path / "eval" / "sft") != theirs  # the seed matters


def test_suite_tasks_from_the_world(world) -> None:
    tasks = {t.name: t for t in load_suite(world / "eval" / "sft" / "suite.yaml")}
    assert list(tasks) == ["sft_vqav2", "sft_textvqa", "sft_pope", "sft_multi", "sft_bench"]
    for t in tasks.values():
        assert t.query and t.support
        # demonstrations never show a query's picture
        assert not {p for e in t.query for p in e.images} & {p for e in t.support for p in e.images}
    pope = tasks["sft_pope"]
    assert Counter(e.references[0] for e in pope.query) == {
        "yes": len(pope.query) // 2,
        "no": len(pope.query) // 2,
    }
    assert {e.category for e in pope.query} == {"random", "popular", "adversarial"}
    assert all(2 <= len(e.images) <= 3 for e in tasks["sft_multi"].query)
    most = [e for e in tasks["sft_multi"].query if "most" in e.question]
    assert most and all(e.target in ("first", "second", "third") for e in most)
    assert all(len(e.references) == 10 for e in tasks["sft_textvqa"].query)
    assert all(e.question.startswith("What") for e in tasks["sft_textvqa"].query)
    bench = tasks["sft_bench"].query
    assert {e.category for e in bench} == {"detail", "conv"}
    assert all(len(e.references) == 5 for e in bench if e.category == "detail")


def test_prior_baseline_scores_the_most_frequent_answer(world) -> None:
    tasks = load_suite(world / "eval" / "sft" / "suite.yaml")
    prior = prior_scores(tasks)["tasks"]
    assert prior["sft_pope"]["guess"] == "yes"
    assert prior["sft_pope"]["metrics"]["accuracy"]["mean"] == 50.0
    assert prior["sft_pope"]["metrics"]["yes_ratio"]["mean"] == 100.0


# --------------------------------------------------------------------------------------------
# User files
# --------------------------------------------------------------------------------------------


def _image(path: Path, color: str) -> str:
    Image.new("RGB", (32, 32), color).save(path)
    return path.name


@pytest.fixture
def user_suite(tmp_path) -> Path:
    img = tmp_path / "imgs"
    img.mkdir()
    a, b, c = (_image(img / f"{n}.png", n) for n in ("red", "green", "blue"))
    (tmp_path / "pope.jsonl").write_text(
        json.dumps({"question_id": 1, "image": a, "text": "Is there red?", "label": "yes"})
        + "\n"
        + json.dumps({"question_id": 2, "image": b, "text": "Is there red?", "label": "no"})
        + "\n"
    )
    (tmp_path / "bench_q.jsonl").write_text(
        json.dumps({"question_id": 7, "image": c, "text": "Describe it.", "category": "detail"})
        + "\n"
    )
    (tmp_path / "bench_r.jsonl").write_text(
        json.dumps({"question_id": 7, "text": "A blue square."})
        + "\n"
        + json.dumps({"question_id": 7, "text": "Blue everywhere."})
        + "\n"
    )
    (tmp_path / "multi_q.json").write_text(
        json.dumps(
            {"questions": [{"question_id": 9, "image_id": 9, "images": [a, b], "question": "?"}]}
        )
    )
    (tmp_path / "multi_a.json").write_text(
        json.dumps(
            {"annotations": [{"question_id": 9, "answers": [{"answer": "2"}] * 10}]},
        )
    )
    suite = [
        {"name": "my_pope", "kind": "pope", "query": {"image_dir": "imgs", "questions": "pope.jsonl"}},
        {
            "name": "my_bench",
            "kind": "long",
            "query": {"image_dir": "imgs", "questions": "bench_q.jsonl", "references": "bench_r.jsonl"},
        },
        {
            "name": "my_multi",
            "kind": "multi",
            "query": {"image_dir": "imgs", "questions": "multi_q.json", "annotations": "multi_a.json"},
        },
    ]  # fmt: skip
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_tasks_load_from_user_files_and_score(user_suite) -> None:
    tasks = {t.name: t for t in load_suite(user_suite)}
    pope, bench, multi = tasks["my_pope"], tasks["my_bench"], tasks["my_multi"]
    assert [e.references for e in pope.query] == [("yes",), ("no",)]
    assert pope.query[0].images == (user_suite.parent / "imgs" / "red.png",)
    scores, per = pope.score({"1": "Yes, it is.", "2": "Yes"}, pope.query)
    assert scores["F1"] == pytest.approx(100 * 2 * 0.5 / 1.5) and per == {"1": 100.0, "2": 0.0}
    assert bench.query[0].references == ("A blue square.", "Blue everywhere.")
    scores, _ = bench.score({"7": "a blue square"}, bench.query)
    assert list(scores) == ["CIDEr", "ROUGE-L"] and scores["ROUGE-L"] == pytest.approx(100.0)
    assert [p.name for p in multi.query[0].images] == ["red.png", "green.png"]
    # answers are normalised as LLaVA submits them: "Two." reads as "2"
    assert multi.score({"9": "Two."}, multi.query)[0] == {"VQA accuracy": 100.0}
    assert multi.score({"9": "3"}, multi.query)[0] == {"VQA accuracy": 0.0}


def test_user_suite_mistakes_are_one_line_errors(user_suite, tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([{"name": "x", "kind": "pope", "query": {"image_dir": "i"}}]))
    with pytest.raises(ConfigError, match=r"bad.yaml: task 1: .*needs `questions`"):
        load_suite(bad)
    (tmp_path / "pope.jsonl").write_text('{"question_id": 1, "image": "red.png", "text": "?"}\n')
    with pytest.raises(ValueError, match="line 1: missing label"):
        load_suite(user_suite)
    (tmp_path / "pope.jsonl").write_text(
        '{"question_id": 1, "image": "gone.png", "text": "?", "label": "no"}\n'
    )
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_suite(user_suite)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def test_prompts_chat_zero_shot_and_pretrained_few_shot(world, tmp_path) -> None:
    tasks = {t.name: t for t in load_suite(world / "eval" / "sft" / "suite.yaml")}
    train_world_tokenizer(["What color is the star?"] * 4, 300).save(str(tmp_path / "tok.json"))
    tok = Tokenizer.from_file(tmp_path / "tok.json")
    fmt = PromptFormat(4)
    chat, few = SuitePrompter(tok, fmt, True), SuitePrompter(tok, fmt, False)
    assert chat.shots == 0 and few.shots == 4
    multi = tasks["sft_multi"].query[0]
    text = chat.text("multi", multi, [])
    assert text.count("<image>") == len(multi.images) and text.endswith(SHORT_SUFFIX)
    assert not chat.text("long", tasks["sft_bench"].query[0], []).endswith(SHORT_SUFFIX)
    vqa = tasks["sft_vqav2"]
    demos = _demos(vqa, vqa.query[0], 4, seed=0)
    assert demos != _demos(vqa, vqa.query[0], 4, seed=1)  # demonstrations vary by seed
    text = few.text("vqa", vqa.query[0], demos)
    assert text.count("<|endofchunk|>") == 4 and text.endswith("Short answer:")
    assert all(f"Short answer:{d.target}<|endofchunk|>" in text for d in demos)


def test_readme_suite_file_example_is_valid() -> None:
    from mm1.eval.tasks import TaskSpec

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("`--suite FILE` runs your own files", 1)[1]
    block = block.split("```yaml\n", 1)[1].split("```", 1)[0]
    specs = [TaskSpec.from_dict(d) for d in yaml.safe_load(block)]
    assert [s.kind for s in specs] == ["vqa", "pope", "multi", "long"]
