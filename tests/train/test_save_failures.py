"""A save that runs out of disk space: one line saying so, the partial directory removed, the
complete checkpoints kept, and the next save (once there is space) works."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs
from torch import nn

import mm1.train.checkpoint as ckpt
from mm1 import cli
from mm1.train.checkpoint import (
    DiskFullError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _fail_writes(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """Every DCP data write writes a little, then fails the way a full disk does."""

    def write(transforms, stream, data, *args, **kwargs):
        stream.write(b"x" * 100)
        raise exc

    monkeypatch.setattr(dcp_fs, "_write_item", write)


def _check_refused(err: pytest.ExceptionInfo, run: Path) -> None:
    msg = str(err.value)
    final = run / "checkpoints" / "step_2"
    assert msg.startswith(f"no space left on device while saving step 2 to {final} (needs about ")
    assert " MiB)" in msg and "kept step_1" in msg and "\n" not in msg
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_1"]  # no .tmp_step_2


@pytest.mark.parametrize("how", ["errno", "errno_lost"])
def test_disk_full_during_a_save_is_one_line_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    model, opt = _model()
    save_checkpoint(tmp_path, 1, model, opt)
    with monkeypatch.context() as m:
        if how == "errno":
            _fail_writes(m, OSError(errno.ENOSPC, "No space left on device"))
        else:  # torch's zip writer loses the errno; the disk then has no room for the save
            _fail_writes(
                m, RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")
            )
            usage = shutil.disk_usage(tmp_path)
            m.setattr(ckpt.shutil, "disk_usage", lambda p: usage._replace(free=4096))
        with pytest.raises(DiskFullError) as err:
            save_checkpoint(tmp_path, 2, model, opt)
    _check_refused(err, tmp_path)
    assert err.value.errno == errno.ENOSPC
    load_checkpoint(latest_checkpoint(tmp_path), *_model())  # the last good one is intact
    # Space freed: the next save works.
    assert save_checkpoint(tmp_path, 2, model, opt) == tmp_path / "checkpoints" / "step_2"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_1", "step_2"]


def test_disk_full_while_completing_a_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = _model()
    save_checkpoint(tmp_path, 1, model, opt)

    def full(directory: Path, meta: dict) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "meta.json"))

    monkeypatch.setattr(ckpt, "_write_meta", full)
    with pytest.raises(DiskFullError) as err:
        save_checkpoint(tmp_path, 2, model, opt)
    _check_refused(err, tmp_path)


def test_other_save_failures_are_not_called_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt = _model()
    _fail_writes(monkeypatch, OSError(errno.EACCES, "Permission denied"))
    with pytest.raises(BaseException) as err:
        save_checkpoint(tmp_path, 1, model, opt)
    assert not isinstance(err.value, DiskFullError)
    assert list((tmp_path / "checkpoints").iterdir()) == []  # the partial save is gone too


def test_the_cli_prints_a_full_disk_as_one_line(monkeypatch, capsys) -> None:
    def full(args) -> None:
        raise DiskFullError(errno.ENOSPC, "no space left on device while saving step 3 to x")

    monkeypatch.setattr("mm1.cli.run.cmd_info", full)
    assert cli.main(["info", "x.yaml"]) == 1
    out = capsys.readouterr().out
    assert out.strip() == "error: no space left on device while saving step 3 to x"
