"""`mm1 ablate` end to end at tiny size: cells trained and evaluated into their run
directories, results and report written, finished cells never re-run, a failing cell
recorded while the study goes on, the seq_len check, the dry run."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from mm1 import cli
from mm1.ablate import runner
from mm1.ablate.cell import read_cell
from mm1.ablate.command import ablate, dry_run
from mm1.ablate.grid import Grid, load_grid
from mm1.ablate.prompt_check import context_warnings, longest_eval_prompt

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "data.world_size": "tiny",
    "data.num_workers": 0,
    "train.steps": 2,
    "train.batch_size": 2,
    "train.micro_batch_size": 2,
    "train.save_every": 1,
    "train.log_every": 1,
    "train.val_every": 0,
    "train.tensorboard": False,
    "train.progress": False,
}
EVAL = {
    "eval.shots": [0, 2],
    "eval.seeds": 1,
    "eval.max_examples": 2,
    "eval.max_new_tokens": 4,
    "eval.vqa_max_new_tokens": 2,
}


def _write(path: Path, world: Path, **body) -> Path:
    doc = {
        "study": "tiny",
        "base": {
            "config": str(ROOT / "configs" / "demo.yaml"),
            "overrides": {"data.world": str(world), **TINY},
        },
        "eval": {"overrides": EVAL},
        **body,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """Three cells: two train and evaluate, one names data that does not exist."""
    tmp = tmp_path_factory.mktemp("ablate")
    grid = _write(
        tmp / "grid.yaml",
        tmp / "world",
        cells=[
            {"model.connector.type": "avgpool"},
            {"model.connector.type": "attnpool"},
            {"label": "missing", "set": {"data.sources": [{"format": "wds", "path": "nowhere"}]}},
        ],
        table={"layout": "fig4", "group_by": "model.connector.type"},
        prepare=[{"caption_splits": {"world": str(tmp / "world"), "fraction": 0.25}}],
    )
    log: list[str] = []
    assert ablate(grid, tmp / "study", log=log.append) == 1  # one cell failed
    return grid, tmp / "study", log


def test_cells_trained_evaluated_and_reported(study) -> None:
    grid, study_dir, _ = study
    cells = load_grid(grid).cells
    records = [json.loads((study_dir / c.id / "cell.json").read_text()) for c in cells]
    assert [r["status"] for r in records] == ["done", "done", "failed"]
    for cell, rec in zip(cells[:2], records[:2], strict=True):
        run = study_dir / cell.id
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["model"]["connector"]["type"] == cell.delta["model.connector.type"]
        assert saved["eval"]["max_examples"] == 2  # the grid's eval settings are the run's
        assert rec["steps"] == 2 and (run / "checkpoints").is_dir()
        assert set(rec["metrics"]) >= {"synth_coco/0", "synth_vqa/2", "average/2", "train/loss"}
        assert 0 < rec["metrics"]["train/fill"] <= 1
        assert (run / "eval" / "results.json").is_file()  # as `mm1 eval RUN` writes it
    # the failed cell's error names what was wrong; the cells after it still ran
    assert "nowhere" in records[2]["error"]
    results = json.loads((study_dir / "ablation.json").read_text())
    by_label = {c["label"]: c for c in results["configs"]}
    avg = by_label["type=avgpool"]
    score = avg["seeds"]["0"]["metrics"]["synth_coco/0"]
    assert avg["metrics"]["synth_coco/0"] == {"mean": score, "std": 0.0, "n": 1, "values": [score]}
    assert results["failed"][0]["cell"] == cells[2].id
    report = (study_dir / "report.md").read_text()
    # explicit cells set different keys: "-" is the base config's value
    assert "| type | cell | 0-shot avg | 2-shot avg | seeds done |" in report
    assert "| avgpool | - |" in report and "| - | missing |" in report
    assert cells[2].id in report
    assert (study_dir / "tiny.png").stat().st_size > 0
    # the prepare step ran once the world was there
    assert (study_dir.parent / "world" / "captions_clean_subset" / "00000.tar").is_file()


def test_a_cell_can_be_scored_by_the_sft_suite(study) -> None:
    """The `sft` suite as a cell runs it: `mm1 eval RUN --suite sft` with the grid's eval
    settings, every task's metrics under `sft/`."""
    from mm1.ablate.cell import SUITES

    grid, study_dir, _ = study
    run = study_dir / load_grid(grid).cells[0].id
    metrics = SUITES["sft"](run, [f"{k}={v}" for k, v in EVAL.items()])
    tasks = {key.split("/")[1] for key in metrics}
    assert len(tasks) == 5 and all(key.startswith("sft/") for key in metrics)
    assert all(v >= 0 for v in metrics.values())
    assert (run / "eval-suite").is_dir()
    assert SUITES["generation"](run, []) == {}  # an MM1 model generates no image features


