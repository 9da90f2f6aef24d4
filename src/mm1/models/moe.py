"""Mixture-of-Experts FFN (`model.decoder.ffn.type: moe`): a top-k router over E SwiGLU experts.

Dropless: every token reaches its k experts, whatever the imbalance. The token-expert
assignments are sorted by expert, so each expert's tokens are contiguous, and the experts run
as grouped matrix multiplies (`torch.nn.functional.grouped_mm`) where the device and dtype
support them, else as one matmul per expert over its contiguous slice; never a loop over tokens.

Layout: experts replace the dense FFN of the decoder layers i with `(i + 1) % every == 0`
(transformers' Qwen3-MoE `decoder_sparse_step`); the other layers keep a dense SwiGLU.

Auxiliary losses, each a mean over the model's sparse layers (every sparse layer adds its own
divided by their number; the decoder sums over blocks):
- `router_balance`: Switch / GShard load balance, E * sum_e f_e * P_e with f_e the fraction of
  top-k assignments to expert e and P_e its mean router probability, over the routed tokens
  (non-padding, image slots included). transformers' `load_balancing_loss_func` pools the
  tokens of all layers before the product instead; the two agree with one sparse layer.
- `router_z`: ST-MoE's router z-loss, the mean over routed tokens of logsumexp(logits)^2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mm1.config import ConfigError, DecoderConfig, FFNConfig, ModelConfig
from mm1.models.decoder import SwiGLU
from mm1.registry import FFNS

EXPERT_MATMULS = ("auto", "grouped", "loop")


@dataclass
class MoEConfig(FFNConfig):
    type: str = "moe"
    experts: int = 8
    top_k: int = 2
    every: int = 1  # experts in the layers i with (i + 1) % every == 0, dense SwiGLU elsewhere
    expert_dim: int = 0  # each expert's hidden width; 0 = decoder.ffn_dim
    # Renormalise the chosen k probabilities to sum to one (Mixtral; Qwen3-MoE's norm_topk_prob).
    # Upcycling needs it: identical experts then sum to the dense FFN.
    norm_topk_prob: bool = True
    # auto: grouped_mm where supported, else one matmul per expert; grouped: require grouped_mm
    expert_matmul: str = "auto"

    def validate(self, key: str, model: ModelConfig) -> None:
        if self.experts < 2:
            raise ConfigError(f"{key}.experts={self.experts} must be >= 2")
        if not 1 <= self.top_k <= self.experts:
            raise ConfigError(f"{key}.top_k={self.top_k} must be in 1..experts={self.experts}")
        layers = model.decoder.layers
        if not 1 <= self.every <= layers:
            raise ConfigError(
                f"{key}.every={self.every} leaves no sparse layer among the decoder's "
                f"{layers} layers (1..{layers})"
            )
        if self.expert_dim < 0:
            raise ConfigError(f"{key}.expert_dim={self.expert_dim} must be >= 0")
        if self.expert_matmul not in EXPERT_MATMULS:
            raise ConfigError(
                f"{key}.expert_matmul={self.expert_matmul!r} is not one of "
                f"{', '.join(EXPERT_MATMULS)}"
            )


def is_sparse_layer(layer: int, every: int) -> bool:
    """transformers' Qwen3-MoE rule: layer i has experts when (i + 1) % every == 0."""
    return (layer + 1) % every == 0


def sparse_layers(cfg: DecoderConfig) -> list[int]:
    """The decoder layers whose FFN is a MoE layer (none for a dense FFN)."""
    if not isinstance(cfg.ffn, MoEConfig):
        return []
    return [i for i in range(cfg.layers) if is_sparse_layer(i, cfg.ffn.every)]


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether grouped_mm takes these operands: CPU (fp32 / bf16; bf16 under torch.compile) or
    CUDA with SM >= 8.0 (bf16), one dtype, and every row stride a multiple of 16 bytes."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
        if torch.compiler.is_compiling():  # the kernel takes fp32; what compile traces, bf16 only
            dtypes = (torch.bfloat16,)
    elif x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] >= 8:
        dtypes = (torch.bfloat16,)
    else:
        return False
    if x.dtype not in dtypes or any(w.dtype != x.dtype for w in weights):
        return False
    size = x.element_size()
    return all(d * size % 16 == 0 for w in weights for d in w.shape[1:])


