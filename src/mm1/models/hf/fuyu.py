"""A `model.family: fuyu` model as transformers' `FuyuForCausalLM` (config dict and tensors).

transformers' Fuyu takes any of its causal LMs as the text model (`text_config`), so mm1's
decoder is written as the family that expresses it (`default_decoder_type`). Fuyu-8B ends each
row of patches with a vocabulary token (`|NEWLINE|`); mm1 learns that vector on its own, so it
becomes one more vocabulary row, id `vocab_size` (`image_newline_id`; its output-head row is
zero when the head is untied, the vector itself when tied). The logits over mm1's vocabulary
are mm1's. Inputs for the HF model are mm1's with that id written at each row's end
(`hf_input_ids`) and the pixels as patches (`hf_pixel_values`).

Read back (`train.init.weights`: a `FuyuForCausalLM` directory, Fuyu-8B's or one mm1 wrote),
the directory gives the architecture: the text model (Persimmon for Fuyu-8B, any decoder
family mm1 reads), the patch size, Fuyu's canvas from its image processor's `size`, and the
newline vector from the embedding row of the tokenizer's `|NEWLINE|`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mm1.config import ModelConfig
from mm1.data.images import PREPROCESSOR_CONFIG
from mm1.fs import read_json
from mm1.models.hf.checkpoint import KEY_MAPS, PathLike, read_hf_config
from mm1.models.hf.decoder import decoder_config_from_hf, decoder_ignored, decoder_to_hf
from mm1.models.hf.moe import MOE_TYPES, fuse_experts
from mm1.models.hf.persimmon import persimmon_state_from_hf
from mm1.tiling import fuyu_grid

if TYPE_CHECKING:
    from mm1.data.images import ImageProcessor
    from mm1.models.fuyu import Fuyu

log = logging.getLogger(__name__)

NEWLINE_TOKEN = "|NEWLINE|"  # Fuyu-8B's name for it
IMAGE_NEWLINE_TOKEN = "|IMAGE_NEWLINE|"  # the name when the vocabulary has |NEWLINE| already


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
    model: Fuyu,
    input_ids: torch.Tensor,
    image_sizes: torch.Tensor | None = None,
    newline_id: int | None = None,
) -> torch.Tensor:
    """mm1's `input_ids` with the newline id at the end of each row of every image's slots
    (an image's slots are consecutive: rows x (cols + 1), `image_sizes` giving each image's
    rows and cols on Fuyu's canvas). `newline_id`: the HF vocabulary's newline token; None
    is the row mm1's export adds (`image_newline_id`); a model read from Fuyu-8B's directory
    still equals it at its own `|NEWLINE|` id (`newline_token_id`) until it is trained."""
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
        flat[ends] = image_newline_id(model) if newline_id is None else newline_id
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


# transformers 4's FuyuConfig kept the text model's keys at the top level (`text_config` absent).
_TOP_LEVEL_TEXT_KEYS = (
    "vocab_size",
    "max_position_embeddings",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "layer_norm_eps",
    "qk_layernorm",
    "partial_rotary_factor",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "tie_word_embeddings",
)
FUYU_PROCESSOR_TYPES = ("FuyuImageProcessor", "FuyuImageProcessorFast", "FuyuImageProcessorPil")


def fuyu_processor_config(model: Fuyu, processor: ImageProcessor) -> dict[str, Any]:
    """transformers' Fuyu image processor config giving `model`'s pixels: its canvas, patch
    size and padding (1 of 255, bilinear), and `processor`'s rescaling and normalisation."""
    height, width = model.canvas
    p = model.cfg.vision.patch_size
    mean, std, rescale = processor.image_mean, processor.image_std, processor.rescale_factor
    return {
        "image_processor_type": "FuyuImageProcessor",
        "do_resize": True,
        "size": {"height": height, "width": width},
        "resample": 2,  # bilinear, as FuyuFormat resizes
        "do_pad": True,
        "padding_value": 1.0,
        "padding_mode": "constant",
        "do_rescale": rescale is not None,
        "rescale_factor": rescale if rescale is not None else 1 / 255,
        "do_normalize": mean is not None,
        "image_mean": list(mean) if mean is not None else 0.5,
        "image_std": list(std) if std is not None else 0.5,
        "patch_size": {"height": p, "width": p},
    }


def is_fuyu_config(path: PathLike) -> bool:
    return read_hf_config(path).get("model_type") == "fuyu"


def fuyu_text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The text model's config of a FuyuConfig dict (Persimmon unless it names another).
    transformers 4 kept the text keys at the top level, and saved `text_config` without the
    values equal to its Persimmon defaults (rope_theta 25,000, where transformers 5's default
    is 10,000): a key `text_config` lacks is read from the top level. The head is tied as the
    top-level `tie_word_embeddings` says, as FuyuForCausalLM ties it."""
    flat = {k: hf[k] for k in _TOP_LEVEL_TEXT_KEYS if k in hf}
    text = {"model_type": "persimmon", **flat, **(hf.get("text_config") or {})}
    if "tie_word_embeddings" in hf:
        text["tie_word_embeddings"] = bool(hf["tie_word_embeddings"])
    return text


def fuyu_canvas_from_hf(path: PathLike) -> list[int] | None:
    """Fuyu's canvas [height, width] from the directory's Fuyu image processor (`size`), or
    None (no such file: the square of the config's image_size)."""
    f = Path(path) / PREPROCESSOR_CONFIG
    if not f.is_file():
        return None
    cfg = read_json(f)
    size = cfg.get("size") or {}
    if cfg.get("image_processor_type") not in FUYU_PROCESSOR_TYPES or "height" not in size:
        return None
    return [int(size["height"]), int(size["width"])]


def fuyu_model_config_from_hf(path: PathLike, base: ModelConfig | None = None) -> ModelConfig:
    """The model a FuyuForCausalLM directory holds, as a `model.family: fuyu` config (`base`'s
    other settings kept): its text model, patch size, canvas and image placeholder."""
    hf = read_hf_config(path)
    cfg = copy.deepcopy(base) if base is not None else ModelConfig()
    cfg.family = "fuyu"
    cfg.decoder = decoder_config_from_hf(fuyu_text_config(hf))
    patch = int(hf.get("patch_size") or 30)
    canvas, layout = fuyu_canvas_from_hf(path), "fuyu"
    if (Path(path) / PREPROCESSOR_CONFIG).is_file() and canvas is None:
        # another processor: mm1's export of a `single`-layout model (images resized square)
        layout = "single"
    elif canvas is None:
        canvas = cfg.image_layout.canvas  # the directory does not say: the config's
        log.warning(
            "%s has no image processor config: Fuyu's canvas is model.image_layout.canvas=%s "
            "(none: the %s px square) and images are normalised to [-1, 1]",
            path,
            canvas,
            hf.get("image_size") or 300,
        )
    size = int(hf.get("image_size") or 300)
    cfg.vision.patch_size = patch
    # image_size is the square the `single` layout resizes to; Fuyu's canvas is the layout's.
    cfg.vision.image_size = size if size % patch == 0 else (canvas or [patch])[0]
    cfg.vision.variant = "siglip"  # without a processor config: Fuyu's [-1, 1] normalisation
    cfg.image_layout.type = layout
    cfg.image_layout.canvas = list(canvas) if canvas is not None else None
    cfg.image_token_id = int(hf.get("image_token_id", 71011))
    return cfg


def newline_token_id(path: PathLike) -> int:
    """The id of `|NEWLINE|` in the directory's tokenizer.json: the token whose embedding
    Fuyu writes after each row of patches."""
    import tokenizers

    f = Path(path) / "tokenizer.json"
    token = None
    if f.is_file():  # mm1's export of a model read from Fuyu-8B names its row apart
        tok = tokenizers.Tokenizer.from_file(str(f))
        token = tok.token_to_id(IMAGE_NEWLINE_TOKEN)
        token = tok.token_to_id(NEWLINE_TOKEN) if token is None else token
    if token is None:
        raise ValueError(
            f"{path}: Fuyu ends each row of patches with the {NEWLINE_TOKEN} token, and no "
            "tokenizer.json there has it"
        )
    return int(token)


def fuyu_state_to_ours(path: PathLike, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FuyuForCausalLM checkpoint's tensors (transformers 5 or 4 names) under the fuyu
    family's names: `connector.` (vision_embed_tokens), `decoder.` (the text model and the
    head) and `image_newline` (the `|NEWLINE|` embedding row)."""
    hf = read_hf_config(path)
    text = fuyu_text_config(hf)
    decoder: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.removeprefix("model.").startswith("vision_embed_tokens."):
            out["connector." + key.removeprefix("model.").split(".", 1)[1]] = value
        elif key in ("lm_head.weight", "language_model.lm_head.weight"):
            decoder["lm_head.weight"] = value
        elif key.startswith(("model.language_model.", "language_model.model.")):
            decoder["model." + key.split(".", 2)[2]] = value
        else:
            raise ValueError(f"{path}: unexpected FuyuForCausalLM tensor {key!r}")
    if text["model_type"] == "persimmon":
        decoder = persimmon_state_from_hf(decoder, int(text["num_attention_heads"]))
    elif text["model_type"] in MOE_TYPES:
        decoder = fuse_experts(decoder, str(path))
    ignore = decoder_ignored(decoder_config_from_hf(text))
    keymap = KEY_MAPS["decoder"]
    for key, value in decoder.items():
        ours = keymap.to_ours(key)
        if not ignore(ours):
            out["decoder." + ours] = value
    embed = out["decoder.embed_tokens.weight"]
    newline = newline_token_id(path)
    if not 0 <= newline < embed.shape[0]:
        raise ValueError(
            f"{path}: {NEWLINE_TOKEN} is token {newline}, outside the model's "
            f"{embed.shape[0]}-row embedding"
        )
    out["image_newline"] = embed[newline].clone()
    return out
