"""Few-shot evaluation: prompts with demonstrations, batched generation, scores over seeds.

The protocol is OpenFlamingo's (REFERENCE §1), which is the de-facto open one; MM1's own prompts
and demonstration selection are unpublished.

- Prompt: demonstrations then the query, each written with a template (`mm1.eval.prompts`).
- Demonstrations (`mm1.eval.demos`) from the task's support split: "random" (per query and seed)
  or "rices" (nearest to the query image by the cosine of the model's mean-pooled image tokens;
  most similar last, as OpenFlamingo). A demonstration never shows the query's image.
- Zero-shot: with `zero_shot_text_demos` (OpenFlamingo's default) the "0-shot" score uses two
  demonstrations with their images removed; the plain zero-shot score (query only) is reported
  alongside as `zero_shot_plain`.
- Decoding: greedy (`num_beams=1`) or beam search (`num_beams=3` is OpenFlamingo's); at most 20
  new tokens for captions and 5 for VQA; stops at `<|endofchunk|>`, EOS, or (trained with image
  boundaries) `<img>`. Greedy decoding can run its decode steps compiled (`eval.compile`).
- Post-processing: OpenFlamingo's cuts (stop string, new example; VQA also at
  "Question|Answer|Short" and ", "), stripped (`mm1.eval.prompts`).
- Scores: CIDEr-D ×100 (PTB-tokenized, over exactly the queries evaluated) and VQA accuracy ×100
  per seed, mean and std (ddof=0) over seeds, MM1's average over tasks per shot count (and all).
- Control: `shuffle_images=True` gives each query another query's image (a fixed derangement of
  the query images; same text, wrong image). A model that uses the image scores lower.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mm1.config import BAD_IMAGE_POLICIES, DEMO_SELECTIONS, ConfigError, EvalConfig, validate_eval
from mm1.data.images import ImageProcessor
from mm1.data.prompt_format import PromptFormat
from mm1.data.tokenizer import Tokenizer
from mm1.eval.demos import random_demos, rices_rank, shuffled_images, warn_if_rices_is_weak
from mm1.eval.images import CropCache, EvalImageError, PixelCache
from mm1.eval.metrics import mean_std
from mm1.eval.progress import FewShotProgress
from mm1.eval.prompts import (
    DEFAULT_STOP_STRINGS,
    Prompt,
    PromptTemplates,
    build_prompt,
    new_example_markers,
    postprocess,
)
from mm1.eval.ranks import EvalRanks, flatten
from mm1.eval.tasks import Example, Task, load_tasks
from mm1.models.generation import generate, generate_beam
from mm1.models.mllm import MLLM

DEFAULT_MAX_NEW_TOKENS = {"caption": 20, "vqa": 5}
ZERO_SHOT_TEXT_DEMOS = 2  # OpenFlamingo's "effective" number of shots for zero-shot


# ---------------------------------------------------------------------------------------------
# The evaluator
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def image_embeddings(
    model: MLLM,
    pixels: Callable[[Path], torch.Tensor],
    paths: Sequence[Path],
    batch_size: int = 32,
    bad: Callable[[Path], bool] | None = None,
) -> torch.Tensor:
    """(N, D) L2-normalised mean of each image's connector outputs (its image tokens); images
    for which `bad` is true get zeros (similar to nothing)."""
    device, dtype = _device_dtype(model)
    feats = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        ok = [p for p in chunk if bad is None or not bad(p)]
        out = torch.zeros(len(chunk), model.cfg.decoder.dim)
        if ok:
            batch = torch.stack([pixels(p) for p in ok])
            tokens = model.image_features(batch.to(device=device, dtype=dtype))
            index = torch.tensor([i for i, p in enumerate(chunk) if bad is None or not bad(p)])
            out[index] = tokens.float().mean(1).cpu()
        feats.append(out)
    if not feats:
        return torch.zeros(0, model.cfg.decoder.dim)
    return torch.nn.functional.normalize(torch.cat(feats), dim=-1)


def _device_dtype(model: MLLM) -> tuple[torch.device, torch.dtype]:
    return next(model.parameters()).device, next(model.parameters()).dtype  # any family


@dataclass
class _Run:
    task: Task
    shots: int  # demonstrations with images
    key: str  # "0", "4", "8", or "0_plain"
    seed: int | None
    text_demos: int = 0  # demonstrations without images (zero-shot)


class FewShotEvaluator:
    """Holds the model and the settings; `run(task, ...)` evaluates one configuration.
    `evaluate` below is the usual entry point."""

    def __init__(
        self,
        model: MLLM,
        tokenizer: Tokenizer,
        processor: ImageProcessor,
        *,
        templates: PromptTemplates | None = None,
        demo_selection: str = "random",
        num_beams: int = 1,
        length_penalty: float = 0.0,  # OpenFlamingo: summed log-probs
        max_new_tokens: int | dict[str, int] | None = None,
        stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
        batch_size: int = 8,
        shuffle_images: bool = False,
        prompt_format: PromptFormat | None = None,
        keep_prompts: bool = False,
        bad_images: str = "error",
        high_res_last: int = 0,
        compile: bool = False,
        ranks: EvalRanks | None = None,
    ) -> None:
        if tokenizer.image_id != model.image_token_id:
            raise ValueError(
                f"the tokenizer's <image> id {tokenizer.image_id} is not the model's image token "
                f"id {model.image_token_id}: this tokenizer does not belong to this model"
            )
        if demo_selection not in DEMO_SELECTIONS:
            raise ValueError(
                f"demo_selection must be one of {DEMO_SELECTIONS}, got {demo_selection!r}"
            )
        if batch_size < 1 or num_beams < 1:
            raise ValueError("batch_size and num_beams must be >= 1")
        if compile and num_beams > 1:
            raise ValueError("compile applies to greedy decoding (num_beams=1)")
        self.compile, self.ranks = compile, ranks or EvalRanks()
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.templates = templates or PromptTemplates()
        self.demo_selection = demo_selection
        self.num_beams, self.length_penalty = num_beams, length_penalty
        if max_new_tokens is None:
            max_new_tokens = dict(DEFAULT_MAX_NEW_TOKENS)
        elif isinstance(max_new_tokens, int):
            max_new_tokens = dict.fromkeys(DEFAULT_MAX_NEW_TOKENS, max_new_tokens)
        self.max_new_tokens = {**DEFAULT_MAX_NEW_TOKENS, **max_new_tokens}
        self.stop_strings = tuple(stop_strings)
        # Stop strings that are special tokens (decode drops them) stop by id; the rest by text.
        self.stop_ids = {tokenizer.eos_id}
        self.text_stops: list[str] = []
        for s in self.stop_strings:
            tid = tokenizer.token_to_id(s)
            if tid is not None and tokenizer.decode([tid]) == "":
                self.stop_ids.add(tid)
            else:
                self.text_stops.append(s)
        self.batch_size = batch_size
        self.shuffle_images = shuffle_images
        # As the model was trained (`Pretrained.prompt_format`); None: its slots, no boundaries.
        self.prompt_format = prompt_format or PromptFormat(model.num_image_tokens)
        if self.prompt_format.image_tokens != model.num_image_tokens:
            raise ValueError(
                f"the prompt format writes {self.prompt_format.image_tokens} slots per image "
                f"but the model fills {model.num_image_tokens}"
            )
        if self.prompt_format.image_boundaries:  # an answer an image follows ends at <img>
            self.stop_ids.add(tokenizer.boi_id)
        self.keep_prompts = keep_prompts
        self.pixels = PixelCache(processor)  # the single view (RICES features, decoding)
        # A tiled layout: each image's crops, tiled for a prompt's last `high_res_last` images.
        self.tiled = self.prompt_format.layout != PromptFormat.layout
        self.high_res_last = high_res_last
        self.crops = CropCache(processor, self.prompt_format)
        self._sizes: dict[Path, tuple[int, int]] = {}
        self._features: dict[Path, torch.Tensor] = {}
        # "error": a corrupt image stops the evaluation (skipping it would change CIDEr's
        # document frequencies for every other image); "empty": queries that show it score as
        # empty predictions, listed in the results.
        self.bad_images = bad_images
        self.bad: dict[Path, str] = {}  # undecodable image -> error, under "empty"

    def is_bad(self, path: Path) -> bool:
        """Whether `path` cannot be decoded; raises EvalImageError unless bad_images="empty"."""
        if path in self.bad:
            return True
        try:
            self.pixels(path)
        except EvalImageError as err:
            if self.bad_images != "empty":
                raise
            self.bad[path] = err.detail
            return True
        return False

    def image_size(self, path: Path) -> tuple[int, int]:
        """(width, height) of an image; (1, 1) for an undecodable one (its queries score empty
        without being shown)."""
        if path not in self._sizes:
            if self.is_bad(path):
                return (1, 1)
            with Image.open(path) as im:
                self._sizes[path] = im.size
        return self._sizes[path]

    # -- demonstrations -------------------------------------------------------------------------

    def features(self, paths: Sequence[Path]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(paths) if p not in self._features]
        if todo:
            feats = image_embeddings(self.model, self.pixels, todo, bad=self.is_bad)
            for p, f in zip(todo, feats):
                self._features[p] = f
        return torch.stack([self._features[p] for p in paths])

    def select_demos(
        self,
        task: Task,
        queries: Sequence[Example],
        shown: Sequence[Path],
        k: int,
        seed: int,
        key: str,
    ) -> list[list[Example]]:
        if k == 0:
            return [[] for _ in queries]
        if not task.support:
            raise ValueError(f"task {task.name!r} has no support split: only plain 0-shot can run")
        if self.demo_selection == "random":
            counts = Counter(s.image for s in task.support)
            return [
                random_demos(task.support, q, k, seed, f"{task.name}|{key}", (img,), counts)
                for q, img in zip(queries, shown)
            ]
        # RICES: by the image the query is shown (so the shuffled control stays a control)
        support_images = [s.image for s in task.support]
        by_image: dict[Path, set[int]] = {}
        for i, p in enumerate(support_images):
            by_image.setdefault(p, set()).add(i)
        exclude = [
            by_image.get(q.image, set()) | by_image.get(img, set())
            for q, img in zip(queries, shown)
        ]
        ranks = rices_rank(self.features(list(shown)), self.features(support_images), k, exclude)
        return [[task.support[i] for i in row] for row in ranks]

    # -- generation -----------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Prompt], kind: str, max_new_tokens: int | None = None
    ) -> list[tuple[str, str]]:
        """(raw decoded text, post-processed prediction) per prompt, one batch;
        `max_new_tokens` (a task's own limit) overrides the evaluator's for the kind."""
        device, dtype = _device_dtype(self.model)
        paths = [p for prompt in prompts for p in prompt.images]
        extra: dict[str, Any] = {}
        if self.tiled:
            flags = [
                hi for prompt in prompts for hi in prompt.high_res or [True] * len(prompt.images)
            ]
            items = [self.crops(p, hi) for p, hi in zip(paths, flags)]
            pixel_values = torch.cat([px for px, _ in items]).to(device=device, dtype=dtype)
            extra["image_crops"] = torch.tensor([px.shape[0] for px, _ in items])
            extra["image_sizes"] = torch.tensor([hw for _, hw in items]).reshape(-1, 2)
        else:
            pixels = [self.pixels(p) for p in paths]
            pixel_values = torch.stack(pixels).to(device=device, dtype=dtype)
        ids = [p.input_ids for p in prompts]
        common = {
            **extra,
            "max_new_tokens": max_new_tokens or self.max_new_tokens[kind],
            "eos_token_id": sorted(self.stop_ids),
            "pad_token_id": self.tokenizer.pad_id,
            "stop_strings": self.text_stops,
            "tokenizer": self.tokenizer,
        }
        if self.num_beams > 1:
            outs = generate_beam(
                self.model,
                ids,
                pixel_values,
                num_beams=self.num_beams,
                length_penalty=self.length_penalty,
                **common,
            )
        else:
            outs = generate(self.model, ids, pixel_values, compile=self.compile, **common)
        cuts = [*self.text_stops, *new_example_markers(self.templates, kind)]
        results = []
        for out in outs:
            end = next((i for i, t in enumerate(out) if t in self.stop_ids), len(out))
            raw = self.tokenizer.decode(out, skip_special_tokens=False)
            results.append((raw, postprocess(self.tokenizer.decode(out[:end]), kind, cuts)))
        return results

    def run(
        self,
        task: Task,
        queries: Sequence[Example],
        shots: int,
        seed: int,
        key: str,
        text_demos: int = 0,
        advance: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Evaluate `queries` of `task` with `shots` image demonstrations (or `text_demos`
        demonstrations without images); returns the score and the per-example records."""
        shown = list(self._shown(queries))
        n_demos = shots or text_demos
        demos = self.select_demos(task, queries, shown, n_demos, seed, key)
        prompts = [
            build_prompt(
                self.tokenizer,
                self.prompt_format,
                task.kind,
                d,
                q,
                templates=self.templates,
                text_only_demos=text_demos > 0 and shots == 0,
                query_image=img,
                image_size=self.image_size if self.tiled else None,
                high_res_last=self.high_res_last,
            )
            for q, img, d in zip(queries, shown, demos)
        ]
        # Per prompt: (raw, prediction) and the undecodable images it shows; this rank's
        # batches, then every rank's (`EvalRanks`).
        starts, own, error = range(0, len(prompts), self.batch_size), {}, None
        try:
            for b in self.ranks.mine(len(starts)):
                batch = prompts[starts[b] : starts[b] + self.batch_size]
                bad = [[str(p) for p in prompt.images if self.is_bad(p)] for prompt in batch]
                good = [prompt for prompt, x in zip(batch, bad) if not x]
                made = iter(self.generate(good, task.kind, task.max_new_tokens) if good else [])
                own[b] = [(("", "") if x else next(made), x) for x in bad]
                if advance is not None:
                    advance(len(batch))
        except Exception as err:  # raised on every rank, not only this one
            error = err
        done = flatten(self.ranks.gather(own, error), range(len(starts)))
        outputs, bad_in = [out for out, _ in done], [x for _, x in done]
        predictions = {q.id: pred for q, (_, pred) in zip(queries, outputs)}
        score, per_example = task.score(predictions, queries)
        records = []
        for q, img, d, prompt, (raw, pred), bad in zip(
            queries, shown, demos, prompts, outputs, bad_in
        ):
            rec = {
                "id": q.id,
                "image_id": q.image_id,
                "image": str(img),
                "query_image": str(q.image),
                "question": q.question,
                "prediction": pred,
                "raw": raw,
                "references": list(q.references),
                "demos": [e.id for e in d],
                "prompt_tokens": len(prompt.input_ids),
                "score": per_example[q.id],
            }
            if self.keep_prompts:
                rec["prompt"] = prompt.text
            if bad:
                rec["bad_images"] = bad  # scored as an empty prediction
            records.append(rec)
        return {"score": score, "records": records, "empty": sum(1 for b in bad_in if b)}

    def _shown(self, queries: Sequence[Example]) -> list[Path]:
        if not self.shuffle_images:
            return [q.image for q in queries]
        mapping = shuffled_images(queries)
        return [mapping[q.id] for q in queries]


def check_shots(
    tasks: Sequence[Task], shots: Sequence[int], max_examples: int | None, option: str
) -> None:
    """Refuse, before any generation, a shot count that some query of a task cannot get that
    many demonstrations for (a demonstration never shows the query's image): a one-line
    `ConfigError` naming `option`, how the user gave the shots (`--shots 1000`)."""
    k = max(shots, default=0)
    for task in tasks if k > 0 else []:
        if not task.support:
            continue  # no support split at all: `evaluate` says so
        counts = Counter(s.image for s in task.support)
        queries = task.query[:max_examples] if max_examples else task.query
        fewest = len(task.support) - max((counts.get(q.image, 0) for q in queries), default=0)
        if fewest < k:
            raise ConfigError(
                f"{option}: {k}-shot needs {k} demonstrations per query, but task {task.name!r} "
                f"has only {fewest} in its support split (with images other than the query's); "
                f"ask for at most {fewest}"
            )


def evaluate(
    model: MLLM,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    cfg: EvalConfig | None = None,
    *,
    tasks: Sequence[str | Task | Any] | None = None,
    world: str | Path | None = None,
    templates: PromptTemplates | None = None,
    prompt_format: PromptFormat | None = None,
    stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
    keep_prompts: bool = False,
    progress: bool = True,
    name: str | None = None,
    ranks: EvalRanks | None = None,
) -> dict[str, Any]:
    """Few-shot scores of `model` under the protocol `cfg` (a config's `eval` section; the
    defaults when None) at each shot count and seed; with `ranks`, this process's share of the
    generation under torchrun (every rank returns the same results).

    `tasks` (names, `TaskSpec`s or loaded `Task`s) replaces `cfg.tasks`; the synthetic
    `synth_coco` / `synth_vqa` need `world`. Seeds are 0..cfg.seeds-1; with
    `demo_selection="rices"` demonstrations do not depend on the seed, so only the first seed
    runs. `max_examples` evaluates only the first N queries of each task (and says so in the
    results: `subset`, `num_queries`); CIDEr is then computed over exactly those. `num_beams=1`
    is greedy decoding, 3 is OpenFlamingo's beam search. `prompt_format` must be how the
    model was trained (`Pretrained.prompt_format`: its image slots and boundaries; None: the
    model's slots without boundaries). An image that cannot be decoded stops the
    evaluation with `EvalImageError` naming it, unless `bad_images="empty"`: then every query
    whose prompt shows it scores as an empty prediction (`bad_images` and `empty_predictions`
    in the results say which and how many).

    Returns a JSON-serialisable dict: `tasks[name]["shots"][str(k)]` holds `scores` (one per
    seed), `seeds`, `mean`, `std`; `tasks[name]["zero_shot_plain"]` the zero-shot score without
    text demonstrations; `average[str(k)]` the mean over tasks per shot count and
    `average["overall"]` over all; `predictions[name][str(k)][str(seed)]` the per-example
    records (prediction, references, demonstration ids, shown image, score).
    """
    cfg = cfg or EvalConfig()
    validate_eval(cfg)
    seeds = list(range(cfg.seeds))
    shots = sorted(set(int(s) for s in cfg.shots))
    max_examples = cfg.max_examples or None
    demo_selection, zero_shot_text_demos = cfg.demo_selection, cfg.zero_shot_text_demos
    warn_if_rices_is_weak(model, demo_selection)
    evaluator = FewShotEvaluator(
        model,
        tokenizer,
        processor,
        templates=templates,
        demo_selection=demo_selection,
        num_beams=cfg.num_beams,
        length_penalty=cfg.length_penalty,
        max_new_tokens={"caption": cfg.max_new_tokens, "vqa": cfg.vqa_max_new_tokens},
        stop_strings=stop_strings,
        batch_size=cfg.batch_size,
        shuffle_images=cfg.shuffle_images,
        prompt_format=prompt_format,
        keep_prompts=keep_prompts,
        bad_images=cfg.bad_images,
        high_res_last=cfg.high_res_last,
        compile=cfg.compile,
        ranks=ranks,
    )
    loaded = load_tasks(list(cfg.tasks if tasks is None else tasks), world=world)
    names = [t.name for t in loaded]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be distinct, got {names}")
    check_shots(loaded, shots, max_examples, "eval.shots")
    run_seeds = seeds[:1] if demo_selection == "rices" else seeds

    runs: list[_Run] = []
    for task in loaded:
        for k in shots:
            if k > 0 or (zero_shot_text_demos and task.support):
                if not task.support:
                    raise ValueError(f"task {task.name!r} has no support split for {k}-shot")
                text = ZERO_SHOT_TEXT_DEMOS if k == 0 else 0
                runs += [_Run(task, k, str(k), s, text) for s in run_seeds]
            if k == 0:  # plain zero-shot: no demonstrations, nothing depends on the seed
                runs.append(_Run(task, 0, "0_plain", None))

    queries = {t.name: t.query[:max_examples] if max_examples else list(t.query) for t in loaded}
    generations = sum(len(queries[r.task.name]) for r in runs)  # by every rank together
    total = sum(evaluator.ranks.share(len(queries[r.task.name]), cfg.batch_size) for r in runs)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    outcomes: dict[tuple[str, str], dict[str | None, dict[str, Any]]] = {}
    try:
        with FewShotProgress(progress and evaluator.ranks.is_main, total) as advance_to:
            for r in runs:
                label = f"{r.task.name} {r.key}-shot" + (
                    "" if r.seed is None else f" seed {r.seed}"
                )
                out = evaluator.run(
                    r.task,
                    queries[r.task.name],
                    r.shots,
                    0 if r.seed is None else r.seed,
                    r.key,
                    r.text_demos,
                    advance=lambda n, label=label: advance_to(n, label),
                )
                outcomes.setdefault((r.task.name, r.key), {})[
                    None if r.seed is None else str(r.seed)
                ] = out
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start

    results: dict[str, Any] = {
        "name": name or "mm1",
        "config": {
            "shots": shots,
            "seeds": run_seeds,
            "demo_selection": demo_selection,
            "zero_shot_text_demos": zero_shot_text_demos,
            "zero_shot_text_demo_count": ZERO_SHOT_TEXT_DEMOS if zero_shot_text_demos else 0,
            "decoding": "greedy" if cfg.num_beams == 1 else f"beam search ({cfg.num_beams} beams)",
            "num_beams": cfg.num_beams,
            "length_penalty": cfg.length_penalty,
            "max_new_tokens": evaluator.max_new_tokens,
            "stop_strings": list(stop_strings),
            "templates": asdict(evaluator.templates),
            "batch_size": cfg.batch_size,
            "max_examples": max_examples,
            "shuffle_images": cfg.shuffle_images,
            "image_boundaries": evaluator.prompt_format.image_boundaries,
            "num_image_tokens": model.num_image_tokens,
            "prompt_format": evaluator.prompt_format.to_dict(),
            "std": "population standard deviation over seeds (ddof=0)",
            "bad_images": cfg.bad_images,
        },
        "bad_images": {str(p): why for p, why in evaluator.bad.items()},
        "tasks": {},
        "average": {},
        "predictions": {},
        "timing": {
            "seconds": seconds,
            "generations": generations,
            "examples_per_s": generations / seconds if seconds > 0 else None,
        },
    }
    for task in loaded:
        q = queries[task.name]
        entry: dict[str, Any] = {
            "kind": task.kind,
            "metric": task.metric,
            "max_new_tokens": task.max_new_tokens or evaluator.max_new_tokens[task.kind],
            "num_queries": len(q),
            "total_queries": len(task.query),
            "subset": len(q) < len(task.query),
            "shots": {},
            "zero_shot_plain": None,
        }
        preds: dict[str, dict[str, list]] = {}
        for k in shots:
            key = str(k)
            if (task.name, key) in outcomes:
                per_seed = outcomes[(task.name, key)]
            else:  # plain zero-shot is the 0-shot score when there are no text demonstrations
                per_seed = {str(s): outcomes[(task.name, "0_plain")][None] for s in run_seeds[:1]}
            scores = [per_seed[s]["score"] for s in per_seed]
            mean, std = mean_std(scores)
            entry["shots"][key] = {
                "scores": scores,
                "seeds": [int(s) for s in per_seed],
                "mean": mean,
                "std": std,
                "text_demos": (task.name, key) in outcomes and k == 0,
                "empty_predictions": [per_seed[s]["empty"] for s in per_seed],
            }
            preds[key] = {s: o["records"] for s, o in per_seed.items()}
        if (task.name, "0_plain") in outcomes:
            plain = outcomes[(task.name, "0_plain")][None]
            entry["zero_shot_plain"] = {
                "scores": [plain["score"]],
                "mean": plain["score"],
                "std": 0.0,
                "empty_predictions": [plain["empty"]],
            }
            preds["0_plain"] = {"-": plain["records"]}
        results["tasks"][task.name] = entry
        results["predictions"][task.name] = preds
    for k in shots:
        results["average"][str(k)] = sum(
            results["tasks"][t]["shots"][str(k)]["mean"] for t in names
        ) / len(names)
    per_shot = [results["average"][str(k)] for k in shots]
    results["average"]["overall"] = sum(per_shot) / len(per_shot)
    return results
