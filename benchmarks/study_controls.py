"""Did a study's cells learn to look? (docs/ablations.md)

`python -m benchmarks.study_controls STUDY_DIR [--max-examples 64] [--json OUT]` evaluates
every finished cell of a study 0-shot with the wrong pictures (`mm1 eval RUN --shots 0
--shuffle-images`, into RUN/eval-shuffled; skipped where it exists) and prints, per
configuration, the cell's own 0-shot scores beside that control as mean ± std over seeds
(a markdown table). A configuration whose scores equal its control answered from the text
alone: its model had not learned to use the image in the steps it trained.

`--world WORLD` adds what the cells' 0-shot captions name of the true picture (the held-out
scenes of WORLD/eval/val): the share of its objects named by colour and shape together (the demo
report's object recall), by colour, and by shape (`benchmarks.caption_quality`), in percent.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.caption_quality import named_share
from mm1 import cli
from mm1.ablate.cell import read_cell
from mm1.demo import object_recall

CONTROL_DIR = "eval-shuffled"


def shuffled_scores(run_dir: Path, max_examples: int) -> dict[str, float]:
    """{task: 0-shot score with shuffled images}, evaluated once per run."""
    out = run_dir / CONTROL_DIR / "results.json"
    if not out.is_file():
        args = ["eval", str(run_dir), "--shots", "0", "--seeds", "1", "--shuffle-images"]
        args += ["--max-examples", str(max_examples), "--out", str(out.parent)]
        if cli.main(args) != 0:
            raise RuntimeError(f"{run_dir}: the shuffled-image evaluation failed")
    tasks = json.loads(out.read_text())["tasks"]
    return {name: float(t["shots"]["0"]["mean"]) for name, t in tasks.items()}


def caption_grounding(run_dir: Path, scenes: dict[str, dict]) -> dict[str, float]:
    """What a run's 0-shot synth_coco captions (first demonstration draw) name of their scenes."""
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    preds = next(iter(results["predictions"]["synth_coco"]["0"].values()))
    pairs = [(p["prediction"], scenes[str(p["id"])]) for p in preds]
    return {
        "objects named": 100 * statistics.fmean(object_recall(c, s) for c, s in pairs),
        "colours named": 100 * statistics.fmean(named_share(c, s, "color") for c, s in pairs),
        "shapes named": 100 * statistics.fmean(named_share(c, s, "shape") for c, s in pairs),
    }


def val_scenes(world: Path) -> dict[str, dict]:
    coco = json.loads((world / "eval" / "val" / "captions.json").read_text())
    return {str(im["id"]): im.get("scene", {}) for im in coco["images"]}


def collect(
    study_dir: Path, max_examples: int, world: Path | None = None
) -> dict[str, dict[str, list[float]]]:
    """{configuration label: {"<task>" / "<task> shuffled" (/ grounding measure): per-seed
    scores}}."""
    scenes = val_scenes(world) if world else None
    grid = json.loads((study_dir / "grid.json").read_text())
    rows: dict[str, dict[str, list[float]]] = {}
    for cell in grid["cells"]:
        run_dir = study_dir / cell["id"]
        rec = read_cell(run_dir)
        if rec.get("status") != "done":
            continue
        row = rows.setdefault(cell["label"], {})
        for task, score in shuffled_scores(run_dir, max_examples).items():
            row.setdefault(task, []).append(rec["metrics"][f"{task}/0"])
            row.setdefault(f"{task} shuffled", []).append(score)
        if scenes is not None:
            for name, value in caption_grounding(run_dir, scenes).items():
                row.setdefault(name, []).append(value)
    return rows


def _pm(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f}"


def table(rows: dict[str, dict[str, list[float]]]) -> str:
    columns = sorted({k for r in rows.values() for k in r})
    lines = ["| configuration | seeds | " + " | ".join(f"{c} (0-shot)" for c in columns) + " |"]
    lines.append("|---|---:|" + "---|" * len(columns))
    for label, r in rows.items():
        seeds = max(len(v) for v in r.values())
        cells = [_pm(r[c]) if c in r else "-" for c in columns]
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--max-examples", type=int, default=64, help="queries per task")
    ap.add_argument("--json", type=Path, help="also write the per-seed scores here")
    ap.add_argument("--world", type=Path, help="also score the 0-shot captions against its scenes")
    args = ap.parse_args()
    rows = collect(args.study, args.max_examples, args.world)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
