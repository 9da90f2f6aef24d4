"""Re-captioning: shards captioned by a model, readable by the wds reader, resumable per
shard; and the world's clean-caption splits (new files only)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch

from mm1 import recaption as rc
from mm1.config import ConfigError
from mm1.data.caption_splits import CLEAN_ALL, CLEAN_SUBSET, write_caption_splits
from mm1.data.images import ImageProcessor
from mm1.data.sources import ReadStats
from mm1.data.sources.wds import read_wds_shard
from mm1.data.synthetic import write_world
from mm1.data.tokenizer import Tokenizer
from mm1.models.mllm import MM1
from mm1.pretrained import load_pretrained, save_pretrained
from tests.cli_helpers import one_line


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


def _untrained_model(world: Path, tiny_model_config, seed: int, name: str) -> Path:
    """An untrained tiny model with the world's tokenizer, exported under `name`."""
    tok = Tokenizer.from_file(world / "tokenizer.json")
    cfg = tiny_model_config()
    cfg.decoder.vocab_size, cfg.image_token_id = tok.vocab_size, tok.image_id
    torch.manual_seed(seed)
    out = world.parent / name
    save_pretrained(MM1(cfg).eval(), tok, ImageProcessor.clip(32), out)
    return out


@pytest.fixture(scope="module")
def model_dir(world, tiny_model_config) -> Path:
    """The weights do not matter: the captions are checked against the same model's own
    generations."""
    return _untrained_model(world, tiny_model_config, 0, "model")


@pytest.fixture(scope="module")
def other_model_dir(world, model_dir, tiny_model_config) -> Path:
    """Another model of the same shape (other weights): captions of its own."""
    return _untrained_model(world, tiny_model_config, 1, "other_model")


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
    again = rc.recaption(model_dir, src, out, settings, progress=False)
    assert seen == ["00002.tar"]
    made = json.loads((out / rc.MANIFEST).read_text())["shards"]["00002.tar"]["recaptioned"]
    assert made > 0
    # only what this call generated is counted as generated
    assert again["this_run"] == {"shards": 1, "captions": made, "already_done": 3}
    finished = rc.recaption(model_dir, src, out, settings, progress=False)
    assert seen == ["00002.tar"]
    assert finished["this_run"] == {"shards": 0, "captions": 0, "already_done": 4}


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


def test_rerun_resumes_only_the_same_settings(world, model_dir, other_model_dir, tmp_path):
    src, out = world / "captions", tmp_path / "recap"
    settings = rc.RecaptionSettings(batch_size=16, max_new_tokens=3)
    real = rc.recaption_shard

    def interrupted(p, shard, *a):  # the run stops while writing its third shard
        if shard.name == "00002.tar":
            raise KeyboardInterrupt
        return real(p, shard, *a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rc, "recaption_shard", interrupted)
        with pytest.raises(KeyboardInterrupt):
            rc.recaption(model_dir, src, out, settings, progress=False)
    before = _hashes(out)
    assert {"00000.tar", "00001.tar", rc.MANIFEST} <= set(before)
    # another model, other settings or other inputs would mix two kinds of shards: refused,
    # naming what differs, and nothing in --out is touched
    fused = rc.RecaptionSettings(batch_size=16, max_new_tokens=3, fuse=True)
    longer = rc.RecaptionSettings(batch_size=16, max_new_tokens=5)
    in_bf16 = rc.RecaptionSettings(batch_size=16, max_new_tokens=3, dtype="bf16")
    refused = [
        (model_dir, src, in_bf16, r"\(dtype float32, now bfloat16\)"),
        (other_model_dir, src, settings, r"other settings \(model .*model \(export \w+\), now "),
        (model_dir, src, fused, r"\(fuse false, now true\); give a new --out"),
        (model_dir, src, longer, r"\(max_new_tokens 3, now 5\)"),
        (model_dir, src / "00003.tar", settings, r"\(input_shards 4 shards from .*, now 1 shards"),
    ]
    for model, inputs, s, message in refused:
        with pytest.raises(ConfigError, match=message):
            rc.recaption(model, inputs, out, s, progress=False)
    assert _hashes(out) == before
    assert not rc.is_complete(model_dir, src, out, settings)  # an ablation prepare step: run it
    # a manifest written before --dtype records none: its run was fp32, and resumes as such
    manifest = json.loads((out / rc.MANIFEST).read_text())
    del manifest["dtype"]
    (out / rc.MANIFEST).write_text(json.dumps(manifest))
    # the same settings resume: the two missing shards, counted as this run's alone
    record = rc.recaption(model_dir, src, out, settings, progress=False)
    # done: for these settings only (a prepare step's check; by file names alone it was done
    # for any model)
    assert rc.is_complete(model_dir, src, out, settings)
    for model, inputs, s, _ in refused:
        assert not rc.is_complete(model, inputs, out, s)
    from mm1.ablate.prepare import PrepareStep

    step = {"checkpoint": str(model_dir), "in": str(src), "out": str(out), "max_new_tokens": 3}
    assert PrepareStep("recaption", step).done()
    assert not PrepareStep("recaption", {**step, "max_new_tokens": 5}).done()
    assert record["this_run"]["shards"] == 2 and record["this_run"]["already_done"] == 2
    assert {k: _hashes(out)[k] for k in ("00000.tar", "00001.tar")} == {
        k: before[k] for k in ("00000.tar", "00001.tar")
    }
    # a finished --out is refused to another model too (it did nothing, yet said it had)
    with pytest.raises(ConfigError, match="holds shards made with other settings"):
        rc.recaption(other_model_dir, src, out, settings, progress=False)
    # a non-empty folder without a run's record is not taken for one
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "00000.tar").write_bytes((src / "00000.tar").read_bytes())
    with pytest.raises(ConfigError, match="holds no recaption.json recording the settings"):
        rc.recaption(model_dir, src, stray, settings, progress=False)
    assert not rc.is_complete(model_dir, src / "00000.tar", stray, settings)


