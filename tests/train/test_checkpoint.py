"""Checkpoints: exact resume (1 process and 2 gloo processes with FSDP2 / DDP), atomicity, keep."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mm1.train.checkpoint as ckpt
from mm1.train.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    restore_rng_state,
    save_checkpoint,
)
from tests.gloo import gloo_rank, spawn_ranks

VOCAB, DIM, BATCH, SEQ = 32, 16, 4, 6


class TinyLM(nn.Module):
    """Embedding tied to the output head, an MLP body and dropout (which draws from the RNG)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.body = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.head(self.drop(h + self.body(h)))


def _loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _make(init_seed: int) -> tuple[TinyLM, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(init_seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _train(model, opt, sched, n: int) -> list[float]:
    """n steps on batches drawn from the global RNG (so a wrong RNG restore changes the losses)."""
    losses = []
    model.train()
    for _ in range(n):
        tokens = torch.randint(VOCAB, (BATCH, SEQ))
        loss = _loss(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def _rng_probe() -> tuple[list[float], float, float]:
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# 1 process


def test_single_process_resume_is_bit_exact(tmp_path: Path) -> None:
    _seed_all(0)
    model, opt, sched = _make(0)
    _train(model, opt, sched, 3)
    np_state = np.random.default_rng(5).bit_generator.state
    rank_state = {"pos": 123, "nested": {7: [1, {"b": ()}], "empty": {}}, "np_rng": np_state}
    extra = {"scheduler": sched.state_dict(), "tokens_seen": 999}
    path = save_checkpoint(
        tmp_path, 3, model, opt, extra=extra, rank_state=rank_state, meta={"fingerprint": "abc"}
    )
    assert path == tmp_path / "checkpoints" / "step_3"
    probe = _rng_probe()
    losses = _train(model, opt, sched, 3)
    expected = _params(model)

    _seed_all(1)  # a different RNG and different initial weights
    model2, opt2, sched2 = _make(1)
    assert latest_checkpoint(tmp_path) == path
    loaded = load_checkpoint(path, model2, opt2)
    sched2.load_state_dict(loaded.extra["scheduler"])
    assert _rng_probe() == probe
    assert _train(model2, opt2, sched2, 3) == losses  # bit-exact
    got = _params(model2)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert model2.head.weight is model2.embed.weight  # still tied

    assert loaded.step == 3 and loaded.path == path
    assert loaded.extra == extra
    assert loaded.rank_state == rank_state
    gen = np.random.default_rng()
    gen.bit_generator.state = loaded.rank_state["np_rng"]
    assert gen.random() == np.random.default_rng(5).random()
    meta = read_meta(path)
    assert loaded.meta == meta
    assert meta["step"] == 3 and meta["world_size"] == 1 and meta["fingerprint"] == "abc"
    assert {"time", "mm1_version", "torch_version"} <= set(meta)


def test_save_before_first_step_does_not_change_training(tmp_path: Path) -> None:
    """get_state_dict initialises an unstepped optimizer; the save must not let that leak."""
    _seed_all(0)
    model, opt, _ = _make(0)
    reference = _train(model, opt, None, 3)

    _seed_all(0)
    model, opt, _ = _make(0)
    path = save_checkpoint(tmp_path, 0, model, opt)  # no optimizer state yet, no extras
    assert len(opt.state) == 0
    assert _train(model, opt, None, 3) == reference

    _seed_all(1)
    model2, opt2, _ = _make(1)
    loaded = load_checkpoint(path, model2, opt2)
    assert len(opt2.state) == 0
    assert loaded.extra == {} and loaded.rank_state == {}
    assert _train(model2, opt2, None, 3) == reference


class Scaled(nn.Module):
    """A linear map times a learned scale of shape `shape` (a scalar: as CLIP saved it once)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.full(shape, 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.lin(x)


def test_a_saved_scalar_loads_into_a_one_element_parameter(tmp_path: Path) -> None:
    """A checkpoint of a scalar parameter resumes a model whose parameter has one element
    (CLIP's logit scale gained a dimension for FSDP2): the weights, the optimizer's moments and
    the next steps are the scalar run's."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))

    def steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> list[float]:
        out = []
        for _ in range(n):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    torch.manual_seed(0)
    old = Scaled(())
    old_opt = torch.optim.AdamW(old.parameters(), lr=0.1)
    steps(old, old_opt, 2)
    path = save_checkpoint(tmp_path, 2, old, old_opt)
    want = steps(old, old_opt, 2)
    new = Scaled((1,))
    new_opt = torch.optim.AdamW(new.parameters(), lr=0.1)
    steps(new, new_opt, 1)  # its own optimizer state, overwritten by the load
    load_checkpoint(path, new, new_opt)
    assert new.scale.shape == (1,)
    assert steps(new, new_opt, 2) == want
    assert new.scale.item() == old.scale.item()
    assert new_opt.state[new.scale]["exp_avg"].shape == (1,)


def test_rng_helpers_round_trip() -> None:
    state = capture_rng_state()
    before = _rng_probe()
    _seed_all(123)
    restore_rng_state(state)
    assert _rng_probe() == before


# ---------------------------------------------------------------------------------------------
# Atomicity and retention


def test_crashed_saves_never_count_and_are_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed_all(0)
    model, opt, _ = _make(0)
    _train(model, opt, None, 1)
    good = save_checkpoint(tmp_path, 1, model, opt, keep=2)
    root = tmp_path / "checkpoints"

    # Crash while the shards are being written: some files exist, no meta.json, no rename.
    real_save = ckpt.dcp.save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise RuntimeError("simulated crash in DCP save")

    monkeypatch.setattr(ckpt.dcp, "save", save_then_die)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, model, opt, keep=2)
    assert not (root / ".tmp_step_2").exists()  # a failed save removes its partial directory
    # A killed process cannot clean up: its shards stay behind (here, the cleanup is skipped).
    monkeypatch.setattr(ckpt, "_remove", lambda path: None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, model, opt, keep=2)
    monkeypatch.undo()
    assert any((root / ".tmp_step_2").iterdir())
    assert latest_checkpoint(tmp_path) == good

    # Crash between meta.json and the rename: a complete-looking tmp dir still does not count.
    def no_rename(src: Path, dst: Path) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(ckpt, "_atomic_rename", no_rename)
    monkeypatch.setattr(ckpt, "_remove", lambda path: None)  # killed: no cleanup
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 3, model, opt, keep=2)
    monkeypatch.undo()
    assert (root / ".tmp_step_3" / "meta.json").is_file()
    (root / "step_99").mkdir()  # a step_N without meta.json (never completed) is ignored too
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        read_meta(root / "step_99")

    # The next save succeeds and removes the leftovers; keep=2 keeps the last two.
    save_checkpoint(tmp_path, 4, model, opt, keep=2)
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp_")]
    assert list_checkpoints(tmp_path) == [good, root / "step_4"]
    save_checkpoint(tmp_path, 5, model, opt, keep=2)
    save_checkpoint(tmp_path, 6, model, opt, keep=2)
    assert list_checkpoints(tmp_path) == [root / "step_5", root / "step_6"]
    assert sorted(p.name for p in root.iterdir()) == ["step_5", "step_6", "step_99"]

    # Saving a step that exists replaces it.
    _train(model, opt, None, 1)
    save_checkpoint(tmp_path, 6, model, opt, keep=2, meta={"again": True})
    assert read_meta(root / "step_6")["again"] is True
    assert list_checkpoints(tmp_path) == [root / "step_5", root / "step_6"]

    # A crash between setting the old step_6 aside and renaming its replacement: the old copy
    # is the only complete step 6, so it still counts, and the next save restores it.
    real_rename = ckpt._atomic_rename

    def second_rename_dies(src: Path, dst: Path) -> None:
        if src.name.startswith(".tmp_step_"):
            raise OSError("simulated crash between the renames")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt, "_atomic_rename", second_rename_dies)
    with pytest.raises(OSError, match="between the renames"):
        save_checkpoint(tmp_path, 6, model, opt, keep=2, meta={"third": True})
    monkeypatch.undo()
    aside = root / ".tmp_replaced_step_6"
    assert not (root / "step_6").exists() and read_meta(aside)["again"] is True
    assert latest_checkpoint(tmp_path) == aside
    assert load_checkpoint(aside, model, opt).step == 6  # a resume can load it
    save_checkpoint(tmp_path, 7, model, opt, keep=3)
    assert list_checkpoints(tmp_path) == [root / "step_5", root / "step_6", root / "step_7"]
    assert read_meta(root / "step_6")["again"] is True


def test_bad_arguments(tmp_path: Path) -> None:
    model, opt, _ = _make(0)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path, 1, model, opt, meta={"step": 5})
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 1, model, opt, keep=0)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, model, opt, meta={"x": object()})
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "checkpoints" / "step_1", model, opt)


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_users_entry_named_like_a_checkpoint_is_never_replaced(tmp_path: Path, kind: str) -> None:
    model, opt, _ = _make(0)
    save_checkpoint(tmp_path, 1, model, opt)
    entry = tmp_path / "checkpoints" / "step_2"
    if kind == "file":
        entry.write_text("my notes")
    else:
        entry.mkdir()
        (entry / "notes.txt").write_text("my notes")
    assert ckpt.foreign_entries(tmp_path) == [entry]
    with pytest.raises(ckpt.CheckpointError, match=r"step_2 is named like a checkpoint"):
        save_checkpoint(tmp_path, 2, model, opt)
    kept = entry.read_text() if kind == "file" else (entry / "notes.txt").read_text()
    assert kept == "my notes"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_1"]
    save_checkpoint(tmp_path, 3, model, opt)  # other steps still save
    assert ckpt.foreign_entries(tmp_path) == [entry]