def test_finished_cells_never_rerun(study, monkeypatch) -> None:
    grid, study_dir, _ = study
    ran: list[str] = []

    def fake_run_cell(cfg, record, suites):
        ran.append(record["id"])
        return {**record, "status": "failed", "error": "retried"}

    monkeypatch.setattr(runner, "run_cell", fake_run_cell)
    log: list[str] = []
    runner.run_study(load_grid(grid), study_dir, log=log.append)
    # only the failed cell is tried again
    assert ran == [load_grid(grid).cells[2].id]
    assert any("2 done, 1 to run" in line for line in log)
    assert any(line.startswith("prepare 1/1") and "done already" in line for line in log)


def test_interrupted_cell_is_planned_to_resume_from_its_checkpoint(study) -> None:
    grid, study_dir, _ = study
    g = load_grid(grid)
    cell = g.cells[0]
    rec_path = study_dir / cell.id / "cell.json"
    saved = rec_path.read_text()
    try:  # a sitting killed while training: the record still says running
        rec_path.write_text(json.dumps({**json.loads(saved), "status": "running"}))
        plan = runner.plan_study(g, study_dir)[0]
        assert plan.status == "resume" and plan.step == 2
    finally:
        rec_path.write_text(saved)


def test_dry_run_lists_cells_with_measured_cost(study) -> None:
    grid, study_dir, _ = study
    lines = dry_run(grid, study_dir, log=lambda _: None)
    cells = load_grid(grid).cells
    for cell in cells:
        assert any(line.strip().startswith(cell.id) for line in lines)
    assert "prepare 1: caption splits" in lines[1] and "[done]" in lines[1]
    assert "done" in lines[2] and "failed" in lines[4]
    assert "measured on 2 finished cell(s)" in lines[-1]


def test_prompts_beyond_the_training_context_warned(study) -> None:
    grid, study_dir, _ = study
    g = load_grid(grid)
    cfg = g.cell_config(g.cells[0], study_dir)
    lengths = longest_eval_prompt(cfg)
    # 2-shot prompts: three images of 16 slots each, plus text
    assert set(lengths) == {"synth_coco", "synth_vqa"} and min(lengths.values()) > 3 * 16
    assert context_warnings([("c", cfg)]) == []
    short = copy.deepcopy(cfg)
    short.data.seq_len = min(lengths.values()) - 1
    [warning] = context_warnings([("c6", cfg), ("c7", short)])
    assert warning.startswith("cell c7: data.seq_len=") and "images" not in warning
    # 8-shot prompts show 9 images: more than any world document (6), whatever the seq_len
    many = copy.deepcopy(cfg)
    many.data.seq_len, many.eval.shots = 4096, [0, 8]
    [warning] = context_warnings([("c8", many)])
    assert "shorter" not in warning
    assert "8-shot prompts show 9 images, more than any training document" in warning
    # cells sharing a problem share one line
    assert [w.split(":")[0] for w in context_warnings([("a", many), ("b", many)])] == [
        "all 2 cells"
    ]
    both = context_warnings([("a", many), ("b", many), ("c", cfg)])
    assert [w.split(":")[0] for w in both] == ["2 cells (a, b)"]


