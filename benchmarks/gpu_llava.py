"""GPU side by side: mm1 against transformers' `LlavaForConditionalGeneration`, same weights.

The network is the MM1 ablation model with LLaVA's projector: CLIP ViT-L/14 at 336 px (CLS
dropped, 576 image tokens) -> 2-layer MLP connector -> the 1.2B Llama decoder. mm1 builds it;
`benchmarks.models.llava_from_mm1` writes mm1's weights through mm1's own HF exporters and
loads them into LLaVA, and both must give the same logits (fp32) before anything is timed.

- generation: greedy, KV cache, no EOS, `new_tokens` per prompt, one image plus a short text
  per prompt, left padding; batch 1 and 8. In fp32 the tokens of both must be identical; in
  bf16 (each model as its library loads bf16: `cast_as_loaded`, rotary frequencies in fp32) the
  first divergence is reported. Tokens/s = generated tokens / wall
  time of the whole call (prefill and image encoder included), best of `rounds`.
- training: documents from the committed length distribution of the world's mixture
  (`benchmarks/doc_lengths.json`, 576 slots per image); mm1 packs them into rows of `seq_len`
  (the loader's `Packer`), LLaVA gets them as samples split at `seq_len`, `llava_batch` per step,
  right-padded, in the order of transformers' `LengthGroupedSampler` (LLaVA's
  `group_by_modality_length` within one modality) and in plain stream order. mm1 runs as many
  rows per step as hold the same real tokens on average. A step is forward, backward and fused
  AdamW under bf16 autocast with fp32 master weights, one model on the GPU at a time; both
  models use SDPA (mm1 `attention: auto`; LLaVA's padding mask through transformers' SDPA).
  Effective tokens/s = real (non-padding) tokens over the estimated time of a full pass, from a
  stratified sample of steps (`benchmarks.train_step.strata`), best of `rounds` per step.

Training runs first, since its ratio is the figure still missing from the GPU runs; both
models then get back the weights they shared, checked by the fp32 logits again, for generation.

`--decode` measures only bf16 generation with mm1's compiled decode step (`generate(...,
compile=True)`: fixed shapes, `reduce-overhead`, one CUDA graph per step) beside mm1 eager and
transformers, batch 1 then batch 8, saving after each; its compilation happens in the warm-up
call and is reported, not timed.

`--cpu-smoke` runs the same path on the CPU with the small benchmark model (fp32 throughout).
Run by `benchmarks/gpu.sh` (variants `llava` and `decode`); writes `<out>/llava.json` (or
`<out>/decode.json`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_bench import model_config, write

ROOT = Path(__file__).resolve().parent.parent


def side_by_side_config(smoke: bool):
    """The ablation model with LLaVA's 2-layer MLP projector (the small model for the smoke)."""
    from benchmarks.models import small_config
    from mm1.config import validate_model
    from mm1.models.connectors import MLPConnectorConfig

    if smoke:
        return small_config(512, 511, image_size=64, max_seq_len=4096)
    cfg = model_config(False)
    cfg.connector = MLPConnectorConfig(num_tokens=0, mlp_depth=2)
    validate_model(cfg)
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Same weights, same logits
# ---------------------------------------------------------------------------------------------


def max_logit_difference(model, llava, cfg, device: torch.device) -> float:
    """fp32 logits of both models on two prompts with one image each."""
    g = torch.Generator().manual_seed(1)
    q, v = cfg.num_image_tokens, cfg.decoder.vocab_size
    worst = 0.0
    with torch.no_grad():
        for n_text in (7, 30):
            text = torch.randint(0, v - 1, (n_text,), generator=g)
            ids = torch.cat([torch.full((q,), cfg.resolved_image_token_id), text])[None]
            px = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
            ids, px = ids.to(device), px.to(device)
            a = model(ids, pixel_values=px).logits
            b = llava(input_ids=ids, pixel_values=px).logits
            worst = max(worst, float((a.float() - b.float()).abs().max()))
    return worst


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def prompts(cfg, n: int, seed: int = 2) -> tuple[list[list[int]], torch.Tensor]:
    """`n` prompts of one image and 6..20 text tokens, and their pixels."""
    g = torch.Generator().manual_seed(seed)
    q, v, image_id = cfg.num_image_tokens, cfg.decoder.vocab_size, cfg.resolved_image_token_id
    out = []
    for i in range(n):
        text = torch.randint(0, v - 1, (6 + (i * 5) % 15,), generator=g)
        text[text >= image_id] += 1
        out.append([image_id] * q + text.tolist())
    size = cfg.vision.image_size
    return out, torch.randn(n, 3, size, size, generator=g)


