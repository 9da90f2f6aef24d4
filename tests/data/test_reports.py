"""What the data side tells the user: one-line warnings, progress where no bar can draw."""

from __future__ import annotations

import logging
from pathlib import Path

from mm1.data.sources import ReadStats, read_wds_shard, reset_warning_counts
from mm1.data.synthetic import write_world


def test_a_zero_byte_tar_is_one_warning_line(tmp_path: Path, caplog) -> None:
    reset_warning_counts()
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all")
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        assert list(read_wds_shard(tmp_path / "empty.tar", stats=stats)) == []
        assert list(read_wds_shard(tmp_path / "junk.tar", stats=stats)) == []
    assert stats.skipped == {"corrupt_tar": 2}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("\n" not in m for m in messages)
    assert "empty.tar: corrupt_tar (unreadable tar: 0-byte file)" in messages[0]
    assert "not a tar archive (16 bytes)" in messages[1]


def test_writing_a_world_reports_each_stage_off_a_terminal(tmp_path: Path, capsys) -> None:
    write_world(tmp_path / "w", size="tiny", progress=True)
    err = capsys.readouterr().err
    assert "synthetic world: captions (1/11" in err and "synthetic world: tokenizer (11/11" in err
    assert "synthetic world: sft_presence (8/11" in err
