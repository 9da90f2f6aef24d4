"""The CPU benchmark set (`make bench`): a few minutes on 2 cores, JSON under benchmarks/results/.

    python -m benchmarks.run_cpu            # all four
    python -m benchmarks.run_cpu train gen  # a subset: train, gen, data, scaling

Each benchmark runs as its own `python -m benchmarks.<module>` process (its tables go to the
console, its JSON to benchmarks/results/<name>.json); this collects the headline ratios into
benchmarks/results/summary.json. Torch uses one thread unless MM1_BENCH_THREADS says otherwise
(see `benchmarks.common.set_threads`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from benchmarks.common import RESULTS, ROOT, environment, print_table

BENCHMARKS = {
    "train": ("benchmarks.train_step", "train_step"),
    "gen": ("benchmarks.generation", "generation"),
    "data": ("benchmarks.data_pipeline", "data_pipeline"),
    "scaling": ("benchmarks.scaling", "scaling"),
}


def headline(name: str, data: dict) -> list[list]:
    s = data.get("summary", {})
    if name == "train":
        return [
            [
                "train: mm1 packed / best LLaVA, effective tokens/s",
                s["tokens_per_s_ratio"],
                ">= 1.3",
                s["tokens_per_s_target_met"],
            ],
            [
                "train: mm1 packed / LLaVA plain batching, tokens/s",
                s["tokens_per_s_ratio_vs_llava_plain"],
                "",
                "",
            ],
            [
                "train: mm1 / best LLaVA, peak RSS",
                s.get("peak_rss_ratio", float("nan")),
                "<= 1.0",
                s.get("memory_target_met", ""),
            ],
        ]
    if name == "gen":
        return [
            [
                f"generate: mm1 / HF tokens/s, batch {b}",
                r,
                ">= 1.0",
                r >= 1.0,
            ]
            for b, r in s["tokens_per_s_ratio"].items()
        ] + [["generate: identical greedy tokens", s["all_tokens_identical"], "True", ""]]
    if name == "data":
        rows = [
            [
                "loader: images/s, one worker, 256-px JPEG -> 224 px",
                s["images_per_s_224_from_256"],
                ">= 200",
                s["target_met"],
            ]
        ]
        for r in data["packing"]:
            rows.append(
                [
                    f"packing / pad-longest grouped b8: {r['setting']}",
                    r["packing_efficiency"] / r["pad_longest_grouped_b8"],
                    "",
                    "",
                ]
            )
        return rows
    if name == "scaling":
        attn = data["attention_only"][-1]
        rows = []
        for key, what in (
            ("sequence_length", "packed"),
            ("sequence_length_one_document", "one doc"),
        ):
            seq = data[key]
            rows.append(
                [
                    f"scaling ({what}): per-token step time {seq[-1]['seq_len']} vs "
                    f"{seq[0]['seq_len']} tokens",
                    seq[-1]["ms_per_1k_tokens"] / seq[0]["ms_per_1k_tokens"],
                    "",
                    "",
                ]
            )
        rows.append(
            [
                f"attention: dense mask / length-grouped at {attn['seq_len']} tokens",
                attn["dense_mask_over_grouped"],
                "",
                "",
            ]
        )
        return rows
    return []


def main() -> None:
    chosen = sys.argv[1:] or list(BENCHMARKS)
    unknown = [c for c in chosen if c not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    env = dict(os.environ)
    env["TOKENIZERS_PARALLELISM"] = "false"
    timings, failed, rows = {}, [], []
    start = time.perf_counter()
    for name in chosen:
        module, result = BENCHMARKS[name]
        print(f"\n=== {name}: python -m {module}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", module], cwd=ROOT, env=env, check=False)
        timings[name] = time.perf_counter() - t0
        if proc.returncode != 0:
            failed.append(name)
            continue
        rows += headline(name, json.loads((RESULTS / f"{result}.json").read_text()))
    total = time.perf_counter() - start
    print_table(
        f"mm1 CPU benchmarks: headline ratios ({total:.0f} s)",
        ["measure", "value", "target", "met"],
        rows,
    )
    summary = {
        "environment": environment(),
        "seconds": {**timings, "total": total},
        "headlines": [dict(zip(("measure", "value", "target", "met"), r)) for r in rows],
        "failed": failed,
    }
    # Only a full run writes summary.json, so a subset never drops the others' headlines.
    path = RESULTS / ("summary.json" if set(chosen) == set(BENCHMARKS) else "summary_subset.json")
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
