"""The demo's SFT stage (`mm1 demo --sft` runs it after pre-training): fine-tune the pre-trained
demo model on the synthetic world's conversations (`configs/demo_sft.yaml`), run the SFT
evaluation suite on the pre-trained model (few-shot), the SFT model (zero-shot, through its chat
template) and the SFT model shown other queries' images (the control), show three example
conversations, and write a report."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from mm1.chat import ChatSession, ChatSettings, load_image, resolve_chat_template
from mm1.config import load_config
from mm1.data.sft_eval import ensure_sft_eval
from mm1.data.sft_tasks import ensure_sft_presence, ensure_sft_tasks
from mm1.data.world import run_world
from mm1.eval.suite import evaluate_suite, prior_scores
from mm1.eval.suite_report import TITLES, detail_table, suite_table, write_suite_report
from mm1.eval.suite_tasks import SuiteTask, load_suite
from mm1.pretrained import Pretrained, load_pretrained
from mm1.train.errors import stop_if_signalled
from mm1.train.trainer import Trainer

SFT_CONFIG = "demo_sft.yaml"
SUITE_SEEDS = 3
SUITE_EXAMPLES = 0  # every query of each task (200 in the demo's world)
RUNS = ("pre-trained", "SFT", "SFT, shuffled images")


def sft_config_path() -> Path:
    return Path(str(resources.files("mm1") / "configs" / SFT_CONFIG))


def _last_step(run_dir: Path) -> int:
    from mm1.train.logging import read_metrics

    if not (run_dir / "metrics.jsonl").is_file():
        return 0
    return max((int(r["step"]) for r in read_metrics(run_dir) if "step" in r), default=0)


def run_sft_demo(
    pretrained_dir: str | Path = "runs/demo",
    out_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    seeds: int = SUITE_SEEDS,
    examples: int = SUITE_EXAMPLES,
) -> Path:
    """Fine-tune (or reuse a finished run in `out_dir`), evaluate the suite over `seeds` seeds
    of `examples` queries per task, write `out_dir/report.md`."""
    pre = Path(pretrained_dir)
    out = Path(out_dir or pre.parent / f"{pre.name}_sft")
    world = Path(run_world(pre))
    cfg = load_config(
        sft_config_path(),
        [f"train.run_dir={out}", f"train.init.weights={pre}", f"data.world={world}", *overrides],
    )
    # the conversations of the pre-trained model's own world
    paths = {
        "conversations": world / "sft" / "llava.json",
        "tasks": ensure_sft_tasks(world),
        "presence": ensure_sft_presence(world),
    }
    cfg.data.sources = [replace(s, path=str(paths[s.name])) for s in cfg.data.sources]
    finished = _last_step(out) >= cfg.train.steps
    t0 = time.perf_counter()
    stop_if_signalled(Trainer(cfg).fit(), cfg.train.steps, out)
    train_s = 0.0 if finished else time.perf_counter() - t0  # 0: a finished run, reused

    t1 = time.perf_counter()
    tasks = load_suite(ensure_sft_eval(world))
    runs = evaluate_runs(load_pretrained(pre), load_pretrained(out), tasks, seeds, examples)
    eval_s = time.perf_counter() - t1
    files = write_suite_report(runs, out / "eval-suite", title="Demo: the SFT evaluation suite")
    conversations = example_conversations(load_pretrained(out), tasks, out / "examples")
    report = write_sft_report(out, runs, files, conversations, train_s, eval_s, seeds, examples)
    print(f"\nSFT report: {report}", flush=True)
    return report


def evaluate_runs(
    pretrained: Pretrained,
    sft: Pretrained,
    tasks: Sequence[SuiteTask],
    seeds: int = SUITE_SEEDS,
    examples: int = SUITE_EXAMPLES,
) -> list[dict[str, Any]]:
    """The suite for the pre-trained model (few-shot), the SFT model (zero-shot chat) and its
    shuffled-image control, each over `seeds` seeds of `examples` queries per task; then the
    most-frequent-answer baseline."""
    runs = []
    for name, p, chat, shuffle in (
        (RUNS[0], pretrained, False, False),
        (RUNS[1], sft, True, False),
        (RUNS[2], sft, True, True),
    ):
        print(f"SFT suite: {name}", flush=True)
        runs.append(
            evaluate_suite(
                p.model,
                p.tokenizer,
                p.processor,
                p.prompt_format,
                tasks,
                chat=chat,
                seeds=seeds,
                max_examples=examples,
                shuffle_images=shuffle,
                name=name,
            )
        )
    runs.append(prior_scores(tasks, examples))
    return runs


# ---------------------------------------------------------------------------------------------
# Example conversations
# ---------------------------------------------------------------------------------------------


def _conversation_plan(tasks: Sequence[SuiteTask]) -> list[tuple[list[Path], list[str], str]]:
    """Three held-out conversations: a description and a follow-up question, reading a sign,
    and a question over two pictures; with the true answer to each first question."""
    by_name = {t.name: t for t in tasks}
    bench = next(e for e in by_name["sft_bench"].query if e.category == "detail")
    text = by_name["sft_textvqa"].query[0]
    multi = next(e for e in by_name["sft_multi"].query if "most" in e.question)
    return [
        (
            list(bench.images),
            ["Describe this image in detail.", "How many objects are there?"],
            bench.references[0],
        ),
        (
            list(text.images),
            [text.question, "Please transcribe all the text in the picture."],
            text.target,
        ),
        (list(multi.images), [multi.question], multi.target),
    ]


def example_conversations(
    sft: Pretrained, tasks: Sequence[SuiteTask], out_dir: Path
) -> list[dict[str, Any]]:
    """Each planned conversation with the SFT model (greedy), its images copied to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    template = resolve_chat_template(sft.tokenizer, None)
    conversations = []
    for paths, questions, truth in _conversation_plan(tasks):
        session = ChatSession(sft, template, ChatSettings(max_new_tokens=60))
        images = [load_image(p) for p in paths]
        turns = []
        for k, q in enumerate(questions):
            answer = session.reply(q, images if k == 0 else [], lambda piece: None)
            turns.append({"user": q, "assistant": answer.text.strip()})
        copies = []
        for p in paths:
            shutil.copyfile(p, out_dir / p.name)
            copies.append(f"{out_dir.name}/{p.name}")
        conversations.append({"images": copies, "turns": turns, "truth": truth})
    return conversations


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _spread(entry: dict[str, Any]) -> float:
    scores = entry["metrics"][entry["metric"]]["scores"]
    return max(scores) - min(scores)


