"""The loader end to end on the synthetic world: mixture, disjoint reading, exact resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mm1.config import SOURCE_KINDS, SourceConfig
from mm1.data.images import ImageProcessor
from mm1.data.loader import LoaderSettings, PackedDataset, build_loader, packing_stats
from mm1.data.mixture import Cursor, Mixture, SourceStream
from mm1.data.prompt_format import PromptFormat
from mm1.data.sources import DataError, ReadStats
from mm1.data.world import world_sources


def settings(world, **kw) -> LoaderSettings:
    train, _ = world_sources(world)
    base = LoaderSettings(
        sources=train, seq_len=128, micro_batch_size=2, prompt_format=PromptFormat(4), pack_buffer=8
    )
    return dataclasses.replace(base, **kw)


PROC = ImageProcessor.clip(16)


def take(loader, n: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for f in ("input_ids", "labels", "position_ids", "document_ids", "kind_ids", "dataset_ids"):
            assert torch.equal(getattr(x, f), getattr(y, f)), f
        assert (x.pixel_values is None) == (y.pixel_values is None)
        if x.pixel_values is not None:
            assert torch.equal(x.pixel_values, y.pixel_values)


def test_batches_follow_the_contract(world, tok) -> None:
    (batch,) = take(build_loader(settings(world), tok, PROC), 1)
    assert batch.input_ids.shape == (2, 128)
    n_slots = int((batch.input_ids == tok.image_id).sum())
    assert batch.pixel_values.shape == (n_slots // 4, 3, 16, 16)
    assert not (batch.labels == tok.image_id).any()
    # positions restart at every document boundary
    for row in range(2):
        doc, pos = batch.document_ids[row], batch.position_ids[row]
        starts = torch.nonzero(torch.diff(doc)).flatten() + 1
        assert (pos[starts] == 0).all()
    # every token's dataset is a source of that token's kind; padding has neither
    sources = settings(world).sources
    kinds, datasets = batch.kind_ids, batch.dataset_ids
    assert torch.equal(kinds < 0, datasets < 0)
    for i, s in enumerate(sources):
        assert (kinds[datasets == i] == SOURCE_KINDS.index(s.resolved_kind)).all()
    assert len(datasets.unique()) > 2  # several datasets in one batch


def dataset_states(state: dict) -> list[dict]:
    """The `PackedDataset` states in a `StatefulDataLoader` state (one per worker)."""
    if "dataset_state" in state:
        return [state["dataset_state"]]
    workers = state["_snapshot"]["_worker_snapshots"]
    return [workers[k]["dataset_state"] for k in sorted(workers)]


def read_counts(state: dict) -> list[dict]:
    """Every slot's per-source read statistics in a loader state."""
    return [src["stats"] for ds in dataset_states(state) for src in ds["mixture"]["sources"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(world, tok, workers: int) -> None:
    s = settings(world)
    loader = build_loader(s, tok, PROC, num_workers=workers)
    full = take(loader, 9)
    full_state = loader.state_dict()
    loader = build_loader(s, tok, PROC, num_workers=workers)
    it = iter(loader)
    head = [next(it) for _ in range(5)]
    state = loader.state_dict()
    del it, loader
    resumed = build_loader(s, tok, PROC, num_workers=workers)
    resumed.load_state_dict(state)
    it = iter(resumed)
    tail = [next(it) for _ in range(4)]
    assert_same(head + tail, full)
    # Re-reading the buffered records on resume must not count them again.
    resumed_state = resumed.state_dict()
    assert read_counts(resumed_state) == read_counts(full_state)
    packed = [ds["pack_stats"] for ds in dataset_states(resumed_state)]
    assert packed == [ds["pack_stats"] for ds in dataset_states(full_state)]


def test_restoring_keeps_the_saved_read_counts(world, tok) -> None:
    s = settings(world)
    ds = PackedDataset(s, tok, PROC)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = ds.state_dict()
    assert state["buffer"], "the test needs buffered records to re-read"
    saved = ReadStats()
    for src in state["mixture"]["sources"]:
        saved.merge(ReadStats.from_dict(src["stats"]))
    restored = PackedDataset(s, tok, PROC)
    restored.load_state_dict(state)
    restored._build()
    assert restored.read_stats() == saved
    assert restored.state_dict()["mixture"] == state["mixture"]


def test_resuming_over_changed_files_is_refused_or_restarts_that_source(
    world, tok, tmp_path, caplog
) -> None:
    """A source whose files changed since the checkpoint: the saved cursor would index another
    file list. Refused by default; with `resume_changed_sources` (`--force`) that source starts
    its next epoch and its buffered records are dropped; the others resume as saved."""
    import shutil

    from mm1.data.synthetic import WorldManifest

    copy = WorldManifest.load(shutil.copytree(world.root, tmp_path / "w"))
    ds = PackedDataset(settings(copy), tok, PROC)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = ds.state_dict()
    # Moved elsewhere, unchanged: not a change (names are kept relative to their folder).
    moved = WorldManifest.load(shutil.copytree(copy.root, tmp_path / "moved"))
    same = PackedDataset(settings(moved), tok, PROC)
    same.load_state_dict(state)
    assert_same([next(iter(same))], [next(it)])

    x = state["buffer"][0][0]  # a source with records in the packing buffer
    source = settings(copy).sources[x]
    shards = ds._mixture.streams[x].shards
    assert len(shards) > 1
    shards[-1].unlink()
    restored = PackedDataset(settings(copy), tok, PROC)
    restored.load_state_dict(state)
    then_now = rf"\({len(shards)} file\(s\) then, {len(shards) - 1} now\)"
    with pytest.raises(DataError, match=rf"{source.path} changed since the checkpoint {then_now}"):
        next(iter(restored))

    forced = PackedDataset(settings(copy, resume_changed_sources=True), tok, PROC)
    forced.load_state_dict(state)
    forced._build()
    assert "changed since the checkpoint" in caplog.text
    for i, (saved, now) in enumerate(zip(state["mixture"]["sources"], forced._mixture.streams)):
        assert now.changed == (i == x)
        restart = dataclasses.asdict(Cursor(epoch=saved["cursor"]["epoch"] + 1))
        assert now.state_dict()["cursor"] == (restart if i == x else saved["cursor"])
    assert [list(p.ref) for p in forced._packer.buffer] == [r for r in state["buffer"] if r[0] != x]
    next(iter(forced))  # and it trains on


def test_a_refused_resume_in_a_loader_worker_is_the_same_one_line_error(world, tok, tmp_path):
    """The loader refuses the state as it loads, in the main process, before any worker reads
    (so a trainer reports no resume first). Each worker checks again when its state loads: that
    error is raised in the main process as the same one line; the worker, asked for its state
    after it, gives the loaded one (it had a half-built pipeline: an AssertionError)."""
    import shutil

    from torchdata.stateful_dataloader import StatefulDataLoader

    from mm1.data.synthetic import WorldManifest

    copy = WorldManifest.load(shutil.copytree(world.root, tmp_path / "w"))
    loader = build_loader(settings(copy), tok, PROC, num_workers=1)
    take(loader, 2)
    state = loader.state_dict()
    del loader
    for shard in sorted((copy.root / "text").iterdir())[1:]:
        shard.unlink()
    refused = r"text changed since the checkpoint \(4 file\(s\) then, 1 now"
    resumed = build_loader(settings(copy), tok, PROC, num_workers=1)
    with pytest.raises(DataError, match=refused):
        resumed.load_state_dict(state)
    build_loader(settings(copy, resume_changed_sources=True), tok, PROC).load_state_dict(state)
    StatefulDataLoader.load_state_dict(resumed, state)  # past the up-front check: the worker's
    with pytest.raises(DataError, match=refused):
        take(resumed, 1)


def test_a_source_files_fingerprint_sees_sizes_and_not_where_they_are(tmp_path) -> None:
    from mm1.data.mixture import files_fingerprint

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        for name in ("0.jsonl", "1.jsonl"):
            (d / name).write_text("{}\n")
    first = files_fingerprint(sorted(a.iterdir()))
    assert files_fingerprint(sorted(b.iterdir())) == first
    (b / "1.jsonl").write_text("{}\n{}\n")
    assert files_fingerprint(sorted(b.iterdir())) != first
    sized = files_fingerprint(sorted(b.iterdir()))
    (b / "1.jsonl").rename(b / "2.jsonl")
    renamed = files_fingerprint(sorted(b.iterdir()))
    assert renamed["count"] == 2 and renamed != sized


def test_two_ranks_read_different_data_and_resume_exactly(world, tok) -> None:
    s = settings(world)
    ranks = [take(build_loader(s, tok, PROC, rank=r, world_size=2), 6) for r in range(2)]
    assert not torch.equal(ranks[0][0].input_ids, ranks[1][0].input_ids)
    loader = build_loader(s, tok, PROC, rank=1, world_size=2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    resumed = build_loader(s, tok, PROC, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 3), ranks[1][3:])


@pytest.mark.parametrize("name", ["captions", "sft"])  # shard-level, and record ranges of one file
def test_slots_read_disjoint_records_covering_one_epoch(world, name: str) -> None:
    src = world.sources[name]
    spec = SourceConfig(
        format=src["format"],
        path=str(world.root / src["shards"][0]).rsplit("/", 1)[0],
        kind=src["kind"],
        image_root=str(world.root / src["image_folder"]) if "image_folder" in src else None,
    )
    if src["format"] == "llava":
        spec.path = str(world.root / src["shards"][0])
    seen: list[tuple[int, int]] = []
    for slot in range(4):  # 2 ranks x 2 workers
        stream = SourceStream(0, spec, slot, 4, seed=0)
        while stream.cursor.epoch == 0:
            shard, raw, _ = stream.next()
            if stream.cursor.epoch == 0:
                seen.append((shard, raw))
            if len(seen) > 10_000:
                break
    # the last record read rolls into epoch 1 only after the epoch's records: count exactly
    assert len(seen) == len(set(seen))
    assert len(set(seen)) == src["records"]


def test_epochs_are_reshuffled(world) -> None:
    train, _ = world_sources(world)
    stream = SourceStream(0, train[2], slot=0, num_slots=1, seed=0)
    orders = {tuple(stream.epoch_order(e)) for e in range(6)}
    assert len(orders) > 1 and all(sorted(o) == list(range(4)) for o in orders)


def test_packing_statistics_hold_the_mixture(world, tok) -> None:
    s = settings(
        world, seq_len=512, micro_batch_size=1, prompt_format=PromptFormat(24), pack_buffer=32
    )
    stats = packing_stats(s, tok, 120)
    assert stats["packing_efficiency"] >= 0.95
    assert stats["images_dropped"] == 0
    for kind, target in stats["target_mixture"].items():
        assert abs(stats["mixture"][kind] - target) < 0.08, kind  # 120 sequences: sampling noise


def test_too_many_bad_records_abort_with_the_source_named(world, tok, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join('{"text": ""}\n' if i % 2 else "{broken\n" for i in range(300)))
    s = settings(world, sources=[SourceConfig(format="text", path=str(bad), kind="text")])
    with pytest.raises(DataError, match=r"bad\.jsonl"):
        take(build_loader(s, tok, PROC), 1)


@pytest.mark.parametrize("fmt", ["llava", "llava_yaml"])
def test_sft_sources_pack_assistant_only_labels(world, tok, fmt: str) -> None:
    sft = world.sources["sft"]
    path = world.root / (sft["shards"][0] if fmt == "llava" else sft["yaml"])
    spec = SourceConfig(
        format=fmt, path=str(path), kind="sft", image_root=str(world.root / sft["image_folder"])
    )
    (batch,) = take(build_loader(settings(world, sources=[spec], seq_len=256), tok, PROC), 1)
    labelled = batch.labels != -100
    assert 0 < int(labelled.sum()) < int((batch.kind_ids >= 0).sum())  # only assistant turns
    assert (batch.kind_ids[batch.kind_ids >= 0] == 3).all()  # the sft kind


EXITS = """
import sys
from mm1.data.images import ImageProcessor
from mm1.data.loader import LoaderSettings, build_loader
from mm1.data.prompt_format import PromptFormat
from mm1.data.synthetic import WorldManifest
from mm1.data.tokenizer import Tokenizer
from mm1.data.world import world_sources

world = WorldManifest.load(sys.argv[1])
train, _ = world_sources(world)
settings = LoaderSettings(train, seq_len=128, micro_batch_size=2, prompt_format=PromptFormat(4))
tok = Tokenizer.from_file(world.tokenizer_path)
LOADER = build_loader(settings, tok, ImageProcessor.clip(16), num_workers=3)  # never closed
next(iter(LOADER))
print("read", flush=True)
"""


def test_an_interpreter_exits_with_a_loader_never_closed(world) -> None:
    """Workers ignore SIGTERM (the trainer saves first), which is how multiprocessing stops
    daemonic children at exit: a script ending with a live loader waited for them forever."""
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-c", EXITS, str(world.root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0 and p.stdout == "read\n", p.stderr[-2000:]
    assert "Exception ignored" not in p.stderr, p.stderr[-2000:]  # every worker was killed


def test_a_loader_freed_by_the_cycle_collector_stops_its_workers(world, tok) -> None:
    """A loader in a reference cycle (a failed one whose exception is kept, say) is freed by
    the collector, which finalized its queues before the iterator: the stop messages were lost,
    torch waited 5 s, and the worker, which ignores SIGTERM, lived on until the interpreter
    exited."""
    import gc

    loader = build_loader(settings(world), tok, PROC, num_workers=1)
    next(iter(loader))
    workers = list(loader._iterator._workers)
    cycle: dict = {"loader": loader}
    cycle["self"] = cycle
    del loader, cycle
    gc.collect()
    assert workers and not any(w.is_alive() for w in workers)


def _text_spec(world) -> SourceConfig:
    return SourceConfig(
        format="text", path=str(world.root / world.sources["text"]["shards"][0]).rsplit("/", 1)[0]
    )


def _one_epoch(stream: SourceStream) -> list[tuple[int, int]]:
    seen = []
    while True:
        shard, raw, _ = stream.next()
        if stream.cursor.epoch > 0:
            return seen
        seen.append((shard, raw))


@pytest.mark.parametrize("num_slots", [1, 3])
def test_a_slot_dealt_several_shards_reads_each_from_its_start(world, num_slots: int) -> None:
    """4 shards: one slot reads all of them, or slot 0 of 3 two of them, in an epoch."""
    spec = _text_spec(world)
    seen = [
        rec
        for slot in range(num_slots)
        for rec in _one_epoch(SourceStream(0, spec, slot, num_slots, seed=0))
    ]
    assert len(seen) == len(set(seen)) == world.sources["text"]["records"]


def test_as_many_shards_as_slots_deals_out_whole_shards(world) -> None:
    spec = _text_spec(world)
    streams = [SourceStream(0, spec, slot, 4, seed=0) for slot in range(4)]
    assert all(s.shard_level and len(s.epoch_order(0)) == 1 for s in streams)
    assert sorted(s.epoch_order(0)[0] for s in streams) == [0, 1, 2, 3]
    assert streams[0].record_range(streams[0].epoch_order(0)[0]) == (0, -1)  # the whole shard
    five = SourceStream(0, spec, 4, 5, seed=0)  # more slots than shards: record ranges
    assert not five.shard_level and len(five.epoch_order(0)) == 4


def test_a_slot_whose_share_is_empty_stops_after_one_pass(tmp_path) -> None:
    """One record and two slots: slot 1 reads it, slot 0 has nothing and says so after one whole
    pass over its (empty) share instead of reading forever."""
    record = {
        "id": "r0",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}],
    }
    (tmp_path / "sft.json").write_text(json.dumps([record]))
    spec = SourceConfig(format="llava", path=str(tmp_path / "sft.json"))
    assert SourceStream(0, spec, 1, 2, seed=0).next()[:2] == (0, 0)
    empty = SourceStream(0, spec, 0, 2, seed=0)
    with pytest.raises(
        DataError, match="yields no readable records in the share of loader slot 0 of 2$"
    ):
        empty.next()
    assert empty.cursor.epoch == 1