def first_divergence(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    """Per sequence, the index of the first differing token (None when identical)."""
    out = []
    for x, y in zip(a, b):
        k = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), None)
        if k is None and len(x) != len(y):
            k = min(len(x), len(y))
        out.append(k)
    return out


def generation(
    model,
    llava,
    cfg,
    device,
    dtype,
    batches,
    new_tokens: int,
    rounds: int,
    compiled: bool = False,
    saved=None,
) -> list:
    """mm1 against HF per batch size (and mm1 compiled with `compiled`); `saved(results)` is
    called after each batch size."""
    from benchmarks.generation import hf_greedy, left_pad
    from mm1.models.generation import generate

    results = []
    all_prompts, all_pixels = prompts(cfg, max(batches))
    for b in batches:
        ps, px = all_prompts[:b], all_pixels[:b].to(device, dtype)
        ids, mask = left_pad(ps, 0)
        ids, mask = ids.to(device), mask.to(device)

        def ours(ps=ps, px=px, compile=False):
            return generate(
                model, ps, px, max_new_tokens=new_tokens, pad_token_id=0, compile=compile
            )

        def theirs(ids=ids, mask=mask, px=px):
            return hf_greedy(llava, ids, mask, px, new_tokens, 0)

        contenders = {"mm1": ours, "hf": theirs}
        if compiled:
            contenders["compiled"] = lambda ps=ps, px=px: ours(ps, px, compile=True)
        with torch.inference_mode():
            first, warmup = {}, {}
            for name, fn in contenders.items():  # warm-up (compilation), and the tokens compared
                sync(device)
                t0 = time.perf_counter()
                first[name] = fn()
                sync(device)
                warmup[name] = time.perf_counter() - t0
            best = dict.fromkeys(contenders, float("inf"))
            for _ in range(rounds):
                for name, fn in contenders.items():
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    best[name] = min(best[name], time.perf_counter() - t0)
        a, h = first["mm1"], first["hf"]
        same = sum(x == y for ra, rh in zip(a, h) for x, y in zip(ra, rh))
        row = {
            "dtype": str(dtype).removeprefix("torch."),
            "batch": b,
            "new_tokens": new_tokens,
            "mm1_tokens_per_s": b * new_tokens / best["mm1"],
            "hf_tokens_per_s": b * new_tokens / best["hf"],
            "ratio": best["hf"] / best["mm1"],
            "identical_tokens": same / max(1, sum(len(r) for r in h)),
            "first_divergence": first_divergence(a, h),
        }
        if compiled:
            row |= {
                "compiled_tokens_per_s": b * new_tokens / best["compiled"],
                "compiled_ratio": best["hf"] / best["compiled"],
                "compiled_over_eager": best["mm1"] / best["compiled"],
                "compiled_warmup_s": warmup["compiled"],
                "compiled_first_divergence_from_eager": first_divergence(a, first["compiled"]),
            }
        results.append(row)
        print(json.dumps(row), flush=True)
        if saved is not None:
            saved(results)
    return results


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def samples_that_fit(total_gib: float, most: int = 8) -> int:
    """LLaVA samples per step for a device of `total_gib`: the largest power of two, up to
    `most`, at 30 GiB fixed (weights, gradients, AdamW state) and 8 GiB per 2,048-token sample
    within 90% of the device. On the H200 (2026-12-04) LLaVA-1.5's 16 per step ran out of its
    140 GiB, so a sample takes more than 6.9 GiB; mm1's rows took 5.1 GiB each above 29 GiB.
    That gives 8 on an H200 and 4 on an H100 (80 GB)."""
    batch = 1
    while batch * 2 <= most and 30 + 8 * batch * 2 <= 0.9 * total_gib:
        batch *= 2
    return batch


def training_data(cfg, seq_len: int, llava_batch: int, num_docs: int) -> dict[str, Any]:
    from benchmarks.doc_lengths import documents
    from benchmarks.train_step import llava_batches, packed_batches, samples

    docs = documents(
        cfg.num_image_tokens, cfg.decoder.vocab_size, cfg.resolved_image_token_id, num_docs
    )
    items = samples(docs, seq_len)
    tokens = sum(len(s.input_ids) for s in items)
    rows = max(1, round(llava_batch * tokens / len(items) / seq_len))  # same real tokens/step
    mm1_batches, _ = packed_batches(docs, seq_len, rows, 0)
    return {
        "rows": rows,
        "documents": len(docs),
        "batches": {
            "mm1_packed": mm1_batches,
            "llava_grouped": llava_batches(items, llava_batch, 0, grouped=True),
            "llava_plain": llava_batches(items, llava_batch, 0, grouped=False),
        },
    }


def device_batch(b: dict, pixels: torch.Tensor, device: torch.device) -> dict:
    out = {k: v.to(device) for k, v in b.items() if isinstance(v, torch.Tensor)}
    idx = torch.tensor([i % len(pixels) for i in b["images"]], dtype=torch.long)
    out["pixel_values"] = pixels[idx].to(device) if len(idx) else None
    return out


def train_throughput(
    name: str, model, batches: list[dict], size: int, device, smoke: bool, k: int, rounds: int
) -> dict[str, Any]:
    from benchmarks.train_step import strata

    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(64, 3, size, size, generator=g)
    model.to(device).train()
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=fused)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not smoke)

    def step(b: dict) -> float:
        kw = dict(b)
        if name != "mm1_packed":
            kw["use_cache"] = False
        with autocast:
            loss = model(**kw).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    chosen = [(device_batch(batches[i], pixels, device), n) for i, n in strata(batches, k)]
    for b, _ in chosen[-2:]:  # warm-up on the largest shapes (allocator, cuBLAS handles)
        step(b)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    best = [float("inf")] * len(chosen)
    for _ in range(rounds):
        for j, (b, _) in enumerate(chosen):
            sync(device)
            t0 = time.perf_counter()
            step(b)
            sync(device)
            best[j] = min(best[j], time.perf_counter() - t0)
    tokens = sum(b["tokens"] for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    seconds = sum(n * t for (_, n), t in zip(chosen, best))
    opt.state.clear()  # free the AdamW moments before the next model moves in
    model.zero_grad(set_to_none=True)
    model.to("cpu")
    out = {
        "steps": len(batches),
        "timed_steps": len(chosen),
        "tokens": tokens,
        "padded_tokens": padded,
        "pad_efficiency": tokens / padded,
        "images": sum(len(b["images"]) for b in batches),
        "estimated_pass_seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "padded_tokens_per_s": padded / seconds,
        "timed_step_seconds": best,
        "timed_step_shapes": [list(b["input_ids"].shape) for b, _ in chosen],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else None,
    }
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(json.dumps({"variant": name, **{k: v for k, v in out.items() if "step" not in k}}))
    return out


def run(args, save) -> dict[str, Any]:
    """Every phase; `save(payload)` is called after each, so a run stopped by its time limit
    still leaves what it measured."""
    from benchmarks.models import build_mm1, cast_as_loaded, llava_from_mm1, quiet_transformers

    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    quiet_transformers()
    cfg = side_by_side_config(smoke)
    seq_len = args.seq_len or (2048 if not smoke else 512)
    began = time.perf_counter()
    out: dict[str, Any] = {
        "status": "partial",
        "model": "cpu smoke: small benchmark model"
        if smoke
        else "ViT-L/14 336 (576 tokens) + MLP(2) connector + 1.2B Llama decoder",
        "seq_len": seq_len,
        "llava_batch": args.llava_batch,
        "phase_end_s": {},  # seconds since start at the end of each phase
        "training": {},
        "generation": [],
    }

    def done(phase: str) -> None:
        out["phase_end_s"][phase] = time.perf_counter() - began
        print(f"[{out['phase_end_s'][phase]:.0f}s] {phase} done", flush=True)
        save(out)

    model = build_mm1(cfg).eval()
    llava = llava_from_mm1(model).eval()
    model.to(device)
    llava.to(device)
    out["max_fp32_logit_difference"] = diff = max_logit_difference(model, llava, cfg, device)
    if diff > 1e-3:
        raise RuntimeError(f"LLaVA and mm1 disagree (max fp32 logit difference {diff:.3g})")
    done("build, convert, logits")

    batches = (1, 8) if not smoke else (1, 2)
    if args.decode:
        del out["llava_batch"]  # no training here
        dtype = torch.float32 if smoke else torch.bfloat16
        cast_as_loaded(model, dtype)
        cast_as_loaded(llava, dtype)
        out["generation"] = generation(
            model,
            llava,
            cfg,
            device,
            dtype,
            batches,
            args.new_tokens,
            args.rounds,
            compiled=True,
            saved=lambda rows: save(out | {"generation": list(rows)}),
        )
        out["summary"] = {
            "compiled_ratio": {str(g["batch"]): g["compiled_ratio"] for g in out["generation"]},
            "compiled_over_eager": {
                str(g["batch"]): g["compiled_over_eager"] for g in out["generation"]
            },
            "generation_target": 1.0,
        }
        out["status"] = "ok"
        return out
    # Training first: its ratio is the figure no GPU run has measured yet. The weights both
    # models start from are kept on the host and put back for generation, which needs them
    # equal.
    start = [
        {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
        for net in (model, llava)
    ]
    if args.llava_batch == 0:  # the default: what the device holds
        total = torch.cuda.get_device_properties(device).total_memory / 2**30 if not smoke else 0
        args.llava_batch = 8 if smoke else samples_that_fit(total)
        out["llava_batch"] = args.llava_batch
    data = training_data(cfg, seq_len, args.llava_batch, args.num_docs)
    out["mm1_rows"], out["documents"] = data["rows"], data["documents"]
    llava.to("cpu")
    for name in ("llava_grouped", "mm1_packed", "llava_plain"):  # the pair that matters first
        net = model if name == "mm1_packed" else llava
        try:
            out["training"][name] = train_throughput(
                name,
                net,
                data["batches"][name],
                cfg.vision.image_size,
                device,
                smoke,
                args.strata,
                args.rounds,
            )
        except torch.OutOfMemoryError as err:
            net.zero_grad(set_to_none=True)
            net.to("cpu")
            torch.cuda.empty_cache()
            out["training"][name] = {"status": "out of memory", "error": str(err)[:300]}
        done(f"training {name}")
    train = out["training"]
    m = train.get("mm1_packed", {})
    out["summary"] = {
        "train_tokens_per_s_ratio": {
            f"vs_{n}": m["tokens_per_s"] / r["tokens_per_s"]
            for n, r in train.items()
            if n != "mm1_packed" and "tokens_per_s" in r and "tokens_per_s" in m
        },
        "train_target": 1.3,
    }

    for net, state in zip((model, llava), start):
        net.load_state_dict(state)
        net.to(device).eval()
    del start
    diff = max_logit_difference(model, llava, cfg, device)
    out["max_fp32_logit_difference_after_training"] = diff
    if diff > 1e-3:
        raise RuntimeError(f"the weights were not put back (fp32 logit difference {diff:.3g})")
    gen = out["generation"]
    gen += generation(model, llava, cfg, device, torch.float32, batches, args.new_tokens, 1)
    if not smoke:
        cast_as_loaded(model, torch.bfloat16)
        cast_as_loaded(llava, torch.bfloat16)
        gen += generation(
            model, llava, cfg, device, torch.bfloat16, batches, args.new_tokens, args.rounds
        )
    bf16 = [g for g in gen if g["dtype"] == ("bfloat16" if not smoke else "float32")]
    out["summary"] |= {
        "generation_ratio": {str(g["batch"]): g["ratio"] for g in bf16},
        "generation_target": 1.0,
        "fp32_tokens_identical": all(
            g["identical_tokens"] == 1.0 for g in gen if g["dtype"] == "float32"
        ),
    }
    done("generation")
    out["status"] = "ok"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="default benchmarks/results/gpu (gpu-smoke with --cpu-smoke)")
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--seq-len", type=int, default=0, help="default 2048 (LLaVA-1.5's)")
    ap.add_argument(
        "--llava-batch",
        type=int,
        default=0,
        help="samples per LLaVA step; default: 8 on an H200, 4 on an H100 (`samples_that_fit`; "
        "LLaVA-1.5's per-device 16 does not fit one H200 without gradient checkpointing at "
        "this model size: measured out of memory)",
    )
    ap.add_argument("--num-docs", type=int, default=600)
    ap.add_argument("--strata", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--decode", action="store_true", help="only bf16 generation, compiled too")
    args, _ = ap.parse_known_args()  # gpu.sh passes the same extra flags to every variant
    if args.cpu_smoke:
        torch.set_num_threads(1)
        args.num_docs, args.strata, args.rounds = min(args.num_docs, 60), 2, 1
        args.new_tokens = min(args.new_tokens, 8)
    out = Path(
        args.out or ROOT / "benchmarks" / "results" / ("gpu-smoke" if args.cpu_smoke else "gpu")
    )
    name = "decode" if args.decode else "llava"
    write(out, name, run(args, lambda payload: write(out, name, payload, quiet=True)))


if __name__ == "__main__":
    main()
