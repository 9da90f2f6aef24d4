"""What the CLI tests share: running `mm1` in this process and reading its one-line errors,
and under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

from mm1 import cli


def one_line(capsys, argv: list[str], code: int) -> str:
    """`mm1 ARGV` in this process: its exit status and its single output line."""
    assert cli.main(argv) == code
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    return " ".join(out.split())


def torchrun(args: list[str], nproc: int) -> str:
    """`mm1 <args>` under torchrun with `nproc` processes (one thread each); its output. A
    failed run fails the test with the output's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    dist_run = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    p = subprocess.run(
        [sys.executable, *dist_run, "-m", "mm1.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout + p.stderr
