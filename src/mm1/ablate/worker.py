"""`python -m mm1.ablate.worker GRID STUDY CELL_ID`: one cell of a study in its own process
(`mm1 ablate --jobs N`), pinned to the CPUs in MM1_CELL_CPUS with one torch thread each."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    grid_path, study_dir, cell_id = argv
    cpus = [int(c) for c in os.environ.get("MM1_CELL_CPUS", "").split(",") if c]
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    import torch

    from mm1.ablate.cell import run_cell
    from mm1.ablate.grid import load_grid
    from mm1.ablate.runner import cell_record, plan_study

    if cpus:
        torch.set_num_threads(len(cpus))
    grid = load_grid(grid_path)
    plan = next(p for p in plan_study(grid, Path(study_dir)) if p.cell.id == cell_id)
    record = run_cell(plan.cfg, cell_record(grid, plan), grid.suites)
    return 0 if record["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
