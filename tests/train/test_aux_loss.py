"""The aux-loss path: an FFN that emits an auxiliary loss (registered in this test only) gets it
into MM1Output, the step's backpropagated loss and the log; a dense model logs nothing new.
Active parameters (what acts on each token) drive the learning-rate law and the FLOPs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mm1.config import ConfigError, DecoderConfig, load_config
from mm1.models.decoder import SwiGLU, SwiGLUConfig
from mm1.models.mllm import MM1
from mm1.models.summary import active_parameters, summarize
from mm1.registry import FFNS
from mm1.train.logging import read_metrics
from mm1.train.optim import mm1_peak_lr
from mm1.train.trainer import Trainer


@dataclasses.dataclass
class ProbeConfig(SwiGLUConfig):
    type: str = "test_probe"


class ProbeFFN(SwiGLU):
    """SwiGLU (same parameters, same initialisation) that also reports the mean square of its
    output as the aux loss `probe`, and declares its gate idle per token (as unchosen experts
    would be)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = super().forward(x)
        return out, {"probe": out.float().pow(2).mean()}

    def inactive_parameters(self) -> int:
        return self.gate_proj.weight.numel()


@pytest.fixture(scope="module")
def probe_ffn() -> Iterator[None]:
    FFNS.register("test_probe", ProbeConfig)(lambda cfg, layer: ProbeFFN(cfg))
    try:
        yield
    finally:
        FFNS.unregister("test_probe")


TINY = [
    "model.vision.image_size=32",
    "model.vision.patch_size=8",
    "model.vision.width=32",
    "model.vision.layers=1",
    "model.vision.heads=2",
    "model.vision.mlp_dim=64",
    "model.connector.type=avgpool",
    "model.connector.num_tokens=4",
    "model.decoder.dim=32",
    "model.decoder.layers=2",
    "model.decoder.heads=4",
    "model.decoder.kv_heads=2",
    "model.decoder.ffn_dim=64",
    "data.seq_len=64",
    "data.num_workers=0",
    "train.steps=2",
    "train.batch_size=4",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "train.val_every=0",
    "train.save_every=2",
    "train.parallel=none",
    "train.tensorboard=false",
    "train.progress=false",
    "train.optim.lr=0.003",
    "train.optim.warmup_steps=1",
]


def _train(tmp: Path, world: Path, name: str, *extra: str) -> tuple[Trainer, list[dict]]:
    run = tmp / name
    cfg = load_config(None, [*TINY, f"data.world={world}", f"train.run_dir={run}", *extra])
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer, [r for r in read_metrics(run) if "loss" in r]


def test_an_aux_loss_reaches_the_step_loss_and_the_log(tmp_path, world, probe_ffn) -> None:
    _, dense = _train(tmp_path, world, "dense")
    probe = ["model.decoder.ffn.type=test_probe"]
    _, off = _train(tmp_path, world, "off", *probe, "train.aux_loss_weights={probe: 0.0}")
    _, on = _train(tmp_path, world, "on", *probe, "train.aux_loss_weights={probe: 10.0}")

    # a dense model logs nothing new
    assert not any(k.startswith("aux_loss") or k == "loss_total" for r in dense for k in r)
    # the same parameters at weight 0: the very losses of the dense model
    assert [r["loss"] for r in off] == [r["loss"] for r in dense]
    for r in on:
        assert r["aux_loss_probe"] > 0
        assert r["loss_total"] == pytest.approx(r["loss"] + 10.0 * r["aux_loss_probe"])
    # same first forward; the weighted aux loss's gradient changed the update
    assert on[0]["loss"] == off[0]["loss"] and on[0]["aux_loss_probe"] == off[0]["aux_loss_probe"]
    assert on[0]["grad_norm"] != off[0]["grad_norm"]
    assert on[1]["loss"] != off[1]["loss"]
    assert on[1]["aux_loss_probe"] < off[1]["aux_loss_probe"]  # trained down

    with pytest.raises(ConfigError, match=r"train\.aux_loss_weights\.probe is not set"):
        _train(tmp_path, world, "unweighted", *probe)
    # a weight for a loss the model does not emit is a typo (the one meant kept its default);
    # the built-in names, unused here, are not
    typo = "train.aux_loss_weights={probe: 1.0, prbe: 0.5}"
    with pytest.raises(ConfigError, match=r"aux_loss_weights\.prbe: the model emits no .*probe"):
        _train(tmp_path, world, "typo", *probe, typo)
    for bad in ("inf", "nan", "-1"):
        with pytest.raises(
            ConfigError, match=rf"router_z={bad}(\.0)? must be a finite number >= 0"
        ):
            load_config(None, [f"train.aux_loss_weights.router_z={bad}"])


