"""A step's loss by group: per source kind and per dataset, summed on the device as the step
runs (one scatter per sum, no host sync per group) and averaged once it is over."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mm1.batch import IGNORE_INDEX, Batch


def step_sums(token_loss: torch.Tensor, batch: Batch, n_kind: int, n_ds: int) -> torch.Tensor:
    """[loss sum, then per kind and per dataset: loss sums by group, label counts by group]."""
    labelled = batch.labels != IGNORE_INDEX
    return torch.cat(
        [
            token_loss.sum().float().reshape(1),
            _group_sums(token_loss, labelled, batch.kind_ids, n_kind),
            _group_sums(token_loss, labelled, batch.dataset_ids, n_ds),
        ]
    )


def _group_sums(
    token_loss: torch.Tensor, labelled: torch.Tensor, ids: torch.Tensor | None, n: int
) -> torch.Tensor:
    """Loss sums of the labelled tokens of groups 0..n-1, then their label counts (2n)."""
    out = torch.zeros(2 * n, device=token_loss.device)
    if ids is None or n == 0:
        return out
    # One scatter per sum, no boolean indexing: no host sync per group on a GPU.
    ids = ids.to(token_loss.device)
    bins = torch.where(labelled & (ids >= 0), ids, n).flatten()  # n: not counted
    loss = torch.zeros(n + 1, device=token_loss.device)
    loss.scatter_add_(0, bins, token_loss.detach().float().flatten())
    count = torch.zeros(n + 1, device=token_loss.device)
    count.scatter_add_(0, bins, torch.ones(bins.shape, device=token_loss.device))
    out[:n], out[n:] = loss[:n], count[:n]
    return out


def group_means(sums: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """Mean loss per named group from `_group_sums`' layout; groups without labels left out."""
    n, values = len(names), sums.tolist()  # one transfer, not two per group
    return {k: values[j] / values[n + j] for j, k in enumerate(names) if values[n + j] > 0}
