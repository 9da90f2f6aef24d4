"""Few-shot evaluation over torchrun's ranks (`torchrun ... -m mm1.cli eval`): every rank holds
the whole model and builds every prompt; each generates every world-th batch of them, and the
outputs are gathered in batch order. A batch holds the same prompts as in one process, so every
rank scores the predictions one process would make (on the same kind of device)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class EvalRanks:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, batches: int) -> range:
        """The indices of the batches this rank generates."""
        return range(self.rank, batches, self.world)

    def share(self, items: int, batch_size: int) -> int:
        """How many of `items`, in batches of `batch_size`, this rank generates."""
        starts = range(0, items, batch_size)
        return sum(min(batch_size, items - starts[b]) for b in self.mine(len(starts)))

    def gather(self, own: dict[int, Any], error: BaseException | None) -> dict[int, Any]:
        """Every rank's batches, by index, on every rank. A rank that failed (an undecodable
        image, say) fails them all, its error named, rather than leave the others waiting."""
        if self.world == 1:
            if error is not None:
                raise error
            return own
        parts: list[Any] = [None] * self.world
        why = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(parts, (own, why))
        if error is not None:
            raise error
        failed = [(r, w) for r, (_, w) in enumerate(parts) if w is not None]
        if failed:
            rank, why = failed[0]
            raise RuntimeError(f"evaluation rank {rank} failed: {why}")
        return {b: out for part, _ in parts for b, out in part.items()}


def rank_device(device: str) -> str:
    """`cuda` as this process's own GPU under torchrun (`cuda:LOCAL_RANK`); else `device`."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def join_ranks(device: str) -> tuple[EvalRanks, str]:
    """This process's place under torchrun (a single process: rank 0 of 1), joining the group
    on first use, and its device (`rank_device`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return EvalRanks(), device
    device = rank_device(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return EvalRanks(dist.get_rank(), world), device


def flatten(done: dict[int, Any], batches: Iterable[int]) -> list[Any]:
    """The gathered batches' items in batch order."""
    return [item for b in batches for item in done[b]]
