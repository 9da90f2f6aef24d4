"""The slot skeleton both training datasets share (`mm1.data.sharded`): the state format that
checkpoints hold, exact resume of caption pairs across loader workers, a state refused by
another slot, and data errors of either dataset one line in a loader worker."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mm1.config import SourceConfig
from mm1.data.caption_pairs import CaptionPairDataset, PairSettings, build_pair_loader
from mm1.data.images import ImageProcessor
from mm1.data.loader import LoaderSettings, PackedDataset
from mm1.data.prompt_format import PromptFormat
from mm1.data.sources import DataError
from mm1.data.world import world_sources

PROC = ImageProcessor.clip(16)


def pair_settings(world) -> PairSettings:
    captions = [s for s in world_sources(world)[0] if s.resolved_kind == "captions"]
    return PairSettings(sources=captions, batch_size=3, max_len=16, needs_text=True)


def packed(world, tok, **kw) -> PackedDataset:
    s = LoaderSettings(
        sources=world_sources(world)[0],
        seq_len=64,
        micro_batch_size=1,
        prompt_format=PromptFormat(4),
    )
    return PackedDataset(s, tok, PROC, **kw)


def pairs(world, tok, **kw) -> CaptionPairDataset:
    return CaptionPairDataset(pair_settings(world), tok, PROC, **kw)


@pytest.mark.parametrize(
    ("make", "keys"),
    [(pairs, ["slot", "mixture"]), (packed, ["slot", "mixture", "buffer", "pack_stats"])],
)
def test_state_keys_are_the_ones_checkpoints_hold(world, tok, make, keys) -> None:
    ds = make(world, tok, rank=1, world_size=2)
    assert ds.state_dict() == {}  # not started, nothing loaded
    next(iter(ds))
    state = ds.state_dict()
    assert list(state) == keys
    assert state["slot"] == 1
    # before it starts, a dataset hands back the state it was given
    again = make(world, tok, rank=1, world_size=2)
    again.load_state_dict(state)
    assert again.state_dict() == state


@pytest.mark.parametrize("make", [pairs, packed])
def test_a_state_of_another_slot_is_refused(world, tok, make) -> None:
    ds = make(world, tok, rank=1, world_size=2)
    next(iter(ds))
    other = make(world, tok, rank=0, world_size=2)
    other.load_state_dict(ds.state_dict())
    with pytest.raises(RuntimeError, match="loader state of slot 1 given to slot 0"):
        next(iter(other))


@pytest.mark.parametrize("workers", [0, 2])
def test_caption_pairs_resume_exactly(world, tok, workers: int) -> None:
    s = pair_settings(world)
    it = iter(build_pair_loader(s, tok, PROC, num_workers=workers))
    full = [next(it) for _ in range(6)]
    loader = build_pair_loader(s, tok, PROC, num_workers=workers)
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    del it, loader
    resumed = build_pair_loader(s, tok, PROC, num_workers=workers)
    resumed.load_state_dict(state)
    it = iter(resumed)
    got = head + [next(it) for _ in range(3)]
    for a, b in zip(got, full, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.lengths, b.lengths)
        assert torch.equal(a.pixel_values, b.pixel_values)
    assert not torch.equal(full[0].input_ids, full[3].input_ids)  # the batches differ


@pytest.mark.parametrize("workers", [0, 1])
def test_a_caption_pair_data_error_is_one_line_in_a_worker(world, tok, workers: int) -> None:
    text_only = [SourceConfig(format="text", path=str(world.root / "text"), kind="text")]
    s = PairSettings(sources=text_only, batch_size=2, max_len=8, needs_text=True)
    loader = build_pair_loader(s, tok, PROC, num_workers=workers)
    with pytest.raises(DataError) as err, contextlib.closing(loader):
        next(iter(loader))
    assert str(err.value).endswith("no image; CLIP trains on image-caption pairs")
    assert "\n" not in str(err.value)
