"""`mm1 ablate GRID.yaml`: check the grid, then list the cells and their cost (`--dry-run`) or
run them and write the study's results."""

from __future__ import annotations

from pathlib import Path

from mm1.ablate.grid import load_grid
from mm1.ablate.results import write_report
from mm1.ablate.runner import Log, check_jobs, check_study_dir, estimate, plan_study, run_study

DEFAULT_ROOT = Path("runs/ablations")


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def dry_run(
    grid_path: str | Path, out: str | Path | None = None, log: Log = print, jobs: int = 1
) -> list[str]:
    """The cells (id, settings, status, steps, tokens) and the estimated time of the rest, as
    `jobs` cells at a time would take it; nothing is trained or written."""
    check_jobs(jobs)
    grid = load_grid(grid_path)
    study_dir = Path(out) if out else DEFAULT_ROOT / grid.study
    if study_dir.exists():
        check_study_dir(grid, study_dir, force=False, log=log)
    plans = plan_study(grid, study_dir)
    seconds, how = estimate(plans)
    from mm1.ablate.prompt_check import context_warnings

    lines = [f"study {grid.study} -> {study_dir}: {len(plans)} cells ({len(grid.seeds)} seeds)"]
    for i, step in enumerate(grid.prepare, 1):
        status = "done" if step.done() else "pending"
        lines.append(f"  prepare {i}: {step.describe()} [{status}]")
    for p in plans:
        t = p.cfg.train
        left = f"{t.steps - p.step}/{t.steps} steps" if p.status not in ("done", "copy") else "-"
        cost = f", ~{_duration(seconds[p.cell.id])}" if p.cell.id in seconds else ""
        tokens = p.tokens if p.status != "copy" else 0  # a finished twin is copied
        lines.append(
            f"  {p.cell.id:<40} {p.status:<11} {left:>14}, {tokens / 1e6:.1f}M tokens{cost}"
            f"  [{p.cell.label}, seed {p.cell.seed}]"
        )
    lines += [f"  warning: {w}" for w in context_warnings([(p.cell.id, p.cfg) for p in plans])]
    total = sum(seconds.values())
    if jobs > 1:  # cells in turn over `jobs` processes; each cell's own time as measured
        total /= min(jobs, max(1, len(seconds)))
        how += f"; {jobs} cells at a time"
    lines.append(f"estimated time left: {_duration(total)} ({how})")
    for line in lines:
        log(line)
    return lines


def ablate(
    grid_path: str | Path,
    out: str | Path | None = None,
    *,
    jobs: int = 1,
    force: bool = False,
    log: Log = print,
) -> int:
    """Run the study's unfinished cells, then write ablation.json and report.md (also when
    stopped by Ctrl-C). Returns an exit status: 0 when every cell is done, 1 when a cell
    failed, 130 when the study was stopped (run it again to resume)."""
    grid = load_grid(grid_path)
    study_dir = Path(out) if out else DEFAULT_ROOT / grid.study
    try:
        records = run_study(grid, study_dir, jobs=jobs, force=force, log=log)
    except KeyboardInterrupt:
        if (study_dir / "grid.json").is_file():
            write_report(study_dir)
        log(f"stopped; run the same command again to resume ({study_dir})")
        return 130
    report = write_report(study_dir)
    statuses = [r.get("status", "pending") for r in records]
    failed = [r["id"] for r in records if r.get("status") == "failed"]
    log(f"{statuses.count('done')}/{len(records)} cells done; report: {report}")
    if failed:
        log(f"failed cells (their errors are in cell.json and the report): {', '.join(failed)}")
    if any(s in ("interrupted", "pending", "resume", "running") for s in statuses):
        return 130
    return 1 if failed else 0
