"""The SFT suite's results as the paper lays out its SFT table (one row per model, one column per
benchmark), a table of every metric per model, and a bar chart (`suite.png`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Column titles after the benchmarks each task mirrors; other task names are shown as they are.
TITLES = {
    "sft_vqav2": "VQAv2",
    "sft_textvqa": "TextVQA",
    "sft_pope": "POPE",
    "sft_multi": "Multi-image",
    "sft_bench": "LLaVA-Bench",
}


def _tasks(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in runs:
        names += [t for t in r["tasks"] if t not in names]
    return names


def _cell(entry: Mapping[str, Any] | None, metric: str | None = None) -> str:
    if entry is None:
        return "–"
    m = entry["metrics"][metric] if metric else entry
    seeds = len(m.get("scores", []))
    return f"{m['mean']:.1f}" + (f" ± {m['std']:.1f}" if seeds > 1 else "")


def suite_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: a row per model (its prompting in brackets), a column per task with its
    headline metric's mean ± standard deviation over seeds."""
    tasks = _tasks(runs)
    metric = {t: next(r["tasks"][t]["metric"] for r in runs if t in r["tasks"]) for t in tasks}
    head = [f"{TITLES.get(t, t)} ({metric[t]})" for t in tasks]
    lines = [
        "| Model | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    for r in runs:
        label = r["name"] + (f" ({r['mode']})" if r.get("mode") else "")
        lines.append(f"| {label} | " + " | ".join(_cell(r["tasks"].get(t)) for t in tasks) + " |")
    return "\n".join(lines)


def detail_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: every metric of every task (POPE's accuracy, precision, recall, F1 and
    yes-ratio; LLaVA-Bench's CIDEr and ROUGE-L), a row per model."""
    cols = []
    for t in _tasks(runs):
        metrics: list[str] = []
        for r in runs:
            for m in r["tasks"].get(t, {}).get("metrics", {}):
                if m not in metrics:
                    metrics.append(m)
        cols += [(t, m) for m in metrics]
    lines = [
        "| Model | " + " | ".join(f"{TITLES.get(t, t)} {m}" for t, m in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for r in runs:
        cells = [
            _cell(r["tasks"][t], m) if m in r["tasks"].get(t, {}).get("metrics", {}) else "–"
            for t, m in cols
        ]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def examples_table(run: Mapping[str, Any], per_task: int = 3) -> str:
    lines = ["| task | question | prediction | reference | score |", "|---|---|---|---|---:|"]
    for task, by_seed in run.get("predictions", {}).items():
        for rec in next(iter(by_seed.values()), [])[:per_task]:
            cells = [
                TITLES.get(task, task),
                rec["question"],
                rec["prediction"] or "(empty)",
                (rec["references"] or [""])[0],
                f"{rec['score']:.0f}",
            ]
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def plot_suite(runs: Sequence[Mapping[str, Any]], out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _tasks(runs)
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(1.8 * len(tasks) + 2, 4))
    for i, r in enumerate(runs):
        xs = [k + (i - (len(runs) - 1) / 2) * width for k in range(len(tasks))]
        means = [r["tasks"][t]["mean"] if t in r["tasks"] else 0.0 for t in tasks]
        stds = [r["tasks"][t]["std"] if t in r["tasks"] else 0.0 for t in tasks]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=r["name"])
    metric = {t: next(r["tasks"][t]["metric"] for r in runs if t in r["tasks"]) for t in tasks}
    ax.set_xticks(range(len(tasks)), [f"{TITLES.get(t, t)}\n({metric[t]})" for t in tasks])
    ax.set_ylabel("score (mean ± std over seeds)")
    ax.set_title("SFT evaluation suite")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def write_suite_report(
    runs: Sequence[Mapping[str, Any]], out_dir: str | Path, title: str = "SFT evaluation suite"
) -> dict[str, str]:
    """`suite.md` (the tables and a few predictions per model), `suite.json` (every run's
    results) and `suite.png` under `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_suite(runs, out / "suite.png")
    parts = [
        f"# {title}",
        "",
        suite_table(runs),
        "",
        "Headline metric per task, mean ± population standard deviation over evaluation seeds.",
        "",
        "## Every metric",
        "",
        detail_table(runs),
        "",
        f"![suite]({png.name})",
    ]
    for r in runs:
        if r.get("predictions"):
            parts += ["", f"## Predictions: {r['name']} (seed 0)", "", examples_table(r)]
    md = out / "suite.md"
    md.write_text("\n".join(parts) + "\n")
    js = out / "suite.json"
    js.write_text(json.dumps(list(runs), indent=1) + "\n")
    return {"markdown": str(md), "json": str(js), "plot": str(png)}
