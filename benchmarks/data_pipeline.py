"""Data: loader images/s per worker, and packing efficiency against padding to the longest.

Loader: `build_loader(..., num_workers=0)` runs the whole pipeline of one worker in this
process (read the shard, decode the JPEG, tokenize, pack, resize + crop + normalise, collate)
on the world's 45/45/10 training mixture, 4096-token sequences with up to 16 images of 144
tokens (the MM1 ablation setting), at 224 px and 378 px, from the default world's 64-px JPEGs
and from a world written with 256-px JPEGs. After a warm-up batch it counts the images of the
batches it yields until `min_images`. For the 256-px world it also times the image
preprocessing alone on the same decoded images, to show where the time goes.

Packing: `packing_stats` over the first sequences of the mixture (about 1,900-4,700 documents),
then the same documents (drawn from the same mixture seed, split at `seq_len` as the packer
splits them) batched as LLaVA would: padded to the longest of each batch, in stream order and
length-grouped (transformers' `LengthGroupedSampler`: random mega-batches of up to 50 batches,
each sorted by length), at 8 and 32 samples per batch.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.common import Timer, ensure_world, print_table, set_threads, write_result


def loader_images_per_s(world, tok, size: int, min_images: int) -> dict[str, Any]:
    from mm1.data.images import ImageProcessor
    from mm1.data.loader import LoaderSettings, build_loader
    from mm1.data.prompt_format import PromptFormat
    from mm1.data.world import world_sources

    sources, _ = world_sources(world)
    settings = LoaderSettings(
        sources=sources, seq_len=4096, micro_batch_size=1, prompt_format=PromptFormat(144)
    )
    loader = iter(build_loader(settings, tok, ImageProcessor.clip(size), num_workers=0))
    next(loader)  # warm-up: opening shards, first buffer fill
    images = sequences = 0
    with Timer() as t:
        while images < min_images:
            batch = next(loader)
            sequences += batch.input_ids.shape[0]
            images += 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
    return {
        "source_px": world.image_size,
        "output_px": size,
        "images": images,
        "sequences": sequences,
        "seconds": t.seconds,
        "images_per_s": images / t.seconds,
    }


def preprocess_only(world, size: int, n: int) -> float:
    """Images/s of `ImageProcessor.clip(size)` alone on already decoded world images."""
    from PIL import Image

    from mm1.data.images import ImageProcessor

    val = world.eval["val"]
    files = sorted((world.root / val["image_dir"]).glob("*.jpg"))[:n]
    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(im.convert("RGB"))
    proc = ImageProcessor.clip(size)
    best = float("inf")
    for _ in range(3):
        with Timer() as t:
            proc(images)
        best = min(best, t.seconds)
    return len(images) / best


def pad_efficiency(lengths: list[int], batch: int, grouped: bool, seed: int = 0) -> float:
    import torch

    order = list(range(len(lengths)))
    if grouped:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        g = torch.Generator().manual_seed(seed)
        order = list(LengthGroupedSampler(batch, lengths=lengths, generator=g))
    real = padded = 0
    for i in range(0, len(order), batch):
        group = [lengths[j] for j in order[i : i + batch]]
        real += sum(group)
        padded += max(group) * len(group)
    return real / padded


def packing(
    world, tok, seq_len: int, q: int, num_sequences: int, batches=(8, 32)
) -> dict[str, Any]:
    from benchmarks.train_step import document_stream
    from mm1.data.loader import LoaderSettings, packing_stats
    from mm1.data.packing import split_document
    from mm1.data.prompt_format import PromptFormat
    from mm1.data.world import world_sources

    sources, _ = world_sources(world)
    settings = LoaderSettings(
        sources=sources, seq_len=seq_len, micro_batch_size=1, prompt_format=PromptFormat(q)
    )
    with Timer() as t:
        stats = packing_stats(settings, tok, num_sequences)
    n_docs = sum(stats["documents"].values())
    docs = document_stream(world, tok, q, n_docs)
    lengths = [len(p.input_ids) for d in docs for p in split_document(d, seq_len, 16)[0]]
    out: dict[str, Any] = {
        "seq_len": seq_len,
        "image_tokens": q,
        "sequences": stats["sequences"],
        "documents": n_docs,
        "mean_document_tokens": sum(lengths) / len(lengths),
        "images_per_sequence": stats["images"] / stats["sequences"],
        "images_dropped_fraction": stats["images_dropped_fraction"],
        "packing_efficiency": stats["packing_efficiency"],
        "packing_seconds": t.seconds,
    }
    for b in batches:
        out[f"pad_longest_b{b}"] = pad_efficiency(lengths, b, grouped=False)
        out[f"pad_longest_grouped_b{b}"] = pad_efficiency(lengths, b, grouped=True)
    return out


def run(min_images: int = 120, sizes: tuple[int, ...] = (224, 378)) -> dict[str, Any]:
    from mm1.data.tokenizer import Tokenizer

    threads = set_threads()
    worlds = {64: ensure_world(64), 256: ensure_world(256)}
    loader_rows, loader_results = [], []
    for px, world in worlds.items():
        tok = Tokenizer.from_file(world.tokenizer_path)
        for size in sizes:
            r = loader_images_per_s(world, tok, size, min_images)
            if px == 256:
                r["preprocess_only_images_per_s"] = preprocess_only(world, size, 64)
            loader_results.append(r)
            loader_rows.append(
                [
                    f"{px} px JPEG -> {size} px",
                    r["images"],
                    r["images_per_s"],
                    r.get("preprocess_only_images_per_s"),
                ]
            )
    print_table(
        "Loader, one worker (read, decode, tokenize, pack, preprocess, collate)",
        ["source -> model input", "images", "images/s", "preprocess only img/s"],
        loader_rows,
    )
    default = worlds[64]
    compact = ensure_world(64, text_scale=0.0)
    pack_results = []
    for name, world, seq_len, q, n in (
        ("ablation: default world, 4096 tokens, 144/image", default, 4096, 144, 300),
        ("ablation: default world, 2048 tokens, 144/image", default, 2048, 144, 600),
        ("demo: compact world, 256 tokens, 16/image", compact, 256, 16, 1500),
    ):
        tok = Tokenizer.from_file(world.tokenizer_path)
        r = packing(world, tok, seq_len, q, n)
        r["setting"] = name
        pack_results.append(r)
    print_table(
        "Packing efficiency (non-pad share of all tokens) on the same documents",
        ["setting", "docs", "packed", "pad b8", "grouped b8", "pad b32", "grouped b32"],
        [
            [
                r["setting"],
                r["documents"],
                r["packing_efficiency"],
                r["pad_longest_b8"],
                r["pad_longest_grouped_b8"],
                r["pad_longest_b32"],
                r["pad_longest_grouped_b32"],
            ]
            for r in pack_results
        ],
    )
    at_224 = [r for r in loader_results if r["source_px"] == 256 and r["output_px"] == 224]
    out = {
        "settings": {
            "loader": "build_loader(num_workers=0): one worker's pipeline in-process; "
            "4096-token sequences, 144 tokens/image, <=16 images/sequence, CLIP preprocessing",
            "min_images": min_images,
            "torch_threads": threads,
        },
        "loader": loader_results,
        "packing": pack_results,
        "summary": {
            "images_per_s_224_from_256": at_224[0]["images_per_s"] if at_224 else None,
            "target_images_per_s_224_from_256": 200,
            "target_met": bool(at_224 and at_224[0]["images_per_s"] >= 200),
        },
    }
    path = write_result("data_pipeline", out)
    print(f"wrote {path}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-images", type=int, default=120)
    args = ap.parse_args()
    run(args.min_images)


if __name__ == "__main__":
    main()
