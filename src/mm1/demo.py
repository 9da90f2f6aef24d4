"""`mm1 demo`: write the synthetic world, pre-train a tiny MM1 on the 45/45/10 mixture, evaluate it
few-shot beside the untrained model and a shuffled-image control, and write a report."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from mm1.config import Config, load_config
from mm1.data.scenes.documents import MAX_DOC_IMAGES
from mm1.eval.fewshot import evaluate
from mm1.eval.prompt_lengths import beyond_context, prompt_length_table
from mm1.eval.report import write_report
from mm1.models.family import family_of
from mm1.pretrained import load_pretrained
from mm1.train.errors import stop_if_signalled
from mm1.train.logging import read_metrics
from mm1.train.trainer import Trainer

DEMO_CONFIG = "demo.yaml"


def demo_config_path() -> Path:
    return Path(str(resources.files("mm1") / "configs" / DEMO_CONFIG))


def run_demo(out_dir: str | Path = "runs/demo", overrides: Sequence[str] = ()) -> Path:
    """Train (or resume, or reuse a finished run in `out_dir`), evaluate, write the report."""
    out = Path(out_dir)
    cfg = load_config(demo_config_path(), [f"train.run_dir={out}", *overrides])
    t0 = time.perf_counter()
    stop_if_signalled(Trainer(cfg).fit(), cfg.train.steps, out)
    train_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    results = evaluate_models(cfg, out)
    eval_s = time.perf_counter() - t1
    report = write_demo_report(cfg, out, results, train_s, eval_s)
    print(f"\nreport: {report}", flush=True)
    return report


def evaluate_models(cfg: Config, run_dir: Path) -> dict[str, dict[str, Any]]:
    """Few-shot scores of the trained model, of the same model untrained (its initialisation),
    and of the trained model shown other queries' images (the shuffled-image control)."""
    trained = load_pretrained(run_dir)
    torch.manual_seed(cfg.train.seed)  # the trainer's seed: the very weights training started from
    untrained = family_of(trained.model).model(trained.model.cfg).eval()
    runs = {
        "trained": (trained.model, False),
        "untrained": (untrained, False),
        "shuffled images": (trained.model, True),
    }
    results = {}
    for name, (model, shuffle) in runs.items():
        print(f"evaluating: {name}", flush=True)
        results[name] = evaluate(  # the run's eval section, as `mm1 eval RUN` reads it
            model,
            trained.tokenizer,
            trained.processor,
            replace(cfg.eval, shuffle_images=shuffle),
            world=cfg.data.world,
            prompt_format=trained.prompt_format,
            name=name,
        )
    return results


# ---------------------------------------------------------------------------------------------
# Grounding: do captions name what the image shows?
# ---------------------------------------------------------------------------------------------


def object_recall(caption: str, scene: dict[str, Any]) -> float:
    """Fraction of the scene's objects whose colour and shape are named together
    ("red circle", "red big circle"...) in the caption."""
    words = re.findall(r"[a-z]+", caption.lower())
    objects = scene.get("objects", [])
    if not objects:
        return 0.0
    hits = 0
    for obj in objects:
        colour, shape = obj["color"].split()[-1], obj["shape"]
        hits += any(words[i] == colour and shape in words[i + 1 : i + 3] for i in range(len(words)))
    return hits / len(objects)


