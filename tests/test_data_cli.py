"""`mm1 data inspect` / `mm1 data stats` user mistakes: one line naming the option, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

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
