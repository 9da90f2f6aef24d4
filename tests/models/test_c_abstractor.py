"""The C-Abstractor against a pure-torch reference of Honeybee's as it runs.

The reference below was written from reading Honeybee's `projectors.py` (CAbstractor) and the
timm 0.9.8 it pins (regnet.Bottleneck / RegStage, ConvNormAct, get_norm_act_layer, SEModule,
make_divisible), keeping their module layout and names so the weight mapping is explicit:

- the prenorm is timm `LayerNorm`: eps 1e-6;
- every block norm goes through `ConvNormAct`, whose `get_norm_act_layer` turns `LayerNorm2d`
  into `LayerNormAct2d`, built with its own default eps 1e-5;
- SE width `int(round(0.25 * in_chs))`; when 0, SEModule's `make_divisible(C / 16, 8,
  round_limit=0)` over the block's C = out channels;
- the positional embedding covers the CLS token too; the CLS token is dropped after it is added.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mm1.models.connectors import CAbstractorConfig, build_connector, se_width


class RefLayerNormAct2d(nn.LayerNorm):
    """timm's LayerNormAct2d: channel LayerNorm over NCHW, default eps 1e-5, then an activation."""

    def __init__(self, channels: int, apply_act: bool) -> None:
        super().__init__(channels, eps=1e-5)
        self.act = nn.SiLU() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, 1e-5)
        return self.act(y.permute(0, 3, 1, 2))


