"""Registries own their names and options: a connector or FFN registered once (here, in the test
only) is accepted by the config, parsed into its own options and built, with no other edit."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from mm1.config import (
    ConfigError,
    ConnectorConfig,
    ModelConfig,
    load_config,
    model_config_from_dict,
    to_dict,
)
from mm1.models.connectors import MLPConnectorConfig, register
from mm1.models.decoder import SwiGLUConfig
from mm1.models.mllm import MM1
from mm1.registry import CONNECTORS, FFNS

TINY = [
    "model.vision.image_size=32",
    "model.vision.patch_size=8",
    "model.vision.width=32",
    "model.vision.layers=1",
    "model.vision.heads=2",
    "model.vision.mlp_dim=64",
    "model.decoder.vocab_size=64",
    "model.decoder.dim=32",
    "model.decoder.layers=2",
    "model.decoder.heads=4",
    "model.decoder.kv_heads=2",
    "model.decoder.ffn_dim=64",
    "model.connector.num_tokens=4",
    "data.seq_len=64",
]


@dataclasses.dataclass
class ScaledConfig(ConnectorConfig):
    type: str = "test_scaled"
    scale: float = 1.0

    def validate(self, key: str, model: ModelConfig) -> None:
        super().validate(key, model)
        if self.scale <= 0:
            raise ConfigError(f"{key}.scale={self.scale} must be positive")


class ScaledConnector(nn.Module):
    """A linear map per patch, times `scale`."""

    def __init__(self, cfg: ScaledConfig, vision_width: int, grid: int, out_dim: int) -> None:
        super().__init__()
        self.num_tokens, self.scale = grid * grid, cfg.scale
        self.proj = nn.Linear(vision_width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale


@pytest.fixture
def scaled_connector() -> Iterator[None]:
    register("test_scaled", ScaledConfig)(ScaledConnector)
    try:
        yield
    finally:
        CONNECTORS.unregister("test_scaled")


def test_a_connector_registered_once_is_accepted_by_the_config_and_built(
    scaled_connector,
) -> None:
    over = ["model.connector.type=test_scaled", "model.connector.num_tokens=0"]
    cfg = load_config(None, [*TINY, *over, "model.connector.scale=2.5"])
    assert cfg.model.connector == ScaledConfig(num_tokens=0, scale=2.5)
    model = MM1(cfg.model)
    assert isinstance(model.connector, ScaledConnector) and model.connector.scale == 2.5
    assert model.num_image_tokens == cfg.model.num_image_tokens == 16
    pixels = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(
        model.image_features(pixels), 2.5 * model.connector.proj(model.vision(pixels))
    )
    # its own validation runs, naming the key; its options are its own
    with pytest.raises(ConfigError, match=r"^model\.connector\.scale=-1\.0 must be positive$"):
        load_config(None, [*TINY, *over, "model.connector.scale=-1"])
    with pytest.raises(ConfigError, match=r"model\.connector\.scale: .*"):
        load_config(None, [*TINY, *over, "model.connector.scale=big"])
    # saved and read back as its own sub-config
    assert model_config_from_dict(to_dict(cfg.model)).connector == cfg.model.connector


def test_an_unknown_type_names_the_key_and_lists_the_registered_names(scaled_connector) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [*TINY, "model.connector.type=perceiver"])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model.connector.type='perceiver' is not a registered connector")
    assert message.endswith("registered: " + ", ".join(sorted(CONNECTORS)))
    assert "test_scaled" in message and "c_abstractor" in message
    with pytest.raises(
        ConfigError, match=r"^model\.decoder\.ffn\.type='soft_moe' .*registered: mlp, moe, swiglu"
    ):
        load_config(None, [*TINY, "model.decoder.ffn=soft_moe"])
    with pytest.raises(
        ConfigError,
        match=r"^model\.family='chameleon_moe' .*registered: chameleon, emu2, fuyu, mm1, seed$",
    ):
        load_config(None, [*TINY, "model.family=chameleon_moe"])


def test_a_key_no_type_declares_is_an_error_naming_it() -> None:
    with pytest.raises(
        ConfigError, match=r"^model\.connector\.hiddn is not an option of connector"
    ):
        load_config(None, [*TINY, "model.connector.type=mlp", "model.connector.hiddn=3"])


def test_old_flat_keys_still_read() -> None:
    """A model.json written before the sub-configs: every connector option side by side, the FFN
    as a name."""
    old = {
        "connector": {
            "type": "mlp",
            "num_tokens": 0,
            "hidden": 1024,
            "depth": 3,
            "mlp_depth": 3,
            "heads": 8,
            "layer_norm": False,
        },
        "decoder": {"ffn": "swiglu"},
    }
    m = model_config_from_dict(json.loads(json.dumps(old)))
    assert m.connector == MLPConnectorConfig(num_tokens=0, mlp_depth=3)
    assert m.decoder.ffn == SwiGLUConfig()
    # the FFN as a mapping means the same; a type switched by an override ignores the keys
    # another type declares (here c_abstractor's hidden / depth from the preset)
    cfg = load_config(None, [*TINY, "model.decoder.ffn.type=swiglu", "model.connector.depth=2"])
    assert cfg.model.decoder.ffn == SwiGLUConfig()
    assert cfg.model.connector.depth == 2
    switched = [*TINY, "model.connector.depth=2", "model.connector.type=mlp"]
    switched.append("model.connector.num_tokens=0")
    assert load_config(None, switched).model.connector == MLPConnectorConfig(num_tokens=0)


def test_a_registered_ffn_is_built_from_its_sub_config() -> None:
    @dataclasses.dataclass
    class WideConfig(SwiGLUConfig):
        type: str = "test_wide"
        mult: int = 2

    def wide(cfg, layer: int) -> nn.Module:
        return nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn.mult * cfg.ffn_dim),
            nn.SiLU(),
            nn.Linear(cfg.ffn.mult * cfg.ffn_dim, cfg.dim),
        )

    FFNS.register("test_wide", WideConfig)(wide)
    try:
        cfg = load_config(None, [*TINY, "model.decoder.ffn={type: test_wide, mult: 3}"])
        assert cfg.model.decoder.ffn == WideConfig(mult=3)
        model = MM1(cfg.model)
        assert model.decoder.layers[0].mlp[0].out_features == 3 * 64
        ids = torch.tensor([[1, 2, 3]])
        assert model(ids, labels=ids).loss.isfinite()
    finally:
        FFNS.unregister("test_wide")