def test_a_source_whose_every_record_is_bad_says_why(tmp_path) -> None:
    """Every record skipped: the error names the reasons (it said only "no readable records
    for loader slot 0 of 1", which `mm1 data stats` printed in place of its table's reasons)."""
    records = [
        {
            "id": f"r{i}",
            "image": f"missing{i}.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nHi"},
                {"from": "gpt", "value": "Yo"},
            ],
        }
        for i in range(3)
    ]
    (tmp_path / "sft.json").write_text(json.dumps(records))
    spec = SourceConfig(format="llava", path=str(tmp_path / "sft.json"))
    with pytest.raises(
        DataError,
        match=r"yields no readable records: every record was skipped \(missing_image; see",
    ):
        SourceStream(0, spec, 0, 1, seed=0).next()


def test_a_resumed_stream_counts_whole_passes_from_its_saved_epoch(world) -> None:
    """Restored at epoch 3, one rejected record is not "a whole pass with no usable document"."""
    spec = _text_spec(world)
    stream = SourceStream(0, spec, 0, 1, seed=0)
    state = stream.state_dict()
    state["cursor"] = {"epoch": 3, "shard_pos": 0, "record": 0}
    resumed = SourceStream(0, spec, 0, 1, seed=0)
    resumed.load_state_dict(state)
    resumed.next()
    resumed.reject("untokenizable")  # raises on a stream that forgot its epoch
    assert resumed.stats.skipped == {"untokenizable": 1}


