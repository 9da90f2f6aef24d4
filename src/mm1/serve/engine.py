"""Continuous batching: requests join and leave one running `DecodeBatch` at step boundaries.

One thread owns the model. Each loop it drops the requests that ended, were cancelled (a client
that went away) or ran out of time, prefills the waiting requests that fit in the free cache
rows (together, in one forward), and decodes one token for every running request. So a long
answer never holds up a short one behind it, as vLLM schedules. Greedy requests take the
argmax of their own logits row, so a request's greedy answer does not depend on what runs beside
it (up to float rounding across batch shapes, which a trained model's margins absorb).

Text reaches the caller through `on_event`, called from the engine's thread: pieces of the
answer as they become final (never a piece of a stop string, never half a character), then one
`done` or `error` event. A model whose chat template writes reasoning blocks (`<think>…</think>`)
has its answer split as vLLM's reasoning parsers do (`mm1.reasoning`): the block's text comes
as `reasoning` events, the answer after it as `text` events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mm1.data.tokenizer import Tokenizer
from mm1.models.compiled_decode import LENGTH_BUCKET
from mm1.models.generation import DecodeBatch, Sampling
from mm1.models.mllm import MLLM
from mm1.reasoning import ReasoningSplitter

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the caller should retry later (HTTP 429)."""


@dataclass(frozen=True)
class Request:
    """One completion: the prompt's ids (image slots expanded) and its images' pixels."""

    prompt: list[int]
    pixel_values: torch.Tensor | None  # every crop of its images, in slot order
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    timeout: float | None = None  # seconds from submission to the last token
    # Per image, as in `Batch`: its crop count and original (height, width) (tiled layouts).
    image_crops: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None
    # How its chat template writes reasoning blocks (`mm1.reasoning.chat_reasoning` with the
    # request's template variables): None for an answer as it is, else split into reasoning
    # and content, True when the prompt opened the block.
    reasoning: bool | None = None


@dataclass(frozen=True)
class Event:
    kind: str  # "text" | "reasoning" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # done: "stop" | "length"
    code: str | None = None  # error: "timeout" | "internal_error"