def test_parallel_failures_recorded(tmp_path, study) -> None:
    _, study_dir, _ = study
    bad = {"data.sources": [{"format": "wds", "path": "nowhere"}]}
    grid = _write(
        tmp_path / "grid.yaml",
        study_dir.parent / "world",
        cells=[{"label": "a", "set": bad}, {"label": "b", "set": {**bad, "data.seq_len": 128}}],
    )
    records = runner.run_study(load_grid(grid), tmp_path / "study", jobs=2, log=lambda _: None)
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert all("nowhere" in r["error"] for r in records)


def test_cli_rejects_a_bad_grid(tmp_path, capsys) -> None:
    grid = _write(tmp_path / "grid.yaml", tmp_path / "world", axes={"model.connector.tpye": [1]})
    assert cli.main(["ablate", str(grid), "--dry-run"]) == 2
    assert "model.connector.tpye" in capsys.readouterr().out


def test_thread_shares_split_the_cpus() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    shares = runner._thread_shares(len(cpus))
    assert sorted(c for share in shares for c in share) == cpus  # one each, all used
    assert runner._thread_shares(1) == [cpus]
    assert all(len(s) == 1 for s in runner._thread_shares(2 * len(cpus)))  # more jobs: shared


def test_force_moves_a_changed_cell_aside(tmp_path, study) -> None:
    _, study_dir, _ = study
    world = study_dir.parent / "world"
    grid = load_grid(_write(tmp_path / "g.yaml", world, cells=[{"train.steps": 3}]))
    other = tmp_path / "o"
    other.mkdir()
    # another grid wrote the study, and its cell with this id ran another config
    old = load_grid(_write(other / "g.yaml", world, cells=[{"train.steps": 3}, {"train.steps": 4}]))
    study = tmp_path / "study"
    runner.write_study_file(old, study)
    cell_dir = study / grid.cells[0].id
    cell_dir.mkdir()
    (cell_dir / "cell.json").write_text(json.dumps({"status": "done", "config_hash": "other"}))
    runner.check_study_dir(grid, study, force=True, log=lambda _: None)
    assert not cell_dir.exists()
    assert [p.name.split(".")[0] for p in (study / ".replaced").iterdir()] == [grid.cells[0].id]


# A stand-in for `python -m mm1.ablate.worker SPEC STUDY CELL_ID`: records its cell as
# interrupted at once (FAKE_CELL=interrupt) or only once SIGINT arrives (FAKE_CELL=wait); or
# records it running and, on SIGINT, dies of KeyboardInterrupt (FAKE_CELL=running, as a cell
# stopped while evaluating) or exits 130 (FAKE_CELL=exit130, as the worker does then).
FAKE_WORKER = """
import json, os, signal, sys, time
from pathlib import Path
cell = Path(sys.argv[2]) / sys.argv[3]
mode = os.environ["FAKE_CELL"]
def record(*_):
    (cell / "cell.json").write_text(json.dumps({"id": sys.argv[3], "status": "interrupted"}))
    sys.exit(1)
if mode == "interrupt":
    record()
if mode in ("running", "exit130"):
    (cell / "cell.json").write_text(json.dumps({"id": sys.argv[3], "status": "running"}))
if mode == "wait":
    signal.signal(signal.SIGINT, record)
if mode == "exit130":
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
(cell / "started").touch()
time.sleep(60)
"""


def _fake_study(tmp_path: Path, monkeypatch, mode: str, cells: int) -> Grid:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(runner, "WORKER", [sys.executable, str(script)])
    monkeypatch.setenv("FAKE_CELL", mode)
    return load_grid(
        _write(
            tmp_path / "grid.yaml",
            tmp_path / "world",
            axes={"train.steps": list(range(3, 3 + cells))},
        )
    )


def test_an_interrupted_parallel_cell_stops_the_study(tmp_path, monkeypatch) -> None:
    grid = _fake_study(tmp_path, monkeypatch, "interrupt", cells=4)
    records = runner.run_study(grid, tmp_path / "study", jobs=2, log=lambda _: None)
    # the first two were started together; once one reported itself interrupted, no other began
    assert [r.get("status") for r in records] == ["interrupted", "interrupted", None, None]


