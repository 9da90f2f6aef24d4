"""The encoder study preset: its grid loads (16 MM1 cells counting seeds, each starting from
an encoder the `train_encoder` prepare steps pre-train once), and the step kind is checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from mm1.ablate.grid import load_grid
from mm1.ablate.prepare import parse_prepare
from mm1.config import ConfigError
from mm1.config.encoder import EncoderRunConfig

ROOT = Path(__file__).resolve().parents[2]


def test_encoder_study_preset_pretrains_each_encoder_once(tmp_path: Path) -> None:
    grid = load_grid(ROOT / "configs" / "studies" / "encoders.yaml")
    assert len(grid.cells) <= 16 and len(grid.seeds) == 2
    configs = [grid.cell_config(c, tmp_path) for c in grid.cells]
    encoders = [s.train_config() for s in grid.prepare]
    assert all(isinstance(c, EncoderRunConfig) for c in encoders)
    runs = [c.train.run_dir for c in encoders]
    assert len(set(runs)) == len(runs) == 4
    assert {c.encoder.objective for c in encoders} == {"clip", "aim"}
    # docs/ablations/encoders was measured with CLIP encoders of contrastive batch 64 trained 400
    # steps: the study keeps them whatever the CLIP preset's own (512, 1,200 steps) is.
    clip = [c.train for c in encoders if c.encoder.objective == "clip"]
    assert {(t.micro_batch_size, t.steps) for t in clip} == {(64, 400)}
    starts = {c.train.init.vision for c in configs}
    assert starts == {None, *runs}  # every encoder is used, and random init besides
    for cfg in configs:
        assert cfg.train.steps >= 800
        enc = next((c for c in encoders if c.train.run_dir == cfg.train.init.vision), None)
        if enc is not None:  # the same ViT as the one pre-trained
            for k in ("width", "layers", "heads", "mlp_dim", "patch_size"):
                assert getattr(enc.model.vision, k) == getattr(cfg.model.vision, k)


def test_train_encoder_step_is_validated(tmp_path: Path) -> None:
    grid = tmp_path / "g.yaml"
    with pytest.raises(ConfigError, match=r"prepare\[0\]\.train_encoder: encoder\.objective="):
        parse_prepare(
            [
                {
                    "train_encoder": {
                        "config": str(ROOT / "configs" / "encoder_aim.yaml"),
                        "overrides": {"encoder.objective": "mae"},
                    }
                }
            ],
            grid,
        )
    with pytest.raises(ConfigError, match=r"prepare\[0\]\.train_encoder: steps is not an option"):
        parse_prepare([{"train_encoder": {"config": "x.yaml", "steps": 3}}], grid)
