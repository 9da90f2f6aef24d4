"""How few-shot evaluation shares its batches among torchrun's ranks (`mm1.eval.ranks`); the
2-process run against one process is tests/test_cli.py's torchrun test."""

from __future__ import annotations

import pytest

from mm1.eval.ranks import EvalRanks, rank_device


def test_each_rank_takes_every_world_th_batch_and_counts_its_items() -> None:
    first, second = EvalRanks(0, 2), EvalRanks(1, 2)
    assert list(first.mine(3)) == [0, 2] and list(second.mine(3)) == [1]
    # 5 items in batches of 2: [0, 1] [2, 3] [4]
    assert first.share(5, 2) == 3 and second.share(5, 2) == 2
    assert EvalRanks().share(5, 2) == 5 and list(EvalRanks().mine(3)) == [0, 1, 2]


def test_one_process_gathers_its_own_batches_and_raises_its_error() -> None:
    assert EvalRanks().gather({1: ["b"], 0: ["a"]}, None) == {1: ["b"], 0: ["a"]}
    with pytest.raises(ValueError, match="undecodable"):
        EvalRanks().gather({}, ValueError("undecodable"))


def test_cuda_is_this_ranks_own_gpu_under_torchrun(monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert rank_device("cuda") == "cuda"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device("cuda") == "cuda:3"
    assert rank_device("cuda:0") == "cuda:0" and rank_device("cpu") == "cpu"
