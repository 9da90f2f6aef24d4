"""`mm1 export-encoder`: the ViT of an encoder run as a transformers CLIPVisionModel (or
SiglipVisionModel) directory, with the run's image preprocessing beside it."""

from __future__ import annotations

import shutil
from pathlib import Path

from mm1.data.images import PREPROCESSOR_CONFIG


def export_encoder_hf(run: str | Path, out_dir: str | Path) -> Path:
    """Write the run's `model.vision` with `save_vision_hf` (its feature layer's blocks; the
    written `hidden_states[-1]`, CLS row dropped, equals what MM1's connector reads)."""
    from mm1.checkpoint import refuse_mm1_run
    from mm1.config import ConfigError
    from mm1.data.world import saved_tokenizer_dir
    from mm1.models.encoders import load_encoder_run
    from mm1.models.hf import save_vision_hf
    from mm1.pretrained import check_output_dir, writing_export

    # Before loading: an MM1 run fails to load as an encoder with a state_dict error, and OUT
    # must not be a run (its checkpoints would be shadowed), the source, or unrelated files;
    # an earlier export of a vision tower is rewritten in place.
    refuse_mm1_run(run)
    check_output_dir(out_dir, "OUT", kind="hf_vision", source=run)
    cfg, model = load_encoder_run(run)
    if cfg.encoder.objective in ("vq", "seed"):
        reader = "chameleon" if cfg.encoder.objective == "vq" else "seed"
        raise ConfigError(
            f"{run} is a {cfg.encoder.objective.upper()} tokenizer run: transformers has no model "
            f"of its layout to export it as (a {reader} model reads it with train.init.vision)"
        )
    with writing_export(Path(out_dir)):
        out = save_vision_hf(model.vision, out_dir)
        processor = saved_tokenizer_dir(run) / PREPROCESSOR_CONFIG
        if processor.is_file():
            shutil.copyfile(processor, Path(out) / PREPROCESSOR_CONFIG)
    return Path(out)
