"""The trainer: one loop for a single process and for torchrun (FSDP2 / DDP), resumable exactly.

Loss normalisation (DESIGN.md): every micro-batch's summed cross-entropy is divided by the
number of label tokens of the whole step (all micro-batches, all ranks), so gradient
accumulation and world size do not change the loss or the gradient. The model's auxiliary
losses come normalised the same way (`MM1.forward`); each is weighted by
`train.aux_loss_weights` and added to the loss that is backpropagated, and logged on its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm1.batch import Batch
from mm1.checkpoint import MODEL_CONFIG
from mm1.config import (
    SOURCE_KINDS,
    Config,
    ConfigError,
    InitConfig,
    SourceConfig,
    apply_deprecated_keys,
    has_starting_weights,
    source_names,
    to_dict,
    to_yaml,
)
from mm1.config.schema import AUX_LOSSES, LOGIT_Z
from mm1.data.loader import Loader, LoaderSettings, PackedDataset, build_loader, loader_counts
from mm1.data.prompt_format import PromptFormat
from mm1.data.world import carried_image_boundaries, image_processor_for, prepare_data
from mm1.fs import atomic_write_text
from mm1.models.build import build_model, starting_point_state_dict
from mm1.models.lora import add_decoder_lora, lora_summary
from mm1.models.mllm import MLLM
from mm1.models.starting_point import describe as describe_start
from mm1.models.summary import active_parameters
from mm1.pretrained import refuse_as_run_dir
from mm1.train import checkpoint as ckpt
from mm1.train import run_lock
from mm1.train.config_change import check_resumed_config, own_model_config
from mm1.train.errors import NonFiniteLossError, StoppedAgain, TrainingError
from mm1.train.expert_load import add_loads, last_expert_loads, load_fractions, load_metrics
from mm1.train.hardware import bf16_peak_flops
from mm1.train.logging import MetricsLogger, truncate_metrics
from mm1.train.loss_groups import group_means, step_sums
from mm1.train.optim import (
    build_optimizer,
    hyperparameters,
    mm1_peak_lr,
    reapply_hyperparameters,
    set_trainable,
    trained_parts,
)
from mm1.train.parallel import (
    Dist,
    accumulation_steps,
    autocast,
    autocast_dtype,
    hsdp_layout,
    init_distributed,
    parallelize,
    refuse_unsupported_placement,
)
from mm1.train.profiling import StepProfiler

VAL_SEED = 1234  # a fixed held-out sample, the same for every run
START_FILE = "init.json"  # where a run started: {"sources": [{path, kind, step, parts}]}


@dataclass
class StepResult:
    loss: float
    per_kind: dict[str, float]  # logged as loss_<kind>
    tokens: int  # non-padding tokens
    slots: int  # token positions of the rows, padding included
    images: int
    grad_norm: float
    skipped: bool
    aux: dict[str, float] = field(default_factory=dict)  # unweighted, by name
    objective: float | None = None  # loss + weighted aux losses (None without aux losses)
    per_dataset: dict[str, float] = field(default_factory=dict)  # loss_ds_<name>
    expert_load: dict[int, list[float]] = field(default_factory=dict)  # MoE layers
    nonfinite: str = ""  # what was not finite, when skipped ("loss", "gradient norm", ...)
    metrics: dict[str, float] = field(default_factory=dict)  # other scalars, by name


def nonfinite_part(loss: float, grad_norm: float, aux: dict[str, float] | None = None) -> str:
    """What of a step is not finite ("" when all is): the step is then skipped."""
    parts = {"loss": loss, **{f"auxiliary loss {k}": v for k, v in (aux or {}).items()}}
    parts["gradient norm"] = grad_norm
    return next((name for name, v in parts.items() if not math.isfinite(v)), "")


def _new_window() -> dict[str, float]:
    """The running sums behind one logged step's throughput figures."""
    return {"t": time.perf_counter(), "wait": 0.0, "tokens": 0, "images": 0, "slots": 0}


