"""`mm1 demo` end to end at toy scale: world, training, three evaluations, the report."""

from __future__ import annotations

from mm1.data.synthetic import write_world
from mm1.demo import object_recall, run_demo


def test_demo_writes_a_complete_report(tmp_path) -> None:
    world = tmp_path / "world"
    write_world(world, size="tiny", text_scale=0.0)
    report = run_demo(
        tmp_path / "demo",
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
        ],
    )
    text = report.read_text()
    for section in ("## Training", "## Few-shot evaluation", "## Is it looking at the image?"):
        assert section in text
    for run in ("| trained |", "| untrained |", "| shuffled images |"):
        assert run in text
    assert (report.parent / "loss.png").stat().st_size > 0
    assert (report.parent / "eval" / "results.json").exists()


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
