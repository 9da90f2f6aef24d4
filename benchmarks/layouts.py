"""Encoder + connector throughput and peak memory per image for each image layout.

For every layout (single, mm1, anyres, dynamic) and image side (336..1344 px, square, and a
2:1 image of the same height), a fresh child process builds the image encoder and the connector
(random weights: speed does not depend on them), cuts one image the way the layout does,
and times `connector(vision(crops))` under `torch.no_grad()`; it reports images/s, crops and
image tokens per image, and the peak resident memory above the process's baseline (VmHWM, per
image: the forward holds one image's crops at a time). `--encoder-chunk` bounds the crops per
encoder call. The default encoder is CLIP ViT-L/14 at 336 px with `--layers` blocks and
MM1's C-Abstractor (Q = 144).

    python -m benchmarks.layouts                            # all layouts, 336..1344 px
    python -m benchmarks.layouts --sizes 336 672 --layers 4 --reps 2   # quick

Absolute numbers need an idle machine (MM1_BENCH_THREADS, see `benchmarks.common`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from benchmarks.common import (
    Timer,
    emit,
    peak_rss_mib,
    print_table,
    run_child,
    set_threads,
    write_result,
)

LAYOUTS = ("single", "mm1", "anyres", "dynamic")


def _model_config(args: argparse.Namespace, layout: str) -> Any:
    from mm1.config import (
        DecoderConfig,
        ImageLayoutConfig,
        ModelConfig,
        VisionConfig,
        validate_model,
    )

    cfg = ModelConfig(
        vision=VisionConfig(
            image_size=args.crop,
            patch_size=args.patch,
            width=args.width,
            layers=args.layers,
            heads=max(1, args.width // 64),
            mlp_dim=4 * args.width,
        ),
        connector={
            "type": "c_abstractor",
            "num_tokens": args.tokens,
            "hidden": args.width,
            "depth": 3,
        },
        decoder=DecoderConfig(
            vocab_size=64, dim=args.llm_dim, layers=1, heads=8, kv_heads=8, ffn_dim=64
        ),
        image_layout=ImageLayoutConfig(type=layout, encoder_chunk=args.encoder_chunk),
    )
    validate_model(cfg)
    return cfg


def child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from mm1.config import DataConfig
    from mm1.data.images import ImageProcessor
    from mm1.data.prompt_format import PromptFormat
    from mm1.models.mllm import MM1

    set_threads()
    cfg = _model_config(args, args.layout)
    model = MM1(cfg).eval()  # the decoder is a token-sized stub: only image_features runs
    processor = ImageProcessor.clip(args.crop)
    fmt = PromptFormat.from_config(DataConfig(), model.num_image_tokens, cfg)
    width = args.size * args.aspect
    pixels_np = np.random.default_rng(0).integers(0, 256, (args.size, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels_np)
    pixels = fmt.pixel_values(processor, [image])
    base = peak_rss_mib()
    with torch.no_grad():
        model.image_features(pixels)  # warm-up
        with Timer() as t:
            for _ in range(args.reps):
                model.image_features(pixels)
    emit(
        {
            "layout": args.layout,
            "size": f"{width}x{args.size}",
            "crops": int(pixels.shape[0]),
            "tokens": fmt.slots(image),
            "images_per_s": args.reps / t.seconds,
            "peak_mib_per_image": peak_rss_mib() - base,
        }
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[336, 672, 1008, 1344])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--aspects", type=int, nargs="+", default=[1, 2], help="width / height")
    p.add_argument("--crop", type=int, default=336, help="the encoder's input px")
    p.add_argument("--layers", type=int, default=24, help="encoder blocks (ViT-L has 24)")
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--width", type=int, default=1024, help="encoder width (ViT-L: 1024)")
    p.add_argument("--tokens", type=int, default=144, help="Q, image tokens per crop")
    p.add_argument("--llm-dim", type=int, default=64, help="connector output width")
    p.add_argument("--encoder-chunk", type=int, default=0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", default="single", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=336, help=argparse.SUPPRESS)
    p.add_argument("--aspect", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    common = [
        f"--crop={args.crop}",
        f"--layers={args.layers}",
        f"--patch={args.patch}",
        f"--width={args.width}",
        f"--tokens={args.tokens}",
        f"--llm-dim={args.llm_dim}",
        f"--encoder-chunk={args.encoder_chunk}",
        f"--reps={args.reps}",
    ]
    rows = []
    for layout in args.layouts:
        for size in args.sizes:
            for aspect in args.aspects:
                flags = [f"--layout={layout}", f"--size={size}", f"--aspect={aspect}"]
                rows.append(run_child("benchmarks.layouts", ["--child", *flags, *common], 1800))
    columns = ("layout", "size", "crops", "tokens", "images_per_s", "peak_mib_per_image")
    print_table("encoder + connector per image", columns, [[r[c] for c in columns] for r in rows])
    path = write_result("layouts", {"args": vars(args), "rows": rows})
    print(f"-> {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
