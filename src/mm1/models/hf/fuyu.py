"""A `model.family: fuyu` model as transformers' `FuyuForCausalLM` (config dict and tensors).

transformers' Fuyu takes any of its causal LMs as the text model (`text_config`), so mm1's
decoder is written as the family that expresses it (`default_decoder_type`). Fuyu-8B ends each
row of patches with a vocabulary token (`|NEWLINE|`); mm1 learns that vector on its own, so it
becomes one more vocabulary row, id `vocab_size` (`image_newline_id`; its output-head row is
zero when the head is untied, the vector itself when tied). The logits over mm1's vocabulary
are mm1's. Inputs for the HF model are mm1's with that id written at each row's end
(`hf_input_ids`) and the pixels as patches (`hf_pixel_values`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mm1.models.hf.decoder import decoder_to_hf
from mm1.tiling import fuyu_grid

if TYPE_CHECKING:
    from mm1.models.fuyu import Fuyu

NEWLINE_TOKEN = "|NEWLINE|"  # Fuyu-8B's name for it


def image_newline_id(model: Fuyu) -> int:
    """The id of the newline token in the HF vocabulary (one past mm1's)."""
    return model.cfg.decoder.vocab_size


def fuyu_to_hf(
    model: Fuyu, decoder_type: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(FuyuConfig dict, tensors under FuyuForCausalLM's names) of a fuyu-family model."""
    text, tensors = decoder_to_hf(model.decoder, decoder_type)
    if text.get("model_type") == "mm1_moe":
        raise ValueError(
            "FuyuForCausalLM's text model must be a transformers class; this MoE decoder is "
            "mm1's custom code (model.decoder.ffn)"
        )
    cfg = model.cfg
    vocab = cfg.decoder.vocab_size
    newline = model.image_newline.detach()
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k == "model.embed_tokens.weight":
            v = torch.cat([v, newline[None].to(v.dtype)])
        elif k == "lm_head.weight":
            v = torch.cat([v, v.new_zeros(1, v.shape[1])])
        name = "lm_head.weight" if k == "lm_head.weight" else "model.language_model." + k[6:]
        out[name] = v
    out["model.vision_embed_tokens.weight"] = model.connector.weight.detach()
    out["model.vision_embed_tokens.bias"] = model.connector.bias.detach()
    tie = bool(text.pop("tie_word_embeddings", False))
    text["vocab_size"] = vocab + 1
    hf = {
        "architectures": ["FuyuForCausalLM"],
        "model_type": "fuyu",
        "image_size": cfg.vision.image_size,
        "patch_size": cfg.vision.patch_size,
        "num_channels": 3,
        "image_token_id": model.image_token_id,
        "tie_word_embeddings": tie,
        "text_config": text,
    }
    return hf, out


def _grids(model: Fuyu, n: int, image_sizes: torch.Tensor | None) -> list[tuple[int, int]]:
    """(rows, cols) of patches of each of `n` images, as the model reads them."""
    if model.cfg.image_layout.type != "fuyu":
        return [(model.rows, model.cols)] * n
    if image_sizes is None or len(image_sizes) != n:
        raise ValueError("the fuyu layout needs image_sizes (height, width) for every image")
    p = model.cfg.vision.patch_size
    return [fuyu_grid((w, h), model.canvas, p) for h, w in image_sizes.tolist()]


def hf_input_ids(
    model: Fuyu, input_ids: torch.Tensor, image_sizes: torch.Tensor | None = None
) -> torch.Tensor:
    """mm1's `input_ids` with the newline id at the end of each row of every image's slots
    (an image's slots are consecutive: rows x (cols + 1), `image_sizes` giving each image's
    rows and cols on Fuyu's canvas)."""
    out = input_ids.clone()
    flat = out.view(-1)
    slots = (flat == model.image_token_id).nonzero().squeeze(-1)
    n = (
        int(image_sizes.shape[0])
        if image_sizes is not None
        else slots.numel() // max(model.num_image_tokens, 1)
    )
    grids = _grids(model, n, image_sizes)
    if slots.numel() != sum(r * (c + 1) for r, c in grids):
        raise ValueError(f"{slots.numel()} image slots are not those of the {n} images")
    start = 0
    for rows, cols in grids:
        ends = slots[start : start + rows * (cols + 1)].view(rows, cols + 1)[:, -1]
        flat[ends] = image_newline_id(model)
        start += rows * (cols + 1)
    return out


def hf_pixel_values(
    model: Fuyu, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
) -> torch.Tensor:
    """mm1's (N, 3, H, W) pixels as `FuyuForCausalLM` takes them: (1, patches, p x p x 3), each
    image's patches that have tokens, row by row, in slot order."""
    from mm1.models.fuyu import Patchify

    p = model.cfg.vision.patch_size
    grids = _grids(model, pixel_values.shape[0], image_sizes)
    parts = [
        Patchify(p)(image[None, :, : rows * p, : cols * p])[0]
        for image, (rows, cols) in zip(pixel_values, grids)
    ]
    return torch.cat(parts)[None]
