"""A Llama-style decoder: RMSNorm, RoPE, grouped-query attention, a swappable FFN; it reads and
writes a KV cache (`kv_cache.py`) when generating. Persimmon's variations are switches of the
same blocks: LayerNorm (`norm: layer`), partial rotary (`rope_fraction`), an output-projection
bias (`o_bias`) and an ungated squared-ReLU FFN (`ffn: {type: mlp}`).

The FFN is a registered part (`FFNS`, `model.decoder.ffn.type`); an FFN may return auxiliary
losses by name beside its output (`(out, {name: loss})`, e.g. a router's load balance), which
the decoder sums over its blocks into the `aux_losses` mapping a caller passes.

Packed sequences: `document_ids` keep attention inside each document and `position_ids` restart
per document, so a packed row gives the same logits as its documents run one by one.
Parameter names follow transformers' Llama so checkpoints map one to one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from mm1.config import (
    ACTIVATIONS,
    ConfigError,
    DecoderConfig,
    FFNConfig,
    ModelConfig,
    parse_component,
)
from mm1.models.kv_cache import KVCache, SlotView
from mm1.models.layers import activation, init_weights, norm_layer
from mm1.registry import FFNS

# ---------------------------------------------------------------------------------------------
# Rotary position embeddings
# ---------------------------------------------------------------------------------------------


def rope_inv_freq(cfg: DecoderConfig) -> torch.Tensor:
    """Inverse frequencies of the rotated dimensions (`rope_dim`), with the checkpoint's rope
    scaling applied."""
    hd = cfg.rope_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    rs = cfg.rope_scaling
    if rs.type == "default":
        return inv
    if rs.type == "linear":
        return inv / rs.factor
    if rs.type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
        # blended smoothly.
        old = rs.original_max_position_embeddings
        low_wavelen, high_wavelen = old / rs.low_freq_factor, old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"rope scaling type {rs.type!r} is not supported")


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, T, head_dim), in fp32."""
    freqs = position_ids.float()[..., None] * inv_freq.float()
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); rotate-half convention of the Llama reference. With partial rotary
    (cos narrower than hd) only the first dimensions turn, the rest pass (Persimmon)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    r = cos.shape[-1]
    rot = x[..., :r]
    x1, x2 = rot.chunk(2, dim=-1)
    out = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return out if r == x.shape[-1] else torch.cat([out, x[..., r:]], dim=-1)


# ---------------------------------------------------------------------------------------------
# Masks (the KV cache is in kv_cache.py)
# ---------------------------------------------------------------------------------------------


def attention_mask(
    doc_q: torch.Tensor,
    doc_k: torch.Tensor,
    offset: int | torch.Tensor = 0,
    window: int = 0,
) -> torch.Tensor:
    """Boolean (B, 1, Tq, Tk) mask: causal, within one document, optionally a sliding window.
    Query i of row b sits at slot offset + i of the key sequence (`offset`: one for all rows,
    or a (B,) tensor, one per row)."""
    tq, tk = doc_q.shape[1], doc_k.shape[1]
    device = doc_q.device
    if isinstance(offset, int):
        q_slot = torch.arange(offset, offset + tq, device=device)[None, :, None]
    else:
        q_slot = offset[:, None, None] + torch.arange(tq, device=device)[None, :, None]
    k_slot = torch.arange(tk, device=device)[None, None, :]
    allowed = k_slot <= q_slot
    if window:
        allowed = allowed & (q_slot - k_slot < window)
    return (allowed & (doc_q[:, :, None] == doc_k[:, None, :]))[:, None]


def document_block_mask(doc: torch.Tensor, window: int = 0) -> BlockMask:
    """FlexAttention's block mask for causal attention within documents (and a window)."""

    def mask_mod(
        b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        allowed = (doc[b, q] == doc[b, kv]) & (kv <= q)
        return allowed & (q - kv < window) if window else allowed

    b, t = doc.shape
    return create_block_mask(mask_mod, b, None, t, t, device=doc.device)


_compiled_flex = None


def _flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, enable_gqa: bool
) -> torch.Tensor:
    """FlexAttention; compiled on GPU (its fast path), eager elsewhere (a reference path)."""
    global _compiled_flex
    fn = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


