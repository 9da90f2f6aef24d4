"""Models read for inference in bf16 / fp16 (`read_model_weights(dtype=)`, which
`load_pretrained` and `--dtype` use): every weight read straight into the dtype, the rotary
frequencies and a frozen image tokenizer kept in fp32, fp32 pixels cast as they enter; the
same model as the fp32 one up to the dtype's rounding. transformers' LLaVA in bf16 is the
reference in tests/models/test_llava_hf.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mm1.checkpoint import read_model_weights
from mm1.config import (
    ConfigError,
    DecoderConfig,
    ImageLayoutConfig,
    ModelConfig,
    VisionConfig,
    VQConfig,
    to_dict,
    validate_model,
)
from mm1.models.family import family_spec
from mm1.models.generation import generate
from mm1.pretrained import check_dtype, model_from_saved
from tests.models.helpers import perturb

LOW = [torch.bfloat16, torch.float16]


def _export(model: torch.nn.Module, out: Path) -> Path:
    """The two files an export's weights are read from (`is_export`)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "model.json").write_text(json.dumps(to_dict(model.cfg)))
    return out


def _model(cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return perturb(family_spec(cfg.family).model(cfg))


def _fuyu() -> ModelConfig:
    """Fuyu's image side is one Linear on the patches: no encoder that casts its input."""
    dec = DecoderConfig(vocab_size=96, dim=48, layers=2, heads=4, kv_heads=2, ffn_dim=64)
    cfg = ModelConfig(family="fuyu", vision=VisionConfig(image_size=32, patch_size=8), decoder=dec)
    validate_model(cfg)
    return cfg


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("family", ["mm1", "fuyu"])
def test_an_export_is_read_straight_into_the_dtype_and_keeps_its_rotary_in_fp32(
    tmp_path: Path, tiny_model_config, dtype: torch.dtype, family: str
) -> None:
    cfg = tiny_model_config("c_abstractor") if family == "mm1" else _fuyu()
    full = _model(cfg)
    out = _export(full, tmp_path / "export")
    saved = read_model_weights(out, dtype)
    want = full.state_dict()
    for k, v in saved.state.items():
        assert v.dtype == dtype and torch.equal(v, want[k].to(dtype)), k
    low = model_from_saved(saved).eval()
    assert low.decoder.inv_freq.dtype == torch.float32
    assert torch.equal(low.decoder.inv_freq, full.decoder.inv_freq)

    # fp32 pixels (as every caller prepares them) are cast as they enter the image side
    slots = [cfg.resolved_image_token_id] * low.num_image_tokens
    ids = [3, *slots, 5, 6, 7, *slots, 8, 9]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = low(torch.tensor([ids]), pixel_values=pixels).logits
        ref = full(torch.tensor([ids]), pixel_values=pixels).logits
    assert got.dtype == dtype
    # the dtype's rounding through the image side and 2 blocks, well below the logits' spread
    assert (got.float() - ref).abs().max() < 0.05 * ref.std()
    assert len(generate(low, [ids], pixels, max_new_tokens=4)[0]) == 4


def test_the_default_reads_the_export_as_saved(tmp_path: Path, tiny_model_config) -> None:
    full = _model(tiny_model_config())
    saved = read_model_weights(_export(full, tmp_path / "export"))
    for k, v in full.state_dict().items():
        assert saved.state[k].dtype == torch.float32 and torch.equal(saved.state[k], v), k


def test_a_frozen_image_tokenizer_stays_fp32_and_reads_the_same_codes(tmp_path: Path) -> None:
    """chameleon's VQ tokenizer (weights and codebook) is kept in fp32, as training keeps it:
    bf16 would flip codes near a tie, and the decoder would read other images than it learned."""
    cfg = ModelConfig(
        family="chameleon",
        vision=VisionConfig(image_size=16, patch_size=8),
        vq=VQConfig(channels=[8, 8, 8], codebook_size=64, code_dim=4),
        decoder=DecoderConfig(vocab_size=64, dim=32, layers=2, heads=4, kv_heads=2, ffn_dim=64),
        image_layout=ImageLayoutConfig(type="single"),
    )
    validate_model(cfg)
    torch.manual_seed(0)
    full = family_spec("chameleon").model(cfg).eval()
    saved = read_model_weights(_export(full, tmp_path / "export"), torch.bfloat16)
    low = model_from_saved(saved).eval()
    for k, v in low.state_dict().items():
        want = torch.float32 if k.startswith("vision.") else torch.bfloat16
        assert v.dtype == want or not v.is_floating_point(), k
    # 256 codes, of which a tokenizer in bf16 reads 11 otherwise
    pixels = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(low.image_codes(pixels), full.image_codes(pixels))
        ids = torch.tensor([[1, *[cfg.resolved_image_token_id] * low.num_image_tokens, 5]])
        assert low(ids, pixel_values=pixels[:1]).logits.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("float64", "--dtype float64: not a dtype a model runs in; give float32, bfloat16"),
        ("half", "--dtype half: not a dtype"),
        (torch.int8, "--dtype torch.int8: give float32, bfloat16 or float16"),
    ],
)
def test_a_dtype_a_model_does_not_run_in_is_refused_naming_the_option(
    value: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_dtype(value)  # type: ignore[arg-type]


def test_short_names_are_the_dtypes() -> None:
    assert check_dtype("bf16") is torch.bfloat16 and check_dtype("fp16") is torch.float16
    assert check_dtype("BF16") is torch.bfloat16 and check_dtype("Float32") is torch.float32
    assert check_dtype("float32") is torch.float32 and check_dtype(torch.bfloat16) is torch.bfloat16


def test_the_meta_device_is_refused_naming_the_option() -> None:
    from mm1.pretrained import check_device

    with pytest.raises(ConfigError, match="--device meta: not a device a model runs on"):
        check_device("meta")
