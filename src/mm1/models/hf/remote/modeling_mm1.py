"""An mm1 model (image encoder -> connector -> decoder) as transformers custom code.

Written by `mm1 convert --to-hf` next to config.json; loaded with
`AutoModel.from_pretrained(dir, trust_remote_code=True)`. Self-contained: torch and
transformers only. The encoder is transformers' CLIP / SigLIP vision model cut at mm1's feature
layer, the decoder transformers' causal LM of `text_config`; the connectors are written out here
with mm1's arithmetic. Image slots (`image_token_id`) in `input_ids` take the connector's
tokens of `pixel_values`' crops, in order. A MoE decoder that fits no transformers class is
`modeling_mm1_moe.py`'s (`text_config.model_type: mm1_moe`), written beside this file.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .modeling_mm1_moe import MM1MoeConfig, MM1MoeForCausalLM

# Honeybee's epsilons on the timm it pins (see mm1.models.connectors).
_PRENORM_EPS = 1e-6
_BLOCK_EPS = 1e-5


class MM1Config(PretrainedConfig):
    model_type = "mm1"
    sub_configs: ClassVar[dict] = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict | PretrainedConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        connector: dict | None = None,
        image_token_id: int = 0,
        drop_cls: bool = True,
        **kwargs,
    ) -> None:
        def sub(value, default_type):
            if isinstance(value, PretrainedConfig):
                return value
            value = dict(value or {"model_type": default_type})
            kind = value.pop("model_type", default_type)
            if kind == MM1MoeConfig.model_type:  # ours: not registered with AutoConfig
                return MM1MoeConfig(**value)
            return AutoConfig.for_model(kind, **value)

        self.vision_config = sub(vision_config, "clip_vision_model")
        self.text_config = sub(text_config, "llama")
        self.connector = dict(connector or {"type": "linear"})
        self.image_token_id = image_token_id
        self.drop_cls = drop_cls
        super().__init__(**kwargs)


def _mlp(dims: list[int], act: type[nn.Module], bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        if i:
            layers.append(act())
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
    return nn.Sequential(*layers)


def _to_grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    b, _, c = x.shape
    return x.transpose(1, 2).reshape(b, c, grid, grid)


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        )
        return x.permute(0, 3, 1, 2)


class Linear(nn.Module):
    def __init__(self, cfg: dict, width: int, grid: int, out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MLP(nn.Module):
    def __init__(self, cfg: dict, width: int, grid: int, out: int) -> None:
        super().__init__()
        self.proj = _mlp([width] + [out] * int(cfg.get("mlp_depth", 2)), nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PixelShuffle(nn.Module):
    def __init__(self, cfg: dict, width: int, grid: int, out: int) -> None:
        super().__init__()
        self.grid, self.side = grid, math.isqrt(int(cfg.get("num_tokens") or grid * grid))
        self.scale = grid // self.side
        dims = [width * self.scale**2] + [out] * int(cfg.get("mlp_depth", 1))
        self.proj = _mlp(dims, nn.GELU, bool(cfg.get("bias", False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # each r x r block of patches -> one token, features (row in block, column, channel)
        b, _, c = x.shape
        s, r = self.side, self.scale
        blocks = x.view(b, s, r, s, r, c).permute(0, 1, 3, 2, 4, 5)
        return self.proj(blocks.reshape(b, s * s, r * r * c))


class AvgPool(nn.Module):
    def __init__(self, cfg: dict, width: int, grid: int, out: int) -> None:
        super().__init__()
        self.grid, self.side = grid, math.isqrt(int(cfg.get("num_tokens") or grid * grid))
        self.proj = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(_to_grid(x, self.grid), self.side)
        return self.proj(pooled.flatten(2).transpose(1, 2))


class AttnPool(nn.Module):
    def __init__(self, cfg: dict, width: int, grid: int, out: int) -> None:
        super().__init__()
        self.heads = int(cfg.get("heads", 8))
        self.queries = nn.Parameter(torch.zeros(int(cfg["num_tokens"]), width))
        self.norm_kv = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.norm_out = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        kv = self.norm_kv(x)
        q = self.q_proj(self.queries).view(1, -1, h, d // h).transpose(1, 2).expand(b, -1, -1, -1)
        k = self.k_proj(kv).view(b, n, h, d // h).transpose(1, 2)
        v = self.v_proj(kv).view(b, n, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, d)
        return self.proj(self.norm_out(self.out_proj(out)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


def _se_width(in_ch: int, channels: int) -> int:
    width = round(0.25 * in_ch)
    return width if width else max(8, int(channels / 16 + 4) // 8 * 8)


def _conv_norm(in_ch: int, out_ch: int, k: int = 1, groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(in_ch, out_ch, k, padding=k // 2, groups=groups, bias=False)
    return nn.Sequential(conv, LayerNorm2d(out_ch, eps=_BLOCK_EPS))


class RegNetBottleneck(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = _conv_norm(in_ch, out_ch)
        self.conv2 = _conv_norm(out_ch, out_ch, 3, groups=out_ch)
        self.se = SqueezeExcite(out_ch, _se_width(in_ch, out_ch))
        self.conv3 = _conv_norm(out_ch, out_ch)
        self.shortcut = nn.Identity() if in_ch == out_ch else _conv_norm(in_ch, out_ch)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv2(self.act(self.conv1(x))))
        return self.act(self.conv3(self.se(y)) + self.shortcut(x))


def _stage(depth: int, in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        *(RegNetBottleneck(in_ch if i == 0 else out_ch, out_ch) for i in range(depth))
    )


class CAbstractor(nn.Module):
    def __init__(self, cfg: dict, width: int, grid: int, out: int) -> None:
        super().__init__()
        depth = int(cfg.get("depth", 3))
        self.grid, self.side = grid, math.isqrt(int(cfg.get("num_tokens") or grid * grid))
        hidden = int(cfg.get("hidden", 1024)) if depth > 0 else width
        self.norm = nn.LayerNorm(width, eps=_PRENORM_EPS) if cfg.get("layer_norm") else None
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, width))
        self.s1 = _stage(depth, width, hidden)
        self.s2 = _stage(depth, hidden, hidden)
        self.readout = _mlp([hidden] + [out] * int(cfg.get("mlp_depth", 2)), nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        x = _to_grid(x + self.pos_embed, self.grid)
        x = self.s2(F.adaptive_avg_pool2d(self.s1(x), self.side))
        return self.readout(x.flatten(2).transpose(1, 2))


CONNECTORS = {"linear": Linear, "mlp": MLP, "avgpool": AvgPool, "attnpool": AttnPool}
CONNECTORS.update(c_abstractor=CAbstractor, pixel_shuffle=PixelShuffle)


class MM1ForConditionalGeneration(PreTrainedModel):
    config_class = MM1Config
    base_model_prefix = ""
    _no_split_modules: ClassVar[list[str]] = []

    def __init__(self, config: MM1Config) -> None:
        super().__init__(config)
        v, t = config.vision_config, config.text_config
        self.vision_tower = AutoModel.from_config(v)
        grid = v.image_size // v.patch_size
        self.connector = CONNECTORS[config.connector["type"]](
            config.connector, v.hidden_size, grid, t.hidden_size
        )
        if isinstance(t, MM1MoeConfig):
            self.language_model = MM1MoeForCausalLM(t)
        else:
            self.language_model = AutoModelForCausalLM.from_config(t)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # the weights come from the checkpoint

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(crops, 3, H, W) -> (crops, Q, hidden): the last kept encoder layer, CLS dropped."""
        out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[-1]
        return self.connector(feats[:, 1:] if self.config.drop_cls else feats)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        embeds = self.get_input_embeddings()(input_ids)
        slots = input_ids == self.config.image_token_id
        if pixel_values is None:
            if slots.any():
                raise ValueError("input_ids hold image slots but no pixel_values were given")
            return embeds
        feats = self.image_features(pixel_values.to(embeds.dtype)).reshape(-1, embeds.shape[-1])
        if int(slots.sum()) != feats.shape[0]:
            raise ValueError(f"{int(slots.sum())} image slots but {feats.shape[0]} image tokens")
        return embeds.masked_scatter(slots[..., None], feats.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        embeds = self.embed(input_ids, pixel_values)
        return self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The prompt then the new tokens, as transformers' `generate` returns them."""
        embeds = self.embed(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        new = self.language_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, **kwargs
        )
        return torch.cat([input_ids, new], dim=1)
