"""Tiny run configs the training tests write (the ViT they share, and an image-encoder run's),
what a run logged, by step, and a tiny MM1 model with the logits LoRA's tests compare."""

from __future__ import annotations

from pathlib import Path

import yaml

# A 32 px ViT of one block: the vision tower of every tiny config here.
TINY_VISION = {
    "image_size": 32,
    "patch_size": 8,
    "width": 32,
    "layers": 1,
    "heads": 2,
    "mlp_dim": 64,
}


def tiny_mm1(**decoder: object):
    """A tiny MM1 (the ViT above, 4 pooled image tokens, a 50-token vocabulary whose last id is
    the image's), seeded, in eval mode; `decoder` sets its decoder's shape."""
    import torch

    from mm1.config import model_config_from_dict
    from mm1.models.mllm import MM1

    cfg = model_config_from_dict(
        {
            "vision": TINY_VISION,
            "connector": {"type": "avgpool", "num_tokens": 4},
            "decoder": {"vocab_size": 50, **decoder},
            "image_token_id": 49,
        }
    )
    torch.manual_seed(0)
    return MM1(cfg).eval()


def tiny_mm1_logits(model):
    """`tiny_mm1`'s logits on one fixed image and 12 fixed tokens after it."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.full((4,), 49), torch.randint(0, 49, (12,), generator=g)])[None]
    size = model.cfg.vision.image_size
    with torch.no_grad():
        return model(ids, pixel_values=torch.randn(1, 3, size, size, generator=g)).logits


def encoder_config(tmp: Path, world: Path, objective: str = "clip", **train) -> Path:
    """A tiny image-encoder run config (`mm1 train-encoder`) over a synthetic world; `train`
    options override its `train` section. Written to TMP/OBJECTIVE.yaml; returns the path."""
    cfg = {
        "model": {
            "vision": dict(TINY_VISION),
            "connector": {"type": "avgpool", "num_tokens": 4},  # MM1's, when it reads this ViT
        },
        "data": {"world": str(world), "num_workers": 0},
        "encoder": {
            "objective": objective,
            "text": {"width": 32, "layers": 1, "heads": 2, "mlp_dim": 64, "max_len": 24},
            "clip": {"embed_dim": 16},
            "aim": {"head_dim": 32},
        },
        "train": {
            "run_dir": str(tmp / f"run_{objective}"),
            "steps": 4,
            "batch_size": 8,
            "micro_batch_size": 4,
            "log_every": 1,
            "val_every": 2,
            "val_batches": 1,
            "save_every": 2,
            "parallel": "none",
            "tensorboard": False,
            "progress": False,
            "optim": {"lr": 1e-3, "warmup_steps": 2},
            **train,
        },
    }
    path = tmp / f"{objective}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def logged(run: Path, key: str) -> dict[int, float]:
    """`key`'s value at each step of `run`'s metrics.jsonl that logged it."""
    from mm1.train.logging import read_metrics

    return {r["step"]: r[key] for r in read_metrics(run) if key in r}
