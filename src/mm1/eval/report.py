"""Reports of few-shot results (`mm1.eval.fewshot.evaluate`): JSON, a markdown table laid out like
the MM1 paper's (rows = runs, columns = task x shots, then the 0/4/8-shot average), and plots.

`write_report(results, out_dir, title)` takes one results dict, or several as {run name: results}
(e.g. a model and its shuffled-image control), and writes `results.json`, `results.md` and
`scores_vs_shots.png` (one panel per task, mean over seeds with the standard deviation as error
bars, plus the average). `compare_runs([results, ...], names, out_png)` plots several runs side by
side on the same panels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Results = Mapping[str, Any]


def _runs(results: Results | Mapping[str, Results] | Sequence[Results]) -> dict[str, Results]:
    """{run name: results} from one results dict, a mapping of them, or a list (named by their
    `name`, made unique)."""
    if isinstance(results, Mapping) and "tasks" in results:
        return {_run_name(results): results}
    if isinstance(results, Mapping):
        return dict(results)
    out: dict[str, Results] = {}
    for r in results:
        name = _run_name(r)
        unique, i = name, 2
        while unique in out:
            unique, i = f"{name} ({i})", i + 1
        out[unique] = r
    return out


def _run_name(r: Results) -> str:
    name = str(r.get("name") or "mm1")
    if r.get("config", {}).get("shuffle_images") and "shuffle" not in name:
        name += " (shuffled images)"
    return name


def _task_names(runs: Mapping[str, Results]) -> list[str]:
    names: list[str] = []
    for r in runs.values():
        names += [t for t in r["tasks"] if t not in names]
    return names


def _shots(runs: Mapping[str, Results]) -> list[int]:
    return sorted({int(k) for r in runs.values() for t in r["tasks"].values() for k in t["shots"]})


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _cell(r: Results, task: str, shot: int) -> Mapping[str, Any] | None:
    return r["tasks"].get(task, {}).get("shots", {}).get(str(shot))


def markdown_table(runs: Results | Mapping[str, Results] | Sequence[Results]) -> str:
    """The paper-style table: one row per run, `mean` per task and shot count, then the average
    over tasks per shot count and over everything."""
    runs = _runs(runs)
    tasks, shots = _task_names(runs), _shots(runs)
    header = ["Run"]
    for t in tasks:
        header += [f"{t} {k}-shot" for k in shots]
    header += [f"Avg {k}-shot" for k in shots] + ["Avg all"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for name, r in runs.items():
        row = [name]
        for t in tasks:
            for k in shots:
                c = _cell(r, t, k)
                row.append(_fmt(c["mean"] if c else None))
        avg = r.get("average", {})
        row += [_fmt(avg.get(str(k))) for k in shots] + [_fmt(avg.get("overall"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _detail_table(name: str, r: Results) -> str:
    shots = sorted(int(k) for t in r["tasks"].values() for k in t["shots"])
    shots = sorted(set(shots))
    header = ["Task", "Metric", "Queries"] + [f"{k}-shot" for k in shots] + ["0-shot (plain)"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|" + "---:|" * (len(shots) + 1)]
    for t, entry in r["tasks"].items():
        queries = str(entry["num_queries"])
        if entry.get("subset"):
            queries += f" of {entry['total_queries']}"
        row = [t, entry["metric"], queries]
        for k in shots:
            c = entry["shots"].get(str(k))
            if c is None:
                row.append("–")
            else:
                n = len(c["scores"])
                row.append(f"{_fmt(c['mean'], 2)} ± {_fmt(c['std'], 2)} (n={n})")
        plain = entry.get("zero_shot_plain")
        row.append(_fmt(plain["mean"], 2) if plain else "–")
        lines.append("| " + " | ".join(row) + " |")
    return f"### {name}\n\n" + "\n".join(lines)


def _examples(r: Results, per_task: int = 5) -> str:
    out = []
    preds = r.get("predictions", {})
    for t, by_shot in preds.items():
        numeric = [k for k in by_shot if k.isdigit()]
        if not numeric:
            continue
        k = max(numeric, key=int)
        seed = next(iter(by_shot[k]))
        records = by_shot[k][seed][:per_task]
        vqa = r["tasks"].get(t, {}).get("kind") == "vqa"
        out.append(f"**{t}**, {k}-shot, seed {seed}:\n")
        out.append(
            "| id |" + (" question |" if vqa else "") + " prediction | first reference | score |"
        )
        out.append("|---|" + ("---|" if vqa else "") + "---|---|---:|")
        for rec in records:
            q = f" {_md(rec.get('question') or '')} |" if vqa else ""
            pred = _md(rec["prediction"]) or "(empty)"
            ref = _md(rec["references"][0] if rec["references"] else "")
            out.append(f"| {rec['id']} |{q} {pred} | {ref} | {_fmt(rec['score'], 1)} |")
        out.append("")
    return "\n".join(out)


def _md(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _config_lines(r: Results) -> list[str]:
    c = r.get("config", {})
    seeds = c.get("seeds", [])
    lines = [
        f"- demonstrations: {c.get('demo_selection', '?')}, seeds {seeds}"
        + (
            f"; 0-shot uses {c.get('zero_shot_text_demo_count')} text-only demonstrations"
            if c.get("zero_shot_text_demos")
            else "; 0-shot without demonstrations"
        ),
        f"- decoding: {c.get('decoding', '?')}, max new tokens {c.get('max_new_tokens')}",
        f"- shuffled images (control): {'yes' if c.get('shuffle_images') else 'no'}",
    ]
    if c.get("max_examples"):
        lines.append(
            f"- **subset**: only the first {c['max_examples']} queries of each task were evaluated "
            "(CIDEr is computed over exactly those)"
        )
    settings = r.get("settings")
    if settings:
        changed = [*settings.get("overrides", []), *(f"--{k}" for k in settings.get("flags", {}))]
        lines.append(
            f"- settings: the eval section of {settings.get('from')}"
            + (f", changed by {' '.join(changed)}" if changed else "")
        )
    if r.get("bad_images"):
        lines.append(
            f"- **{len(r['bad_images'])} undecodable image(s)**: the queries showing them were "
            "scored as empty predictions (`bad_images` in results.json)"
        )
    timing = r.get("timing", {})
    if timing.get("seconds") is not None:
        lines.append(
            f"- time: {timing['seconds']:.1f} s for {timing.get('generations')} generations"
        )
    return lines


def write_report(
    results: Results | Mapping[str, Results] | Sequence[Results],
    out_dir: str | Path,
    title: str = "Few-shot evaluation",
) -> dict[str, Path]:
    """Write results.json, results.md and scores_vs_shots.png into `out_dir`; returns their
    paths. Several runs (a mapping name -> results, or a list) share one table and one plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = _runs(results)
    paths = {
        "json": out / "results.json",
        "markdown": out / "results.md",
        "plot": out / "scores_vs_shots.png",
    }
    single = len(runs) == 1 and isinstance(results, Mapping) and "tasks" in results
    payload = results if single else runs
    paths["json"].write_text(json.dumps(payload, indent=1, default=str) + "\n")

    md = [f"# {title}", ""]
    md.append(
        "Scores: CIDEr ×100 for captioning, VQA accuracy ×100; mean over seeds (± population "
        "standard deviation in the per-run tables). Averages are over tasks, as MM1 reports its "
        "0/4/8-shot averages."
    )
    md += ["", markdown_table(runs), ""]
    for name, r in runs.items():
        md += [_detail_table(name, r), ""]
        md += [*_config_lines(r), ""]
        examples = _examples(r)
        if examples:
            md += ["Example predictions:", "", examples]
    md.append(f"![scores vs shots]({paths['plot'].name})")
    paths["markdown"].write_text("\n".join(md) + "\n")
    compare_runs(list(runs.values()), list(runs), paths["plot"], title=title)
    return paths


