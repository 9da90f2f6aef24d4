"""Checkpoint files and key tables: reading `config.json` and the weights (safetensors or
`pytorch_model.bin`, sharded or not), writing them, and the strict, key-mapped load shared by
the vision and decoder converters."""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mm1.fs import DamagedFile, read_json

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

CONFIG_NAME = "config.json"
# The weight files transformers writes, in the order it prefers them.
WEIGHTS_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def checkpoint_dir(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"HF checkpoint directory not found: {p}")
    return p


def read_hf_config(path_or_dict: PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's config as a dict: from a dict, a directory, or a config.json path."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    p = Path(path_or_dict)
    f = p / CONFIG_NAME if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} at {p}")
    return read_json(f)


def load_hf_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: one safetensors file, a sharded set with its
    index, or the same for pytorch_model.bin."""
    d = checkpoint_dir(path)
    name = next((n for n in WEIGHTS_NAMES if (d / n).is_file()), None)
    if name is None:
        raise FileNotFoundError(f"{d}: no weights file (looked for {', '.join(WEIGHTS_NAMES)})")
    files = [d / name]
    if name.endswith(".index.json"):
        weight_map: dict[str, str] = read_json(files[0])["weight_map"]
        files = [d / shard for shard in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{d / name} lists shards that are missing: {absent}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_weights(f))
    return state


class UnreadableWeights(DamagedFile):
    """A weights file that cannot be read (truncated, corrupt); the message names the file."""


def read_weights(f: Path) -> dict[str, torch.Tensor]:
    if f.suffix == ".safetensors":
        try:
            return load_file(f)
        except SafetensorError as err:  # e.g. a truncated download: "incomplete metadata, ..."
            why = str(err).removeprefix("Error while deserializing header: ")
            raise UnreadableWeights(f"{f} is not a readable safetensors file ({why})") from None
    try:
        # weights_only=True: never unpickle arbitrary objects (or run the code they would carry).
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        why = (str(err).splitlines() or [type(err).__name__])[0]
        raise UnreadableWeights(f"{f} is not a readable PyTorch weights file ({why})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{f} does not hold a flat state dict of tensors")
    return obj


# transformers' default shard size for save_pretrained ("5GB").
MAX_SHARD_BYTES = 5 * 10**9


def write_checkpoint(
    out_dir: PathLike,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """config.json and the weights: one model.safetensors, or above `max_shard_bytes` the
    shards `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` (the layout
    transformers writes and reads; tensors in key order, a shard closed before it would pass
    the limit)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    shards: list[list[str]] = [[]]
    used = 0
    for k in sorted(tensors):
        if shards[-1] and used + sizes[k] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += sizes[k]
    for stale in out.glob("model*.safetensors*"):  # an earlier export's other layout
        stale.unlink()
    # transformers refuses safetensors files whose metadata lacks format=pt.
    if len(shards) == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, keys in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: tensors[k] for k in keys}, out / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def need(d: Mapping[str, Any], key: str, what: str) -> Any:
    if d.get(key) is None:
        raise ValueError(f"{what} has no {key!r}")
    return d[key]


# ---------------------------------------------------------------------------------------------
# Key tables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyMap:
    """Checkpoint key <-> our key for one family: a module prefix (optional when reading, since
    e.g. transformers 4 writes CLIPVisionModel under `vision_model.` and transformers 5 does not),
    then (checkpoint fragment, our fragment) renames; keys in `outside_prefix` have no prefix."""

    prefix: str
    renames: tuple[tuple[str, str], ...] = ()
    outside_prefix: tuple[str, ...] = ()

    def to_ours(self, key: str) -> str:
        key = key.removeprefix(self.prefix)
        for theirs, ours in self.renames:
            key = key.replace(theirs, ours)
        return key

    def to_hf(self, key: str) -> str:
        for theirs, ours in reversed(self.renames):
            key = key.replace(ours, theirs)
        return key if key in self.outside_prefix else self.prefix + key


_VIT_RENAMES = (
    ("embeddings.patch_embedding.", "patch_embed."),
    ("embeddings.position_embedding.weight", "pos_embed"),
    ("encoder.layers.", "blocks."),
    (".mlp.fc1.", ".mlp.0."),
    (".mlp.fc2.", ".mlp.2."),
)

KEY_MAPS: dict[str, KeyMap] = {
    "clip": KeyMap(
        "vision_model.",
        (
            *_VIT_RENAMES,
            ("embeddings.class_embedding", "cls_token"),
            ("pre_layrnorm.", "pre_norm."),  # sic: transformers' spelling
        ),
    ),
    "siglip": KeyMap("vision_model.", _VIT_RENAMES),
    # Our decoder's parameter names are Llama's (Qwen2 and Mistral use the same ones).
    "decoder": KeyMap("model.", outside_prefix=("lm_head.weight",)),
}


def to_our_keys(
    state: Mapping[str, torch.Tensor],
    keymap: KeyMap,
    ignore: Callable[[str], bool],
    source: str,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`state` under our names, without the keys `ignore` leaves out on purpose (listed in a
    debug log); also our key -> checkpoint key, for messages. Two keys mapping to one is an
    error."""
    ours: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    ignored: list[str] = []
    for key, value in state.items():
        k = keymap.to_ours(key)
        if ignore(k):
            ignored.append(key)
            continue
        if k in ours:
            raise ValueError(
                f"{source}: checkpoint keys {names[k]!r} and {key!r} both map to {k!r}"
            )
        ours[k], names[k] = value, key
    if ignored:
        log.debug("%s: left out on purpose: %s", source, ", ".join(sorted(ignored)))
    return ours, names


def load_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    keymap: KeyMap,
    ignore: Callable[[str], bool],
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    dtype: torch.dtype | None,
    source: str,
) -> None:
    """Strictly load `state` (checkpoint keys) into `model` (built on the meta device)."""
    ours, names = to_our_keys(state, keymap, ignore, source)

    # A tied parameter appears under several names; it is expected once, under its first name.
    expected: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            expected[k] = t
    missing = sorted(keymap.to_hf(k) for k in expected.keys() - ours.keys())
    unexpected = sorted(names[k] for k in ours.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{source}: checkpoint does not match the model; missing: {missing or 'none'}; "
            f"unexpected: {unexpected or 'none'}"
        )
    mismatched = []
    for k, v in ours.items():
        # Always a copy: safetensors' load_file maps the file into memory, and a model whose
        # weights alias the checkpoint changes (or crashes) when that file is rewritten.
        cast = dtype if dtype is not None and v.is_floating_point() else v.dtype
        v = v.to(cast, copy=True)
        if k in transforms:
            try:
                v = transforms[k](v)
            except ValueError as err:
                raise ValueError(f"{source}: {names[k]}: {err}") from None
        if v.shape != expected[k].shape:
            mismatched.append(
                f"{names[k]}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            )
        ours[k] = v
    if mismatched:
        raise ValueError(f"{source}: shape mismatch: {'; '.join(mismatched)}")
    # strict=False only so tied aliases may be absent; every other key was checked above.
    model.load_state_dict(ours, strict=False, assign=True)