# One more attention call costs about as much as this many query-key scores (measured on CPU:
# ~60 us of fixed cost per SDPA forward + backward, ~7 ns per score and head).
_CALL_COST = 64**2
# `attention: auto` groups documents for rows at least this long and uses the dense mask below:
# on CPU, per-group gathers cost more than the masked scores they save in rows of 512 tokens or
# fewer, and save 1.5-2x of the attention at 1024 (docs/benchmarks.md).
VARLEN_MIN_LEN = 1024


@dataclass
class DocumentGroups:
    """The packed documents of a batch regrouped for attention: documents of similar length are
    gathered into a few dense (n, L) batches, each run as plain causal attention.

    A document is right-padded to its group's length L with copies of its first token; causal
    attention never lets a real query see those pads, and their outputs are dropped.
    """

    shapes: list[tuple[int, int]]  # (n, L) of each group
    index: torch.Tensor  # (sum n * L,): flat token index (row * T + t) of every padded slot
    position: torch.Tensor  # (B * T,): each token's slot in `index`


def document_groups(doc: torch.Tensor) -> DocumentGroups:
    """Group the documents (runs of equal id in a row) of `doc` (B, T) by length.

    Documents sorted longest first are cut into groups that minimise the computed scores plus a
    fixed cost per call: a group of n documents, the longest L, costs n * L^2 + `_CALL_COST`.
    Cutting inside a run of equal lengths never helps (moving the cut to the run's end lowers
    the cost), so the exact dynamic programme runs over the distinct lengths only. Built on the
    CPU from one copy of `doc`, then moved to its device in one transfer per tensor."""
    b, t = doc.shape
    rows = doc.cpu()
    flat = rows.reshape(-1)
    new_doc = torch.ones_like(flat, dtype=torch.bool)
    new_doc[1:] = flat[1:] != flat[:-1]
    new_doc[::t] = True  # a row always starts a document
    starts = new_doc.nonzero().squeeze(1)
    lengths = torch.diff(starts, append=starts.new_tensor([b * t]))
    by_length: dict[int, list[int]] = {}
    for n, s in zip(lengths.tolist(), starts.tolist()):
        by_length.setdefault(n, []).append(s)
    distinct = sorted(by_length, reverse=True)
    counts = [0]
    for n in distinct:
        counts.append(counts[-1] + len(by_length[n]))
    best = [0.0] + [float("inf")] * len(distinct)  # best[j]: cost of the j longest lengths
    cut = [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        for i in range(j):
            cost = best[i] + (counts[j] - counts[i]) * distinct[i] ** 2 + _CALL_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(distinct)
    while j:
        groups.append([(n, s) for n in distinct[cut[j] : j] for s in by_length[n]])
        j = cut[j]
    groups.reverse()
    shapes, index, position = [], [], torch.empty(b * t, dtype=torch.long)
    slot = 0
    for group in groups:
        n, s = (torch.tensor(c) for c in zip(*group))
        offsets = torch.arange(group[0][0])
        real = offsets[None] < n[:, None]
        idx = torch.where(real, s[:, None] + offsets[None], s[:, None])
        slots = slot + torch.arange(idx.numel()).view_as(idx)
        position[idx[real]] = slots[real]
        shapes.append(tuple(idx.shape))
        index.append(idx.flatten())
        slot += idx.numel()
    device = doc.device
    return DocumentGroups(shapes, torch.cat(index).to(device), position.to(device))


@torch.compiler.disable  # data-dependent shapes: compiled blocks call it eagerly
def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: DocumentGroups, enable_gqa: bool
) -> torch.Tensor:
    """Causal attention inside each document: one SDPA call per group of similar-length
    documents (`document_groups`), so no score across documents is ever computed."""
    b, h, t, d = q.shape

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (B, H, T, D) -> (B * T, H, D)
        return x.transpose(1, 2).reshape(b * t, x.shape[1], d)

    # One gather per tensor and one for the output: the backward of each is then a single
    # scatter, not one full-size zero fill per group.
    sizes = [n * length for n, length in groups.shapes]
    per_group = zip(*(tokens(x)[groups.index].split(sizes) for x in (q, k, v)), groups.shapes)
    outs = []
    for qg, kg, vg, (n, length) in per_group:
        qg, kg, vg = (x.view(n, length, x.shape[1], d).transpose(1, 2) for x in (qg, kg, vg))
        out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=enable_gqa)
        outs.append(out.transpose(1, 2).reshape(n * length, h, d))
    return torch.cat(outs)[groups.position].view(b, t, h, d).transpose(1, 2)