# ---------------------------------------------------------------------------------------------
# 2 gloo processes


def _wrap(model: nn.Module, kind: str) -> nn.Module:
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.body:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model
    return nn.parallel.DistributedDataParallel(model)


def _dist_worker(rank: int, root: str, phase: str) -> None:
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # Linear returns a view
    with gloo_rank(rank, root, f"store_{phase}"):
        fixed = torch.randint(VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(rank))
        for kind in ("fsdp", "ddp"):
            run_dir = Path(root) / kind
            if phase == "save":
                torch.manual_seed(0)  # same initial weights on every rank
                model = _wrap(TinyLM(), kind)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
                _seed_all(100 + rank)  # RNG states (so data and dropout) differ across ranks
                _train(model, opt, None, 2)
                model.eval()
                with torch.no_grad():
                    eval_loss = _loss(model, fixed).item()
                rank_state = {
                    "rank": rank,
                    "pos": 100 + rank,
                    "np": np.random.default_rng(rank).bit_generator.state,
                }
                save_checkpoint(run_dir, 2, model, opt, extra={"tokens": 42}, rank_state=rank_state)
                result = {"eval_loss": eval_loss, "probe": _rng_probe()}
            else:
                torch.manual_seed(7)  # other weights, same RNG on both ranks
                model = _wrap(TinyLM(), kind)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
                _seed_all(0)
                loaded = load_checkpoint(latest_checkpoint(run_dir), model, opt)
                probe = _rng_probe()
                model.eval()
                with torch.no_grad():
                    eval_loss = _loss(model, fixed).item()
                result = {
                    "eval_loss": eval_loss,
                    "probe": probe,
                    "step": loaded.step,
                    "extra": loaded.extra,
                    "rank_state": loaded.rank_state,
                }
            result["losses"] = _train(model, opt, None, 2)
            torch.save(result, run_dir / f"{phase}_rank{rank}.pt")
            dist.barrier()


