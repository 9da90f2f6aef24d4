"""A tiny Fuyu-8B written as transformers writes one (Persimmon text model, a rectangular
canvas, `|NEWLINE|` and `|SPEAKER|` in its vocabulary), and transformers' Fuyu processor as the
reference for mm1's fuyu layout: shared by the fuyu model and training tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mm1.models.hf.fuyu import NEWLINE_TOKEN
from tests.models.helpers import perturb

if TYPE_CHECKING:
    import transformers

PATCH, CANVAS = 8, (24, 40)  # (height, width): wider than high, as Fuyu-8B's 1080 x 1920
WORDS = ["<unk>", "<s>", "|ENDOFTEXT|", "|SPEAKER|", NEWLINE_TOKEN] + [f"w{i}" for i in range(59)]
SPEAKER, NEWLINE = WORDS.index("|SPEAKER|"), WORDS.index(NEWLINE_TOKEN)


def write_tokenizer(out: Path) -> None:
    """A word-level tokenizer with Fuyu-8B's special names (BOS <s>, EOS |ENDOFTEXT|)."""
    import tokenizers

    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "|ENDOFTEXT|", "unk_token": "<unk>"}
    (out / "tokenizer_config.json").write_text(json.dumps(special))


def write_fuyu(
    out: Path, seed: int = 0, tie: bool = False, **text: object
) -> transformers.FuyuForCausalLM:
    """A tiny Fuyu-8B: Persimmon text model, |NEWLINE| and |SPEAKER| in its vocabulary, its
    image processor's canvas CANVAS; `tie`: the head tied to the embedding (FuyuConfig's
    top-level key, which transformers ties by)."""
    import transformers

    torch.manual_seed(seed)
    text_config = dict(
        vocab_size=len(WORDS),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        rope_theta=25000.0,
        partial_rotary_factor=0.5,
        **text,
    )
    config = transformers.FuyuConfig(
        text_config=text_config,
        patch_size=PATCH,
        image_size=CANVAS[0],
        image_token_id=SPEAKER,
        tie_word_embeddings=tie,
    )
    model = perturb(transformers.FuyuForCausalLM(config), seed)
    model.save_pretrained(out)
    write_tokenizer(out)
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    size = {"height": CANVAS[0], "width": CANVAS[1]}
    FuyuImageProcessorPil(size=size, patch_size={"height": PATCH, "width": PATCH}).save_pretrained(
        out
    )
    return model


def processor_reference(
    images: list, patch: int = 8, canvas: tuple[int, int] = (32, 32), proc=None
) -> tuple[list[torch.Tensor], list, list]:
    """transformers' Fuyu processor (`proc`, else one on a (height, width) canvas, 32 px square
    by default): each image's padded pixels, its image ids (placeholder 7, newline 9: to be
    compared as a pattern) and its patches."""
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    size = {"height": patch, "width": patch}
    target = {"height": canvas[0], "width": canvas[1]}
    proc = proc or FuyuImageProcessorPil(size=target, patch_size=size)
    pixels, ids, patches = [], [], []
    for im in images:
        out = proc(images=[[im]])
        canvas = torch.as_tensor(out["images"][0][0])
        h, w = out["image_unpadded_heights"][0][0], out["image_unpadded_widths"][0][0]
        info = proc.preprocess_with_tokenizer_info(
            canvas[None, None],
            torch.ones(1, 1, 1),
            torch.tensor([[h]]),
            torch.tensor([[w]]),
            7,
            9,
            True,
            size,
        )
        pixels.append(canvas)
        ids.append(info["image_input_ids"][0][0])
        patches.append(info["image_patches"][0][0])
    return pixels, ids, patches
