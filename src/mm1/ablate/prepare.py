"""A grid's `prepare` steps: what its cells need before they train, run in order and each
skipped when already done (so a study resumes across sittings like its cells).

    prepare:
      - caption_splits: {world: data/world-demo, fraction: 0.05, seed: 0}
      - train: {config: recaptioner.yaml, overrides: {train.steps: 1200}}   # relative to the grid
      - recaption: {checkpoint: runs/ablations/recaptioner, in: data/world-demo/captions,
                    out: data/world-demo/captions_recap, batch_size: 32, max_new_tokens: 40}
      - train_encoder: {config: ../encoder_clip.yaml, overrides: {train.run_dir: runs/x}}

`caption_splits` writes the world's clean-caption subset and ceiling (`mm1 data
caption-splits`), `train` is `mm1 train CONFIG overrides` (a finished run trains nothing, an
interrupted one resumes), `recaption` is `mm1 recaption` (finished shards are kept),
`train_encoder` is `mm1 train-encoder CONFIG overrides` (an encoder the cells start from).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mm1.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from mm1.recaption import RecaptionSettings

STEP_KINDS = ("caption_splits", "train", "recaption", "train_encoder")
_TRAINING = ("train", "train_encoder")
_OPTIONS = {
    "caption_splits": {"world", "fraction", "seed"},
    "train": {"config", "overrides"},
    "train_encoder": {"config", "overrides"},
    "recaption": {"checkpoint", "in", "out", "batch_size", "max_new_tokens", "fuse"},
}
_REQUIRED = {
    "caption_splits": {"world"},
    "train": {"config"},
    "train_encoder": {"config"},
    "recaption": {"checkpoint", "in", "out"},
}


@dataclass(frozen=True)
class PrepareStep:
    kind: str
    options: dict[str, Any]  # as written in the grid
    root: Path = Path(".")  # the grid's folder: a train step's config is relative to it

    def describe(self) -> str:
        o = self.options
        if self.kind == "caption_splits":
            return f"caption splits of {o['world']} (fraction {o.get('fraction', 0.05)})"
        if self.kind in _TRAINING:
            return f"{self.kind} {o['config']} -> {self.train_config().train.run_dir}"
        return f"recaption {o['in']} with {o['checkpoint']} -> {o['out']}"

    def train_config(self) -> Config:
        """The step's run config: an `EncoderRunConfig` for `train_encoder`."""
        extra = [f"{k}={json.dumps(v)}" for k, v in (self.options.get("overrides") or {}).items()]
        if self.kind == "train_encoder":
            from mm1.config.encoder import load_encoder_config

            return load_encoder_config(self.root / self.options["config"], extra)
        return load_config(self.root / self.options["config"], extra)

    def done(self) -> bool:
        from mm1.checkpoint import latest_checkpoint, step_of
        from mm1.data.caption_splits import CLEAN_ALL, SPLITS_FILE

        o = self.options
        if self.kind == "caption_splits":
            record = Path(o["world"]) / SPLITS_FILE
            return record.is_file() and (Path(o["world"]) / CLEAN_ALL).is_dir()
        if self.kind in _TRAINING:
            cfg = self.train_config()
            ckpt = latest_checkpoint(cfg.train.run_dir)
            return ckpt is not None and (step_of(ckpt) or 0) >= cfg.train.steps
        from mm1.recaption import is_complete

        # Done only as `mm1 recaption` would see it: its manifest records this model and these
        # settings, every shard counted (a file of the same name from another run is not done).
        return is_complete(o["checkpoint"], o["in"], o["out"], self._recaption_settings())

    def run(self) -> None:
        o = self.options
        if self.kind == "caption_splits":
            from mm1.data.caption_splits import write_caption_splits

            write_caption_splits(o["world"], o.get("fraction", 0.05), o.get("seed", 0))
        elif self.kind in _TRAINING:
            from mm1.train.encoder_trainer import EncoderTrainer
            from mm1.train.trainer import Trainer

            trainer = EncoderTrainer if self.kind == "train_encoder" else Trainer
            result = trainer(self.train_config()).fit()
            if result["stopped_by"]:
                raise KeyboardInterrupt(f"{self.describe()}: stopped at step {result['step']}")
        else:
            from mm1.recaption import recaption

            recaption(o["checkpoint"], o["in"], o["out"], self._recaption_settings())

    def _recaption_settings(self) -> RecaptionSettings:
        from mm1.recaption import RecaptionSettings

        o = self.options
        return RecaptionSettings(
            o.get("batch_size", 32), o.get("max_new_tokens", 40), o.get("fuse", False)
        )


def parse_prepare(raw: Any, grid_path: Path) -> list[PrepareStep]:
    """The grid's `prepare` list, checked (a train step's config is loaded and validated)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{grid_path}: prepare: give a list of steps")
    steps = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"{grid_path}: prepare[{i}]: one of {', '.join(STEP_KINDS)}: {{...}}")
        kind, options = next(iter(entry.items()))
        if kind not in STEP_KINDS:
            raise ConfigError(f"{grid_path}: prepare[{i}].{kind}: one of {', '.join(STEP_KINDS)}")
        options = dict(options or {})
        unknown = sorted(set(options) - _OPTIONS[kind])
        missing = sorted(_REQUIRED[kind] - set(options))
        if unknown or missing:
            what = f"{unknown[0]} is not an option" if unknown else f"{missing[0]} is missing"
            known = ", ".join(sorted(_OPTIONS[kind]))
            raise ConfigError(f"{grid_path}: prepare[{i}].{kind}: {what} (options: {known})")
        step = PrepareStep(kind, options, grid_path.parent)
        if kind in _TRAINING:
            try:
                step.train_config()
            except ConfigError as err:
                raise ConfigError(f"{grid_path}: prepare[{i}].{kind}: {err}") from None
        steps.append(step)
    return steps


def run_prepare(steps: list[PrepareStep], log: Callable[[str], None]) -> None:
    for i, step in enumerate(steps, 1):
        if step.done():
            log(f"prepare {i}/{len(steps)}: {step.describe()}: done already")
            continue
        log(f"prepare {i}/{len(steps)}: {step.describe()}")
        step.run()
