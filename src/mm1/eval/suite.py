"""The SFT evaluation suite (`mm1 eval RUN --suite sft`): five tasks mirroring MM1's SFT
benchmarks (VQAv2, TextVQA, POPE, multi-image questions, LLaVA-Bench), run on one model.

Prompting depends on the model:

- a chat model (its tokenizer or prompt format has a chat template, or it was fine-tuned on
  conversations) is asked zero-shot through its template, as it was fine-tuned: one user turn
  with the images first, then the question; short-answer tasks (VQA, TextVQA, POPE,
  multi-image) append "Answer the question using a single word or phrase." (LLaVA-1.5's
  evaluation prompt). Generation stops at EOS or an end-of-turn token.
- a pre-trained model is asked few-shot (`FEWSHOT_SHOTS` = 4 demonstrations from the task's
  support split, drawn per query and seed), OpenFlamingo-style:
  `<image>Question:{q} Short answer:{a}<|endofchunk|>` (`Answer:` for long answers; one `<image>`
  per picture), stopping at `<|endofchunk|>`.

Seeds, as in the few-shot evaluation (`mm1.eval.fewshot`): every seed scores the same queries
(all, or the first `max_examples`) and draws its own demonstrations, so a zero-shot greedy
evaluation is the same for every seed (it runs once and counts for each). Greedy decoding
throughout. `shuffle_images` is the control: each query is shown the
images of another query of the sample (a fixed rotation; same text, wrong pictures).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from mm1.data.prompt_format import PromptFormat
from mm1.data.scenes.documents import SHORT_SUFFIX
from mm1.data.sources.base import image_from_path
from mm1.data.tokenizer import IMAGE_TOKEN, Tokenizer, tokenize_chat_prompt
from mm1.eval.metrics import mean_std
from mm1.eval.prompts import encode_prompt, postprocess
from mm1.eval.suite_tasks import SHORT_KINDS, SuiteExample, SuiteTask, load_suite
from mm1.models.generation import generate
from mm1.models.mllm import MLLM
from mm1.reasoning import format_reasoning, split_reasoning

FEWSHOT_SHOTS = 4
MAX_NEW_TOKENS = {"short": 10, "long": 60}
MODES = ("auto", "chat", "fewshot")
CONVERSATION_FORMATS = ("llava", "llava_yaml")


def is_chat_model(tokenizer: Tokenizer, fmt: PromptFormat, run_dir: str | Path | None) -> bool:
    """Whether a model is prompted through a chat template: its tokenizer or prompt format has
    one, or its run (config.yaml) trained on conversations (an SFT run with the built-in
    `plain` template)."""
    if tokenizer.chat_template is not None or fmt.chat_template is not None:
        return True
    saved = Path(run_dir) / "config.yaml" if run_dir is not None else None
    if saved is None or not saved.is_file():
        return False
    import yaml

    data = (yaml.safe_load(saved.read_text()) or {}).get("data") or {}
    return any(s.get("format") in CONVERSATION_FORMATS for s in data.get("sources") or [])


class SuitePrompter:
    """Writes a query (with demonstrations, few-shot) as token ids, and reads the answer."""

    def __init__(
        self, tokenizer: Tokenizer, fmt: PromptFormat, chat: bool, shots: int = FEWSHOT_SHOTS
    ) -> None:
        self.tokenizer, self.fmt, self.chat = tokenizer, fmt, chat
        self.shots = 0 if chat else shots
        tok = tokenizer
        # A template that writes reasoning blocks (Qwen3's): the answer is what follows it.
        self.reasoning = format_reasoning(tok, fmt) if chat else None
        if chat:
            ends = (tok.token_to_id(t) for t in tok.end_of_turn_tokens())
            self.stop_ids = {tok.eos_id, *(i for i in ends if i is not None)}
        else:
            self.stop_ids = {tok.eos_id, tok.endofchunk_id}

    def text(self, kind: str, example: SuiteExample, demos: Sequence[SuiteExample]) -> str:
        """The prompt's text (chat: the user message's content; few-shot: the whole prompt)."""
        if self.chat:
            tags = "\n".join([IMAGE_TOKEN] * len(example.images))
            suffix = f"\n{SHORT_SUFFIX}" if kind in SHORT_KINDS else ""
            return f"{tags}\n{example.question}{suffix}"
        field = "Short answer:" if kind in SHORT_KINDS else "Answer:"

        def one(e: SuiteExample, answer: str) -> str:
            return IMAGE_TOKEN * len(e.images) + f"Question:{e.question} {field}{answer}"

        text = "".join(one(d, d.target.strip()) + "<|endofchunk|>\n" for d in demos)
        return text + one(example, "")

    def ids(self, text: str, images: Sequence[Image.Image]) -> list[int]:
        if self.chat:
            messages = [{"role": "user", "content": text}]
            return tokenize_chat_prompt(messages, list(images), self.tokenizer, self.fmt)
        return encode_prompt(self.tokenizer, text, self.fmt, list(images))

    def answer(self, kind: str, tokens: Sequence[int]) -> str:
        end = next((i for i, t in enumerate(tokens) if t in self.stop_ids), len(tokens))
        text = self.tokenizer.decode(list(tokens[:end]))
        if self.chat:
            if self.reasoning is not None:
                text = split_reasoning(text, opened=self.reasoning)[1]
            text = text.strip()
            return text.split("\n", 1)[0].strip() if kind in SHORT_KINDS else text
        cut = postprocess(text, "vqa" if kind in SHORT_KINDS else "caption", ("<|endofchunk|>",))
        return cut.split("Question:", 1)[0].strip()


def _queries(task: SuiteTask, n: int) -> list[SuiteExample]:
    """The queries scored: all, or the first `n` (as `evaluate`'s `max_examples`)."""
    return task.query[:n] if n else list(task.query)


def _demos(task: SuiteTask, query: SuiteExample, k: int, seed: int) -> list[SuiteExample]:
    if k == 0:
        return []
    pool = [s for s in task.support if not set(s.images) & set(query.images)]
    if len(pool) < k:
        raise ValueError(
            f"task {task.name!r}: {k} demonstrations wanted but the support split has "
            f"{len(pool)}; add a `support:` split (or prompt the model as a chat model)"
        )
    return random.Random(f"suite|{task.name}|{seed}|{query.id}").sample(pool, k)


@torch.no_grad()
def evaluate_suite(
    model: MLLM,
    tokenizer: Tokenizer,
    processor: Any,
    fmt: PromptFormat,
    tasks: Sequence[SuiteTask],
    *,
    chat: bool,
    seeds: int = 3,
    max_examples: int = 0,
    shuffle_images: bool = False,
    shots: int = FEWSHOT_SHOTS,
    batch_size: int = 16,
    name: str = "mm1",
    compile: bool = False,
) -> dict[str, Any]:
    """Scores of `model` on each task per seed (0..seeds-1), with mean and population standard
    deviation, and every prediction. JSON-serialisable. `compile`: greedy decoding's steps
    compiled (`generate`)."""
    prompter = SuitePrompter(tokenizer, fmt, chat, shots)
    device = model.decoder.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    images: dict[Path, Image.Image] = {}

    def load(p: Path) -> Image.Image:
        if p not in images:
            images[p] = image_from_path(p)
        return images[p]

    results: dict[str, Any] = {
        "name": name,
        "mode": "chat, 0-shot" if chat else f"{prompter.shots}-shot",
        "shots": prompter.shots,
        "config": {
            "seeds": list(range(seeds)),
            "max_examples": max_examples,
            "shuffle_images": shuffle_images,
            "decoding": "greedy",
            "max_new_tokens": MAX_NEW_TOKENS,
            "std": "population standard deviation over seeds (ddof=0)",
        },
        "tasks": {},
        "predictions": {},
    }
    start = time.perf_counter()
    try:
        for task in tasks:
            budget = MAX_NEW_TOKENS["short" if task.kind in SHORT_KINDS else "long"]
            per_seed: list[dict[str, float]] = []
            records_by_seed: dict[str, list[dict[str, Any]]] = {}
            queries = _queries(task, max_examples)
            for seed in range(seeds):
                if seed > 0 and prompter.shots == 0:  # nothing depends on the seed
                    per_seed.append(per_seed[0])  # (its predictions are seed 0's)
                    continue
                shown = [q.images for q in queries]
                if shuffle_images and len(queries) > 1:
                    shown = shown[1:] + shown[:1]
                demos = [_demos(task, q, prompter.shots, seed) for q in queries]
                preds: dict[str, str] = {}
                records = []
                for b in range(0, len(queries), batch_size):
                    batch = list(range(b, min(b + batch_size, len(queries))))
                    ids, pixels, crops, sizes = [], [], [], []
                    for i in batch:
                        # the query's text, shown its (or, in the control, another's) pictures
                        q = SuiteExample(queries[i].id, shown[i], *_rest(queries[i]))
                        text = prompter.text(task.kind, q, demos[i])
                        pics = [load(p) for d in demos[i] for p in d.images]
                        pics += [load(p) for p in shown[i]]
                        ids.append(prompter.ids(text, pics))
                        pixels.append(fmt.pixel_values(processor, pics))
                        if pics:  # a tiled layout assembles each image from these
                            n, hw = fmt.image_info(pics)
                            crops.append(n)
                            sizes.append(hw)
                    outs = generate(
                        model,
                        ids,
                        torch.cat(pixels).to(device),
                        image_crops=torch.cat(crops) if crops else None,
                        image_sizes=torch.cat(sizes) if sizes else None,
                        max_new_tokens=budget,
                        eos_token_id=sorted(prompter.stop_ids),
                        pad_token_id=tokenizer.pad_id,
                        compile=compile,
                    )
                    for i, prompt, out in zip(batch, ids, outs):
                        q = queries[i]
                        preds[q.id] = prompter.answer(task.kind, out)
                        records.append(
                            {
                                "id": q.id,
                                "question": q.question,
                                "images": [str(p) for p in shown[i]],
                                "prediction": preds[q.id],
                                "references": list(q.references),
                                "demos": [d.id for d in demos[i]],
                                "prompt_tokens": len(prompt),
                            }
                        )
                scores, per = task.score(preds, queries)
                for r in records:
                    r["score"] = per[r["id"]]
                per_seed.append(scores)
                records_by_seed[str(seed)] = records
            metrics = {}
            for m in per_seed[0]:
                values = [s[m] for s in per_seed]
                mean, std = mean_std(values)
                metrics[m] = {"scores": values, "mean": mean, "std": std}
            results["tasks"][task.name] = {
                "kind": task.kind,
                "metric": task.metric,
                "metrics": metrics,
                "mean": metrics[task.metric]["mean"],
                "std": metrics[task.metric]["std"],
                "num_queries": len(queries),
                "total_queries": len(task.query),
            }
            results["predictions"][task.name] = records_by_seed
    finally:
        model.train(was_training)
    results["timing"] = {"seconds": time.perf_counter() - start}
    return results


def _rest(q: SuiteExample) -> tuple[str, tuple[str, ...], str, str | None]:
    return q.question, q.references, q.target, q.category


def prior_scores(tasks: Sequence[SuiteTask], max_examples: int = 0) -> dict[str, Any]:
    """The text-only baseline: every query answered with the support split's most frequent
    answer (POPE: always "yes"), scored on the same queries. No model involved."""
    from collections import Counter

    out: dict[str, Any] = {"name": "prior (most frequent answer)", "tasks": {}}
    for task in tasks:
        queries = _queries(task, max_examples)
        pool = task.support or task.query
        if task.kind == "pope":
            guess = "yes"
        else:
            guess = Counter(e.target for e in pool).most_common(1)[0][0]
        scores, _ = task.score({q.id: guess for q in queries}, queries)
        out["tasks"][task.name] = {
            "kind": task.kind,
            "metric": task.metric,
            "metrics": {m: {"scores": [v], "mean": v, "std": 0.0} for m, v in scores.items()},
            "mean": scores[task.metric],
            "std": 0.0,
            "guess": guess,
        }
    return out


class LoadedModel(Protocol):
    """What `mm1.pretrained.load_pretrained` returns, as far as the suite needs it."""

    model: MLLM
    tokenizer: Tokenizer
    processor: Any
    prompt_format: PromptFormat
    runtime: dict[str, str]  # where and in what precision it runs


def run_suite(
    loaded: LoadedModel,
    model_dir: str | Path,
    suite: str,
    *,
    world: str | Path | None = None,
    mode: str = "auto",
    seeds: int = 3,
    max_examples: int = 0,
    shuffle_images: bool = False,
    batch_size: int = 16,
    name: str | None = None,
    out: str | Path | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """`mm1 eval MODEL --suite SUITE` on the model `loaded` from `model_dir`: SUITE is `sft`
    (the synthetic world's suite, written into `world` when missing) or a suite file; `mode`
    "auto" prompts a chat model zero-shot and a pre-trained one few-shot. Results and a report
    go to `out` (default MODEL/eval-suite)."""
    from mm1.config import ConfigError
    from mm1.data.sft_eval import ensure_sft_eval
    from mm1.eval.suite_report import write_suite_report

    if mode not in MODES:
        raise ConfigError(f"--suite-mode must be one of {', '.join(MODES)}, got {mode!r}")
    # Checked here too for API callers: seeds=0 would index an empty list of scores, and a
    # negative max_examples would slice off the last queries.
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds} must be >= 1")
    if max_examples < 0:
        raise ConfigError(f"--max-examples {max_examples} must be >= 0 (0 = every query)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")
    if suite == "sft":
        if world is None or not (Path(world) / "world.json").is_file():
            raise ConfigError(
                f"--suite sft needs the synthetic world; none at {world}: pass --world DIR, or "
                "a suite file of your own (--suite FILE)"
            )
        suite_path = ensure_sft_eval(world)
    else:
        suite_path = Path(suite)
    tasks = load_suite(suite_path)
    p = loaded
    chat = (
        is_chat_model(p.tokenizer, p.prompt_format, model_dir)
        if mode == "auto"
        else (mode == "chat")
    )
    results = evaluate_suite(
        p.model,
        p.tokenizer,
        p.processor,
        p.prompt_format,
        tasks,
        chat=chat,
        seeds=seeds,
        max_examples=max_examples,
        shuffle_images=shuffle_images,
        batch_size=batch_size,
        name=name or Path(model_dir).name,
        compile=compile,
    )
    results["suite"] = str(suite_path)
    results["runtime"] = p.runtime
    out_dir = Path(out or Path(model_dir) / "eval-suite")
    files = write_suite_report([results, prior_scores(tasks, max_examples)], out_dir)
    results["files"] = files
    return results
