"""A tiny SEED tokenizer and its sizes: shared by the SEED model tests and the 2-rank loss test
(tests/train/test_contrastive.py)."""

from __future__ import annotations

import torch

from mm1.config import ModelConfig, SEEDConfig, VisionConfig
from mm1.config.encoder import CLIPObjectiveConfig, TextTowerConfig, VQObjectiveConfig
from mm1.models.seed_tokenizer import SEEDModel

VOCAB, Q, K, E = 40, 5, 12, 8  # text vocabulary, queries (codes per image), codebook, CLIP space
VISION = VisionConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32)
SEED_CFG = SEEDConfig(num_queries=Q, layers=2, decoder_layers=1, codebook_size=K, code_dim=4,
                      embed_dim=E)  # fmt: skip


def seed_tokenizer_model() -> SEEDModel:
    """A tiny SEED tokenizer (causal Q-Former, codebook, CLIP towers), seeded."""
    torch.manual_seed(0)
    text = TextTowerConfig(width=16, layers=1, heads=2, mlp_dim=32, max_len=6)
    model_cfg = ModelConfig(vision=VISION, seed=SEED_CFG)
    return SEEDModel(model_cfg, text, CLIPObjectiveConfig(embed_dim=E), VQObjectiveConfig(), VOCAB)
