"""CLIP's symmetric InfoNCE loss, with the negatives of every rank.

Across ranks (`gather_with_local_grad`): each rank all-gathers the image and text features of
every rank and puts its own, gradient-carrying tensors back in its slot, then computes the loss
over the whole global batch (every row, every column). So every rank computes the same value,
the global loss, and its gradient with respect to the rank's own features is exactly the global
loss's; what flows back to the shared parameters from rank r is the part through rank r's
features. Summing those parts over ranks gives the global gradient; DDP / FSDP *average* over
ranks, so the trainer backpropagates `loss * world_size` (tests/train/test_contrastive.py
checks both against a single process on the joined batch). The logit scale enters every rank's
loss directly, not through one rank's features: its gradient is divided by the world size here,
so that the same sum-over-ranks holds for it too.

Gradient accumulation does not add negatives: each micro-batch is its own contrastive batch
(the negatives of a pair are the other pairs of the same micro-batch on every rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """(B_local, D) -> (world * B_local, D) in rank order; only this rank's rows carry a
    gradient (the others are copies). A single process returns `x` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def contrastive_logits(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """(N, N) image-to-text logits: scale * cosine similarity of L2-normalised features."""
    image = F.normalize(image, dim=-1)
    text = F.normalize(text, dim=-1)
    return logit_scale * image @ text.t()


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the pairs (image[i], text[i]): the mean of the image-to-text and
    text-to-image cross-entropies, each averaged over the N pairs."""
    logits = contrastive_logits(image, text, logit_scale)
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def gathered_clip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """`clip_loss` over the features of every rank (this rank's local batch in its slot, with
    its gradient): the global batch's loss, the same value on every rank."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:  # same value; a 1/world share of the scale's gradient per rank
        logit_scale = logit_scale.detach() + (logit_scale - logit_scale.detach()) / world
    return clip_loss(gather_with_local_grad(image), gather_with_local_grad(text), logit_scale)


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a per-rank scalar mean `x` (every rank holding equally many
    items), the same value on every rank, with a 1/world share of `x`'s gradient: what a
    per-rank loss must be beside a gathered one, whose backward the trainer scales by the world
    size (a single process returns `x` itself)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    total = x.detach().clone()
    dist.all_reduce(total)
    return x / world + (total - x.detach()) / world
