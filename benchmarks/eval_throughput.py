"""Few-shot evaluation throughput: 8-shot VQA on the synthetic world, batched against unbatched.

Both settings evaluate the same queries with the same demonstrations (random, seed 0) in the same
process, after a short warm-up, with a tiny randomly initialised model (no training needed: the
cost of evaluation does not depend on the weights). Reports examples/s per batch size, the
speed-up, and how many predictions (the raw decoded texts) agree between batch sizes (greedy
decoding of a left-padded batch should give the unbatched answers).

    python -m benchmarks.eval_throughput --out runs/bench/eval_throughput.json
    python -m benchmarks.eval_throughput --compile   # each batch size also with eval.compile

With `--compile` every batch size runs again with its decode steps compiled (`eval.compile`;
the compilation happens in the warm-up), and its predictions are compared with the same batch
size's eager ones.

Runs in well under a minute on 2 CPU cores (writing the tiny world takes ~2-4 s of it).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from mm1.config import ConnectorConfig, DecoderConfig, ModelConfig, VisionConfig, validate_model
from mm1.data.images import ImageProcessor
from mm1.data.synthetic import write_world
from mm1.data.tokenizer import Tokenizer
from mm1.eval.fewshot import FewShotEvaluator
from mm1.eval.tasks import load_task
from mm1.models.mllm import MM1


def tiny_model(tok: Tokenizer, image_size: int, dim: int, layers: int, tokens: int) -> MM1:
    cfg = ModelConfig(
        vision=VisionConfig(
            image_size=image_size,
            patch_size=8,
            width=64,
            layers=2,
            heads=2,
            mlp_dim=128,
            act="gelu",
        ),
        connector=ConnectorConfig(type="avgpool", num_tokens=tokens),
        decoder=DecoderConfig(
            vocab_size=tok.vocab_size,
            dim=dim,
            layers=layers,
            heads=4,
            kv_heads=2,
            ffn_dim=4 * dim,
            max_seq_len=2048,
        ),
        image_token_id=tok.image_id,
    )
    validate_model(cfg)
    torch.manual_seed(0)
    return MM1(cfg).eval()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=Path, help="synthetic world dir (default: write a tiny one)")
    ap.add_argument("--examples", type=int, default=32, help="VQA queries evaluated per setting")
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated, e.g. 1,8")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--dim", type=int, default=64, help="decoder width")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers")
    ap.add_argument("--image-tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--compile", action="store_true", help="also run each batch size compiled")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        world = args.world
        if world is None:
            world = Path(tmp) / "world"
            write_world(world, seed=0, size="tiny")
        task = load_task("synth_vqa", world=world)
        tok = Tokenizer.from_file(world / "tokenizer.json")
        model = tiny_model(tok, args.image_size, args.dim, args.layers, args.image_tokens)
        proc = ImageProcessor.clip(args.image_size)
        queries = task.query[: args.examples]

        rows, predictions = [], {}
        settings = [(bs, False) for bs in batch_sizes]
        settings += [(bs, True) for bs in batch_sizes] if args.compile else []
        for bs, compiled in settings:
            ev = FewShotEvaluator(model, tok, proc, batch_size=bs, compile=compiled)
            start = time.perf_counter()
            ev.run(task, queries[: max(bs, 4)], args.shots, seed=0, key=str(args.shots))  # warm-up
            warmup = time.perf_counter() - start
            start = time.perf_counter()
            out = ev.run(task, queries, args.shots, seed=0, key=str(args.shots))
            seconds = time.perf_counter() - start
            # the raw decoded text: an untrained model's post-processed answers are mostly empty
            predictions[bs, compiled] = [r["raw"] for r in out["records"]]
            prompt_tokens = [r["prompt_tokens"] for r in out["records"]]
            rows.append(
                {
                    "batch_size": bs,
                    "compile": compiled,
                    "seconds": seconds,
                    "warmup_seconds": warmup,
                    "examples_per_s": len(queries) / seconds,
                    "vqa_accuracy": out["score"],
                }
            )

    def same(a: list[str], b: list[str]) -> float:
        return sum(x == y for x, y in zip(a, b)) / len(queries)

    base = rows[0]
    for r in rows:
        r["speedup_vs_first"] = r["examples_per_s"] / base["examples_per_s"]
        mine = predictions[r["batch_size"], r["compile"]]
        r["same_predictions_as_first"] = same(mine, predictions[base["batch_size"], False])
        if r["compile"]:
            eager = next(e for e in rows if e["batch_size"] == r["batch_size"] and not e["compile"])
            r["speedup_vs_eager"] = r["examples_per_s"] / eager["examples_per_s"]
            r["same_predictions_as_eager"] = same(mine, predictions[r["batch_size"], False])
    result = {
        "benchmark": "eval_throughput",
        "task": "synth_vqa (synthetic world, tiny)",
        "shots": args.shots,
        "examples": len(queries),
        "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens),
        "max_new_tokens": 5,
        "decoding": "greedy",
        "model": {
            "image_size": args.image_size,
            "image_tokens": args.image_tokens,
            "decoder_dim": args.dim,
            "decoder_layers": args.layers,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "results": rows,
    }
    _print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{result['shots']}-shot VQA evaluation throughput, {result['examples']} queries "
        f"(prompts of {result['prompt_tokens_mean']:.0f} tokens on average), "
        f"{result['torch_threads']} torch threads"
    )
    cols = ("batch size", "seconds", "examples/s", "speed-up", "same predictions", "VQA acc")
    for col in (*cols, "compiled / eager", "same as eager"):
        table.add_column(col, justify="right")
    for r in result["results"]:
        compiled = r["compile"]
        table.add_row(
            f"{r['batch_size']}{' compiled' if compiled else ''}",
            f"{r['seconds']:.2f}",
            f"{r['examples_per_s']:.1f}",
            f"{r['speedup_vs_first']:.2f}x",
            f"{100 * r['same_predictions_as_first']:.0f}%",
            f"{r['vqa_accuracy']:.2f}",
            f"{r['speedup_vs_eager']:.2f}x" if compiled else "-",
            f"{100 * r['same_predictions_as_eager']:.0f}%" if compiled else "-",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
