"""Running a study: its directory, which cells are finished, what the rest will cost, and the
cells themselves, one after another in this process or as `--jobs N` worker processes each
pinned to its share of the CPUs.

    STUDY/grid.json        the grid that wrote the study (its fingerprint); another is refused
    STUDY/<cell id>/       the cell's run directory (checkpoints, metrics.jsonl, config.yaml),
                           cell.json (status, metrics, timings or the error), eval/, cell.log
    STUDY/ablation.json, report.md, *.png   the results (`mm1.ablate.results`)
    STUDY/.ablate.lock     held by the `mm1 ablate` running the study: a second one is refused
    STUDY/.cells/          each `--jobs N` worker's cell as the run started (config, record)

A cell whose cell.json says done is never re-run; any other resumes from its newest checkpoint
(the trainer's exact resume), so a study can be stopped and continued in several sittings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm1.ablate.cell import GRID_FILE, finished_twin, read_cell, run_cell
from mm1.ablate.grid import Cell, Grid
from mm1.ablate.worker import PARENT_ENV
from mm1.checkpoint import latest_checkpoint, step_of
from mm1.config import (
    INIT_PARTS,
    Config,
    ConfigError,
    config_identity,
    load_config,
    to_yaml,
)

STUDY_FILE = GRID_FILE
CELL_LOG = "cell.log"
# not `.lock`: that is each cell's run-dir lock, held by its (worker) trainer
STUDY_LOCK = ".ablate.lock"
SPEC_DIR = ".cells"
# a worker's exit codes that mean a signal stopped it (128 + SIGINT / SIGTERM, or killed by one)
STOPPED_CODES = (130, 143, -signal.SIGINT, -signal.SIGTERM)

Log = Callable[[str], None]


@dataclass
class CellPlan:
    cell: Cell
    cfg: Config
    status: str  # done | pending | resume | failed | interrupted | copy
    step: int  # newest checkpoint's step (0: none)
    config_hash: str

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)

    @property
    def tokens(self) -> int:
        """Sequence tokens the rest of its training reads."""
        t = self.cfg.train
        return max(0, t.steps - self.step) * t.batch_size * self.cfg.data.seq_len


def config_hash(cfg: Config) -> str:
    d = config_identity(cfg)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_study(grid: Grid, study_dir: Path) -> list[CellPlan]:
    plans = []
    for cell in grid.cells:
        cfg = grid.cell_config(cell, study_dir)
        run_dir = Path(cfg.train.run_dir)
        record = read_cell(run_dir)
        ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
        step = (step_of(ckpt) or 0) if ckpt is not None else 0
        status = record.get("status", "pending")
        if status == "running" or (status == "pending" and step):
            status = "resume"  # a sitting that ended without recording (killed)
        digest = config_hash(cfg)
        if status == "pending" and finished_twin(run_dir, digest, grid.suites) is not None:
            status = "copy"  # another study finished the same cell: `run_cell` copies it
        plans.append(CellPlan(cell, cfg, status, step, digest))
    return plans


def check_study_dir(grid: Grid, study_dir: Path, force: bool, log: Log) -> None:
    """Refuse a study directory another grid wrote, unless `force`; with `force`, a cell whose
    config changed under the same id is moved aside (STUDY/.replaced/) and trained anew."""
    path = study_dir / STUDY_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError as err:  # cut short (a full disk, a kill while written), edited
            if not force:
                raise ConfigError(
                    f"{path}: not valid JSON ({err}); use --force to run this grid there, or "
                    "another study directory"
                ) from None
            old = {}
        if not isinstance(old, dict):
            old = {}
        if old.get("fingerprint") != grid.fingerprint():
            if not force:
                raise ConfigError(
                    f"{study_dir} was written by another grid ({old.get('grid')}, fingerprint "
                    f"{old.get('fingerprint')}; this one is {grid.fingerprint()}): use another "
                    "study directory, or --force to run this grid there"
                )
            log(f"--force: {study_dir} was written by another grid; reusing unchanged cells")
            for plan in plan_study(grid, study_dir):
                rec = read_cell(plan.run_dir)
                if plan.run_dir.exists() and rec.get("config_hash") != plan.config_hash:
                    aside = study_dir / ".replaced" / f"{plan.cell.id}.{int(time.time())}"
                    aside.parent.mkdir(exist_ok=True)
                    shutil.move(str(plan.run_dir), aside)
                    log(f"  {plan.cell.id}: its config changed; old run moved to {aside}")


def write_study_file(grid: Grid, study_dir: Path) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "study": grid.study,
        "grid": str(grid.path),
        "fingerprint": grid.fingerprint(),
        "base_config": str(grid.base_config),
        "base_overrides": grid.base_overrides,
        "seeds": grid.seeds,
        "axes": grid.axes,
        "suites": grid.suites,
        "table": grid.table,
        "cells": [
            {"id": c.id, "label": c.label, "settings": c.settings, "seed": c.seed, "delta": c.delta}
            for c in grid.cells
        ],
    }
    (study_dir / STUDY_FILE).write_text(json.dumps(record, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------------------------


def _flops_per_step(cfg: Config) -> float:
    """Training FLOPs of one step with every sequence at the image cap (an upper bound)."""
    from mm1.models.build import resolve_config
    from mm1.models.summary import summarize

    # A starting point a `prepare` step has yet to write: the config's architecture.
    init = dataclasses.replace(
        cfg.train.init,
        **{k: None for k in ("weights", *INIT_PARTS) if not _exists(getattr(cfg.train.init, k))},
    )
    s = summarize(resolve_config(cfg.model, init=init), cfg.data.seq_len)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    # Every part counted as training (6 N), frozen or not: a study's budget stays one measure.
    return s.flops_per_token(cfg.data.max_images_per_seq) * tokens


def _exists(path: str | None) -> bool:
    return path is not None and Path(path).exists()


def _matmul_rate() -> float:
    """FLOP/s of a float32 matmul on this machine's threads now (a ceiling for training)."""
    import torch

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        a @ b
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - t0)