def grounding_scores(results: dict[str, Any], world: Path) -> dict[str, float]:
    """Mean object recall of the 0-shot captions, judged against the true image's facts."""
    coco = json.loads((world / "eval" / "val" / "captions.json").read_text())
    scenes = {str(im["id"]): im.get("scene", {}) for im in coco["images"]}
    preds = results["predictions"].get("synth_coco", {})
    out = {}
    for shots, by_seed in preds.items():
        records = next(iter(by_seed.values()))
        vals = [object_recall(r["prediction"], scenes.get(str(r["id"]), {})) for r in records]
        out[shots] = 100 * sum(vals) / max(1, len(vals))
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def plot_losses(run_dir: Path, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (45/45/10 mixture)")
    for kind in ("captions", "interleaved", "text"):
        pts = [(r["step"], r[f"loss_{kind}"]) for r in records if f"loss_{kind}" in r]
        if pts:
            ax.plot(*zip(*pts), lw=0.8, alpha=0.6, label=f"train loss: {kind}")
    if val:
        ax.plot(*zip(*val), "o-", label="held-out loss (val captions)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per text token)")
    ax.set_title("Pre-training the demo MM1 on the synthetic world")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def _score(res: dict[str, Any], task: str, shots: str) -> float:
    return float(res["tasks"][task]["shots"][shots]["mean"])


def write_demo_report(
    cfg: Config, run_dir: Path, results: dict[str, dict[str, Any]], train_s: float, eval_s: float
) -> Path:
    eval_dir = run_dir / "eval"
    files = write_report(results, eval_dir, title="Demo: few-shot scores on the synthetic world")
    loss_png = plot_losses(run_dir, run_dir / "loss.png")
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    val = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]
    world = Path(cfg.data.world)
    grounding = {name: grounding_scores(res, world) for name, res in results.items()}
    shots = [str(s) for s in sorted(cfg.eval.shots)]

    lines = [
        "# mm1 demo report",
        "",
        f"A tiny MM1 ({_params(run_dir)}) pre-trained on the synthetic world's 45/45/10 mixture "
        f"(interleaved / captions / text) for {records[-1]['step'] if records else 0} steps "
        f"in {train_s / 60:.1f} min, evaluated in {eval_s / 60:.1f} min.",
        "",
        "## Training",
        "",
        f"![loss curve]({loss_png.name})",
        "",
        "| | first logged | last logged |",
        "|---|---|---|",
    ]
    if records:
        first, last = records[0], records[-1]
        lines.append(
            f"| train loss | {first['loss']:.3f} (step {first['step']}) | "
            f"{last['loss']:.3f} (step {last['step']}) |"
        )
        lines.append(f"| tokens/s | {first['tokens_per_s']:.0f} | {last['tokens_per_s']:.0f} |")
        lines.append(
            f"| time waiting for data | {100 * first['data_wait']:.1f}% | "
            f"{100 * last['data_wait']:.1f}% |"
        )
    if val:
        lines.append(f"| held-out loss | {val[0]:.3f} | {val[-1]:.3f} |")
    lines += [
        "",
        "## Few-shot evaluation",
        "",
        "Captioning (CIDEr) and VQA (VQA accuracy) on held-out scenes; demonstrations from a "
        "separate support split; OpenFlamingo-style prompts; greedy decoding. *untrained* is the "
        "same model before training; *shuffled images* is the trained model shown another "
        "query's image (same prompt, wrong picture): it can only score by guessing from text.",
        "",
        *_main_table(Path(files["markdown"]).read_text()),
        "",
        *_context_note(results["trained"], cfg.data.seq_len),
        f"Per-run details, with example predictions: [eval/results.md](eval/"
        f"{Path(files['markdown']).name}).",
        "",
        f"![few-shot scores](eval/{Path(files['plot']).name})",
        "",
        "## Is it looking at the image?",
        "",
        "Object recall: the share of objects in each held-out image whose colour and shape the "
        "caption names together, judged against the image actually in the file.",
        "",
        "| model | " + " | ".join(f"{s}-shot" for s in shots) + " |",
        "|---|" + "---|" * len(shots),
    ]
    for name, g in grounding.items():
        lines.append(f"| {name} | " + " | ".join(f"{g.get(s, 0.0):.1f}%" for s in shots) + " |")
    lines += ["", _verdict(results, grounding, shots), "", "## Sample captions (0-shot)", ""]
    lines += _samples(results)
    report = run_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _context_note(results: dict[str, Any], seq_len: int) -> list[str]:
    """The prompts' lengths against the training context, and which scores lie beyond it."""
    over = beyond_context(results, seq_len, MAX_DOC_IMAGES)
    lines = [
        f"Prompt lengths against the training context: {seq_len}-token rows, and at most "
        f"{MAX_DOC_IMAGES} images in one attention context (the world's documents; "
        'docs/ablations.md, "The demo\'s few-shot curve").',
        "",
        *prompt_length_table(results, seq_len, MAX_DOC_IMAGES),
        "",
    ]
    if over:
        lines += [
            f"**Beyond the training context:** {', '.join(over)}. These prompts are longer, or "
            "show more images, than anything the model attended over in training; their scores "
            "measure the model out of its training distribution.",
            "",
        ]
    return lines


def _main_table(markdown: str) -> list[str]:
    """The first table of the evaluation report (one row per run)."""
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def _params(run_dir: Path) -> str:
    try:
        from mm1.models.summary import summarize
        from mm1.pretrained import load_model_config

        s = summarize(load_model_config(run_dir))
        return f"{s.total / 1e6:.1f}M parameters"
    except (OSError, ValueError):
        return "tiny"


def _verdict(results: dict[str, Any], grounding: dict[str, Any], shots: list[str]) -> str:
    t, u, s = (results[k] for k in ("trained", "untrained", "shuffled images"))
    k = shots[-1]
    parts = []
    for task, info in t["tasks"].items():
        metric = info["metric"]
        parts.append(
            f"{task} {metric} at {k} shots: trained {_score(t, task, k):.1f}, untrained "
            f"{_score(u, task, k):.1f}, shuffled images {_score(s, task, k):.1f}"
        )
    g = grounding
    parts.append(
        f"object recall at 0 shots: trained {g['trained'].get('0', 0):.1f}%, untrained "
        f"{g['untrained'].get('0', 0):.1f}%, shuffled images {g['shuffled images'].get('0', 0):.1f}%"
    )
    return "**Summary.** " + "; ".join(parts) + "."


def _samples(results: dict[str, Any], n: int = 6) -> list[str]:
    def records(name: str) -> list[dict[str, Any]]:
        by_seed = results[name]["predictions"].get("synth_coco", {}).get("0", {})
        return next(iter(by_seed.values()), [])

    trained, untrained, shuffled = (records(k) for k in ("trained", "untrained", "shuffled images"))
    lines = [
        "| image | reference | trained | untrained | shuffled images |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(trained[:n]):
        ref = (r.get("references") or [""])[0]
        cells = [
            str(r["id"]),
            ref,
            r["prediction"],
            untrained[i]["prediction"] if i < len(untrained) else "",
            shuffled[i]["prediction"] if i < len(shuffled) else "",
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines
