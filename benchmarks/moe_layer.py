"""MoE layer: forward + backward of mm1's dropless MoE FFN against a dense SwiGLU of the same
active parameters and against a loop over tokens, on CPU, or on a GPU (`--device cuda --dtype
bf16`: the `moe` variant of benchmarks/gpu.sh, where `grouped_mm` is a real grouped kernel).

At the ablation preset's decoder width and FFN size by default (dim 2048, ffn 5632), 4,096
tokens, top-2, for each number of experts asked. Variants, interleaved round by round in one
process (each keeps its best time):

- `moe_grouped`: `MoE` with `expert_matmul: auto` (tokens sorted by expert, `grouped_mm`);
- `moe_per_expert`: the same layer with one matmul per expert over its contiguous tokens;
- `dense`: a SwiGLU of width top_k x ffn, so the same expert parameters act on each token
  (the router's dim x E more are the MoE's own);
- `token_loop`: the definition run token by token (each token through its k experts), timed
  on `loop_tokens` tokens and scaled linearly to the full count (its cost is linear in tokens).

`--variants` runs a subset. Weights and their gradients of E experts take 24 x E x dim x ffn
bytes (fp32): 2.2 GB at E=8 and 17.7 GB at E=64 at the ablation width, where the grouped
layer peaks at 18.3 GB and the per-expert one also runs on a 23 GB machine. The token loop
needs more: each index of its backward zero-fills a gradient the size of all experts. So E=64
at full width there runs as `--variants moe_grouped moe_per_expert dense`. `--dim` / `--ffn`
run narrower layers. The grouped and per-expert variants share one set of weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import emit, environment, print_table, ratio, set_threads, write_result
from mm1.config import DecoderConfig
from mm1.models.decoder import SwiGLU
from mm1.models.moe import MoE, MoEConfig, grouped_mm_supported, route

VARIANTS = ("moe_grouped", "moe_per_expert", "dense", "token_loop")


def _layers(dim: int, ffn: int, experts: int, top_k: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = DecoderConfig(dim=dim, ffn_dim=ffn, layers=1, heads=1, kv_heads=1)
    out: dict[str, torch.nn.Module] = {}
    layer = MoE(cfg, MoEConfig(experts=experts, top_k=top_k))
    with torch.no_grad():  # expert by expert (`init_parameters` in one go needs 3 x 5.9 GB more)
        for w in (layer.experts.gate_up_proj, layer.experts.down_proj):
            for expert in w:
                torch.nn.init.trunc_normal_(expert, std=0.02, a=-0.06, b=0.06)
    torch.nn.init.normal_(layer.gate.weight, std=0.02)
    out["moe"] = layer
    out["dense"] = SwiGLU(DecoderConfig(dim=dim, ffn_dim=top_k * ffn, layers=1, heads=1))
    return out


def _token_loop(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token through its k experts, one token at a time."""
    r = route(layer.gate(x), layer.top_k, layer.norm_topk_prob)
    gate_up, down = layer.experts.gate_up_proj, layer.experts.down_proj
    rows = []
    for t in range(x.shape[0]):
        acc = x.new_zeros(x.shape[1])
        for w, e in zip(r.weights[t], r.experts[t].tolist()):
            g, u = F.linear(x[t], gate_up[e]).chunk(2)
            acc = acc + w * F.linear(F.silu(g) * u, down[e])
        rows.append(acc)
    return torch.stack(rows)


def _moe(layer: MoE, matmul: str):
    """The layer with its experts run as `matmul` (one set of weights for both paths)."""

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        layer.experts.matmul = matmul
        return layer(x)

    return fn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(fn, x: torch.Tensor) -> tuple[float, float, float]:
    """Wall, user CPU and system CPU seconds of one forward + backward."""
    x = x.detach().requires_grad_()
    _sync(x.device)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = fn(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.ones_like(out))
    _sync(x.device)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def measure(
    dim: int,
    ffn: int,
    tokens: int,
    experts: int,
    top_k: int,
    rounds: int,
    loop_tokens: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    variants: tuple[str, ...] = VARIANTS,
) -> dict[str, Any]:
    with torch.device(device):  # built where it runs: E=64 is 9 GB of fp32 weights to init
        layers = {k: m.to(dtype) for k, m in _layers(dim, ffn, experts, top_k).items()}
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    moe = layers["moe"]
    grouped, per_expert = _moe(moe, "auto"), _moe(moe, "loop")
    with torch.no_grad():  # the paths compute the same function
        diff = (grouped(x[:256])[0] - per_expert(x[:256])[0]).abs().max().item()
        diff_loop = (grouped(x[:16])[0] - _token_loop(moe, x[:16])).abs().max().item()
    fns = {
        "moe_grouped": grouped,
        "moe_per_expert": per_expert,
        "dense": layers["dense"],
        "token_loop": lambda h: _token_loop(moe, h),
    }
    fns = {name: fn for name, fn in fns.items() if name in variants}
    best: dict[str, float | None] = dict.fromkeys(fns, float("inf"))
    user: dict[str, float | None] = {}  # CPU seconds of each variant's best round
    system: dict[str, float | None] = {}
    for _ in range(rounds + 1):  # the first round warms up and counts too (best of all)
        for name, fn in fns.items():
            for m in layers.values():
                m.zero_grad(set_to_none=True)
            h = x[:loop_tokens] if name == "token_loop" else x
            scale = tokens / loop_tokens if name == "token_loop" else 1.0
            wall, cpu_user, cpu_system = (scale * t for t in _step(fn, h))
            if wall < best[name]:
                best[name], user[name], system[name] = wall, cpu_user, cpu_system
    if x.device.type != "cpu":  # the host's CPU seconds say nothing of a GPU's work
        user, system = {}, {}
    for name in VARIANTS:  # left out: None, and so is every ratio it enters
        for table in (best, user, system):
            table.setdefault(name, None)
    active_moe = 2 * 3 * dim * ffn + dim * experts
    e = moe.experts
    return {
        "experts": experts,
        "grouped_mm_used": grouped_mm_supported(x, e.gate_up_proj, e.down_proj),
        "seconds": best,
        # On the CPU with one thread, user time is the arithmetic and system time mostly the
        # kernel's work on fresh pages (the expert gradients are new memory every step).
        "cpu_user_seconds": user,
        "cpu_system_seconds": system,
        "moe_over_dense": ratio(best["moe_grouped"], best["dense"]),
        "moe_over_dense_user_cpu": ratio(user["moe_grouped"], user["dense"]),
        "per_expert_over_grouped": ratio(best["moe_per_expert"], best["moe_grouped"]),
        "token_loop_over_moe": ratio(best["token_loop"], best["moe_grouped"]),
        "active_parameters_moe": active_moe,
        "parameters_dense": 3 * dim * top_k * ffn,
        "max_difference_grouped_vs_per_expert": diff,
        "max_difference_grouped_vs_token_loop": diff_loop,
    }


def run(
    dim: int = 2048,
    ffn: int = 5632,
    tokens: int = 4096,
    experts: tuple[int, ...] = (8, 64),
    top_k: int = 2,
    rounds: int = 2,
    loop_tokens: int = 32,
    name: str = "moe_layer",
    device: str = "cpu",
    dtype: str = "fp32",
    out_dir: str | None = None,
    variants: tuple[str, ...] = VARIANTS,
) -> dict[str, Any]:
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"--variants: unknown {sorted(unknown)}; choose from {VARIANTS}")
    if "token_loop" in variants and loop_tokens <= 0:
        raise ValueError("--loop-tokens must be positive when the token_loop variant runs")
    threads = set_threads()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    results = [
        measure(dim, ffn, tokens, e, top_k, rounds, loop_tokens, device, torch_dtype, variants)
        for e in experts
    ]
    settings = {
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "dtype": dtype,
        "dim": dim,
        "ffn": ffn,
        "tokens": tokens,
        "top_k": top_k,
        "rounds": rounds,
        "loop_tokens": loop_tokens,
        "variants": list(variants),
        "threads": threads,
        "grouped_mm": hasattr(F, "grouped_mm"),
        # The host allocator decides whether the experts' large gradient buffers are fresh
        # pages (faulted in every step: glibc's default) or reused (section 9).
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "malloc_conf": os.environ.get("MALLOC_CONF", ""),
    }
    out = {"settings": settings, "results": results}
    if out_dir:  # the GPU script's layout: OUT/moe.json
        path = Path(out_dir) / "moe.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"variant": "moe", "status": "ok", "environment": environment(), **out}
        path.write_text(json.dumps(payload, indent=2) + "\n")
    else:
        write_result(name, out)
    print_table(
        f"MoE layer fwd+bwd, {tokens} tokens, dim {dim}, ffn {ffn}, top-{top_k} (best seconds)",
        ["E", "moe grouped", "moe per expert", "dense", "token loop", "moe / dense"],
        [
            [
                r["experts"],
                r["seconds"]["moe_grouped"],
                r["seconds"]["moe_per_expert"],
                r["seconds"]["dense"],
                r["seconds"]["token_loop"],
                r["moe_over_dense"],
            ]
            for r in results
        ],
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--loop-tokens", type=int, default=32)
    ap.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="a subset"
    )
    ap.add_argument("--name", default="moe_layer", help="benchmarks/results/NAME.json")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--out", help="write OUT/moe.json (benchmarks/gpu.sh) instead")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
    a, _ = ap.parse_known_args()  # gpu.sh passes the same extra flags to every variant
    if a.cpu_smoke:
        a.dim, a.ffn, a.tokens, a.experts, a.rounds, a.loop_tokens = 64, 128, 256, [4, 8], 1, 4
        a.device, a.dtype = "cpu", "fp32"
    out = run(
        a.dim,
        a.ffn,
        a.tokens,
        tuple(a.experts),
        a.top_k,
        a.rounds,
        a.loop_tokens,
        a.name,
        a.device,
        a.dtype,
        a.out,
        tuple(a.variants),
    )
    emit({"results": out["results"]})


if __name__ == "__main__":
    main()
