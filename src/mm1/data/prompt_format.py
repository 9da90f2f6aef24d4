"""How images are written into a model's token sequences, saved with the model so that prompts at
evaluation and generation are written the way the model was trained.

`prompt_format.json` sits next to the tokenizer (an exported directory, a run's tokenizer/):
{"image_boundaries": bool} (`data.image_boundaries`: image slots between `<img>` and `</img>`).
"""

from __future__ import annotations

import json
from pathlib import Path

PROMPT_FORMAT = "prompt_format.json"


def save_prompt_format(directory: str | Path, image_boundaries: bool) -> None:
    path = Path(directory) / PROMPT_FORMAT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"image_boundaries": bool(image_boundaries)}) + "\n")


def load_prompt_format(directory: Path) -> bool:
    """`image_boundaries` of a model directory; False for directories written before
    prompt_format.json existed (a run directory's config.yaml is read then)."""
    path = directory / PROMPT_FORMAT
    if path.is_file():
        return bool(json.loads(path.read_text()).get("image_boundaries", False))
    config = directory.parent / "config.yaml"  # <run>/tokenizer -> <run>/config.yaml
    if directory.name == "tokenizer" and config.is_file():
        import yaml

        data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
        return bool(data.get("image_boundaries", False))
    return False
