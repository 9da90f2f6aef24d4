"""Which demonstrations a few-shot query gets: random per query (reproducible per seed), RICES
(the support examples nearest by image features, most similar last, as OpenFlamingo), and the
shuffled-image control's derangement of query images. A demonstration never shows the query's
image."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from mm1.eval.tasks import Example

log = logging.getLogger(__name__)


def random_demos(
    support: Sequence[Example],
    query: Example,
    k: int,
    seed: int,
    key: str = "",
    exclude_images: Sequence[Path] = (),
    image_counts: Counter[Path] | None = None,
) -> list[Example]:
    """`k` distinct support examples drawn for this query, reproducible from (seed, key, query
    id), none showing the query's image (nor any of `exclude_images`)."""
    if k == 0:
        return []
    excluded = {query.image, *exclude_images}
    counts = image_counts if image_counts is not None else Counter(s.image for s in support)
    available = len(support) - sum(counts.get(p, 0) for p in excluded)
    if available < k:
        raise ValueError(
            f"{k} demonstrations wanted for query {query.id} but the support split has only "
            f"{available} examples with other images"
        )
    rng = random.Random(f"{seed}|{key}|{query.id}")
    chosen: list[Example] = []
    seen: set[int] = set()
    while len(chosen) < k:
        i = rng.randrange(len(support))
        if i in seen:
            continue
        seen.add(i)
        if support[i].image not in excluded:
            chosen.append(support[i])
    return chosen


def rices_rank(
    query_features: torch.Tensor,
    support_features: torch.Tensor,
    k: int,
    exclude: Sequence[set[int]] | None = None,
    chunk: int = 256,
) -> list[list[int]]:
    """RICES: for each query row, the indices of the `k` most cosine-similar support rows,
    least similar first and most similar last (next to the query, as OpenFlamingo orders them).
    `exclude[i]` holds support indices query i must not get."""
    if k == 0:
        return [[] for _ in range(query_features.shape[0])]
    if k > support_features.shape[0]:
        raise ValueError(
            f"{k} demonstrations wanted but the support split has {support_features.shape[0]}"
        )
    q = torch.nn.functional.normalize(query_features.float(), dim=-1)
    s = torch.nn.functional.normalize(support_features.float(), dim=-1)
    out: list[list[int]] = []
    for start in range(0, q.shape[0], chunk):
        sims = q[start : start + chunk] @ s.T
        if exclude is not None:
            for r in range(sims.shape[0]):
                banned = list(exclude[start + r])
                if banned:
                    sims[r, banned] = float("-inf")
        top = sims.topk(k, dim=-1)
        for r in range(sims.shape[0]):
            if bool(torch.isinf(top.values[r]).any()):
                raise ValueError(f"query {start + r}: fewer than {k} support examples allowed")
            out.append(top.indices[r].flip(0).tolist())
    return out


def shuffled_images(queries: Sequence[Example], seed: int = 0) -> dict[str, Path]:
    """{query id: another query's image}: a fixed derangement of the distinct query images, so
    every query is shown an image that is not its own."""
    distinct = sorted({q.image for q in queries})
    if len(distinct) < 2:
        raise ValueError("shuffle_images needs at least two distinct query images")
    random.Random(f"shuffle|{seed}").shuffle(distinct)
    moved = {p: distinct[(i + 1) % len(distinct)] for i, p in enumerate(distinct)}
    return {q.id: moved[q.image] for q in queries}


def warn_if_rices_is_weak(model: torch.nn.Module, demo_selection: str) -> None:
    """RICES ranks demonstrations by the mean of the model's image tokens: without an image
    encoder that is a linear map of the image's mean patch (`model.family: fuyu`: its colours),
    with an image tokenizer the mean of its codes' embeddings (chameleon, seed), not what the
    image shows. Warned, not
    refused: the method is well defined, only weak."""
    from mm1.models.family import family_of

    family = family_of(model)
    if demo_selection == "rices" and (family.image_tokenizer or not family.has_encoder):
        why = (
            "reads images as discrete codes, so demonstrations are ranked by the mean embedding "
            "of each image's codes"
            if family.image_tokenizer
            else "has no image encoder, so demonstrations are ranked by a linear map of each "
            "image's mean patch (its colours)"
        )
        log.warning("eval.demo_selection=rices: model.family=%s %s", model.cfg.family, why)