def test_aux_losses_are_normalised_like_the_cross_entropy(probe_ffn) -> None:
    """Summed over micro-batches, each scaled by its share of the step's label tokens, the aux
    losses equal the full batch's when the halves are alike (so accumulation changes nothing)."""
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=64, dim=32, layers=2, heads=4, kv_heads=2, ffn_dim=64)
    cfg.ffn = {"type": "test_probe"}
    model = MM1(dataclasses.replace(load_config(None, TINY).model, decoder=cfg))
    ids = torch.randint(1, 60, (4, 12), generator=torch.Generator().manual_seed(0))
    full = model(ids, labels=ids)
    total = 4 * 12
    halves = [model(ids[i : i + 2], labels=ids[i : i + 2], num_label_tokens=total) for i in (0, 2)]
    assert set(full.aux_losses) == {"probe"}
    summed = sum(h.aux_losses["probe"] for h in halves)
    torch.testing.assert_close(summed, full.aux_losses["probe"])
    # the per-block losses are summed over the blocks
    hidden = model.decoder.embed(ids)
    parts: dict[str, torch.Tensor] = {}
    model.decoder(inputs_embeds=hidden, aux_losses=parts)
    torch.testing.assert_close(parts["probe"], full.aux_losses["probe"])
    assert parts["probe"] > 0


def test_the_output_z_loss_is_log_z_squared_and_trains_it_down(tmp_path, world) -> None:
    """`train.z_loss`: log(Z)^2 of the head's softmax at each label token (PaLM's z-loss, which
    Chameleon trains with), normalised like the cross-entropy; off, nothing is computed."""
    torch.manual_seed(0)
    model = MM1(load_config(None, TINY).model).eval()
    ids = torch.randint(1, 60, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(12) < 3, -100)  # a prompt carries no target
    out = model(ids, labels=labels, z_loss=True, return_logits=True)
    log_z = torch.logsumexp(out.logits.float(), dim=-1)[labels != -100]
    torch.testing.assert_close(out.aux_losses["logit_z"], log_z.square().mean())
    total = int((labels != -100).sum())
    halves = [
        model(ids[i : i + 2], labels=labels[i : i + 2], num_label_tokens=total, z_loss=True)
        for i in (0, 2)
    ]
    torch.testing.assert_close(sum(h.aux_losses["logit_z"] for h in halves), log_z.square().mean())
    assert "logit_z" not in model(ids, labels=labels).aux_losses

    _, off = _train(tmp_path, world, "z_off")
    _, on = _train(tmp_path, world, "z_on", "train.z_loss=1.0")
    assert not any(k.startswith("aux_loss") for r in off for k in r)
    # the same first forward (the cross-entropy then comes from the shared log-softmax)
    assert on[0]["loss"] == pytest.approx(off[0]["loss"], rel=1e-6)
    for r in on:
        assert r["loss_total"] == pytest.approx(r["loss"] + r["aux_loss_logit_z"])
    assert on[1]["aux_loss_logit_z"] < on[0]["aux_loss_logit_z"]  # trained down
    assert on[1]["loss"] != off[1]["loss"]
    with pytest.raises(ConfigError, match=r"train\.z_loss=-1(\.0)? must be a finite number"):
        load_config(None, ["train.z_loss=-1"])
    with pytest.raises(ConfigError, match=r"aux_loss_weights\.logit_z: .* train\.z_loss"):
        load_config(None, ["train.aux_loss_weights.logit_z=0.1"])


def test_active_parameters_drive_the_lr_law_and_the_flops(tmp_path, world, probe_ffn) -> None:
    dense_cfg = load_config(None, TINY).model
    probe_cfg = load_config(None, [*TINY, "model.decoder.ffn=test_probe"]).model
    dense, probe = summarize(dense_cfg), summarize(probe_cfg)
    assert dense.active == dense.decoder  # identical for a dense model
    idle = 2 * 32 * 64  # two blocks' gate projections
    assert probe.decoder == dense.decoder and probe.active == dense.decoder - idle
    assert probe.decoder_flops_per_token == dense.decoder_flops_per_token - 6 * idle

    law = ["model.decoder.ffn=test_probe", "train.optim.lr=0", "train.aux_loss_weights={probe: 0}"]
    trainer, _ = _train(tmp_path, world, "law", *law)
    assert trainer.num_decoder_params == active_parameters(trainer.raw_model.decoder)
    assert trainer.peak_lr == mm1_peak_lr(trainer.num_decoder_params)
    assert trainer.num_decoder_params < sum(
        p.numel() for p in trainer.raw_model.decoder.parameters()
    )