def _terminate_once_started(study_dir, cells) -> None:
    """SIGTERM to this process (the runner) once every one of `cells` has started."""

    def terminate() -> None:
        started = [study_dir / c.id / "started" for c in cells]
        while not all(p.exists() for p in started):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate, daemon=True).start()


def test_sigterm_reaches_the_parallel_cells(tmp_path, monkeypatch) -> None:
    grid = _fake_study(tmp_path, monkeypatch, "wait", cells=3)
    study_dir = tmp_path / "study"

    _terminate_once_started(study_dir, grid.cells[:2])
    with pytest.raises(KeyboardInterrupt):
        runner.run_study(grid, study_dir, jobs=2, log=lambda _: None)
    # both running cells were told to stop and recorded it; the third never started
    statuses = [read_cell(study_dir / c.id).get("status") for c in grid.cells]
    assert statuses == ["interrupted", "interrupted", None]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("mode", ["running", "exit130"])
def test_a_parallel_cell_stopped_outside_training_resumes_not_fails(
    tmp_path, monkeypatch, mode
) -> None:
    """Ctrl-C while a worker evaluates: its cell stays running (as with --jobs 1) and the next
    sitting resumes it; it is not recorded as failed."""
    grid = _fake_study(tmp_path, monkeypatch, mode, cells=3)
    study_dir = tmp_path / "study"

    _terminate_once_started(study_dir, grid.cells[:2])
    log: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        runner.run_study(grid, study_dir, jobs=2, log=log.append)
    statuses = [read_cell(study_dir / c.id).get("status") for c in grid.cells]
    assert statuses == ["running", "running", None]
    assert not any("FAILED" in line for line in log)
    plans = runner.plan_study(grid, study_dir)
    assert [p.status for p in plans] == ["resume", "resume", "pending"]


# `python -m mm1.ablate.worker` with its cell's training replaced: records what it was given
# (the steps of its config) as done; the first to start renames the grid file away.
SPEC_WORKER = """
import json, os, sys
from pathlib import Path
import mm1.ablate.cell
from mm1.ablate import worker
grid = Path(os.environ["GRID_FILE"])
if grid.exists():
    grid.rename(grid.with_suffix(".old"))
def run_cell(cfg, record, suites):
    rec = {**record, "status": "done", "steps": cfg.train.steps, "train_seconds": 0.0}
    rec["eval_seconds"] = 0.0
    mm1.ablate.cell.write_cell(Path(cfg.train.run_dir), rec)
    return rec
mm1.ablate.cell.run_cell = run_cell
sys.exit(worker.main(sys.argv[1:]))
"""


def test_workers_run_the_grid_as_it_was_when_the_run_started(tmp_path, monkeypatch) -> None:
    script = tmp_path / "spec_worker.py"
    script.write_text(SPEC_WORKER)
    monkeypatch.setattr(runner, "WORKER", [sys.executable, str(script)])
    path = _write(tmp_path / "grid.yaml", tmp_path / "world", axes={"train.steps": [3, 4, 5]})
    monkeypatch.setenv("GRID_FILE", str(path))
    grid = load_grid(path)
    records = runner.run_study(grid, tmp_path / "study", jobs=2, log=lambda _: None)
    assert not path.exists()  # renamed by the first worker, before the third cell started
    assert [r["status"] for r in records] == ["done"] * 3
    assert [r["steps"] for r in records] == [3, 4, 5]
    assert [r["label"] for r in records] == [c.label for c in grid.cells]


