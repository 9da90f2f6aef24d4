"""What the CLI tests share: running `mm1` in this process and reading its one-line errors."""

from __future__ import annotations

from mm1 import cli


def one_line(capsys, argv: list[str], code: int) -> str:
    """`mm1 ARGV` in this process: its exit status and its single output line."""
    assert cli.main(argv) == code
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    return " ".join(out.split())
