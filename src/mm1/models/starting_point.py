"""Starting weights (`train.init`): which directory each part of the model comes from, what
kind of directory it is, and its weights read through the transform chain
(`mm1.models.state_transforms`) into the model's shapes."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mm1.checkpoint import (
    encoder_objective,
    is_checkpoint,
    is_export,
    is_run,
    latest_checkpoint,
    read_meta,
    read_model_weights,
    saved_run_kind,
)
from mm1.config import INIT_PARTS, ConfigError, InitConfig, ModelConfig, to_dict
from mm1.models.family import family_spec, shares_image_parts
from mm1.models.state_transforms import HFPart, LoadContext, apply_chain
from mm1.models.upcycle import UpcycleOptions

log = logging.getLogger(__name__)

HF_PARTS = ("vision", "decoder")  # parts an HF checkpoint can give


@dataclass(frozen=True)
class Source:
    """One directory the model starts from, and the parts it gives."""

    path: str
    parts: tuple[str, ...]
    key: str  # the config key(s) that named it (train.init.weights / train.init.<part>)

    @property
    def kind(self) -> str:
        """hf | llava | fuyu | run | checkpoint | export (llava / fuyu: a transformers LLaVA /
        LLaVA-NeXT / FuyuForCausalLM directory, which gives every part)"""
        return source_kind(self.path, self.key)


def source_kind(path: str | os.PathLike[str], key: str) -> str:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{key}={path} does not exist")
    if is_export(p):
        return "export"
    if is_run(p):
        return "run"
    if is_checkpoint(p):
        return "checkpoint"
    if (p / "config.json").is_file():
        from mm1.models.hf.fuyu import is_fuyu_config
        from mm1.models.hf.llava import is_llava_config

        try:
            return "llava" if is_llava_config(p) else "fuyu" if is_fuyu_config(p) else "hf"
        except ValueError as err:  # config.json unreadable: its error names the file
            raise ConfigError(f"{key}={path}: {err}") from None
    raise ConfigError(
        f"{key}={path}: not an mm1 run directory, checkpoint (RUN/checkpoints/step_N) or export, "
        "nor an HF checkpoint directory"
    )


def with_deprecated(model: ModelConfig, init: InitConfig | None) -> InitConfig:
    """`init`, or one made of the deprecated `model.vision.init` / `model.decoder.init` for
    callers that build from a ModelConfig alone (`mm1.config.apply_deprecated_keys` maps them in
    a loaded config)."""
    out = InitConfig() if init is None else InitConfig(**vars(init))
    for part in HF_PARTS:
        old = getattr(model, part).init
        if old and getattr(out, part) is None:
            setattr(out, part, old)
    return out


def sources(init: InitConfig) -> list[Source]:
    """The directories to read, each once, with the parts it gives (a part's own key wins over
    `weights`). An HF checkpoint of a part other than vision / decoder is refused."""
    by_path: dict[str, list[str]] = {}
    keys: dict[str, list[str]] = {}
    for part in INIT_PARTS:
        own = getattr(init, part)
        path = own or init.weights
        if path is None:
            continue
        key = f"train.init.{part}" if own else "train.init.weights"
        by_path.setdefault(path, []).append(part)
        if key not in keys.setdefault(path, []):
            keys[path].append(key)  # every key naming it, so an error points at each
    out = [Source(path, tuple(ps), " / ".join(keys[path])) for path, ps in by_path.items()]
    for s in out:
        if s.kind in ("run", "checkpoint") and s.parts != ("vision",):
            _refuse_encoder_run(s)
        if s.kind == "fuyu" and s.parts != INIT_PARTS:
            raise ConfigError(
                f"{s.key}={s.path} is a FuyuForCausalLM checkpoint: it starts the whole model "
                "(its architecture included) as train.init.weights, with no other train.init key"
            )
        if s.kind == "hf":
            if s.parts == ("vision", "connector", "decoder") or len(s.parts) != 1:
                _refuse_unread_model_type(s)
                raise ConfigError(
                    f"{s.key}={s.path} is an HF checkpoint: it can start one part, so name it "
                    "as train.init.vision or train.init.decoder"
                )
            if s.parts[0] not in HF_PARTS:
                raise ConfigError(
                    f"{s.key}={s.path} is an HF checkpoint; the connector starts from an mm1 "
                    "run or export"
                )
    return out


def _refuse_encoder_run(s: Source) -> None:
    """An image-encoder run (`mm1 train-encoder`) gives an encoder only: named for more, its
    weights would fail as missing connector and decoder keys, after the model was built."""
    if saved_run_kind(s.path) == "encoder":
        raise ConfigError(
            f"{s.key}={s.path} is an image-encoder run (mm1 train-encoder): use it as "
            "train.init.vision"
        )


def _refuse_unread_model_type(s: Source) -> None:
    """An HF directory of a model type no converter reads (e.g. llava_onevision): saying that
    beats advising to name it as a part it cannot start either."""
    from mm1.models.hf.checkpoint import read_hf_config
    from mm1.models.hf.decoder import DECODER_TYPES
    from mm1.models.hf.llava import LLAVA_ARCHITECTURES
    from mm1.models.hf.vision import TWO_TOWER_TYPES, VISION_TYPES

    read = {
        "train.init.weights": (*LLAVA_ARCHITECTURES, "fuyu"),
        "train.init.vision": (*VISION_TYPES, *TWO_TOWER_TYPES),
        "train.init.decoder": DECODER_TYPES,
    }
    model_type = read_hf_config(s.path).get("model_type")
    if any(model_type in types for types in read.values()):
        return
    listed = "; ".join(f"{', '.join(types)} as {key}" for key, types in read.items())
    raise ConfigError(
        f"{s.key}={s.path} is a {model_type} model, which mm1 does not read (it reads {listed})"
    )


def _check_encoder_objective(s: Source, objective: str, cfg: ModelConfig) -> None:
    """A tokenizer run starts the tokenizer of the family that reads images with one of its
    kind (a VQ run chameleon's, a SEED run seed's), a ViT run (CLIP, AIM) the encoder of any
    other family."""
    tokenizer = family_spec(cfg.family).image_tokenizer
    fits = objective == tokenizer if tokenizer else objective in ("clip", "aim")
    if not fits:
        needs = (
            f"a {tokenizer.upper()} tokenizer run (encoder.objective: {tokenizer})"
            if tokenizer
            else "a ViT run (encoder.objective: clip or aim)"
        )
        raise ConfigError(
            f"{s.key}={s.path} is an encoder run of encoder.objective={objective}, and "
            f"model.family={cfg.family} starts its model.vision from {needs}"
        )


# The sections that shape an image tokenizer of each kind, compared key for key: a
# tokenizer read with other settings would give other codes (or drop its blocks).
_TOKENIZER_SECTIONS = {"vq": ("vq",), "seed": ("vision", "seed")}


def _check_tokenizer_config(
    s: Source, objective: str, saved: ModelConfig, cfg: ModelConfig
) -> None:
    """A tokenizer run is read with the architecture it was trained with."""
    for section in _TOKENIZER_SECTIONS.get(objective, ()):
        theirs, ours = to_dict(getattr(saved, section)), to_dict(getattr(cfg, section))
        for k in sorted(theirs):
            if k != "init" and theirs[k] != ours.get(k):
                raise ConfigError(
                    f"model.{section}.{k}={ours.get(k)!r}, and the tokenizer run "
                    f"{s.key}={s.path} has {theirs[k]!r}: a tokenizer is read as it was trained"
                )


def llava_source(init: InitConfig) -> str | None:
    """The transformers LLaVA directory the model starts from (its architecture, layout
    included, replaces the config's), if `train.init.weights` names one."""
    w = init.weights
    return w if w and source_kind(w, "train.init.weights") == "llava" else None


def fuyu_source(init: InitConfig) -> str | None:
    """The transformers FuyuForCausalLM directory the model starts from (its architecture
    replaces the config's: `model.family: fuyu`), if `train.init.weights` names one."""
    w = init.weights
    return w if w and source_kind(w, "train.init.weights") == "fuyu" else None


def hf_source(init: InitConfig, part: str) -> str | None:
    """The HF checkpoint directory `part` starts from (its architecture replaces the config's)."""
    own = getattr(init, part)
    return own if own and source_kind(own, f"train.init.{part}") == "hf" else None


def describe(init: InitConfig) -> list[dict[str, Any]]:
    """Where a run starts, for its record: each source's resolved path, kind, step and parts."""
    out = []
    for s in sources(init):
        kind = s.kind
        path = Path(s.path).resolve()
        step = None
        if kind == "run":
            ckpt = latest_checkpoint(path)
            if ckpt is None:
                raise FileNotFoundError(f"{s.key}={s.path} has no complete checkpoint")
            path, step = ckpt, int(read_meta(ckpt)["step"])
        elif kind == "checkpoint":
            step = int(read_meta(path)["step"])
        out.append({"path": str(path), "kind": kind, "step": step, "parts": list(s.parts)})
    return out


def expected_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """The model's state-dict shapes, a tied parameter under its first name only; not LoRA's
    adapters, which start fresh (`mm1.models.lora`)."""
    out: dict[str, torch.Size] = {}
    seen: set[int] = set()
    for k, t in model.state_dict(keep_vars=True).items():
        if ".lora." in k:
            continue
        if id(t) not in seen:
            seen.add(id(t))
            out[k] = t.shape
    return out


def starting_state(
    init: InitConfig,
    cfg: ModelConfig,
    expected: dict[str, torch.Size],
    new_token_ids: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The starting weights of every part `init` names, shaped for a model of (resolved) `cfg`
    whose parameter shapes are `expected`. `new_token_ids` (the tokenizer's `added_ids`: tokens
    new to an HF tokenizer) start at the mean embedding row. A whole LLaVA / Fuyu directory's
    floating weights are copied out of its files in `dtype` (fp32 for training; the dtype an
    inference model runs in, so a bf16 checkpoint is never held as an fp32 copy)."""
    from mm1.fs import DamagedFile

    state: dict[str, torch.Tensor] = {}
    for s in sources(init):
        try:
            raw, ctx_kw = _read_source(s, cfg, expected, new_token_ids, dtype)
        except DamagedFile as err:  # a truncated or corrupt file: name the option
            raise ConfigError(f"{s.key}={s.path}: {err}") from None
        ctx = LoadContext(
            source=s.path,
            parts=s.parts,
            expected=expected,
            cls_token=cfg.vision.cls_token,
            model=cfg,
            upcycle=UpcycleOptions(init.upcycle_noise, init.upcycle_seed),
            **ctx_kw,
        )
        try:
            state.update(apply_chain(dict(raw), ctx))
        except ValueError as err:  # the starting point does not fit the configured model
            raise ConfigError(f"{s.key}: {err}") from None
        log.info("%s from %s%s", ", ".join(s.parts), s.path, "".join(f"; {n}" for n in ctx.notes))
    return state


def _read_source(
    s: Source,
    cfg: ModelConfig,
    expected: dict[str, torch.Size],
    new_token_ids: Sequence[int],
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A source's weights as read (before the transform chain), and what its LoadContext adds."""
    from mm1.models import hf  # deferred: only needed with HF starting points

    ctx_kw: dict[str, Any] = {}
    if s.kind == "hf":
        part = s.parts[0]
        if part == "vision":
            variant, raw = hf.vision_hf_state(s.path)
            depth = 1 + max(
                (int(k.split(".")[2]) for k in expected if k.startswith("vision.blocks.")),
                default=-1,
            )
            ctx_kw["hf"] = HFPart(part, hf.KEY_MAPS[variant], hf.vision_ignored(depth))
        else:
            raw = hf.decoder_hf_state(s.path)
            ignore = hf.decoder_ignored(cfg.decoder)
            ctx_kw["hf"] = HFPart(part, hf.KEY_MAPS["decoder"], ignore)
            ctx_kw["new_token_ids"] = tuple(new_token_ids)
    elif s.kind in ("llava", "fuyu"):
        from mm1.models.hf.fuyu import fuyu_state_to_ours
        from mm1.models.hf.llava import llava_state_to_ours

        read = hf.load_hf_state_dict(s.path)
        if s.kind == "fuyu":
            raw = fuyu_state_to_ours(s.path, read)
        else:
            raw = llava_state_to_ours(read, cfg)
        raw = {
            k: v.to(dtype if v.is_floating_point() else v.dtype, copy=True) for k, v in raw.items()
        }
        ctx_kw["new_token_ids"] = tuple(new_token_ids)
    else:
        saved = read_model_weights(s.path)
        image_parts = [p for p in s.parts if p != "decoder"]
        objective = encoder_objective(s.path)
        if objective is not None:  # an encoder run: what it trained decides, not its family
            _check_encoder_objective(s, objective, cfg)
            _check_tokenizer_config(s, objective, saved.config, cfg)
        elif image_parts and not shares_image_parts(saved.config.family, cfg.family):
            raise ConfigError(
                f"{s.key}={s.path} is a model.family={saved.config.family} model and this one "
                f"is {cfg.family}: only a decoder carries over from one family to another "
                f"(train.init.decoder={s.path})"
            )
        raw = saved.state
    return raw, ctx_kw
