"""Peak memory and time of loading a model for inference (`load_pretrained(path, dtype=...)`).

Writes three directories of one model (a CLIP ViT and a Llama decoder of `--dim` x `--layers`,
~280M parameters by default) under `--dir` (default /tmp/mm1_load_bench): a transformers LLaVA
directory stored in bf16, as LLaVA checkpoints are published, an mm1 export and a run
directory with one DCP checkpoint (both fp32, as training saves them). Each variant loads in a
fresh child process, which reports its peak RSS (`VmHWM`: the file's mapped pages count while
they are mapped) and the bytes its weights take:

  llava_bf16 -> float32          the whole model as fp32 (what every load did before `--dtype`)
  llava_bf16 -> bfloat16         read straight into bf16
  llava_bf16 -> float32, .to(bf16)   the way to bf16 before `--dtype` (lmms-eval's adapter did it)
  export_fp32 -> float32 / bfloat16
  run_fp32 -> float32 / bfloat16

and the start of a training run from each (`build_model(..., init=train.init.weights)`, fp32),
against the way before: the model built with random weights, then the starting ones copied in.

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
from typing import TYPE_CHECKING

from benchmarks.common import (
    AnonPeak,
    ensure_world,
    peak_rss_mib,
    print_table,
    run_child,
    write_result,
)

if TYPE_CHECKING:
    import torch

VARIANTS = [
    ("llava_bf16", "float32", False),
    ("llava_bf16", "bfloat16", False),
    ("llava_bf16", "float32", True),
    ("export_fp32", "float32", False),
    ("export_fp32", "bfloat16", False),
    ("run_fp32", "float32", False),
    ("run_fp32", "bfloat16", False),
]
# A training run's start (fp32): "train" as the trainer builds it, "train_random_init" the way
# before (a randomly initialised model, the starting weights copied into it).
TRAIN_STARTS = [
    (s, mode) for s in ("llava_bf16", "export_fp32") for mode in ("train_random_init", "train")
]


def write_models(d: Path, dim: int, layers: int, vision_layers: int = 12) -> dict[str, Path]:
    """The LLaVA directory (bf16), the mm1 export (fp32) and a run directory holding one DCP
    checkpoint (fp32, as training writes it) of one randomly initialised model."""
    import torch

    from mm1.config import (
        DataConfig,
        DecoderConfig,
        ModelConfig,
        VisionConfig,
        to_dict,
        validate_model,
    )
    from mm1.data.images import ImageProcessor
    from mm1.data.prompt_format import PromptFormat
    from mm1.data.tokenizer import Tokenizer
    from mm1.hf_export import save_hf
    from mm1.models.mllm import MM1
    from mm1.pretrained import Pretrained, save_pretrained
    from mm1.train.checkpoint import save_checkpoint

    paths = {
        "llava_bf16": d / "llava_bf16",
        "export_fp32": d / "export_fp32",
        "run_fp32": d / "run",
    }
    stamp = d / "models.json"
    if stamp.exists() and json.loads(stamp.read_text()) == [dim, layers, vision_layers, "run"]:
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
    run = paths["run_fp32"]
    save_checkpoint(run, 1, model, None, keep=1)
    (run / "model.json").write_text(json.dumps(to_dict(cfg)))
    tok.save(run / "tokenizer")
    proc.save_pretrained(run / "tokenizer")
    fmt.save(run / "tokenizer")
    save_hf(
        Pretrained(model.to(torch.bfloat16), tok, proc, paths["llava_bf16"], fmt),
        paths["llava_bf16"],
    )
    stamp.write_text(json.dumps([dim, layers, vision_layers, "run"]))
    return paths


def _train_start(path: Path, random_init: bool) -> torch.nn.Module:
    """A training run's model starting from `path` (`train.init.weights`), as the trainer
    builds it; `random_init`: built with random weights first, the starting ones copied in."""
    from mm1.config import InitConfig, ModelConfig
    from mm1.data.tokenizer import Tokenizer
    from mm1.models.build import build_model, starting_point_state_dict
    from mm1.pretrained import load_model_config

    tok = Tokenizer.from_file(path)
    if (path / "model.json").is_file():  # an export: the run is configured as its model
        base = load_model_config(path)
    else:  # a LLaVA directory: its architecture, at its own image size
        from mm1.models.hf.llava import llava_model_config_from_hf

        base = ModelConfig()
        base.vision.image_size = llava_model_config_from_hf(path).vision.image_size
    init = InitConfig(weights=str(path))
    args = (base, tok.vocab_size, tok.image_id)
    if not random_init:
        return build_model(*args, new_token_ids=tok.added_ids, init=init)
    model = build_model(*args, new_token_ids=tok.added_ids, init=init, load_weights=False)
    model.load_state_dict(starting_point_state_dict(model, init, tok.added_ids), strict=False)
    return model


def child(path: str, dtype: str, mode: str) -> None:
    """The measured process: one load (`mode` 0), one load then a cast to bf16 (1), or a
    training run's start (`train`, `train_random_init`); its peak RSS, its peak anonymous RSS
    (sampled every 2 ms: the memory the load allocates, without the file's mapped pages, which
    the kernel can drop) above what it held before, and the weights' bytes."""
    import torch

    from mm1.pretrained import load_pretrained

    torch.set_num_threads(1)
    with AnonPeak() as anon:
        start = time.perf_counter()
        if mode.startswith("train"):
            model = _train_start(Path(path), random_init=mode == "train_random_init")
        elif mode == "1":
            model = load_pretrained(path, dtype="float32").model
            model.to(torch.bfloat16)
        else:
            model = load_pretrained(path, dtype=dtype).model
        seconds = time.perf_counter() - start
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    params = sum(t.numel() for t in model.parameters())
    print(
        json.dumps(
            {
                "seconds": seconds,
                "anon_before_mib": anon.start,
                "peak_anon_added_mib": anon.added,
                "peak_heap_added_mib": anon.heap_added,
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
        return child(*args.child)
    paths = write_models(Path(args.dir), args.dim, args.layers)
    rows = []

    def measure(source: str, dtype: str, arg: str, name: str, **record: object) -> dict:
        r = run_child("benchmarks.load_memory", ["--child", str(paths[source]), dtype, arg])
        r.update(source=source, dtype=dtype, variant=name, **record)
        r["anon_added_over_weights"] = r["peak_anon_added_mib"] / r["weights_mib"]
        keys = ("weights_mib", "peak_anon_added_mib", "anon_added_over_weights", "peak_rss_mib")
        rows.append([name, *(r[k] for k in keys), r["seconds"]])
        return r

    baseline = run_child(
        "benchmarks.load_memory", ["--child", str(paths["export_fp32"]), "float32", "0"]
    )
    results = [
        measure(
            source,
            dtype,
            "1" if cast else "0",
            f"{source} -> {dtype}" + (", then .to(bf16)" if cast else ""),
            cast_after=cast,
        )
        for source, dtype, cast in VARIANTS
    ]
    starts = [
        measure(
            source,
            "float32",
            mode,
            f"{source} -> training start" + (", random init first" if "random" in mode else ""),
            mode=mode,
        )
        for source, mode in TRAIN_STARTS
    ]
    print_table(
        f"Loading a {results[0]['params'] / 1e6:.0f}M-parameter model (one child process each)",
        ["variant", "weights MiB", "peak alloc MiB", "alloc / weights", "peak RSS MiB", "s"],
        rows,
    )
    path = write_result(
        "load_memory",
        {
            "dim": args.dim,
            "layers": args.layers,
            "warm_up": baseline,
            "variants": results,
            "training_starts": starts,
        },
    )
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
