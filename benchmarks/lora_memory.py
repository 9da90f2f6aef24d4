"""Memory and step time of fine-tuning the decoder fully, through LoRA adapters, and through
QLoRA's (adapters over NF4 weights), on one model: a Llama decoder of `--dim` x `--layers`
(~175M parameters by default) behind a small ViT, as the trainer sets each one up
(`add_decoder_lora`, `set_trainable`, `build_optimizer`). Each variant runs in a fresh child
process `--steps` AdamW steps on random tokens and reports:

  tensors MiB      what the model, its gradients and the optimizer's state hold (counted)
  held MiB         the process's anonymous memory after the steps, less what it held before
                   building the model (malloc_trim'd first: what it keeps, not what it cached)
  peak MiB         the largest anonymous memory on the way (building the full-precision model,
                   which QLoRA quantizes after, is part of it)
  step s           median step time (one thread; compare the variants, not the absolute)

    python -m benchmarks.lora_memory                  # ~175M-parameter decoder
    python -m benchmarks.lora_memory --layers 2       # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import TYPE_CHECKING

from benchmarks.common import (
    AnonPeak,
    emit,
    print_table,
    ratio,
    run_child,
    set_threads,
    status_mib,
    trim_heap,
    write_result,
)

if TYPE_CHECKING:
    from mm1.config import ModelConfig

VARIANTS = {"full": (0, "none"), "lora": (16, "none"), "qlora": (16, "nf4")}


def model_config(dim: int, layers: int) -> ModelConfig:
    """A Llama decoder of `dim` x `layers` (32k vocabulary) behind a small ViT."""
    from mm1.config import model_config_from_dict

    return model_config_from_dict(
        {
            "vision": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 2, "heads": 4},
            "connector": {"type": "avgpool", "num_tokens": 16},
            "decoder": {
                "vocab_size": 32000,
                "dim": dim,
                "layers": layers,
                "heads": dim // 64,
                "kv_heads": dim // 64,
                "ffn_dim": int(dim * 8 / 3) // 64 * 64,
            },
            "image_token_id": 31999,
        }
    )


def child(variant: str, dim: int, layers: int, steps: int, seq: int) -> None:
    import torch

    from mm1.config import LoRAConfig, OptimConfig, TrainConfig
    from mm1.models.lora import add_decoder_lora
    from mm1.models.mllm import MM1
    from mm1.models.nf4 import torchao_nf4
    from mm1.train.optim import build_optimizer, set_trainable

    torchao_nf4()  # every variant imports it before measuring: its modules are not the weights'
    threads = set_threads()
    rank, quantize = VARIANTS[variant]
    trim_heap()
    with AnonPeak(every_s=0.005) as anon:
        before = anon.start
        cfg = model_config(dim, layers)
        torch.manual_seed(0)
        model = MM1(cfg)
        train = TrainConfig(lora=LoRAConfig(rank=rank, alpha=2.0 * rank or 16.0, quantize=quantize))
        train.train_vision = False
        if rank:
            add_decoder_lora(model, train.lora)
        set_trainable(model, train)
        optimizer, _ = build_optimizer(model, OptimConfig(lr=1e-4), 1e-4, steps)
        trim_heap()
        prepared = status_mib("RssAnon") - before
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 31000, (2, seq), generator=g)
        times = []
        model.train()
        for _ in range(steps):
            start = time.perf_counter()
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # gradients held, as between a trainer's steps
            times.append(time.perf_counter() - start)
        trim_heap()
        held = status_mib("RssAnon") - before
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    weights = sum(t.nbytes for t in tensors.values())
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    state = sum(
        v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    )
    decoder = sum(p.numel() for p in model.decoder.parameters()) + sum(
        int(b.prod()) for n, b in model.decoder.named_buffers() if n.endswith(".nf4.shape")
    )
    emit(
        {
            "variant": variant,
            "threads": threads,
            "decoder_params": decoder,
            "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "weights_mib": weights / 2**20,
            "grads_mib": grads / 2**20,
            "optimizer_mib": state / 2**20,
            "tensors_mib": (weights + grads + state) / 2**20,
            "prepared_mib": prepared,
            "held_mib": held,
            "peak_mib": anon.added,
            "step_s": statistics.median(times[1:] or times),
            "losses": [float(loss)],
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.dim, args.layers, args.steps, args.seq)
    results = [
        run_child("benchmarks.lora_memory", ["--child", v, *_flags(args)], 1800) for v in VARIANTS
    ]
    full = results[0]
    rows = [
        [
            r["variant"],
            r["trained_params"],
            r["weights_mib"],
            r["tensors_mib"],
            r["held_mib"],
            r["peak_mib"],
            r["step_s"],
            ratio(r["step_s"], full["step_s"]),
        ]
        for r in results
    ]
    print_table(
        f"Fine-tuning a {full['decoder_params'] / 1e6:.0f}M-parameter decoder "
        f"({args.steps} steps of 2 x {args.seq} tokens, one child process each)",
        [
            "variant",
            "trained",
            "weights MiB",
            "tensors MiB",
            "held MiB",
            "peak MiB",
            "step s",
            "/ full",
        ],
        rows,
    )
    path = write_result("lora_memory", {**vars(args), "variants": results})
    print(f"wrote {path}", file=sys.stderr)


def _flags(args: argparse.Namespace) -> list[str]:
    return [
        f"--dim={args.dim}",
        f"--layers={args.layers}",
        f"--steps={args.steps}",
        f"--seq={args.seq}",
    ]


if __name__ == "__main__":
    main()
