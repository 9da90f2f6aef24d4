"""A study's results: STUDY/ablation.json (each configuration's delta, metrics per seed, mean and
standard deviation over seeds) and STUDY/report.md with tables laid out like the MM1 paper's
(Table 1: one row per setup, average 0/4/8-shot; Fig. 4 / Fig. 5: bars per setting, one panel
per shot count) as mean +- std over seeds, and the PNG plots."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from mm1.ablate.cell import read_cell
from mm1.ablate.runner import STUDY_FILE

ABLATION_FILE = "ablation.json"
REPORT_FILE = "report.md"
STD_NOTE = "std: sample standard deviation over training seeds (ddof=1); 0 with one seed"
LAYOUT_TITLES = {
    "plain": "Results",
    "table1": "Table 1 layout: one row per setup, average of the tasks at 0/4/8 shots",
    "fig4": "Fig. 4 layout: connector x image tokens x resolution, one panel per shot count",
    "fig5": "Fig. 5 layout: data mixtures, one panel per shot count",
}


def _stats(values: list[float]) -> dict[str, Any]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values), "values": values}


def collect(study_dir: str | Path) -> dict[str, Any]:
    """Every configuration of the study (cells grouped over seeds) with its metrics; written to
    STUDY/ablation.json."""
    study_dir = Path(study_dir)
    grid = json.loads((study_dir / STUDY_FILE).read_text())
    configs: dict[str, dict[str, Any]] = {}
    failed = []
    for c in grid["cells"]:
        rec = read_cell(study_dir / c["id"])
        delta = {k: v for k, v in c["delta"].items() if k not in ("train.seed", "data.seed")}
        entry = configs.setdefault(
            c["label"],
            {"label": c["label"], "settings": c["settings"], "delta": delta, "seeds": {}},
        )
        status = rec.get("status", "pending")
        entry["seeds"][str(c["seed"])] = {
            "cell": c["id"],
            "status": status,
            "metrics": rec.get("metrics", {}),
        }
        if status == "failed":
            failed.append({"cell": c["id"], "error": rec.get("error")})
    for entry in configs.values():
        done = [s["metrics"] for s in entry["seeds"].values() if s["status"] == "done"]
        names = sorted({k for m in done for k in m})
        entry["metrics"] = {k: _stats([m[k] for m in done if k in m]) for k in names}
    out = {
        "study": grid["study"],
        "grid": grid["grid"],
        "axes": grid["axes"],
        "seeds": grid["seeds"],
        "table": grid.get("table") or {},
        "std": STD_NOTE,
        "configs": list(configs.values()),
        "failed": failed,
    }
    (study_dir / ABLATION_FILE).write_text(json.dumps(out, indent=1) + "\n")
    return out


def _pm(stat: dict[str, Any] | None, digits: int = 1) -> str:
    if not stat:
        return "-"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _shots(results: dict[str, Any]) -> list[str]:
    names = {k for c in results["configs"] for k in c["metrics"]}
    return sorted({k.split("/")[1] for k in names if k.startswith("average/")}, key=int)


def _per_shot(key: str) -> bool:
    """A few-shot score: `task/shots`."""
    parts = key.split("/")
    return len(parts) == 2 and parts[1].isdigit()


def _tasks(results: dict[str, Any]) -> list[str]:
    names = {k.split("/")[0] for c in results["configs"] for k in c["metrics"] if _per_shot(k)}
    return sorted(names - {"average"})


def _other_scores(results: dict[str, Any]) -> dict[str, list[str]]:
    """The other suites' scores by suite (`sft/...`, `generation/...`): their metric names."""
    out: dict[str, list[str]] = {}
    for c in results["configs"]:
        for k in c["metrics"]:
            suite, _, name = k.partition("/")
            if name and not _per_shot(k) and suite not in ("train", "val", "average"):
                out.setdefault(suite, [])
                out[suite] += [name] if name not in out[suite] else []
    return out


def _axis_names(results: dict[str, Any]) -> list[str]:
    """The settings shown: `table.columns`, else every name in order (explicit cells may each
    set other keys)."""
    shown = results["table"].get("columns")
    return shown or list(dict.fromkeys(a for c in results["configs"] for a in c["settings"]))


def _setting(c: dict[str, Any], axis: str) -> str:
    return c["settings"].get(axis, "-")  # "-": the base config's value


def _seeds_done(config: dict[str, Any]) -> int:
    return sum(s["status"] == "done" for s in config["seeds"].values())


