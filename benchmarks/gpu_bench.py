"""GPU benchmark of the MM1 ablation model: tokens/s, MFU and memory of one training step.

Run by `benchmarks/gpu.sh` under `torchrun --nproc_per_node 1`, one variant per process:

    eager       FSDP2 (mm1's `parallelize`), bf16, the default `attention: auto` (at 4096
                tokens: causal SDPA over length-grouped documents)
    compile     the same with `torch.compile` per block (train.compile=true)
    flex        the eager variant with `model.decoder.attention=flex`: FlexAttention with a
                document block mask (compiled)
    attention   attention alone at the decoder's shapes: SDPA with mm1's additive document mask
                (`attention: sdpa`), length-grouped causal SDPA (`varlen`), FlexAttention with
                a document BlockMask, causal SDPA over the whole row (cost reference)

Needs torch and the mm1 sources only (PYTHONPATH=src): it imports `mm1.config` (omegaconf +
PyYAML, installed by gpu.sh from benchmarks/wheels/), `mm1.models` and `mm1.train.parallel`/
`optim`, never the data stack; batches are synthetic packed rows built as tensors
(`benchmarks.synthetic_batch`). MFU = model FLOPs/s / 989e12 (H100 / H200 SXM dense bf16), FLOPs from
`mm1.models.summary.summarize`: decoder only, and decoder + encoder + connector; attention
FLOPs counted at each packed document's length (`mfu_*`), and at the row's length beside it
(`mfu_*_row_attention`, torchtitan's convention for unpacked rows).
`--cpu-smoke` runs the same code path on the CPU with the tiny preset (gloo, fp32).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "src" / "mm1" / "configs" / "models"


def write(out_dir: Path, variant: str, payload: dict[str, Any], quiet: bool = False) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{variant}.json"
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    path.write_text(json.dumps({"variant": variant, "environment": env, **payload}, indent=2))
    if not quiet:
        print(json.dumps({"variant": variant, **payload}), flush=True)
    return path


def model_config(smoke: bool):
    from mm1.config import load_config

    cfg = load_config(CONFIGS / ("tiny.yaml" if smoke else "ablation.yaml")).model
    cfg.decoder.max_seq_len = max(cfg.decoder.max_seq_len, 4096)
    return cfg


# Peak memory of the eager variant on the H200 (2026-12-04), 4,096-token rows with 14 images:
# 39.2 GiB at 1 row, 59.1 GiB at 2, so about 19.3 GiB fixed (weights, gradients, AdamW state)
# and 19.9 GiB per row; compile and flex took less.
FIXED_GIB, ROW_GIB_AT_4096 = 19.3, 19.9


def rows_that_fit(total_gib: float, seq_len: int, most: int = 4) -> int:
    """The most packed rows (up to `most`) whose predicted peak stays within 90% of a device of
    `total_gib`: 4 on an H200 (141 GB), 2 on an H100 (80 GB), where 4 rows would need 99 GiB."""
    per_row = ROW_GIB_AT_4096 * seq_len / 4096
    fits = [rows for rows in range(1, most + 1) if FIXED_GIB + per_row * rows <= 0.9 * total_gib]
    return max(fits, default=1)


def train_with_fallback(args, **variant: Any) -> dict[str, Any]:
    """`train_variant`, at half the rows after running out of memory (down to one row): the
    prediction behind the default micro-batch is from one device, and a variant that dies
    measures nothing."""
    import torch.distributed as dist

    too_many: list[int] = []
    while True:
        try:
            return train_variant(args, **variant) | {"micro_batch_out_of_memory": too_many}
        except torch.OutOfMemoryError:
            if args.micro_batch == 1:
                raise
            too_many.append(args.micro_batch)
        # Outside the handler: the failed attempt's model and optimizer are garbage by now.
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.cuda.empty_cache()
        print(f"out of memory at micro-batch {too_many[-1]}; trying half", flush=True)
        args.micro_batch //= 2


def train_variant(args, compile_blocks: bool, attention: str = "auto") -> dict[str, Any]:
    import torch.distributed as dist

    from benchmarks.synthetic_batch import packed_batch, to_device
    from mm1.config import OptimConfig, TrainConfig
    from mm1.models.mllm import MM1
    from mm1.models.summary import summarize
    from mm1.train.hardware import H100_SXM_BF16_PEAK, bf16_peak_flops
    from mm1.train.optim import build_optimizer
    from mm1.train.parallel import Dist, parallelize

    smoke = args.cpu_smoke
    device = torch.device("cpu") if smoke else torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if not smoke:
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if smoke else "nccl")

    class OneRankFSDP(Dist):
        # mm1's `parallelize` applies FSDP2 only when world_size > 1; here the point is to
        # measure the FSDP2 path on one GPU, so it is told the group is enabled.
        @property
        def enabled(self) -> bool:
            return True

    cfg = model_config(smoke)
    cfg.decoder.attention = attention
    seq_len = args.seq_len or (256 if smoke else 4096)
    images = args.images_per_seq if not smoke else 2
    if args.micro_batch == 0:  # the default: what the device holds
        total = 0.0 if smoke else torch.cuda.get_device_properties(device).total_memory / 2**30
        args.micro_batch = 4 if smoke else rows_that_fit(total, seq_len)
    tcfg = TrainConfig(
        parallel="fsdp",
        dtype="float32" if smoke else "bfloat16",
        compile=compile_blocks,
        activation_checkpointing=args.activation_checkpointing,
    )
    t0 = time.perf_counter()
    with torch.device(device):
        model = MM1(cfg)
    model = parallelize(model, tcfg, OneRankFSDP(0, 1, 0, device))
    opt, _ = build_optimizer(model, OptimConfig(), 1e-4, 1000)
    build_seconds = time.perf_counter() - t0
    batch = packed_batch(
        args.micro_batch,
        seq_len,
        images,
        cfg.num_image_tokens,
        cfg.vision.image_size,
        cfg.decoder.vocab_size,
        cfg.resolved_image_token_id,
        doc_len=args.doc_len,
    )
    doc_len = document_attention_length(batch["document_ids"])
    batch = to_device(batch, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not smoke)

    def step() -> float:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_seconds = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    if args.profile:
        profile_steps(step, device, Path(args.out) / f"profile_{args.variant}.txt")
    tokens = args.micro_batch * seq_len
    s = summarize(cfg, seq_len)
    # Attention FLOPs where attention really runs: within each packed document (the
    # row-length figure, torchtitan's convention for unpacked rows, is kept beside it).
    doc_attention = summarize(cfg, round(doc_len)).decoder_flops_per_token
    tok_s = tokens / median
    flops_dec = s.decoder_flops_per_token * tok_s
    flops_all = s.flops_per_token(images) * tok_s
    image_share = s.flops_per_token(images) - s.decoder_flops_per_token
    out = {
        "status": "ok",
        "model": "cpu smoke: tiny preset"
        if smoke
        else "ablation: ViT-L/14 336 + C-Abstractor 144 + 1.2B decoder",
        "parallel": "FSDP2 via mm1.train.parallel.parallelize, one rank",
        "compile": compile_blocks,
        "activation_checkpointing": args.activation_checkpointing,
        "dtype": "float32" if smoke else "bf16 (FSDP2 param_dtype + autocast)",
        "attention": (
            "FlexAttention, document block mask (compiled)"
            if attention == "flex"
            else f"attention: {attention} (length-grouped causal SDPA from 1024 tokens)"
        ),
        "micro_batch": args.micro_batch,
        "seq_len": seq_len,
        "images_per_seq": images,
        "doc_len": args.doc_len,
        "build_seconds": build_seconds,
        "warmup_steps": args.warmup,
        "warmup_seconds": warmup_seconds,
        "step_seconds": times,
        "median_step_seconds": median,
        "tokens_per_s": tok_s,
        "images_per_s": args.micro_batch * images / median,
        "loss": loss,
        "params": {"vision": s.vision, "connector": s.connector, "decoder": s.decoder},
        "flops_per_token_decoder": s.decoder_flops_per_token,
        "flops_per_token_with_encoder": s.flops_per_token(images),
        "document_attention_length": doc_len,
        "mfu_decoder_only": doc_attention * tok_s / H100_SXM_BF16_PEAK,
        "mfu_with_encoder": (doc_attention + image_share) * tok_s / H100_SXM_BF16_PEAK,
        "mfu_decoder_only_row_attention": flops_dec / H100_SXM_BF16_PEAK,
        "mfu_with_encoder_row_attention": flops_all / H100_SXM_BF16_PEAK,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        ),
        # MFU above is against the SXM parts' 989 TFLOP/s whatever the card; this card's own:
        "device_bf16_peak_flops": (
            bf16_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        ),
    }
    dist.destroy_process_group()
    return out


def profile_steps(step, device: torch.device, path: Path) -> None:
    """Top operators by device time (self CPU time on the CPU) over two steps."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=30) + "\n")


