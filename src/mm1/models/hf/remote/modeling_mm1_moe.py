"""An mm1 Mixture-of-Experts decoder as transformers custom code.

Written by `mm1 convert --to-hf` for MoE decoders that fit neither Mixtral nor Qwen3-MoE
(e.g. experts every 2nd layer without q/k norm), next to config.json; loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`, or as the text model of
`modeling_mm1.py`. Self-contained: torch and transformers only.

mm1's decoder: RMSNorm, RoPE (default / linear / llama3 scaling), grouped-query attention with
optional q/k norm (per head, before RoPE), q/k/v-only biases and a sliding window; layer i has
experts when (i + 1) % decoder_sparse_step == 0, a dense SwiGLU otherwise. The router takes a
softmax over all experts in fp32, then the top k, renormalised when `norm_topk_prob`. Experts
are held fused: `experts.gate_up_proj` (E, 2F, D), each expert's gate rows then its up rows,
and `experts.down_proj` (E, D, F). The window is `attention_window`, not `sliding_window`, so
transformers' caches keep every key (the mask applies the window).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

ROPE_TYPES = ("default", "linear", "llama3")
# transformers 5.25 renamed the output's and forward's `past_key_values` to `cache`.
_CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


class MM1MoeConfig(PretrainedConfig):
    model_type = "mm1_moe"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        intermediate_size: int = 5632,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        rms_norm_eps: float = 1e-5,
        rope: dict | None = None,
        max_position_embeddings: int = 4096,
        qk_norm: bool = False,
        qkv_bias: bool = False,
        attention_window: int = 0,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        decoder_sparse_step: int = 1,
        moe_intermediate_size: int | None = None,
        norm_topk_prob: bool = True,
        hidden_act: str = "silu",
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        **kwargs,
    ) -> None:
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        # theta and scaling: type (default / linear / llama3), factor, low_freq_factor,
        # high_freq_factor, original_max_position_embeddings
        self.rope = {"type": "default", "theta": 10000.0, **(rope or {})}
        self.max_position_embeddings = max_position_embeddings
        self.qk_norm, self.qkv_bias = qk_norm, qkv_bias
        self.attention_window = attention_window
        self.num_experts, self.num_experts_per_tok = num_experts, num_experts_per_tok
        self.decoder_sparse_step = decoder_sparse_step
        self.moe_intermediate_size = moe_intermediate_size or intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        if hidden_act != "silu":
            raise ValueError(f"hidden_act={hidden_act!r}: the experts are SwiGLU (silu)")
        if self.rope["type"] not in ROPE_TYPES:
            raise ValueError(f"rope.type={self.rope['type']!r} is not one of {ROPE_TYPES}")
        if not 1 <= num_experts_per_tok <= num_experts:
            raise ValueError(f"num_experts_per_tok={num_experts_per_tok} not in 1..num_experts")
        if not 1 <= decoder_sparse_step <= num_hidden_layers:
            raise ValueError(f"decoder_sparse_step={decoder_sparse_step} leaves no sparse layer")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def rope_inv_freq(head_dim: int, rope: dict) -> torch.Tensor:
    inv = 1.0 / (
        rope["theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    )
    kind = rope["type"]
    if kind == "linear":
        return inv / rope["factor"]
    if kind == "llama3":  # long wavelengths slowed by `factor`, short ones kept, blended between
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, blended, scaled)
    return inv


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: MM1MoeConfig, layer_idx: int) -> None:
        super().__init__()
        c, hd = config, config.head_dim
        self.layer_idx, self.heads, self.kv_heads, self.hd = (
            layer_idx,
            c.num_attention_heads,
            c.num_key_value_heads,
            hd,
        )
        self.q_proj = nn.Linear(c.hidden_size, self.heads * hd, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * hd, bias=c.qkv_bias)
        self.o_proj = nn.Linear(self.heads * hd, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(hd, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(hd, c.rms_norm_eps) if c.qk_norm else None

    def forward(self, x, cos, sin, mask, cache) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.heads != self.kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    def __init__(self, experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(experts, dim, hidden))


class SparseMoeBlock(nn.Module):
    """Top-k routing over the experts; each expert runs once on the tokens that chose it."""

    def __init__(self, config: MM1MoeConfig) -> None:
        super().__init__()
        c = config
        self.top_k, self.norm_topk_prob = c.num_experts_per_tok, c.norm_topk_prob
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.experts = Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, x.shape[-1])
        probs = self.gate(h).float().softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for e in chosen.unique().tolist():
            token, slot = (chosen == e).nonzero(as_tuple=True)
            g, u = F.linear(h[token], self.experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(g) * u, self.experts.down_proj[e])
            out.index_add_(0, token, y * weights[token, slot, None].to(y.dtype))
        return out.view_as(x)


class DecoderLayer(nn.Module):
    def __init__(self, config: MM1MoeConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, layer_idx)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        sparse = (layer_idx + 1) % c.decoder_sparse_step == 0
        self.mlp = SparseMoeBlock(c) if sparse else MLP(c.hidden_size, c.intermediate_size)

    def forward(self, x, cos, sin, mask, cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MM1MoePreTrainedModel(PreTrainedModel):
    config_class = MM1MoeConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["DecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, Experts):
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


class MM1MoeModel(MM1MoePreTrainedModel):
    def __init__(self, config: MM1MoeConfig) -> None:
        super().__init__(config)
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_init()

    def _mask(self, attention_mask, b: int, t: int, past: int, device) -> torch.Tensor:
        """(B, 1, T, past + T) boolean: causal, in the window, not on padding; a query always
        sees itself, so a padding row is never fully masked."""
        q = torch.arange(past, past + t, device=device)[:, None]
        k = torch.arange(past + t, device=device)[None, :]
        allowed = k <= q
        window = self.config.attention_window
        if window:
            allowed = allowed & (q - k < window)
        allowed = allowed[None, None].expand(b, 1, t, past + t)
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("attention_mask: a (batch, keys) padding mask is expected")
            allowed = allowed & attention_mask[:, None, None, : past + t].bool()
        return allowed | (k == q)

    def forward(
        self,
        input_ids=None,
        inputs_embeds=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache=False,
    ):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(t, device=x.device) + past).expand(b, t)
        inv = rope_inv_freq(self.config.head_dim, self.config.rope).to(x.device)
        freqs = position_ids.float()[..., None] * inv
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        mask = self._mask(attention_mask, b, t, past, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x), cache


class MM1MoeForCausalLM(MM1MoePreTrainedModel, GenerationMixin):
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MM1MoeConfig) -> None:
        super().__init__(config)
        self.model = MM1MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        hidden, cache = self.model(
            input_ids, inputs_embeds, attention_mask, position_ids, cache, bool(use_cache)
        )
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