def test_a_state_saved_before_file_fingerprints_loads(world) -> None:
    spec = _text_spec(world)
    stream = SourceStream(0, spec, 0, 1, seed=0)
    for _ in range(3):
        stream.next()
    state = stream.state_dict()
    del state["files"]
    resumed = SourceStream(0, spec, 0, 1, seed=0)
    resumed.load_state_dict(state)
    assert resumed.cursor == stream.cursor and not resumed.changed


def test_mixture_weights_summing_to_zero_are_refused(world) -> None:
    spec = dataclasses.replace(_text_spec(world), weight=0.0)
    with pytest.raises(ValueError, match="sum to zero"):
        Mixture([SourceStream(0, spec, 0, 1, seed=0)], seed=0, slot=0)


def _caption_documents(batches: list, tok) -> list[list[int]]:
    """The caption pairs' token ids (BOS dropped) in `batches`."""
    captions = SOURCE_KINDS.index("captions")
    docs = []
    for b in batches:
        for row in range(b.input_ids.shape[0]):
            for d in b.document_ids[row].unique().tolist():
                at = (b.document_ids[row] == d) & (b.kind_ids[row] == captions)
                ids = b.input_ids[row][at].tolist()
                docs += [ids[1:] if ids and ids[0] == tok.bos_id else ids] if ids else []
    return docs


def test_caption_first_writes_that_share_of_pairs_text_first_and_resumes(world, tok) -> None:
    """data.caption_first: 0 writes every caption pair image first, 1 every one caption first;
    at 0.5 both occur, and a resume (whose buffered records are read again) gives exactly the
    batches of the uninterrupted run, as each record's draw is its own."""
    for share, first_is_slot in ((0.0, {True}), (1.0, {False}), (0.5, {True, False})):
        batches = take(build_loader(settings(world, caption_first=share), tok, PROC), 16)
        docs = _caption_documents(batches, tok)
        assert len(docs) >= 12
        assert {d[0] == tok.image_id for d in docs} == first_is_slot, share
    s = settings(world, caption_first=0.5)
    full = take(build_loader(s, tok, PROC), 6)
    loader = build_loader(s, tok, PROC)
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    del it, loader
    resumed = build_loader(s, tok, PROC)
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert_same(head + [next(it) for _ in range(3)], full)
