"""The starting-weights chain: vocabulary resize at the mean, position-embedding interpolation,
one-line errors naming the first parameter that does not fit, and the registration hook (where
upcycling plugs in: tests/train/test_moe_training.py)."""

from __future__ import annotations

import pytest
import torch

from mm1.models import state_transforms as st
from mm1.models.mllm import MM1
from mm1.models.starting_point import expected_shapes


def _ctx(model: MM1, **kw) -> st.LoadContext:
    return st.LoadContext(
        source="SRC",
        parts=("vision", "connector", "decoder"),
        expected=expected_shapes(model),
        cls_token=model.cfg.vision.cls_token,
        **kw,
    )


def _pair(tiny_model_config, vocab_from: int = 64, vocab_to: int = 64, **decoder):
    torch.manual_seed(0)
    src = MM1(tiny_model_config(vocab_size=vocab_from, **decoder))
    dst = MM1(tiny_model_config(vocab_size=vocab_to, **decoder))
    return src, dst


@pytest.mark.parametrize("tied", [False, True])
def test_vocabulary_resize_puts_new_rows_at_the_mean(tied: bool, tiny_model_config) -> None:
    src, dst = _pair(tiny_model_config, 64, 70, tie_embeddings=tied)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    if tied:
        del state["decoder.lm_head.weight"]  # saved once, as exports and runs do
    out = st.apply_chain(state, _ctx(dst))
    heads = ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
    for name in heads:
        old = src.state_dict()[f"decoder.{name}.weight"]
        new = out[f"decoder.{name}.weight"]
        assert new.shape == (70, old.shape[1])
        assert torch.equal(new[:64], old)
        torch.testing.assert_close(new[64:], old.mean(0).expand(6, -1))
    # The rows of tokens new to a tokenizer start at the mean too (an HF decoder's added ids).
    state = {k: v.clone() for k, v in src.state_dict().items() if not tied or "lm_head" not in k}
    out = st.apply_chain(state, _ctx(dst, new_token_ids=(3,)))
    old = src.decoder.embed_tokens.weight.detach()
    rest = [i for i in range(64) if i != 3]
    torch.testing.assert_close(out["decoder.embed_tokens.weight"][3], old[rest].mean(0))


def test_position_embeddings_are_interpolated_to_the_model_grid(tiny_model_config) -> None:
    from mm1.models.vision import interpolate_pos_embed

    torch.manual_seed(0)
    small = MM1(tiny_model_config())
    cfg = tiny_model_config()
    cfg.vision.image_size *= 2
    big = MM1(cfg)
    out = st.apply_chain(dict(small.state_dict()), _ctx(big))
    want = interpolate_pos_embed(small.vision.pos_embed.detach(), big.cfg.vision.grid, True)
    assert out["vision.pos_embed"].shape == big.vision.pos_embed.shape
    torch.testing.assert_close(out["vision.pos_embed"], want)


def test_a_shape_mismatch_names_the_first_differing_parameter(tiny_model_config) -> None:
    torch.manual_seed(0)
    src = MM1(tiny_model_config(ffn_dim=48))
    dst = MM1(tiny_model_config(ffn_dim=64))
    with pytest.raises(ValueError) as err:
        st.apply_chain(dict(src.state_dict()), _ctx(dst))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (
        "SRC: decoder.layers.0.mlp.gate_proj.weight is (48, 32) there but (64, 32) in the "
        "model: the architectures differ"
    )
    state = dict(dst.state_dict())
    missing = next(k for k in expected_shapes(dst) if k.startswith("connector."))
    del state[missing]
    with pytest.raises(ValueError, match=f"SRC: has no {missing}"):
        st.apply_chain(state, _ctx(dst))
    state = {**dst.state_dict(), "decoder.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="SRC: decoder.extra.weight has no place in the model"):
        st.apply_chain(state, _ctx(dst))


def test_a_registered_transform_runs_after_the_built_in_ones_before_the_check(
    tiny_model_config,
) -> None:
    """The hook upcycling uses: a transform registered at the end sees the resized
    vocabulary and may reshape what the check would otherwise refuse (here: FFNs twice as
    wide, each weight repeated along its hidden axis)."""
    torch.manual_seed(0)
    src = MM1(tiny_model_config(vocab_size=64, ffn_dim=48))
    wide = MM1(tiny_model_config(vocab_size=70, ffn_dim=96))
    seen = {}

    def widen(state: st.StateDict, ctx: st.LoadContext) -> st.StateDict:
        seen["rows"] = state["decoder.embed_tokens.weight"].shape[0]
        for k, w in state.items():
            if ".mlp." in k and k.startswith("decoder."):
                state[k] = torch.cat([w, w], dim=1 if k.endswith("down_proj.weight") else 0)
        return state

    with pytest.raises(ValueError, match="gate_proj"):
        st.apply_chain(dict(src.state_dict()), _ctx(wide))
    st.register_state_transform("test_widen", widen)
    try:
        assert list(st.STATE_TRANSFORMS)[-3:] == ["vocabulary", "upcycle", "test_widen"]
        out = st.apply_chain(dict(src.state_dict()), _ctx(wide))
    finally:
        del st.STATE_TRANSFORMS["test_widen"]
    assert seen["rows"] == 70
    key = "decoder.layers.1.mlp.down_proj.weight"
    w = src.state_dict()[key]
    assert torch.equal(out[key], torch.cat([w, w], dim=1))
    with pytest.raises(ValueError, match="already registered"):
        st.register_state_transform("vocabulary", widen)