def document_attention_length(document_ids: torch.Tensor) -> float:
    """The sequence length at which row-length attention FLOPs equal those of attention within
    each packed document: sum over documents of len^2, over the tokens (FLOPs per token scale
    with the length attended over)."""
    total, square = 0, 0
    for row in document_ids:
        counts = torch.unique_consecutive(row, return_counts=True)[1].double()
        total += int(counts.sum())
        square += float((counts**2).sum())
    return square / total


def attention_variant(args) -> dict[str, Any]:
    """SDPA with mm1's additive document mask vs length-grouped causal SDPA vs FlexAttention
    with a document BlockMask."""
    import torch.nn.functional as F

    from mm1.models.decoder import additive_mask, attention_mask, document_groups, grouped_attention

    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    cfg = model_config(smoke)
    d = cfg.decoder
    heads, hd = d.heads, d.resolved_head_dim
    t = args.seq_len or (256 if smoke else 4096)
    doc_len = min(args.doc_len, t)
    dtype = torch.float32 if smoke else torch.bfloat16
    batch = args.micro_batch or 1  # one row, as in the first GPU run, unless asked
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, t, hd, generator=g).to(device, dtype).requires_grad_()
        for _ in range(3)
    )
    doc = (torch.arange(t, device=device) // doc_len).expand(batch, t)
    mask = additive_mask(attention_mask(doc, doc), q)

    def timed(fn, reps: int) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    def run_sdpa_mask():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

    def run_grouped():
        grouped_attention(q, k, v, document_groups(doc), False).sum().backward()

    def run_causal():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    reps = 3 if smoke else 20
    out: dict[str, Any] = {
        "status": "ok",
        "shape": {"batch": batch, "heads": heads, "head_dim": hd, "seq_len": t},
        "doc_len": doc_len,
        "dtype": str(dtype),
        "sdpa_dense_mask_ms": 1000 * timed(run_sdpa_mask, reps),
        "grouped_ms": 1000 * timed(run_grouped, reps),
        "sdpa_causal_row_ms": 1000 * timed(run_causal, reps),
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc1 = doc[0]

        def document_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc1[q_idx] == doc1[kv_idx])

        block = create_block_mask(document_causal, None, None, t, t, device=device.type)
        flex = torch.compile(flex_attention)

        def run_flex():
            flex(q, k, v, block_mask=block).sum().backward()

        out["flex_document_ms"] = 1000 * timed(run_flex, reps)
        out["sdpa_dense_over_flex"] = out["sdpa_dense_mask_ms"] / out["flex_document_ms"]
    except Exception as err:  # flex needs a working inductor backend for the device
        out["flex_document_ms"] = None
        out["flex_error"] = f"{type(err).__name__}: {err}"[:500]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", choices=("eager", "compile", "flex", "attention"))
    ap.add_argument("--out", help="default benchmarks/results/gpu (gpu-smoke with --cpu-smoke)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny preset on the CPU (gloo)")
    ap.add_argument("--seq-len", type=int, default=0, help="default 4096 (smoke: 256)")
    ap.add_argument(
        "--images-per-seq",
        type=int,
        default=14,
        help="images per packed row (the default world packs 13.7 per 4096 tokens at 144)",
    )
    ap.add_argument("--doc-len", type=int, default=512, help="tokens per packed document")
    # Default: as many rows as the device holds, up to 4 (`rows_that_fit`); the first GPU run
    # (2026-12-04) used 1 and was bound by per-step fixed costs.
    ap.add_argument(
        "--micro-batch",
        type=int,
        default=0,
        help="packed rows per step (training variants; default: up to 4, as memory allows) or "
        "batch of the attention variant (default 1)",
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--profile", action="store_true", help="write a torch.profiler table")
    args, _ = ap.parse_known_args()  # gpu.sh passes the same extra flags to every variant
    if args.cpu_smoke:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
        torch.set_num_threads(int(os.environ.get("MM1_BENCH_THREADS", "1")))
    out_dir = Path(
        args.out or ROOT / "benchmarks" / "results" / ("gpu-smoke" if args.cpu_smoke else "gpu")
    )
    args.out = str(out_dir)  # the profile table goes beside the JSON
    if args.variant == "flex" and args.cpu_smoke:
        payload = {
            "status": "skipped",
            "reason": "torch has no FlexAttention backward on CPU; this variant needs a GPU",
        }
    elif args.variant == "flex":
        payload = train_with_fallback(args, compile_blocks=False, attention="flex")
    elif args.variant == "attention":
        payload = attention_variant(args)
    else:
        payload = train_with_fallback(args, compile_blocks=args.variant == "compile")
    payload["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    write(out_dir, args.variant, payload)


if __name__ == "__main__":
    main()