class Experts(nn.Module):
    """E SwiGLU experts held fused, in transformers 5's layout: `gate_up_proj` (E, 2F, D) holds
    each expert's gate rows then its up rows, `down_proj` (E, D, F)."""

    def __init__(self, experts: int, dim: int, hidden: int, matmul: str = "auto") -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = experts, dim, hidden
        self.matmul = matmul
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(experts, dim, hidden))

    @torch.no_grad()
    def init_parameters(self, std: float) -> None:
        for w in (self.gate_up_proj, self.down_proj):
            nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, D): tokens sorted by expert, `counts[e]` of them for expert e -> (N, D)."""
        gate_up, down = self.gate_up_proj, self.down_proj
        device = x.device.type
        if torch.is_autocast_enabled(device):  # grouped_mm is not autocast: cast as it would
            dtype = torch.get_autocast_dtype(device)
            x, gate_up, down = x.to(dtype), gate_up.to(dtype), down.to(dtype)
        else:
            gate_up, down = gate_up.to(x.dtype), down.to(x.dtype)
        grouped = self.matmul != "loop" and grouped_mm_supported(x, gate_up, down)
        if self.matmul == "grouped" and not grouped:
            raise RuntimeError(
                f"model.decoder.ffn.expert_matmul=grouped, but grouped_mm does not support "
                f"{x.dtype} on {x.device} with these shapes (row strides must be multiples of "
                f"16 bytes)"
            )
        if grouped:
            offs = counts.cumsum(0).to(torch.int32)
            g, u = F.grouped_mm(x, gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
            return F.grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=offs)
        return _PerExpert.apply(x, gate_up, down, counts.tolist())


class _PerExpert(torch.autograd.Function):
    """The experts as one matmul each over their contiguous tokens, with a hand-written
    backward that writes every expert's weight gradient into one (E, ...) buffer. Autograd
    over per-expert slices cannot: indexing `gate_up[e]` zero-fills a full-size gradient per
    expert (26x slower at E=64), and `unbind` stacks E separate gradients, so the experts'
    gradient bytes are held twice at once (the grouped path's peak plus 2.2 GB at E=64, half
    width; docs/benchmarks.md section 9). An expert without tokens gets a zero gradient, as
    in the grouped path (DDP expects a gradient for every weight)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        # Written in place, expert by expert: no per-expert pieces concatenated afterwards.
        gate_up_out = x.new_empty(x.shape[0], gate_up.shape[1])
        out = x.new_empty(x.shape[0], down.shape[1])
        start = 0
        for e, n in enumerate(counts):
            rows = slice(start, start + n)
            start += n
            torch.mm(x[rows], gate_up[e].T, out=gate_up_out[rows])
            g, u = gate_up_out[rows].chunk(2, dim=-1)
            torch.mm(F.silu(g) * u, down[e].T, out=out[rows])
        ctx.counts = counts
        ctx.save_for_backward(x, gate_up, down, gate_up_out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, gate_up, down, gate_up_out = ctx.saved_tensors
        need_x, need_gate_up, need_down = ctx.needs_input_grad[:3]
        grad_out = grad_out.to(x.dtype)
        grad_x = torch.empty_like(x) if need_x else None
        grad_gate_up = torch.empty_like(gate_up) if need_gate_up else None
        grad_down = torch.empty_like(down) if need_down else None
        start = 0
        for e, n in enumerate(ctx.counts):
            rows = slice(start, start + n)
            start += n
            if n == 0:  # no tokens: a zero weight gradient, no input rows
                for grad in (grad_gate_up, grad_down):
                    if grad is not None:
                        grad[e].zero_()
                continue
            g, u = gate_up_out[rows].chunk(2, dim=-1)
            sig = torch.sigmoid(g)
            silu = g * sig
            if grad_down is not None:
                torch.mm(grad_out[rows].T, silu * u, out=grad_down[e])
            grad_h = grad_out[rows] @ down[e]
            grad_g = grad_h * u * sig * (1 + g * (1 - sig))  # d silu(g) / dg
            grad_gate_up_out = torch.cat([grad_g, grad_h * silu], dim=-1)
            if grad_gate_up is not None:
                torch.mm(grad_gate_up_out.T, x[rows], out=grad_gate_up[e])
            if grad_x is not None:
                torch.mm(grad_gate_up_out, gate_up[e], out=grad_x[rows])
        return grad_x, grad_gate_up, grad_down, None


@dataclass
class Routing:
    """A router's decision for N tokens."""

    logits: torch.Tensor  # (N, E) fp32
    probs: torch.Tensor  # (N, E) fp32 softmax over all experts
    weights: torch.Tensor  # (N, k) fp32: the chosen experts' probabilities (renormalised or not)
    experts: torch.Tensor  # (N, k) long


def route(logits: torch.Tensor, top_k: int, normalise: bool) -> Routing:
    """Softmax over all experts, then the top k, renormalised to sum to one if `normalise`."""
    logits = logits.float()
    probs = logits.softmax(-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if normalise:
        weights = weights / weights.sum(-1, keepdim=True)
    return Routing(logits, probs, weights, experts)


def balance_loss(r: Routing, num_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e f_e * P_e over the tokens of `mask` (all when None): f_e the fraction of top-k
    assignments to expert e per token (summing to k), P_e the mean probability of expert e.
    Equals k at uniform probabilities; only P carries a gradient."""
    probs, experts = r.probs, r.experts
    if mask is not None:
        probs, experts = probs[mask], experts[mask]
    n = max(probs.shape[0], 1)
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).to(probs.dtype)
    return num_experts * (counts / n * probs.sum(0) / n).sum()


def z_loss(r: Routing, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2."""
    logits = r.logits if mask is None else r.logits[mask]
    if logits.shape[0] == 0:
        return logits.sum()
    return logits.logsumexp(-1).pow(2).mean()


class MoE(nn.Module):
    """Router (`gate`, a bias-free linear D -> E) and E SwiGLU experts (`experts`); parameter
    names follow transformers 5's Mixtral / Qwen3-MoE sparse block."""

    routes_tokens = True  # the decoder block passes it the mask of routed (non-padding) tokens

    def __init__(self, cfg: DecoderConfig, moe: MoEConfig, sparse_count: int = 1) -> None:
        super().__init__()
        self.num_experts, self.top_k = moe.experts, moe.top_k
        self.norm_topk_prob = moe.norm_topk_prob
        self.gate = nn.Linear(cfg.dim, moe.experts, bias=False)
        self.experts = Experts(
            moe.experts, cfg.dim, moe.expert_dim or cfg.ffn_dim, moe.expert_matmul
        )
        self.sparse_count = sparse_count  # aux losses are divided by it: a mean over layers
        # Assignments per expert in the last training forward (routed tokens only), for the log.
        # Overwritten, not summed: a checkpointed block's recomputation in the backward pass
        # repeats the same forward, so the trainer reads it after each forward.
        self.last_load: torch.Tensor | None = None

    def inactive_parameters(self) -> int:
        """The unchosen experts' parameters, idle for each token."""
        per_expert = self.experts.gate_up_proj[0].numel() + self.experts.down_proj[0].numel()
        return (self.num_experts - self.top_k) * per_expert

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        mask = None if token_mask is None else token_mask.reshape(-1)
        r = route(self.gate(h), self.top_k, self.norm_topk_prob)
        flat = r.experts.reshape(-1)  # (N * k,) the expert of each assignment
        order = flat.argsort(stable=True)  # assignments sorted by expert
        token = order // self.top_k
        counts = torch.bincount(flat, minlength=self.num_experts)
        out = self.experts(h[token], counts)
        out = out * r.weights.reshape(-1)[order, None].to(out.dtype)
        y = torch.zeros(h.shape, dtype=out.dtype, device=h.device).index_add_(0, token, out)
        if self.training:
            routed = r.experts if mask is None else r.experts[mask]
            self.last_load = torch.bincount(routed.reshape(-1), minlength=self.num_experts)
        aux = {
            "router_balance": balance_loss(r, self.num_experts, mask) / self.sparse_count,
            "router_z": z_loss(r, mask) / self.sparse_count,
        }
        return y.reshape(shape).to(x.dtype), aux


@FFNS.register("moe", MoEConfig)
def moe(cfg: DecoderConfig, layer: int) -> nn.Module:
    spec: MoEConfig = cfg.ffn
    if not is_sparse_layer(layer, spec.every):
        return SwiGLU(cfg)
    return MoE(cfg, spec, len(sparse_layers(cfg)))
