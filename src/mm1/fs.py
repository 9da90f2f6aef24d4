"""File-system helpers shared across the package (stdlib only, so any module may import it)."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import secrets
from pathlib import Path
from typing import Any

# What lockf raises on a file system without POSIX locks (some NFS and Lustre mounts): callers
# then skip the lock (write unguarded, or warn) rather than fail every run there.
LOCKS_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)

_TEMP_SUFFIX = ".tmp"


class DamagedFile(ValueError):
    """A file mm1 reads (a model's JSON side files, its weights) that is empty, cut short or not
    what its name says; the message names the file (the CLI: one line, exit 2)."""


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value in `path`; a DamagedFile naming it when the file is not JSON (json's own
    error names no file: `Expecting value: line 1 column 1 (char 0)`)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedFile(f"{path} is not valid JSON ({err})") from None


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically: readers see the old file or the whole new one, never a
    part, and a crash leaves the old file in place.

    The text goes to a temporary file beside `path` (the same file system, so the rename is
    atomic), which is flushed, fsynced and renamed over `path`; the directory is then fsynced
    where the platform allows. On an error the temporary file is removed and the error raised.
    """
    path = Path(path)
    # A unique name: two writers of one file must not write into the same temporary file.
    tmp = path.with_name(f"{_temp_prefix(path)}{os.getpid()}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
    # os.open rather than mkstemp: the file gets the usual mode (0o666 less the umask), not
    # mkstemp's 0o600, so a shared directory's files stay readable as before.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and err.filename is None:  # a full disk's write names none
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    fsync_dir(path.parent)


def temp_files(path: str | os.PathLike[str]) -> list[Path]:
    """The temporary files `atomic_write_text` left beside `path`: only a process killed while
    writing leaves one; a caller that clears a directory it owns removes them too."""
    path = Path(path)
    return sorted(path.parent.glob(f"{glob.escape(_temp_prefix(path))}*{_TEMP_SUFFIX}"))


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable; best effort (some platforms and file systems
    cannot open or fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
