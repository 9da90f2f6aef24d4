"""Shared helpers of the CPU benchmarks: results, tables, timing, child processes, worlds.

Absolute CPU times on a shared 2-core machine are noise; every benchmark reports ratios measured
in the same run, and each measured variant runs in a fresh subprocess when its peak memory
matters (`ru_maxrss` is a per-process high-water mark).
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
# Worlds written for the benchmarks (the repository ignores /data/).
WORLDS = ROOT / "data" / "bench"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """benchmarks/results/<name>.json with the environment attached."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"benchmark": name, "environment": environment(), **payload}
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        first = c == columns[0]
        table.add_column(c, justify="left" if first else "right", no_wrap=first)
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # logs and pipes: no truncated columns
    console.print(table)


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e5:
            return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}"
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (`RssAnon`, `VmHWM`, ...) in MiB; nan elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def trim_heap() -> None:
    """Hand freed heap pages back to the kernel (glibc keeps them), so RSS says what is held."""
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [  # glibc's struct mallinfo2, every field a size_t
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


@functools.cache
def _mallinfo2() -> Any:
    """glibc's `mallinfo2`, or None (not glibc, or older than 2.33)."""
    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = _MallInfo2
    return f


def heap_in_use_mib() -> float:
    """The bytes glibc's malloc has handed out and not had back (`mallinfo2`: small chunks in
    its arenas plus large ones mapped on their own), in MiB; nan without glibc 2.33+. Unlike
    RSS it does not count freed memory malloc keeps, so it does not depend on fragmentation."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return float("nan")
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


class AnonPeak:
    """The largest anonymous memory (`RssAnon`) this process reaches inside the block, sampled
    every `every_s` by a thread: the memory it allocates, without files' mapped pages, which
    the kernel can drop. `start` is what it held on entry, `peak` the largest sample; `heap_*`
    the same for the bytes malloc has handed out (`heap_in_use_mib`)."""

    def __init__(self, every_s: float = 0.002) -> None:
        self.every_s = every_s
        self.start = self.peak = status_mib("RssAnon")
        self.heap_start = self.heap_peak = heap_in_use_mib()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, status_mib("RssAnon"))
            self.heap_peak = max(self.heap_peak, heap_in_use_mib())
            time.sleep(self.every_s)

    @property
    def added(self) -> float:
        return self.peak - self.start

    @property
    def heap_added(self) -> float:
        return self.heap_peak - self.heap_start

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, status_mib("RssAnon"))
        self.heap_peak = max(self.heap_peak, heap_in_use_mib())


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB.

    Linux's `ru_maxrss` (getrusage RUSAGE_SELF) is inherited through fork + exec: a child
    started by a 1.3 GiB parent reports at least 1.3 GiB. The kernel's per-address-space
    high-water mark `VmHWM` (/proc/self/status) starts afresh at exec, so it is used when
    available; `ru_maxrss` otherwise.
    """
    hwm = status_mib("VmHWM")
    if math.isnan(hwm):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return hwm


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def run_child(module: str, args: Sequence[str], timeout: float = 300) -> dict[str, Any]:
    """Run `python -m module args...` in a fresh process; it prints one JSON line last."""
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    # One quiet child: no tokenizers fork warnings, no progress bars.
    env["TOKENIZERS_PARALLELISM"] = "false"
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}{proc.stdout[-2000:]}"
        )
    last = [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    return json.loads(last)


def emit(result: dict[str, Any]) -> None:
    """A child's answer: one JSON line on stdout."""
    print(json.dumps(result), flush=True)


def ensure_world(image_size: int = 64, size: str = "tiny", seed: int = 0, text_scale: float = 1.0):
    """The synthetic world with `image_size`-px JPEGs under data/bench/, written once per
    version of the world generator (the directory name holds a hash of its source)."""
    import hashlib
    import inspect

    import mm1.data.synthetic as synthetic
    import mm1.data.synthetic_writers as writers
    from mm1.data.scenes import documents, language, scene

    # the whole generator
    modules = (scene, language, documents, writers, synthetic)
    source = "".join(inspect.getsource(m) for m in modules)
    tag = hashlib.sha256(source.encode()).hexdigest()[:8]
    root = WORLDS / f"world-{size}-{image_size}px-text{text_scale:g}-seed{seed}-{tag}"
    if not (root / "world.json").exists():
        print(f"writing the synthetic world ({size}, {image_size} px) to {root} ...", flush=True)
        synthetic.write_world(
            root, seed=seed, size=size, image_size=image_size, text_scale=text_scale
        )
    return synthetic.WorldManifest.load(root)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None where either was not measured, nan where b is 0."""
    if a is None or b is None:
        return None
    return a / b if b else float("nan")


def set_threads() -> int:
    """Torch intra-op threads for a benchmark: $MM1_BENCH_THREADS, default 1.

    One thread by default: on a shared 2-core machine a 2-thread OpenMP region stalls whenever
    another process holds one core (steps 3-10x slower at random), while one thread degrades
    gracefully, so ratios stay meaningful. Set MM1_BENCH_THREADS=2 on an idle machine.
    """
    import torch

    n = int(os.environ.get("MM1_BENCH_THREADS", "1"))
    torch.set_num_threads(n)
    return n