def tables(results: dict[str, Any]) -> list[str]:
    """The markdown tables: the layout's main table (average over tasks per shot count), the
    per-task scores, and the losses."""
    layout = results["table"].get("layout", "plain")
    axes = _axis_names(results)
    shots = _shots(results)
    head = [a.split(".")[-1] for a in axes]
    lines = [f"### {LAYOUT_TITLES[layout]}", ""]
    cols = [*head, *(f"{k}-shot avg" for k in shots), "seeds done"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for c in results["configs"]:
        row = [_setting(c, a) for a in axes]
        row += [_pm(c["metrics"].get(f"average/{k}")) for k in shots]
        row.append(f"{_seeds_done(c)}/{len(c['seeds'])}")
        lines.append("| " + " | ".join(row) + " |")
    for task in _tasks(results):
        lines += ["", f"### {task}", ""]
        cols = [*head, *(f"{k}-shot" for k in shots)]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for c in results["configs"]:
            row = [_setting(c, a) for a in axes]
            row += [_pm(c["metrics"].get(f"{task}/{k}")) for k in shots]
            lines.append("| " + " | ".join(row) + " |")
    for suite, names in _other_scores(results).items():
        lines += ["", f"### {suite}", ""]
        lines += [
            "| " + " | ".join([*head, *names]) + " |",
            "|" + "---|" * (len(head) + len(names)),
        ]
        for c in results["configs"]:
            row = [_setting(c, a) for a in axes]
            row += [_pm(c["metrics"].get(f"{suite}/{n}"), 3) for n in names]
            lines.append("| " + " | ".join(row) + " |")
    # Per-kind and held-out losses (the per-dataset ones stay in ablation.json), and row fill.
    loss_keys = sorted(
        {k for c in results["configs"] for k in c["metrics"] if "loss" in k and "_ds_" not in k}
    )
    if any("train/fill" in c["metrics"] for c in results["configs"]):
        loss_keys.append("train/fill")
    if loss_keys:
        title = "Losses (last logged training step; held-out captions), mean row fill"
        lines += ["", f"### {title}", ""]
        cols = [*head, *loss_keys]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for c in results["configs"]:
            row = [_setting(c, a) for a in axes]
            row += [_pm(c["metrics"].get(k), 3) for k in loss_keys]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def plot(results: dict[str, Any], out_png: Path) -> Path | None:
    """Bars of the task average per setting (mean, std as error bars), one panel per shot
    count; grouped on the x axis by `table.group_by` (e.g. the connector, as in Fig. 4)."""
    shots = _shots(results)
    configs = [c for c in results["configs"] if any(f"average/{k}" in c["metrics"] for k in shots)]
    if not configs or not shots:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group_by = results["table"].get("group_by")
    axes = _axis_names(results)
    if group_by not in axes:
        group_by = None
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in configs:
        groups.setdefault(_setting(c, group_by) if group_by else "", []).append(c)
    width = 0.8 / max(len(g) for g in groups.values())

    def hue(c: dict[str, Any]) -> str:  # the settings besides the group: "num_tokens=16, ..."
        return ", ".join(f"{a.split('.')[-1]}={_setting(c, a)}" for a in axes if a != group_by)

    # one colour per combination of the other settings, the same in every group
    colours = {h: i for i, h in enumerate(dict.fromkeys(hue(c) for c in configs))}
    fig, panels = plt.subplots(1, len(shots), figsize=(4 * len(shots) + 1, 4), squeeze=False)
    for ax, k in zip(panels[0], shots, strict=True):
        for gi, members in enumerate(groups.values()):
            for j, c in enumerate(members):
                stat = c["metrics"].get(f"average/{k}")
                if not stat:
                    continue
                h = hue(c)
                ax.bar(
                    gi + (j - (len(members) - 1) / 2) * width,
                    stat["mean"],
                    width * 0.9,
                    yerr=stat["std"],
                    capsize=3,
                    color=f"C{colours[h] if h else gi}",
                    label=h or None,
                )
        ax.set_xticks(range(len(groups)), list(groups) if group_by else [""] * len(groups))
        ax.set_title(f"{k}-shot")
        ax.set_ylabel("average of the tasks' scores")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = panels[0][0].get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    if seen:
        ncol = min(4, len(seen))
        fig.legend(seen.values(), seen.keys(), loc="lower center", ncol=ncol, fontsize=8)
    fig.suptitle(f"{results['study']}: mean ± std over seeds")
    fig.tight_layout(rect=(0, 0.12 if seen else 0, 1, 1))
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def write_report(study_dir: str | Path) -> Path:
    """ablation.json, the plot and report.md of a study (whatever has finished so far)."""
    study_dir = Path(study_dir)
    results = collect(study_dir)
    png = plot(results, study_dir / f"{_slug(results['study'])}.png")
    total = sum(len(c["seeds"]) for c in results["configs"])
    done = sum(s["status"] == "done" for c in results["configs"] for s in c["seeds"].values())
    lines = [
        f"# Ablation study: {results['study']}",
        "",
        f"Grid: `{results['grid']}`; seeds {results['seeds']}; {done} of {total} cells done. "
        f"Scores are mean ± std over training seeds ({STD_NOTE}); each seed's score is itself "
        "the mean over the evaluation's demonstration draws. Raw numbers: "
        f"[{ABLATION_FILE}]({ABLATION_FILE}).",
        "",
        *tables(results),
    ]
    if png is not None:
        lines += ["", f"![{results['study']}]({png.name})"]
    if results["failed"]:
        lines += ["", "### Failed cells", ""]
        lines += [f"- `{f['cell']}`: {f['error']}" for f in results["failed"]]
    path = study_dir / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text) or "study"