# Holds the study lock as a second `mm1 ablate` would, until killed.
STUDY_HOLDER = """
import sys, time
from pathlib import Path
from mm1.ablate.runner import lock_study
lock_study(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_ablate_on_the_same_study_is_refused(tmp_path, monkeypatch) -> None:
    from mm1.config import ConfigError

    grid = _fake_study(tmp_path, monkeypatch, "interrupt", cells=1)
    study_dir = tmp_path / "study"
    holder = subprocess.Popen(
        [sys.executable, "-c", STUDY_HOLDER, str(study_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(ConfigError) as err:
            runner.run_study(grid, study_dir, jobs=2, log=lambda _: None)
        assert str(err.value) == (
            f"--out {study_dir}: another mm1 ablate (pid {holder.pid}) is running this study; "
            "wait for it to finish or stop it, or choose another --out"
        )
        assert not (study_dir / grid.cells[0].id).exists()  # nothing ran
    finally:
        holder.kill()
        holder.wait()
    # the lock is not a cell's run-dir lock; once its holder is gone the study runs
    assert runner.STUDY_LOCK != ".lock"
    runner.run_study(grid, study_dir, jobs=2, log=lambda _: None)
    assert read_cell(study_dir / grid.cells[0].id)["status"] == "interrupted"


# A runner-like parent: starts one cell's worker as the runner does (its training replaced by a
# long sleep), prints the worker's pid, and waits to be killed.
ORPHAN_PARENT = """
import sys, time
from pathlib import Path
from mm1.ablate import runner
from mm1.ablate.grid import load_grid
grid, study = load_grid(sys.argv[1]), Path(sys.argv[2])
runner.WORKER = [sys.executable, sys.argv[3]]
plan = runner.plan_study(grid, study)[0]
proc, _, _ = runner._start_worker(runner.write_spec(grid, study, plan), study, plan, [0], print)
print(proc.pid, flush=True)
time.sleep(60)
"""
SLEEPY_WORKER = """
import sys, time
from pathlib import Path
import mm1.ablate.cell
from mm1.ablate import worker
def run_cell(cfg, record, suites):
    (Path(cfg.train.run_dir) / "started").touch()
    time.sleep(60)
mm1.ablate.cell.run_cell = run_cell
sys.exit(worker.main(sys.argv[1:]))
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has ended; whoever adopted it has yet to reap it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_end_when_the_runner_is_killed(tmp_path) -> None:
    worker_script = tmp_path / "sleepy_worker.py"
    worker_script.write_text(SLEEPY_WORKER)
    path = _write(tmp_path / "grid.yaml", tmp_path / "world", axes={"train.steps": [3]})
    study_dir = tmp_path / "study"
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_PARENT, str(path), str(study_dir), str(worker_script)],
        stdout=subprocess.PIPE,
        text=True,
    )
    pid = _worker_pid(parent)
    try:
        started = study_dir / load_grid(path).cells[0].id / "started"
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists()
        parent.kill()  # SIGKILL: no handler of the runner's runs
        parent.wait()
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_killed_runners_repeated_death_signals_are_one_sigterm(monkeypatch) -> None:
    """The kernel signals a worker each time the runner's thread it belongs to exits and it
    passes to another thread: a `kill -9` of the runner sent it SIGTERM twice or more, and the
    trainer took the second for "stop again" (no save, a DCP traceback in cell.log)."""
    from mm1.ablate import worker

    raised: list[int] = []
    monkeypatch.setattr(worker.signal, "raise_signal", raised.append)
    monkeypatch.setattr(worker, "_told", False)
    for _ in range(3):
        worker._parent_died(worker.PARENT_DIED, None)
    assert raised == [signal.SIGTERM]


