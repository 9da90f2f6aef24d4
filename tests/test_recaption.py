"""Re-captioning: shards captioned by a model, readable by the wds reader, resumable per
shard; and the world's clean-caption splits (new files only)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from mm1 import recaption as rc
from mm1.data.caption_splits import CLEAN_ALL, CLEAN_SUBSET, write_caption_splits
from mm1.data.images import ImageProcessor
from mm1.data.sources import ReadStats
from mm1.data.sources.wds import read_wds_shard
from mm1.data.synthetic import write_world
from mm1.data.tokenizer import Tokenizer
from mm1.models.mllm import MM1
from mm1.pretrained import load_pretrained, save_pretrained


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recaption") / "world"
    write_world(root, size="tiny", image_size=32)
    return root


@pytest.fixture(scope="module")
def model_dir(world, tiny_model_config) -> Path:
    """An untrained tiny model with the world's tokenizer, exported (the weights do not matter:
    the captions are checked against the same model's own generations)."""
    tok = Tokenizer.from_file(world / "tokenizer.json")
    cfg = tiny_model_config()
    cfg.decoder.vocab_size, cfg.image_token_id = tok.vocab_size, tok.image_id
    torch.manual_seed(0)
    out = world.parent / "model"
    save_pretrained(MM1(cfg).eval(), tok, ImageProcessor.clip(32), out)
    return out


def test_caption_splits_add_files_only(world) -> None:
    before = _hashes(world)
    record = write_caption_splits(world, fraction=0.25, seed=3)
    after = _hashes(world)
    assert {k: after[k] for k in before} == before  # the world's files are byte-identical
    subset = list(read_wds_shard(world / record[CLEAN_SUBSET]["shards"][0]))
    everything = [d for s in sorted((world / CLEAN_ALL).glob("*.tar")) for d in read_wds_shard(s)]
    assert len(everything) == record[CLEAN_ALL]["records"] == 256
    # about a quarter, each with its scene's clean caption in place of the alt-text
    assert len(subset) == record[CLEAN_SUBSET]["records"] and 40 < len(subset) < 90
    for doc in subset:
        assert doc.parts[1] == doc.meta["recaption"] and doc.meta["caption_style"] == "clean"
    assert write_caption_splits(world, fraction=0.25, seed=3) == record
    assert _hashes(world) == after  # the same splits: nothing rewritten


def test_recaption_writes_readable_shards_resumably(world, model_dir, tmp_path, monkeypatch):
    src = world / "captions"
    out = tmp_path / "recap"
    settings = rc.RecaptionSettings(batch_size=5, max_new_tokens=6)
    record = rc.recaption(model_dir, src, out, settings, progress=False)
    assert sorted(record["shards"]) == [p.name for p in sorted(src.glob("*.tar"))]
    p = load_pretrained(model_dir)
    originals = {d.id: d for d in read_wds_shard(src / "00001.tar")}
    stats = ReadStats()
    docs = list(read_wds_shard(out / "00001.tar", stats=stats))
    assert len(docs) == len(originals) and not stats.skipped
    images = [originals[doc.id].parts[0] for doc in docs[:6]]
    compiled = rc.caption_images(p, images, 6, compile=True)  # `mm1 recaption --compile`
    assert compiled == rc.caption_images(p, images, 6) and any(compiled)
    for doc in docs[:6]:
        orig = originals[doc.id]
        # the model's own caption of this image, generated alone (batching changes nothing)
        alone = rc.caption_images(p, [orig.parts[0]], 6)[0]
        assert doc.meta["generated_caption"] == alone
        assert doc.parts[1] == (alone or orig.parts[1])
        assert doc.meta["original_caption"] == orig.parts[1]  # the alt-text kept
        assert doc.meta["alt_text"] == orig.meta["alt_text"]  # and the record's own json
        assert doc.parts[0].tobytes() == orig.parts[0].tobytes()  # the same image
    # resumable per shard: finished shards are not redone, a missing one is
    (out / "00002.tar").unlink()
    seen: list[str] = []
    real = rc.recaption_shard
    monkeypatch.setattr(
        rc, "recaption_shard", lambda p, shard, *a: seen.append(shard.name) or real(p, shard, *a)
    )
    rc.recaption(model_dir, src, out, settings, progress=False)
    assert seen == ["00002.tar"]
    assert json.loads((out / rc.MANIFEST).read_text())["shards"]["00002.tar"]["recaptioned"] > 0


def test_fuse_keeps_both(world, model_dir, tmp_path) -> None:
    settings = rc.RecaptionSettings(batch_size=8, max_new_tokens=4, fuse=True)
    rc.recaption(model_dir, world / "captions" / "00000.tar", tmp_path, settings, progress=False)
    for doc in list(read_wds_shard(tmp_path / "00000.tar"))[:5]:
        gen, orig = doc.meta["generated_caption"], doc.meta["original_caption"]
        assert doc.parts[1] == (f"{gen.rstrip(' .')}. {orig}" if gen else orig)
        assert doc.meta["caption_style"] == ("fused" if gen else "original")


def test_recaption_refuses_writing_over_its_input(world, model_dir) -> None:
    with pytest.raises(ValueError, match="new directory"):
        rc.recaption(model_dir, world / "captions", world / "captions", progress=False)


def test_caption_quality_scores_sources_against_the_scene(world, tmp_path) -> None:
    from benchmarks import caption_quality as cq

    write_caption_splits(world, fraction=0.25, seed=3)
    scene = {
        "objects": [{"color": "dark red", "shape": "circle"}, {"color": "blue", "shape": "star"}]
    }
    assert cq.named_share("A red square and a blue star.", scene, "color") == 1.0
    assert cq.named_share("A red square and a blue star.", scene, "shape") == 0.5
    out = tmp_path / "q.json"
    argv = [
        f"alt={world / 'captions'}",
        f"clean={world / CLEAN_ALL}",
        "--reference",
        str(world / CLEAN_ALL),
        "--skip-subset",
        "0.25",
        "--subset-seed",
        "3",
        "--json",
        str(out),
    ]
    assert cq.main(argv) == 0
    got = json.loads(out.read_text())
    assert 150 < got["captions"] < 220  # 256 less the quarter the re-captioner would train on
    clean, alt = got["scores"]["clean"], got["scores"]["alt"]
    assert clean["cider_vs_clean"] == pytest.approx(1000.0) and clean["bleu4_vs_clean"] > 99.9
    assert clean["object_recall"] > 0.8 > alt["object_recall"]
    assert alt["cider_vs_clean"] < 100 and alt["colour_recall"] < clean["colour_recall"]
    # the same key over another picture is refused, not scored against the wrong scene
    shard = sorted((world / CLEAN_ALL).glob("*.tar"))[0]
    other = tmp_path / "other.tar"
    with tarfile.open(shard) as src, tarfile.open(other, "w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name.endswith(".json"):
                meta = json.loads(data)
                meta["scene"]["objects"] = []
                data = json.dumps(meta).encode()
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(SystemExit, match="another scene"):
        cq.main([f"other={other}", "--reference", str(world / CLEAN_ALL)])
