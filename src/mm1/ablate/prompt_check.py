"""Does a cell's training context cover its longest evaluation prompt? A model never trained on
sequences as long as its few-shot prompts, or on documents with as many images, is evaluated out
of its training distribution (issue 17, item 5), so the runner warns, naming the cell.

Packed rows mask attention between documents, so on the synthetic world the training context
is one document: at most `data.seq_len` tokens and the world's `MAX_DOC_IMAGES` images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mm1.config import Config
from mm1.data.prompt_format import PromptFormat
from mm1.data.scenes.documents import MAX_DOC_IMAGES
from mm1.data.synthetic import WorldManifest
from mm1.data.tokenizer import Tokenizer
from mm1.eval.prompts import PromptTemplates, build_prompt, format_demo
from mm1.eval.tasks import SYNTHETIC_TASKS, Example, Task, load_task


def _longest(task: Task, tok: Tokenizer, fmt: PromptFormat, shots: int) -> int:
    """Tokens of the prompt with the `shots` longest demonstrations and the longest query: an
    upper bound on any prompt the evaluation draws (the answer's room not counted)."""
    template = PromptTemplates().get(task.kind)

    def size(e: Example) -> int:
        return len(tok.encode(format_demo(template, e, with_image=False)))

    demos = sorted(task.support or [], key=size, reverse=True)[:shots]
    query = max(task.query, key=size)
    return len(build_prompt(tok, fmt, task.kind, demos, query).input_ids)


def longest_eval_prompt(cfg: Config) -> dict[str, int]:
    """Tokens of the longest few-shot prompt of each synthetic task the cell evaluates, at its
    largest shot count; empty when the world is not written yet (checked again when it is)."""
    world = Path(cfg.data.world)
    if not (world / "world.json").is_file() or cfg.data.tokenizer:
        return {}
    tok = Tokenizer.from_file(WorldManifest.load(world).tokenizer_path)
    fmt = PromptFormat(cfg.model.num_image_tokens, bool(cfg.data.image_boundaries))
    shots = max(cfg.eval.shots)
    out = {}
    for name in cfg.eval.tasks:
        if name in SYNTHETIC_TASKS:
            out[name] = _longest(load_task(name, world=world), tok, fmt, shots)
    return out


def context_problem(cfg: Config) -> str | None:
    """What runs past the training context when a cell is evaluated: a prompt longer than its
    `data.seq_len`, or (trained on the world's own mixture) more images than a world document
    (its largest shot count's demonstrations and the query); None if nothing does."""
    lengths = longest_eval_prompt(cfg)
    if not lengths:
        return None
    shots = max(cfg.eval.shots)
    problems = []
    over = {t: n for t, n in lengths.items() if n > cfg.data.seq_len}
    if over:
        worst = max(over, key=over.get)  # type: ignore[arg-type]
        problems.append(
            f"data.seq_len={cfg.data.seq_len} is shorter than its longest {shots}-shot {worst} "
            f"prompt ({over[worst]} tokens)"
        )
    if not cfg.data.sources and shots + 1 > MAX_DOC_IMAGES:  # trained on the world's mixture
        problems.append(
            f"its {shots}-shot prompts show {shots + 1} images, more than any training document "
            f"of the world ({MAX_DOC_IMAGES})"
        )
    if not problems:
        return None
    return (
        f"{'; '.join(problems)}: the evaluation runs past anything the model attended over in "
        "training (raise data.seq_len, or lower eval.shots)"
    )


def context_warnings(cells: Sequence[tuple[str, Config]]) -> list[str]:
    """One line per distinct `context_problem` of the (cell id, config) pairs, naming its cells
    (a study's grid usually shares one eval section: one line, not one per cell)."""
    by_problem: dict[str, list[str]] = {}
    for cell_id, cfg in cells:
        problem = context_problem(cfg)
        if problem:
            by_problem.setdefault(problem, []).append(cell_id)
    lines = []
    for problem, ids in by_problem.items():
        if len(ids) == 1:
            who = f"cell {ids[0]}"
        elif len(ids) == len(cells):
            who = f"all {len(ids)} cells"
        else:
            who = f"{len(ids)} cells ({', '.join(ids)})"
        lines.append(f"{who}: {problem}")
    return lines
