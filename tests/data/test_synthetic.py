"""The synthetic world: determinism, layout, disjoint evaluation splits, well-formed annotations,
and everything reading back through the real-format readers."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm1.data.catalog import count_records, list_shards
from mm1.data.document import Conversation, Document
from mm1.data.scenes import (
    COLORS,
    SHAPES,
    SPECIAL_TOKENS,
    Scene,
    SceneObject,
    detailed_caption,
    render_scene,
    sample_scene,
    scene_split,
)
from mm1.data.sources import READERS, ReadStats
from mm1.data.synthetic import WorldManifest, train_world_tokenizer, write_world

TRAIN_SOURCES = ("captions", "captions_vecap", "interleaved", "interleaved_mmc4", "text")


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[WorldManifest, float]:
    root = tmp_path_factory.mktemp("world") / "w"
    t0 = time.perf_counter()
    manifest = write_world(root, seed=0, size="tiny")
    return manifest, time.perf_counter() - t0


def _reader_kwargs(m: WorldManifest, src: dict) -> dict:
    if src["format"] == "mmc4":
        return {"image_dir": m.path(src["image_dir"])}
    if src["format"] == "llava":
        return {"image_folder": m.path(src["image_folder"])}
    return {}


def _read_all(m: WorldManifest, name: str) -> tuple[list, ReadStats]:
    src = m.sources[name]
    stats = ReadStats()
    out = []
    for shard in m.shards(name):
        out.extend(READERS[src["format"]](shard, stats=stats, **_reader_kwargs(m, src)))
    return out, stats


def test_tiny_world_is_fast(world):
    _, seconds = world
    assert seconds < 30, f"tiny world took {seconds:.1f}s (target < 10 s)"


def test_unknown_size_names_the_allowed_ones(tmp_path):
    with pytest.raises(ValueError, match=r"tiny.*small.*medium"):
        write_world(tmp_path / "w", size="huge")


def test_refuses_to_write_into_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_world(tmp_path, size="tiny")
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_an_interrupted_write_is_written_again_and_comes_out_whole(world, tmp_path, monkeypatch):
    import mm1.data.synthetic as synthetic

    m, _ = world
    root = tmp_path / "w"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during the mmc4 stage, after three sources

    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "write_mmc4", interrupted)
        with pytest.raises(KeyboardInterrupt):
            write_world(root, seed=0, size="tiny")
    assert (root / "interleaved").is_dir() and not (root / "world.json").exists()
    # what a process killed while writing world.json leaves (`mm1.fs.atomic_write_text`)
    leftover = root / ".world.json.999.dead.tmp"
    leftover.write_text("{")
    # The next run recognises its own partial world (before: "refusing to write" into it).
    write_world(root, seed=0, size="tiny")
    assert _tree_hashes(root) == _tree_hashes(m.root)
    assert not leftover.exists()
    assert not (root / synthetic.WRITING_MARK).exists()


# Another process writing the world at argv[1]: it holds the write lock until its stdin
# closes, then puts a whole world (argv[2]'s) there.
WRITER = """
import shutil, sys
from pathlib import Path
from mm1.data.synthetic import WRITING_MARK, _writing
root = Path(sys.argv[1])
with _writing(root):
    print("writing", flush=True)
    sys.stdin.read()
    shutil.copytree(sys.argv[2], root, dirs_exist_ok=True)
    (root / WRITING_MARK).unlink()