def verdict(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Per task: the SFT model against the pre-trained model (is the gap larger than either's
    spread over seeds, max - min?) and against its shuffled-image control."""
    pt, sft, shuffled, prior = runs
    lines = [
        "| task | pre-trained | SFT | gap | spread (max of the two) | SFT > PT beyond spread | "
        "shuffled images | SFT > control | prior |",
        "|---|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for name, e in sft["tasks"].items():
        p, c, b = pt["tasks"][name], shuffled["tasks"][name], prior["tasks"][name]
        gap = e["mean"] - p["mean"]
        spread = max(_spread(e), _spread(p))
        lines.append(
            f"| {TITLES.get(name, name)} ({e['metric']}) | {p['mean']:.1f} | {e['mean']:.1f} | "
            f"{gap:+.1f} | {spread:.1f} | {'yes' if gap > spread else 'NO'} | "
            f"{c['mean']:.1f} | {'yes' if e['mean'] > c['mean'] else 'NO'} | {b['mean']:.1f} |"
        )
    return lines


def write_sft_report(
    out: Path,
    runs: Sequence[dict[str, Any]],
    files: dict[str, str],
    conversations: Sequence[dict[str, Any]],
    train_s: float,
    eval_s: float,
    seeds: int = SUITE_SEEDS,
    examples: int = SUITE_EXAMPLES,
) -> Path:
    from mm1.train.logging import read_metrics

    records = [r for r in read_metrics(out) if "loss" in r]
    pt = runs[0]
    lines = [
        "# mm1 demo: supervised fine-tuning",
        "",
        f"The pre-trained demo model fine-tuned on the synthetic world's conversations "
        f"(`configs/demo_sft.yaml`) for {records[-1]['step']} steps "
        + (f"in {train_s / 60:.1f} min " if train_s else "(a finished run, reused) ")
        + f"(loss {records[0]['loss']:.2f} at step {records[0]['step']}, "
        f"{records[-1]['loss']:.2f} at the end), then the SFT evaluation suite in "
        f"{eval_s / 60:.1f} min."
        if records
        else "No training steps were logged.",
        "",
        "## The SFT evaluation suite",
        "",
        f"Held-out scenes of the world (`eval/sft/`). The pre-trained model is prompted "
        f"few-shot ({pt['shots']} demonstrations from the support split), the SFT model "
        "zero-shot through its chat template. "
        + (f"The first {examples} queries of each task " if examples else "Every query ")
        + f"is scored under each of {seeds} seeds, which draw the demonstrations (zero-shot "
        "answers do not depend on the seed); mean ± standard deviation over seeds. "
        "*shuffled images* "
        "shows the SFT model another query's pictures; *prior* answers every query with the "
        "support split's most frequent answer (POPE: always yes).",
        "",
        suite_table(runs),
        "",
        "Every metric (VQA tasks: accuracy per answer type too; POPE: accuracy, precision, "
        "recall, F1, yes-ratio and accuracy per kind of negative; LLaVA-Bench: CIDEr, ROUGE-L):",
        "",
        detail_table(runs),
        "",
        f"![SFT suite](eval-suite/{Path(files['plot']).name})",
        "",
        "## Does fine-tuning help, and does the SFT model look?",
        "",
        *verdict(runs),
        "",
        "## Example conversations (SFT model, greedy)",
        "",
    ]
    for i, conv in enumerate(conversations, 1):
        pics = " ".join(f'<img src="{p}" width="128">' for p in conv["images"])
        lines += [
            f"**Conversation {i}** {pics} (true answer to the first question: {conv['truth']})",
            "",
        ]
        for turn in conv["turns"]:
            lines += [f"> **user:** {turn['user']}  ", f"> **assistant:** {turn['assistant']}", ""]
    lines.append("Details and predictions: [eval-suite/suite.md](eval-suite/suite.md).")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def add_to_demo_report(demo_report: Path, sft_report: Path) -> Path:
    """Append the SFT report to the demo's, its links made relative to the demo's folder."""
    rel = Path("..") / sft_report.parent.name
    body = sft_report.read_text().split("\n", 1)[1]
    for folder in ("eval-suite/", "examples/"):
        body = body.replace(f"({folder}", f"({rel}/{folder}").replace(
            f'src="{folder}', f'src="{rel}/{folder}'
        )
    text = demo_report.read_text().rstrip("\n")
    demo_report.write_text(f"{text}\n\n# Supervised fine-tuning ({sft_report.parent.name})\n{body}")
    return demo_report
