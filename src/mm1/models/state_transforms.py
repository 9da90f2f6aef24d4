"""The chain a starting point's weights go through before they fill a model.

A source (an HF checkpoint of one part, or an mm1 run / export) gives a state dict; each
registered transform, in order, maps it closer to the model being built:

1. ``hf_keys``             an HF checkpoint's names -> ours (`mm1.models.hf` key tables), the
                           tensors we leave out on purpose dropped, floats copied to float32;
2. ``parts``               only the parts taken from this source (`train.init`);
   ``vision_depth``        an mm1 source's encoder blocks past the model's feature layer
                           dropped (an encoder pre-trained whole, read at `feature_layer` -2);
3. ``position_embeddings`` the encoder's and the connector's position embeddings interpolated
                           (bicubic) to the model's patch grid (another image size);
4. ``vocabulary``          embedding / head rows resized to the model's vocabulary: new rows,
                           and the rows of tokens new to an HF tokenizer, start at the mean of
                           the trained rows.

5. ``upcycle``            a dense FFN's weights copied into each expert of the model's MoE
                           layer, a small random router beside them (`mm1.models.upcycle`).

Other transforms plug in with `register_state_transform`. `fit_check` ends the chain: a
key missing or left over, or a shape no transform resolved, is a one-line error naming the
first such parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from mm1.config import ModelConfig
from mm1.models.decoder import resize_vocab_rows
from mm1.models.hf.checkpoint import KeyMap, to_our_keys
from mm1.models.upcycle import UpcycleOptions, upcycle_dense_ffns
from mm1.models.vision import interpolate_pos_embed

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HFPart:
    """How an HF checkpoint of one part maps to our names."""

    part: str  # "vision" | "decoder"
    keymap: KeyMap
    ignore: Callable[[str], bool]


@dataclass(frozen=True)
class LoadContext:
    """What the transforms know: the source and the model being filled."""

    source: str  # the directory read, for messages
    parts: tuple[str, ...]  # the model's parts taken from this source
    expected: Mapping[str, torch.Size]  # the model's parameter shapes (a tied head once)
    hf: HFPart | None = None  # set when the source is an HF checkpoint of one part
    # Token ids with no trained row in the source (new to an HF tokenizer): they start at the mean.
    new_token_ids: tuple[int, ...] = ()
    cls_token: bool = True  # the encoder's position embeddings begin with a CLS row
    notes: list[str] = field(default_factory=list)  # what the chain changed, for the log
    model: ModelConfig | None = None  # the (resolved) config of the model being filled
    upcycle: UpcycleOptions = field(default_factory=UpcycleOptions)  # dense -> MoE options


StateTransform = Callable[[StateDict, LoadContext], StateDict]
STATE_TRANSFORMS: dict[str, StateTransform] = {}


def register_state_transform(
    name: str, fn: StateTransform, *, before: str | None = None
) -> StateTransform:
    """Add `fn` to the chain (at the end, or before the transform `before`)."""
    if name in STATE_TRANSFORMS:
        raise ValueError(f"a state transform named {name!r} is already registered")
    if before is None:
        STATE_TRANSFORMS[name] = fn
        return fn
    if before not in STATE_TRANSFORMS:
        raise ValueError(f"no state transform {before!r} to insert {name!r} before")
    items = list(STATE_TRANSFORMS.items())
    at = [k for k, _ in items].index(before)
    items.insert(at, (name, fn))
    STATE_TRANSFORMS.clear()
    STATE_TRANSFORMS.update(items)
    return fn


def apply_chain(state: StateDict, ctx: LoadContext) -> StateDict:
    """Every registered transform in order, then `fit_check`."""
    for fn in STATE_TRANSFORMS.values():
        state = fn(state, ctx)
    fit_check(state, ctx)
    return state


# Parameters outside the three parts' modules, by the part they belong to.
# emu2's regression head reads the decoder's hidden states: it goes with the decoder.
_HEADS = ("regress.weight", "regress.bias")
_PART_OF = {"image_newline": "connector", **dict.fromkeys(_HEADS, "decoder")}
# Parameters a source may lack: a layout's own (anyres' newline, when a stage moves from the
# single layout to anyres), a family's own heads (an emu2 model started from an MM1 run); they
# keep their fresh initialisation.
_MAY_BE_NEW = ("image_newline", *_HEADS)


def _part(key: str) -> str:
    return _PART_OF.get(key, key.split(".", 1)[0])


def hf_keys(state: StateDict, ctx: LoadContext) -> StateDict:
    if ctx.hf is None:
        return state
    ours, _ = to_our_keys(state, ctx.hf.keymap, ctx.hf.ignore, ctx.source)
    # Always a copy: safetensors maps the file, which may be rewritten while the model lives.
    return {
        f"{ctx.hf.part}.{k}": v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True)
        for k, v in ours.items()
    }


def parts(state: StateDict, ctx: LoadContext) -> StateDict:
    """The parts the model takes from this source; a family's heads the model lacks (an MM1
    model started from an emu2 run) are left out, with a note."""
    dropped = [k for k in _HEADS if k in state and k not in ctx.expected]
    if dropped:
        ctx.notes.append(f"{', '.join(dropped)} left out (the model has no such head)")
    return {k: v for k, v in state.items() if _part(k) in ctx.parts and k not in dropped}


def vision_depth(state: StateDict, ctx: LoadContext) -> StateDict:
    """Drop the source's encoder blocks the model does not build (it stops at its feature
    layer); an HF source's are left out by its key map already."""
    if ctx.hf is not None or "vision" not in ctx.parts:
        return state
    blocks = [int(k.split(".")[2]) for k in ctx.expected if k.startswith("vision.blocks.")]
    depth = 1 + max(blocks, default=-1)
    extra = [k for k in state if k.startswith("vision.blocks.") and int(k.split(".")[2]) >= depth]
    if extra:
        ctx.notes.append(f"vision blocks from {depth} on dropped (past the feature layer)")
    return {k: v for k, v in state.items() if k not in set(extra)}


