"""`mm1 upcycle`: a dense run or export -> an exported MoE model (sparse upcycling).

The MoE model is the dense one with `model.decoder.ffn` switched to `moe`; its weights come
through the same starting-weights chain as `train.init` (`mm1.models.upcycle`), so the export
equals the dense model at initialisation and starts `mm1 train` like any export.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
from pathlib import Path

import torch

from mm1.config import ConfigError, validate_model
from mm1.models.build import assign_weights
from mm1.models.family import family_spec
from mm1.models.moe import MoEConfig
from mm1.models.starting_point import expected_shapes
from mm1.models.state_transforms import LoadContext, apply_chain
from mm1.models.upcycle import UpcycleOptions
from mm1.pretrained import check_output_dir, load_pretrained, save_pretrained


def _check_room(out: str | Path, size: int, experts: int) -> None:
    """Refuse, before the experts are made, an export larger than the memory it is built in or
    the disk it is written to (an extra zero in --experts: an allocator traceback, or a disk
    filled)."""
    where = Path(out).absolute()
    while not where.exists():
        where = where.parent
    room = {"disk": shutil.disk_usage(where).free}
    with contextlib.suppress(OSError, ValueError, StopIteration):  # Linux's: elsewhere unchecked
        lines = Path("/proc/meminfo").read_text().splitlines()
        available = next(x for x in lines if x.startswith("MemAvailable:"))
        room["memory"] = int(available.split()[1]) * 1024  # reclaimable cache included
    for what, free in room.items():
        if size > free:
            raise ConfigError(
                f"--experts={experts}: the MoE export takes about {_size(size)}, more than the "
                f"{_size(free)} of free {what}" + (f" at {where}" if what == "disk" else "")
            )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def upcycle(
    source: str | Path,
    out: str | Path,
    experts: int,
    every: int = 1,
    top_k: int = 2,
    noise: float = 0.0,
    seed: int = 0,
) -> Path:
    """Write to `out` the MoE export of the dense run / export `source`: `experts` experts in
    the decoder layers i with (i + 1) % every == 0, top-`top_k` routing renormalised."""
    if experts < 2:
        raise ConfigError(f"--experts={experts} must be >= 2")
    if not 1 <= top_k <= experts:
        raise ConfigError(f"--top-k={top_k} must be in 1..--experts={experts}")
    if not (math.isfinite(noise) and noise >= 0):  # nan or inf would fill the experts with nan
        raise ConfigError(f"--noise={noise} must be a finite number >= 0")
    check_output_dir(out, "--out", "export", source)  # before the (slow) load
    dense = load_pretrained(source)
    cfg = copy.deepcopy(dense.cfg)
    if isinstance(cfg.decoder.ffn, MoEConfig):
        raise ConfigError(
            f"{source} is already a MoE model (model.decoder.ffn.type=moe, "
            f"{cfg.decoder.ffn.experts} experts): upcycling starts from a dense one"
        )
    if cfg.decoder.ffn_type != "swiglu":
        raise ConfigError(
            f"{source}'s FFN is model.decoder.ffn.type={cfg.decoder.ffn_type} (ungated, "
            "Persimmon's): mm1's experts are SwiGLU, so they cannot start as copies of it"
        )
    if not 1 <= every <= cfg.decoder.layers:
        raise ConfigError(
            f"--every={every} leaves no sparse layer among the decoder's "
            f"{cfg.decoder.layers} layers (1..{cfg.decoder.layers})"
        )
    cfg.decoder.ffn = MoEConfig(experts=experts, top_k=top_k, every=every)
    validate_model(cfg)
    family = family_spec(cfg.family)
    with torch.device("meta"):
        model = family.model(cfg)
    _check_room(out, sum(p.numel() * p.element_size() for p in model.parameters()), experts)
    state = dict(dense.model.state_dict())
    if cfg.decoder.tie_embeddings:
        state.pop("decoder.lm_head.weight", None)  # the embedding, as in exports
    ctx = LoadContext(
        source=str(source),
        parts=("vision", "connector", "decoder"),
        expected=expected_shapes(model),
        cls_token=cfg.vision.cls_token,
        model=cfg,
        upcycle=UpcycleOptions(noise, seed),
    )
    assign_weights(model, apply_chain(state, ctx))
    return save_pretrained(model, dense.tokenizer, dense.processor, out, dense.prompt_format)
