"""The lmms-eval backend with a tiled layout (anyres): requests carry their images' sizes to
the model, so scores and generations are the model's own on the same prompt."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from mm1.config import DataConfig, DecoderConfig, ImageLayoutConfig, ModelConfig, VisionConfig
from mm1.data.images import ImageProcessor
from mm1.data.prompt_format import PromptFormat
from mm1.data.tokenizer import Tokenizer, tokenize_prompt
from mm1.models.generation import generate
from mm1.models.mllm import MM1
from mm1.pretrained import save_pretrained

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lmms_eval") is None, reason="lmms_eval is not importable"
)


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, world_copy
) -> tuple[Path, MM1, PromptFormat]:
    root = world_copy(tmp_path_factory.mktemp("world"))
    tok = Tokenizer.from_file(root / "tokenizer.json")
    cfg = ModelConfig(
        vision=VisionConfig(
            image_size=16, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64, act="gelu"
        ),
        connector={"type": "mlp", "num_tokens": 0},
        decoder=DecoderConfig(
            vocab_size=tok.vocab_size, dim=32, layers=1, heads=4, kv_heads=2, ffn_dim=64
        ),
        image_token_id=tok.image_id,
        init_std=0.2,
        image_layout=ImageLayoutConfig(type="anyres", grid=[1, 3]),
    )
    torch.manual_seed(0)
    model = MM1(cfg).eval()
    fmt = PromptFormat.from_config(DataConfig(), model.num_image_tokens, cfg)
    out = save_pretrained(
        model, tok, ImageProcessor.clip(16), tmp_path_factory.mktemp("export"), fmt
    )
    return out, model, fmt


def test_scores_and_generations_with_anyres_images(exported) -> None:
    from mm1.eval.lmms_eval import MM1LMM

    path, model, fmt = exported
    lmm = MM1LMM(pretrained=str(path), device="cpu")
    assert lmm.prompt_format == fmt
    tok, proc = lmm.tokenizer, ImageProcessor.clip(16)
    image = Image.new("RGB", (45, 20), "red")
    image.paste((0, 0, 255), (10, 5, 30, 15))
    total, n, _ = lmm.score_continuation("<image>Output:", " a cube", [image])
    whole = tokenize_prompt("<image>Output: a cube", [image], tok, fmt)
    ctx = tokenize_prompt("<image>Output:", [image], tok, fmt)
    pixels, (_, sizes) = fmt.pixel_values(proc, [image]), fmt.image_info([image])
    assert fmt.crops(image) > 1 and n == len(whole) - len(ctx)
    with torch.no_grad():
        logits = model(torch.tensor([whole]), pixel_values=pixels, image_sizes=sizes).logits
    logp = logits[0, len(ctx) - 1 : -1].float().log_softmax(-1)
    assert total == pytest.approx(
        float(logp.gather(-1, torch.tensor(whole[len(ctx) :])[:, None]).sum())
    )
    text = lmm._generate([lmm._request("<image>Output:", [image])], {"max_new_tokens": 4})[0]
    new = generate(model, [ctx], pixels, max_new_tokens=4, image_sizes=sizes)[0]
    stop = next((i for i, t in enumerate(new) if t in lmm.stop_ids), len(new))
    assert text == tok.decode(new[:stop])