# What every layer receives, built once per forward: a dense additive mask (`sdpa`), a block
# mask (`flex`), length groups (`varlen`), or None for plain causal attention.
AttentionMask = torch.Tensor | BlockMask | DocumentGroups | None


def additive_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The boolean mask as 0 / -inf in the attention's dtype, made once per forward: SDPA would
    otherwise convert it in every layer and keep each copy for the backward pass."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, float("-inf"))


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.hd = cfg.heads, cfg.kv_heads, cfg.resolved_head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.heads * self.hd, cfg.dim, bias=cfg.o_bias)
        self.q_norm = norm_layer(cfg.norm, self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = norm_layer(cfg.norm, self.hd, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        cache: KVCache | SlotView | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        gqa = self.heads != self.kv_heads
        if isinstance(mask, BlockMask):
            out = _flex(q, k, v, mask, gqa)
        elif isinstance(mask, DocumentGroups):
            out = grouped_attention(q, k, v, mask, gqa)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class SwiGLUConfig(FFNConfig):
    type: str = "swiglu"  # no options of its own: the width is `decoder.ffn_dim`


# An FFN is built as `builder(decoder_cfg, layer_index)` (the index lets a type vary by depth,
# e.g. experts every other block); its options are `decoder_cfg.ffn`.
@FFNS.register("swiglu", SwiGLUConfig)
def swiglu(cfg: DecoderConfig, layer: int) -> nn.Module:
    return SwiGLU(cfg)


@dataclass
class MLPConfig(FFNConfig):
    """An ungated FFN, up -> activation -> down (Persimmon: squared ReLU, with biases)."""

    type: str = "mlp"
    activation: str = "relu2"  # one of `mm1.config.ACTIVATIONS`
    bias: bool = True

    def validate(self, key: str, model: ModelConfig) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"{key}.activation={self.activation!r} is not one of {', '.join(ACTIVATIONS)}"
            )


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig, opts: MLPConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=opts.bias)
        self.act = activation(opts.activation)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=opts.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


@FFNS.register("mlp", MLPConfig)
def mlp(cfg: DecoderConfig, layer: int) -> nn.Module:
    return MLP(cfg, cfg.ffn)


AuxLosses = dict[str, torch.Tensor]


