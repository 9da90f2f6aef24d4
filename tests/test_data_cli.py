"""`mm1 data inspect` / `mm1 data stats` user mistakes: one line naming the option, exit 2; and
`data inspect --image-root` for files whose images are elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mm1 import cli
from tests.cli_helpers import one_line


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a cat on a mat"}\n')
    return path


def test_inspect_refuses_a_json_that_is_not_a_tokenizer(source, tmp_path, capsys) -> None:
    not_tok = tmp_path / "config.json"
    not_tok.write_text('{"model": "not a tokenizer"}\n')
    line = one_line(capsys, ["data", "inspect", str(source), "--tokenizer", str(not_tok)], 2)
    assert line.startswith(
        f"config error: --tokenizer {not_tok}: not a tokenizers tokenizer.json ("
    ), line


@pytest.mark.parametrize("n", ["0", "-3"])
def test_inspect_refuses_no_samples(source, capsys, n) -> None:
    line = one_line(capsys, ["data", "inspect", str(source), "-n", n], 2)
    assert line == f"config error: -n {n}: give 1 or more samples to show"


@pytest.mark.parametrize("sequences", ["0", "-1"])
def test_stats_refuses_no_sequences(tmp_path, capsys, sequences) -> None:
    # refused before the config is read: the path need not even exist
    argv = ["data", "stats", str(tmp_path / "cfg.yaml"), "--sequences", sequences]
    line = one_line(capsys, argv, 2)
    assert line == f"config error: --sequences {sequences}: give 1 or more"


def test_inspect_reads_images_under_an_image_root(tmp_path, capsys) -> None:
    """A LLaVA file whose images are in another folder showed none of its samples (every record
    `missing_image`): `--image-root` is a config source's `image_root`."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (12, 7)).save(tmp_path / "images" / "a.png")
    turns = [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo"}]
    data = tmp_path / "data" / "sft.json"
    data.parent.mkdir()
    data.write_text(json.dumps([{"id": "a", "image": "a.png", "conversations": turns}]))
    assert cli.main(["data", "inspect", str(data)]) in (0, None)
    assert "<image 12x7>" not in capsys.readouterr().out
    argv = ["data", "inspect", str(data), "--image-root", str(tmp_path / "images")]
    assert cli.main(argv) in (0, None)
    assert "<image 12x7>" in capsys.readouterr().out
    line = one_line(
        capsys, ["data", "inspect", str(data), "--format", "wds", "--image-root", "x"], 2
    )
    assert line.startswith("config error: --image-root: the wds format has no image paths")
