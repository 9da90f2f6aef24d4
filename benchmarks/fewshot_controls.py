"""Controls that separate the explanations of a falling few-shot curve (docs/ablations.md, "The
demo's few-shot curve").

`python -m benchmarks.fewshot_controls MODEL --world DIR [--shots 0,1,2,4,6,8] [--queries 96]`
scores the world's synth_coco queries (greedy CIDEr, the evaluator's own decoding and
post-processing) and the teacher-forced loss of each query's reference caption, under:

- `default`: random demonstrations in the evaluator's format (`<image>Output:{caption}
  <|endofchunk|>` + newline), as `mm1 eval` (0 shots here is the plain query, no text demos);
- `shuffled_captions`: the same demonstration images, captions rotated by one across the
  demonstrations (content no longer matches its image; format, lengths and images unchanged);
- `same_kind`: demonstrations of the query's own scene kind (text-rich or shapes), else random;
- `train_format`: the gallery documents' own format, `<image>Output:{caption}` back to back,
  without `<|endofchunk|>` (a token no training row contains) nor newline;
- `text_demos`: the demonstrations' captions without their images (one image per prompt).

The loss is the mean per-token negative log-likelihood of the query's first reference caption
placed after the prompt (its tokens past the prompt's, the prompt encoded with the caption in
one call as in training). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mm1.data.tokenizer import IMAGE_TOKEN
from mm1.eval.demos import random_demos
from mm1.eval.fewshot import FewShotEvaluator
from mm1.eval.prompts import Prompt, encode_prompt
from mm1.eval.tasks import Example, Task, load_tasks

CONDITIONS = ("default", "shuffled_captions", "same_kind", "train_format", "text_demos")


def scene_kind(example: Example) -> str:
    """ "text" for the text-rich scenes (a word or number written on the card), else "shapes"."""
    return "text" if "written in" in example.target else "shapes"


def rotate_captions(demos: Sequence[Example]) -> list[Example]:
    """Each demonstration keeps its image but shows the next one's caption (k >= 2)."""
    if len(demos) < 2:
        return list(demos)
    caps = [d.target for d in demos]
    caps = caps[1:] + caps[:1]
    return [
        Example(d.id, d.image_id, d.image, d.references, c, d.question) for d, c in zip(demos, caps)
    ]


def same_kind_demos(support: Sequence[Example], query: Example, k: int, seed: int) -> list[Example]:
    """`k` support examples of the query's scene kind (never its image), reproducible."""
    pool = [s for s in support if scene_kind(s) == scene_kind(query) and s.image != query.image]
    if len(pool) < k:
        pool = [s for s in support if s.image != query.image]
    return random.Random(f"{seed}|same|{query.id}").sample(pool, k)


def prompt_text(condition: str, demos: Sequence[Example]) -> tuple[str, list[Path]]:
    """The demonstrations as text (without the query) and the images they show."""
    if condition == "train_format":
        return "".join(f"{IMAGE_TOKEN}Output:{d.target.strip()}" for d in demos), [
            d.image for d in demos
        ]
    if condition == "text_demos":
        return "".join(f"Output:{d.target.strip()}<|endofchunk|>\n" for d in demos), []
    text = "".join(f"{IMAGE_TOKEN}Output:{d.target.strip()}<|endofchunk|>\n" for d in demos)
    return text, [d.image for d in demos]


def demos_for(condition: str, task: Task, query: Example, k: int, seed: int) -> list[Example]:
    if k == 0:
        return []
    if condition == "same_kind":
        return same_kind_demos(task.support, query, k, seed)
    demos = random_demos(task.support, query, k, seed, f"{task.name}|{k}")
    return rotate_captions(demos) if condition == "shuffled_captions" else demos


