"""The `mm1` command: the one place that wires configs, data, models, training and evaluation.

Each module here holds a group of commands with their parser entries (`register`): run.py (demo,
train, info, ablate), data.py (data ..., recaption), model.py (convert, upcycle, generate, chat,
serve), evaluate.py (eval), encoder.py (train-encoder, eval-encoder).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable

from rich.markup import escape

from mm1.config import ConfigError

from . import data, encoder, evaluate, model, run
from .common import console
from .evaluate import EVAL_OUT

__all__ = ["EVAL_OUT", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
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
        if "torch.distributed" in sys.modules:  # a command that may have started a group
            from mm1.train.parallel import exit_now, shutdown_distributed

            if shutdown_distributed(finished) and finished:
                exit_now(code)


def _run(args: argparse.Namespace) -> int:
    from mm1.data.sources import DataError

    try:
        code = args.fn(args)
    except ConfigError as err:
        _print_error("config error", err)
        return 2
    except (FileNotFoundError, DataError) as err:
        _print_error("error", err)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _print_error("error", err)  # a full disk is the user's to fix: no traceback
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


def _print_error(label: str, err: object) -> None:
    # One line however long (no wrapping at the console width); the message is plain text, so
    # brackets in it (paths, lists) must not be read as rich markup.
    console.print(f"[bold red]{label}:[/] {escape(str(err))}", soft_wrap=True)