# Position embeddings over the encoder's patch grid, and whether they may lead with a CLS row.
_POSITION_KEYS = {"vision.pos_embed": True, "connector.pos_embed": False}


def position_embeddings(state: StateDict, ctx: LoadContext) -> StateDict:
    for key, may_have_cls in _POSITION_KEYS.items():
        if key not in state or key not in ctx.expected:
            continue
        t = state[key]
        if t.ndim == 2:  # HF stores (N[+1], D); ours is (1, N[+1], D)
            t = t[None]
        target = ctx.expected[key]
        if t.shape != target and t.ndim == 3 and t.shape[-1] == target[-1]:
            cls = may_have_cls and ctx.cls_token
            grid = math.isqrt(target[1] - cls)
            t = interpolate_pos_embed(t, grid, cls)
            ctx.notes.append(f"{key} interpolated to a {grid}x{grid} grid")
        state[key] = t
    return state


_VOCAB_KEYS = ("decoder.embed_tokens.weight", "decoder.lm_head.weight")


def vocabulary(state: StateDict, ctx: LoadContext) -> StateDict:
    """Rows resized to the model's vocabulary. A model whose vocabulary holds image codes after
    the text's (chameleon: more rows than `decoder.vocab_size`) gets the source's text rows
    resized to the text vocabulary, then the code rows at their mean, unless the source has
    exactly the model's rows (a chameleon source of the same shape): a code is placed by its
    offset, never by where a source's padding happened to end."""
    text = ctx.model.decoder.vocab_size if ctx.model is not None else None
    for key in _VOCAB_KEYS:
        if key not in state or key not in ctx.expected:
            continue
        t, rows = state[key], ctx.expected[key][0]
        if t.ndim == 2 and t.shape[1] == ctx.expected[key][1]:
            if t.shape[0] != rows:
                ctx.notes.append(f"{key} resized from {t.shape[0]} to {rows} rows")
            if text is not None and rows > text and t.shape[0] != rows:
                codes = rows - text
                ctx.notes.append(f"{key}: its {codes} image-code rows are new")
                t = resize_vocab_rows(t, text, ctx.new_token_ids)
                state[key] = resize_vocab_rows(t, rows)
            else:
                state[key] = resize_vocab_rows(t, rows, ctx.new_token_ids)
    return state


def fit_check(state: StateDict, ctx: LoadContext) -> None:
    """One line naming the first parameter that does not fit."""
    expected = {k: s for k, s in ctx.expected.items() if _part(k) in ctx.parts}
    for key in expected:
        if key not in state and key in _MAY_BE_NEW:
            ctx.notes.append(f"{key} is new (not in the source): freshly initialised")
            continue
        if key not in state:
            raise ValueError(f"{ctx.source}: has no {key} (the model's parts {ctx.parts})")
        if tuple(state[key].shape) != tuple(expected[key]):
            raise ValueError(
                f"{ctx.source}: {key} is {tuple(state[key].shape)} there but "
                f"{tuple(expected[key])} in the model: the architectures differ"
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise ValueError(f"{ctx.source}: {extra[0]} has no place in the model")


for _name, _fn in (
    ("hf_keys", hf_keys),
    ("parts", parts),
    ("vision_depth", vision_depth),
    ("position_embeddings", position_embeddings),
    ("vocabulary", vocabulary),
    ("upcycle", upcycle_dense_ffns),
):
    register_state_transform(_name, _fn)
