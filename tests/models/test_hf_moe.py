"""Mixtral and Qwen3-MoE checkpoints both ways: tiny random models written by transformers'
save_pretrained load with transformers' logits, ours write back as checkpoints transformers
loads with ours, the load-balance loss equals transformers' with one sparse layer, and
unsupported MoE features are errors naming their key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm1.models.hf import decoder_config_from_hf, decoder_from_hf, save_decoder_hf
from mm1.models.moe import MoE

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    tie_word_embeddings=False,
)


def _mixtral(**kw: object):
    cfg = transformers.MixtralConfig(
        **{**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2, **kw}
    )
    return transformers.MixtralForCausalLM(cfg)


def _qwen3_moe(**kw: object):
    cfg = transformers.Qwen3MoeConfig(
        **{
            **COMMON,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "decoder_sparse_step": 2,
            "norm_topk_prob": False,
            **kw,
        }
    )
    return transformers.Qwen3MoeForCausalLM(cfg)


def _randomised(model):
    """Non-trivial norms and a peaked router, so every part of the mapping matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    return model.eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(0))


BUILDERS = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe}
CASES = [
    ("mixtral", {}),
    ("qwen3_moe", {}),
    ("qwen3_moe", {"norm_topk_prob": True, "decoder_sparse_step": 1}),
]


@pytest.mark.parametrize(("kind", "kw"), CASES)
def test_hf_moe_checkpoints_load_with_transformers_logits_and_write_back(
    tmp_path: Path, kind: str, kw: dict
) -> None:
    torch.manual_seed(0)
    theirs = _randomised(BUILDERS[kind](**kw))
    theirs.save_pretrained(tmp_path / "hf")
    ours = decoder_from_hf(tmp_path / "hf").eval()
    moe = ours.cfg.ffn
    assert moe.type == "moe" and moe.experts == 4 and moe.top_k == 2
    assert ours.cfg.qk_norm == (kind == "qwen3_moe")
    sparse = [i for i, b in enumerate(ours.layers) if isinstance(b.mlp, MoE)]
    assert sparse == ([0, 1] if kind == "mixtral" or kw else [1])
    ids = _ids()
    with torch.no_grad():
        want = theirs(ids).logits
        torch.testing.assert_close(ours(ids), want, atol=1e-4, rtol=1e-4)
        # ... and back: written as the family it fits, transformers loads the same logits
        save_decoder_hf(ours, tmp_path / "back")
        written = json.loads((tmp_path / "back" / "config.json").read_text())
        assert written["model_type"] == kind
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
        torch.testing.assert_close(again(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_fused_expert_weights_load_too(tmp_path: Path) -> None:
    """transformers 5's in-memory layout (experts fused), written as is."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    theirs = _randomised(_qwen3_moe(decoder_sparse_step=1))
    theirs.save_pretrained(tmp_path / "hf")
    save_file(
        {k: v.contiguous() for k, v in theirs.state_dict().items()},
        tmp_path / "hf" / "model.safetensors",
        metadata={"format": "pt"},
    )
    assert "model.layers.0.mlp.experts.gate_up_proj" in theirs.state_dict()
    ours = decoder_from_hf(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()), theirs(_ids()).logits, atol=1e-4, rtol=1e-4)


def test_balance_loss_equals_transformers_with_one_sparse_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    theirs = _randomised(_qwen3_moe(norm_topk_prob=True))  # layer 1 of 2 is sparse
    theirs.save_pretrained(tmp_path / "hf")
    ours = decoder_from_hf(tmp_path / "hf").eval()
    ids = _ids()
    with torch.no_grad():
        out = theirs(ids, output_router_logits=True)
        aux: dict[str, torch.Tensor] = {}
        ours(ids, aux_losses=aux)
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(aux["router_balance"], out.aux_loss.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "qwen2_moe"}, r"'qwen2_moe': Qwen2-MoE has shared experts"),
        ({"model_type": "mixtral", "router_jitter_noise": 0.1}, r"^router_jitter_noise=0\.1"),
        ({"model_type": "qwen3_moe", "mlp_only_layers": [0]}, r"^mlp_only_layers=\[0\]"),
        ({"model_type": "qwen3_moe", "use_sliding_window": True}, r"^use_sliding_window=true"),
        ({"model_type": "qwen3_moe", "attention_bias": True}, r"^attention_bias=true"),
    ],
)
def test_unsupported_moe_checkpoints_name_the_key(config: dict, message: str) -> None:
    base = {
        "vocab_size": 96,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    }
    with pytest.raises(ValueError, match=message):
        decoder_config_from_hf({**base, **config})


def test_a_moe_decoder_that_fits_no_family_is_refused_as_one(tmp_path: Path) -> None:
    """Named families it does not fit are errors; by default it goes out as custom code
    (`mm1_moe`, tests/models/test_custom_moe_hf.py)."""
    from mm1.models.hf.moe import moe_type_for

    torch.manual_seed(0)
    theirs = _randomised(_qwen3_moe())
    theirs.save_pretrained(tmp_path / "hf")
    ours = decoder_from_hf(tmp_path / "hf")
    with pytest.raises(ValueError, match="mixtral needs experts in every layer"):
        save_decoder_hf(ours, tmp_path / "out", "mixtral")
    ours.cfg.qk_norm = False  # sparse every 2nd layer and no q/k norm: neither family
    with pytest.raises(ValueError, match="fits neither Mixtral"):
        moe_type_for(ours.cfg)
    with pytest.raises(ValueError, match="qwen3_moe needs q/k norm"):
        save_decoder_hf(ours, tmp_path / "out", "qwen3_moe")
    with pytest.raises(ValueError, match="llama has a SwiGLU FFN, not 'moe'"):
        save_decoder_hf(ours, tmp_path / "out", "llama")
    save_decoder_hf(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "mm1_moe"