def _verify_worker(rank: int, root: str, phase: str) -> None:
    """Both ranks check a checkpoint whose damage only one of them reads (`phase` names the
    damaged file); each writes what it raised."""
    from mm1.checkpoint import verify_checksums

    with gloo_rank(rank, root, f"store_{phase}"):
        try:
            verify_checksums(Path(root) / "damaged", distributed=True)
            result = "ok"
        except ckpt.CheckpointError as err:
            result = str(err)
        (Path(root) / f"verify_{phase}_rank{rank}.txt").write_text(result)


def _spawn(root: Path, phase: str, worker=_dist_worker) -> None:
    spawn_ranks(worker, root, phase, what=phase, store=f"store_{phase}")


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("two_ranks")
    _spawn(root, "save")
    _spawn(root, "load")
    return root


@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_two_processes_each_rank_gets_its_own_state(two_rank_runs: Path, kind: str) -> None:
    run_dir = two_rank_runs / kind
    meta = read_meta(latest_checkpoint(run_dir))
    assert meta["world_size"] == 2 and meta["step"] == 2
    saved = [torch.load(run_dir / f"save_rank{r}.pt", weights_only=False) for r in (0, 1)]
    loaded = [torch.load(run_dir / f"load_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert saved[0]["probe"] != saved[1]["probe"]  # the ranks' RNG states did differ
    for r in (0, 1):
        got, want = loaded[r], saved[r]
        assert got["rank_state"]["rank"] == r and got["rank_state"]["pos"] == 100 + r
        assert got["rank_state"]["np"] == np.random.default_rng(r).bit_generator.state
        assert got["step"] == 2 and got["extra"] == {"tokens": 42}
        assert got["probe"] == want["probe"]  # this rank's RNG states
        assert got["eval_loss"] == want["eval_loss"]  # the weights
        assert got["losses"] == want["losses"]  # weights, optimizer state, RNG: bit-exact


def test_world_size_mismatch_is_a_clear_error_or_resharded(two_rank_runs: Path) -> None:
    """Another number of processes is refused, naming --reshard; with `reshard` the 2-rank FSDP2
    checkpoint loads into one plain process: the weights of the saved model (rank 0's loss on
    its probe batch, to float rounding) and the whole optimizer state (AdamW at step 2, its
    moments full-sized), without the ranks' own states."""
    torch.manual_seed(7)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # as the run's
    path = latest_checkpoint(two_rank_runs / "fsdp")
    with pytest.raises(ValueError, match=r"saved by 2 process\(es\).*world size 1.*--reshard"):
        load_checkpoint(path, model, opt)
    loaded = load_checkpoint(path, model, opt, reshard=True)
    assert loaded.resharded and loaded.rank_state == {} and loaded.step == 2
    assert loaded.extra == {"tokens": 42}
    saved = torch.load(two_rank_runs / "fsdp" / "save_rank0.pt", weights_only=False)
    fixed = torch.randint(VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert _loss(model, fixed).item() == pytest.approx(saved["eval_loss"], rel=1e-6)
    for p in model.parameters():
        state = opt.state[p]
        assert int(state["step"]) == 2 and state["exp_avg"].shape == p.shape
        assert state["exp_avg_sq"].abs().sum() > 0


def test_world_size_recorded_in_meta_is_checked(tmp_path: Path) -> None:
    model, opt, _ = _make(0)
    path = save_checkpoint(tmp_path, 1, model, opt)
    meta = read_meta(path)
    meta["world_size"] = 4
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"saved by 4 process\(es\).*world size 1"):
        load_checkpoint(path, model, opt)


def test_reading_a_run_whose_save_deletes_the_checkpoint_being_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_config
) -> None:
    """A run read while it trains (`keep_checkpoints=1`): the save of step 4 completes and
    deletes step 2 in the middle of the read of step 2. The read then takes step 4; a failure
    that no newer checkpoint explains still raises."""
    import shutil

    import mm1.checkpoint as reading
    from mm1.config import to_dict

    run = tmp_path / "run"
    model, opt, _ = _make(0)
    for step in (2, 4):
        save_checkpoint(run, step, model, opt, keep=2)
    (run / "model.json").write_text(json.dumps(to_dict(tiny_model_config())))
    later = tmp_path / "step_4"
    (run / "checkpoints" / "step_4").rename(later)  # not yet saved when the read starts
    real = reading._read_dcp_model

    def read_while_saving(path: Path, *args: object) -> dict[str, torch.Tensor]:
        if path.name == "step_2":  # step 4 completes, then the save prunes step 2
            later.rename(run / "checkpoints" / "step_4")
            shutil.rmtree(path)
        return real(path, *args)

    monkeypatch.setattr(reading, "_read_dcp_model", read_while_saving)
    saved = reading.read_model_weights(run)
    assert saved.step == 4 and saved.path.name == "step_4"
    assert torch.equal(saved.state["embed.weight"], model.embed.weight)
    # The newest checkpoint itself unreadable: raised, not retried around.
    monkeypatch.setattr(reading, "_read_dcp_model", real)
    (run / "checkpoints" / "step_4" / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(reading.CheckpointError):
        reading.read_model_weights(run)


def test_damage_one_rank_finds_fails_the_load_on_every_rank(
    two_rank_runs: Path, tmp_path: Path
) -> None:
    """The ranks split the files (sorted: .metadata and __1_0 for rank 0, __0_0 for rank 1);
    damage only rank 1 reads is refused on rank 0 too, rather than rank 0 going on into a load
    that rank 1 never joins."""
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(latest_checkpoint(two_rank_runs / "fsdp"), damaged)
    data = damaged / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    _spawn(tmp_path, "one_flip", worker=_verify_worker)
    for rank in (0, 1):
        said = (tmp_path / f"verify_one_flip_rank{rank}.txt").read_text()
        assert "is damaged: __0_0.distcp changed since it was saved" in said, rank