"""


@pytest.mark.parametrize(
    "keep_existing, seed, kept",
    [(True, 0, True), (False, 0, True), (False, 1, False)],
    ids=["a-run-keeps-it", "synth-same-settings-keeps-it", "synth-other-settings-rewrites"],
)
def test_a_second_writer_waits_for_the_first_and_keeps_its_world(
    world, tmp_path, keep_existing, seed, kept
):
    """A training run (`keep_existing`) uses the world written while it waited; `mm1 data synth`
    keeps it too when it asked for the same settings (the same bytes), else writes its own."""
    import subprocess
    import sys
    import threading

    m, _ = world
    root = tmp_path / "w"
    first = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(m.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert first.stdout is not None and first.stdout.readline().strip() == "writing"
    (root / "text").mkdir()
    (root / "text" / "being-written").write_text("the first writer's")
    result: list[WorldManifest] = []
    second = threading.Thread(
        target=lambda: result.append(
            write_world(root, seed=seed, size="tiny", keep_existing=keep_existing)
        )
    )
    second.start()
    second.join(timeout=2.0)
    assert second.is_alive(), "the second writer did not wait"
    assert (root / "text" / "being-written").exists(), "the second writer cleared the first's"
    first.communicate("")
    second.join(timeout=60)
    assert result and result[0].root == root and result[0].seed == seed
    # Kept: the world the first one wrote (a rewrite would have cleared `text/` first).
    assert (root / "text" / "being-written").exists() == kept
    assert (json.loads((root / "world.json").read_text()) == m.to_dict()) == kept


def test_deterministic_per_seed(world, tmp_path):
    m, _ = world
    first = _tree_hashes(m.root)
    again = write_world(tmp_path / "same", seed=0, size="tiny")
    assert _tree_hashes(again.root) == first
    other = _tree_hashes(write_world(tmp_path / "other", seed=1, size="tiny").root)
    shard_files = {k for k in first if "/images/" not in k}
    assert shard_files <= other.keys()  # same layout (image folders differ with the content)
    differing = [k for k in shard_files if first[k] != other[k]]
    for name, src in m.sources.items():
        folder = str(Path(src["shards"][0]).parent)
        assert any(k.startswith(folder + "/") for k in differing), name
    assert "tokenizer.json" in differing
    # Re-writing a world directory replaces it completely.
    write_world(tmp_path / "same", seed=1, size="tiny")
    assert _tree_hashes(tmp_path / "same") == other


def test_layout_and_manifest(world):
    m, _ = world
    on_disk = json.loads((m.root / "world.json").read_text())
    assert on_disk == m.to_dict()
    loaded = WorldManifest.load(m.root)
    assert loaded.to_dict() == m.to_dict() and loaded.root == m.root
    assert (m.seed, m.size, m.image_size) == (0, "tiny", 64)
    assert set(m.vocabulary["shapes"]) == set(SHAPES) and len(m.vocabulary["colors"]) == 8
    for name in TRAIN_SOURCES:
        shards = m.shards(name)
        assert len(shards) >= 4, name  # 2 ranks x 2 workers each get their own shard
        assert all(p.is_file() for p in shards)
        assert sum(m.sources[name]["records_per_shard"]) == m.sources[name]["records"]
    expected_format = {
        "captions": "wds",
        "captions_vecap": "wds",
        "interleaved": "obelics",
        "interleaved_mmc4": "mmc4",
        "text": "text",
        "sft": "llava",
        "sft_tasks": "llava",
        "sft_presence": "llava",
    }
    assert {k: v["format"] for k, v in m.sources.items()} == expected_format
    assert list_shards(m.root / "captions", "wds") == m.shards("captions")
    for split in ("val", "support"):
        ev = m.eval[split]
        for key in ("image_dir", "coco_captions", "vqa_questions", "vqa_annotations"):
            assert m.path(ev[key]).exists(), (split, key)
    # Every stored path is relative: the world can be moved.
    assert str(m.root) not in (m.root / "world.json").read_text()


def test_everything_reads_back_with_manifest_counts(world):
    m, _ = world
    for name, src in m.sources.items():
        records, stats = _read_all(m, name)
        assert len(records) == src["records"], name
        assert stats.skipped == {}, (name, stats.skipped)
        for shard, n in zip(m.shards(name), src.get("records_per_shard", [])):
            assert count_records(shard, src["format"]) == n
        if "images" in src:
            if src["format"] == "llava":
                n_images = sum(len(c.images) for c in records)
            else:
                n_images = sum(d.num_images for d in records)
            assert n_images == src["images"], name
        for rec in records[:20]:
            images = rec.images
            assert all(im.size == (64, 64) and im.mode == "RGB" for im in images)
        if src["kind"] == "interleaved":
            assert all(2 <= d.num_images <= 6 for d in records)
            assert all(any(isinstance(p, str) for p in d.parts) for d in records)
        if src["kind"] == "captions":
            assert all(isinstance(d, Document) and len(d.parts) == 2 for d in records)
            assert all(d.meta["caption"] == d.parts[1] for d in records)
        if src["kind"] == "sft":
            assert all(isinstance(c, Conversation) for c in records)
    # The YAML form of the SFT data reads the same conversations.
    yaml_convs = list(READERS["llava_yaml"](m.path(m.sources["sft"]["yaml"])))
    assert len(yaml_convs) == m.sources["sft"]["records"]


def _pixel_hash(im: Image.Image) -> str:
    return hashlib.sha256(im.tobytes()).hexdigest()


def _train_images_and_scenes(m: WorldManifest) -> tuple[set[str], set[str]]:
    pixels, sigs = set(), set()
    for name in ("captions", "captions_vecap"):
        for d in _read_all(m, name)[0]:
            pixels.add(_pixel_hash(d.parts[0]))
            sigs.add(Scene.from_dict(d.meta["scene"]).signature())
    for d in _read_all(m, "interleaved")[0]:
        pixels.update(_pixel_hash(im) for im in d.images)
        sigs.update(Scene.from_dict(x["scene"]).signature() for x in d.meta["metadata"] if x)
    for d in _read_all(m, "interleaved_mmc4")[0]:
        pixels.update(_pixel_hash(im) for im in d.images)
        sigs.update(Scene.from_dict(x["scene"]).signature() for x in d.meta["image_info"])
    sft = [c for name in ("sft", "sft_tasks", "sft_presence") for c in _read_all(m, name)[0]]
    for c in sft:
        pixels.update(_pixel_hash(im) for im in c.images)
        sigs.update(Scene.from_dict(x).signature() for x in c.meta.get("scenes", []))
    return pixels, sigs


def _eval_images_and_scenes(m: WorldManifest, split: str) -> tuple[set[str], set[str]]:
    ev = m.eval[split]
    coco = json.loads(m.path(ev["coco_captions"]).read_text())
    pixels, sigs = set(), set()
    for img in coco["images"]:
        with Image.open(m.path(ev["image_dir"]) / img["file_name"]) as im:
            pixels.add(_pixel_hash(im.convert("RGB")))
        sigs.add(Scene.from_dict(img["scene"]).signature())
    return pixels, sigs


def test_eval_splits_are_disjoint_from_training_and_each_other(world):
    m, _ = world
    train_px, train_sig = _train_images_and_scenes(m)
    val_px, val_sig = _eval_images_and_scenes(m, "val")
    sup_px, sup_sig = _eval_images_and_scenes(m, "support")
    assert len(train_sig) > 500 and len(val_sig) > 30 and len(sup_sig) > 15
    assert not (val_px & train_px) and not (sup_px & train_px) and not (val_px & sup_px)
    assert not (val_sig & train_sig) and not (sup_sig & train_sig) and not (val_sig & sup_sig)


def test_coco_captions_well_formed(world):
    m, _ = world
    for split in ("val", "support"):
        ev = m.eval[split]
        coco = json.loads(m.path(ev["coco_captions"]).read_text())
        ids = [im["id"] for im in coco["images"]]
        assert len(ids) == len(set(ids)) == ev["images"]
        for im in coco["images"]:
            assert (im["width"], im["height"]) == (64, 64)
            assert (m.path(ev["image_dir"]) / im["file_name"]).is_file()
        ann_ids = [a["id"] for a in coco["annotations"]]
        assert len(ann_ids) == len(set(ann_ids)) == ev["captions"]
        per_image: dict[int, list[str]] = {}
        for a in coco["annotations"]:
            assert isinstance(a["caption"], str) and a["caption"].strip()
            per_image.setdefault(a["image_id"], []).append(a["caption"])
        assert set(per_image) == set(ids)
        for image_id, refs in per_image.items():
            assert len(refs) == 5 and len(set(refs)) == 5, (image_id, refs)
        # The first reference is the canonical caption of the image's scene.
        scenes = {im["id"]: Scene.from_dict(im["scene"]) for im in coco["images"]}
        for image_id, refs in per_image.items():
            assert refs[0] == detailed_caption(scenes[image_id], 0)


def test_vqa_well_formed_and_grounded(world):
    m, _ = world
    coco = json.loads(m.path(m.eval["val"]["coco_captions"]).read_text())
    scenes = {im["id"]: Scene.from_dict(im["scene"]) for im in coco["images"]}
    qs = json.loads(m.path(m.eval["val"]["vqa_questions"]).read_text())["questions"]
    anns = json.loads(m.path(m.eval["val"]["vqa_annotations"]).read_text())["annotations"]
    assert len(qs) == len(anns) == m.eval["val"]["questions"] > 0
    by_qid = {a["question_id"]: a for a in anns}
    assert len(by_qid) == len(anns)
    all_identical = 0
    for q in qs:
        assert q["image_id"] in scenes and isinstance(q["question"], str)
        a = by_qid[q["question_id"]]
        assert a["image_id"] == q["image_id"]
        assert a["answer_type"] in ("yes/no", "number", "other")
        assert isinstance(a["question_type"], str) and q["question"].lower().startswith(
            a["question_type"]
        )
        answers = a["answers"]
        assert len(answers) == 10
        assert [x["answer_id"] for x in answers] == list(range(1, 11))
        assert all(x["answer_confidence"] in ("yes", "maybe", "no") for x in answers)
        counts = Counter(x["answer"] for x in answers)
        assert counts[a["multiple_choice_answer"]] == max(counts.values())
        all_identical += len(counts) == 1
        # Grounding: the majority answer agrees with the scene's facts.
        scene, mc, text = scenes[q["image_id"]], a["multiple_choice_answer"], q["question"]
        if text.startswith("What color is the "):
            shape = text.removeprefix("What color is the ").rstrip("?")
            assert mc == next(o.color for o in scene.objects if o.shape == shape)
        elif text in ("How many objects are there?", "How many shapes are there?"):
            assert mc == str(scene.count)
        elif text.startswith("Is there a"):
            color, shape = text.rstrip("?").split()[-2:]
            present = any((o.color, o.shape) == (color, shape) for o in scene.objects)
            assert mc == ("yes" if present else "no")
        elif a["question_type"] in ("what word is", "what does the", "what number is"):
            assert mc == scene.text
        if a["answer_type"] == "number":
            assert mc.isdigit()
    # Realistic variation: some questions have differing answers, some ten identical ones.
    assert 0 < all_identical < len(qs)


def test_captions_styles_and_facts(world):
    m, _ = world
    alt, _ = _read_all(m, "captions")
    recap, _ = _read_all(m, "captions_vecap")
    for d in recap:
        scene = Scene.from_dict(d.meta["scene"])
        assert d.meta["caption_style"] == "recaption"
        for o in scene.objects:
            assert f"{o.color} {o.shape}" in d.parts[1]
    assert all(d.meta["caption_style"] == "alt-text" for d in alt)
    # Alt-text is short and noisy; re-captions are long.
    assert np.mean([len(d.parts[1]) for d in alt]) < 0.5 * np.mean([len(d.parts[1]) for d in recap])
    keys = {"url", "caption", "key", "status", "width", "height"}
    assert all(keys <= d.meta.keys() and d.meta["status"] == "success" for d in alt)
    assert all(d.meta["key"] == d.id for d in alt)
    text_rich = [d for d in alt + recap if d.meta["scene"]["text"] is not None]
    assert len(text_rich) > 0.05 * len(alt + recap)


def test_scenes_follow_their_split_and_render_readably():
    rng = random.Random(0)
    for split in ("train", "val", "support"):
        for _ in range(20):
            assert scene_split(sample_scene(rng, split)) == split
    # A small object is at least ~14 px wide at 64 px.
    scene = Scene((SceneObject("square", "black", "small", "center"),), "gray", "plain")
    arr = np.asarray(render_scene(scene, 64)).astype(int)
    dark = (arr.sum(axis=2) < 3 * 70).any(axis=0)
    assert dark.sum() >= 14
    # Larger images are supported and show the same thing.
    assert render_scene(scene, 96).size == (96, 96)
    # Colours are distinguishable after JPEG round-trip.
    for name, rgb in COLORS.items():
        sc = Scene((SceneObject("circle", name, "large", "center"),), "gray", "plain")
        buf = io.BytesIO()
        render_scene(sc).save(buf, format="JPEG", quality=92, subsampling=0)
        centre = np.asarray(Image.open(buf))[32, 32].astype(int)
        assert np.abs(centre - np.array(rgb)).max() < 30, name


def test_world_tokenizer(world):
    from tokenizers import Tokenizer

    m, _ = world
    tok = Tokenizer.from_file(str(m.tokenizer_path))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert 300 < tok.get_vocab_size() <= 1024
    text = "a large red circle on the left and a small blue square at the top."
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert len(ids) <= 20  # world words are (nearly) single tokens
    enc = tok.encode("<image>Output: a red star<|endofchunk|>")
    assert enc.ids[0] == 3 and enc.ids[-1] == 4
    assert tok.decode(tok.encode("unseen ünïcode 123").ids) == "unseen ünïcode 123"


def test_train_world_tokenizer_is_deterministic():
    texts = [f"{i} plus {i + 1} is {2 * i + 1}. a red circle." for i in range(200)]
    a = train_world_tokenizer(texts, 300).to_str()
    b = train_world_tokenizer(texts, 300).to_str()
    assert a == b
    assert '"<|endofchunk|>"' in a


def test_writers_report_progress_within_their_stage(tmp_path):
    """The progress bar moves inside a stage: every writer ticks fractions that rise to 1."""
    from mm1.data.synthetic_writers import PRESETS, write_eval, write_text

    for write in (
        lambda tick: write_text(tmp_path / "t", 0, PRESETS["tiny"], [], 1.0, tick),
        lambda tick: write_eval(tmp_path / "e", "val", 5, 0, PRESETS["tiny"], 32, tick),
    ):
        ticks: list[float] = []
        write(ticks.append)
        assert len(ticks) > 1 and ticks == sorted(ticks) and ticks[-1] == 1.0


def test_sft_task_questions_agree_with_their_scenes(world):
    """The short-answer SFT questions (sft/tasks/) are true of the scenes they show: a yes and a
    no per presence image, the picture with the most objects or the total count, the written
    text; every question in the SFT suite's prompt form."""
    m, _ = world
    records = json.loads((m.root / "sft/tasks/llava.json").read_text())
    assert len(records) == m.sources["sft_tasks"]["records"] == 64
    assert {r["kind"] for r in records} == {"presence", "multi_image", "reading"}
    for conv in _read_all(m, "sft_tasks")[0]:
        assert len(conv.images) == len(conv.meta["scenes"])
    for r in records:
        scenes = [Scene.from_dict(x) for x in r["scenes"]]
        turns = r["conversations"]
        questions, answers = [t["value"] for t in turns[::2]], [t["value"] for t in turns[1::2]]
        assert all(
            q.endswith("\nAnswer the question using a single word or phrase.") for q in questions
        )
        assert questions[0].count("<image>") == len(scenes)
        if r["kind"] == "presence":
            shown = {(o.color, o.shape) for o in scenes[0].objects}
            assert sorted(answers) == ["No", "Yes"]
            for q, a in zip(questions, answers):
                words = q.split(" in the image?")[0].split()
                assert ((words[-2], words[-1]) in shown) == (a == "Yes"), (q, a, shown)
        elif r["kind"] == "multi_image":
            counts = [sc.count for sc in scenes]
            if "most" in questions[0]:
                assert answers == [("First", "Second", "Third")[counts.index(max(counts))]]
                assert counts.count(max(counts)) == 1
            else:
                assert answers == [str(sum(counts))]
        else:
            assert answers == [scenes[0].text]


