"""AdamW groups, the learning-rate law and schedule, and the settings a resume re-applies
(`mm1.train.optim`), on tiny modules built here. The schedule's shape and weight decay's size
are also checked in test_trainer.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mm1.config import OptimConfig
from mm1.train.optim import (
    build_optimizer,
    hyperparameters,
    lr_factor,
    mm1_peak_lr,
    param_groups,
    reapply_hyperparameters,
)


class Vision(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.randn(1, 3, 4))
        self.proj = nn.Linear(4, 4)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision = Vision()
        self.decoder = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class Wrapped(nn.Module):
    """As a wrapper names them: `model.vision.…`."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Tiny()


def groups_by_name(model: nn.Module, groups: list[dict]) -> dict[str, dict]:
    by_id = {id(p): g for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


def test_mm1_peak_lr_follows_the_fitted_law() -> None:
    """exp(-0.4214 ln N - 0.5535), worked out by hand: ln 1e9 = 20.7233, so the exponent is
    -8.7328 - 0.5535 = -9.2863; ln 1e6 = 13.8155, so -5.8219 - 0.5535 = -6.3754."""
    assert mm1_peak_lr(10**9) == pytest.approx(math.exp(-9.2863), rel=1e-4)  # 9.269e-5
    assert mm1_peak_lr(10**6) == pytest.approx(math.exp(-6.3754), rel=1e-4)  # 1.703e-3
    for bad in (0, -5):
        with pytest.raises(ValueError, match=f"num_params={bad} must be positive"):
            mm1_peak_lr(bad)


def test_the_schedule_stays_at_its_floor_after_the_last_step() -> None:
    for step in (1000, 1001, 1500, 2000):
        assert lr_factor(step, 100, 1000, 0.1) == pytest.approx(0.1)
    # a schedule that is all warmup: at its floor from then on, no division by zero
    assert lr_factor(4, 5, 5, 0.1) == pytest.approx(1.0)
    assert 0.1 <= lr_factor(5, 5, 5, 0.1) <= 1.0
    assert lr_factor(6, 5, 5, 0.1) == lr_factor(9, 5, 5, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("cls", [Tiny, Wrapped])
def test_groups_decay_matrices_only_and_scale_the_vision_lr(cls) -> None:
    model = cls()
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, vision_lr_mult=0.25)
    prefix = "model." if cls is Wrapped else ""
    by_name = groups_by_name(model, groups)
    decays = {name for name, g in by_name.items() if g["weight_decay"] > 0}
    assert decays == {f"{prefix}vision.proj.weight", f"{prefix}decoder.weight"}
    for name, g in by_name.items():
        vision = name.startswith(f"{prefix}vision.")
        assert g["lr_mult"] == (0.25 if vision else 1.0), name
        assert g["lr"] == pytest.approx(1e-3 * g["lr_mult"]), name


def test_the_vision_multiplier_holds_along_the_schedule() -> None:
    model = Tiny()
    cfg = OptimConfig(warmup_steps=2, vision_lr_mult=0.25)
    opt, sched = build_optimizer(model, cfg, 1e-3, 10)
    for step in range(4):
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(1e-3 * g["lr_mult"] * lr_factor(step, 2, 10, 0.1))
        opt.step()
        sched.step()


def test_frozen_parameters_are_left_out_and_none_at_all_is_refused() -> None:
    model = Tiny()
    model.vision.requires_grad_(False)
    names = set(groups_by_name(model, param_groups(model, 1e-3, 0.1)))
    assert names == {"decoder.weight", "decoder.bias", "norm.weight", "norm.bias"}
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig(), 1e-3, 10)


def test_the_optimizer_takes_betas_and_eps_from_the_config() -> None:
    opt, _ = build_optimizer(Tiny(), OptimConfig(betas=[0.8, 0.9], eps=1e-6), 1e-3, 10)
    for g in opt.param_groups:
        assert tuple(g["betas"]) == (0.8, 0.9) and g["eps"] == 1e-6


def _resumed(saved_cfg: OptimConfig, cfg: OptimConfig, lr: float) -> list[str]:
    """Changes reported when a run saved under `saved_cfg` (at lr 1e-3, two steps in) resumes
    with `cfg` at `lr`, as the trainer does: settings read, checkpoint loaded, re-applied. The
    saved betas come back as a list (as a distributed checkpoint stores them)."""
    model = Tiny()
    opt, sched = build_optimizer(model, saved_cfg, 1e-3, 10)
    for _ in range(2):
        opt.step()
        sched.step()
    state, sched_state = opt.state_dict(), sched.state_dict()
    for g in state["param_groups"]:
        g["betas"] = list(g["betas"])
    opt, sched = build_optimizer(model, cfg, lr, 10)
    settings = hyperparameters(opt, sched)
    opt.load_state_dict(state)
    sched.load_state_dict(sched_state)
    changes = reapply_hyperparameters(opt, sched, settings)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(lr * g["lr_mult"] * lr_factor(2, 0, 10, 0.1))
    return changes


def test_a_resume_reports_the_configs_own_changes() -> None:
    cfg = OptimConfig(warmup_steps=0, vision_lr_mult=0.1)
    assert _resumed(cfg, cfg, 1e-3) == []  # betas saved as a list are the same betas
    # the lr as the config gives it, not a vision group's scaled one
    assert _resumed(cfg, cfg, 1e-2) == ["lr 0.001 -> 0.01"]
    # a changed vision multiplier is said by its key, and the peak lr did not change
    other = OptimConfig(warmup_steps=0, vision_lr_mult=0.5)
    assert _resumed(cfg, other, 1e-3) == ["vision_lr_mult 0.1 -> 0.5"]
    assert _resumed(cfg, other, 1e-2) == ["lr 0.001 -> 0.01", "vision_lr_mult 0.1 -> 0.5"]
