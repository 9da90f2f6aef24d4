"""One cell of a study: train its run (resuming from its checkpoint), then evaluate it, and
record the outcome in `RUN/cell.json` (status running / done / failed, metrics, timings).

Evaluation is a list of suites, each a function of the run directory (`SUITES`): `fewshot` is
what `mm1 eval RUN` does with the run's own `eval` section (0/4/8-shot captioning and VQA on the
run's world), `sft` what `mm1 eval RUN --suite sft` does, `generation` what `mm1
eval-generation RUN` does; more suites register here by name."""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mm1.checkpoint import latest_checkpoint
from mm1.config import Config, load_eval_config
from mm1.data.world import run_world
from mm1.fs import atomic_write_text

CELL_FILE = "cell.json"
EVAL_DIR = "eval"
# A suite: (run dir, eval.* overrides) -> flat metrics {"synth_coco/4": 91.2, ...}.
Suite = Callable[[Path, Sequence[str]], dict[str, float]]


def fewshot_suite(run_dir: Path, overrides: Sequence[str]) -> dict[str, float]:
    """`mm1 eval RUN` with the run's own eval section (then `overrides`): the scores per task
    and shot count (mean over the eval's demonstration seeds), report in RUN/eval."""
    from mm1.eval.fewshot import evaluate
    from mm1.eval.report import write_report
    from mm1.pretrained import load_pretrained

    saved = run_dir / "config.yaml"
    e = load_eval_config(saved, list(overrides))
    world = run_world(run_dir)
    p = load_pretrained(run_dir)
    results = evaluate(
        p.model,
        p.tokenizer,
        p.processor,
        e,
        world=world,
        prompt_format=p.prompt_format,
        progress=False,
        name=run_dir.name,
    )
    write_report(results, run_dir / EVAL_DIR)
    metrics = {}
    for task, entry in results["tasks"].items():
        for k, s in entry["shots"].items():
            metrics[f"{task}/{k}"] = float(s["mean"])
    for k, v in results["average"].items():
        if k != "overall":
            metrics[f"average/{k}"] = float(v)
    return metrics


def sft_suite(run_dir: Path, overrides: Sequence[str]) -> dict[str, float]:
    """`mm1 eval RUN --suite sft` on the run's world (chat models zero-shot, pre-trained ones
    few-shot): every metric of every task (mean over seeds), report in RUN/eval-suite. The
    run's eval section (then `overrides`) gives the seeds, the query cap and the batch size."""
    from mm1.eval.suite import run_suite
    from mm1.pretrained import load_pretrained

    saved = run_dir / "config.yaml"
    e = load_eval_config(saved, list(overrides))
    world = run_world(run_dir)
    results = run_suite(
        load_pretrained(run_dir),
        run_dir,
        "sft",
        world=world,
        seeds=e.seeds,
        max_examples=e.max_examples,
        batch_size=e.batch_size,
        name=run_dir.name,
    )
    return {
        f"sft/{task}/{metric}": float(m["mean"])
        for task, entry in results["tasks"].items()
        for metric, m in entry["metrics"].items()
    }


def generation_suite(run_dir: Path, overrides: Sequence[str]) -> dict[str, float]:
    """`mm1 eval-generation RUN` on the run's world for a model that generates images (emu2,
    chameleon, seed; other families have none to score: no metrics), the first `eval.max_examples`
    held-out images (0: all): text-to-image recall@k with chance, cosines and the family's
    error (l1, or the share of matching codes), under `generation/`; report in RUN/eval."""
    from mm1.eval.image_generation import (
        evaluate_image_generation,
        scored_pairs,
        world_captioned_images,
        write_results,
    )
    from mm1.models.chameleon import Chameleon
    from mm1.models.emu2 import Emu2
    from mm1.pretrained import load_pretrained

    p = load_pretrained(run_dir)
    if not isinstance(p.model, (Emu2, Chameleon)):
        return {}
    e = load_eval_config(run_dir / "config.yaml", list(overrides))
    images = scored_pairs(world_captioned_images(run_world(run_dir)), e.max_examples)
    result = evaluate_image_generation(p, images, e.batch_size)
    write_results(result, run_dir / EVAL_DIR, f"Image generation: {run_dir.name}")
    metrics = {
        f"generation/{k.removeprefix('text_to_image_')}": v
        for k, v in result["text_to_image"].items()
    }
    for k in ("cosine_own", "cosine_others", "l1", "code_match"):
        if k in result:
            metrics[f"generation/{k}"] = result[k]
    return metrics


SUITES: dict[str, Suite] = {
    "fewshot": fewshot_suite,
    "sft": sft_suite,
    "generation": generation_suite,
}


