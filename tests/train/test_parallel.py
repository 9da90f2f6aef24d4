"""mm1's model under `parallelize` on gloo processes: FSDP2-sharded forward passes where the
ranks' batches differ in whether they hold images (the encoder's all-gathers must still match);
HSDP (`train.shard_size`) on 4 processes, 2 replicas of 2 shards."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

from mm1.config import ConnectorConfig, DecoderConfig, ModelConfig, TrainConfig, VisionConfig
from tests.gloo import WORLD, gloo_rank, spawn_ranks

IMAGE_SIZE = 32


def _config() -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(
            image_size=IMAGE_SIZE, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64
        ),
        connector=ConnectorConfig(type="avgpool", num_tokens=4),
        decoder=DecoderConfig(vocab_size=64, dim=32, layers=2, heads=4, kv_heads=2, ffn_dim=64),
    )


def _batch(model, with_image: bool) -> dict[str, torch.Tensor | None]:
    ids = torch.randint(0, 60, (1, 16), generator=torch.Generator().manual_seed(int(with_image)))
    pixels = None
    if with_image:
        ids[0, 2:6] = model.image_token_id
        pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator())
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def _worker(rank: int, root: str) -> None:
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    with gloo_rank(rank, root):
        from mm1.models.build import build_model
        from mm1.train.parallel import Dist, parallelize

        torch.manual_seed(0)  # the same weights on both ranks
        model = build_model(_config())
        reference = copy.deepcopy(model).eval()
        sharded = parallelize(model, TrainConfig(parallel="fsdp"), Dist(rank, WORLD, rank))
        sharded.eval()
        batch = _batch(reference, with_image=rank == 0)  # rank 1's batch is text only
        with torch.no_grad():
            got = sharded(**batch).loss.item()
            want = reference(**batch).loss.item()
        torch.save({"got": got, "want": want}, Path(root) / f"rank{rank}.pt")


def test_fsdp_validation_with_images_on_one_rank_only(tmp_path: Path) -> None:
    """Validation runs in eval mode without gradients; a text-only batch on one rank must still
    run the (sharded) encoder, or the ranks' all-gathers mismatch and the run hangs or dies."""
    spawn_ranks(_worker, tmp_path, what="FSDP validation")
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["got"] == pytest.approx(out["want"], rel=1e-5)


HSDP_WORLD = 4


def _text_batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 60, (1, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _hsdp_worker(rank: int, root: str) -> None:
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    warnings.filterwarnings("ignore", message="DTensor random operators")
    with gloo_rank(rank, root, world=HSDP_WORLD):
        import torch.distributed as dist

        from mm1.models.build import build_model
        from mm1.train.parallel import Dist, parallelize

        train = TrainConfig(parallel="fsdp", shard_size=2)
        d = Dist(rank, HSDP_WORLD, rank)
        torch.manual_seed(0)  # the same weights on every rank
        model = build_model(_config())
        reference = copy.deepcopy(model)
        sharded = parallelize(model, train, d)
        sharded(**_text_batch(rank)).loss.backward()  # each rank its own batch
        # every rank's batch holds as many labels: the mean of the 4 losses is the global one
        torch.stack([reference(**_text_batch(r)).loss for r in range(HSDP_WORLD)]).mean().backward()
        grads_off = [
            n
            for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True)
            if not torch.allclose(p.grad.full_tensor(), q.grad, rtol=1e-4, atol=1e-6)
        ]
        placements = {str(p.placements) for p in model.parameters()}
        # a checkpoint's size: each weight once (DCP writes one replica), an item per rank
        from mm1.train.disk_space import _ITEM_OVERHEAD, size_estimate

        sharded_state = model.state_dict()
        items = sum(HSDP_WORLD if hasattr(t, "to_local") else 1 for t in sharded_state.values())
        whole = sum(t.nbytes for t in reference.state_dict().values())
        estimate_off = size_estimate(sharded_state, HSDP_WORLD) - items * _ITEM_OVERHEAD - whole
        # built on the meta device, as a sharded run is: the replicas initialise alike
        meta = build_model(_config(), meta=True)
        parallelize(meta, train, d)
        replicas_off = []
        for n, p in meta.named_parameters():
            full = p.full_tensor().contiguous()
            got = [torch.empty_like(full) for _ in range(HSDP_WORLD)]
            dist.all_gather(got, full)
            if not all(torch.equal(got[0], g) for g in got):
                replicas_off.append(n)
        # a starting point read on rank 0 alone reaches every shard of both replicas
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        want = reference.state_dict()
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        given = {k: v.clone() for k, v in want.items()} if rank == 0 else {}  # it is consumed
        set_model_state_dict(meta, given, options=options)
        loaded_off = [
            n for n, p in meta.named_parameters() if not torch.equal(p.full_tensor(), want[n])
        ]
        out = {
            "grads_off": grads_off,
            "placements": placements,
            "replicas_off": replicas_off,
            "loaded_off": loaded_off,
            "estimate_off": estimate_off,
        }
        torch.save(out, Path(root) / f"hsdp{rank}.pt")


def test_hsdp_averages_gradients_over_every_replica_and_shard(tmp_path: Path) -> None:
    """`train.shard_size=2` on 4 processes: each weight sharded over 2, replicated twice; one
    backward gives the gradient of the mean loss over all 4 ranks' batches, as one unsharded
    model computes it; a model built on the meta device initialises both replicas alike, and
    takes a starting state that rank 0 alone read (as a sharded run's start does)."""
    spawn_ranks(_hsdp_worker, tmp_path, what="HSDP", world=HSDP_WORLD, timeout=180)
    for rank in range(HSDP_WORLD):
        out = torch.load(tmp_path / f"hsdp{rank}.pt")
        assert out["placements"] == {"(Replicate(), Shard(dim=0))"}
        assert out["grads_off"] == [] and out["replicas_off"] == [] and out["loaded_off"] == []
        assert out["estimate_off"] == 0
