"""HF checkpoint loading and writing, checked against transformers itself on tiny random models.

Every test compares with what transformers computes (never with our own outputs). Weights are
perturbed after transformers' init so that norms and biases are not 1 / 0, which would hide a
wrong key mapping.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mm1.config import DecoderConfig, RopeScalingConfig, VisionConfig
from mm1.models.decoder import Decoder
from mm1.models.hf import (
    decoder_config_from_hf,
    decoder_from_hf,
    save_decoder_hf,
    save_vision_hf,
    vision_config_from_hf,
    vision_encoder_from_hf,
)
from mm1.models.vision import VisionTransformer
from tests.models.helpers import perturb

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
# transformers 5 shows a progress bar for every save / load.
transformers.utils.logging.disable_progress_bar()

ATOL = RTOL = 1e-4
T = 80  # longer than the llama3 test's original_max_position_embeddings (64) and any window


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# Vision
# ---------------------------------------------------------------------------------------------

VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=28,
    patch_size=7,
)


def hf_vision(variant: str, **over):
    torch.manual_seed(0)
    if variant == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION, **over))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION, **over))
    return perturb(model)


def hf_features(model, pixels: torch.Tensor, layer: int, cls: bool, **kw) -> torch.Tensor:
    with torch.no_grad():
        h = model(pixel_values=pixels, output_hidden_states=True, **kw).hidden_states[layer]
    return h[:, 1:] if cls else h


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    # load_file maps the file into memory; copy before writing the same file again.
    return {k: v.clone() for k, v in load_file(path).items()}


def pixels(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("feature_layer", [-1, -2, 1, 0])
@pytest.mark.parametrize("variant", ["clip", "siglip"])
def test_vision_encoder_matches_transformers(tmp_path, caplog, variant, feature_layer):
    model = hf_vision(variant)
    model.save_pretrained(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="mm1.models.hf"):
        ours = vision_encoder_from_hf(tmp_path, feature_layer=feature_layer)
    depth = feature_layer if feature_layer >= 0 else 4 + feature_layer
    assert len(ours.blocks) == depth
    # What is left out on purpose is logged: the final norm, SigLIP's head, later blocks.
    assert "post_layernorm.weight" in caplog.text
    assert ("head.probe" in caplog.text) == (variant == "siglip")
    assert (f"encoder.layers.{depth}." in caplog.text) == (depth < 3)
    x = pixels(28)
    with torch.no_grad():
        out = ours(x)
    assert out.shape == (2, 16, 32)
    close(out, hf_features(model, x, feature_layer, variant == "clip"))


@pytest.mark.parametrize("variant", ["clip", "siglip"])
def test_vision_interpolated_position_embeddings(tmp_path, variant):
    model = hf_vision(variant)
    model.save_pretrained(tmp_path)
    ours = vision_encoder_from_hf(tmp_path, feature_layer=-2, image_size=42)
    assert ours.cfg.image_size == 42 and ours.cfg.num_patches == 36
    x = pixels(42)
    ref = hf_features(model, x, -2, variant == "clip", interpolate_pos_encoding=True)
    with torch.no_grad():
        out = ours(x)
    close(out, ref)


def test_vision_from_two_tower_clip_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        vision_config=VISION,
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        ),
        projection_dim=16,
    )
    model = perturb(transformers.CLIPModel(cfg))
    model.save_pretrained(tmp_path)
    assert vision_config_from_hf(tmp_path, -2).layers == 3
    ours = vision_encoder_from_hf(tmp_path, feature_layer=-2)
    x = pixels(28)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        out = ours(x)
    close(out, ref[:, 1:])


@pytest.mark.parametrize(
    ("variant", "feature_layer", "act"),
    [("clip", -2, "quick_gelu"), ("siglip", -1, "gelu_tanh")],
)
def test_save_vision_hf_round_trip(tmp_path, variant, feature_layer, act):
    cfg = VisionConfig(
        variant=variant,
        image_size=28,
        patch_size=7,
        width=32,
        layers=3,
        heads=4,
        mlp_dim=64,
        act=act,
        feature_layer=feature_layer,
    )
    torch.manual_seed(0)
    ours = perturb(VisionTransformer(cfg))
    save_vision_hf(ours, tmp_path)
    cls = transformers.CLIPVisionModel if variant == "clip" else transformers.SiglipVisionModel
    model, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_hidden_layers == len(ours.blocks)
    x = pixels(28)
    with torch.no_grad():
        out = ours(x)
    with torch.no_grad():
        res = model.eval()(pixel_values=x, output_hidden_states=True)
    h = res.hidden_states[-1]
    close(out, h[:, 1:] if variant == "clip" else h)
    # post_layernorm is written as weight 1, bias 0: a LayerNorm without affine. CLIP applies
    # it to the pooled CLS row only, SigLIP to every row.
    normed = torch.nn.functional.layer_norm(h, (32,), eps=cfg.norm_eps)
    if variant == "clip":
        close(res.pooler_output, normed[:, 0])
    else:
        close(res.last_hidden_state, normed)


def test_vision_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'vit'.*clip_vision_model"):
        vision_config_from_hf(transformers.ViTConfig().to_dict())
    hf_vision("clip").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="feature_layer"):
        vision_encoder_from_hf(tmp_path, feature_layer=5)
    state = read_safetensors(tmp_path / "model.safetensors")
    state["encoder.layers.0.mlp.fc1.weight"] = torch.zeros(65, 32)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"shape mismatch.*encoder\.layers\.0\.mlp\.fc1\.weight"):
        vision_encoder_from_hf(tmp_path)


# ---------------------------------------------------------------------------------------------
# Decoders
# ---------------------------------------------------------------------------------------------

DECODER = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # set explicitly: Qwen2Config's default (32) ignores num_heads
    max_position_embeddings=256,
)
CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,  # transformers 5 keeps rope_theta inside rope_parameters
}


def hf_config(model_type: str, **over):
    return getattr(transformers, CLASSES[model_type][0])(**{**DECODER, **over})


def hf_decoder(model_type: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[model_type][1])(hf_config(model_type, **over))
    return perturb(model, seed)


def token_ids(batch: int = 2, length: int = T, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def our_logits(decoder: Decoder, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return decoder(ids, **kw)


DECODER_CASES = {
    "llama-mha-untied": ("llama", dict(num_key_value_heads=4)),
    "llama-gqa-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-llama3-rope": ("llama", dict(rope_parameters=LLAMA3)),
    "qwen2-gqa-bias": ("qwen2", {}),
    "qwen2-mha-tied": ("qwen2", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2-sliding": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=5, max_window_layers=0),
    ),
    "mistral-gqa-sliding": ("mistral", dict(sliding_window=5)),
    # Qwen3Config's default head_dim (128) is not hidden / heads: set it as its checkpoints do.
    "qwen3-gqa-tied": ("qwen3", dict(head_dim=32, tie_word_embeddings=True)),
    "qwen3-sliding": (
        "qwen3",
        dict(head_dim=16, use_sliding_window=True, sliding_window=5, max_window_layers=0),
    ),
}


@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_decoder_matches_transformers(tmp_path, case):
    model_type, over = DECODER_CASES[case]
    model = hf_decoder(model_type, **over)
    model.save_pretrained(tmp_path)
    ours = decoder_from_hf(tmp_path)
    cfg = ours.cfg
    assert cfg.kv_heads == model.config.num_key_value_heads
    assert cfg.tie_embeddings == bool(over.get("tie_word_embeddings"))
    if cfg.tie_embeddings:
        assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
        assert ours.lm_head.weight is ours.embed_tokens.weight
    assert cfg.qkv_bias == (model_type == "qwen2")
    assert cfg.qk_norm == (model_type == "qwen3")
    ids = token_ids()
    close(our_logits(ours, ids), hf_logits(model, ids))


def test_llama3_rope_scaling_matters(tmp_path):
    """The llama3 case above only proves something if the scaling changes the logits at T."""
    model = hf_decoder("llama", rope_parameters=LLAMA3)
    model.save_pretrained(tmp_path)
    assert decoder_config_from_hf(tmp_path).rope_scaling == RopeScalingConfig(
        "llama3", 8.0, 1.0, 4.0, 64
    )
    plain = transformers.LlamaForCausalLM(hf_config("llama")).eval()
    plain.load_state_dict(model.state_dict())
    ids = token_ids()
    assert (hf_logits(model, ids) - hf_logits(plain, ids)).abs().max() > 1e-2


def test_sliding_window_matters(tmp_path):
    model = hf_decoder("mistral", sliding_window=5)
    model.save_pretrained(tmp_path)
    assert decoder_config_from_hf(tmp_path).sliding_window == 5
    ids = token_ids()
    windowed = hf_logits(model, ids)
    model.config.sliding_window = None
    assert (windowed - hf_logits(model, ids)).abs().max() > 1e-2


def test_transformers4_config_layout(tmp_path):
    """rope_theta + rope_scaling {"type": ...} at the top level, as transformers 4 wrote them."""
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    model = hf_decoder("llama", rope_parameters=rope)
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["rope_parameters"]
    raw.update(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ids = token_ids()
    ref = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval(), ids)
    close(ref, hf_logits(model, ids))  # the rewrite means the same thing to transformers
    cfg = decoder_config_from_hf(tmp_path)
    assert (cfg.rope_theta, cfg.rope_scaling.type, cfg.rope_scaling.factor) == (5000.0, "linear", 2)
    close(our_logits(decoder_from_hf(tmp_path), ids), ref)


def test_starting_point_gives_the_shapes_but_keeps_the_attention_backend(tmp_path):
    """`train.init.decoder` replaces the architecture; how attention is computed stays the
    user's. The deprecated `model.decoder.init` does the same; the resolved architecture names
    no weights."""
    from mm1.config import InitConfig, ModelConfig
    from mm1.models.build import resolve_config

    hf_decoder("llama").save_pretrained(tmp_path)
    cfg = ModelConfig()
    cfg.decoder.attention = "sdpa"
    resolved = resolve_config(cfg, init=InitConfig(decoder=str(tmp_path)))
    assert resolved.decoder.attention == "sdpa"
    assert (resolved.decoder.dim, resolved.decoder.layers) == (64, 2)
    cfg.decoder.init = str(tmp_path)
    assert resolve_config(cfg) == resolved
    assert resolved.decoder.init is None


def test_qwen2_sliding_window_only_when_enabled(tmp_path):
    model = hf_decoder("qwen2")
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    # Without layer_types transformers derives them from max_window_layers, but only when
    # use_sliding_window is set.
    del raw["layer_types"]
    raw.update(use_sliding_window=False, sliding_window=5, max_window_layers=0)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ids = token_ids()
    ref = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval(), ids)
    ours = decoder_from_hf(tmp_path)
    assert ours.cfg.sliding_window == 0
    close(our_logits(ours, ids), ref)
    mixed = hf_config("qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1)
    with pytest.raises(ValueError, match="1 of 2 layers"):
        decoder_config_from_hf(mixed.to_dict())


def test_sharded_safetensors(tmp_path):
    model = hf_decoder("llama")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = token_ids()
    close(our_logits(decoder_from_hf(tmp_path), ids), hf_logits(model, ids))


def test_pytorch_model_bin(tmp_path):
    # transformers 5 always writes safetensors (save_pretrained dropped safe_serialization), so
    # the .bin file is written the way older versions did: torch.save of the state dict.
    model = hf_decoder("qwen2", tie_word_embeddings=True)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    ids = token_ids()
    close(our_logits(decoder_from_hf(tmp_path), ids), hf_logits(model, ids))


class _Payload:
    ran = False

    def __reduce__(self):
        return (_set_ran, ())


def _set_ran() -> None:
    _Payload.ran = True


def test_pickled_code_is_never_run(tmp_path):
    hf_config("llama").save_pretrained(tmp_path)
    torch.save({"model.embed_tokens.weight": _Payload()}, tmp_path / "pytorch_model.bin")
    from mm1.models.hf.checkpoint import UnreadableWeights

    with pytest.raises(UnreadableWeights, match="pytorch_model.bin is not a readable PyTorch"):
        decoder_from_hf(tmp_path)  # refused by the weights-only unpickler, named in one line
    assert not _Payload.ran


def test_unsupported_configs(tmp_path):
    with pytest.raises(ValueError, match="yarn"):
        yarn = dict(LLAMA3, rope_type="yarn", factor=4.0)
        del yarn["low_freq_factor"], yarn["high_freq_factor"]
        decoder_config_from_hf(hf_config("llama", rope_parameters=yarn).to_dict())
    v4 = hf_config("llama").to_dict()
    v4["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    with pytest.raises(ValueError, match="dynamic"):
        decoder_config_from_hf(v4)
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'gpt2'.*llama, qwen2, qwen3, mistral"):
        decoder_from_hf(tmp_path)
    gelu = hf_config("llama", hidden_act="gelu").to_dict()
    with pytest.raises(ValueError, match="hidden_act"):
        decoder_config_from_hf(gelu)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        decoder_from_hf(tmp_path / "absent")
    hf_config("llama").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights file"):
        decoder_from_hf(tmp_path)

    hf_decoder("llama").save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = read_safetensors(path)
    bad = dict(state)
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(97, 64)
    save_file(bad, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(97, 64\)"):
        decoder_from_hf(tmp_path)

    bad = dict(state)
    del bad["model.norm.weight"]
    bad["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(bad, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing: \['model\.norm\.weight'\]") as err:
        decoder_from_hf(tmp_path)
    assert "model.layers.0.self_attn.o_proj.bias" in str(err.value)

    bad = dict(state)
    del bad["lm_head.weight"]  # untied: the head is required
    save_file(bad, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight"):
        decoder_from_hf(tmp_path)


@pytest.mark.parametrize("kind", ["decoder", "vision"])
def test_loaded_weights_do_not_alias_the_checkpoint_file(tmp_path, kind):
    """safetensors maps the file into memory; rewriting it must not change a loaded model."""
    if kind == "decoder":
        model = hf_decoder("llama")
        model.save_pretrained(tmp_path)
        ours = decoder_from_hf(tmp_path)
    else:
        model = hf_vision("siglip")
        model.save_pretrained(tmp_path)
        ours = vision_encoder_from_hf(tmp_path)
    path = tmp_path / "model.safetensors"
    with open(path, "r+b") as f:  # zero the whole data section in place
        header = 8 + int.from_bytes(f.read(8), "little")
        f.seek(header)
        f.write(bytes(path.stat().st_size - header))
    assert all(not v.any() for v in load_file(path).values())
    with torch.no_grad():
        if kind == "decoder":
            ids = token_ids()
            close(ours(ids), hf_logits(model, ids))
        else:
            x = pixels(28)
            close(ours(x), hf_features(model, x, -1, cls=False))


def test_packed_documents_match_separate_runs(tmp_path):
    model = hf_decoder("llama", rope_parameters=LLAMA3)
    model.save_pretrained(tmp_path)
    ours = decoder_from_hf(tmp_path)
    lengths = (30, 50)
    docs = [token_ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    ids = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    packed = our_logits(ours, ids, position_ids=position_ids, document_ids=document_ids)
    start = 0
    for doc, n in zip(docs, lengths):
        close(packed[:, start : start + n], hf_logits(model, doc))
        start += n


ROUND_TRIPS = {
    "llama": DecoderConfig(
        tie_embeddings=True,
        rope_scaling=RopeScalingConfig("llama3", 8.0, 1.0, 4.0, 64),
    ),
    "qwen2": DecoderConfig(qkv_bias=True, head_dim=32, sliding_window=6),
    "qwen2-no-bias": DecoderConfig(rope_theta=50000.0),
    "mistral": DecoderConfig(sliding_window=5, rope_scaling=RopeScalingConfig("linear", 2.0)),
    "qwen3": DecoderConfig(qk_norm=True, head_dim=32, tie_embeddings=True, sliding_window=6),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_save_decoder_hf_round_trip(tmp_path, case):
    model_type = case.split("-")[0]
    cfg = dataclasses.replace(
        ROUND_TRIPS[case], vocab_size=128, dim=64, layers=2, heads=4, kv_heads=2, ffn_dim=96
    )
    torch.manual_seed(0)
    ours = perturb(Decoder(cfg))
    save_decoder_hf(ours, tmp_path, model_type=model_type)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model).__name__ == CLASSES[model_type][1]
    ids = token_ids()
    close(our_logits(ours, ids), hf_logits(model.eval(), ids))
    back = decoder_from_hf(tmp_path)  # and our loader reads what we wrote
    close(our_logits(back, ids), hf_logits(model, ids))
    # The config carries both layouts; each alone must mean the same to transformers 5.
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["rope_theta"], raw["rope_scaling"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    v5_only = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    close(hf_logits(v5_only, ids), hf_logits(model, ids))


def test_save_decoder_hf_rejects_what_the_family_lacks(tmp_path):
    with pytest.raises(ValueError, match="qkv_bias"):
        save_decoder_hf(Decoder(DecoderConfig(**_tiny(), qkv_bias=True)), tmp_path, "llama")
    with pytest.raises(ValueError, match="sliding"):
        save_decoder_hf(Decoder(DecoderConfig(**_tiny(), sliding_window=4)), tmp_path, "llama")
    with pytest.raises(ValueError, match="gpt2"):
        save_decoder_hf(Decoder(DecoderConfig(**_tiny())), tmp_path, "gpt2")
    with pytest.raises(ValueError, match="q/k norm.*use qwen3"):
        save_decoder_hf(Decoder(DecoderConfig(**_tiny(), qk_norm=True)), tmp_path, "qwen2")
    with pytest.raises(ValueError, match="qwen3 always has a q/k norm"):
        save_decoder_hf(Decoder(DecoderConfig(**_tiny())), tmp_path, "qwen3")
    both = Decoder(DecoderConfig(**_tiny(), qk_norm=True, qkv_bias=True))
    for family in (None, "qwen2", "qwen3"):  # one message, whichever family is asked for
        with pytest.raises(ValueError, match="no transformers decoder family has both"):
            save_decoder_hf(both, tmp_path, family)
    assert not Path(tmp_path / "config.json").exists()


def _tiny() -> dict:
    return dict(vocab_size=64, dim=32, layers=1, heads=4, kv_heads=2, ffn_dim=48, max_seq_len=64)


@pytest.mark.parametrize(
    ("over", "family"),
    [
        ({}, "llama"),
        ({"qkv_bias": True}, "qwen2"),
        ({"qk_norm": True}, "qwen3"),
        ({"qk_norm": True, "sliding_window": 4}, "qwen3"),
        ({"sliding_window": 4}, "mistral"),
    ],
)
def test_a_dense_decoder_is_written_as_the_family_that_expresses_it(tmp_path, over, family):
    """Without a type named, a q/k norm, q/k/v biases or a sliding window choose the family
    that has them (each of these was an error under the old default, llama)."""
    torch.manual_seed(0)
    ours = perturb(Decoder(DecoderConfig(**_tiny(), **over)))
    save_decoder_hf(ours, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(model).__name__ == CLASSES[family][1]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    close(our_logits(ours, ids), hf_logits(model, ids))


def test_a_qwen3_config_without_head_dim_has_transformers_default():
    """Qwen3Config's head_dim defaults to 128, not hidden / heads: a config saved as a diff
    against the defaults (as transformers 4 writes a LLaVA text_config) leaves it out."""
    raw = hf_config("qwen3").to_dict()
    del raw["head_dim"]
    assert transformers.Qwen3Config(**raw).head_dim == 128
    assert decoder_config_from_hf(raw).resolved_head_dim == 128
    moe = transformers.Qwen3MoeConfig(**{**DECODER, "head_dim": None}).to_dict()
    moe.pop("head_dim", None)  # Qwen3-MoE's attention falls back to hidden / heads
    assert decoder_config_from_hf(moe).resolved_head_dim == 64 // 4


def test_qwen3_attention_bias_is_refused(tmp_path):
    """Qwen3's attention_bias also biases o_proj, which mm1's decoder does not have."""
    with pytest.raises(ValueError, match="attention_bias=true: qwen3's o_proj"):
        decoder_config_from_hf(hf_config("qwen3", head_dim=16, attention_bias=True).to_dict())
