"""How long an evaluation's few-shot prompts were against the context the model was trained on.

A prompt longer than the training sequence, or with more images than any training document, is
evaluated out of the training distribution: reports say so next to the scores, from the
`prompt_tokens` every evaluation record keeps (docs/ablations.md, "The demo's few-shot curve").
"""

from __future__ import annotations

from typing import Any


def prompt_lengths(results: dict[str, Any]) -> dict[str, dict[str, tuple[float, int]]]:
    """{task: {shots: (mean, max) prompt tokens}} over every seed's records of an `evaluate`
    result (the "0_plain" runs included)."""
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for task, by_shots in results.get("predictions", {}).items():
        for shots, by_seed in by_shots.items():
            n = [r["prompt_tokens"] for recs in by_seed.values() for r in recs]
            if n:
                out.setdefault(task, {})[shots] = (sum(n) / len(n), max(n))
    return out


def _shot_key(shots: str) -> tuple[int, str]:
    head = shots.split("_", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, shots)


def _images(shots: str) -> int | None:
    """Images in a prompt of this run: the demonstrations' and the query's (0-shot text
    demonstrations show none)."""
    head = shots.split("_", 1)[0]
    return int(head) + 1 if head.isdigit() else None


def _excess(longest: int, images: int | None, seq_len: int, max_images: int | None) -> list[str]:
    out = []
    if longest > seq_len:
        out.append(f"+{longest - seq_len} tokens")
    if max_images is not None and images is not None and images > max_images:
        out.append(f"+{images - max_images} images")
    return out


def prompt_length_table(
    results: dict[str, Any], seq_len: int, max_images: int | None = None
) -> list[str]:
    """Markdown lines: per task and shot count, the prompts' mean and longest length in tokens,
    their images, and whether they fit the training context (`seq_len` tokens and, when given,
    `max_images` images)."""
    lines = [
        "| task | shots | images per prompt | prompt tokens (mean) | longest | "
        "within the training context |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for task, by_shots in prompt_lengths(results).items():
        for shots in sorted(by_shots, key=_shot_key):
            mean, longest = by_shots[shots]
            images = _images(shots)
            excess = _excess(longest, images, seq_len, max_images)
            fits = f"**no** ({', '.join(excess)})" if excess else "yes"
            shown = "?" if images is None else images
            lines.append(f"| {task} | {shots} | {shown} | {mean:.0f} | {longest} | {fits} |")
    return lines


def beyond_context(
    results: dict[str, Any], seq_len: int, max_images: int | None = None
) -> list[str]:
    """ "task k-shot" for each run whose longest prompt exceeds `seq_len` tokens or shows more
    than `max_images` images."""
    return [
        f"{task} {shots}-shot"
        for task, by_shots in prompt_lengths(results).items()
        for shots in sorted(by_shots, key=_shot_key)
        if _excess(by_shots[shots][1], _images(shots), seq_len, max_images)
    ]
