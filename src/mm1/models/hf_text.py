"""CLIP's text tower from a transformers checkpoint (`encoder.text.hf`): a CLIPTextModel (or a
CLIPModel's text half) whose output at each caption's EOS is the text feature, as in
`TextTransformer`; transformers is imported only when one is used."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm1.config.encoder import TextTowerConfig
from mm1.fs import read_json


def hf_text_config(path: str | Path) -> dict[str, Any]:
    """The text config of an HF CLIP text model directory (a CLIPModel's `text_config`)."""
    raw = read_json(Path(path) / "config.json")
    return raw.get("text_config") or raw


class HFTextTower(nn.Module):
    def __init__(self, cfg: TextTowerConfig, load_weights: bool = True) -> None:
        super().__init__()
        import transformers

        assert cfg.hf is not None
        self.cfg = cfg
        text_cfg = transformers.CLIPTextConfig(**hf_text_config(cfg.hf))
        if load_weights:
            self.model = transformers.CLIPTextModel.from_pretrained(cfg.hf, config=text_cfg)
        else:
            self.model = transformers.CLIPTextModel(text_cfg)
        self.model.float()

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer layers (the FSDP / checkpointing units)."""
        inner = getattr(self.model, "text_model", self.model)
        return inner.encoder.layers

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        mask = positions[None, :] < lengths[:, None]
        ids = input_ids.masked_fill(~mask, 0)  # padding (masked) may lie outside its vocabulary
        out = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return out[torch.arange(out.shape[0], device=out.device), lengths - 1]