def _measured(run_dir: Path, cfg: Config | None = None) -> tuple[float, float] | None:
    """A finished cell's measured seconds (training and evaluation) per training FLOP (of its
    last sitting), and its training FLOPs (all its steps: what says how large a cell it is),
    from its cell.json and its config (`cfg`, else its saved config.yaml); None if it has none."""
    rec = read_cell(run_dir)
    # the last sitting's seconds are for the steps it trained: a sitting that only evaluated
    # (resumed after its training ended) measured no training; older records lack the count
    steps = rec.get("trained_steps_this_sitting", rec.get("steps"))
    if rec.get("status") != "done" or not rec.get("train_seconds") or not steps:
        return None
    if cfg is None:
        try:
            cfg = load_config(run_dir / "config.yaml")
        except (OSError, ValueError, ConfigError):
            return None
    train_steps = max(1, rec.get("steps") or steps)
    # evaluation once per cell, shared out over the steps trained in this sitting
    seconds = rec["train_seconds"] + rec.get("eval_seconds", 0.0) * steps / train_steps
    per_step = _flops_per_step(cfg)
    return seconds / (per_step * steps), per_step * train_steps  # the cell's whole training


# A cell of another study times this one only if it trained at least this share of the FLOPs
# of this study's smallest cell: a few-step test cell's seconds are mostly start-up and
# evaluation, which per training FLOP would inflate the estimate many times over.
SIMILAR_SCALE = 0.1


def estimate(plans: list[CellPlan]) -> tuple[dict[str, float], str]:
    """Seconds each unfinished cell should take, and how that was estimated: from this study's
    finished cells' measured seconds per FLOP (training and evaluation), else from the finished
    cells of the other studies beside it (same parent directory), else from the FLOPs at this
    machine's matmul rate (a rough guess: a tiny model runs far below the rate, the FLOPs are
    counted at the image cap, and other jobs lower the rate measured)."""
    measured = [m[0] for p in plans if (m := _measured(p.run_dir, p.cfg)) is not None]
    how = f"measured on {len(measured)} finished cell(s), training + evaluation"
    note = ""
    if not measured and plans:
        study_dir = plans[0].run_dir.parent
        others = sorted(
            d.parent for d in study_dir.parent.glob("*/*/cell.json") if d.parent.parent != study_dir
        )
        found = [m for d in others if (m := _measured(d)) is not None]
        smallest = min(_flops_per_step(p.cfg) * p.cfg.train.steps for p in plans)
        measured = [per_flop for per_flop, flops in found if flops >= SIMILAR_SCALE * smallest]
        ignored = len(found) - len(measured)
        note = f" ({ignored} much smaller cell(s) left out)" if ignored else ""
        how = (
            f"measured on {len(measured)} finished cell(s) of other studies in "
            f"{study_dir.parent}{note}, training + evaluation; refined once a cell of this one "
            "finishes"
        )
    if measured:
        per_flop = sum(measured) / len(measured)
    else:
        rate = _matmul_rate()
        per_flop = 1 / rate
        how = (
            f"training FLOPs at this machine's matmul rate now ({rate / 1e9:.0f} GFLOP/s): a "
            f"rough guess, evaluation not included; refined once a cell has finished{note}"
        )
    out = {}
    for p in plans:
        if p.status not in ("done", "copy"):
            steps = max(0, p.cfg.train.steps - p.step)
            out[p.cell.id] = _flops_per_step(p.cfg) * steps * per_flop
    return out, how


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def prepare_worlds(plans: list[CellPlan]) -> None:
    """Write each synthetic world the cells read, once, before any cell starts (parallel
    cells would otherwise race to write it). `ensure_world` prints its own progress."""
    from mm1.data.world import ensure_world

    seen = set()
    for p in plans:
        d, init = p.cfg.data, p.cfg.train.init
        # as `prepare_data` decides: the world's sources, or its tokenizer
        needs_world = not d.sources or not (d.tokenizer or init.decoder or init.weights)
        if p.status != "done" and needs_world and d.world not in seen:
            seen.add(d.world)
            ensure_world(d)


