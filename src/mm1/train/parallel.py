"""Process groups, devices and the one `parallelize` function applied to any model.

Order as in torchtitan: activation checkpointing and compile per block, then FSDP2 per block
(the blocks the model family's spec names: decoder and ViT blocks for MM1), then the root; or
DDP around the whole model.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from mm1.config import Config, ConfigError, TrainConfig
from mm1.models.family import ModelFamily, family_of

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def init_distributed() -> Dist:
    """From torchrun's environment; NCCL on GPU, gloo on CPU. A single process needs nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device)


def shutdown_distributed(finished: bool) -> bool:
    """Destroy the process group, if any, before the interpreter exits: a gloo group left to the
    interpreter's finalisation can abort the process (SIGABRT, "terminate called without an
    active exception") after a run that finished. After a command that `finished`, every rank
    first waits for the others, so none closes its connections while a peer still uses them;
    after an error it does not (a peer may never arrive). Returns whether there was a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if finished:
        dist.barrier()
    dist.destroy_process_group()
    return True


def exit_now(code: int) -> None:
    """End a rank of a finished multi-process command without the interpreter's finalisation.
    Destroying the group was not enough: a rank still died at exit with SIGABRT ("terminate
    called without an active exception", a C++ thread of torch's distributed stack destroyed
    while joinable) about once in 50 two-process runs, after its work was done and saved. Every
    file is closed by then; the standard streams and logging are flushed here."""
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def accumulation_steps(train: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank: the global batch split over the ranks."""
    per_rank = train.batch_size // world_size
    if per_rank * world_size != train.batch_size or per_rank % train.micro_batch_size:
        raise ConfigError(
            f"train.batch_size={train.batch_size} must split evenly into "
            f"{world_size} ranks x train.micro_batch_size={train.micro_batch_size}"
        )
    return per_rank // train.micro_batch_size


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default, fp32 (no autocast) on CPU."""
    if cfg.dtype == "float32" or (cfg.dtype == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[object]:
    """Autocast to `dtype` on `device`, or nothing when `dtype` is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The transformer-block lists of a model, as its family's spec names them."""
    return family_of(model).blocks(model)


def refuse_unsupported_placement(cfg: Config, d: Dist) -> None:
    """What a run cannot do on these processes and devices, refused before any work."""
    refuse_unsupported_processes(cfg.train, d.world_size)
    if cfg.model.decoder.attention == "flex" and d.device.type != "cuda":
        raise ConfigError(
            "model.decoder.attention=flex needs a GPU to train (torch has no FlexAttention "
            "backward on CPU); use model.decoder.attention=sdpa"
        )
    if cfg.train.lora.quantize == "nf4":
        from mm1.models.nf4 import torchao_nf4

        torchao_nf4()  # installed


def refuse_unsupported_processes(t: TrainConfig, processes: int) -> None:
    """What `t` cannot train on `processes` processes (`mm1 info --processes` asks too)."""
    if processes > 1 and t.parallel == "none":
        raise ConfigError(
            f"train.parallel=none with {processes} processes would train {processes} "
            "unsynchronised copies: use train.parallel=fsdp or ddp"
        )
    if processes > 1 and t.shard_size > 1 and processes % t.shard_size:
        raise ConfigError(
            f"train.shard_size={t.shard_size} does not divide the {processes} processes into "
            "shard groups: use a divisor of the process count (the GPUs per node), or 0"
        )
    if processes > 1 and t.parallel == "fsdp" and t.lora.quantize == "nf4":
        raise ConfigError(
            "train.lora.quantize=nf4 runs in one process or with train.parallel=ddp "
            "(FSDP2 builds the model on the meta device, and the NF4 weights are "
            "quantized from loaded ones): set train.parallel=ddp"
        )


def fsdp_shards(t: TrainConfig, processes: int) -> int:
    """Over how many processes FSDP2 shards each weight (1: not sharded)."""
    if t.parallel != "fsdp":
        return 1
    return t.shard_size if 0 < t.shard_size < processes else processes


def hsdp_layout(t: TrainConfig, processes: int) -> str | None:
    """The line a run prints when HSDP shards it (`train.shard_size`), else None."""
    shards = fsdp_shards(t, processes)
    if shards in (1, processes):
        return None
    return f"HSDP: each weight sharded over {shards} processes, replicated {processes // shards}x"


