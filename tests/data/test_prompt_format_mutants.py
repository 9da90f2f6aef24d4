"""PromptFormat behaviour the format tests left unpinned (found by mutation testing): type
checks, the `plain` fallback, one-line errors for malformed files, the high_res flag count, and
where a directory's image boundaries are read from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mm1.data.chat_template import BUILTIN_TEMPLATES, select_template
from mm1.data.images import ImageProcessor
from mm1.data.prompt_format import (
    PROMPT_FORMAT,
    PromptFormat,
    load_prompt_format,
    saved_image_boundaries,
)

Q = 4


@pytest.mark.parametrize("value", [True, False, 4.0, "4"])
def test_image_tokens_must_be_an_int(value) -> None:
    with pytest.raises(ValueError, match="image_tokens must be an int"):
        PromptFormat(value)


def test_without_any_template_the_format_chooses_plain() -> None:
    fmt = PromptFormat(Q)
    assert fmt.template_choice(None) == "plain"
    assert select_template(None, fmt.template_choice(None)) == ("plain", BUILTIN_TEMPLATES["plain"])
    assert fmt.template_choice("{{ 'x' }}") is None  # the tokenizer's own
    assert PromptFormat(Q, chat_template="chatml").template_choice(None) == "chatml"


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ([1, 2], "not a JSON object"),
        (
            {"image_layout": "dynamic", "image_tokens": Q, "crop_size": 32, "min_tiles": "2"},
            "",  # the comparison's own TypeError text follows: Python's wording, not ours
        ),
    ],
)
def test_malformed_files_are_value_errors_naming_the_file(
    tmp_path: Path, content, error: str
) -> None:
    (tmp_path / PROMPT_FORMAT).write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"{PROMPT_FORMAT}: .*{error}"):
        load_prompt_format(tmp_path, Q)


def test_high_res_needs_one_flag_per_image() -> None:
    fmt, image = PromptFormat(Q), Image.new("RGB", (16, 16))
    with pytest.raises(ValueError, match="high_res has 2 flags for 1 images"):
        fmt.pixel_values(ImageProcessor.clip(16), [image], [True, False])
    with pytest.raises(ValueError, match="high_res has 1 flags for 2 images"):
        fmt.image_info([image, image], [True])


def test_image_boundaries_come_from_the_format_file_first(tmp_path: Path) -> None:
    tok_dir = tmp_path / "run" / "tokenizer"
    tok_dir.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("data:\n  image_boundaries: false\n")
    (tok_dir / PROMPT_FORMAT).write_text(json.dumps({"image_boundaries": True}))
    assert saved_image_boundaries(tok_dir) is True
    (tok_dir / PROMPT_FORMAT).write_text("[]")
    assert saved_image_boundaries(tok_dir) is False


def test_only_a_runs_tokenizer_directory_reads_the_runs_config(tmp_path: Path) -> None:
    # An export next to some config.yaml is not a run's tokenizer/: its boundaries are unknown.
    (tmp_path / "config.yaml").write_text("data:\n  image_boundaries: true\n")
    export = tmp_path / "export"
    export.mkdir()
    assert saved_image_boundaries(export) is False
    assert load_prompt_format(export, Q) == PromptFormat(Q)
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    assert saved_image_boundaries(tok_dir) is True
