"""Generation: mm1's `generate` (KV cache) against transformers' LLaVA `generate`, same weights.

The small benchmark model (see `benchmarks.models`) is built once; LLaVA gets its weights through
mm1's HF exporters. Both decode greedily from the same prompts: one image of the world's
validation split (64 image tokens) and a short text, left-padded to a batch, `new_tokens` new
tokens each with no EOS (so both produce exactly `new_tokens` tokens per prompt). Tokens/s =
generated tokens / wall time of the whole call (prefill with the image encoder included), best
of `rounds` interleaved calls per setting. Both must produce the same tokens; the share of
identical tokens is reported. mm1 runs twice: eager, and with `compile=True` (the decode step at
fixed shapes through torch.compile; its compilation is in the warm-up call, not timed).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.common import Timer, ensure_world, print_table, set_threads, write_result

PROMPTS = (
    "<image> A photo of",
    "<image> Question: how many objects are there? Answer:",
    "<image> This picture shows",
    "<image> Describe the image:",
    "<image> The colour of the largest object is",
    "<image> Caption:",
    "<image> In this image, there is",
    "<image> What is in the picture? It is",
)


def prompts_and_images(world, tok, num_image_tokens: int, n: int):
    """`n` prompts (token ids with image slots) and their pixels, from validation images."""
    import json

    from PIL import Image

    from mm1.data.images import ImageProcessor
    from mm1.data.prompt_format import PromptFormat
    from mm1.data.tokenizer import tokenize_prompt

    val = world.eval["val"]
    captions = json.loads((world.root / val["coco_captions"]).read_text())
    files = [im["file_name"] for im in captions["images"]][:n]
    images = [Image.open(world.root / val["image_dir"] / f).convert("RGB") for f in files]
    prompts = [
        tokenize_prompt(PROMPTS[i % len(PROMPTS)], [images[i]], tok, PromptFormat(num_image_tokens))
        for i in range(n)
    ]
    pixels = ImageProcessor.clip(world.image_size)(images)
    return prompts, pixels


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of HF's left-padded batch: mm1's own padding."""
    from mm1.models.generation import left_pad as mm1_left_pad

    batch = mm1_left_pad(prompts, pad_id)
    return batch.input_ids, batch.document_ids


def hf_greedy(llava, ids, mask, pixels, new_tokens: int, pad_id: int) -> list[list[int]]:
    """transformers' greedy `generate` of exactly `new_tokens` new tokens per prompt (no EOS)."""
    out = llava.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=None,
    )
    return out[:, ids.shape[1] :].tolist()


def run(
    batch_sizes: tuple[int, ...] = (1, 4), new_tokens: int = 48, rounds: int = 5
) -> dict[str, Any]:
    from benchmarks.models import build_mm1, llava_from_mm1, quiet_transformers, small_config
    from mm1.data.tokenizer import Tokenizer
    from mm1.models.generation import generate

    threads = set_threads()
    quiet_transformers()
    world = ensure_world(64)
    tok = Tokenizer.from_file(world.tokenizer_path)
    cfg = small_config(tok.vocab_size, tok.image_id, image_size=world.image_size)
    model = build_mm1(cfg).eval()
    llava = llava_from_mm1(model).eval()
    all_prompts, all_pixels = prompts_and_images(world, tok, cfg.num_image_tokens, max(batch_sizes))

    rows, settings = [], []
    for b in batch_sizes:
        prompts, pixels = all_prompts[:b], all_pixels[:b]
        ids, mask = left_pad(prompts, tok.pad_id)

        def ours(prompts=prompts, pixels=pixels, compile=False):
            return generate(
                model,
                prompts,
                pixels,
                max_new_tokens=new_tokens,
                pad_token_id=tok.pad_id,
                compile=compile,
            )

        def compiled(prompts=prompts, pixels=pixels):
            return ours(prompts, pixels, compile=True)

        def theirs(ids=ids, mask=mask, pixels=pixels):
            return hf_greedy(llava, ids, mask, pixels, new_tokens, tok.pad_id)

        with torch.inference_mode():
            a, h, c = ours(), theirs(), compiled()  # warm-up, and the tokens to compare
            best = {"mm1": float("inf"), "hf": float("inf"), "compiled": float("inf")}
            for _ in range(rounds):
                for name, fn in (("mm1", ours), ("hf", theirs), ("compiled", compiled)):
                    with Timer() as t:
                        fn()
                    best[name] = min(best[name], t.seconds)
        same = sum(x == y for ra, rh in zip(a, h) for x, y in zip(ra, rh))
        same_compiled = sum(x == y for ra, rc in zip(a, c) for x, y in zip(ra, rc))
        total = sum(len(r) for r in h)
        generated = b * new_tokens
        s = {
            "batch": b,
            "new_tokens": new_tokens,
            "prompt_tokens": [len(p) for p in prompts],
            "mm1_tokens_per_s": generated / best["mm1"],
            "hf_tokens_per_s": generated / best["hf"],
            "ratio": best["hf"] / best["mm1"],
            "identical_tokens": same / max(total, 1),
            "mm1_compiled_tokens_per_s": generated / best["compiled"],
            "compiled_ratio": best["hf"] / best["compiled"],
            "compiled_over_eager": best["mm1"] / best["compiled"],
            "compiled_identical_tokens": same_compiled / max(total, 1),
            "mm1_lengths": [len(r) for r in a],
            "hf_lengths": [len(r) for r in h],
        }
        settings.append(s)
        rows.append(
            [
                b,
                s["mm1_tokens_per_s"],
                s["hf_tokens_per_s"],
                s["ratio"],
                f"{s['identical_tokens']:.1%}",
                s["mm1_compiled_tokens_per_s"],
                s["compiled_ratio"],
                f"{s['compiled_identical_tokens']:.1%}",
            ]
        )
    out = {
        "settings": {
            "model": "CLIP ViT 64px/8 128x3 -> MLP(2) 64 tokens -> Llama 256x4 (fp32)",
            "decoding": "greedy, KV cache, no EOS, left padding",
            "rounds": rounds,
            "torch_threads": threads,
        },
        "results": settings,
        "summary": {
            "tokens_per_s_ratio": {str(s["batch"]): s["ratio"] for s in settings},
            "min_ratio": min(s["ratio"] for s in settings),
            "target_ratio": 1.0,
            "target_met": min(s["ratio"] for s in settings) >= 1.0,
            "all_tokens_identical": all(s["identical_tokens"] == 1.0 for s in settings),
            "compiled_ratio": {str(s["batch"]): s["compiled_ratio"] for s in settings},
            "compiled_over_eager": {str(s["batch"]): s["compiled_over_eager"] for s in settings},
            "compiled_tokens_identical": all(
                s["compiled_identical_tokens"] == 1.0 for s in settings
            ),
        },
    }
    path = write_result("generation", out)
    print_table(
        f"Generation: mm1 vs transformers LLaVA, greedy, {new_tokens} new tokens",
        [
            "batch",
            "mm1 tok/s",
            "HF tok/s",
            "mm1 / HF",
            "same tokens",
            "compiled tok/s",
            "compiled / HF",
            "same as eager",
        ],
        rows,
    )
    print(f"wrote {path}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    run(tuple(args.batch_sizes), args.new_tokens, args.rounds)


if __name__ == "__main__":
    main()
