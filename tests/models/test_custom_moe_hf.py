"""MoE decoders that fit neither Mixtral nor Qwen3-MoE exported as transformers custom code
(`mm1_moe`): alone and as the text model of a whole MM1 model, loaded with
`trust_remote_code=True` in a process where mm1 cannot be imported, they give our logits and
greedy tokens; the decoder directory reads back as a starting point (`train.init.decoder`);
what transformers cannot run is refused with the key named."""

from __future__ import annotations

import json
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
    InitConfig,
    ModelConfig,
    RopeScalingConfig,
    VisionConfig,
    validate_model,
)
from mm1.data.images import ImageProcessor
from mm1.data.prompt_format import PromptFormat
from mm1.data.tokenizer import Tokenizer, tokenize_prompt
from mm1.hf_export import save_hf
from mm1.models.build import build_model
from mm1.models.decoder import Decoder
from mm1.models.generation import generate
from mm1.models.hf import decoder_config_from_hf, save_decoder_hf
from mm1.models.mllm import MM1
from mm1.pretrained import Pretrained

pytest.importorskip("transformers")

VOCAB = 96
NEW_TOKENS = 5

# A fresh interpreter without mm1 on the path, its import blocked. Each directory holds in.pt
# (ids, and pixels for a whole model); the child writes its logits and greedy tokens.
CHILD = """
import sys
sys.modules["mm1"] = None
import torch
from transformers import AutoModel, AutoModelForCausalLM
for d in sys.argv[1:]:
    x = torch.load(f"{d}/in.pt")
    whole = "pixels" in x
    cls = AutoModel if whole else AutoModelForCausalLM
    m = cls.from_pretrained(d, trust_remote_code=True).eval()
    kw = {"pixel_values": x["pixels"]} if whole else {}
    with torch.no_grad():
        logits = m(x["ids"], **kw).logits
        new = m.generate(x["ids"], max_new_tokens=5, do_sample=False, **kw)
    torch.save({"logits": logits, "tokens": new[0, x["ids"].shape[1]:].tolist()}, f"{d}/out.pt")
"""

# (decoder options, the MoE options): none of them Mixtral or Qwen3-MoE.
LAYOUTS = {
    # the plain case: experts every 2nd layer, no q/k norm
    "every2": ({}, {"every": 2}),
    # unnormalised top-k in every layer, narrower experts, tied head, q/k/v biases
    "every1_unnormalised": (
        {"tie_embeddings": True, "qkv_bias": True},
        {"every": 1, "norm_topk_prob": False, "expert_dim": 48, "top_k": 3},
    ),
    # q/k norm but a sliding window (Qwen3-MoE has none), llama3 rope, every 3rd layer
    "every3_qknorm_window": (
        {
            "qk_norm": True,
            "sliding_window": 5,
            "rope_scaling": RopeScalingConfig(
                type="llama3", factor=4.0, original_max_position_embeddings=16
            ),
        },
        {"every": 3},
    ),
}


def _decoder_cfg(name: str) -> DecoderConfig:
    options, moe = LAYOUTS[name]
    return DecoderConfig(
        vocab_size=VOCAB,
        dim=32,
        layers=3,
        heads=4,
        kv_heads=2,
        ffn_dim=64,
        ffn={"type": "moe", "experts": 4, "top_k": 2, **moe},
        **options,
    )


def _randomise(model: torch.nn.Module) -> None:
    """Away from the init's zeros and ones, and a peaked router, so every weight matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if name.endswith("gate.weight") else 0.05))


def _greedy(decoder: Decoder, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation by full recomputation (no cache): the reference for the child's."""
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = decoder(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[0, ids.shape[1] :].tolist()


def _run_child(dirs: list[Path], cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, dirs)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory, world_copy) -> Tokenizer:
    root = world_copy(tmp_path_factory.mktemp("world"))
    return Tokenizer.from_file(root / "tokenizer.json")


def _mm1(tok: Tokenizer, connector: dict, layout: str, decoder: str) -> MM1:
    cfg = ModelConfig(
        vision=VisionConfig(
            image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, act="quick_gelu"
        ),
        connector=connector,
        decoder=_decoder_cfg(decoder),
        image_token_id=tok.image_id,
        image_layout=ImageLayoutConfig(type=layout, max_tiles=4),
    )
    cfg.decoder.vocab_size = tok.vocab_size
    validate_model(cfg)
    torch.manual_seed(0)
    model = MM1(cfg).eval()
    _randomise(model)
    return model