def evaluate_cell(
    run_dir: Path, suites: Sequence[str] | None, overrides: Sequence[str] = ()
) -> dict[str, float]:
    """The cell's metrics from each suite (None: `fewshot`, the run's own eval section), plus
    its last logged training losses, held-out loss and the rows' mean fill."""
    from mm1.train.logging import read_metrics

    metrics: dict[str, float] = {}
    for name in suites or ["fewshot"]:
        metrics.update(SUITES[name](run_dir, overrides))
    logged = read_metrics(run_dir)
    train = [r for r in logged if "loss" in r]
    if train:
        last = train[-1]
        for key in [k for k in last if k == "loss" or k.startswith("loss_")]:
            metrics[f"train/{key}"] = float(last[key])
    fills = [r["fill"] for r in train if "fill" in r]
    if fills:  # the rows' non-padding share over the whole run
        metrics["train/fill"] = sum(fills) / len(fills)
    val = [r["val_loss"] for r in logged if "val_loss" in r]
    if val:
        metrics["val/loss"] = float(val[-1])
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def read_cell(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CELL_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def write_cell(run_dir: Path, record: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CELL_FILE, json.dumps(record, indent=1, sort_keys=True) + "\n")


# what a study directory records of its grid (runner.STUDY_FILE)
GRID_FILE = "grid.json"


def finished_twin(run_dir: Path, config_hash: str, suites: Sequence[str] | None) -> Path | None:
    """A cell another study beside this one (STUDY/../OTHER/CELL) finished with the same config
    and the same evaluation suites: its results are this cell's. Studies share cells (MM1's
    ablations share their baseline): the mixtures' 100/0/0 is text-only's captions cell."""
    study = run_dir.parent
    for path in sorted(study.parent.glob(f"*/*/{CELL_FILE}")):
        twin = path.parent
        if twin.parent == study:
            continue
        rec = read_cell(twin)
        if rec.get("status") != "done" or rec.get("config_hash") != config_hash:
            continue
        if latest_checkpoint(twin) is None:  # its weights were deleted: nothing to copy
            continue
        try:
            grid = json.loads((twin.parent / GRID_FILE).read_text())
        except (OSError, ValueError):
            continue
        if grid.get("suites") == (list(suites) if suites is not None else None):
            return twin
    return None


def reuse_cell(cfg: Config, record: dict[str, Any], twin: Path) -> dict[str, Any]:
    """Copy a finished twin's run (checkpoints, logs, evaluations) into this cell's run dir and
    record its results as this cell's, with `reused_from`. The copy goes to a scratch directory
    first, so a cut-off copy leaves no half checkpoint in the run dir."""
    import shutil

    from mm1.config import to_yaml

    run_dir = Path(cfg.train.run_dir)
    scratch = run_dir.parent / f".reuse-{run_dir.name}"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(twin, scratch, ignore=shutil.ignore_patterns(CELL_FILE, "cell.log"))
    (scratch / "config.yaml").write_text(to_yaml(cfg))  # the same config, this run dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for entry in scratch.iterdir():
        target = run_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        entry.replace(target)
    scratch.rmdir()
    done = read_cell(twin)
    keep = ("metrics", "steps", "train_seconds", "eval_seconds", "trained_steps_this_sitting")
    record = {**record, **{k: done[k] for k in keep if k in done}}
    record.update(status="done", reused_from=str(twin), finished=time.time())
    write_cell(run_dir, record)
    return record


def run_cell(
    cfg: Config,
    record: dict[str, Any],
    suites: Sequence[str] | None,
) -> dict[str, Any]:
    """Train (or resume) the cell's run and evaluate it; the outcome, also in RUN/cell.json:
    `status` done with `metrics`, failed with `error` (recorded, not raised), or interrupted
    (a signal stopped training after saving: the next sitting resumes it). A cell not started
    whose twin another study finished (`finished_twin`) is copied from it, not trained."""
    from mm1.train.trainer import Trainer

    run_dir = Path(cfg.train.run_dir)
    if not run_dir.is_dir() or latest_checkpoint(run_dir) is None:
        twin = finished_twin(run_dir, record.get("config_hash", ""), suites)
        if twin is not None:
            return reuse_cell(cfg, record, twin)
    record = {**record, "status": "running", "pid": os.getpid(), "started": time.time()}
    write_cell(run_dir, record)
    try:
        t0 = time.perf_counter()
        result = Trainer(cfg).fit()
        train_s = time.perf_counter() - t0
        if result["stopped_by"]:
            record.update(status="interrupted", steps=result["step"])
            record.pop("pid", None)
            write_cell(run_dir, record)
            return record
        t1 = time.perf_counter()
        metrics = evaluate_cell(run_dir, suites)
        record.update(
            status="done",
            metrics=metrics,
            steps=result["step"],
            train_seconds=train_s,
            eval_seconds=time.perf_counter() - t1,
            trained_steps_this_sitting=result["steps_run"],
        )
    except Exception as err:  # a failed cell is recorded and the study goes on
        record.update(
            status="failed",
            error=f"{type(err).__name__}: {err}",
            traceback=traceback.format_exc(limit=8),
        )
    record.pop("pid", None)
    record["finished"] = time.time()
    write_cell(run_dir, record)
    return record