@torch.no_grad()
def caption_nll(ev: FewShotEvaluator, prompt: Prompt, caption: str) -> tuple[float, int]:
    """(mean NLL per caption token, caption tokens) of `caption` after `prompt`."""
    model, tok = ev.model, ev.tokenizer
    full = encode_prompt(tok, prompt.text + caption.strip(), ev.prompt_format)
    n = len(prompt.input_ids)
    while n > 0 and full[:n] != prompt.input_ids[:n]:  # a merge across the boundary
        n -= 1
    ids = torch.tensor(full)[None]
    pixels = torch.stack([ev.pixels(p) for p in prompt.images]) if prompt.images else None
    embeds = model.embed(ids, pixels)
    pos = torch.arange(ids.shape[1])[None]
    logits = model.decoder(
        inputs_embeds=embeds, position_ids=pos, document_ids=torch.ones_like(pos)
    )
    logp = torch.log_softmax(logits[0, n - 1 : -1].float(), dim=-1)
    target = ids[0, n:]
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    return float(nll.mean()), int(target.numel())


def run_condition(
    ev: FewShotEvaluator,
    task: Task,
    queries: Sequence[Example],
    condition: str,
    k: int,
    seed: int,
    with_loss: bool,
    with_generation: bool = True,
) -> dict[str, Any]:
    prompts = []
    for q in queries:
        demos = demos_for(condition, task, q, k, seed)
        text, images = prompt_text(condition, demos)
        text += f"{IMAGE_TOKEN}Output:"
        images = [*images, q.image]
        prompts.append(Prompt(text, encode_prompt(ev.tokenizer, text, ev.prompt_format), images))
    lengths = [len(p.input_ids) for p in prompts]
    out: dict[str, Any] = {
        "prompt_tokens_mean": sum(lengths) / len(lengths),
        "prompt_tokens_max": max(lengths),
        "images": len(prompts[0].images),
    }
    if with_loss:
        nlls = [caption_nll(ev, p, q.target) for p, q in zip(prompts, queries)]
        out["caption_nll"] = sum(a * n for a, n in nlls) / sum(n for _, n in nlls)
        # per query: (prompt tokens, mean NLL, caption tokens), to split by position
        out["per_query"] = [[len(p.input_ids), a, n] for p, (a, n) in zip(prompts, nlls)]
    if not with_generation:
        return out
    preds: dict[str, str] = {}
    for start in range(0, len(prompts), ev.batch_size):
        batch = prompts[start : start + ev.batch_size]
        for q, (_, pred) in zip(queries[start:], ev.generate(batch, task.kind)):
            preds[q.id] = pred
    out["cider"], _ = task.score(preds, queries)
    return out


def main() -> None:
    from mm1.pretrained import load_pretrained

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--shots", default="0,1,2,4,6,8")
    ap.add_argument("--queries", type=int, default=96)
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-loss", action="store_true")
    ap.add_argument("--loss-only", action="store_true", help="no generation, no CIDEr")
    args = ap.parse_args()
    torch.set_num_threads(2)
    p = load_pretrained(args.model)
    p.model.eval()
    ev = FewShotEvaluator(
        p.model, p.tokenizer, p.processor, prompt_format=p.prompt_format, batch_size=16
    )
    (task,) = load_tasks(["synth_coco"], world=args.world)
    queries = list(task.query[: args.queries])
    results: dict[str, dict[str, Any]] = {}
    say: Callable[[str], None] = lambda s: print(s, flush=True)  # noqa: E731
    for condition in args.conditions.split(","):
        if condition not in CONDITIONS:
            raise SystemExit(f"--conditions: {condition!r} is not one of {CONDITIONS}")
        results[condition] = {}
        for k in (int(s) for s in args.shots.split(",")):
            if k == 0 and condition != "default":
                continue
            t0 = time.perf_counter()
            r = run_condition(
                ev, task, queries, condition, k, args.seed, not args.no_loss, not args.loss_only
            )
            results[condition][str(k)] = r
            say(f"# {condition} {k}-shot {json.dumps(r)} ({time.perf_counter() - t0:.0f}s)")
    print(json.dumps({"queries": len(queries), "seed": args.seed, "results": results}, indent=1))


if __name__ == "__main__":
    main()