def test_moe_decoders_of_no_transformers_family_run_as_custom_code(
    tmp_path: Path, tok: Tokenizer
) -> None:
    """Three decoder layouts alone, and two whole models (LLaVA's mlp connector, which
    transformers' LLaVA cannot pair with this decoder, and avgpool with the dynamic layout)."""
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(0))
    expected: dict[Path, tuple[torch.Tensor, list[int]]] = {}
    for name in LAYOUTS:
        torch.manual_seed(0)
        decoder = Decoder(_decoder_cfg(name)).eval()
        _randomise(decoder)
        out = save_decoder_hf(decoder, tmp_path / name)
        written = json.loads((out / "config.json").read_text())
        assert written["model_type"] == "mm1_moe" and "AutoModelForCausalLM" in written["auto_map"]
        assert (out / "modeling_mm1_moe.py").is_file()
        torch.save({"ids": ids}, out / "in.pt")
        with torch.no_grad():
            expected[out] = (decoder(ids), _greedy(decoder, ids, NEW_TOKENS))
    rng = np.random.default_rng(0)
    whole = [({"type": "mlp", "num_tokens": 0}, "single"), ({"type": "avgpool"}, "dynamic")]
    for i, (connector, layout) in enumerate(whole):
        connector = {"num_tokens": 4, **connector}
        model = _mm1(tok, connector, layout, "every2")
        proc = ImageProcessor.clip(32)
        fmt = PromptFormat.from_config(
            DataConfig(image_boundaries=False), model.num_image_tokens, model.cfg
        )
        out = tmp_path / f"mm1_{connector['type']}"
        message = save_hf(Pretrained(model, tok, proc, out, fmt), out)[1]
        assert "custom code" in message, message
        text = json.loads((out / "config.json").read_text())["text_config"]
        assert text["model_type"] == "mm1_moe"
        assert json.loads((out / "decoder" / "config.json").read_text())["model_type"] == "mm1_moe"
        image = Image.fromarray(rng.integers(0, 256, (40 + 30 * i, 70, 3), dtype=np.uint8))
        prompt = torch.tensor([tokenize_prompt("<image>Output:", [image], tok, fmt)])
        pixels = fmt.pixel_values(proc, [image])
        torch.save({"ids": prompt, "pixels": pixels}, out / "in.pt")
        with torch.no_grad():
            logits = model(prompt, pixel_values=pixels).logits
        tokens = generate(model, [prompt[0].tolist()], pixels, max_new_tokens=NEW_TOKENS)[0]
        expected[out] = (logits, tokens)
    _run_child(list(expected), tmp_path)
    for out, (logits, tokens) in expected.items():
        got = torch.load(out / "out.pt")
        torch.testing.assert_close(got["logits"], logits, rtol=1e-4, atol=1e-4, msg=str(out))
        assert got["tokens"] == tokens, out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_custom_code_moe_decoder_is_a_starting_point(
    tmp_path: Path, tok: Tokenizer, name: str
) -> None:
    """The exported decoder directory, named by train.init.decoder, gives its architecture and
    every weight back (the config's own decoder is replaced)."""
    model = _mm1(tok, {"type": "avgpool", "num_tokens": 4}, "single", name)
    save_decoder_hf(model.decoder, tmp_path / "decoder")
    read = decoder_config_from_hf(tmp_path / "decoder")
    want = model.decoder.cfg
    for key in ("dim", "layers", "heads", "kv_heads", "ffn_dim", "qk_norm", "qkv_bias"):
        assert getattr(read, key) == getattr(want, key), key
    assert (read.tie_embeddings, read.sliding_window) == (want.tie_embeddings, want.sliding_window)
    assert read.rope_scaling == want.rope_scaling and read.ffn == want.ffn
    cfg = _mm1(tok, {"type": "avgpool", "num_tokens": 4}, "single", "every2").cfg
    cfg.decoder = DecoderConfig(vocab_size=tok.vocab_size, dim=32, layers=1, heads=4, ffn_dim=64)
    init = InitConfig(decoder=str(tmp_path / "decoder"))
    back = build_model(cfg, tok.vocab_size, tok.image_id, init=init).eval()
    assert back.decoder.cfg.ffn == want.ffn
    for k, v in model.decoder.state_dict().items():
        assert torch.equal(back.decoder.state_dict()[k], v), k
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back.decoder(ids), model.decoder(ids))


def test_what_transformers_cannot_run_is_refused(tmp_path: Path, tok: Tokenizer) -> None:
    # LLaVA-NeXT (anyres) has only transformers' own text models.
    model = _mm1(tok, {"type": "mlp", "num_tokens": 0}, "anyres", "every2")
    fmt = PromptFormat.from_config(DataConfig(), model.num_image_tokens, model.cfg)
    p = Pretrained(model, tok, ImageProcessor.clip(32), tmp_path, fmt)
    with pytest.raises(ValueError, match=r"anyres layout runs in transformers only as LLaVA-NeXT"):
        save_hf(p, tmp_path / "hf")
    # A named family the decoder does not fit stays an error; mm1_moe needs experts.
    with pytest.raises(ValueError, match="qwen3_moe needs q/k norm"):
        save_decoder_hf(model.decoder, tmp_path / "q", "qwen3_moe")
    dense = Decoder(DecoderConfig(vocab_size=VOCAB, dim=32, layers=2, heads=4, ffn_dim=64))
    with pytest.raises(ValueError, match=r"^mm1_moe is a MoE decoder; model\.decoder\.ffn is"):
        save_decoder_hf(dense, tmp_path / "d", "mm1_moe")
    bad = {**json.loads(_config_json(tmp_path)), "rope": {"type": "yarn", "factor": 2.0}}
    with pytest.raises(ValueError, match=r"^rope\.type='yarn'"):
        decoder_config_from_hf(bad)


def _config_json(tmp_path: Path) -> str:
    torch.manual_seed(0)
    out = save_decoder_hf(Decoder(_decoder_cfg("every2")), tmp_path / "cfg")
    return (out / "config.json").read_text()


def test_left_padded_batches_generate_as_each_prompt_alone(tmp_path: Path) -> None:
    """transformers pads a batch on the left: the remote decoder masks the padding and counts
    positions from each row's first token, so every row continues as its prompt alone does in
    mm1."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    decoder = Decoder(_decoder_cfg("every3_qknorm_window")).eval()
    _randomise(decoder)
    save_decoder_hf(decoder, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (11, 6)]
    ids = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 11 - len(p) :], mask[row, 11 - len(p) :] = p, 1
    with torch.no_grad():
        new = hf.generate(
            ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
    for row, p in enumerate(prompts):
        assert new[row, 11:].tolist() == _greedy(decoder, p[None], 4), row