class Trainer:
    def __init__(self, cfg: Config, *, force: bool = False, reshard: bool = False) -> None:
        """`force`: resume although the config's meaning or a source's files changed; `reshard`:
        resume a checkpoint of another number of processes (`mm1 train --force / --reshard`)."""
        self.cfg = cfg
        self.force = force
        self.reshard = reshard
        self.d: Dist = init_distributed()
        self.run_dir = Path(cfg.train.run_dir)
        refuse_as_run_dir(self.run_dir)
        self._stop_signal: int | None = None

    # -- set-up ----------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, d = self.cfg, self.d
        refuse_unsupported_placement(cfg, d)
        torch.manual_seed(cfg.train.seed)
        apply_deprecated_keys(cfg)  # a Config built in code has not been through load_config
        resuming = ckpt.latest_checkpoint(self.run_dir) is not None
        # A stage writes images as its starting point was trained to read them.
        cfg.data.image_boundaries = carried_image_boundaries(
            cfg.data, cfg.train.init, self.run_dir, resuming
        )
        self._check_config_change()
        init = cfg.train.init
        own = self.run_dir if resuming else None  # a resumed run reads its own tokenizer
        self.data = prepare_data(cfg.data, cfg.model, d.is_main, d.barrier, init, own)
        tok = self.data.tokenizer
        # Sharded FSDP runs build on the meta device: no rank ever holds the full model.
        sharded = d.enabled and cfg.train.parallel == "fsdp"
        # A resumed run continues from its own checkpoint: starting weights are not read.
        starting = ckpt.latest_checkpoint(self.run_dir) is None
        # Every rank checks the sources, before building (a bad path fails everywhere, early).
        self.started_from = describe_start(init) if starting else None
        model_cfg, build_init = cfg.model, init
        if not starting and (self.run_dir / MODEL_CONFIG).is_file():
            # Its own architecture, as resolved when it started: a starting point whose shapes
            # it took (an HF or LLaVA checkpoint) may have changed or be gone since.
            model_cfg, build_init = own_model_config(cfg.model, self.run_dir), InitConfig()
        model = build_model(
            model_cfg,
            tok.vocab_size,
            tok.image_id,
            meta=sharded,
            new_token_ids=tok.added_ids,
            init=build_init,
            load_weights=starting,
        )
        self.model_cfg = model.cfg
        if starting:  # the built architecture's images (a resumed run keeps its saved ones)
            self.data.processor = image_processor_for(model.cfg, init)
        # Parameters acting on each token (all of them for a dense decoder): the law's N.
        self.num_decoder_params = active_parameters(model.decoder)
        adapters = add_decoder_lora(model, cfg.train.lora, d.device) if cfg.train.lora.rank else 0
        set_trainable(model, cfg.train)
        if adapters and d.is_main:
            print(lora_summary(model, adapters, cfg.train.lora, len(tok.added_ids)), flush=True)
        self.peak_lr = cfg.train.optim.lr or mm1_peak_lr(self.num_decoder_params)
        self.model = parallelize(model, cfg.train, d)
        if sharded and d.is_main and (layout := hsdp_layout(cfg.train, d.world_size)):
            print(layout, flush=True)
        if sharded and starting and has_starting_weights(init):
            self._load_starting_points()
        self.optimizer, self.scheduler = build_optimizer(
            self.model, cfg.train.optim, self.peak_lr, cfg.train.steps
        )
        self.accum = accumulation_steps(cfg.train, d.world_size)
        self.dataset_names = source_names(self.data.sources)  # batches' dataset_ids index these
        self.loader = self._build_loader(cfg.data.seed)
        self._start_run()

    def _build_loader(self, seed: int) -> Loader:
        """This rank's training loader, its sources shuffled by `seed`: `data.seed`, plus one
        for each resume of the run onto another number of processes (`_resume`)."""
        settings = self._loader_settings(self.data.sources, self.cfg.train.micro_batch_size)
        settings.seed = seed
        d = self.d
        return build_loader(
            settings,
            self.data.tokenizer,
            self.data.processor,
            d.rank,
            d.world_size,
            self.cfg.data.num_workers,
        )

    def _start_run(self) -> None:
        """The end of every trainer's `setup` (model, optimizer, loader built): validation
        batches, the resume from the latest checkpoint, the run directory's files (rank 0)."""
        self.val_batches = self._validation_batches()
        self.step = 0
        self.counters = {"nonfinite_steps": 0, "nonfinite_in_a_row": 0}
        self._resume()
        if self.d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # atomically: a crash here must not leave the run's description empty
            atomic_write_text(self.run_dir / "config.yaml", to_yaml(self.cfg))
            model_json = json.dumps(to_dict(self.model_cfg), indent=1)
            atomic_write_text(self.run_dir / MODEL_CONFIG, model_json)
            self.data.tokenizer.save(self.run_dir / "tokenizer")
            self.data.processor.save_pretrained(self.run_dir / "tokenizer")
            self._write_run_files()
        self.d.barrier()

    def _write_run_files(self) -> None:
        """What an MM1 run adds to its run directory: its prompt format, where it started."""
        self.prompt_format.save(self.run_dir / "tokenizer")
        if self.started_from is not None:
            record = {"sources": self.started_from}
            (self.run_dir / START_FILE).write_text(json.dumps(record, indent=1) + "\n")

    def _load_starting_points(self) -> None:
        """Starting weights into the shards: rank 0 reads them, every rank receives its shards
        by broadcast (one tensor at a time)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        added = self.data.tokenizer.added_ids
        init = self.cfg.train.init
        state = starting_point_state_dict(self.raw_model, init, added) if self.d.is_main else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(self.model, state, options=options)

    def _loader_settings(self, sources: list[SourceConfig], micro_batch: int) -> LoaderSettings:
        settings = LoaderSettings.from_config(
            self.cfg.data, sources, self.prompt_format, micro_batch
        )
        settings.resume_changed_sources = self.force
        return settings

    @property
    def prompt_format(self) -> PromptFormat:
        """How this run writes images and turns into tokens (saved with its tokenizer)."""
        q = self.raw_model.num_image_tokens
        return PromptFormat.from_config(self.cfg.data, q, self.raw_model.cfg)

    @property
    def raw_model(self) -> MLLM:
        m = self.model if hasattr(self, "model") else None
        if m is None:
            raise RuntimeError("setup() first")
        return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m

    def _check_config_change(self) -> None:
        foreign = ckpt.foreign_entries(self.run_dir)
        if foreign:
            raise ckpt.CheckpointError(ckpt.foreign_entry_message(foreign[0]))
        forced = check_resumed_config(self.run_dir, self.cfg, self.force, self._resharding())
        if forced and self.d.is_main:
            print(f"--force: resuming with {'; '.join(forced)}", flush=True)

    def _resharding(self) -> bool:
        """Whether this start resumes, under --reshard, a checkpoint of another world size."""
        latest = ckpt.latest_checkpoint(self.run_dir)
        if not self.reshard or latest is None:
            return False
        return ckpt.read_meta(latest).get("world_size") != self.d.world_size

    def _validation_batches(self) -> list[Batch]:
        if not self.cfg.train.val_every:
            return []
        if not self.data.val_sources:
            if self.d.is_main:
                print("no validation: data.sources is set without data.val_sources", flush=True)
            return []
        settings = self._loader_settings(self.data.val_sources, self.cfg.train.micro_batch_size)
        settings.seed = VAL_SEED
        ds = PackedDataset(
            settings, self.data.tokenizer, self.data.processor, self.d.rank, self.d.world_size
        )
        it = iter(ds)
        return [next(it) for _ in range(self.cfg.train.val_batches)]

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            return
        configured = hyperparameters(self.optimizer, self.scheduler)
        # --reshard: a checkpoint of another number of processes, resharded (see below)
        loaded = ckpt.load_checkpoint(path, self.model, self.optimizer, reshard=self.reshard)
        counters = loaded.extra.get("counters", {})
        reshuffles = int(counters.get("data_reshuffles", 0)) + loaded.resharded
        if reshuffles:  # the loader reads the shuffle the run has read since its last reshard
            self.loader.close()
            self.loader = self._build_loader(self.cfg.data.seed + reshuffles)
        if not loaded.resharded:  # a resharded run's loader positions were other ranks'
            self.loader.load_state_dict(loaded.rank_state["loader"])  # first: it may refuse
        self.scheduler.load_state_dict(loaded.extra["scheduler"])
        changed = reapply_hyperparameters(self.optimizer, self.scheduler, configured)
        if changed and self.d.is_main:
            print(f"train.optim changed since the checkpoint: {', '.join(changed)}", flush=True)
        self.counters = {**self.counters, **counters, "data_reshuffles": reshuffles}
        self.step = loaded.step
        if self.d.is_main:
            truncate_metrics(self.run_dir, self.step)
            print(f"resumed from {path} at step {self.step}", flush=True)
            if loaded.resharded:
                print(
                    f"--reshard: the checkpoint was saved by {loaded.meta['world_size']} "
                    f"process(es), this run has {self.d.world_size}: the model, optimizer and "
                    "schedule were resharded; the data restarts in a new shuffle (data.seed + "
                    f"{reshuffles}), so records may repeat, and the validation rows are this "
                    "number of processes' own",
                    flush=True,
                )

    def save(self) -> Path:
        return ckpt.save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.optimizer,
            extra={"scheduler": self.scheduler.state_dict(), "counters": dict(self.counters)},
            rank_state={"loader": self.loader.state_dict()},
            meta={"config": to_dict(self.cfg)},
            keep=self.cfg.train.keep_checkpoints,
        )

    # -- the loop --------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to `train.steps`; returns the final step, the last step's loss (nan when no
        step ran: the run was already complete), the steps this call ran, and `stopped_by`:
        the signal number that stopped it early (after saving), else None. The run directory
        is locked throughout: a second trainer on it is refused (`run_lock`)."""
        with run_lock.held(self.run_dir, self.d):
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        self.setup()
        cfg, d = self.cfg.train, self.d
        start = self.step
        logger = MetricsLogger(
            self.run_dir,
            cfg.steps,
            enabled=d.is_main,
            tensorboard=cfg.tensorboard,
            wandb=cfg.wandb,
            config=to_dict(self.cfg),
            start_step=self.step,
            progress=cfg.progress,
        )
        self._install_signal_handlers()
        profiler = StepProfiler(self.run_dir, cfg.profile_at, cfg.profile_steps, d.rank, d.device)
        window = _new_window()
        last: StepResult | None = None
        stopped_by: int | None = None
        try:
            data_iter = iter(self.loader)  # in the try: a failure here restores the handlers
            while self.step < cfg.steps:
                profiler.begin(self.step + 1)
                if (line := profiler.report()) is not None:
                    logger.print(line)
                t0 = time.perf_counter()
                micro = [next(data_iter) for _ in range(self.accum)]
                window["wait"] += time.perf_counter() - t0
                last = self.train_step(micro)
                self.step += 1
                window["tokens"] += last.tokens
                window["images"] += last.images
                window["slots"] += last.slots
                # The streak is a counter, so it is checkpointed: a resume does not reset it.
                streak = self.counters["nonfinite_in_a_row"] + 1 if last.skipped else 0
                self.counters["nonfinite_in_a_row"] = streak
                if last.skipped:
                    self.counters["nonfinite_steps"] += 1
                    if streak >= cfg.max_nonfinite_in_a_row:
                        raise NonFiniteLossError(
                            f"non-finite {last.nonfinite} at step {self.step} for {streak} "
                            "steps in a row (each skipped; the last checkpoint is intact): "
                            "lower train.optim.lr, check the data, or use float32"
                        )
                logger.advance(self.step, f"loss {last.loss:.4f}")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    logger.log(self.step, self._metrics(last, window))
                    window = _new_window()
                if self.val_batches and self.step % cfg.val_every == 0:
                    logger.log(self.step, {"val_loss": self.validation_loss()})
                stop = self._stop_requested()
                if stop or self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
                if stop:
                    logger.print(f"signal received: saved step {self.step} and stopped")
                    stopped_by = self._stop_signal or signal.SIGTERM  # another rank's signal
                    break
        except torch.OutOfMemoryError as err:
            raise TrainingError(
                "out of memory: lower train.micro_batch_size (raising gradient accumulation), "
                "set train.activation_checkpointing=true, lower data.seq_len or "
                "data.max_images_per_seq, or shard with train.parallel=fsdp on more GPUs"
            ) from err
        finally:
            logger.close()
            self.loader.close()  # its workers, however the loop ended
            self._restore_signal_handlers()
            profiler.close(stopped_by_signal=stopped_by is not None)
            if (line := profiler.report()) is not None and d.is_main:
                print(line, flush=True)
        return {
            "step": self.step,
            "loss": last.loss if last else math.nan,
            "steps_run": self.step - start,
            "skipped_steps": self.counters["nonfinite_steps"],  # the run's, resumes included
            # A signal at the last step stopped nothing: the run is complete.
            "stopped_by": int(stopped_by) if stopped_by and self.step < cfg.steps else None,
        }

    def train_step(self, micro: list[Batch]) -> StepResult:
        d, model = self.d, self.model
        model.train()
        # [label tokens, images] of the step: int64, as a float32 count is exact only to 2**24
        counts = torch.tensor([[b.num_label_tokens, b.num_images] for b in micro]).sum(0)
        total_labels, total_images = d.all_reduce_sum(counts.to(d.device)).tolist()
        n_kind, n_ds = len(SOURCE_KINDS), len(self.dataset_names)
        # [loss_sum, per-kind loss sums, per-kind label counts, the same per dataset]
        sums = torch.zeros(1 + 2 * (n_kind + n_ds), device=d.device)
        aux_sums: dict[str, torch.Tensor] = {}
        loads: dict[int, torch.Tensor] = {}
        dtype = autocast_dtype(self.cfg.train, d.device)
        for i, batch in enumerate(micro):
            batch = batch.to(d.device, non_blocking=True)
            last = i == len(micro) - 1
            with self._sync(last), autocast(d.device, dtype):
                out = model(
                    **batch.model_inputs(),
                    num_label_tokens=max(total_labels, 1),
                    token_mask=None if batch.kind_ids is None else batch.kind_ids >= 0,
                    z_loss=self.cfg.train.z_loss > 0,
                    num_images=total_images,
                )
            add_loads(loads, last_expert_loads(model))  # before backward may recompute
            objective = out.loss
            for name, value in out.aux_losses.items():
                objective = objective + self._aux_weight(name) * value
                aux_sums[name] = aux_sums.get(name, 0.0) + value.detach().float()
            # DDP / FSDP average gradients over ranks; the loss is already a global mean
            (objective * d.world_size).backward()
            sums += step_sums(out.token_loss.detach(), batch, n_kind, n_ds)
        d.all_reduce_sum(sums)
        loss = float(sums[0]) / max(total_labels, 1)
        aux, total = {}, None
        if aux_sums:  # every rank runs the same model, so the same names in the same order
            aux_names = sorted(aux_sums)
            self._check_aux_weights(aux_names)
            reduced = d.all_reduce_sum(torch.stack([aux_sums[k] for k in aux_names]).reshape(-1))
            aux = dict(zip(aux_names, reduced.tolist()))
            total = loss + sum(self._aux_weight(k) * v for k, v in aux.items())
        per_kind = group_means(sums[1 : 1 + 2 * n_kind], SOURCE_KINDS)
        per_dataset = group_means(sums[1 + 2 * n_kind :], self.dataset_names)
        params = [p for p in model.parameters() if p.grad is not None]
        # grad_clip 0 = no clipping (the norm is still computed, for the log)
        clip = self.cfg.train.optim.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        nonfinite = nonfinite_part(loss, grad_norm, aux)
        skipped = bool(nonfinite)
        if not skipped:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(b.num_real_tokens for b in micro)
        images = sum(b.num_images for b in micro)
        return StepResult(
            loss=loss,
            per_kind=per_kind,
            tokens=tokens,
            slots=sum(b.input_ids.numel() for b in micro),
            images=images,
            grad_norm=grad_norm,
            skipped=skipped,
            aux=aux,
            objective=total,
            per_dataset=per_dataset,
            expert_load=load_fractions(loads, d.all_reduce_sum),
            nonfinite=nonfinite,
        )

    def _check_aux_weights(self, emitted: list[str]) -> None:
        """A weight set for an auxiliary loss the model does not emit is a typo (the weight
        meant keeps its default, silently); the built-in names may go unused (a registered
        FFN emitting its own losses)."""
        unused = set(self.cfg.train.aux_loss_weights) - set(emitted) - set(AUX_LOSSES)
        if unused:
            raise ConfigError(
                f"train.aux_loss_weights.{sorted(unused)[0]}: the model emits no auxiliary loss "
                f"of that name (it emits {', '.join(emitted)})"
            )

    def _aux_weight(self, name: str) -> float:
        if name == LOGIT_Z:
            return self.cfg.train.z_loss
        weights = self.cfg.train.aux_loss_weights
        if name not in weights:
            raise ConfigError(
                f"train.aux_loss_weights.{name} is not set, but the model emits the auxiliary "
                f"loss {name!r}: give it a weight (0 logs it without training on it)"
            )
        return weights[name]

    @contextlib.contextmanager
    def _sync(self, last: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on all but the last micro-batch."""
        m = self.model
        if isinstance(m, nn.parallel.DistributedDataParallel) and not last:
            with m.no_sync():
                yield
            return
        if hasattr(m, "set_requires_gradient_sync"):
            m.set_requires_gradient_sync(last)
        yield

    @torch.no_grad()
    def validation_loss(self) -> float:
        self.model.eval()
        dtype = autocast_dtype(self.cfg.train, self.d.device)
        sums = torch.zeros(2, device=self.d.device)
        for batch in self.val_batches:
            batch = batch.to(self.d.device)
            with autocast(self.d.device, dtype):
                out = self.model(**batch.model_inputs())
            sums += torch.stack([out.loss_sum.float(), sums.new_tensor(out.num_label_tokens)])
        self.d.all_reduce_sum(sums)
        self.model.train()
        return float(sums[0] / sums[1].clamp(min=1))

    def _metrics(self, r: StepResult, window: dict[str, float]) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - window["t"], 1e-9)
        world = self.d.world_size
        tokens_per_s = window["tokens"] * world / elapsed
        m: dict[str, Any] = {
            "loss": r.loss,
            **{f"loss_{k}": v for k, v in r.per_kind.items()},
            **{f"loss_ds_{k}": v for k, v in r.per_dataset.items()},
            **{f"aux_loss_{k}": v for k, v in r.aux.items()},
            **({"loss_total": r.objective} if r.objective is not None else {}),
            **load_metrics(r.expert_load),
            **r.metrics,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": r.grad_norm,
            "tokens_per_s": tokens_per_s,
            "images_per_s": window["images"] * world / elapsed,
            "data_wait": window["wait"] / elapsed,
            # the rows' non-padding share: low when the rows end early (e.g. at the image cap)
            "fill": window["tokens"] / max(1, window["slots"]),
            "nonfinite_steps": self.counters["nonfinite_steps"],
            **loader_counts(self.loader.state_dict()),
        }
        if self.d.device.type == "cuda":
            from mm1.models.summary import summarize

            if not hasattr(self, "_summary"):
                self._summary = summarize(self.model_cfg, self.cfg.data.seq_len)
                self._trained = trained_parts(self.raw_model, self.cfg.train)
            images_per_seq = window["images"] / max(1, window["tokens"]) * self.cfg.data.seq_len
            # the FLOPs of what trains: frozen weights take no gradients (LoRA, a frozen ViT)
            flops = self._summary.flops_per_token(images_per_seq, self._trained) * tokens_per_s
            peak = bf16_peak_flops(torch.cuda.get_device_name(self.d.device))
            if peak and autocast_dtype(self.cfg.train, self.d.device) == torch.bfloat16:
                m["mfu"] = flops / (peak * world)  # not against a bf16 peak in fp32, or unknown
            m["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return m

    # -- signals ---------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        def handler(signum: int, frame: object) -> None:
            if self._stop_signal is not None:  # a second signal: the step never ended (a
                # data wait, a hung collective); stop now, the last checkpoint kept
                raise StoppedAgain(signum)
            self._stop_signal = signum

        self._old_handlers = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, h in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, h)

    def _stop_requested(self) -> bool:
        """True on every rank once any rank got SIGTERM / SIGINT (ranks stop at the same step)."""
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0], device=self.d.device)
        return bool(self.d.all_reduce_sum(flag).item() > 0)
