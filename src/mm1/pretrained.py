"""Trained models on disk: the exported directory (safetensors + config + tokenizer) and run
directories (the newest DCP checkpoint), loaded the same way for eval, generate and chat.

Exported layout:
    model.safetensors          consolidated weights (a tied head is stored once)
    model.json                 the ModelConfig the weights belong to
    tokenizer.json, mm1_tokenizer.json, tokenizer_config.json   the tokenizer with our specials
    preprocessor_config.json   the image preprocessing
    prompt_format.json         how images and turns were written into training sequences (image
                               slots, boundaries, the chat template's choice: `PromptFormat`);
                               prompts must be written the same way
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from mm1.checkpoint import (
    CHECKPOINTS_DIR,
    EXPORT_WEIGHTS,
    MODEL_CONFIG,
    SavedModel,
    is_checkpoint,
    is_export,
    is_run,
    latest_checkpoint,
    read_model_config,
    read_model_weights,
    refuse_encoder_run,
)
from mm1.config import ConfigError, DataConfig, ModelConfig, to_dict
from mm1.data.images import PREPROCESSOR_CONFIG, ImageProcessor
from mm1.data.prompt_format import PromptFormat, load_prompt_format
from mm1.data.tokenizer import Tokenizer
from mm1.fs import DamagedFile
from mm1.models.build import assign_weights
from mm1.models.family import family_spec
from mm1.models.mllm import MLLM


@dataclass
class Pretrained:
    model: MLLM
    tokenizer: Tokenizer
    processor: ImageProcessor
    source: Path
    # How the model was trained to see images and turns: prompts are written through it.
    prompt_format: PromptFormat

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def runtime(self) -> dict[str, str]:
        """Where and in what precision the model runs: evaluation results record it."""
        weight = self.model.decoder.embed_tokens.weight
        return {"device": str(weight.device), "dtype": dtype_name(weight.dtype)}

    @property
    def image_boundaries(self) -> bool:
        """Images wrapped in <img> ... </img> as in training (`data.image_boundaries`)."""
        return self.prompt_format.image_boundaries


def save_pretrained(
    model: MLLM,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    out_dir: str | Path,
    prompt_format: PromptFormat | None = None,
) -> Path:
    """Write the exported layout; loadable with `load_pretrained`. `prompt_format` is how the
    model was trained (a `Pretrained`'s own); None: its image slots in its own image layout, no
    boundaries, the tokenizer's chat template."""
    if prompt_format is None:
        no_boundaries = DataConfig(image_boundaries=False)
        prompt_format = PromptFormat.from_config(no_boundaries, model.num_image_tokens, model.cfg)
    if prompt_format.image_tokens != model.num_image_tokens:
        raise ValueError(
            f"the prompt format writes {prompt_format.image_tokens} slots per image but the "
            f"model fills {model.num_image_tokens}"
        )
    out = Path(out_dir)
    refuse_run_dir(out, "out_dir")
    with writing_export(out):
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if model.cfg.decoder.tie_embeddings:
            state.pop("decoder.lm_head.weight", None)  # the same tensor as the embedding
        tmp = out / (EXPORT_WEIGHTS + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "mm1": "1"})
        _readable_like_other_files(tmp)
        tmp.replace(out / EXPORT_WEIGHTS)
        cfg = to_dict(model.cfg)
        cfg["vision"]["init"] = cfg["decoder"]["init"] = None  # the weights are here now
        (out / MODEL_CONFIG).write_text(json.dumps(cfg, indent=1) + "\n")
        tokenizer.save(out)
        processor.save_pretrained(out)
        prompt_format.save(out)
    return out


@contextlib.contextmanager
def writing_export(out: Path) -> Iterator[None]:
    """Write an export (ours, transformers', a vision tower) into `out`. A write that fails or
    is interrupted removes the directory if this call made it, rather than leave half an
    export to be loaded later; a full disk, which safetensors reports as an error of its own
    without a path, is the `OSError` naming `out` (one line from the CLI)."""
    made = not out.exists()
    try:
        yield
    except BaseException as err:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC
        if full or "os error 28" in str(err) or "No space left on device" in str(err):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from None
        raise


