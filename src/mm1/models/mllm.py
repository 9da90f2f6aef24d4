"""The MM1 model: image encoder -> connector -> image tokens written into the decoder's input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mm1.batch import IGNORE_INDEX
from mm1.config import ModelConfig, resolve_components
from mm1.models.connectors import build_connector
from mm1.models.decoder import Decoder, KVCache
from mm1.models.layers import init_weights
from mm1.models.vision import VisionTransformer


class Detokenizer(Protocol):
    def decode(self, ids: list[int]) -> str: ...


@dataclass
class MM1Output:
    logits: torch.Tensor | None  # (B, T, vocab); None for a loss-only call (see `MM1.forward`)
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None  # summed cross-entropy over the label tokens
    num_label_tokens: int = 0
    token_loss: torch.Tensor | None = None  # (B, T) cross-entropy per position, 0 where unlabelled
    # The blocks' auxiliary losses by name (e.g. a router's load balance), unweighted and
    # normalised like `loss` (see `MM1.forward`); empty for a dense model.
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


def _multi_rank() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class MM1(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = resolve_components(cfg)
        self.vision = VisionTransformer(cfg.vision)
        self.connector = build_connector(
            cfg.connector, cfg.vision.width, cfg.vision.grid, cfg.decoder.dim, cfg.init_std
        )
        self.decoder = Decoder(cfg.decoder, cfg.init_std)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every weight in place: used after `to_empty` when the model was built on
        the meta device and sharded before any weight existed."""
        self.vision.reset_parameters()
        init_weights(self.connector, self.cfg.init_std)
        if hasattr(self.connector, "reset_parameters"):
            self.connector.reset_parameters()
        self.decoder.init_weights()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Compute the non-persistent buffers, which no checkpoint holds, where the weights are:
        after `to_empty`, or after a meta-built model got its weights by assignment."""
        self.decoder.init_buffers()

    @property
    def image_token_id(self) -> int:
        return self.cfg.resolved_image_token_id

    @property
    def num_image_tokens(self) -> int:
        return self.connector.num_tokens

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, Q, D_llm)."""
        return self.connector(self.vision(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with every image's Q slots replaced by its image tokens."""
        embeds = self.decoder.embed(input_ids)
        slots = input_ids == self.image_token_id
        n_slots = int(slots.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        q = self.num_image_tokens
        if n_slots != n_images * q:
            raise ValueError(
                f"input_ids hold {n_slots} image slots but {n_images} images x {q} tokens = "
                f"{n_images * q} image tokens were given"
            )
        if n_images:
            feats = self.image_features(pixel_values).to(embeds.dtype)
            embeds = embeds.masked_scatter(slots[..., None], feats.reshape(-1, feats.shape[-1]))
        elif (self.training and torch.is_grad_enabled()) or _multi_rank():
            # A text-only batch still runs the encoder once (on a blank image, with zero
            # weight), so every rank calls the same collectives: DDP's gradient buckets in
            # training, FSDP's parameter all-gathers in every forward (validation included).
            size = self.cfg.vision.image_size
            blank = embeds.new_zeros(1, 3, size, size)
            embeds = embeds + 0.0 * self.image_features(blank).sum().to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        num_label_tokens: int | None = None,
        return_logits: bool | None = None,
    ) -> MM1Output:
        """Logits, and with `labels` the cross-entropy over the label tokens.

        The loss is normalised by `num_label_tokens` when given (the count over the whole step:
        every micro-batch and rank, so accumulation and world size leave it unchanged), else by
        this batch's own count. With labels, the output head runs only on the labelled
        positions (image slots and prompts carry no target), and the full (B, T, vocab) logits
        are returned only when `return_logits=True`: at a real vocabulary they are the largest
        activation of the step.

        Auxiliary losses (means over this batch, summed over blocks) are normalised like the
        cross-entropy: scaled by this batch's share of the step's label tokens, so their sum
        over micro-batches and ranks is the label-weighted mean, whatever the accumulation.
        """
        embeds = self.embed(input_ids, pixel_values)
        if return_logits is None:
            return_logits = labels is None
        aux: dict[str, torch.Tensor] = {}
        hidden = self.decoder(
            inputs_embeds=embeds,
            position_ids=position_ids,
            document_ids=document_ids,
            return_hidden=True,
            aux_losses=aux,
        )
        logits = self.decoder.lm_head(hidden) if return_logits else None
        if labels is None:
            return MM1Output(logits, aux_losses=aux)
        labelled = labels != IGNORE_INDEX
        if logits is not None:
            label_logits = logits[labelled]
        else:
            label_logits = self.decoder.lm_head(hidden[labelled])
        per_label = F.cross_entropy(label_logits.float(), labels[labelled], reduction="none")
        token_loss = per_label.new_zeros(labels.shape).masked_scatter(labelled, per_label)
        loss_sum = per_label.sum()
        n = per_label.numel()
        denom = num_label_tokens if num_label_tokens is not None else n
        share = n / max(denom, 1)
        aux = {k: v * share for k, v in aux.items()}
        return MM1Output(logits, loss_sum / max(denom, 1), loss_sum, n, token_loss, aux)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        pixel_values: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int = 0,
        stop_strings: Sequence[str] = (),
        tokenizer: Detokenizer | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Continue each prompt; returns the new tokens of each.

        `prompts` are token ids with image slots already expanded; `pixel_values` holds the
        images of all prompts in slot order. A sequence ends at an EOS id or once its decoded
        text contains one of `stop_strings` (the tokens up to and including that point are kept;
        needs `tokenizer`).
        """
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the generated text")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        device = self.decoder.embed_tokens.weight.device
        b, longest = len(prompts), max(len(p) for p in prompts)
        # Left padding: padding is document 0, each prompt document 1.
        ids = torch.full((b, longest), pad_token_id, dtype=torch.long, device=device)
        doc = torch.zeros(b, longest, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p) :] = torch.tensor(list(p), device=device)
            doc[i, longest - len(p) :] = 1
        pos = (doc.cumsum(1) - 1).clamp(min=0)
        embeds = self.embed(ids, pixel_values)

        cache = None
        if use_cache:
            dtype = self.decoder.embed_tokens.weight.dtype
            cache = KVCache(self.cfg.decoder, b, longest + max_new_tokens, device, dtype)
        out: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        step_embeds, step_pos, step_doc = embeds, pos, doc
        for _ in range(max_new_tokens):
            logits = self.decoder(
                inputs_embeds=step_embeds, position_ids=step_pos, document_ids=step_doc, cache=cache
            )[:, -1].float()
            nxt = self._next_token(logits, do_sample, temperature, top_k, top_p, generator)
            chosen = nxt.tolist()  # one device-to-host copy per step, not one per sequence
            for i in range(b):
                if done[i]:
                    continue
                out[i].append(chosen[i])
                if chosen[i] in eos or _hit_stop(out[i], stop_strings, tokenizer):
                    done[i] = True
            if all(done):
                break
            new_embeds = self.decoder.embed(nxt[:, None])
            new_pos = pos[:, -1:] + 1
            pos = torch.cat([pos, new_pos], 1)
            if cache is not None:
                step_embeds, step_pos, step_doc = new_embeds, new_pos, torch.ones_like(new_pos)
            else:
                embeds = torch.cat([embeds, new_embeds], 1)
                doc = torch.cat([doc, torch.ones_like(new_pos)], 1)
                step_embeds, step_pos, step_doc = embeds, pos, doc
        return out

    @torch.no_grad()
    def generate_beam(
        self,
        prompts: Sequence[Sequence[int]],
        pixel_values: torch.Tensor | None = None,
        *,
        num_beams: int = 3,
        max_new_tokens: int = 20,
        length_penalty: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int = 0,
        stop_strings: Sequence[str] = (),
        tokenizer: Detokenizer | None = None,
    ) -> list[list[int]]:
        """Beam search (KV cache); returns the new tokens of each prompt's best hypothesis.

        Inputs as in `generate`. A hypothesis ends at an EOS id or a stop string (the ending
        token is kept, as in `generate`) and is scored by its summed log-probability divided by
        (its number of new tokens) ** length_penalty; at `max_new_tokens` the open beams join the
        ended ones. As in HF's default (`early_stopping=False`), a prompt is done once
        `num_beams` hypotheses have ended and no open beam scores better at the current length.
        `num_beams=1` is greedy decoding.
        """
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the generated text")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        device = self.decoder.embed_tokens.weight.device
        b, k, longest = len(prompts), num_beams, max(len(p) for p in prompts)
        ids = torch.full((b, longest), pad_token_id, dtype=torch.long, device=device)
        doc = torch.zeros(b, longest, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p) :] = torch.tensor(list(p), device=device)
            doc[i, longest - len(p) :] = 1
        pos = (doc.cumsum(1) - 1).clamp(min=0)
        dtype = self.decoder.embed_tokens.weight.dtype
        cache = KVCache(self.cfg.decoder, b, longest + max_new_tokens, device, dtype)
        logits = self.decoder(
            inputs_embeds=self.embed(ids, pixel_values),
            position_ids=pos,
            document_ids=doc,
            cache=cache,
        )[:, -1].float()
        rows = torch.arange(b, device=device).repeat_interleave(k)
        _reorder_cache(cache, rows)  # every prompt's prefix, once per beam
        logprobs = logits.log_softmax(-1)[rows]
        next_pos = pos[:, -1:].repeat_interleave(k, 0) + 1
        vocab = logprobs.shape[-1]
        neg_inf = float("-inf")
        scores = torch.full((b, k), neg_inf, device=device)
        scores[:, 0] = 0.0  # one live beam to start with, so no duplicates
        beams: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(b)]
        ended: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
        done = [False] * b

        def add_ended(i: int, score: float, seq: list[int]) -> None:
            ended[i].append((score, seq))
            ended[i].sort(key=lambda x: -x[0])
            del ended[i][k:]

        for step in range(max_new_tokens):
            length = float(step + 1) ** length_penalty
            cand = (scores.reshape(b * k, 1) + logprobs).reshape(b, k * vocab)
            top_scores, top_idx = cand.topk(min(2 * k, k * vocab), dim=1)
            top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
            new_rows: list[int] = []
            new_tokens: list[int] = []
            new_scores: list[float] = []
            for i in range(b):
                live: list[tuple[float, int, int]] = []
                for s, idx in zip(top_scores[i], top_idx[i]):
                    if done[i] or s == neg_inf or len(live) == k:
                        break
                    beam, tok = divmod(idx, vocab)
                    seq = [*beams[i][beam], tok]
                    if tok in eos or _hit_stop(seq, stop_strings, tokenizer):
                        add_ended(i, s / length, seq)
                    else:
                        live.append((s, beam, tok))
                if not done[i] and not live:
                    done[i] = True  # every candidate ended
                elif not done[i] and len(ended[i]) >= k:
                    best_live = max(s for s, _, _ in live) / length
                    done[i] = best_live <= ended[i][-1][0]
                if done[i]:
                    live = []
                new_beams = [[*beams[i][beam], tok] for _, beam, tok in live]
                pad = k - len(live)
                beams[i] = new_beams + [[] for _ in range(pad)]
                new_rows += [i * k + beam for _, beam, _ in live] + [i * k] * pad
                new_tokens += [tok for _, _, tok in live] + [pad_token_id] * pad
                new_scores += [s for s, _, _ in live] + [neg_inf] * pad
            scores = torch.tensor(new_scores, device=device).reshape(b, k)
            if all(done):
                break
            if step == max_new_tokens - 1:
                for i in range(b):  # out of tokens: the open beams end here
                    for j in range(k):
                        if scores[i, j] > neg_inf:
                            add_ended(i, float(scores[i, j]) / length, beams[i][j])
                break
            _reorder_cache(cache, torch.tensor(new_rows, device=device))
            tokens = torch.tensor(new_tokens, device=device)[:, None]
            logits = self.decoder(
                inputs_embeds=self.decoder.embed(tokens),
                position_ids=next_pos,
                document_ids=torch.ones_like(next_pos),
                cache=cache,
            )[:, -1].float()
            logprobs = logits.log_softmax(-1)
            next_pos = next_pos + 1
        return [ended[i][0][1] if ended[i] else [] for i in range(b)]

    @staticmethod
    def _next_token(
        logits: torch.Tensor,
        do_sample: bool,
        temperature: float,
        top_k: int,
        top_p: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if not do_sample or temperature <= 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            # drop a token once the mass before it already reaches top_p (keep at least one)
            drop = (cum - sorted_logits.softmax(-1)) >= top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _reorder_cache(cache: KVCache, rows: torch.Tensor) -> None:
    """Make row r of the cache a copy of row rows[r] (beam search's reordering)."""
    cache.k = [k.index_select(0, rows) for k in cache.k]
    cache.v = [v.index_select(0, rows) for v in cache.v]
    cache.doc = cache.doc.index_select(0, rows)


def _hit_stop(
    tokens: list[int], stop_strings: Sequence[str], tokenizer: Detokenizer | None
) -> bool:
    if not stop_strings or tokenizer is None:
        return False
    # A stop string can span tokens; decoding a tail long enough for the longest one suffices.
    tail = tokens[-(2 * max(len(s) for s in stop_strings) + 8) :]
    text = tokenizer.decode(tail)
    return any(s in text for s in stop_strings)