class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int = 0) -> None:
        super().__init__()
        self.input_layernorm = norm_layer(cfg.norm, cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = norm_layer(cfg.norm, cfg.dim, cfg.norm_eps)
        self.mlp = FFNS[cfg.ffn.type].value(cfg, layer)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        cache: KVCache | SlotView | None = None,
        layer: int = 0,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AuxLosses]:
        """The block's output and its FFN's auxiliary losses (empty for a dense FFN). An FFN
        that routes tokens (`routes_tokens`) also gets `token_mask`, the tokens its routing
        statistics count (None: all)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        h = self.post_attention_layernorm(x)
        out = self.mlp(h, token_mask) if getattr(self.mlp, "routes_tokens", False) else self.mlp(h)
        aux: AuxLosses = {}
        if isinstance(out, tuple):
            out, aux = out
        return x + out, aux


class Decoder(nn.Module):
    """Token ids or embeddings (B, T) -> logits (B, T, vocab)."""

    def __init__(self, cfg: DecoderConfig, init_std: float = 0.02) -> None:
        super().__init__()
        cfg.ffn = parse_component(FFNS, "model.decoder.ffn", cfg.ffn, FFNConfig)
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.layers))
        self.norm = norm_layer(cfg.norm, cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every weight in place (also sharded ones, after `to_empty`)."""
        init_weights(self, self.init_std)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Compute the non-persistent buffers (RoPE inverse frequencies), which no state dict
        holds: after `to_empty`, or after weights were assigned to a model built on the meta
        device. They go where the weights are; on a model still all on meta, nothing to do."""
        device = self.inv_freq.device
        if device.type == "meta":
            device = self.embed_tokens.weight.device
        if device.type != "meta":
            self.inv_freq = rope_inv_freq(self.cfg).to(device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | SlotView | None = None,
        return_hidden: bool = False,
        aux_losses: AuxLosses | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (or the final hidden states with `return_hidden`); the blocks' auxiliary
        losses are summed over blocks into `aux_losses` by name when a mapping is given.
        `token_mask` (B, T) marks the tokens a router's statistics count (not padding)."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        offset, end = cache.begin(t) if cache is not None else (0, t)
        if position_ids is None:
            start = offset if isinstance(offset, int) else offset[:, None]
            position_ids = (torch.arange(t, device=x.device) + start).expand(b, t)
        mask = None
        window = self.cfg.sliding_window if self.cfg.sliding_window < end else 0
        if cache is not None:
            doc_q = (
                document_ids
                if document_ids is not None
                else torch.zeros(b, t, dtype=torch.long, device=x.device)
            )
            mask = attention_mask(doc_q, cache.update_doc(doc_q), offset, window)
        elif document_ids is not None or window:
            doc = document_ids if document_ids is not None else torch.zeros_like(position_ids)
            if self.cfg.attention == "flex":
                mask = document_block_mask(doc, window)
            elif self._grouped(t) and not window:
                mask = document_groups(doc)
            else:
                mask = attention_mask(doc, doc, 0, window)
        if isinstance(mask, torch.Tensor):
            mask = additive_mask(mask, x)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids)
        for i, layer in enumerate(self.layers):
            x, aux = layer(x, cos, sin, mask, cache, i, token_mask)
            if aux_losses is not None:
                for name, value in aux.items():
                    aux_losses[name] = aux_losses[name] + value if name in aux_losses else value
        if cache is not None:
            cache.advance(t)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    def _grouped(self, length: int) -> bool:
        """Whether rows of `length` tokens attend through length-grouped documents."""
        mode = self.cfg.attention
        return mode == "varlen" or (mode == "auto" and length >= VARLEN_MIN_LEN)

    @torch.no_grad()
    def resize_token_embeddings(self, vocab_size: int, new_ids: Sequence[int] = ()) -> None:
        """Grow (or shrink) the vocabulary. Rows past the old size and the rows of `new_ids`
        (tokens new to the checkpoint's tokenizer, which a padded vocabulary may already hold
        untrained rows for) start at the mean of the other existing rows, so new special tokens
        begin as an 'average' token. A tied head stays tied."""
        old = self.cfg.vocab_size
        fresh = [i for i in new_ids if i < min(old, vocab_size)]
        if vocab_size == old and not fresh:
            return

        def resized(weight: torch.Tensor) -> torch.Tensor:
            return resize_vocab_rows(weight, vocab_size, new_ids)

        self.embed_tokens = nn.Embedding.from_pretrained(
            resized(self.embed_tokens.weight), freeze=False
        )
        if self.cfg.tie_embeddings:
            self.lm_head = nn.Linear(self.cfg.dim, vocab_size, bias=False, device="meta")
            self.lm_head.weight = self.embed_tokens.weight
        else:
            head = nn.Linear(self.cfg.dim, vocab_size, bias=False, device="meta")
            head.weight = nn.Parameter(resized(self.lm_head.weight))
            self.lm_head = head
        self.cfg.vocab_size = vocab_size


def resize_vocab_rows(
    weight: torch.Tensor, vocab_size: int, new_ids: Sequence[int] = ()
) -> torch.Tensor:
    """`weight` (V, D) with `vocab_size` rows: rows past V and the rows of `new_ids` (tokens with
    no trained row) are the mean of the other kept rows; rows cut off by a shrink (a padded
    vocabulary's unused rows) do not count in the mean."""
    old = weight.shape[0]
    keep = min(old, vocab_size)
    fresh = sorted({i for i in new_ids if i < keep})
    if vocab_size == old and not fresh:
        return weight
    new = weight.new_empty(vocab_size, weight.shape[1])
    new[:keep] = weight[:keep]
    trained = torch.ones(keep, dtype=torch.bool, device=weight.device)
    trained[fresh] = False
    mean = weight[:keep][trained].float().mean(0).to(weight.dtype)
    new[fresh] = mean
    new[old:] = mean
    return new
