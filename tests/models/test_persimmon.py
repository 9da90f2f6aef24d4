"""Persimmon decoders (Fuyu-8B's text model) in and out: mm1's decoder with LayerNorm, partial
rotary, an output bias and a squared-ReLU FFN against transformers' `PersimmonForCausalLM`."""

from __future__ import annotations

import json

import pytest
import torch

from mm1.config import ConfigError, DecoderConfig, ModelConfig, validate_model
from mm1.models.decoder import Decoder
from mm1.models.hf import decoder_config_from_hf, decoder_from_hf, save_decoder_hf
from mm1.models.kv_cache import KVCache
from tests.models.helpers import PERSIMMON_SWITCHES, perturb

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

PERSIMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rope_theta=25000.0,
)
OURS = dict(
    vocab_size=128,
    dim=64,
    layers=2,
    heads=4,
    kv_heads=4,
    ffn_dim=96,
    max_seq_len=256,
    rope_theta=25000.0,
    **PERSIMMON_SWITCHES,
)


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def hf_persimmon(seed: int = 0, **over):
    torch.manual_seed(seed)
    config = transformers.PersimmonConfig(**{**PERSIMMON, **over})
    return perturb(transformers.PersimmonForCausalLM(config), seed)


def ids(batch: int = 2, length: int = 40, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model(x, **kw)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize(
    "over",
    [
        {"partial_rotary_factor": 0.5},
        {"partial_rotary_factor": 0.25, "qk_layernorm": False},
        {"partial_rotary_factor": 1.0, "hidden_act": "gelu", "tie_word_embeddings": True},
    ],
    ids=["fuyu-8b-like", "quarter-rotary-no-qk-norm", "full-rotary-gelu-tied"],
)
def test_persimmon_matches_transformers(tmp_path, over):
    model = hf_persimmon(**over)
    model.save_pretrained(tmp_path)
    ours = decoder_from_hf(tmp_path)
    cfg = ours.cfg
    assert (cfg.norm, cfg.o_bias, cfg.qkv_bias, cfg.ffn_type) == ("layer", True, True, "mlp")
    assert cfg.rope_fraction == over["partial_rotary_factor"]
    assert cfg.rope_dim == int(16 * over["partial_rotary_factor"])
    assert cfg.qk_norm == over.get("qk_layernorm", True)
    x = ids()
    close(logits(ours, x), logits(model, x))


def test_partial_rotary_matters(tmp_path):
    """The cases above prove the rotated share only if a different share changes the logits."""
    model = hf_persimmon(partial_rotary_factor=0.5)
    model.save_pretrained(tmp_path)
    ours = decoder_from_hf(tmp_path)
    other = Decoder(DecoderConfig(**{**OURS, "rope_fraction": 1.0}))
    other.load_state_dict(ours.state_dict())
    x = ids()
    assert (logits(other.eval(), x) - logits(model, x)).abs().max() > 1e-2


def test_a_persimmon_decoder_is_written_as_persimmon_and_read_back(tmp_path):
    torch.manual_seed(0)
    ours = perturb(Decoder(DecoderConfig(**OURS)))
    save_decoder_hf(ours, tmp_path)  # no type named: the family that expresses it
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model).__name__ == "PersimmonForCausalLM"
    x = ids()
    close(logits(ours, x), logits(model.eval(), x))
    close(logits(decoder_from_hf(tmp_path), x), logits(ours, x))
    # transformers 5 alone (rope_parameters) and 4 alone (top-level keys) read the same rope.
    raw = json.loads((tmp_path / "config.json").read_text())
    v4 = {k: v for k, v in raw.items() if k != "rope_parameters"}
    assert decoder_config_from_hf(v4) == decoder_config_from_hf(raw)


def test_packed_documents_and_the_kv_cache_match_transformers(tmp_path):
    """Partial rotary on restarted positions (packing) and on cached offsets (decoding)."""
    model = hf_persimmon()
    model.save_pretrained(tmp_path)
    ours = decoder_from_hf(tmp_path)
    lengths = (17, 23)
    docs = [ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    packed = logits(ours, torch.cat(docs, 1), position_ids=position_ids, document_ids=document_ids)
    close(packed[:, :17], logits(model, docs[0]))
    close(packed[:, 17:], logits(model, docs[1]))
    x = ids(1, 12)
    cache = KVCache(ours.cfg, 1, 16, "cpu", torch.float32)
    steps = [logits(ours, x[:, :8], cache=cache)]
    steps += [logits(ours, x[:, i : i + 1], cache=cache) for i in range(8, 12)]
    close(torch.cat(steps, 1), logits(model, x))


def test_what_other_families_or_persimmon_cannot_express_is_refused(tmp_path):
    persimmonish = Decoder(DecoderConfig(**OURS))
    with pytest.raises(ValueError, match=r"llama has no decoder.norm=layer.*persimmon"):
        save_decoder_hf(persimmonish, tmp_path, "llama")
    gqa = Decoder(DecoderConfig(**{**OURS, "kv_heads": 2}))
    with pytest.raises(ValueError, match=r"persimmon needs model\.decoder\.kv_heads=4 \(= heads"):
        save_decoder_hf(gqa, tmp_path)
    with pytest.raises(ValueError, match="persimmon needs model.decoder.norm=layer"):
        save_decoder_hf(Decoder(DecoderConfig(**{**OURS, "norm": "rms"})), tmp_path)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize(
    ("over", "key"),
    [
        ({"norm": "batch"}, "model.decoder.norm"),
        ({"rope_fraction": 0.05}, "model.decoder.rope_fraction"),
        ({"rope_fraction": 1.5}, "model.decoder.rope_fraction"),
        ({"ffn": {"type": "mlp", "activation": "tanh"}}, "model.decoder.ffn.activation"),
    ],
)
def test_bad_persimmon_switches_name_their_key(over, key):
    cfg = ModelConfig(decoder=DecoderConfig(**{**OURS, **over}))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_model(cfg)
