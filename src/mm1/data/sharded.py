"""The skeleton of the training datasets (`PackedDataset`, `CaptionPairDataset`): endless batches
for one rank, each DataLoader worker its own slot reading its share of every source through a
`Mixture`, the slot's resumable state, and errors of a loader worker handed to the main
process as they are (`WorkerError`).

A slot's state is `{"slot", "mixture", **extra}`: the slot index (a state given to another slot
is refused), the mixture's cursors and generator, and whatever the subclass buffers
(`_extra_state`). Checkpoints hold these keys: they must keep their names."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from torch.utils.data import IterableDataset, get_worker_info

from mm1.config import ConfigError, SourceConfig
from mm1.data.document import Conversation, Document
from mm1.data.images import ImageProcessor
from mm1.data.mixture import Mixture, SourceStream
from mm1.data.sources import DataError, ReadStats, warn_skip
from mm1.data.sources.base import set_max_text_chars
from mm1.data.sources.decode import set_max_image_pixels
from mm1.data.tokenizer import Tokenizer

# Errors the CLI reports as one line: a worker hands them over as they are (`WorkerError`).
ONE_LINE_ERRORS = (DataError, ConfigError, FileNotFoundError)


@dataclass
class WorkerError:
    """An error raised in a loader worker, sent to the main process as a batch would be (the
    loader, `mm1.data.loader.Loader`, raises it there)."""

    error: BaseException


class MixtureSettings(Protocol):
    """What every slot's mixture is built from (both datasets' settings have these fields)."""

    sources: list[SourceConfig]
    seed: int
    max_error_rate: float
    max_image_pixels: int
    max_text_chars: int
    resume_changed_sources: bool  # a resume over changed files restarts them (see SourceStream)


def slot_states(state: Any) -> Iterator[dict[str, Any]]:
    """The slot states in a loader state: one per worker snapshot, or the single-process
    loader's one (torchdata nests them; a slot's state is the dict holding "mixture")."""
    if isinstance(state, dict):
        if "mixture" in state:
            yield state
            return
        for v in state.values():
            yield from slot_states(v)


def check_saved_sources(state: dict[str, Any], settings: MixtureSettings) -> None:
    """Refuse a resume over changed source files in the main process, as the state is loaded:
    each slot makes the same check when its state loads, but only once it first reads, after
    the trainer has reported the resume. With `resume_changed_sources` the slots restart them."""
    if settings.resume_changed_sources:
        return
    saved = next(slot_states(state), None)
    if saved is None:
        return
    # Every slot sees each source's whole file list, so one slot's record of it is enough.
    for i, (spec, st) in enumerate(zip(settings.sources, saved["mixture"]["sources"])):
        SourceStream(i, spec, 0, 1, settings.seed).load_state_dict(st)


class ShardedDataset(IterableDataset):
    """One rank's endless batches over (rank, worker) slots; subclasses yield them from
    `_batches`, build their pipeline on `_open_mixture` and add what they buffer to the state
    with `_extra_state`."""

    def __init__(
        self,
        settings: MixtureSettings,
        tokenizer: Tokenizer,
        processor: ImageProcessor,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.s, self.tok, self.processor = settings, tokenizer, processor
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(num_workers, 1)
        self._state: dict[str, Any] | None = None  # to restore when the slot's mixture opens
        self._mixture: Mixture | None = None

    def __iter__(self) -> Iterator[Any]:
        if get_worker_info() is None:
            yield from self._batches()
            return
        try:
            yield from self._batches()
        except ONE_LINE_ERRORS as err:
            # Raised here, torch would re-raise it in the main process as a new exception
            # whose message is "Caught X in DataLoader worker process 0" and the traceback.
            yield WorkerError(err)

    @abstractmethod
    def _batches(self) -> Iterator[Any]:
        """This slot's batches, endless."""

    def _too_much_text(self, record: Document | Conversation, stream: SourceStream) -> bool:
        """Skip, counted, a record with more text than `data.max_text_chars`: the tokenizer
        would take it whole, at ~170 bytes of memory per character."""
        cap, chars = self.s.max_text_chars, record.text_chars
        if not cap or chars <= cap:
            return False
        warn_skip("too_long_text", record.id, f"{chars:,} characters of text")
        stream.reject("too_long_text")
        return True

    def _slot(self) -> int:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return self.rank * self.num_workers + worker

    def _open_mixture(self) -> Mixture:
        """This slot's mixture, at the loaded state's cursors if a state was loaded."""
        set_max_image_pixels(self.s.max_image_pixels)  # process-wide: set in each worker
        set_max_text_chars(self.s.max_text_chars)
        slot, num_slots = self._slot(), self.world_size * self.num_workers
        streams = [
            SourceStream(
                i,
                spec,
                slot,
                num_slots,
                self.s.seed,
                self.s.max_error_rate,
                self.s.resume_changed_sources,
            )
            for i, spec in enumerate(self.s.sources)
        ]
        mixture = Mixture(streams, self.s.seed, slot)
        if self._state is not None:
            if self._state.get("slot", slot) != slot:
                raise RuntimeError(
                    f"loader state of slot {self._state['slot']} given to slot {slot}: the "
                    "number of ranks or workers changed since the checkpoint"
                )
            mixture.load_state_dict(self._state["mixture"])
        # Kept only once whole: a worker whose state was refused still reports a state (the
        # loaded one) after its error, and a half-built pipeline has none.
        self._mixture = mixture
        return mixture

    def _extra_state(self) -> dict[str, Any]:
        """The subclass's part of the slot's state (called once the mixture is open)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        if self._mixture is None:  # not started: the state loaded, as it was loaded
            return dict(self._state) if self._state is not None else {}
        return {"slot": self._slot(), "mixture": self._mixture.state_dict(), **self._extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = state or None
        self._mixture = None

    def read_stats(self) -> ReadStats:
        """Records read, skipped and failed by this slot, all sources together."""
        total = ReadStats()
        if self._mixture is not None:
            for s in self._mixture.streams:
                total.merge(s.stats)
        return total
