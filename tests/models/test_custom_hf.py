"""Models with connectors transformers has no class for (C-Abstractor, attnpool, avgpool,
linear) exported as transformers custom code: loaded with `trust_remote_code=True` in a process
where mm1 cannot be imported, they give our logits and greedy tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm1.config import (
    DataConfig,
    DecoderConfig,
    ImageLayoutConfig,
    ModelConfig,
    VisionConfig,
    validate_model,
)
from mm1.data.images import ImageProcessor
from mm1.data.prompt_format import PromptFormat
from mm1.data.tokenizer import Tokenizer, tokenize_prompt
from mm1.hf_export import save_hf
from mm1.models.generation import generate
from mm1.models.mllm import MM1
from mm1.pretrained import Pretrained
from tests.models.helpers import PERSIMMON_SWITCHES

pytest.importorskip("transformers")

# Runs in a fresh interpreter without mm1 on the path, and with its import blocked.
CHILD = """
import sys
sys.modules["mm1"] = None
import torch
from transformers import AutoModel
for d in sys.argv[1:]:
    x = torch.load(f"{d}/in.pt")
    m = AutoModel.from_pretrained(d, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = m(x["ids"], pixel_values=x["pixels"]).logits
        new = m.generate(x["ids"], pixel_values=x["pixels"], max_new_tokens=5, do_sample=False)
    torch.save({"logits": logits, "tokens": new[0, x["ids"].shape[1]:].tolist()}, f"{d}/out.pt")
"""

CASES = [
    ("c_abstractor", "mm1", "clip"),
    ("attnpool", "single", "clip"),
    ("avgpool", "dynamic", "siglip"),
    ("linear", "single", "clip"),
    ("pixel_shuffle", "single", "siglip"),
    ("pixel_shuffle", "dynamic", "clip"),  # CLS dropped before the blocks are stacked
    ("avgpool", "single", "persimmon"),  # Fuyu-8B's decoder as the text model (CLIP encoder)
]
PERSIMMON = {
    "kv_heads": 4,
    **PERSIMMON_SWITCHES,
}  # a Persimmon text model (`models/hf/persimmon.py`)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory, world_copy) -> Tokenizer:
    root = world_copy(tmp_path_factory.mktemp("world"))
    return Tokenizer.from_file(root / "tokenizer.json")


def _model(tok: Tokenizer, connector: str, layout: str, variant: str, tie: bool = False) -> MM1:
    decoder = PERSIMMON if variant == "persimmon" else {}
    variant = "clip" if variant == "persimmon" else variant
    cfg = ModelConfig(
        vision=VisionConfig(
            variant=variant,
            image_size=32,
            patch_size=8,
            width=32,
            layers=2,
            heads=2,
            mlp_dim=64,
            act="quick_gelu" if variant == "clip" else "gelu_tanh",
        ),
        connector={
            "type": connector,
            "num_tokens": 0 if connector == "linear" else 4,
            "hidden": 16,
            "depth": 1,
            "heads": 2,
            "layer_norm": True,
        },
        decoder=DecoderConfig(
            vocab_size=tok.vocab_size,
            dim=32,
            layers=2,
            heads=4,
            ffn_dim=64,
            tie_embeddings=tie,
            **{"kv_heads": 2, **decoder},
        ),
        image_token_id=tok.image_id,
        image_layout=ImageLayoutConfig(type=layout, max_tiles=4),
    )
    validate_model(cfg)
    torch.manual_seed(0)
    model = MM1(cfg).eval()
    with torch.no_grad():  # away from the init's zeros and ones, so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_custom_code_export_runs_without_mm1(tmp_path: Path, tok: Tokenizer) -> None:
    rng = np.random.default_rng(0)
    expected = {}
    for i, (connector, layout, variant) in enumerate(CASES):
        model = _model(tok, connector, layout, variant)
        proc = ImageProcessor.siglip(32) if variant == "siglip" else ImageProcessor.clip(32)
        data = DataConfig(image_boundaries=False)
        fmt = PromptFormat.from_config(data, model.num_image_tokens, model.cfg)
        out = tmp_path / f"{connector}_{layout}"
        message = save_hf(Pretrained(model, tok, proc, out, fmt), out)[1]
        assert "custom code" in message and (out / "modeling_mm1.py").is_file()
        assert (out / "decoder" / "config.json").is_file()  # the parts alone, as before
        image = Image.fromarray(rng.integers(0, 256, (30 + 20 * i, 70, 3), dtype=np.uint8))
        ids = torch.tensor([tokenize_prompt("<image>Output:", [image], tok, fmt)])
        pixels = fmt.pixel_values(proc, [image])
        torch.save({"ids": ids, "pixels": pixels}, out / "in.pt")
        with torch.no_grad():
            logits = model(ids, pixel_values=pixels).logits
        expected[out] = (logits, generate(model, [ids[0].tolist()], pixels, max_new_tokens=5)[0])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, expected)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for out, (logits, tokens) in expected.items():
        got = torch.load(out / "out.pt")
        torch.testing.assert_close(got["logits"], logits, rtol=1e-4, atol=1e-5, msg=str(out))
        assert got["tokens"] == tokens, out


def test_anyres_without_the_mlp_connector_is_refused(tmp_path: Path, tok: Tokenizer) -> None:
    model = _model(tok, "avgpool", "anyres", "clip")
    fmt = PromptFormat.from_config(DataConfig(), model.num_image_tokens, model.cfg)
    p = Pretrained(model, tok, ImageProcessor.clip(32), tmp_path, fmt)
    with pytest.raises(ValueError, match="anyres layout runs in transformers as LLaVA-NeXT"):
        save_hf(p, tmp_path / "hf")


def test_a_tied_head_is_written_as_its_own_tensor(tmp_path: Path, tok: Tokenizer) -> None:
    """safetensors refuses tensors sharing storage: a tied decoder's head is written as a copy,
    and the custom-code model gives our logits."""
    from transformers import AutoModel

    model = _model(tok, "avgpool", "single", "clip", tie=True)
    assert model.decoder.lm_head.weight is model.decoder.embed_tokens.weight
    fmt = PromptFormat.from_config(DataConfig(image_boundaries=False), 4, model.cfg)
    proc = ImageProcessor.clip(32)
    save_hf(Pretrained(model, tok, proc, tmp_path, fmt), tmp_path)
    hf = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    ids = torch.tensor([tokenize_prompt("<image>Output:", [image], tok, fmt)])
    pixels = fmt.pixel_values(proc, [image])
    with torch.no_grad():
        torch.testing.assert_close(
            hf(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits
        )


def test_the_families_beside_mm1s_say_why_they_have_no_export() -> None:
    """Every registered family but mm1 (custom code) and fuyu (FuyuForCausalLM) is refused
    with its reason, not a bare "no export"."""
    from types import SimpleNamespace

    from mm1.models.hf.custom import NO_EXPORT, custom_config_to_hf
    from mm1.registry import FAMILIES

    assert set(NO_EXPORT) == set(FAMILIES) - {"mm1", "fuyu"}
    for family, why in NO_EXPORT.items():
        model = SimpleNamespace(cfg=ModelConfig(family=family))
        with pytest.raises(ValueError, match=rf"family='{family}' has no transformers form \("):
            custom_config_to_hf(model)  # type: ignore[arg-type]
        assert why
