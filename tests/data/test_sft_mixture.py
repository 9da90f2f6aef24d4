"""SFT mixtures: several LLaVA datasets with weights and ShareGPT-style text-only conversations
in one mixture, multi-image conversations end to end, and whole-file JSON parsed once per
process however many data slots and epochs read it."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm1.config import SourceConfig
from mm1.data.catalog import count_records, detect_format
from mm1.data.images import ImageProcessor
from mm1.data.loader import LoaderSettings, build_loader
from mm1.data.mixture import Mixture, SourceStream
from mm1.data.prompt_format import PromptFormat
from mm1.data.sources import base
from mm1.data.sources.llava import read_llava
from mm1.data.tokenizer import Tokenizer, tokenize_conversation

COLORS = {"red.png": (255, 0, 0), "blue.png": (0, 0, 255), "green.png": (0, 255, 0)}


@pytest.fixture(scope="module")
def tok(tmp_path_factory, world_copy) -> Tokenizer:
    return Tokenizer.from_file(world_copy(tmp_path_factory.mktemp("world")) / "tokenizer.json")


@pytest.fixture()
def sft_dir(tmp_path) -> Path:
    """Two LLaVA datasets (one with a multi-image record) and a ShareGPT text-only jsonl."""
    (tmp_path / "images").mkdir()
    for name, rgb in COLORS.items():
        Image.new("RGB", (20, 20), rgb).save(tmp_path / "images" / name)
    a = [
        {
            "id": f"a{i}",
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"},
                {"from": "gpt", "value": "red"},
            ],
        }
        for i in range(6)
    ]
    b = [
        {
            "id": f"b{i}",
            "image": ["blue.png", "green.png"],
            "conversations": [
                {"from": "human", "value": "First <image> then <image>: which colours?"},
                {"from": "gpt", "value": "blue then green"},
                {"from": "human", "value": "And the first again?"},
                {"from": "gpt", "value": "blue"},
            ],
        }
        for i in range(4)
    ]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    sharegpt = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": f"Count to {i}."},
                {"from": "gpt", "value": " ".join(str(k) for k in range(1, i + 1))},
            ]
        }
        for i in range(1, 6)
    ]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sharegpt))
    return tmp_path


def _specs(d: Path) -> list[SourceConfig]:
    return [
        SourceConfig(format="llava", path=str(d / "a.json"), weight=2.0),
        SourceConfig(format="llava", path=str(d / "b.json"), weight=1.0),
        SourceConfig(
            format=detect_format(d / "text.jsonl"), path=str(d / "text.jsonl"), weight=1.0
        ),
    ]


def test_sharegpt_jsonl_is_read_as_text_only_conversations(sft_dir, tok) -> None:
    assert detect_format(sft_dir / "text.jsonl") == "llava"
    records = [json.loads(line) for line in (sft_dir / "text.jsonl").read_text().splitlines()]
    (sft_dir / "text.json").write_text(json.dumps(records))  # ShareGPT dumps are JSON lists too
    assert detect_format(sft_dir / "text.json") == "llava"
    assert [c.messages for c in read_llava(sft_dir / "text.json")] == [
        c.messages for c in read_llava(sft_dir / "text.jsonl")
    ]
    convs = list(read_llava(sft_dir / "text.jsonl"))
    assert len(convs) == 5 and all(not c.images for c in convs)
    assert [m["role"] for m in convs[2].messages] == ["system", "user", "assistant"]
    doc = tokenize_conversation(convs[2], tok, PromptFormat(4))
    targets = [t for t, m in zip(doc.input_ids, doc.target_mask) if m]
    # the targets are the assistant's answer and the end of its turn, nothing of system or user
    assert tok.decode(targets).strip().startswith("1 2 3")
    assert "brief" not in tok.decode(targets) and "Count" not in tok.decode(targets)


def test_weighted_llava_datasets_and_text_conversations_in_one_mixture(sft_dir) -> None:
    streams = [SourceStream(i, s, 0, 1, seed=0) for i, s in enumerate(_specs(sft_dir))]
    mixture = Mixture(streams, seed=0, slot=0)
    draws = Counter(mixture.next()[0][0] for _ in range(800))
    shares = np.array([draws[i] for i in range(3)]) / 800
    np.testing.assert_allclose(shares, [0.5, 0.25, 0.25], atol=0.05)


def test_multi_image_conversations_reach_the_batch_in_order(sft_dir, tok) -> None:
    """Each `<image>` marker of a two-image conversation gets its own slots and its own image,
    in marker order; image slots carry no labels."""
    proc = ImageProcessor.clip(16)
    spec = SourceConfig(format="llava", path=str(sft_dir / "b.json"))
    settings = LoaderSettings(
        sources=[spec],
        seq_len=256,
        micro_batch_size=1,
        prompt_format=PromptFormat(4),
        pack_buffer=4,
    )
    batch = next(iter(build_loader(settings, tok, proc)))
    slots = batch.input_ids[0] == tok.image_id
    n_images = batch.pixel_values.shape[0]
    assert n_images >= 2 and n_images % 2 == 0 and int(slots.sum()) == 4 * n_images
    assert not (batch.labels[0][slots] != -100).any()
    blue, green = proc([Image.open(sft_dir / "images" / n) for n in ("blue.png", "green.png")])
    for k in range(0, n_images, 2):
        torch.testing.assert_close(batch.pixel_values[k], blue)
        torch.testing.assert_close(batch.pixel_values[k + 1], green)


@pytest.mark.parametrize("name", ["a.json", "a.json.gz"])
def test_a_json_file_is_read_once_per_process(sft_dir, monkeypatch, name) -> None:
    """Two data slots, each over two epochs, a record count and a re-read: one index build for
    a plain JSON list (records parsed as read), one whole-file parse for a gzipped one."""
    if name.endswith(".gz"):
        (sft_dir / name).write_bytes(gzip.compress((sft_dir / "a.json").read_bytes()))
    base.clear_json_cache()
    builds: list[Path] = []
    parse, index = base.load_json_file, base.JsonList

    def parsed(path: Path):
        builds.append(path)
        return parse(path)

    def indexed(path: Path):
        builds.append(path)
        return index(path)

    monkeypatch.setattr(base, "load_json_file", parsed)
    monkeypatch.setattr(base, "JsonList", indexed)
    spec = SourceConfig(format="llava", path=str(sft_dir / name))
    slots = [SourceStream(0, spec, slot, 2, seed=0) for slot in range(2)]
    seen = [[slot.next()[2].id for _ in range(6)] for slot in slots]  # 3 records each: 2 epochs
    assert sorted(set(seen[0]) | set(seen[1])) == [f"a{i}" for i in range(6)]
    assert slots[1].read_at(0, 4).id == "a4"
    assert count_records(sft_dir / name, "llava") == 6
    assert builds == [sft_dir / name]


def test_a_changed_file_is_parsed_again(sft_dir) -> None:
    """The cache holds a file while it is unchanged: a rewrite of the same size, even within
    one timestamp tick, is read anew."""
    path = sft_dir / "a.json"
    assert [c.id for c in read_llava(path)][:1] == ["a0"]
    st = path.stat()
    path.write_text(path.read_text().replace('"a0"', '"z0"'))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same mtime and size
    assert [c.id for c in read_llava(path)][:1] == ["z0"]
