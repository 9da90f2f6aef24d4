"""Optimizer and learning-rate schedule of the MM1 recipe."""

from __future__ import annotations

import math

import torch
from torch import nn

from mm1.config import OptimConfig, TrainConfig
from mm1.models.summary import Trained


def mm1_peak_lr(num_params: int) -> float:
    """MM1's peak learning rate for a decoder of `num_params` parameters:
    exp(-0.4214 ln N - 0.5535), fit on 9M..1.2B models (≈5.8e-5 at 3B, 2.2e-5 at 30B)."""
    if num_params <= 0:
        raise ValueError(f"num_params={num_params} must be positive")
    return math.exp(-0.4214 * math.log(num_params) - 0.5535)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_trainable(model: nn.Module, t: TrainConfig) -> None:
    """Which parts of an MM1 model train (`train.train_vision` / `train_connector` /
    `train_decoder`); a frozen image tokenizer never does, and with LoRA (`train.lora.rank`)
    only the decoder's adapters do."""
    from mm1.models.family import family_of
    from mm1.models.lora import LoRAAdapter

    model.vision.requires_grad_(t.train_vision and not family_of(model).image_tokenizer)
    model.connector.requires_grad_(t.train_connector)
    model.decoder.requires_grad_(t.train_decoder and not t.lora.rank)
    for adapter in (m for m in model.decoder.modules() if isinstance(m, LoRAAdapter)):
        adapter.requires_grad_(True)


def trained_parts(model: nn.Module, t: TrainConfig) -> Trained:
    """What `set_trainable` trains, as training FLOPs count it (`ModelSummary.flops_per_token`)."""
    from mm1.models.lora import LoRAAdapter

    adapters = sum(
        p.numel()
        for m in model.decoder.modules()
        if isinstance(m, LoRAAdapter)
        for p in m.parameters()
    )
    return Trained(
        vision=t.train_vision,
        connector=t.train_connector,
        decoder=t.train_decoder and not t.lora.rank,
        adapters=adapters,
    )


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, vision_lr_mult: float = 1.0
) -> list[dict]:
    """AdamW groups: matrices decay, norms / biases / 1-d tensors do not; the vision encoder's
    parameters get `vision_lr_mult` x the learning rate. Frozen parameters are left out."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "pos_embed" not in name and "cls_token" not in name
        vision = name.startswith("vision.") or ".vision." in name
        groups.setdefault((decay, vision), []).append(p)
    out = []
    for (decay, vision), params in sorted(groups.items()):
        mult = vision_lr_mult if vision else 1.0
        out.append(
            {
                "params": params,
                "weight_decay": weight_decay if decay else 0.0,
                "lr": lr * mult,
                "lr_mult": mult,
            }
        )
    return out


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, peak_lr: float, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with decoupled weight decay: torch multiplies `weight_decay` by the scheduled lr,
    so weight_decay=0.1 shrinks weights by (1 - 0.1 * lr_t) per step, MM1's λ = 0.1·η."""
    groups = param_groups(model, peak_lr, cfg.weight_decay, cfg.vision_lr_mult)
    if not groups:
        raise ValueError("no trainable parameters: check train.train_vision/connector/decoder")
    # On GPUs the fused kernel: the first H200 run measured the foreach AdamW at ~7x its
    # memory-traffic floor (docs/benchmarks.md section 5). The CPU keeps foreach (same numbers
    # as before on CPU runs).
    fused = all(p.is_cuda for g in groups for p in g["params"])
    opt = torch.optim.AdamW(
        groups, lr=peak_lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )
    return opt, sched


# The settings a resume takes from the config rather than from the checkpoint.
HYPERPARAMETERS = ("lr_mult", "weight_decay", "betas", "eps")
# Their names in `train.optim`, where a group's differs.
CONFIG_NAMES = {"lr_mult": "vision_lr_mult"}


def hyperparameters(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR
) -> list[dict]:
    """Each parameter group's settings as the config gives them (read before a resume)."""
    return [
        {"base_lr": base, **{k: g[k] for k in HYPERPARAMETERS if k in g}}
        for g, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True)
    ]


def reapply_hyperparameters(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    settings: list[dict],
) -> list[str]:
    """Put the config's settings (`hyperparameters`, read before the checkpoint loaded) back
    into a resumed optimizer and schedule: loading restores the saved ones, so a changed
    `train.optim.lr` (or weight decay, betas, eps, vision multiplier) would be written into the
    run's config yet not used. The lr of the coming step is recomputed at the resumed step, the
    same arithmetic the schedule uses, so an unchanged run resumes bit for bit. Returns what
    changed, e.g. ["lr 0.001 -> 0.01"]."""
    changes: dict[str, str] = {}
    for i, (group, want) in enumerate(zip(optimizer.param_groups, settings, strict=True)):
        # The peak lr as the config gives it: a vision group's base is scaled by its multiplier.
        saved_peak = _peak(scheduler.base_lrs[i], group.get("lr_mult"))
        want_peak = _peak(want["base_lr"], want.get("lr_mult"))
        if (
            saved_peak is not None
            and want_peak is not None
            and not math.isclose(saved_peak, want_peak, rel_tol=1e-9)
        ):
            changes.setdefault("lr", f"lr {saved_peak:g} -> {want_peak:g}")
        for key in HYPERPARAMETERS:
            if key not in want:
                continue
            saved = group.get(key)
            if saved is not None and _plain(saved) != _plain(want[key]) and key not in changes:
                name = CONFIG_NAMES.get(key, key)
                changes[key] = f"{name} {_plain(saved)} -> {_plain(want[key])}"
            group[key] = want[key]
        scheduler.base_lrs[i] = group["initial_lr"] = want["base_lr"]
        group["lr"] = want["base_lr"] * scheduler.lr_lambdas[i](scheduler.last_epoch)
    return list(changes.values())


def _peak(base_lr: float, mult: object) -> float | None:
    """A group's peak lr before its multiplier (None when a zero multiplier hides it)."""
    m = 1.0 if mult is None else float(mult)  # type: ignore[arg-type]
    return base_lr / m if m else None


def _plain(value: object) -> object:
    """Betas come back from a checkpoint as a list or a tuple: compare them as lists."""
    return list(value) if isinstance(value, (list, tuple)) else value