class RefConvNormAct(nn.Module):
    def __init__(
        self, cin: int, cout: int, k: int, groups: int = 1, apply_act: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)
        self.bn = RefLayerNormAct2d(cout, apply_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def ref_make_divisible(v: float, divisor: int = 8, round_limit: float = 0.0) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


class RefSE(nn.Module):
    def __init__(self, channels: int, rd: int) -> None:
        super().__init__()
        rd = rd or ref_make_divisible(channels / 16, 8, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd, 1)
        self.fc2 = nn.Conv2d(rd, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()


class RefBottleneck(nn.Module):
    """timm RegNet Bottleneck, stride 1, bottle_ratio 1, group_size 1, se_ratio 0.25, SiLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = RefConvNormAct(cin, cout, 1)
        self.conv2 = RefConvNormAct(cout, cout, 3, groups=cout)
        self.se = RefSE(cout, round(cin * 0.25))
        self.conv3 = RefConvNormAct(cout, cout, 1, apply_act=False)
        self.downsample = nn.Identity() if cin == cout else RefConvNormAct(cin, cout, 1, 1, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return F.silu(y + self.downsample(x))


class RefCAbstractor(nn.Module):
    def __init__(self, dv: int, n_patches: int, hidden: int, depth: int, q: int, out: int) -> None:
        super().__init__()
        self.prenorm = nn.LayerNorm(dv, eps=1e-6)
        self.pos_emb = nn.Parameter(torch.randn(1, n_patches + 1, dv) * 0.02)

        def stage(cin: int) -> nn.Sequential:
            blocks = OrderedDict(
                (f"b{i + 1}", RefBottleneck(cin if i == 0 else hidden, hidden))
                for i in range(depth)
            )
            return nn.Sequential(blocks)

        side = int(q**0.5)
        self.net = nn.Sequential(stage(dv), nn.AdaptiveAvgPool2d((side, side)), stage(hidden))
        self.readout = nn.Sequential(nn.Linear(hidden, out), nn.SiLU(), nn.Linear(out, out))

    def forward(self, x_with_cls: torch.Tensor) -> torch.Tensor:
        x = self.prenorm(x_with_cls) + self.pos_emb
        x = x[:, 1:]
        b, n, d = x.shape
        hw = int(n**0.5)
        x = x.transpose(1, 2).reshape(b, d, hw, hw)
        x = self.net(x).flatten(2).transpose(1, 2)
        return self.readout(x)


def _ours_from_ref(ref: RefCAbstractor, depth: int) -> dict[str, torch.Tensor]:
    """The reference's weights under our parameter names."""
    sd = ref.state_dict()
    out = {
        "norm.weight": sd["prenorm.weight"],
        "norm.bias": sd["prenorm.bias"],
        "pos_embed": sd["pos_emb"][:, 1:],
    }
    for k in ("0.weight", "0.bias", "2.weight", "2.bias"):
        out[f"readout.{k}"] = sd[f"readout.{k}"]
    for ours, theirs in (("s1", "net.0"), ("s2", "net.2")):
        for i in range(depth):
            a, b = f"{ours}.{i}", f"{theirs}.b{i + 1}"
            for conv in ("conv1", "conv2", "conv3"):
                out[f"{a}.{conv}.0.weight"] = sd[f"{b}.{conv}.conv.weight"]
                out[f"{a}.{conv}.1.weight"] = sd[f"{b}.{conv}.bn.weight"]
                out[f"{a}.{conv}.1.bias"] = sd[f"{b}.{conv}.bn.bias"]
            for fc in ("fc1", "fc2"):
                for p in ("weight", "bias"):
                    out[f"{a}.se.{fc}.{p}"] = sd[f"{b}.se.{fc}.{p}"]
            if f"{b}.downsample.conv.weight" in sd:
                out[f"{a}.shortcut.0.weight"] = sd[f"{b}.downsample.conv.weight"]
                out[f"{a}.shortcut.1.weight"] = sd[f"{b}.downsample.bn.weight"]
                out[f"{a}.shortcut.1.bias"] = sd[f"{b}.downsample.bn.bias"]
    return out


@pytest.mark.parametrize(
    ("dv", "grid", "hidden", "depth", "q"),
    [
        (16, 4, 24, 2, 4),  # projecting shortcut in s1, identity after
        (24, 6, 24, 1, 9),  # identity shortcuts throughout
        (2, 4, 40, 1, 4),  # round(0.25 * 2) = 0: timm's SE width fallback (8)
        (1, 4, 136, 2, 4),  # fallback over 136 channels: make_divisible(8.5, 8) = 8
        (2, 4, 200, 1, 4),  # fallback over 200 channels: make_divisible(12.5, 8) = 16
    ],
)
def test_c_abstractor_equals_honeybee_reference(
    dv: int, grid: int, hidden: int, depth: int, q: int
) -> None:
    torch.manual_seed(0)
    ref = RefCAbstractor(dv, grid * grid, hidden, depth, q, 20).double()
    with torch.no_grad():  # non-trivial affine norms, so each norm's parameters matter
        for m in ref.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    cfg = CAbstractorConfig(
        type="c_abstractor", num_tokens=q, hidden=hidden, depth=depth, layer_norm=True
    )
    ours = build_connector(cfg, dv, grid, 20).double()
    ours.load_state_dict(_ours_from_ref(ref, depth), strict=True)  # same shapes, every tensor

    # small-variance features, as a ViT's are after its norm: the epsilons matter
    x = torch.randn(3, grid * grid + 1, dv, dtype=torch.float64) * 0.05
    with torch.no_grad():
        expected, got = ref(x), ours(x[:, 1:])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_se_width_follows_timm() -> None:
    assert se_width(16, 24) == 4 and se_width(6, 6) == 2  # round(1.5) = 2
    assert se_width(10, 10) == 2  # Python rounds 2.5 to even, as timm's int(round(...))
    assert se_width(2, 40) == 8 and se_width(1, 136) == 8 and se_width(2, 200) == 16
    assert se_width(2, 1024) == 64  # make_divisible(64, 8)


def test_block_norms_use_timm_norm_act_eps() -> None:
    cfg = CAbstractorConfig(type="c_abstractor", num_tokens=4, hidden=24, depth=2, layer_norm=True)
    m = build_connector(cfg, 16, 4, 40)
    block_norms = [x for x in m.modules() if type(x).__name__ == "LayerNorm2d"]
    assert len(block_norms) == 4 * 3 + 1  # conv1..3 per block, one projecting shortcut
    assert all(x.eps == 1e-5 for x in block_norms)
    assert m.norm.eps == 1e-6