def compare_runs(
    results: Sequence[Results],
    names: Sequence[str] | None,
    out_png: str | Path,
    title: str = "Few-shot scores",
) -> Path:
    """One panel per task (and one for the average): score against the number of shots, a line
    with error bars (std over seeds) per run; the plain zero-shot score as a hollow marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if names is None:
        names = list(_runs(results))
    if len(names) != len(results):
        raise ValueError(f"{len(results)} results but {len(names)} names")
    runs = dict(zip(names, results))
    tasks = _task_names(runs)
    panels = [*tasks, "average"]
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, panels):
        for j, (name, r) in enumerate(runs.items()):
            color = colors[j % len(colors)]
            if panel == "average":
                avg = r.get("average", {})
                xs = sorted(int(k) for k in avg if k.isdigit())
                ax.plot(xs, [avg[str(k)] for k in xs], marker="o", color=color, label=name)
                continue
            entry = r["tasks"].get(panel)
            if entry is None:
                continue
            xs = sorted(int(k) for k in entry["shots"])
            means = [entry["shots"][str(k)]["mean"] for k in xs]
            stds = [entry["shots"][str(k)]["std"] for k in xs]
            dodge = 0.06 * (j - (len(runs) - 1) / 2) * max(xs[-1] - xs[0], 1)  # keep bars apart
            ax.errorbar(
                [x + dodge for x in xs],
                means,
                yerr=stds,
                marker="o",
                capsize=4,
                color=color,
                label=name,
            )
            plain = entry.get("zero_shot_plain")
            if plain and entry["shots"].get("0", {}).get("text_demos"):
                ax.plot(
                    [0],
                    [plain["mean"]],
                    marker="s",
                    mfc="none",
                    color=color,
                    linestyle="none",
                    label=f"{name}: 0-shot, no demos",
                )
        if panel == "average":
            ax.set_title("Average over tasks")
            ax.set_ylabel("mean score")
        else:
            metric = next(
                (r["tasks"][panel]["metric"] for r in runs.values() if panel in r["tasks"]), ""
            )
            ax.set_title(panel)
            ax.set_ylabel(f"{metric} ×100" if metric else "score")
        ax.set_xlabel("number of shots (demonstrations)")
        ax.set_xticks(_shots(runs))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
