"""Loading a run directory never runs code it carries: a crafted `.metadata`, a crafted DCP byte
item and crafted rank state are each refused with one line naming the file. A file changed after
its save (a flipped bit, a cut) is refused by the checksums in meta.json; the crafted-file cases
drop those (an attacker rewrites meta.json too), so the safe reader itself is what they test."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

import mm1.checkpoint as reading
import mm1.train.checkpoint as ckpt
from mm1.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)


class Payload:
    """Unpickling this creates `marker` (what an attacker's code would do instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _make() -> tuple[Tiny, torch.optim.AdamW]:
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.lin.weight.sum().backward()
    opt.step()
    return model, opt


def _saved(tmp_path: Path, **kw) -> Path:
    model, opt = _make()
    return save_checkpoint(tmp_path / "run", 1, model, opt, **kw)


def _loads(path: Path) -> list:
    model, opt = _make()
    return [lambda: load_checkpoint(path, model, opt), lambda: load_model_weights(path, model)]


def _unchecked(path: Path) -> None:
    """meta.json without its checksums: a crafted checkpoint's, or one saved before them."""
    meta = json.loads((path / "meta.json").read_text())
    del meta["checksums"]
    (path / "meta.json").write_text(json.dumps(meta))


def test_a_crafted_metadata_pickle_is_refused_without_running(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    _unchecked(path)
    for load in _loads(path):  # resume / eval, convert, generate
        with pytest.raises(CheckpointError) as err:
            load()
        assert str(path / ".metadata") in str(err.value)
        assert "\n" not in str(err.value)
        assert not marker.exists()
    pickle.loads((path / ".metadata").read_bytes())  # the control: plain pickle runs it
    assert marker.exists()


def test_a_crafted_rank_state_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _saved(tmp_path, rank_state={"loader": Payload(marker)})
    model, opt = _make()
    with pytest.raises(CheckpointError, match="rank_state.0") as err:
        load_checkpoint(path, model, opt)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    load_model_weights(path, model)  # the model alone never reads the rank state


def test_a_crafted_dcp_byte_item_is_refused_without_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DCP pickles every non-tensor value as a byte item and its planner unpickles it with
    # weights_only=False: write the payload itself as the `global` item.
    marker = tmp_path / "pwned"
    real_pack = ckpt._pack
    monkeypatch.setattr(
        ckpt, "_pack", lambda obj: Payload(marker) if "step" in obj else real_pack(obj)
    )
    path = _saved(tmp_path)
    monkeypatch.undo()
    model, opt = _make()
    with pytest.raises(CheckpointError, match="'global'") as err:
        load_checkpoint(path, model, opt)
    assert str(path / "__0_0.distcp") in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def _tamper_index(path: Path, edit) -> None:
    # Test side only: the index we wrote ourselves, read the way DCP writes it.
    metadata = pickle.loads((path / ".metadata").read_bytes())
    edit(metadata)
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    _unchecked(path)


def test_an_index_that_turns_a_tensor_into_bytes_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)

    def weight_as_bytes(md) -> None:
        blob = md.storage_data[MetadataIndex("global")]
        md.state_dict_metadata["model.lin.weight"] = BytesStorageMetadata()
        md.storage_data[MetadataIndex("model.lin.weight")] = blob

    _tamper_index(path, weight_as_bytes)
    model, _ = _make()
    with pytest.raises(CheckpointError, match="'model.lin.weight' is stored as pickled bytes"):
        load_model_weights(path, model)


def test_an_index_pointing_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)

    def escape(md) -> None:
        for info in md.storage_data.values():
            info.relative_path = "../../../etc/passwd"

    _tamper_index(path, escape)
    model, _ = _make()
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        load_model_weights(path, model)


def test_a_checkpoint_still_round_trips_numpy_and_optimizer_values(tmp_path: Path) -> None:
    model, opt = _make()
    path = save_checkpoint(tmp_path, 2, model, opt, extra={"x": (1, 2.5, "s", None)})
    model2, opt2 = _make()
    loaded = load_checkpoint(path, model2, opt2)  # numpy's RNG state is an ndarray
    assert loaded.extra == {"x": (1, 2.5, "s", None)}
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    assert torch.equal(model2.lin.weight, model.lin.weight)


def test_a_truncated_data_file_or_bad_meta_json_is_one_line(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    data = path / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    _unchecked(path)  # DCP's own read fails
    model, opt = _make()
    with pytest.raises(CheckpointError, match="could not read") as err:
        load_checkpoint(path, model, opt)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    (path / "meta.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="meta.json: not valid JSON"):
        load_model_weights(path, model)


def test_files_changed_since_the_save_are_refused_by_their_checksums(tmp_path: Path) -> None:
    """DCP checks nothing it reads: 64 flipped bytes in a tensor file resumed silently. The save
    records every file's size and CRC-32 in meta.json and every read checks them first, its
    index included: a resume, and the model-only reads of eval, serve, convert and train.init."""
    path = _saved(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    assert set(meta["checksums"]) == {p.name for p in path.iterdir()} - {"meta.json"}
    data = path / "__0_0.distcp"
    good = data.read_bytes()
    middle = len(good) // 2
    flipped = bytes(b ^ 0xFF for b in good[middle : middle + 64])
    data.write_bytes(good[:middle] + flipped + good[middle + 64 :])
    model, opt = _make()
    for load in _loads(path):  # resume; the model alone
        with pytest.raises(CheckpointError, match=r"is damaged: __0_0\.distcp changed since it"):
            load()
    with pytest.raises(CheckpointError, match=r"is damaged: __0_0\.distcp changed since it"):
        reading._read_dcp_model(path)  # eval, serve, convert, train.init: whole tensors
    data.write_bytes(good[:middle])
    with pytest.raises(CheckpointError, match=rf"is damaged: __0_0\.distcp has {middle:,} bytes"):
        load_checkpoint(path, model, opt)
    data.write_bytes(good)
    load_checkpoint(path, model, opt)
    marker = tmp_path / "pwned"  # a crafted index is refused unread while the checksums stand
    index = (path / ".metadata").read_bytes()
    (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=r"is damaged: \.metadata (has \d+ bytes|changed)"):
        load_checkpoint(path, model, opt)
    assert not marker.exists()
    (path / ".metadata").write_bytes(index)


@pytest.mark.parametrize("name", ["../../outside", "/dev/zero", "fifo"])
def test_checksums_read_only_the_checkpoints_own_regular_files(tmp_path: Path, name: str) -> None:
    """meta.json is as open to tampering as the rest: a name outside the checkpoint, or a file
    that never ends (a device, a FIFO), is refused without being read."""
    import os

    path = _saved(tmp_path)
    (tmp_path / "outside").write_bytes(b"x")
    if name == "fifo":
        os.mkfifo(path / "fifo")
    meta = json.loads((path / "meta.json").read_text())
    meta["checksums"][name] = {"size": 0, "crc32": "00000000"}
    (path / "meta.json").write_text(json.dumps(meta))
    model, opt = _make()
    want = "is not a regular file" if name == "fifo" else f"its checksums name {name!r}"
    with pytest.raises(CheckpointError, match=want):
        load_checkpoint(path, model, opt)
