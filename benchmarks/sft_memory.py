"""Peak memory of the SFT loader on a LLaVA-665k-sized file, with 2 loader workers.

Writes a LLaVA JSON list of `--records` conversations (665,000 by default, ~1 KB of JSON each
like LLaVA-1.5's llava_v1_5_mix665k.json: one image, 1-4 question/answer rounds), the same list
gzipped and the same records as JSONL, into `--dir` (default /tmp/mm1_sft_bench), pointing at a
few small JPEGs. For each variant a fresh child process builds `build_loader(...,
num_workers=2)` over the file and takes `--batches` batches, while this process samples the
child's process tree (the loader process and its workers) every 0.25 s: peak RSS summed over
the tree, and peak PSS (shared pages counted once, in shares), with the peak of each process.
Variants:

  json      the JSON list, indexed once per process (each element's byte span) and each
            record parsed when it is read (`JsonList`): the reader's way for a .json file
  json_gz   the same list gzipped: it cannot be seeked, so it is parsed whole, once per process
            (the reader's way before the index, for every .json)
  jsonl     the same records, one per line: read as a stream

The "builds" column counts index builds (json) or whole-file parses (json_gz) per process.

    python -m benchmarks.sft_memory                   # 665k records, 2 workers
    python -m benchmarks.sft_memory --records 20000   # quick
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, print_table, write_result

WORDS = [
    "the",
    "a",
    "of",
    "on",
    "in",
    "with",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "round",
    "square",
    "cat",
    "dog",
    "person",
    "table",
    "chair",
    "car",
    "sign",
    "street",
    "window",
    "picture",
    "left",
    "right",
    "behind",
    "front",
    "near",
    "under",
    "holding",
    "wearing",
    "two",
    "three",
    "what",
    "where",
    "how",
    "many",
    "is",
    "are",
    "does",
    "color",
    "shape",
    "object",
    "image",
    "scene",
    "shows",
    "there",
]


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_data(d: Path, records: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """`sft.json` (a list), `sft.json.gz` and `sft.jsonl` with the same records, and
    images/0..7.jpg."""
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    (d / "images").mkdir(exist_ok=True)
    for i in range(8):
        Image.new("RGB", (64, 48), (30 * i, 255 - 30 * i, 90)).save(d / "images" / f"{i}.jpg")
    js, gz, jl = d / "sft.json", d / "sft.json.gz", d / "sft.jsonl"
    meta = d / "meta.json"
    if meta.exists() and json.loads(meta.read_text()) == records and gz.exists():
        return js, gz, jl
    rng = random.Random(seed)
    # A pool of texts keeps writing fast; records still differ (pool choices and ids).
    questions = [_sentence(rng, rng.randint(6, 14)) + "?" for _ in range(2000)]
    answers = [
        " ".join(_sentence(rng, rng.randint(8, 20)) for _ in range(rng.randint(2, 8)))
        for _ in range(2000)
    ]
    with js.open("w") as fj, jl.open("w") as fl:
        fj.write("[")
        for i in range(records):
            turns = []
            for r in range(rng.randint(1, 4)):
                q = rng.choice(questions)
                turns.append({"from": "human", "value": f"<image>\n{q}" if r == 0 else q})
                turns.append({"from": "gpt", "value": rng.choice(answers)})
            rec = {"id": f"{i:09d}", "image": f"{i % 8}.jpg", "conversations": turns}
            line = json.dumps(rec)
            fj.write(("," if i else "") + line)
            fl.write(line + "\n")
        fj.write("]")
    with js.open("rb") as src, gzip.open(gz, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    meta.write_text(json.dumps(records))
    return js, gz, jl


def child(path: str, batches: int, workers: int) -> None:
    """The measured process: a loader over `path` with `workers` workers, `batches` batches."""
    from mm1.config import SourceConfig
    from mm1.data.images import ImageProcessor
    from mm1.data.loader import LoaderSettings, build_loader
    from mm1.data.prompt_format import PromptFormat
    from mm1.data.sources import base
    from mm1.data.synthetic import write_world
    from mm1.data.tokenizer import Tokenizer

    world = Path(path).parent / "world"
    if not (world / "world.json").exists():
        write_world(world, seed=0, size="tiny")
    tok = Tokenizer.from_file(world / "tokenizer.json")
    parse, index = base.load_json_file, base.JsonList

    def parsed(p: Path) -> tuple[Any, bool]:
        print(f"BUILD {os.getpid()}", file=sys.stderr, flush=True)
        return parse(p)

    def indexed(p: Path) -> Any:
        print(f"BUILD {os.getpid()}", file=sys.stderr, flush=True)
        return index(p)

    # counted in this process and in the forked workers
    base.load_json_file, base.JsonList = parsed, indexed  # type: ignore[assignment, misc]
    spec = SourceConfig(format="llava", path=path)
    settings = LoaderSettings(
        sources=[spec],
        seq_len=2048,
        micro_batch_size=2,
        prompt_format=PromptFormat(16),
        pack_buffer=32,
    )
    start = time.perf_counter()
    it = iter(build_loader(settings, tok, ImageProcessor.clip(32), num_workers=workers))
    first = None
    for i in range(batches):
        next(it)
        if i == 0:
            first = time.perf_counter() - start
    print(json.dumps({"first_batch_s": first, "seconds": time.perf_counter() - start}))


def measure(path: Path, batches: int, workers: int) -> dict[str, Any]:
    import psutil

    cmd = [sys.executable, "-m", "benchmarks.sft_memory", "--child", str(path)]
    cmd += ["--batches", str(batches), "--workers", str(workers)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = {"rss": 0, "pss": 0}
    per_process: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = pss = 0
                for p in procs:
                    try:
                        info = p.memory_full_info()
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    rss += info.rss
                    pss += info.pss
                    per_process[p.pid] = max(per_process.get(p.pid, 0), info.rss)
                peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.25)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    builds: dict[str, int] = {}
    for pid in re.findall(r"BUILD (\d+)", err):  # a worker's warning may share the line
        builds[pid] = builds.get(pid, 0) + 1
    result = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
    mib = 1 << 20
    return {
        **result,
        "peak_rss_tree_mib": peak["rss"] / mib,
        "peak_pss_tree_mib": peak["pss"] / mib,
        "peak_rss_per_process_mib": sorted((v / mib for v in per_process.values()), reverse=True),
        "builds_per_process": sorted(builds.values(), reverse=True),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=665_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mm1_sft_bench"))
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.batches, args.workers)
        return
    js, gz, jl = write_data(args.dir, args.records)
    rows, results = [], {}
    for name, path in (("json", js), ("json_gz", gz), ("jsonl", jl)):
        r = measure(path, args.batches, args.workers)
        results[name] = r
        rows.append(
            [
                name,
                r["peak_rss_tree_mib"],
                r["peak_pss_tree_mib"],
                ", ".join(f"{v:.0f}" for v in r["peak_rss_per_process_mib"]),
                ", ".join(map(str, r["builds_per_process"])) or "0",
                r["first_batch_s"],
            ]
        )
    size = js.stat().st_size / (1 << 20)
    print_table(
        f"SFT loader, {args.records:,} records ({size:,.0f} MiB JSON), {args.workers} workers",
        ["variant", "peak RSS MiB", "peak PSS MiB", "RSS per process", "builds", "1st batch s"],
        rows,
    )
    write_result(
        "sft_memory",
        {"records": args.records, "json_mib": size, "workers": args.workers, **results},
    )


if __name__ == "__main__":
    main()