# What `mm1 export-encoder` writes: a transformers vision tower and its image preprocessing.
VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")


def is_vision_export(path: str | Path) -> bool:
    """A directory holding exactly a transformers CLIPVisionModel / SiglipVisionModel export:
    config.json (of such a model), its weights (one file or shards with their index) and
    perhaps preprocessor_config.json, nothing else."""
    p = Path(path)
    if not p.is_dir():
        return False
    names = {f.name for f in p.iterdir()}
    weights = {n for n in names if n.startswith("model") and ".safetensors" in n}
    if "config.json" not in names or not weights:
        return False
    if names - weights - {"config.json", PREPROCESSOR_CONFIG}:
        return False
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") in VISION_MODEL_TYPES


def check_output_dir(
    out: str | Path,
    option: str,
    kind: Literal["export", "hf", "hf_vision"] = "export",
    source: str | Path | None = None,
) -> Path:
    """Refuse, before anything is loaded, an output directory whose files a write would clobber
    or shadow: a training run directory, the `source` itself, or a non-empty directory holding
    something other than an earlier output of this `kind` (an mm1 export, a transformers
    directory: config.json, or exactly a transformers vision tower: `is_vision_export`), which
    is rewritten in place as usual. `option` names it in errors."""
    out = Path(out)
    refuse_run_dir(out, option)
    if source is not None and out.resolve() == Path(source).resolve():
        raise ConfigError(
            f"{option} {out}: that is the source model itself; give another directory"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{option} {out}: is a file, not a directory; give a directory")
    earlier = {
        "export": is_export,
        "hf": lambda p: (p / "config.json").is_file(),
        "hf_vision": is_vision_export,
    }[kind](out)
    if out.is_dir() and not earlier and any(out.iterdir()):
        what = {
            "export": "an mm1 export",
            "hf": "a transformers directory (config.json)",
            "hf_vision": "an earlier export of a transformers vision model",
        }[kind]
        raise ConfigError(
            f"{option} {out}: the directory holds other files and is not {what}; give a new or "
            "empty directory (or remove it first)"
        )
    return out


def refuse_as_run_dir(run_dir: str | Path, option: str = "train.run_dir") -> None:
    """Refuse, as the directory a run writes, one whose model readers would take instead of the
    run's (an export: a directory is read as one first), or one inside a run's checkpoints
    (`RUN/checkpoints/step_N` is read as that run's checkpoint, not as a run)."""
    p = Path(run_dir)
    try:
        export = (p / EXPORT_WEIGHTS).is_file()
    except OSError:  # e.g. a name too long: the run's lock says it cannot write there
        return
    if export:
        raise ConfigError(
            f"{option}={p} holds an exported model ({EXPORT_WEIGHTS}): a run trained there "
            "would be hidden behind it (readers take the export); give another directory"
        )
    inside = next(
        (a for a in [p, *p.absolute().parents] if a.name == CHECKPOINTS_DIR and is_run(a.parent)),
        None,
    )
    if inside is not None:
        raise ConfigError(
            f"{option}={p} is inside the run {inside.parent}'s {CHECKPOINTS_DIR}/, which only "
            "that run writes; give another directory"
        )


def refuse_run_dir(out: str | Path, option: str) -> None:
    """Refuse a training run directory as the place to write a model (`option` names it)."""
    # Loading checks for an export before a run: model weights written into a run directory
    # would be read instead of its newest checkpoint from then on.
    out = Path(out)
    if (out / CHECKPOINTS_DIR).is_dir():
        raise ConfigError(
            f"{option} {out}: a training run directory ({CHECKPOINTS_DIR}/ inside); writing a "
            "model there would shadow its checkpoints: give another directory"
        )


def _readable_like_other_files(path: Path) -> None:
    """safetensors writes 0600; an export is meant to be shared like the files beside it."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def load_model_config(path: str | Path) -> ModelConfig:
    return read_model_config(path)


def _check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """A DamagedFile when the saved tensors are not the model's (names and shapes): its
    model.json was changed or replaced. torch's own error lists every tensor, hundreds of
    lines for a real model."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    wrong = [k for k in expected if k in state and state[k].shape != expected[k]]
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    found = []
    if wrong:
        k = wrong[0]
        found.append(
            f"{len(wrong)} of other shapes ({k}: saved {tuple(state[k].shape)}, the config "
            f"makes {tuple(expected[k])})"
        )
    if missing:
        found.append(f"{len(missing)} missing ({missing[0]}...)")
    if extra:
        found.append(f"{len(extra)} the config does not make ({extra[0]}...)")
    if found:
        raise DamagedFile(
            f"{path}: the weights are not those of the model its {MODEL_CONFIG} describes (was "
            f"it changed or replaced?): tensors {'; '.join(found)}"
        )


def model_from_saved(saved: SavedModel) -> MLLM:
    """An MM1 holding a saved model's weights (built on the meta device, weights assigned): its
    parameters take the saved tensors' dtypes; the computed buffers (rotary frequencies) are
    fp32, as transformers' models loaded in bf16 keep theirs."""
    cfg = saved.config
    cfg.vision.init = cfg.decoder.init = None
    family = family_spec(cfg.family)
    with torch.device("meta"):
        model = family.model(cfg)
    state = dict(saved.state)
    if cfg.decoder.tie_embeddings:
        state["decoder.lm_head.weight"] = state["decoder.embed_tokens.weight"]
    _check_fits(model, state, saved.path)
    assign_weights(model, state)
    return model


def check_device(device: str | torch.device, option: str = "--device") -> torch.device:
    """`device` parsed and usable by this torch, else one line naming `option` (rather than
    torch's traceback once the weights are read: "Torch not compiled with CUDA enabled")."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{option} {device}: not a device; give cpu, cuda or cuda:N") from None
    if dev.type == "meta":  # holds no values: nothing could run there
        raise ConfigError(f"{option} {device}: not a device a model runs on; give cpu or cuda")
    try:
        torch.empty(0, device=dev)  # initialises the backend: fails if it is absent
    except (RuntimeError, AssertionError) as err:
        # torch's first sentence: some backends append a long list of dispatch keys
        why = (str(err).strip() or type(err).__name__).splitlines()[0].split(". ")[0]
        raise ConfigError(f"{option} {device}: not usable here ({why}); use {option} cpu") from None
    return dev


# `--dtype` values: torch's names and the short ones.
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def check_dtype(
    dtype: str | torch.dtype, device: str | torch.device = "cpu", option: str = "--dtype"
) -> torch.dtype:
    """The dtype a model runs in (`DTYPES`' names), usable on `device`, else one line naming
    `option`: a GPU without bf16 (before Ampere) is told to use float16."""
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ConfigError(
                f"{option} {dtype}: not a dtype a model runs in; give float32, bfloat16 (bf16) or "
                "float16 (fp16)"
            )
        dtype = DTYPES[dtype.lower()]
    elif dtype not in DTYPES.values():
        raise ConfigError(f"{option} {dtype}: give float32, bfloat16 or float16")
    dev = torch.device(device)
    if dtype == torch.bfloat16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{option} bfloat16: this GPU has no bf16; use {option} float16")
    return dtype


def dtype_name(dtype: str | torch.dtype) -> str:
    """A dtype's torch name ("bfloat16" for "bf16"), as results and manifests record it."""
    return str(check_dtype(dtype)).removeprefix("torch.")


def check_runtime(
    device: str | torch.device, dtype: str | torch.dtype
) -> tuple[torch.device, torch.dtype]:
    """`--device` and `--dtype` checked together, before anything loads."""
    dev = check_device(device)
    return dev, check_dtype(dtype, dev)


def locate_model(path: str | Path) -> tuple[str | None, Path]:
    """What `path` holds, checked before anything loads: (the transformers model kind, "llava"
    or "fuyu", else None; the directory of its tokenizer). A path that holds no model is a
    FileNotFoundError saying what it is instead."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    refuse_encoder_run(path)
    kind = None if is_export(path) else _hf_model_kind(path)
    if kind is not None:
        return kind, path
    if is_export(path):
        return None, path
    if is_run(path) and latest_checkpoint(path) is not None:
        return None, path / "tokenizer"
    if is_checkpoint(path):
        return None, path.parent.parent / "tokenizer"
    if latest_checkpoint(path) is not None:  # is_run wants model.json too
        raise FileNotFoundError(
            f"{path} has checkpoints but no {MODEL_CONFIG} (the run's model config): resuming "
            "the run with `mm1 train` writes it again"
        )
    if (path / CHECKPOINTS_DIR).is_dir() or (
        (path / MODEL_CONFIG).is_file() and (path / "config.yaml").is_file()
    ):
        # a run directory whose training has not saved yet (no checkpoints/, or none complete);
        # an export has no config.yaml, so a half-written one still gets the message below
        raise FileNotFoundError(f"{path} has no checkpoint yet (training has not saved one)")
    raise FileNotFoundError(
        f"{path} is neither an exported model ({EXPORT_WEIGHTS} + {MODEL_CONFIG}), a run "
        "directory with checkpoints/, one of its checkpoints/step_N, nor a transformers "
        "LLaVA / LLaVA-NeXT / Fuyu directory"
    )


def load_pretrained(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
) -> Pretrained:
    """An exported directory, a run directory (its newest complete checkpoint), one of a run's
    checkpoints (`RUN/checkpoints/step_N`, read with the run's tokenizer), or a transformers
    LLaVA / LLaVA-NeXT / FuyuForCausalLM directory (`_load_hf_model`), for inference on
    `device` in `dtype` (float32, bfloat16, float16: `DTYPES`). The weights are read straight
    into `dtype`, with no whole copy in another; a frozen image tokenizer stays fp32
    (`mm1.models.family.weight_dtype`), and pixels are cast to the image side's dtype as they
    enter the model."""
    path = Path(path)
    kind, tok_dir = locate_model(path)
    device, dtype = check_runtime(device, dtype)
    if kind is not None:
        return _load_hf_model(path, kind, device, dtype)
    model = model_from_saved(read_model_weights(path, dtype))
    model.to(device).eval()
    return Pretrained(
        model,
        Tokenizer.from_file(tok_dir),
        ImageProcessor.from_pretrained(tok_dir),
        path,
        load_prompt_format(tok_dir, model.num_image_tokens),
    )


def _hf_model_kind(path: Path) -> str | None:
    """ "llava" or "fuyu" for a transformers directory of a whole model mm1 reads, else None."""
    if not (path / "config.json").is_file():
        return None
    from mm1.models.starting_point import source_kind

    kind = source_kind(path, "the model")
    return kind if kind in ("llava", "fuyu") else None


def _load_hf_model(
    path: Path, kind: str, device: str | torch.device, dtype: torch.dtype
) -> Pretrained:
    """A transformers LLaVA / LLaVA-NeXT / FuyuForCausalLM directory, read as a run starting
    from it reads it (`train.init.weights`), at its own image size: its architecture and
    weights, its tokenizer with mm1's special tokens added (their rows at the mean), its image
    processor, and its image layout with no boundary tokens. Eval, generate, chat and serve
    then take the directory itself."""
    from mm1.config import InitConfig
    from mm1.data.world import image_processor_for
    from mm1.models.build import build_model, starting_point_state_dict

    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path} has no tokenizer.json: mm1 reads a model with its tokenizer"
        )
    init = InitConfig(weights=str(path))
    base = ModelConfig()
    if kind == "llava":  # at its own crop size (another one interpolates)
        from mm1.models.hf.llava import llava_model_config_from_hf

        base.vision.image_size = llava_model_config_from_hf(path).vision.image_size
    tok = Tokenizer.from_file(path)
    # Built on the meta device and given the directory's weights: no random initialisation of
    # a model every weight of which is then replaced (minutes and twice the memory at 7B).
    shell = build_model(base, tok.vocab_size, tok.image_id, meta=True, init=init)
    state = starting_point_state_dict(shell, init, tok.added_ids, dtype)
    if shell.cfg.decoder.tie_embeddings:
        state.pop("decoder.lm_head.weight", None)  # the embedding, as in a saved model
    model = model_from_saved(SavedModel(shell.cfg, state, path, None))
    model.to(device).eval()
    fmt = PromptFormat.from_config(
        DataConfig(image_boundaries=False), model.num_image_tokens, model.cfg
    )
    return Pretrained(model, tok, image_processor_for(model.cfg, init), path, fmt)
