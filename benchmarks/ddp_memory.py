"""Memory of a DDP training process: gradients as views of DDP's all-reduce buckets (what
`mm1.train.parallel.parallelize` sets) against DDP's default, which keeps the buckets beside
the gradients. Two gloo processes train a Llama decoder of `--dim` x `--layers` (the model of
`benchmarks.lora_memory`) for `--steps` AdamW steps; the first process reports:

  tensors MiB   its weights, gradients and AdamW state at an optimizer step (counted)
  peak MiB      the largest anonymous memory on the way, less what it held before building
                the model: the figure that decides whether a run fits
  held MiB      its anonymous memory between steps (gradients set to None, malloc_trim'd):
                the same in both, as the buckets outlive the gradients that viewed them

    python -m benchmarks.ddp_memory              # a 134M-parameter decoder
    python -m benchmarks.ddp_memory --layers 2   # quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    AnonPeak,
    emit,
    print_table,
    run_child,
    status_mib,
    trim_heap,
    write_result,
)
from benchmarks.lora_memory import model_config

VARIANTS = ("default_copy", "bucket_views")


def _rank(rank: int, root: str, variant: str, dim: int, layers: int, steps: int) -> None:
    import torch
    import torch.distributed as dist

    from mm1.config import OptimConfig, TrainConfig
    from mm1.models.mllm import MM1
    from mm1.train.optim import build_optimizer
    from mm1.train.parallel import Dist, parallelize

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
    trim_heap()
    with AnonPeak() as anon:
        torch.manual_seed(0)
        model = MM1(model_config(dim, layers))
        model.vision.requires_grad_(False)
        if variant == "bucket_views":
            ddp = parallelize(model, TrainConfig(parallel="ddp"), Dist(rank, 2, rank))
        else:
            ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer, _ = build_optimizer(model, OptimConfig(lr=1e-4), 1e-4, steps)
        ids = torch.randint(0, 31000, (2, 128), generator=torch.Generator().manual_seed(rank))
        for _ in range(steps):
            ddp(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # as the trainer does
        trim_heap()
        held = status_mib("RssAnon") - anon.start
    trained = [p for p in model.parameters() if p.requires_grad]
    weights = sum(t.nbytes for t in {id(t): t for t in model.parameters()}.values())
    grads = sum(p.nbytes for p in trained)  # held again by the next backward
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values())
    if rank == 0:
        out = {
            "variant": variant,
            "trained_params": sum(p.numel() for p in trained),
            "grads_mib": grads / 2**20,
            "tensors_mib": (weights + grads + state) / 2**20,
            "peak_mib": anon.added,
            "held_mib": held,
        }
        (Path(root) / "rank0.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def child(variant: str, dim: int, layers: int, steps: int) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as root:
        mp.spawn(_rank, args=(root, variant, dim, layers, steps), nprocs=2)
        emit(json.loads((Path(root) / "rank0.json").read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    shape = [str(args.dim), str(args.layers), str(args.steps)]
    results = {v: run_child("benchmarks.ddp_memory", ["--child", v, *shape]) for v in VARIANTS}
    keys = ("trained_params", "grads_mib", "tensors_mib", "peak_mib", "held_mib")
    rows = [[v, *(results[v][k] for k in keys)] for v in VARIANTS]
    print_table("DDP process memory (MiB; the first of 2 processes)", ["variant", *keys], rows)
    saved = results["default_copy"]["peak_mib"] - results["bucket_views"]["peak_mib"]
    print(f"bucket views peak {saved:.0f} MiB lower; the gradients are {rows[0][2]:.0f} MiB")
    write_result("ddp_memory", {"args": vars(args), "results": results, "peak_saved_mib": saved})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], *map(int, sys.argv[3:6]))
    else:
        main()
