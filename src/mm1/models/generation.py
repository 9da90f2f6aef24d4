"""Generation with MM1: prompts in, new tokens out. The model only runs forwards; this module
prepares prompts (left padding), chooses tokens (greedy or sampled), runs beam search, and
drives a KV cache step by step.

`DecodeBatch` is the step-wise core: sequences join (`prefill`), each `step` gives every current
sequence one token, and sequences leave (`release`) between steps, each with its own cache row,
length and positions; `generate` is one such batch run to the end.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from mm1.config import ConfigError
from mm1.models.compiled_decode import CompiledDecode, decode_logits
from mm1.models.kv_cache import KVCache
from mm1.models.mllm import MLLM


def check_prompt_fits(prompt_tokens: int, context: int) -> int:
    """The room `context` (the model's max_seq_len) leaves after a prompt of `prompt_tokens`;
    a prompt that leaves none is refused, in the words `mm1 serve` uses (its 4xx
    context_length_exceeded), rather than decoded at positions the model never trained on."""
    room = context - prompt_tokens
    if room < 1:
        raise ConfigError(
            f"the prompt takes {prompt_tokens} tokens, more than the model's context of "
            f"{context} leaves room for an answer"
        )
    return room


class Detokenizer(Protocol):
    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits: the most likely one unless `do_sample`
    (with temperature > 0), then from the temperature-scaled, top-k and top-p cut distribution."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class LeftPadded:
    """Prompts right-aligned in one (B, T) batch: padding is document 0, each prompt document 1,
    and positions count from 0 at each prompt's first token (pads sit at 0)."""

    input_ids: torch.Tensor
    document_ids: torch.Tensor  # 1 on prompt tokens: also the attention mask HF models take
    position_ids: torch.Tensor


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> LeftPadded:
    """Left-pad token-id prompts to the longest, so every prompt's next token is the last."""
    b, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, longest), pad_token_id, dtype=torch.long)
    doc = torch.zeros(b, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        doc[i, longest - len(p) :] = 1
    pos = (doc.cumsum(1) - 1).clamp(min=0)
    return LeftPadded(ids.to(device), doc.to(device), pos.to(device))


def next_token(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, vocab) fp32 logits -> (B,) chosen token ids."""
    if not sampling.do_sample or sampling.temperature <= 0:
        return logits.argmax(-1)
    # Shifted to a max of 0 first: a tiny temperature then sends the others to -inf (greedy),
    # where dividing first overflows to inf and the softmax to NaN.
    logits = (logits - logits.amax(-1, keepdim=True)) / sampling.temperature
    if sampling.top_k > 0:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (keep at least one)
        drop = (cum - sorted_logits.softmax(-1)) >= sampling.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def hit_stop(tokens: list[int], stop_strings: Sequence[str], tokenizer: Detokenizer | None) -> bool:
    """Whether the decoded `tokens` contain one of `stop_strings`."""
    if not stop_strings or tokenizer is None:
        return False
    # A stop string can span tokens; decoding a tail long enough for the longest one suffices.
    tail = tokens[-(2 * max(len(s) for s in stop_strings) + 8) :]
    text = tokenizer.decode(tail)
    return any(s in text for s in stop_strings)


def _check_prompts(
    prompts: Sequence[Sequence[int]], stop_strings: Sequence[str], tokenizer: Detokenizer | None
) -> None:
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")


def _eos_ids(eos_token_id: int | Sequence[int] | None) -> set[int]:
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())


def _device(model: MLLM) -> torch.device:
    return model.decoder.embed_tokens.weight.device


def _prefill(
    model: MLLM,
    prompts: Sequence[Sequence[int]],
    pixel_values: torch.Tensor | None,
    pad_token_id: int,
    cache: KVCache | None,
    image_crops: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LeftPadded, torch.Tensor]:
    """Run the left-padded prompts; (next-token logits (B, vocab) in fp32, the padded batch,
    its input embeddings)."""
    batch = left_pad(prompts, pad_token_id, _device(model))
    embeds = model.embed(batch.input_ids, pixel_values, image_crops, image_sizes)
    logits = model.decoder(
        inputs_embeds=embeds,
        position_ids=batch.position_ids,
        document_ids=batch.document_ids,
        cache=cache,
    )
    return model.text_logits(logits[:, -1]).float(), batch, embeds


@dataclass
class _Sequence:
    row: int  # its cache row
    position: int  # position of the next token it feeds
    token: int | None = None  # the token chosen last step, fed at the next one
    # Its own way of choosing tokens (a server's per-request settings); None: the batch's.
    sampling: Sampling | None = None
    generator: torch.Generator | None = None


class DecodeBatch:
    """Sequences decoded together one token per `step`, joining and leaving between steps.

    Each sequence owns one row of a `max_batch`-row KV cache of `max_len` slots (prompt plus
    new tokens) with its own length and positions; `prefill` puts new prompts into free rows
    (left-padded among themselves), `release` frees a row. A token chosen by `step` is fed to
    the model at the next `step`, so a sequence released after its last token costs nothing.
    With all sequences joining at once and none leaving, the tokens are `generate`'s.

    With `compile`, each step runs every cache row at one fixed shape through `torch.compile`
    (on CUDA replayed as a CUDA graph; `mm1.models.compiled_decode`): the first steps compile,
    later ones cost a fraction of the eager step's launches. The prefill stays eager.
    """

    def __init__(
        self,
        model: MLLM,
        max_batch: int,
        max_len: int,
        *,
        sampling: Sampling = Sampling(),
        generator: torch.Generator | None = None,
        pad_token_id: int = 0,
        compile: bool = False,
    ) -> None:
        weight = model.decoder.embed_tokens.weight
        self.model = model
        self._compiled = CompiledDecode(model, max_batch, max_len) if compile else None
        if self._compiled is not None:
            self.cache = self._compiled.cache
        else:
            self.cache = KVCache(model.cfg.decoder, max_batch, max_len, weight.device, weight.dtype)
        self.sampling = sampling
        self.generator = generator
        self.pad_token_id = pad_token_id
        self._free = list(range(max_batch))
        self._seqs: dict[int, _Sequence] = {}  # in joining order: the order of a step's batch
        self._next_id = 0
        # Next-token logits not yet used: (sequence ids, (n, vocab)) per prefill or step.
        self._pending: list[tuple[list[int], torch.Tensor]] = []
        # The last step's choices on the device, so feeding them needs no host-to-device copy.
        self._chosen: tuple[list[int], torch.Tensor] | None = None

    @property
    def active(self) -> list[int]:
        """The ids of the current sequences, in the order a step handles them."""
        return list(self._seqs)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    @torch.no_grad()
    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        pixel_values: torch.Tensor | None = None,
        image_crops: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        *,
        sampling: Sequence[Sampling | None] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> list[int]:
        """Add sequences (token ids with image slots expanded; their images' crops in slot
        order, with `image_crops` / `image_sizes` per image as in `Batch`); returns their ids.
        Their first tokens come with the next `step`. `sampling` and `generators` give each
        prompt its own way of choosing tokens (None: the batch's); a sequence with its own
        generator draws the same tokens whatever runs beside it."""
        _check_prompts(prompts, (), None)
        sampling = list(sampling) if sampling is not None else [None] * len(prompts)
        generators = list(generators) if generators is not None else [None] * len(prompts)
        if not len(sampling) == len(generators) == len(prompts):
            raise ValueError("sampling and generators need one entry per prompt")
        if len(prompts) > len(self._free):
            raise ValueError(f"{len(prompts)} prompts but {len(self._free)} free cache rows")
        rows = self._free[: len(prompts)]
        self.cache.reset(rows)
        view = self.cache.select(rows)
        logits, _, _ = _prefill(
            self.model, prompts, pixel_values, self.pad_token_id, view, image_crops, image_sizes
        )
        self._free = self._free[len(prompts) :]  # only now: a failed prefill keeps its rows free
        ids = list(range(self._next_id, self._next_id + len(prompts)))
        self._next_id += len(prompts)
        for sid, row, p, how, gen in zip(ids, rows, prompts, sampling, generators):
            self._seqs[sid] = _Sequence(row, position=len(p), sampling=how, generator=gen)
        self._pending.append((ids, logits))
        return ids

    @torch.no_grad()
    def step(self) -> dict[int, int]:
        """One new token for every current sequence: {sequence id: token}."""
        if not self._seqs:
            return {}
        feed = [sid for sid, s in self._seqs.items() if s.token is not None]
        if feed:
            self._pending.append((feed, self._decode(feed)))
        order = self.active
        chosen = self._choose(self._take_logits(order), [self._seqs[sid] for sid in order])
        tokens = chosen.tolist()  # one device-to-host copy per step, not one per sequence
        for sid, tok in zip(order, tokens):
            self._seqs[sid].token = tok
        self._chosen = (order, chosen)
        return dict(zip(order, tokens))

    def release(self, seq_id: int) -> None:
        """Drop a sequence; its cache row is free for the next `prefill`."""
        if seq_id not in self._seqs:
            raise KeyError(f"no current sequence {seq_id}")
        bisect.insort(self._free, self._seqs.pop(seq_id).row)

    def _decode(self, feed: list[int]) -> torch.Tensor:
        seqs = [self._seqs[sid] for sid in feed]
        device = self.cache.doc.device
        if self._chosen is not None and self._chosen[0] == feed:
            tokens = self._chosen[1]
        else:
            tokens = torch.tensor([s.token for s in seqs], device=device)
        rows = [s.row for s in seqs]
        if self._compiled is not None:
            logits = self._compiled(rows, tokens, [s.position for s in seqs])
        else:
            positions = torch.tensor([[s.position] for s in seqs], device=device)
            view = self.cache.select(rows)
            logits = decode_logits(self.model, view, tokens[:, None], positions)
        for s in seqs:  # only now: a failed forward (a full cache) leaves the state as it was
            s.position += 1
            s.token = None
        return logits

    def _choose(self, logits: torch.Tensor, seqs: list[_Sequence]) -> torch.Tensor:
        """The next token of each row of `logits`: the batch's choice for every sequence without
        settings of its own (one call), each other row chosen alone with its own generator."""
        own = [i for i, s in enumerate(seqs) if s.sampling is not None or s.generator is not None]
        if not own:
            return next_token(logits, self.sampling, self.generator)
        chosen = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        shared = [i for i in range(len(seqs)) if i not in set(own)]
        if shared:
            index = torch.tensor(shared, device=logits.device)
            chosen[index] = next_token(logits[index], self.sampling, self.generator)
        for i in own:
            s = seqs[i]
            how, gen = s.sampling or self.sampling, s.generator or self.generator
            chosen[i] = next_token(logits[i : i + 1], how, gen)[0]
        return chosen

    def _take_logits(self, order: list[int]) -> torch.Tensor:
        """The pending logits of the sequences in `order`, as one (n, vocab) batch."""
        pending, self._pending = self._pending, []
        if len(pending) == 1 and pending[0][0] == order:
            return pending[0][1]
        where: dict[int, int] = {}
        start = 0
        for ids, logits in pending:  # a released sequence's logits are simply not taken
            where.update((sid, start + i) for i, sid in enumerate(ids))
            start += logits.shape[0]
        stacked = torch.cat([logits for _, logits in pending])
        index = torch.tensor([where[sid] for sid in order], device=stacked.device)
        return stacked.index_select(0, index)


class _Recompute:
    """`DecodeBatch`'s prefill and step without a KV cache: every step runs the whole sequence
    again. A reference for the cached path (tests), not for use."""

    def __init__(self, model: MLLM, sampling: Sampling, generator: torch.Generator | None) -> None:
        self.model, self.sampling, self.generator = model, sampling, generator

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        pixel_values: torch.Tensor | None,
        pad: int,
        image_crops: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> list[int]:
        batch = left_pad(prompts, pad, _device(self.model))
        self.embeds = self.model.embed(batch.input_ids, pixel_values, image_crops, image_sizes)
        self.doc, self.pos = batch.document_ids, batch.position_ids
        self.chosen: torch.Tensor | None = None
        return list(range(len(prompts)))

    def step(self) -> dict[int, int]:
        if self.chosen is not None:
            self.embeds = torch.cat(
                [self.embeds, self.model.decoder.embed(self.chosen[:, None])], 1
            )
            self.pos = torch.cat([self.pos, self.pos[:, -1:] + 1], 1)
            self.doc = torch.cat([self.doc, torch.ones_like(self.doc[:, -1:])], 1)
        logits = self.model.decoder(
            inputs_embeds=self.embeds, position_ids=self.pos, document_ids=self.doc
        )[:, -1]
        logits = self.model.text_logits(logits).float()
        self.chosen = next_token(logits, self.sampling, self.generator)
        return dict(enumerate(self.chosen.tolist()))


@torch.no_grad()
def generate(
    model: MLLM,
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
    image_crops: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """Continue each prompt; returns the new tokens of each.

    `prompts` are token ids with image slots already expanded; `pixel_values` holds the crops of
    all prompts' images in slot order (`image_crops` / `image_sizes` per image, as in `Batch`;
    the anyres layout needs the sizes). A sequence ends at an EOS id or once its decoded text contains one
    of `stop_strings` (the tokens up to and including that point are kept; needs `tokenizer`).
    Ended sequences keep decoding until all have ended, so a sampled batch draws the same random
    numbers whichever sequences end early. `compile` runs the decode steps compiled at fixed
    shapes (`DecodeBatch`); the tokens are the same up to floating-point rounding.
    """
    _check_prompts(prompts, stop_strings, tokenizer)
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    if compile and not use_cache:
        raise ValueError("compile=True compiles the cached decode step: it needs use_cache=True")
    eos = _eos_ids(eos_token_id)
    sampling = Sampling(do_sample, temperature, top_k, top_p)
    if use_cache:
        longest = max(len(p) for p in prompts)
        batch = DecodeBatch(
            model,
            len(prompts),
            longest + max_new_tokens,
            sampling=sampling,
            generator=generator,
            pad_token_id=pad_token_id,
            compile=compile,
        )
        seqs = batch.prefill(prompts, pixel_values, image_crops, image_sizes)
    else:
        batch = _Recompute(model, sampling, generator)
        seqs = batch.prefill(prompts, pixel_values, pad_token_id, image_crops, image_sizes)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        chosen = batch.step()
        for i, sid in enumerate(seqs):
            if done[i]:
                continue
            out[i].append(chosen[sid])
            if chosen[sid] in eos or hit_stop(out[i], stop_strings, tokenizer):
                done[i] = True
        if all(done):
            break
    return out


@torch.no_grad()
def generate_beam(
    model: MLLM,
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
    image_crops: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
) -> list[list[int]]:
    """Beam search (KV cache); returns the new tokens of each prompt's best hypothesis.

    Inputs as in `generate`. A hypothesis ends at an EOS id or a stop string (the ending token is
    kept, as in `generate`) and is scored by its summed log-probability divided by (its number
    of new tokens) ** length_penalty; at `max_new_tokens` the open beams join the ended ones. As
    in HF's default (`early_stopping=False`), a prompt is done once `num_beams` hypotheses have
    ended and no open beam scores better at the current length. `num_beams=1` is greedy.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    _check_prompts(prompts, stop_strings, tokenizer)
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    eos = _eos_ids(eos_token_id)
    device = _device(model)
    b, k, longest = len(prompts), num_beams, max(len(p) for p in prompts)
    dtype = model.decoder.embed_tokens.weight.dtype
    cache = KVCache(model.cfg.decoder, b, longest + max_new_tokens, device, dtype)
    logits, batch, _ = _prefill(
        model, prompts, pixel_values, pad_token_id, cache, image_crops, image_sizes
    )
    rows = torch.arange(b, device=device).repeat_interleave(k)
    cache.reorder(rows)  # every prompt's prefix, once per beam
    logprobs = logits.log_softmax(-1)[rows]
    next_pos = batch.position_ids[:, -1:].repeat_interleave(k, 0) + 1
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
                if tok in eos or hit_stop(seq, stop_strings, tokenizer):
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
        cache.reorder(torch.tensor(new_rows, device=device))
        tokens = torch.tensor(new_tokens, device=device)[:, None]
        logprobs = decode_logits(model, cache, tokens, next_pos).log_softmax(-1)
        next_pos = next_pos + 1
    return [ended[i][0][1] if ended[i] else [] for i in range(b)]
