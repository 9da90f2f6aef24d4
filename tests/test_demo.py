"""`mm1 demo` end to end at toy scale: world, training, three evaluations, the report; and
`mm1 eval` on the demo's run: the report's numbers, its settings, a corrupt image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mm1 import cli
from mm1.data.synthetic import write_world
from mm1.demo import object_recall, run_demo


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """The demo at toy scale; its eval settings differ from every default of `mm1 eval`."""
    tmp = tmp_path_factory.mktemp("demo")
    world = tmp / "world"
    write_world(world, size="tiny", text_scale=0.0)
    return run_demo(
        tmp / "demo",
        [
            f"data.world={world}",
            "data.num_workers=0",
            "train.steps=4",
            "train.val_every=2",
            "train.save_every=4",
            "train.progress=false",
            "train.tensorboard=false",
            "eval.shots=[0,2]",
            "eval.seeds=1",
            "eval.max_examples=8",  # VQA: several questions share an image
            "eval.max_new_tokens=6",
            "eval.batch_size=3",
        ],
    )


def test_demo_writes_a_complete_report(report: Path) -> None:
    text = report.read_text()
    for section in ("## Training", "## Few-shot evaluation", "## Is it looking at the image?"):
        assert section in text
    for run in ("| trained |", "| untrained |", "| shuffled images |"):
        assert run in text
    assert (report.parent / "loss.png").stat().st_size > 0
    assert (report.parent / "eval" / "results.json").exists()
    # the prompts' lengths against the 256-token training rows: 2 shots show 3 images and fit
    assert "256-token rows, and at most 6 images" in text
    assert "| synth_coco | 2 | 3 |" in text and "| synth_vqa | 0_plain | 1 |" in text
    assert "Beyond the training context" not in text


def test_mm1_eval_reproduces_the_demo_report(report: Path, capsys) -> None:
    """`mm1 eval RUN` with no settings scores the run as its report did (the run's own eval
    section), records the settings, and leaves the report's eval/ folder alone."""
    run = report.parent
    demo_json = run / "eval" / "results.json"
    before = demo_json.read_bytes()
    assert cli.main(["eval", str(run)]) == 0
    printed = capsys.readouterr().out.splitlines()
    # piped (80 columns): the table's lines print whole, as in results.md, never broken
    table = (run / cli.EVAL_OUT / "results.md").read_text().split("\n\n###")[0]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert rows and max(map(len, rows)) > 80 and set(rows) <= set(printed)
    assert demo_json.read_bytes() == before  # the folder the report links to is untouched
    ours = json.loads((run / cli.EVAL_OUT / "results.json").read_text())
    trained = json.loads(before)["trained"]

    def scores(r: dict) -> dict:
        return {
            t: {k: v["scores"] for k, v in info["shots"].items()} for t, info in r["tasks"].items()
        }

    def predictions(r: dict) -> dict:
        return {
            (t, k, s): [x["prediction"] for x in recs]
            for t, by_shot in r["predictions"].items()
            for k, by_seed in by_shot.items()
            for s, recs in by_seed.items()
        }

    assert scores(ours) == scores(trained)
    assert predictions(ours) == predictions(trained)
    assert ours["average"] == trained["average"]
    for key in ("shots", "seeds", "max_new_tokens", "batch_size", "max_examples", "num_beams"):
        assert ours["config"][key] == trained["config"][key], key
    settings = ours["settings"]
    assert settings["from"] == str(run / "config.yaml")
    assert settings["eval"]["max_new_tokens"] == 6 and settings["eval"]["shots"] == [0, 2]
    assert settings["overrides"] == [] and settings["flags"] == {}

    # an `eval.*` override (and a flag) changes only what it names, and is recorded
    out = run / "eval-override"
    args = ["eval", str(run), "eval.max_new_tokens=2", "--seeds", "1", "--out", str(out)]
    assert cli.main(args) == 0
    capsys.readouterr()
    changed = json.loads((out / "results.json").read_text())
    assert changed["config"]["max_new_tokens"]["caption"] == 2
    assert changed["config"]["shots"] == [0, 2] and changed["config"]["batch_size"] == 3
    assert changed["settings"]["overrides"] == ["eval.max_new_tokens=2"]
    assert changed["settings"]["flags"] == {"seeds": 1}
    assert "eval.max_new_tokens=2" in (out / "results.md").read_text()


