"""The image-encoder commands on the wrong directories: `mm1 export-encoder` into a run, the
source or unrelated files; `eval-encoder` / `export-encoder` given an MM1 run; a resume that
changes the model or the trainer; a contrastive batch larger than its source. Each is one line
(or one warning), and nothing is written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mm1 import cli
from tests.cli_helpers import one_line
from tests.train.run_configs import encoder_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, world: Path, tiny_config) -> dict[str, Path]:
    """A one-step CLIP encoder run and a one-step MM1 run (with their configs)."""
    tmp = tmp_path_factory.mktemp("runs")
    enc_cfg = encoder_config(
        tmp, world, run_dir=str(tmp / "enc"), steps=1, batch_size=4, val_every=0, save_every=1
    )
    assert cli.main(["train-encoder", str(enc_cfg)]) == 0
    mm1_cfg = tiny_config(tmp, world, steps=1, save_every=1, val_every=0, parallel="none")
    mm1 = tmp / "mm1"
    assert cli.main(["train", str(mm1_cfg), f"train.run_dir={mm1}"]) == 0
    return {"enc": tmp / "enc", "enc_cfg": enc_cfg, "mm1": mm1, "mm1_cfg": mm1_cfg}


def _listing(path: Path) -> dict[str, int]:
    """Every file under `path` with its mtime: what a refused command must not touch (but the
    run lock, which a trainer takes before it reads the config)."""
    return {
        str(p.relative_to(path)): p.stat().st_mtime_ns
        for p in sorted(path.rglob("*"))
        if p.name != ".lock"
    }


def test_export_encoder_refuses_a_run_the_source_and_unrelated_files(
    tmp_path: Path, runs, capsys
) -> None:
    enc, mm1 = runs["enc"], runs["mm1"]
    before = {p: _listing(p) for p in (enc, mm1)}
    shadow = "a training run directory (checkpoints/ inside); writing a model there would shadow"
    for out in (mm1, enc, enc / "checkpoints" / "step_1"):
        line = one_line(capsys, ["export-encoder", str(enc), str(out)], 2)
        assert line.startswith(f"config error: OUT {out}: "), line
    assert shadow in one_line(capsys, ["export-encoder", str(enc), str(mm1)], 2)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    line = one_line(capsys, ["export-encoder", str(enc), str(other)], 2)
    assert "the directory holds other files" in line
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = one_line(capsys, ["export-encoder", str(enc), str(afile)], 2)
    assert line == f"config error: OUT {afile}: is a file, not a directory; give a directory"
    assert {p: _listing(p) for p in (enc, mm1)} == before  # nothing written or shadowed
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    assert afile.read_text() == "x"

    # a new directory, then a re-export over it (exactly an earlier vision export) work
    hf = tmp_path / "hf"
    assert cli.main(["export-encoder", str(enc), str(hf)]) == 0
    assert cli.main(["export-encoder", str(enc), str(hf)]) == 0
    capsys.readouterr()
    assert json.loads((hf / "config.json").read_text())["model_type"] == "clip_vision_model"
    (hf / "extra.txt").write_text("mine\n")  # no longer exactly an export: refused
    assert "holds other files" in one_line(capsys, ["export-encoder", str(enc), str(hf)], 2)
    # the encoder run still reads as one, and MM1 still loads its own run
    assert cli.main(["eval-encoder", str(enc), "--probe-seeds", "1"]) == 0


def test_encoder_commands_refuse_an_mm1_run_and_a_file_as_out(tmp_path: Path, runs, capsys) -> None:
    enc, mm1 = runs["enc"], runs["mm1"]
    want = (
        f"config error: {mm1} is an MM1 model run (mm1 train), not an image-encoder run "
        "(mm1 train-encoder)"
    )
    out = tmp_path / "out"
    assert one_line(capsys, ["eval-encoder", str(mm1), "--out", str(out)], 2) == want
    assert one_line(capsys, ["export-encoder", str(mm1), str(out)], 2) == want
    step = mm1 / "checkpoints" / "step_1"
    assert one_line(capsys, ["eval-encoder", str(step)], 2).endswith("(mm1 train-encoder)")
    assert not out.exists() and not (mm1 / "eval").exists()

    afile = tmp_path / "afile"
    afile.write_text("x")
    line = one_line(capsys, ["eval-encoder", str(enc), "--out", str(afile)], 2)
    assert line == f"config error: --out {afile}: is a file, not a directory; give a directory"
    assert afile.read_text() == "x"


def test_force_cannot_change_the_model_nor_resume_the_other_trainer(runs, capsys) -> None:
    enc, enc_cfg, mm1 = runs["enc"], runs["enc_cfg"], runs["mm1"]
    before = {p: _listing(p) for p in (enc, mm1)}
    more = ["train.steps=2"]
    line = one_line(
        capsys, ["train-encoder", "--force", str(enc_cfg), "encoder.objective=aim", *more], 2
    )
    assert line == (
        "config error: --force cannot change the model: the checkpoint's encoder.objective is "
        "clip, the config's aim; resume with the same model or choose a new train.run_dir"
    )
    # a model shape key, with and without --force (which cannot help: not suggested)
    for force in (["--force"], []):
        argv = [
            "train-encoder",
            *force,
            str(enc_cfg),
            "model.vision.width=64",
            "model.vision.heads=4",
        ]
        line = one_line(capsys, [*argv, *more], 2)
        assert "the checkpoint's model.vision.width is 32, the config's 64" in line, line
        assert "resume with the same model or choose a new train.run_dir" in line
        assert "or --force" not in line
    # the objective's own shapes count; its other settings --force may still change
    line = one_line(
        capsys, ["train-encoder", "--force", str(enc_cfg), "encoder.clip.embed_dim=8", *more], 2
    )
    assert "the checkpoint's encoder.clip.embed_dim is 16, the config's 8" in line

    # the other trainer's run directory: one line saying so, with or without --force
    mm1_cfg = runs["mm1_cfg"]
    for force in (["--force"], []):
        line = one_line(capsys, ["train", *force, str(mm1_cfg), f"train.run_dir={enc}"], 2)
        assert line == (
            f"config error: train.run_dir={enc} is an image-encoder run (mm1 train-encoder), "
            "not an MM1 model run (mm1 train): resume it with mm1 train-encoder, or choose a "
            "new train.run_dir"
        )
        line = one_line(capsys, ["train-encoder", *force, str(enc_cfg), f"train.run_dir={mm1}"], 2)
        assert line == (
            f"config error: train.run_dir={mm1} is an MM1 model run (mm1 train), not an "
            "image-encoder run (mm1 train-encoder): resume it with mm1 train, or choose a new "
            "train.run_dir"
        )
    # an MM1 model change under --force
    line = one_line(
        capsys,
        ["train", "--force", str(mm1_cfg), f"train.run_dir={mm1}", "model.decoder.layers=3"],
        2,
    )
    assert line.startswith(
        "config error: --force cannot change the model: the checkpoint's model.decoder.layers "
        "is 2, the config's 3;"
    )
    assert {p: _listing(p) for p in (enc, mm1)} == before  # refused before anything ran


def test_model_changes_are_only_the_keys_that_set_parameters() -> None:
    from mm1.train.config_change import model_changes

    old = {
        "model": {"vision": {"width": 32, "act": "gelu"}, "decoder": {"rope_theta": 1e4}},
        "encoder": {"objective": "aim", "text": {"width": 32}, "aim": {"head_dim": 8}},
    }
    new = json.loads(json.dumps(old))
    new["model"]["vision"]["act"] = "quick_gelu"  # the same parameters: --force may
    new["model"]["decoder"]["rope_theta"] = 5e5
    new["encoder"]["text"]["width"] = 64  # AIM has no text tower
    assert model_changes(old, new) == []
    new["encoder"]["aim"]["head_dim"] = 16
    assert model_changes(old, new) == [("encoder.aim.head_dim", 8, 16)]


def test_a_contrastive_batch_larger_than_its_source_warns_at_start(
    tmp_path: Path, world: Path, caplog
) -> None:
    import tarfile

    from mm1.config.encoder import load_encoder_config
    from mm1.train.encoder_trainer import EncoderTrainer

    small = tmp_path / "small"
    small.mkdir()
    with (
        tarfile.open(sorted((world / "captions").glob("*.tar"))[0]) as src,
        tarfile.open(small / "00000.tar", "w") as dst,
    ):
        for member in src.getmembers():
            if int(member.name.split(".")[0]) < 3:  # three image-caption pairs
                dst.addfile(member, src.extractfile(member))
    cfg = encoder_config(tmp_path, world, batch_size=4, val_every=0)
    source = f"data.sources=[{{format: wds, path: {small}}}]"
    argv = ["train.steps=1", "train.micro_batch_size=16"]

    def warnings(run: str, *overrides: str) -> list[str]:
        caplog.clear()
        more = [f"train.run_dir={tmp_path / run}", *argv, *overrides]
        with caplog.at_level(logging.WARNING):
            EncoderTrainer(load_encoder_config(cfg, more)).fit()
        return [r.getMessage() for r in caplog.records if "contrastive batch" in r.getMessage()]

    got = warnings("small", source, "train.batch_size=16")
    assert got == [
        f"a contrastive batch of 16 pairs (train.micro_batch_size) holds only 3 distinct "
        f"image-caption pairs of {small} on this loader slot: pairs repeat in every batch and "
        "CLIP's loss takes the copies for negatives; lower train.micro_batch_size or add pairs"
    ]
    # the world's 256 pairs fill it; AIM (no negatives) is not warned
    assert warnings("world", "train.batch_size=16") == []
    assert warnings("aim", source, "train.batch_size=16", "encoder.objective=aim") == []
    # a validation source smaller than the batch gives a smaller batch of distinct pairs
    val = [f"data.val_sources=[{{format: wds, path: {small}}}]", "train.val_every=1"]
    more = [f"train.run_dir={tmp_path / 'val'}", *argv, "train.batch_size=16", *val]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        trainer = EncoderTrainer(load_encoder_config(cfg, more))
        trainer.fit()
    assert not [r for r in caplog.records if "contrastive batch" in r.getMessage()]
    assert [len(b) for b in trainer.val_batches] == [3]