def test_presence_questions_are_answered_by_the_picture_alone(world):
    """sft/presence/: two questions per training scene, each answer true of the scene and
    decided by its own coin (no yes-no pairing to deduce the second answer from), random and
    adversarial negatives only."""
    m, _ = world
    records = json.loads((m.root / "sft/presence/llava.json").read_text())
    assert len(records) == m.sources["sft_presence"]["records"] == 64
    pairs, negatives = Counter(), Counter()
    for r in records:
        (scene,) = [Scene.from_dict(x) for x in r["scenes"]]
        shown = {(o.color, o.shape) for o in scene.objects}
        turns = r["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and len(turns) == 4
        answers = []
        for q, a in zip(turns[::2], turns[1::2]):
            assert q["value"].endswith("\nAnswer the question using a single word or phrase.")
            words = q["value"].split(" in the image?")[0].split()
            asked = (words[-2], words[-1])
            assert (asked in shown) == (a["value"] == "Yes"), (q, a, shown)
            if a["value"] == "No":  # an adversarial negative shares a colour or shape
                near = any(asked[0] == c or asked[1] == s for c, s in shown)
                negatives["near" if near else "far"] += 1
            answers.append(a["value"])
        pairs[tuple(answers)] += 1
    assert len(pairs) == 4 and min(pairs.values()) >= 6  # yes/yes and no/no happen too
    assert negatives["near"] > negatives["far"] > 0


@pytest.mark.parametrize("name", ["tasks", "presence"])
def test_sft_task_questions_are_added_to_an_older_world(world, tmp_path, name):
    """A world written before sft/tasks (sft/presence) existed gains the same files, and nothing
    else changes."""
    from mm1.data import sft_tasks

    m, _ = world
    older = tmp_path / "older"
    shutil.copytree(m.root, older)
    shutil.rmtree(older / "sft" / name)
    before = _tree_hashes(older)
    path = getattr(sft_tasks, f"ensure_sft_{name}")(older)
    after = _tree_hashes(older)
    added = {k: v for k, v in after.items() if k not in before}
    assert {k: after[k] for k in before} == before
    assert added == {k: v for k, v in _tree_hashes(m.root).items() if k.startswith(f"sft/{name}/")}
    assert path == older / f"sft/{name}/llava.json"


def test_a_world_is_written_where_the_file_system_has_no_locks(world, tmp_path, monkeypatch):
    import errno

    import mm1.data.synthetic as synthetic

    def no_locks(fd: int, cmd: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(synthetic.fcntl, "lockf", no_locks)
    m, _ = world
    write_world(tmp_path / "w", seed=0, size="tiny")
    assert _tree_hashes(tmp_path / "w") == _tree_hashes(m.root)


def test_every_caption_template_works_without_an_rng():
    """`detailed_caption` is public and its rng optional: every template gives a caption
    without one (template 3 drew its opener from the rng unchecked)."""
    scene = sample_scene(random.Random(0))
    captions = [detailed_caption(scene, t) for t in range(5)]
    assert all(c.endswith(".") and len(c) > 10 for c in captions)
    assert captions[3].startswith("there is ")