def _thread_shares(jobs: int) -> list[list[int]]:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cpus = cpus or list(range(os.cpu_count() or 1))
    per = max(1, len(cpus) // jobs)  # more jobs than CPUs: they share
    return [[cpus[(i * per + j) % len(cpus)] for j in range(per)] for i in range(jobs)]


def cell_record(grid: Grid, plan: CellPlan) -> dict[str, Any]:
    """What cell.json says of a cell before it runs: who it is, in which study, which config."""
    c = plan.cell
    return {
        "id": c.id,
        "label": c.label,
        "settings": c.settings,
        "seed": c.seed,
        "delta": c.delta,
        "config_hash": plan.config_hash,
        "study": grid.study,
    }


def run_study(
    grid: Grid,
    study_dir: str | Path,
    *,
    jobs: int = 1,
    force: bool = False,
    log: Log = print,
) -> list[dict[str, Any]]:
    """Train and evaluate every unfinished cell; returns every cell's record (cell.json)."""
    study_dir = Path(study_dir)
    check_jobs(jobs)
    lock = lock_study(study_dir)
    try:
        return _run_study(grid, study_dir, jobs, force, log)
    finally:
        os.close(lock)  # closing drops the lock


def check_jobs(jobs: int) -> None:
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give 1 or more")


def lock_study(study_dir: Path) -> int:
    """Lock the study for this process (the kernel drops it however the process ends); the
    lock file's descriptor. A second `mm1 ablate` on the same study is refused: each would
    meet the other's cells' run-dir locks and record those cells as failed."""
    from mm1.train.run_lock import claim

    return claim(
        study_dir,
        name=f"--out {study_dir}",
        lock_file=STUDY_LOCK,
        busy="another mm1 ablate{holder} is running this study; wait for it to finish or stop "
        "it, or choose another --out",
    )


def _run_study(
    grid: Grid, study_dir: Path, jobs: int, force: bool, log: Log
) -> list[dict[str, Any]]:
    check_study_dir(grid, study_dir, force, log)
    write_study_file(grid, study_dir)
    plans = plan_study(grid, study_dir)
    todo = [p for p in plans if p.status != "done"]
    log(f"{grid.study}: {len(plans)} cells, {len(plans) - len(todo)} done, {len(todo)} to run")
    prepare_worlds(todo)
    if todo:
        from mm1.ablate.prepare import run_prepare

        run_prepare(grid.prepare, log)
    from mm1.ablate.prompt_check import context_warnings

    for warning in context_warnings([(p.cell.id, p.cfg) for p in plans]):
        log(f"warning: {warning}")
    if jobs == 1:
        for i, p in enumerate(todo, 1):
            what = f"resuming from step {p.step}" if p.step else "training"
            what = "copying a finished twin" if p.status == "copy" else what
            log(f"[{i}/{len(todo)}] {p.cell.id}: {what} ({p.cell.label}, seed {p.cell.seed})")
            rec = run_cell(p.cfg, cell_record(grid, p), grid.suites)
            _report(rec, log)
            if rec["status"] == "interrupted":
                log("stopped: run the same command again to resume")
                break
    else:
        _run_parallel(grid, study_dir, todo, jobs, log)
    return [read_cell(p.run_dir) for p in plans]


# below this mean fill a cell's rows were mostly cut short: its steps saw less data than planned
LOW_FILL = 0.75


def _report(rec: dict[str, Any], log: Log) -> None:
    if rec.get("reused_from"):
        log(f"  done: the same config and suites finished in {rec['reused_from']}, copied")
    elif rec["status"] == "done":
        log(f"  done in {rec['train_seconds'] + rec['eval_seconds']:.0f}s")
        fill = rec.get("metrics", {}).get("train/fill")
        if fill is not None and fill < LOW_FILL:
            log(
                f"  warning: {rec['id']}: its rows were {1 - fill:.0%} padding (train/fill "
                f"{fill:.2f}), so each step read less data than data.seq_len x "
                "train.batch_size: its rows end early (e.g. at data.max_images_per_seq images)"
            )
    elif rec["status"] == "failed":
        log(f"  FAILED: {rec['error']}")


# a cell's process: `python -m mm1.ablate.worker SPEC STUDY CELL_ID` (SPEC: `write_spec`)
WORKER = [sys.executable, "-m", "mm1.ablate.worker"]


def write_spec(grid: Grid, study_dir: Path, plan: CellPlan) -> Path:
    """The cell as this run planned it (STUDY/.cells/ID.json: its config, written beside as
    ID.yaml, its record and the suites), for its worker: the worker never re-reads the grid
    file, which may have been edited, renamed or deleted since the run started."""
    spec_dir = study_dir / SPEC_DIR
    spec_dir.mkdir(parents=True, exist_ok=True)
    config = spec_dir / f"{plan.cell.id}.yaml"
    config.write_text(to_yaml(plan.cfg))
    spec = {"config": str(config), "record": cell_record(grid, plan), "suites": grid.suites}
    path = spec_dir / f"{plan.cell.id}.json"
    path.write_text(json.dumps(spec, indent=1) + "\n")
    return path


def _run_parallel(grid: Grid, study_dir: Path, todo: list[CellPlan], jobs: int, log: Log) -> None:
    """Each cell in its own process (`python -m mm1.ablate.worker`), at most `jobs` at a time,
    each pinned to its share of the CPUs with as many torch threads.

    A cell that reports itself interrupted stops the study: no further cell starts. Ctrl-C or
    SIGTERM here is passed on to the running cells as SIGINT, so each saves its checkpoint, and
    raised as KeyboardInterrupt once they have exited."""
    shares = _thread_shares(jobs)
    free = list(range(jobs))
    running: dict[int, tuple[subprocess.Popen, CellPlan, Any]] = {}
    queue = list(todo)
    # every cell's spec now, from the grid as loaded when the run started
    specs = {p.cell.id: write_spec(grid, study_dir, p) for p in todo}
    # SIGTERM handlers can only be set from the main thread; elsewhere SIGTERM keeps its action
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.getsignal(signal.SIGTERM)
    if main_thread:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while queue or running:
            while queue and free:
                slot, plan = free.pop(0), queue.pop(0)
                spec = specs[plan.cell.id]
                running[slot] = _start_worker(spec, study_dir, plan, shares[slot], log)
            time.sleep(0.5)
            for slot, (proc, plan, out) in list(running.items()):
                if proc.poll() is not None:
                    del running[slot]
                    free.append(slot)
                    rec = _finish_worker(grid, proc, plan, out, log)
                    if rec["status"] == "interrupted" and queue:
                        log("a cell was interrupted: no further cell starts")
                        queue.clear()
    except KeyboardInterrupt:
        for proc, plan, _ in running.values():
            if proc.poll() is None:
                log(f"{plan.cell.id}: stopping (it saves its checkpoint)")
                proc.send_signal(signal.SIGINT)
        for proc, plan, out in running.values():
            proc.wait()
            _finish_worker(grid, proc, plan, out, log)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _start_worker(
    spec: Path, study_dir: Path, plan: CellPlan, cpus: list[int], log: Log
) -> tuple[subprocess.Popen, CellPlan, Any]:
    env = {**os.environ, "MM1_CELL_CPUS": ",".join(map(str, cpus)), PARENT_ENV: str(os.getpid())}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(len(cpus))
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    out = open(plan.run_dir / CELL_LOG, "a")  # noqa: SIM115 - closed when it ends
    proc = subprocess.Popen(
        [*WORKER, str(spec), str(study_dir), plan.cell.id],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        # the worker's own SIGINT handling, even where this process was started ignoring it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    log(f"{plan.cell.id}: started on CPUs {cpus} (log: {plan.run_dir / CELL_LOG})")
    return proc, plan, out


def _finish_worker(
    grid: Grid, proc: subprocess.Popen, plan: CellPlan, out: Any, log: Log
) -> dict[str, Any]:
    """The ended worker's record; one that ended without writing its outcome is failed, unless
    a signal stopped it (Ctrl-C, SIGTERM, e.g. during evaluation): that cell is left as it is
    (running) and resumes next time, as with --jobs 1, and is reported interrupted."""
    out.close()
    rec = read_cell(plan.run_dir)
    unrecorded = rec.get("status") not in ("done", "failed", "interrupted")
    if unrecorded and proc.returncode in STOPPED_CODES:
        # cell.json keeps `running`: the next sitting plans it as `resume`
        rec = {**cell_record(grid, plan), **rec, "status": "interrupted"}
    elif unrecorded:
        from mm1.ablate.cell import write_cell

        tail = (plan.run_dir / CELL_LOG).read_text()[-2000:]
        rec = {
            **cell_record(grid, plan),
            "status": "failed",
            "error": f"worker exited with code {proc.returncode}",
            "traceback": tail,
        }
        write_cell(plan.run_dir, rec)
    log(f"{plan.cell.id}: {rec['status']}")
    _report(rec, log)
    return rec