def test_mm1_eval_overrides_are_one_line_errors(report: Path, capsys) -> None:
    run = report.parent
    for bad, expected in (
        ("train.steps=3", "give eval.KEY=VALUE"),
        ("eval.shots=[-1]", "eval.shots[0]=-1 must be >= 0"),
        ("eval.shots=[0,2,0]", "eval.shots[2]=0 is given twice: list each shot count once"),
        ("eval.seeds=x", "eval.seeds"),
        ("eval.nope=1", "eval.nope"),
    ):
        assert cli.main(["eval", str(run), bad]) == 2, bad
        out = capsys.readouterr().out
        assert len(out.strip().splitlines()) == 1 and expected in out, out


def test_mm1_eval_corrupt_image_is_one_line_or_scored_empty(
    report: Path, tmp_path: Path, capsys, truncated_jpeg
) -> None:
    import shutil

    import yaml

    run, world = report.parent, report.parent.parent / "world"
    images = tmp_path / "images"
    shutil.copytree(world / "eval" / "val" / "images", images)
    victim = sorted(images.iterdir())[1]
    truncated_jpeg(victim, world / "eval" / "val" / "images" / victim.name)  # same name
    split = {"captions": str(world / "eval" / "val" / "captions.json"), "image_dir": str(images)}
    task = {"name": "mycoco", "kind": "caption", "query": split}
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump([task]))
    args = ["eval", str(run), "--task-file", str(tmp_path / "tasks.yaml"), "--shots", "0"]
    args += ["--out", str(tmp_path / "out")]

    assert cli.main(args) == 2
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if not line.startswith("few-shot eval")]  # bar
    assert len(errors) == 1 and errors[0].startswith("error: "), out
    assert str(victim) in errors[0] and "Traceback" not in out

    assert cli.main([*args, "--bad-images", "empty"]) == 0
    capsys.readouterr()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["bad_images"]) == [str(victim)]
    assert results["config"]["bad_images"] == "empty"
    assert results["tasks"]["mycoco"]["shots"]["0"]["empty_predictions"] == [1]
    assert "undecodable image" in (tmp_path / "out" / "results.md").read_text()


def test_object_recall_needs_colour_and_shape_together() -> None:
    scene = {
        "objects": [
            {"color": "red", "shape": "circle"},
            {"color": "light blue", "shape": "square"},
        ]
    }
    assert object_recall("a large red circle and a blue square", scene) == 1.0
    assert object_recall("a red square and a blue circle", scene) == 0.0
    assert object_recall("a red big circle", scene) == 0.5
    assert object_recall("", scene) == 0.0


def test_a_demo_stopped_by_a_signal_stops_before_evaluating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """SIGTERM during the demo's training saves and stops the demo with 128 + signal, instead of
    evaluating and reporting a half-trained model; the line says how to resume."""
    import mm1.demo

    class Stopped:
        def __init__(self, cfg) -> None:
            self.cfg = cfg

        def fit(self) -> dict:
            return {"stopped_by": 15, "step": 2, "steps_run": 2}

    def no_eval(*args, **kwargs):
        raise AssertionError("evaluated a run stopped by a signal")

    monkeypatch.setattr(mm1.demo, "Trainer", Stopped)
    monkeypatch.setattr(mm1.demo, "evaluate_models", no_eval)
    out = tmp_path / "demo"
    code = cli.main(["demo", "--out", str(out), "--sft", "train.steps=5", "--sft-override=x.y=1"])
    assert code == 143
    line = " ".join(capsys.readouterr().out.split())
    assert f"stopped early by SIGTERM at step 2 of 5 (checkpoint saved in {out})" in line
    assert f"resume with mm1 demo --out {out} --sft train.steps=5 --sft-override=x.y=1" in line


def test_sft_overrides_need_the_sft_stage(tmp_path: Path, capsys) -> None:
    assert cli.main(["demo", "--out", str(tmp_path), "--sft-override=train.steps=5"]) == 2
    assert "--sft-override is for the SFT stage: give it with --sft" in capsys.readouterr().out
