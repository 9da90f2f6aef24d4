"""The `pixel_shuffle` connector (space-to-depth, as Idefics3 / SmolVLM / nanoVLM) against
transformers' Idefics3Connector with the same weights."""

from __future__ import annotations

import pytest
import torch

from mm1.config import ConfigError, ModelConfig, VisionConfig, validate_model
from mm1.models.connectors import PixelShuffleConnectorConfig, build_connector

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(("grid", "scale"), [(4, 2), (8, 2), (6, 3), (8, 4)])
def test_pixel_shuffle_matches_idefics3(grid: int, scale: int) -> None:
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    width, out = 24, 40
    config = transformers.Idefics3Config(
        vision_config={"hidden_size": width, "num_attention_heads": 4},
        text_config={"hidden_size": out, "num_attention_heads": 4, "num_key_value_heads": 4},
        scale_factor=scale,
    )
    theirs = Idefics3Connector(config).eval()
    q = (grid // scale) ** 2
    ours = build_connector(PixelShuffleConnectorConfig(num_tokens=q), width, grid, out).eval()
    assert ours.proj[0].bias is None and ours.num_tokens == q
    ours.proj[0].weight.data.copy_(theirs.modality_projection.proj.weight)
    x = torch.randn(3, grid * grid, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_pixel_shuffle_with_an_mlp_keeps_every_patch() -> None:
    """Nothing is pooled away: a token's features are exactly its r x r patches."""
    cfg = PixelShuffleConnectorConfig(num_tokens=4, mlp_depth=2, bias=True)
    m = build_connector(cfg, 3, 4, 8)
    assert [type(x).__name__ for x in m.proj] == ["Linear", "GELU", "Linear"]
    assert m.proj[0].bias is not None and m.proj[0].in_features == 12
    x = torch.arange(16 * 3, dtype=torch.float32).view(1, 16, 3)
    seen = {}
    m.proj = torch.nn.Identity()
    out = m(x)  # (1, 4, 12): token (i, j) holds patches (2i + a, 2j + b), a and b in {0, 1}
    for i in range(2):
        for j in range(2):
            want = [x[0, (2 * i + a) * 4 + 2 * j + b] for a in range(2) for b in range(2)]
            seen[i, j] = torch.equal(out[0, i * 2 + j], torch.cat(want))
    assert all(seen.values()), seen


@pytest.mark.parametrize(
    ("q", "match"),
    [(9, "sqrt\\(Q\\)=3 must divide the 8x8"), (8, "not a perfect square"), (100, "10x10 grid")],
)
def test_pixel_shuffle_tokens_must_tile_the_grid(q: int, match: str) -> None:
    cfg = ModelConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64),
        connector={"type": "pixel_shuffle", "num_tokens": q},
    )
    with pytest.raises(ConfigError, match=match):
        validate_model(cfg)