def test_model_identity_tells_models_apart(model_dir, other_model_dir, tmp_path) -> None:
    # an export by a fingerprint of its files; the same files elsewhere differ only by path
    a, b = rc.model_identity(model_dir), rc.model_identity(other_model_dir)
    assert a["export_sha256"] != b["export_sha256"]
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in model_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert rc.model_identity(copy)["export_sha256"] == a["export_sha256"]
    # a run directory by the step of its newest complete checkpoint (the one loaded)
    run = tmp_path / "run"
    (run / "checkpoints" / "step_5").mkdir(parents=True)
    (run / "model.json").write_text("{}")
    (run / "checkpoints" / "step_5" / "meta.json").write_text("{}")
    assert rc.model_identity(run) == {"path": str(run.resolve()), "step": 5}
    (run / "checkpoints" / "step_9").mkdir()  # incomplete: not loaded, not counted
    assert rc.model_identity(run)["step"] == 5
    (run / "checkpoints" / "step_9" / "meta.json").write_text("{}")
    assert rc.model_identity(run)["step"] == 9


def test_duplicate_shard_names_are_refused(world, model_dir, tmp_path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "00000.tar").write_bytes((world / "captions/00000.tar").read_bytes())
    out = tmp_path / "out"
    message = (
        f"--in {tmp_path}/*/*.tar: two shards named 00000.tar ({tmp_path}/a/00000.tar and "
        f"{tmp_path}/b/00000.tar) would both be written to --out as 00000.tar"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        rc.recaption(model_dir, f"{tmp_path}/*/*.tar", out, progress=False)
    assert not out.exists()


def test_recaption_mistakes_are_one_line_and_leave_no_out(world, model_dir, tmp_path, capsys):
    src, out = str(world / "captions" / "00000.tar"), tmp_path / "out"
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    line = one_line(capsys, ["recaption", str(model_dir), "--in", src, "--out", str(a_file)], 2)
    assert line == f"config error: --out {a_file}: is a file, not a directory; give a directory"
    tok = world / "tokenizer.json"
    line = one_line(capsys, ["recaption", str(model_dir), "--in", str(tok), "--out", str(out)], 2)
    assert line.startswith(f"config error: --in {tok}: not a readable tar shard (")
    missing = tmp_path / "no_model"
    line = one_line(capsys, ["recaption", str(missing), "--in", src, "--out", str(out)], 2)
    assert line == f"config error: checkpoint {missing}: does not exist"
    line = one_line(capsys, ["recaption", str(world), "--in", src, "--out", str(out)], 2)
    assert line.startswith(f"config error: checkpoint {world}: neither an exported model")
    args = ["recaption", str(model_dir), "--in", src, "--out", str(out), "--dtype", "fp64"]
    assert one_line(capsys, args, 2).startswith("config error: --dtype fp64: not a dtype")
    assert not out.exists()  # nothing made before the inputs and the model were checked


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


def test_a_fuyu_layout_model_captions_images_of_any_shape(world) -> None:
    """Each image's own size sets its tokens (Fuyu's canvas): captions of a batch of three
    shapes are each image's caption alone, and run through the same slots `generate` reads."""
    from PIL import Image

    from mm1.config import DecoderConfig, ModelConfig, VisionConfig
    from mm1.models.fuyu import Fuyu

    tok = Tokenizer.from_file(world / "tokenizer.json")
    cfg = ModelConfig(
        family="fuyu",
        vision=VisionConfig(image_size=32, patch_size=8),
        decoder=DecoderConfig(
            vocab_size=tok.vocab_size, dim=32, layers=2, heads=4, kv_heads=2, ffn_dim=64
        ),
        image_token_id=tok.image_id,
        init_std=0.2,
    )
    cfg.image_layout.type = "fuyu"
    torch.manual_seed(0)
    out = world.parent / "fuyu_model"
    save_pretrained(Fuyu(cfg).eval(), tok, ImageProcessor.siglip(32), out)
    p = load_pretrained(out)
    assert p.prompt_format.layout == "fuyu"
    images = [
        Image.new("RGB", size, color)
        for size, color in (((50, 30), "red"), ((9, 70), "blue"), ((32, 32), "green"))
    ]
    together = rc.caption_images(p, images, 5)
    assert together == [rc.caption_images(p, [im], 5)[0] for im in images]


def test_a_caption_stops_at_the_models_context(world, model_dir, monkeypatch) -> None:
    """`--max-new-tokens` past the context: the captions ran on past it (and a cache was sized
    for every token asked), where generate, chat and serve stop at it."""
    from mm1.data.sources import decode_image

    p = load_pretrained(model_dir)
    image = decode_image(next((world / "eval" / "val" / "images").iterdir()).read_bytes())
    asked = []
    real = rc.generate

    def recording(*args, **kw):
        asked.append(kw["max_new_tokens"])
        return real(*args, **{**kw, "max_new_tokens": 1})

    monkeypatch.setattr(rc, "generate", recording)
    rc.caption_images(p, [image], 100_000)
    prompt = rc.tokenize_prompt(rc.IMAGE_TOKEN, [image], p.tokenizer, p.prompt_format)
    assert asked == [p.model.cfg.decoder.max_seq_len - len(prompt)]
    rc.caption_images(p, [image], 5)
    assert asked[-1] == 5