def shard_mesh(t: TrainConfig, d: Dist) -> DeviceMesh | None:
    """HSDP's 2-D mesh (replicas x shards, each shard group consecutive ranks: one node's
    GPUs), or None: FSDP2 then shards over every process."""
    shards = fsdp_shards(t, d.world_size)
    if shards == d.world_size:
        return None
    if d.world_size % shards:  # refuse_unsupported_processes says so first
        raise ValueError(f"shard groups of {shards} do not divide {d.world_size} processes")
    from torch.distributed.device_mesh import init_device_mesh

    shape = (d.world_size // shards, shards)
    return init_device_mesh(d.device.type, shape, mesh_dim_names=("replicate", "shard"))


def fsdp_ignored_params(model: nn.Module, family: ModelFamily) -> set[nn.Parameter]:
    """The parameters FSDP2 leaves whole on every process: a frozen image tokenizer's (chameleon,
    seed), kept unsharded and in fp32, as bf16 weights would flip codes near a tie and training
    would read other codes than evaluation (in fp32) does."""
    return set(model.vision.parameters()) if getattr(family, "image_tokenizer", "") else set()


def parallelize(
    model: nn.Module, cfg: TrainConfig, d: Dist, family: ModelFamily | None = None
) -> nn.Module:
    """Apply activation checkpointing, compile and FSDP2 / DDP as configured, per block of
    the model's family spec (`family`, default: the one `model.cfg.family` names).

    A model built on the meta device (FSDP only) is sharded first, then each rank allocates and
    initialises its own shards (`model.init_weights()`, which also computes the buffers), so no
    rank ever holds the full model."""
    family = family or family_of(model)
    units = family.blocks(model)
    # The recomputed forward must draw LoRA's dropout masks again (the blocks have no other
    # randomness); saving the RNG state costs a little per block, so only then.
    keep_rng = cfg.lora.rank > 0 and cfg.lora.dropout > 0
    # A checkpointed region compiles whole or not at all, and NF4's products (QLoRA) stay
    # outside the graphs: such blocks are compiled first, then checkpointed.
    compile_first = cfg.lora.quantize == "nf4"
    for blocks in units:
        for i in range(len(blocks)):
            if cfg.compile and compile_first:
                blocks[i] = torch.compile(blocks[i])
            if cfg.activation_checkpointing:
                blocks[i] = checkpoint_wrapper(blocks[i], preserve_rng_state=keep_rng)
            if cfg.compile and not compile_first:
                blocks[i] = torch.compile(blocks[i])
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and not (d.enabled and cfg.parallel == "fsdp"):
        raise ValueError("a model on the meta device can only be materialised sharded (FSDP)")
    if not on_meta:
        model.to(d.device)
    if not d.enabled or cfg.parallel == "none":
        return model
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        from mm1.models.nf4 import NF4Weight

        # NF4 weights (QLoRA) never change: sent from the first rank once here, not (as DDP
        # does with buffers) before every forward.
        frozen = {
            f"{path}.{name}": b
            for path, m in model.named_modules()
            if isinstance(m, NF4Weight)
            for name, b in m.named_buffers()
        }
        for b in frozen.values():
            dist.broadcast(b, src=0)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(frozen))
        ids = [d.local_rank] if d.device.type == "cuda" else None
        # Gradients as views of the all-reduce buckets: DDP's default keeps both, a second copy
        # of every trained weight's gradient on each process.
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = None
    dtype = autocast_dtype(cfg, d.device)
    if dtype is not None:
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    kw = {"mp_policy": mp} if mp is not None else {}
    mesh = shard_mesh(cfg, d)
    if mesh is not None:
        kw["mesh"] = mesh
    for blocks in units:
        for block in blocks:
            fully_shard(block, **kw)
    root_kw = dict(kw)
    ignored = fsdp_ignored_params(model, family)
    if ignored:
        root_kw["ignored_params"] = ignored
        if mp is not None:  # and the pixels reach the tokenizer uncast, for the same reason
            root_kw["mp_policy"] = replace(mp, cast_forward_inputs=False)
    fully_shard(model, **root_kw)
    if on_meta:
        # Sharded before any weight existed: each rank allocates and initialises only its shards.
        model.to_empty(device=d.device)
        model.init_weights()
    return model
