"""The run directory: one trainer at a time, and a run directory that cannot be written is a
one-line error before anything is built."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mm1.config import ConfigError
from mm1.train import run_lock
from mm1.train.trainer import Trainer

# Holds the lock on argv[1] in another process until its stdin closes.
HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from mm1.train.run_lock import claim
    claim(Path(sys.argv[1]))
    print("held", flush=True)
    sys.stdin.read()
    """
)


def _refuse_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal must come before any of the set-up (data, model) runs."""

    def setup(self: Trainer) -> None:
        raise AssertionError("setup ran")

    monkeypatch.setattr(Trainer, "setup", setup)


def test_a_second_trainer_on_a_run_directory_is_refused_until_the_first_ends(
    tmp_path: Path, world: Path, tiny_config, make_trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        trainer = make_trainer(tiny_config(tmp_path, world), run)
        with monkeypatch.context() as m:
            _refuse_setup(m)
            with pytest.raises(ConfigError) as err:
                trainer.fit()
        msg = str(err.value)
        assert msg.startswith(f"train.run_dir={run}: another process (pid {holder.pid})"), msg
        assert "\n" not in msg
    finally:
        holder.communicate("")  # the holder exits: the kernel drops its lock
    # No stale lock after the holder has gone (however it ended): the run trains.
    result = make_trainer(tiny_config(tmp_path, world), run, "train.steps=2").fit()
    assert result["step"] == 2
    assert (run / "checkpoints" / "step_2").is_dir()


def test_trainers_one_after_another_in_one_process_do_not_refuse_each_other(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    first = run_lock.claim(run)
    second = run_lock.claim(run)  # a POSIX lock belongs to the process
    for fd in (first, second):
        os.close(fd)


@pytest.mark.parametrize("where", ["a file", "under a file", "too long a name"])
def test_a_run_directory_that_cannot_be_written_is_one_line_before_the_set_up(
    where: str, tmp_path: Path, world: Path, tiny_config, make_trainer, monkeypatch
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    run = {
        "a file": afile,
        "under a file": afile / "run",
        "too long a name": tmp_path / ("r" * 300),
    }[where]
    _refuse_setup(monkeypatch)
    with pytest.raises(ConfigError) as err:
        make_trainer(tiny_config(tmp_path, world), run).fit()
    msg = str(err.value)
    why = {"a file": "a file, not a directory", "under a file": "Not a directory"}
    assert msg.startswith(f"train.run_dir={run}: cannot write there ({why.get(where, '')}"), msg
    assert "\n" not in msg


def test_a_file_system_without_locks_trains_unlocked_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """Some NFS and Lustre mounts have no POSIX locks (lockf: ENOLCK): every run there would
    fail, so the lock is skipped, said once."""
    import errno

    def no_locks(fd: int, cmd: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "lockf", no_locks)
    fd = run_lock.claim(tmp_path / "run")
    os.close(fd)
    assert "has no file locks (No locks available)" in caplog.text


def test_a_run_that_fails_in_its_set_up_leaves_no_empty_run_directory(
    tmp_path: Path, world: Path, tiny_config, make_trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config error found in the set-up (a mistyped starting point) left an empty run
    directory holding the lock file; one that existed before stays, as does anything written."""
    cfg = tiny_config(tmp_path, world)

    def setup(self: Trainer) -> None:
        raise ConfigError("train.init.vision=runs/encoder_vqq does not exist")

    monkeypatch.setattr(Trainer, "setup", setup)
    run = tmp_path / "runs" / "new"
    with pytest.raises(ConfigError):
        make_trainer(cfg, run).fit()
    assert not run.exists() and run.parent.is_dir()
    run.mkdir()
    with pytest.raises(ConfigError):
        make_trainer(cfg, run).fit()
    assert run.is_dir()


def test_an_export_or_a_runs_checkpoints_is_refused_as_a_run_directory(
    tmp_path: Path, world: Path, tiny_config, make_trainer
) -> None:
    """Readers take a directory holding model.safetensors as an export, and RUN/checkpoints/
    step_N as that run's checkpoint: a run trained in either was silently never read (eval of
    the directory scored the old export)."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"")
    (export / "model.json").write_text("{}")
    run = tmp_path / "run"
    (run / "checkpoints" / "step_4").mkdir(parents=True)
    (run / "model.json").write_text("{}")
    cfg = tiny_config(tmp_path, world)
    cases = {
        export: "holds an exported model (model.safetensors)",
        run / "checkpoints" / "step_4": f"is inside the run {run}'s checkpoints/",
        run / "checkpoints" / "new" / "deeper": f"is inside the run {run}'s checkpoints/",
    }
    for run_dir, why in cases.items():
        with pytest.raises(ConfigError) as err:
            make_trainer(cfg, run_dir)
        assert str(err.value).startswith(f"train.run_dir={run_dir} {why}"), str(err.value)


def test_a_run_whose_config_yaml_is_gone_still_refuses_another_model(
    tmp_path: Path, world: Path, tiny_config, make_trainer
) -> None:
    """The resume checks read config.yaml; without it every one was skipped: the old model
    trained on and the new dimension was written as the run's. The newest checkpoint's own
    record of the config stands in."""
    cfg, run = tiny_config(tmp_path, world, val_every=0), tmp_path / "run"
    make_trainer(cfg, run, "train.steps=2").fit()
    (run / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"holds another model: .*model\.decoder\.dim is 32"):
        make_trainer(cfg, run, "train.steps=3", "model.decoder.dim=64").fit()
    assert make_trainer(cfg, run, "train.steps=3").fit()["step"] == 3
    assert (run / "config.yaml").is_file()
