"""`mm1.fs`: atomic text writes and the shared lock errno set."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from mm1 import fs
from mm1.fs import LOCKS_UNSUPPORTED, atomic_write_text, temp_files


def test_atomic_write_text_writes_and_leaves_no_temp_file(tmp_path: Path):
    path = tmp_path / "record.json"
    atomic_write_text(path, "first\n")
    assert path.read_text(encoding="utf-8") == "first\n"
    atomic_write_text(str(path), "héllo ✓\n")  # replaces; a str path; UTF-8 by default
    assert path.read_bytes() == "héllo ✓\n".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
    assert temp_files(path) == []


def test_atomic_write_text_encoding(tmp_path: Path):
    path = tmp_path / "latin.txt"
    atomic_write_text(path, "é", encoding="latin-1")
    assert path.read_bytes() == b"\xe9"


def test_atomic_write_text_keeps_the_usual_file_mode(tmp_path: Path):
    # mkstemp would make the file 0o600; a file written in place gets 0o666 less the umask
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


def test_failed_replace_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "cell.json"
    path.write_text("old\n")

    def fail(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "replace failed")

    monkeypatch.setattr(fs.os, "replace", fail)
    with pytest.raises(OSError, match="replace failed"):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cell.json"]


def test_failed_write_leaves_no_file(tmp_path: Path):
    path = tmp_path / "new.txt"
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "✓", encoding="ascii")
    assert list(tmp_path.iterdir()) == []


def test_directory_fsync_errors_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real_fsync = os.fsync
    dir_fd: list[int] = []
    real_open = os.open

    def tracking_open(path: object, flags: int, *args: object) -> int:
        fd = real_open(path, flags, *args)
        if Path(str(path)) == tmp_path:
            dir_fd.append(fd)
        return fd

    def fsync(fd: int) -> None:
        if fd in dir_fd:
            raise OSError(errno.EINVAL, "no fsync of directories here")
        real_fsync(fd)

    monkeypatch.setattr(fs.os, "open", tracking_open)
    monkeypatch.setattr(fs.os, "fsync", fsync)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert dir_fd and (tmp_path / "a.txt").read_text() == "x"


def test_temp_files_finds_leftovers_of_that_file_only(tmp_path: Path):
    path = tmp_path / "world[1].json"  # glob metacharacters in the name
    left = tmp_path / f".{path.name}.123.abcd.tmp"
    left.write_text("partial")
    (tmp_path / ".other.json.123.abcd.tmp").write_text("")
    assert temp_files(path) == [left]


def test_locks_unsupported_is_shared():
    from mm1.data import synthetic
    from mm1.train import run_lock

    assert errno.ENOLCK in LOCKS_UNSUPPORTED
    assert synthetic.LOCKS_UNSUPPORTED is run_lock.LOCKS_UNSUPPORTED is LOCKS_UNSUPPORTED


def test_a_full_disk_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A write that fails for want of space raises an OSError naming no file ("[Errno 28] No
    space left on device"): the error names the file it was writing."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs.os, "fsync", full)
    with pytest.raises(OSError) as err:
        atomic_write_text(path, "new\n")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert path.read_text() == "old\n"


def test_read_json_names_a_damaged_file(tmp_path: Path):
    path = tmp_path / "model.json"
    path.write_text('{"a": 1}')
    assert fs.read_json(path) == {"a": 1}
    for damaged in (b"", b'{"a": ', b"\xff\xfe"):
        path.write_bytes(damaged)
        with pytest.raises(fs.DamagedFile, match=rf"^{path} is not valid JSON \("):
            fs.read_json(path)
