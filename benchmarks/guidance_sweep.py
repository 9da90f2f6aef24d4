"""Does classifier-free guidance make a study's generated images follow their captions?
(docs/ablations.md)

`python -m benchmarks.guidance_sweep STUDY_DIR [--scales 1 2 3 5] [--max-images 128]
[--json OUT]` runs `mm1 eval-generation RUN --guidance-scale G` for every finished cell of a
study that generates image codes (`model.family` chameleon or seed), greedy and sampled
(temperature 1, seed 0), into RUN/eval-guidance/<decoding>-g<G>-n<max images> (skipped where it
exists), and
prints per configuration, decoding and scale the text-to-image recall against chance, the cosine
of each generated image to its own image against the others, and the distinct images, as
mean ± std over seeds (a markdown table).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mm1 import cli
from mm1.ablate.cell import read_cell
from mm1.pretrained import load_model_config

OUT_DIR = "eval-guidance"
DECODINGS = {"greedy": [], "sampled": ["--temperature", "1", "--seed", "0"]}
MEASURES = ("r1", "r5", "r10", "cosine_own", "cosine_others", "distinct")


def guided_scores(run_dir: Path, scale: float, decoding: str, max_images: int) -> dict[str, float]:
    """One `mm1 eval-generation` of `run_dir` at `scale`, evaluated once."""
    name = f"{decoding}-g{scale:g}-n{max_images}"  # a rerun with other images: other results
    out = run_dir / OUT_DIR / name / "image_generation.json"
    if not out.is_file():
        args = ["eval-generation", str(run_dir), "--max-images", str(max_images)]
        args += ["--guidance-scale", str(scale), *DECODINGS[decoding], "--out", str(out.parent)]
        if cli.main(args) != 0:
            raise RuntimeError(f"{run_dir}: eval-generation at guidance {scale:g} failed")
    result = json.loads(out.read_text())
    recall = result["text_to_image"]
    return {
        **{k: recall[f"text_to_image_{k}"] for k in ("r1", "r5", "r10")},
        **{f"{k}_chance": recall[f"text_to_image_{k}_chance"] for k in ("r1", "r5", "r10")},
        "cosine_own": result["cosine_own"],
        "cosine_others": result["cosine_others"],
        "distinct": result["distinct_generations"],
        "captions": result["captions"],
    }


def collect(
    study_dir: Path, scales: list[float], max_images: int
) -> dict[str, dict[str, list[dict[str, float]]]]:
    """{configuration label: {"<decoding> g<scale>": per-seed scores}}."""
    grid = json.loads((study_dir / "grid.json").read_text())
    rows: dict[str, dict[str, list[dict[str, float]]]] = {}
    for cell in grid["cells"]:
        run_dir = study_dir / cell["id"]
        if read_cell(run_dir).get("status") != "done":
            continue
        if load_model_config(run_dir).family not in ("chameleon", "seed"):
            continue
        row = rows.setdefault(cell["label"], {})
        for decoding in DECODINGS:
            for scale in scales:
                key = f"{decoding} g{scale:g}"
                row.setdefault(key, []).append(guided_scores(run_dir, scale, decoding, max_images))
    return rows


def _pm(values: list[float], digits: int) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def table(rows: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    lines = [
        "| configuration | decoding | guidance | seeds | R@1 | R@5 | R@10 | cosine own / others "
        "| distinct images |",
        "|---|---|---:|---:|---|---|---|---|---|",
    ]
    for label, runs in rows.items():
        for key, seeds in runs.items():
            decoding, scale = key.split(" g")

            def col(name: str, digits: int = 3, seeds=seeds) -> str:
                return _pm([s[name] for s in seeds], digits)

            recall = [f"{col(k)} ({seeds[0][f'{k}_chance']:.3f})" for k in ("r1", "r5", "r10")]
            lines.append(
                f"| {label} | {decoding} | {scale} | {len(seeds)} | "
                + " | ".join(recall)
                + f" | {col('cosine_own')} / {col('cosine_others')} "
                f"| {col('distinct', 0)} of {int(seeds[0]['captions'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    ap.add_argument("--max-images", type=int, default=128, help="held-out images (the study's)")
    ap.add_argument("--json", type=Path, help="also write the per-seed scores here")
    args = ap.parse_args()
    rows = collect(args.study, args.scales, args.max_images)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
