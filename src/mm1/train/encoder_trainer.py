"""The trainer for image-encoder pre-training (`mm1 train-encoder`): `Trainer`'s loop,
checkpoints (DCP, exact resume), logging, signals and parallelism, with the encoder objective's
set-up and step in place of MM1's (the seam: `setup`, `train_step`, `validation_loss` and
`_metrics` are the methods the loop calls).

Loss normalisation: a gathered (contrastive) loss is already the global batch's on every rank
and its gradient reaches the parameters only through the rank's own features, so it is
backpropagated times the world size, which DDP / FSDP's averaging over ranks cancels
(`mm1.models.contrastive`). A per-rank loss (AIM) is a mean over the rank's images, all ranks
holding equally many: the averaging over ranks gives the global mean. Micro-batches of an
accumulated step each weigh 1 / accum (each is its own contrastive batch).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mm1.config import ConfigError, to_dict
from mm1.config.encoder import (
    AIM_SOURCE_KINDS,
    CLIP_SOURCE_KINDS,
    TEXT_OBJECTIVES,
    EncoderRunConfig,
)
from mm1.data.caption_pairs import CaptionPairDataset, PairBatch, PairSettings, build_pair_loader
from mm1.data.loader import Loader
from mm1.data.world import prepare_data
from mm1.models.encoders import ENCODER_FAMILY, build_encoder_model, seed_start_state
from mm1.train import checkpoint as ckpt
from mm1.train.config_change import config_diff, refuse_changes, saved_run_config
from mm1.train.optim import build_optimizer
from mm1.train.parallel import (
    accumulation_steps,
    autocast,
    autocast_dtype,
    parallelize,
    refuse_unsupported_processes,
)
from mm1.train.trainer import VAL_SEED, StepResult, Trainer, nonfinite_part


class EncoderTrainer(Trainer):
    cfg: EncoderRunConfig

    def setup(self) -> None:
        cfg, d = self.cfg, self.d
        refuse_unsupported_processes(cfg.train, d.world_size)
        init = cfg.train.init
        seed = cfg.encoder.objective == "seed"  # its frozen towers: the CLIP run init.vision names
        if init.weights or init.connector or init.decoder or (init.vision and not seed):
            raise ConfigError(
                "train.init: an encoder run starts from random weights (train.init is for MM1 "
                "runs, which may start their model.vision from an encoder run; and for a SEED "
                "tokenizer run, whose train.init.vision is its CLIP run)"
            )
        if not cfg.train.optim.lr:
            raise ConfigError(
                "train.optim.lr=0 picks MM1's decoder learning-rate law, which does not apply "
                "to encoder pre-training: set train.optim.lr"
            )
        torch.manual_seed(cfg.train.seed)
        self._check_config_change()
        # A resumed run reads its weights from its checkpoint, not the HF tower's directory
        # (nor, for SEED, the CLIP run's: read up front, so a bad one fails before the data).
        starting = ckpt.latest_checkpoint(self.run_dir) is None
        start_state = seed_start_state(cfg) if seed and starting else {}
        own = None if starting else self.run_dir  # a resumed run reads its own tokenizer
        self.data = prepare_data(cfg.data, cfg.model, d.is_main, d.barrier, init, own)
        objective = cfg.encoder.objective
        kinds = CLIP_SOURCE_KINDS if objective in TEXT_OBJECTIVES else AIM_SOURCE_KINDS
        if not cfg.data.sources:  # the world's mixture: its caption pairs only
            self.data.sources = [s for s in self.data.sources if s.resolved_kind in kinds]
        if cfg.encoder.text.hf is not None:  # the HF text tower reads its own tokens
            from mm1.data.tokenizer import Tokenizer

            self.data.tokenizer = Tokenizer.from_file(cfg.encoder.text.hf)
        if start_state:  # the frozen text tower reads the ids of its CLIP run's tokenizer
            from mm1.data.tokenizer import Tokenizer
            from mm1.data.world import saved_tokenizer_dir

            self.data.tokenizer = Tokenizer.from_file(saved_tokenizer_dir(init.vision))
        tok = self.data.tokenizer
        model = build_encoder_model(cfg, tok.vocab_size, load_weights=starting)
        if start_state:
            missing, unexpected = model.load_state_dict(start_state, strict=False)
            trained = {n for n, p in model.named_parameters() if p.requires_grad}
            buffers = {n for n, _ in model.named_buffers()}  # the codebook: trained here too
            if unexpected or set(missing) != trained | buffers:
                raise ValueError(
                    f"train.init.vision={init.vision}: the CLIP run's towers do not fill the "
                    f"SEED model's frozen parts (unexpected {unexpected}, missing "
                    f"{sorted(set(missing) - trained - buffers)})"
                )
        self.model_cfg = cfg.model
        self.peak_lr = cfg.train.optim.lr
        self.model = parallelize(model, cfg.train, d, family=ENCODER_FAMILY)
        self.optimizer, self.scheduler = build_optimizer(
            self.model, cfg.train.optim, self.peak_lr, cfg.train.steps
        )
        self.accum = accumulation_steps(cfg.train, d.world_size)
        self.loader = self._build_loader(cfg.data.seed)
        self._start_run()

    def _build_loader(self, seed: int) -> Loader:
        d = self.d
        return build_pair_loader(
            self._pair_settings(self.data.sources, seed),
            self.data.tokenizer,
            self.data.processor,
            d.rank,
            d.world_size,
            self.cfg.data.num_workers,
        )

    def _write_run_files(self) -> None:
        """Nothing beyond `Trainer`'s: an encoder run has no prompt format and no starting point."""

    def _pair_settings(self, sources: list, seed: int) -> PairSettings:
        cfg = self.cfg
        return PairSettings(
            sources=list(sources),
            batch_size=cfg.train.micro_batch_size,
            max_len=cfg.encoder.text.max_len,
            needs_text=cfg.encoder.objective in TEXT_OBJECTIVES,
            seed=seed,
            max_error_rate=cfg.data.max_error_rate,
            max_image_pixels=cfg.data.max_image_pixels,
            max_text_chars=cfg.data.max_text_chars,
            resume_changed_sources=self.force,
        )

    def _validation_batches(self) -> list[PairBatch]:  # type: ignore[override]
        if not self.cfg.train.val_every or not self.data.val_sources:
            return []
        settings = self._pair_settings(self.data.val_sources, VAL_SEED)
        settings.distinct = True
        ds = CaptionPairDataset(
            settings, self.data.tokenizer, self.data.processor, self.d.rank, self.d.world_size
        )
        it = iter(ds)
        batches = [next(it) for _ in range(self.cfg.train.val_batches)]
        if self.d.enabled:  # a gathered loss needs batches of one size on every rank
            sizes = torch.tensor([len(b) for b in batches], device=self.d.device)
            torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MIN)
            batches = [b.head(int(n)) for b, n in zip(batches, sizes.tolist(), strict=True)]
        return batches

    def _check_config_change(self) -> None:
        super()._check_config_change()
        old = saved_run_config(self.run_dir)
        if old is not None:
            new = to_dict(self.cfg.encoder)
            # An objective's section added since the run was saved: the run never chose one.
            saved = {**{k: v for k, v in new.items() if k != "objective"}, **old.get("encoder", {})}
            changed = config_diff(saved, new, "encoder.")  # type: ignore[arg-type]
            refuse_changes(self.run_dir, changed, self.force)
            if changed and self.d.is_main:
                print(f"--force: resuming with a changed {', '.join(changed)}", flush=True)

    def _generator(self, micro: int) -> torch.Generator:
        """The objective's random stream of one micro-batch (AIM's prefix lengths), a function
        of (seed, step, rank, micro-batch): a resumed run draws what the first run would."""
        seq = np.random.SeedSequence([self.cfg.train.seed, self.step, self.d.rank, micro])
        return torch.Generator().manual_seed(int(seq.generate_state(1)[0]))

    def train_step(self, micro: list[PairBatch]) -> StepResult:  # type: ignore[override]
        d, model = self.d, self.model
        model.train()
        gathered = self.raw_model.gathered
        scale = (d.world_size if gathered else 1) / len(micro)
        dtype = autocast_dtype(self.cfg.train, d.device)
        loss_sum = torch.zeros((), device=d.device)
        logged: dict[str, float] = {}
        for i, batch in enumerate(micro):
            batch = batch.to(d.device, non_blocking=True)
            with self._sync(i == len(micro) - 1), autocast(d.device, dtype):
                out = model(batch.pixel_values, batch.input_ids, batch.lengths, self._generator(i))
            (out.loss * scale).backward()
            loss_sum += out.loss.detach().float()
            for k, v in out.metrics.items():
                logged[k] = logged.get(k, 0.0) + v / len(micro)
        if not gathered:  # per-rank means: their mean over ranks
            d.all_reduce_sum(loss_sum)
            loss_sum /= d.world_size
        loss = float(loss_sum) / len(micro)
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, self.cfg.train.optim.grad_clip or math.inf
        )
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        nonfinite = nonfinite_part(loss, grad_norm)
        skipped = bool(nonfinite)
        if not skipped:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        images = sum(len(b) for b in micro)
        tokens = sum(int(b.lengths.sum()) for b in micro)
        slots = sum(b.input_ids.numel() for b in micro)  # the captions padded to the longest
        return StepResult(
            loss=loss,
            per_kind={},
            tokens=tokens,
            slots=slots,
            images=images,
            grad_norm=grad_norm,
            skipped=skipped,
            nonfinite=nonfinite,
            metrics=logged,
        )

    @torch.no_grad()
    def validation_loss(self) -> float:
        self.model.eval()
        gathered = self.raw_model.gathered
        dtype = autocast_dtype(self.cfg.train, self.d.device)
        total = torch.zeros((), device=self.d.device)
        for i, batch in enumerate(self.val_batches):
            batch = batch.to(self.d.device)
            gen = torch.Generator().manual_seed(VAL_SEED + 7919 * self.d.rank + i)
            with autocast(self.d.device, dtype):
                out = self.model(batch.pixel_values, batch.input_ids, batch.lengths, gen)
            total += out.loss.float()
        if not gathered:
            self.d.all_reduce_sum(total)
            total /= self.d.world_size
        self.model.train()
        return float(total) / max(1, len(self.val_batches))

    def _metrics(self, r: StepResult, window: dict[str, float]) -> dict[str, Any]:
        import time

        elapsed = max(time.perf_counter() - window["t"], 1e-9)
        world = self.d.world_size
        return {
            "loss": r.loss,
            **r.metrics,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": r.grad_norm,
            "images_per_s": window["images"] * world / elapsed,
            "data_wait": window["wait"] / elapsed,
            "nonfinite_steps": self.counters["nonfinite_steps"],
        }


def train_encoder(
    cfg: EncoderRunConfig, force: bool = False, reshard: bool = False
) -> dict[str, Any]:
    """Train an encoder run to `train.steps` (resuming from its run_dir); `Trainer.fit`'s result."""
    return EncoderTrainer(cfg, force=force, reshard=reshard).fit()
