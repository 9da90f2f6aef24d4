"""The `mm1` command: the one place that wires configs, data, models, training and evaluation.

Each module here holds a group of commands with their parser entries (`register`): run.py (demo,
train, info, ablate), data.py (data ..., recaption), model.py (convert, upcycle, generate,
generate-image, chat, serve), evaluate.py (eval, eval-generation), encoder.py (train-encoder,
eval-encoder, export-encoder).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable

# Only the standard library at import: the console script imports this module before `main`
# runs, and a Ctrl-C during an import here could not be caught (the rest loads inside `main`).

__all__ = ["EVAL_OUT", "build_parser", "main"]

# Errors from the user's own paths and disk, theirs to fix: one line, no traceback.
USER_OS_ERRORS = (
    errno.ENOSPC,  # disk full
    errno.EDQUOT,  # quota
    errno.EACCES,  # permission denied
    errno.EPERM,
    errno.EROFS,  # read-only file system
    errno.ENOTDIR,  # a path through a regular file
    errno.EISDIR,  # a directory where a file goes
    errno.ENAMETOOLONG,
)


def __getattr__(name: str) -> object:
    if name == "EVAL_OUT":  # loaded on use, as the command modules are
        from .evaluate import EVAL_OUT

        return EVAL_OUT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    from . import data, encoder, evaluate, model, run

    parser = argparse.ArgumentParser(
        prog="mm1",
        description="Pre-train, fine-tune and evaluate multimodal LLMs the way Apple's MM1 does.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str,
        fn: Callable[[argparse.Namespace], int | None],
        help: str,
        on: argparse._SubParsersAction | None = None,
    ) -> argparse.ArgumentParser:
        p = (on or sub).add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    for group in (run, data, model, evaluate, encoder):
        group.register(add)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `mm1` command; returns its exit status."""
    try:
        return _main(argv)
    except KeyboardInterrupt as err:
        # A Ctrl-C no command handled itself (while starting: imports, loading a model) is the
        # user's wish, not a failure: no traceback; 130 as for a process ended by SIGINT. A
        # trainer stopped by a second signal says so, and exits as that signal would (143
        # for SIGTERM).
        print(f"mm1: {str(err) or 'interrupted'}", file=sys.stderr, flush=True)
        return 128 + getattr(err, "signum", 2)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    # Overrides may come after options (`mm1 data stats cfg.yaml --json data.seq_len=4096`).
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    finished = False
    code = 1
    try:
        code = _run(args)
        finished = code not in (1, 2)  # not an error that may have stopped only this rank
        return code
    finally:
        if _group_started():  # a command started a process group
            from mm1.train.parallel import exit_now, shutdown_distributed

            if shutdown_distributed(finished) and finished:
                exit_now(code)


def _group_started() -> bool:
    """Whether this process holds a torch.distributed group, without importing torch: a Ctrl-C
    while torch was being imported leaves it half-made, and importing more of it then fails."""
    dist = sys.modules.get("torch.distributed")
    try:
        return dist is not None and bool(dist.is_available() and dist.is_initialized())
    except AttributeError:  # half-imported: no group was ever started
        return False


def _run(args: argparse.Namespace) -> int:
    from mm1.config import ConfigError
    from mm1.data.sources import DataError
    from mm1.fs import DamagedFile
    from mm1.train.errors import TrainingError

    from .common import TORCHRUN_COMMANDS, console, first_rank, refuse_torchrun

    try:
        if args.command not in TORCHRUN_COMMANDS:
            refuse_torchrun(f"mm1 {args.command}")
        code = args.fn(args)
    except ConfigError as err:
        # Under torchrun every rank reads the same config and finds the same error: the first
        # rank says it once (a rank's own error is a DataError or another, said by each).
        if first_rank():
            _print_error("config error", err)
        return 2
    except (FileNotFoundError, DataError, DamagedFile) as err:
        _print_error("error", err)
        return 2
    except TrainingError as err:  # a run that cannot go on (non-finite losses, out of memory)
        _print_error("error", err)
        return 1
    except OSError as err:
        if err.errno not in USER_OS_ERRORS:
            raise
        _print_error("error", _os_error_message(err))
        return 1
    except (ValueError, KeyError, TypeError) as err:
        # Mostly input the checks above did not classify (a task file's contents, a prompt):
        # one line for the user; the traceback on request, for a bug report.
        if os.environ.get("MM1_TRACEBACK"):
            raise
        _print_error("error", err.args[0] if isinstance(err, KeyError) and err.args else err)
        console.print("(MM1_TRACEBACK=1 shows the traceback)", style="dim")
        return 1
    return code or 0


def _os_error_message(err: OSError) -> str:
    """`PATH: Permission denied` rather than `[Errno 13] Permission denied: 'PATH'`."""
    if err.filename is None or not err.strerror:
        return str(err)  # e.g. a full disk's own sentence
    where = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else err.filename
    return f"{where}: {err.strerror}"


def _print_error(label: str, err: object) -> None:
    from rich.markup import escape

    from .common import console

    # One line however long (no wrapping at the console width); the message is plain text, so
    # brackets in it (paths, lists) must not be read as rich markup.
    console.print(f"[bold red]{label}:[/] {escape(str(err))}", soft_wrap=True)