@dataclass
class Handle:
    """A submitted request: its counts so far, and `cancel` for a caller that gave up."""

    request: Request
    on_event: Callable[[Event], None]
    submitted: float = field(default_factory=time.monotonic)
    completion_tokens: int = 0
    first_token_at: float | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt)

    def cancel(self) -> None:
        """Free the request's slot at the next step boundary; no further events."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: float) -> bool:
        t = self.request.timeout
        return t is not None and now - self.submitted > t


class _Answer:
    """The text of one running request: decodes its tokens, holds back what may still turn
    out to be a stop string or an incomplete character, and knows when the answer ends. With
    `reasoning` (see `chat_reasoning`), the text is split into its reasoning block and the
    answer proper."""

    def __init__(
        self, handle: Handle, tokenizer: Tokenizer, stop_ids: set[int], reasoning: bool | None
    ) -> None:
        self.handle, self.tokenizer, self.stop_ids = handle, tokenizer, stop_ids
        self.tokens: list[int] = []
        self.sent = ""
        self.splitter = None if reasoning is None else ReasoningSplitter(opened=reasoning)

    def take(self, token: int) -> str | None:
        """Add a token; the finish reason once the answer has ended, else None."""
        h = self.handle
        h.completion_tokens += 1
        if h.first_token_at is None:
            h.first_token_at = time.monotonic()
        if token in self.stop_ids:
            self._send(self.tokenizer.decode(self.tokens), final=True)
            return "stop"
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        stops = [i for i in (text.find(s) for s in h.request.stop) if i >= 0]
        if stops:
            self._send(text[: min(stops)], final=True)
            return "stop"
        if len(self.tokens) >= h.request.max_new_tokens:
            self._send(text, final=True)
            return "length"
        self._send(text[: len(text) - self._held_back(text)])
        return None

    def _held_back(self, text: str) -> int:
        """How many trailing characters may still change: an incomplete character, or the start
        of a stop string."""
        if text.endswith("\ufffd"):
            return len(text)
        held = 0
        for s in self.handle.request.stop:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return held

    def _send(self, text: str, final: bool = False) -> None:
        # A decoder may rewrite earlier text as tokens arrive; what was sent stays sent.
        if not text.startswith(self.sent):
            text = self.sent
        if self.splitter is None:
            if len(text) > len(self.sent):
                self.handle.on_event(Event("text", text[len(self.sent) :]))
        else:
            split = self.splitter.finish if final else self.splitter.push
            reasoning, content = split(text)
            if reasoning:
                self.handle.on_event(Event("reasoning", reasoning))
            if content:
                self.handle.on_event(Event("text", content))
        self.sent = text


class Engine:
    """Serves `model` with up to `max_batch` requests decoding together and `max_waiting`
    queued behind them; contexts up to `context` tokens (prompt plus answer). With `compile`,
    decode steps run compiled at fixed shapes (`DecodeBatch`), compiled here, before the
    first request. Each answer is read as its request's `reasoning` says."""

    def __init__(
        self,
        model: MLLM,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 8,
        max_waiting: int = 64,
        context: int | None = None,
        compile: bool = False,
    ) -> None:
        if max_batch < 1 or max_waiting < 0:
            raise ValueError("max_batch must be >= 1 and max_waiting >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.context = context or model.cfg.decoder.max_seq_len
        self.compile = compile
        ends = (tokenizer.token_to_id(t) for t in tokenizer.end_of_turn_tokens())
        self.stop_ids = {tokenizer.eos_id, *(i for i in ends if i is not None)}
        self._batch: DecodeBatch | None = self._new_batch()
        if compile:
            self._warm_up()
        self._waiting: deque[Handle] = deque()
        self._running: dict[int, _Answer] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for tests and metrics)
        self.max_running = 0  # the most requests that ran together

    def _warm_up(self) -> None:
        """Compile the decode step now, not during a request: a prompt whose fed token falls in
        the first key bucket compiles the step, one in the second bucket compiles it with the
        key length symbolic, which every later length reuses (`compiled_decode`)."""
        for length in (1, LENGTH_BUCKET):
            if length + 2 > self.context:
                break
            (warm,) = self._batch.prefill([[self.tokenizer.eos_id] * length])
            self._batch.step()
            self._batch.step()  # feeds a token: the compiled step runs
            self._batch.release(warm)

    def _new_batch(self) -> DecodeBatch:
        return DecodeBatch(
            self.model,
            self.max_batch,
            self.context,
            pad_token_id=self.tokenizer.pad_id,
            compile=self.compile,
        )

    # -- the caller's side --------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mm1-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        """Queue a request; QueueFull when `max_waiting` requests already wait beyond the free
        rows of the batch (those join it at the next step)."""
        if len(request.prompt) + request.max_new_tokens > self.context:
            raise ValueError(
                f"{len(request.prompt)} prompt tokens plus {request.max_new_tokens} new tokens "
                f"exceed the context of {self.context}"
            )
        handle = Handle(request, on_event)
        with self._wake:
            free = max(0, self.max_batch - len(self._running))
            if len(self._waiting) >= self.max_waiting + free:
                raise QueueFull(f"{len(self._waiting) - free} requests are already waiting")
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    @property
    def load(self) -> dict[str, int]:
        return {"running": len(self._running), "waiting": len(self._waiting)}

    # -- the engine's thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self._drop_ended()
                self._admit()
                if self._running:
                    self._step()
            except Exception as err:  # a bug must not leave every request waiting forever
                log.exception("the engine's loop failed")
                self._fail_running(f"the engine failed: {err}")
        for answer in list(self._running.values()):
            answer.handle.on_event(Event("error", "the server is shutting down", code="shutdown"))

    def _drop_ended(self) -> None:
        """Release cancelled and timed-out requests, running or still waiting."""
        now = time.monotonic()
        with self._wake:
            waiting = list(self._waiting)
            self._waiting = deque(h for h in waiting if not (h.cancelled or h.expired(now)))
        for h in waiting:
            if not h.cancelled and h.expired(now):
                h.on_event(Event("error", "the request timed out in the queue", code="timeout"))
        for sid, answer in list(self._running.items()):
            h = answer.handle
            if h.cancelled or h.expired(now):
                self._release(sid)
                if not h.cancelled:
                    h.on_event(Event("error", "the request timed out", code="timeout"))

    def _admit(self) -> None:
        admitted: list[Handle] = []
        free = self.max_batch if self._batch is None else self._batch.free_rows
        with self._wake:  # (cancelled and expired ones were dropped just before)
            while self._waiting and len(admitted) < free:
                admitted.append(self._waiting.popleft())
        if not admitted:
            return
        if self._batch is None:  # the last failure left no cache: make one, or fail these
            try:
                self._batch = self._new_batch()
            except Exception as err:
                for h in admitted:
                    h.on_event(Event("error", f"no KV cache: {err}", code="internal_error"))
                return
        with_images = [h.request for h in admitted if h.request.pixel_values is not None]
        device = self.model.decoder.embed_tokens.weight.device
        try:  # nothing a request holds may stop the engine's thread
            generators = [
                torch.Generator(device).manual_seed(h.request.seed)
                if h.request.seed is not None and h.request.sampling.do_sample
                else None
                for h in admitted
            ]
            ids = self._batch.prefill(
                [h.request.prompt for h in admitted],
                *_images(with_images, device),
                # greedy rows share one argmax over the batch; sampled rows draw on their own
                sampling=[
                    h.request.sampling if h.request.sampling.do_sample else None for h in admitted
                ],
                generators=generators,
            )
        except Exception as err:  # e.g. out of memory: these requests fail, the server goes on
            for h in admitted:
                h.on_event(Event("error", f"prefill failed: {err}", code="internal_error"))
            return
        for sid, h in zip(ids, admitted):
            self._running[sid] = _Answer(h, self.tokenizer, self.stop_ids, h.request.reasoning)
        self.max_running = max(self.max_running, len(self._running))

    def _step(self) -> None:
        try:
            chosen = self._batch.step()
        except Exception as err:  # e.g. out of memory: every running request fails
            self._fail_running(f"decoding failed: {err}")
            return
        self.steps += 1
        for sid, token in chosen.items():
            answer = self._running[sid]
            if answer.handle.cancelled:
                continue  # dropped at the next boundary
            reason = answer.take(token)
            if reason is not None:
                self._release(sid)
                answer.handle.on_event(Event("done", finish_reason=reason))

    def _fail_running(self, message: str) -> None:
        """Fail every running request and drop the cache, whose rows may be half written; the
        next admission makes a fresh one (the old one freed first: memory may be short)."""
        for answer in self._running.values():
            answer.handle.on_event(Event("error", message, code="internal_error"))
        self._running.clear()
        self._batch = None

    def _release(self, sid: int) -> None:
        self._running.pop(sid)
        self._batch.release(sid)


def _images(
    requests: list[Request], device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The pixels, crop counts and sizes of the requests' images, concatenated in order."""
    if not requests:
        return None, None, None
    pixels = torch.cat([r.pixel_values for r in requests]).to(device)
    if any(r.image_crops is None for r in requests):
        return pixels, None, None
    crops = torch.cat([r.image_crops for r in requests]).to(device)
    sizes = torch.cat([r.image_sizes for r in requests]).to(device)
    return pixels, crops, sizes