def _worker_pid(proc: subprocess.Popen[str]) -> int:
    """The worker's pid: the parent's first line that is a number (after `_start_worker`'s log)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip().isdigit():
            return int(line)
    raise AssertionError("the parent printed no worker pid")


def test_a_cell_with_mostly_padded_rows_is_warned() -> None:
    log: list[str] = []
    rec = {"id": "c1", "status": "done", "train_seconds": 1.0, "eval_seconds": 1.0}
    runner._report({**rec, "metrics": {"train/fill": 0.45}}, log.append)
    assert any("c1: its rows were 55% padding" in line for line in log)
    log.clear()
    runner._report({**rec, "metrics": {"train/fill": 0.97}}, log.append)
    assert not any("warning" in line for line in log)


def test_study_controls_score_each_done_cell_with_shuffled_images(study) -> None:
    from benchmarks.study_controls import CONTROL_DIR, collect, table

    _, study_dir, _ = study
    rows = collect(study_dir, max_examples=8)
    assert set(rows) == {"type=avgpool", "type=attnpool"}  # the failed cell is left out
    for row in rows.values():
        assert set(row) == {"synth_coco", "synth_coco shuffled", "synth_vqa", "synth_vqa shuffled"}
        assert all(len(v) == 1 for v in row.values())
    cell = load_grid(study[0]).cells[0]
    saved = json.loads((study_dir / cell.id / CONTROL_DIR / "results.json").read_text())
    assert saved["config"]["shuffle_images"] is True and saved["config"]["shots"] == [0]
    assert rows["type=avgpool"]["synth_vqa"] == [
        read_cell(study_dir / cell.id)["metrics"]["synth_vqa/0"]
    ]
    assert "| type=avgpool | 1 |" in table(rows)
    with_world = collect(study_dir, max_examples=8, world=study_dir.parent / "world")
    for row in with_world.values():
        assert {"objects named", "colours named", "shapes named"} <= set(row)
        assert all(0 <= v[0] <= 100 for v in row.values())


def test_caption_grounding_counts_what_the_captions_name(tmp_path) -> None:
    from benchmarks.study_controls import caption_grounding

    scenes = {
        "1": {"objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "star"}]},
        "2": {"objects": [{"color": "green", "shape": "square"}]},
    }
    preds = [
        {"id": 1, "prediction": "a large red circle and a small blue square."},  # 1 of 2 objects
        {"id": 2, "prediction": "a square."},
    ]
    out = tmp_path / "eval" / "results.json"
    out.parent.mkdir()
    out.write_text(json.dumps({"predictions": {"synth_coco": {"0": {"0": preds}}}}))
    got = caption_grounding(tmp_path, scenes)
    assert got == pytest.approx(
        {"objects named": 25.0, "colours named": 50.0, "shapes named": 75.0}
    )


def test_a_cell_another_study_finished_is_copied_not_trained(study, monkeypatch) -> None:
    """A study beside one that finished a cell with the same config and suites takes that
    cell's run and results instead of training it again (the mixtures' 100/0/0 is text-only's
    captions cell); another suite or another config is trained."""
    from mm1.ablate.cell import finished_twin
    from mm1.train import trainer

    grid, study_dir, _ = study
    twin = study_dir / load_grid(grid).cells[0].id
    other = _write(
        study_dir.parent / "grid2.yaml",
        study_dir.parent / "world",
        study="tiny2",
        cells=[{"model.connector.type": "avgpool"}],
    )

    def no_training(cfg):
        raise AssertionError(f"{cfg.train.run_dir} was trained")

    monkeypatch.setattr(trainer, "Trainer", no_training)
    (plan,) = runner.plan_study(load_grid(other), study_dir.parent / "study2")
    assert plan.status == "copy"
    log: list[str] = []
    (rec,) = runner.run_study(load_grid(other), study_dir.parent / "study2", log=log.append)
    run = study_dir.parent / "study2" / load_grid(other).cells[0].id
    assert rec["status"] == "done" and rec["reused_from"] == str(twin)
    assert rec["metrics"] == read_cell(twin)["metrics"] and rec["study"] == "tiny2"
    assert any("copied" in line for line in log)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["run_dir"] == str(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        p.name for p in (twin / "checkpoints").iterdir()
    )
    assert not list(run.parent.glob(".reuse-*"))
    # not a twin: other suites, or another config
    assert finished_twin(run.parent / "new", rec["config_hash"], ["fewshot"]) is None
    assert finished_twin(run.parent / "new", "another-config", None) is None
    aside = twin / "checkpoints-aside"  # a twin whose weights are gone is no twin
    (twin / "checkpoints").rename(aside)
    try:
        assert finished_twin(run.parent / "new", rec["config_hash"], None) is None
    finally:
        aside.rename(twin / "checkpoints")
