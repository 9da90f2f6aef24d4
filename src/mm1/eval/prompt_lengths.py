"""How long an evaluation's few-shot prompts were against the context the model was trained on.

A prompt longer than the training sequence (or with more images than any training document)
is evaluated out of the training distribution: reports say so next to the scores, from the
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


def prompt_length_table(results: dict[str, Any], seq_len: int) -> list[str]:
    """Markdown lines: per task and shot count, the prompts' mean and longest length in tokens,
    their images, and whether the longest fits the `seq_len`-token training context."""
    lengths = prompt_lengths(results)
    lines = [
        f"| task | shots | images per prompt | prompt tokens (mean) | longest | "
        f"within the {seq_len}-token training context |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for task, by_shots in lengths.items():
        for shots in sorted(by_shots, key=_shot_key):
            mean, longest = by_shots[shots]
            head = shots.split("_", 1)[0]
            images = int(head) + 1 if head.isdigit() else "?"
            fits = "yes" if longest <= seq_len else f"**no** (+{longest - seq_len})"
            lines.append(f"| {task} | {shots} | {images} | {mean:.0f} | {longest} | {fits} |")
    return lines


def beyond_context(results: dict[str, Any], seq_len: int) -> list[str]:
    """ "task k-shot" for each run whose longest prompt exceeds `seq_len` tokens."""
    return [
        f"{task} {shots}-shot"
        for task, by_shots in prompt_lengths(results).items()
        for shots in sorted(by_shots, key=_shot_key)
        if by_shots[shots][1] > seq_len
    ]
