"""Peak memory and time of loading a model for inference (`load_pretrained(path, dtype=...)`).

Writes two directories of one model (a CLIP ViT and a Llama decoder of `--dim` x `--layers`,
~200M parameters by default) under `--dir` (default /tmp/mm1_load_bench): a transformers LLaVA
directory stored in bf16, as LLaVA checkpoints are published, and an mm1 export (fp32, as
training saves it). Each variant loads in a fresh child process, which reports its peak RSS
(`VmHWM`: the file's mapped pages count while they are mapped) and the bytes its weights take:

  llava_bf16 -> float32          the whole model as fp32 (what every load did before `--dtype`)
  llava_bf16 -> bfloat16         read straight into bf16
  llava_bf16 -> float32, .to(bf16)   the way to bf16 before `--dtype` (lmms-eval's adapter did it)
  export_fp32 -> float32 / bfloat16

    python -m benchmarks.load_memory              # ~200M parameters
    python -m benchmarks.load_memory --layers 2   # quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import ensure_world, peak_rss_mib, print_table, run_child, write_result

VARIANTS = [
    ("llava_bf16", "float32", False),
    ("llava_bf16", "bfloat16", False),
    ("llava_bf16", "float32", True),
    ("export_fp32", "float32", False),
    ("export_fp32", "bfloat16", False),
]


def write_models(d: Path, dim: int, layers: int, vision_layers: int = 12) -> dict[str, Path]:
    """The LLaVA directory (bf16) and the mm1 export (fp32) of one randomly initialised model."""
    import torch

    from mm1.config import DataConfig, DecoderConfig, ModelConfig, VisionConfig, validate_model
    from mm1.data.images import ImageProcessor
    from mm1.data.prompt_format import PromptFormat
    from mm1.data.tokenizer import Tokenizer
    from mm1.hf_export import save_hf
    from mm1.models.mllm import MM1
    from mm1.pretrained import Pretrained, save_pretrained

    paths = {"llava_bf16": d / "llava_bf16", "export_fp32": d / "export_fp32"}
    stamp = d / "models.json"
    if stamp.exists() and json.loads(stamp.read_text()) == [dim, layers, vision_layers]:
        return paths
    shutil.rmtree(d, ignore_errors=True)
    world = ensure_world()
    tok = Tokenizer.from_file(world.root / world.tokenizer)
    cfg = ModelConfig(
        vision=VisionConfig(
            variant="clip", image_size=224, patch_size=14, width=768, layers=vision_layers, heads=12
        ),
        connector={"type": "mlp", "num_tokens": 0},
        decoder=DecoderConfig(
            vocab_size=tok.vocab_size,
            dim=dim,
            layers=layers,
            heads=dim // 64,
            kv_heads=dim // 64,
            ffn_dim=int(dim * 8 / 3) // 64 * 64,
        ),
        image_token_id=tok.image_id,
    )
    validate_model(cfg)
    torch.manual_seed(0)
    model = MM1(cfg).eval()
    fmt = PromptFormat.from_config(DataConfig(image_boundaries=False), model.num_image_tokens, cfg)
    proc = ImageProcessor.clip(224)
    save_pretrained(model, tok, proc, paths["export_fp32"], fmt)
    save_hf(
        Pretrained(model.to(torch.bfloat16), tok, proc, paths["llava_bf16"], fmt),
        paths["llava_bf16"],
    )
    stamp.write_text(json.dumps([dim, layers, vision_layers]))
    return paths


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(path: str, dtype: str, cast_after: bool) -> None:
    """The measured process: one load; its peak RSS, its peak anonymous RSS (sampled every
    2 ms: the memory the load allocates, without the file's mapped pages, which the kernel can
    drop) above what it held before, and the weights' bytes."""
    import threading

    import torch

    from mm1.pretrained import load_pretrained

    torch.set_num_threads(1)
    before = _status_mib("RssAnon")
    peak_anon = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status_mib("RssAnon"))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if cast_after:
        p = load_pretrained(path, dtype="float32")
        p.model.to(torch.bfloat16)
    else:
        p = load_pretrained(path, dtype=dtype)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    tensors = {id(t): t for t in [*p.model.parameters(), *p.model.buffers()]}
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    params = sum(t.numel() for t in p.model.parameters())
    print(
        json.dumps(
            {
                "seconds": seconds,
                "anon_before_mib": before,
                "peak_anon_added_mib": peak_anon[0] - before,
                "peak_rss_mib": peak_rss_mib(),
                "weights_mib": weights / 2**20,
                "params": params,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/mm1_load_bench")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, dtype, cast = args.child
        return child(path, dtype, cast == "1")
    paths = write_models(Path(args.dir), args.dim, args.layers)
    rows, results = [], []
    baseline = run_child(
        "benchmarks.load_memory", ["--child", str(paths["export_fp32"]), "float32", "0"]
    )
    for source, dtype, cast in VARIANTS:
        r = run_child(
            "benchmarks.load_memory", ["--child", str(paths[source]), dtype, "1" if cast else "0"]
        )
        name = f"{source} -> {dtype}" + (", then .to(bf16)" if cast else "")
        r.update(source=source, dtype=dtype, cast_after=cast, variant=name)
        r["anon_added_over_weights"] = r["peak_anon_added_mib"] / r["weights_mib"]
        results.append(r)
        rows.append(
            [
                name,
                r["weights_mib"],
                r["peak_anon_added_mib"],
                r["anon_added_over_weights"],
                r["peak_rss_mib"],
                r["seconds"],
            ]
        )
    print_table(
        f"Loading a {results[0]['params'] / 1e6:.0f}M-parameter model (one child process each)",
        ["variant", "weights MiB", "peak alloc MiB", "alloc / weights", "peak RSS MiB", "s"],
        rows,
    )
    path = write_result(
        "load_memory",
        {"dim": args.dim, "layers": args.layers, "warm_up": baseline, "variants": results},
    )
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
