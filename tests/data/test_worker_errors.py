"""Data errors are one line wherever they happen: in a loader worker (not torch's "Caught X in
DataLoader worker process 0" and a traceback), and before the model is built for a source that
names no data."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import yaml

from mm1 import cli
from mm1.config import SourceConfig, load_config
from mm1.data.catalog import check_sources
from mm1.data.loader import LoaderSettings, build_loader
from mm1.data.prompt_format import PromptFormat
from mm1.data.sources import DataError
from mm1.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, qwen_like) -> Path:
    return qwen_like(tmp_path_factory.mktemp("tok") / "tok")


def _settings(path: Path | str) -> LoaderSettings:
    return LoaderSettings(
        sources=[SourceConfig(format="text", path=str(path), kind="text")],
        seq_len=32,
        micro_batch_size=1,
        prompt_format=PromptFormat(4),
    )


@pytest.mark.parametrize("workers", [0, 1])
def test_too_many_bad_records_is_one_line_in_a_worker(tok_dir, tmp_path, workers: int) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{broken\n" * 300)
    loader = build_loader(_settings(bad), Tokenizer.from_file(tok_dir), None, num_workers=workers)
    with pytest.raises(DataError) as err, contextlib.closing(loader):
        next(iter(loader))
    message = str(err.value)
    assert "bad.jsonl" in message and "max_error_rate" in message
    assert "\n" not in message and "Caught" not in message


def test_a_missing_shard_is_one_line_in_a_worker(tok_dir, tmp_path) -> None:
    loader = build_loader(
        _settings(tmp_path / "gone.jsonl"), Tokenizer.from_file(tok_dir), None, num_workers=1
    )
    with pytest.raises(FileNotFoundError) as err, contextlib.closing(loader):
        next(iter(loader))
    assert "gone.jsonl" in str(err.value) and "\n" not in str(err.value)


def test_check_sources_names_the_key(tmp_path) -> None:
    (tmp_path / "a-000.jsonl").write_text('{"text": "x"}\n')
    ok = [SourceConfig(format="text", path=str(tmp_path / "a-{000..000}.jsonl"))]
    check_sources(ok)
    cases = {
        str(tmp_path / "nothing.jsonl"): "no such file",
        str(tmp_path / "*.parquet"): "no text shards found",
        str(tmp_path / "a-{000..001}.jsonl"): "a-001.jsonl",
    }
    for path, why in cases.items():
        with pytest.raises(FileNotFoundError, match=rf"data\.sources\[1\]\.path: .*{why}"):
            check_sources([ok[0], SourceConfig(format="text", path=path)])
    with pytest.raises(FileNotFoundError, match=r"data\.val_sources\[0\]\.image_root"):
        src = SourceConfig(format="llava", path=str(tmp_path / "a-000.jsonl"))
        src.image_root = str(tmp_path / "no-images")
        check_sources([src], "data.val_sources")
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"datasets": [{"json_path": "gone.json"}]}))
    with pytest.raises(FileNotFoundError, match=r"data\.sources\[0\]\.path: .*gone\.json"):
        check_sources([SourceConfig(format="llava_yaml", path=str(tmp_path / "d.yaml"))])


def test_train_reports_a_missing_source_before_building_the_model(
    tok_dir, tmp_path, monkeypatch, capsys
) -> None:
    import mm1.train.trainer as trainer

    def built(*args, **kwargs):
        raise AssertionError("the model was built before the sources were checked")

    monkeypatch.setattr(trainer, "build_model", built)
    cfg = {
        "data": {
            "tokenizer": str(tok_dir),
            "sources": [{"format": "text", "path": str(tmp_path / "missing" / "*.jsonl")}],
        },
        "train": {"run_dir": str(tmp_path / "run"), "parallel": "none"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(cfg))
    load_config(path)  # the config itself is valid
    assert cli.main(["train", str(path)]) == 2
    out = capsys.readouterr().out
    assert "data.sources[0].path" in out and "missing" in out
    assert len(out.strip().splitlines()) == 1


def test_a_run_whose_loader_worker_fails_exits(tok_dir, tmp_path) -> None:
    """`mm1 train` with a loader worker and a source of bad records: the one-line error, then
    the process exits. It hung: the persistent worker, which ignores SIGTERM so that the
    trainer can save first, outlived the run, and the interpreter waited for it at exit."""
    import os
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{broken\n" * 300)
    tiny = {"dim": 32, "layers": 1, "heads": 4, "kv_heads": 2, "ffn_dim": 64}
    vision = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}
    cfg = {
        "model": {
            "vision": {**vision, "mlp_dim": 64},
            "connector": {"type": "avgpool", "num_tokens": 4},
            "decoder": tiny,
        },
        "data": {
            "tokenizer": str(tok_dir),
            "sources": [{"format": "text", "path": str(bad)}],
            "seq_len": 32,
            "num_workers": 1,
        },
        "train": {"run_dir": str(tmp_path / "run"), "parallel": "none", "steps": 2},
        "eval": {"tasks": []},
    }
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(cfg))
    load_config(path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mm1.cli", "train", str(path), "train.progress=false"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "bad.jsonl" in done.stdout and "max_error_rate" in done.stdout
