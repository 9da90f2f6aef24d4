"""Load test of `mm1 serve` on loopback: N concurrent streaming clients against the same requests
run one by one.

    python -m benchmarks.serve_load runs/demo_sft --world data/world-demo --clients 16

The server runs in this process on a free loopback port (continuous batching, `--max-batch`
rows). Each request asks about 0-2 of the world's validation images with prompts of mixed
lengths, greedily, and streams its answer. First every request runs alone, one after another;
then all start at once. Reported: latency and time to first token (p50 / p95) and total
completion tokens/s in both modes, their ratio, and a check that every concurrent answer equals
the same request's answer alone (no request lost, failed or mixed up with another's). The run is
bounded: `--clients` requests of at most `--max-tokens` tokens, each with a timeout.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import print_table, set_threads, write_result

QUESTIONS = (
    "Describe the image.",
    "How many objects are there?",
    "What colour is the largest object? Answer the question using a single word or phrase.",
    "Look carefully at every part of the picture, including the background and any text, and "
    "then tell me in a few sentences what you see, which shapes there are and where they are.",
    "Hello! What can you do?",
    "Which picture has the most objects?",
)


def requests_for(images: list[Path], n: int, model: str, max_tokens: int) -> list[dict[str, Any]]:
    bodies = []
    for i in range(n):
        k = (0, 1, 1, 2)[i % 4]  # text-only, one image, two images
        pics = [images[(i + j) % len(images)] for j in range(k)]
        parts = [{"type": "image_url", "image_url": {"url": _data_url(p)}} for p in pics] + [
            {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}
        ]
        bodies.append(
            {
                "model": model,
                "messages": [{"role": "user", "content": parts}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
    return bodies


def _data_url(path: Path) -> str:
    kind = "png" if path.suffix.lower() == ".png" else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def one(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Stream one request: its text, tokens, latency and time to first token."""
    start = time.perf_counter()
    first = None
    text, usage, error = [], None, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.read().decode()[:200]}"}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                text.append(chunk["choices"][0]["delta"]["content"])
            elif chunk.get("usage"):
                usage = chunk["usage"]
    end = time.perf_counter()
    return {
        "text": "".join(text),
        "tokens": usage["completion_tokens"] if usage else 0,
        "latency_s": end - start,
        "ttft_s": (first or end) - start,
        "error": error,
    }


def run_all(
    url: str, bodies: list[dict[str, Any]], concurrent: bool, timeout: float
) -> tuple[list[dict], float]:
    results: list[dict[str, Any]] = [{} for _ in bodies]
    start = time.perf_counter()
    if not concurrent:
        for i, body in enumerate(bodies):
            results[i] = one(url, body, timeout)
    else:
        go = threading.Barrier(len(bodies))

        def client(i: int) -> None:
            go.wait()
            results[i] = one(url, bodies[i], timeout)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout * 2)
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def summary(results: list[dict[str, Any]], wall: float) -> dict[str, float]:
    lat = [r["latency_s"] for r in results]
    ttft = [r["ttft_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "wall_s": round(wall, 3),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "latency_p50_s": round(percentile(lat, 50), 3),
        "latency_p95_s": round(percentile(lat, 95), 3),
        "ttft_p50_s": round(percentile(ttft, 50), 3),
        "ttft_p95_s": round(percentile(ttft, 95), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a run or exported directory (e.g. runs/demo_sft)")
    ap.add_argument(
        "--world", default="data/world-demo", help="whose validation images to ask about"
    )
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    threads = set_threads()

    from mm1.chat import resolve_chat_template
    from mm1.pretrained import load_pretrained
    from mm1.serve.app import create_app, serving_in_thread
    from mm1.serve.engine import Engine
    from mm1.serve.protocol import ServeOptions

    p = load_pretrained(args.model)
    template = resolve_chat_template(p.tokenizer, None)
    opts = ServeOptions(model_name="mm1", chat_template=template.source)
    engine = Engine(p.model, p.tokenizer, max_batch=args.max_batch, max_waiting=args.clients)
    images = sorted((Path(args.world) / "eval" / "val" / "images").iterdir())[:32]
    bodies = requests_for(images, args.clients, "mm1", args.max_tokens)
    with serving_in_thread(create_app(p, engine, opts)) as url:
        one(url, bodies[0], args.timeout)  # warm-up
        alone, alone_wall = run_all(url, bodies, False, args.timeout)
        together, together_wall = run_all(url, bodies, True, args.timeout)
        most_running = engine.max_running
    failed = [i for i, r in enumerate(alone + together) if not r or r.get("error")]
    mixed = [i for i, (a, b) in enumerate(zip(alone, together)) if a.get("text") != b.get("text")]
    one_by_one, concurrent = summary(alone, alone_wall), summary(together, together_wall)
    ratio = round(concurrent["tokens_per_s"] / one_by_one["tokens_per_s"], 2)
    print_table(
        f"mm1 serve, {args.clients} clients, max batch {args.max_batch} ({threads} torch threads)",
        ["mode", "tokens/s", "latency p50 s", "latency p95 s", "TTFT p50 s", "TTFT p95 s"],
        [
            [
                name,
                s["tokens_per_s"],
                s["latency_p50_s"],
                s["latency_p95_s"],
                s["ttft_p50_s"],
                s["ttft_p95_s"],
            ]
            for name, s in (("one by one", one_by_one), ("concurrent", concurrent))
        ],
    )
    print(
        f"throughput ratio {ratio}x; failed {len(failed)}; answers differing from alone {len(mixed)}"
    )
    write_result(
        "serve_load",
        {
            "model": str(args.model),
            "clients": args.clients,
            "max_batch": args.max_batch,
            "max_tokens": args.max_tokens,
            "most_running_together": most_running,
            "one_by_one": one_by_one,
            "concurrent": concurrent,
            "summary": {"throughput_ratio": ratio, "failed": len(failed), "mixed_up": len(mixed)},
        },
    )


if __name__ == "__main__":
    main()
