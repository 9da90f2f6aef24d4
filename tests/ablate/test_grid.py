"""Grid files: expansion into cells, and bad input rejected before anything trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mm1.ablate.grid import load_grid
from mm1.ablate.runner import check_study_dir, write_study_file
from mm1.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _grid(tmp_path: Path, **body) -> Path:
    doc = {"study": "s", "base": {"config": str(ROOT / "configs" / "demo.yaml")}, **body}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_product_grid_with_seeds_and_named_axis(tmp_path) -> None:
    mixtures = [
        {"label": "caps", "set": {"data.max_images_per_seq": 8}},
        {"label": "docs", "set": {"data.max_images_per_seq": 4, "data.seq_len": 512}},
    ]
    grid = load_grid(
        _grid(
            tmp_path,
            seeds=[0, 1],
            axes={"model.connector.num_tokens": [16, 4], "mixture": mixtures},
        )
    )
    assert len(grid.cells) == 2 * 2 * 2
    assert len({c.id for c in grid.cells}) == 8
    first, last = grid.cells[0], grid.cells[-1]
    # the first axis is outermost, seeds innermost
    assert first.delta == {
        "model.connector.num_tokens": 16,
        "data.max_images_per_seq": 8,
        "train.seed": 0,
        "data.seed": 0,
    }
    assert last.settings == {"model.connector.num_tokens": "4", "mixture": "docs"}
    assert last.seed == 1 and last.delta["data.seq_len"] == 512
    cfg = grid.cell_config(last, tmp_path / "study")
    assert cfg.model.connector.num_tokens == 4 and cfg.data.max_images_per_seq == 4
    assert cfg.train.seed == 1 and cfg.data.seed == 1
    assert Path(cfg.train.run_dir) == tmp_path / "study" / last.id


def test_explicit_cells(tmp_path) -> None:
    grid = load_grid(
        _grid(
            tmp_path,
            cells=[
                {"model.connector.type": "attnpool"},
                {"label": "short", "set": {"data.seq_len": 128}},
            ],
        )
    )
    assert [c.seed for c in grid.cells] == [0, 0]
    assert grid.cells[1].settings == {"cell": "short"}
    assert grid.cell_config(grid.cells[0], tmp_path).model.connector.type == "attnpool"


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"axes": {"model.connector.typo": [1, 2]}}, "model.connector.typo"),
        ({"axes": {"train.nosuchkey": [1]}}, "train.nosuchkey"),
        ({"axes": {"train.steps": [10, "many"]}}, "train.steps"),
        ({"axes": {}}, "empty grid"),
        ({"cells": []}, "empty grid"),
        ({}, "empty grid"),
        ({"axes": {"train.steps": []}}, "axes.train.steps"),
        ({"axes": {"train.seed": [1, 2]}}, "train.seed"),
        ({"axes": {"train.steps": [5]}, "seeds": [0, 0]}, "seeds"),
        ({"axes": {"train.steps": [5]}, "eval": {"suites": ["nope"]}}, "eval.suites"),
        ({"axes": {"train.steps": [5]}, "colour": 1}, "colour"),
        # the runner places each cell: a run_dir was replaced unsaid, two cells trained alike
        ({"axes": {"train.run_dir": ["/tmp/a", "/tmp/b"]}}, "train.run_dir: the runner puts"),
        ({"cells": [{"train.run_dir": "/tmp/a"}, {"train.steps": 5}]}, "train.run_dir"),
    ],
)
def test_bad_grids_rejected_naming_the_key(tmp_path, body, names) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_grid(_grid(tmp_path, **body))


def test_wrong_type_names_the_cell(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        load_grid(_grid(tmp_path, axes={"train.steps": [10, "many"]}))
    assert "cell many-s0-" in str(err.value) and "train.steps" in str(err.value)


def test_duplicate_cells_rejected_even_when_written_differently(tmp_path) -> None:
    # demo.yaml's connector is avgpool already: the first cell is the base config
    body = {"cells": [{"model.connector.type": "avgpool"}, {"data.seq_len": 256}]}
    with pytest.raises(ConfigError, match="same config"):
        load_grid(_grid(tmp_path, **body))
    with pytest.raises(ConfigError, match=r"cell 5-s0-\w+ \(steps=5\) is listed twice"):
        load_grid(_grid(tmp_path, axes={"train.steps": [5, 5]}))  # it named the one id twice


def test_study_dir_of_another_grid_refused_unless_forced(tmp_path) -> None:
    study = tmp_path / "study"
    first = load_grid(_grid(tmp_path, axes={"train.steps": [5, 6]}))
    write_study_file(first, study)
    check_study_dir(first, study, force=False, log=print)  # the same grid: fine
    (tmp_path / "b").mkdir()
    other = load_grid(_grid(tmp_path / "b", axes={"train.steps": [5, 7]}))
    with pytest.raises(ConfigError, match="another grid.*--force"):
        check_study_dir(other, study, force=False, log=print)
    check_study_dir(other, study, force=True, log=print)
    assert json.loads((study / "grid.json").read_text())["fingerprint"] == first.fingerprint()


@pytest.mark.parametrize(
    "name", ["connectors", "pixel_shuffle", "mixtures", "text_only", "recaption"]
)
def test_preset_studies_fit_the_issue_budget(name, tmp_path) -> None:
    from mm1.ablate.command import dry_run

    grid = load_grid(ROOT / "configs" / "studies" / f"{name}.yaml")
    assert len(grid.cells) <= 16 and len(grid.seeds) >= 2
    for cell in grid.cells:
        cfg = grid.cell_config(cell, tmp_path)
        assert cfg.train.steps >= 800
        # the demo's tokens per step, so the steps mean what the demo's do
        assert cfg.train.batch_size * cfg.data.seq_len == 8 * 256
        assert cfg.eval.shots == [0, 4, 8]
    if name == "connectors":  # one dry run: each builds every cell's model to count FLOPs
        lines = dry_run(grid.path, tmp_path / "study", log=lambda _: None)
        # (plus a warning per cell where data/world-demo exists: 8-shot prompts show 9 images)
        listed = [line for line in lines if not line.strip().startswith("warning:")]
        assert len(listed) == len(grid.cells) + 2 and "estimated time left" in lines[-1]


def test_recaptioner_config_loads() -> None:
    from mm1.config import load_config

    cfg = load_config(ROOT / "configs" / "studies" / "recaptioner.yaml")
    assert cfg.data.sources[0].name == "clean_subset" and cfg.train.steps >= 800


@pytest.mark.parametrize(
    ("prepare", "names"),
    [
        ({"steps": 1}, "give a list"),
        ([{"download": {}}], r"prepare\[0\]\.download"),
        ([{"recaption": {"checkpoint": "r", "in": "a"}}], "out is missing"),
        ([{"caption_splits": {"world": "w", "share": 0.1}}], "share is not an option"),
        ([{"train": {"config": "nowhere.yaml"}}], r"prepare\[0\]\.train: config file not found"),
        (
            [{"train": {"config": str(ROOT / "configs/demo.yaml"), "overrides": {"train.x": 1}}}],
            r"prepare\[0\]\.train: train\.x",
        ),
    ],
)
def test_bad_prepare_steps_rejected(tmp_path, prepare, names) -> None:
    with pytest.raises(ConfigError, match=names):
        load_grid(_grid(tmp_path, axes={"train.steps": [5]}, prepare=prepare))


def test_prepare_steps_parsed_and_in_the_fingerprint(tmp_path) -> None:
    steps = [
        {"caption_splits": {"world": "w", "fraction": 0.1}},
        {"train": {"config": str(ROOT / "configs/studies/recaptioner.yaml")}},
    ]
    body = {"axes": {"train.steps": [5]}}
    (tmp_path / "a" / "b").mkdir(parents=True)
    grid = load_grid(_grid(tmp_path / "a" / "b", **body, prepare=steps))
    assert [s.kind for s in grid.prepare] == ["caption_splits", "train"]
    assert grid.prepare[1].train_config().train.run_dir == "runs/ablations/recaptioner"
    assert grid.prepare[0].describe() == "caption splits of w (fraction 0.1)"
    plain = load_grid(_grid(tmp_path, **body))
    assert plain.fingerprint() != grid.fingerprint()


def _finished_cell(run_dir: Path, cfg, train_seconds: float, steps: int) -> None:
    from mm1.config import to_yaml

    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    rec = {"status": "done", "train_seconds": train_seconds, "steps": steps, "eval_seconds": 0.0}
    (run_dir / "cell.json").write_text(json.dumps(rec))


def test_estimate_uses_finished_cells_of_the_studies_beside_it(tmp_path) -> None:
    """A study with no finished cell is timed by the cells other studies finished on this
    machine (seconds per training FLOP); its own finished cells take over once there are any."""
    from mm1.ablate.runner import _flops_per_step, estimate, plan_study

    grid = load_grid(_grid(tmp_path, axes={"model.connector.num_tokens": [16, 4]}))
    studies = tmp_path / "studies"
    other_cfg = grid.cell_config(grid.cells[0], studies / "other")
    steps = other_cfg.train.steps
    _finished_cell(studies / "other" / "c", other_cfg, train_seconds=50.0, steps=steps)
    per_flop = 50.0 / (_flops_per_step(other_cfg) * steps)

    plans = plan_study(grid, studies / "mine")
    seconds, how = estimate(plans)
    assert "1 finished cell(s) of other studies" in how
    for p in plans:
        expected = _flops_per_step(p.cfg) * p.cfg.train.steps * per_flop
        assert seconds[p.cell.id] == pytest.approx(expected)

    # two cells at a time take half the time of one after the other
    from mm1.ablate.command import dry_run

    def left(jobs: int) -> float:
        last = dry_run(grid.path, studies / "mine", log=lambda _: None, jobs=jobs)[-1]
        value, unit = last.split("estimated time left: ")[1].split(" (")[0].split()
        return float(value) * {"s": 1, "min": 60, "h": 3600}[unit]

    assert left(2) == pytest.approx(left(1) / 2, rel=0.05)
    with pytest.raises(ConfigError, match="--jobs 0: give 1 or more"):  # as without --dry-run
        left(0)

    # a few-step cell of a test study is mostly start-up: it does not time this one
    tiny_cfg = grid.cell_config(grid.cells[0], studies / "tiny")
    tiny_cfg.train.steps = 1
    _finished_cell(studies / "tiny" / "c", tiny_cfg, train_seconds=500.0, steps=1)
    again, how = estimate(plans)
    assert (
        "1 finished cell(s) of other studies" in how and "(1 much smaller cell(s) left out)" in how
    )
    assert again == seconds
    # a full-size cell resumed near its end: its last sitting is short, the cell is not
    resumed_cfg = grid.cell_config(grid.cells[0], studies / "resumed")
    resumed = studies / "resumed" / "c"
    _finished_cell(resumed, resumed_cfg, train_seconds=5.0, steps=resumed_cfg.train.steps)
    rec = json.loads((resumed / "cell.json").read_text())
    rec["trained_steps_this_sitting"] = 10
    (resumed / "cell.json").write_text(json.dumps(rec))
    _, how = estimate(plans)
    assert "2 finished cell(s) of other studies" in how and "(1 much smaller" in how

    done = plans[0]
    _finished_cell(done.run_dir, done.cfg, train_seconds=200.0, steps=done.cfg.train.steps)
    plans = plan_study(grid, studies / "mine")
    seconds, how = estimate(plans)
    assert how.startswith("measured on 1 finished cell(s), training")
    (pending,) = seconds
    assert seconds[pending] == pytest.approx(
        200.0 * _flops_per_step(plans[1].cfg) / _flops_per_step(done.cfg)
    )


def test_cells_whose_short_labels_collide_get_longer_labels(tmp_path) -> None:
    """The report groups seeds by label: two configurations never share one."""
    cells = [
        {"model.vision.layers": 1},
        {"model.decoder.layers": 1},
        {"model.decoder.layers": 3},
        {"data.seq_len": 128},
    ]
    grid = load_grid(_grid(tmp_path, cells=cells))
    labels = [c.label for c in grid.cells]
    # only the colliding labels grow; the others keep the short form
    assert labels == ["vision.layers=1", "decoder.layers=1", "layers=3", "seq_len=128"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {
                "cells": [
                    {"label": "small", "set": {"data.seq_len": 128}},
                    {"label": "small", "set": {"data.seq_len": 512}},
                ]
            },
            "cells[0] and cells[1]: both are labelled 'small' but set different values; "
            "give each its own label",
        ),
        (
            {
                "axes": {
                    "mix": [
                        {"label": "small", "set": {"data.seq_len": 128}},
                        {"label": "small", "set": {"data.seq_len": 512}},
                    ]
                }
            },
            "axes.mix[0] and axes.mix[1]: both are labelled 'small' but set different values; "
            "give each its own label",
        ),
    ],
)
def test_one_label_for_two_configurations_refused(tmp_path, body, message) -> None:
    with pytest.raises(ConfigError) as err:
        load_grid(_grid(tmp_path, **body))
    assert str(err.value) == f"{tmp_path / 'grid.yaml'}: {message}"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"base": {"config": str(ROOT / "configs" / "demo.yaml"), "overide": {}}},
            "base.overide: not a key of base; known: config, overrides",
        ),
        ({"eval": {"overides": {}}}, "eval.overides: not a key of eval; known: suites, overrides"),
        ({"eval": ["fewshot"]}, "eval: give a mapping (suites, overrides), not a list"),
        ({"eval": {"overrides": ["eval.seeds=1"]}}, "eval.overrides: give a mapping"),
        # a bad key is blamed on the section that set it, not on the base config
        ({"eval": {"overrides": {"eval.max_exampels": 4}}}, "eval.overrides: eval.max_exampels"),
        (
            {
                "base": {
                    "config": str(ROOT / "configs" / "demo.yaml"),
                    "overrides": {"train.stpes": 4},
                }
            },
            "base: train.stpes",
        ),
        (
            {"table": {"layot": "fig4"}},
            "table.layot: not a key of table; known: layout, group_by, columns",
        ),
        ({"study": "../../escape"}, "study='../../escape': give a plain name"),
        ({"study": "/tmp/abs"}, "study='/tmp/abs': give a plain name"),
    ],
)
def test_nested_typos_and_bad_study_names_refused(tmp_path, body, message) -> None:
    with pytest.raises(ConfigError) as err:
        load_grid(_grid(tmp_path, axes={"train.steps": [5]}, **body))
    assert str(err.value).startswith(f"{tmp_path / 'grid.yaml'}: {message}")
    assert "\n" not in str(err.value)


def test_eval_overrides_may_be_what_makes_the_base_valid(tmp_path) -> None:
    """The cells run base + eval overrides, never the base alone: a base that beams with
    `eval.compile` (refused alone) is a valid study when `eval.overrides` evaluate greedily."""
    base = tmp_path / "beams.yaml"
    base.write_text(
        yaml.safe_dump({"extends": str(ROOT / "configs" / "demo.yaml"), "eval": {"num_beams": 3}})
    )
    body = {
        "base": {"config": str(base), "overrides": {"eval.compile": True}},
        "axes": {"train.steps": [5]},
    }
    with pytest.raises(ConfigError, match=r"grid\.yaml: base: eval\.compile"):
        load_grid(_grid(tmp_path, **body))
    grid = load_grid(_grid(tmp_path, **body, eval={"overrides": {"eval.num_beams": 1}}))
    assert grid.cell_config(grid.cells[0], tmp_path / "study").eval.num_beams == 1


def test_a_sitting_that_trained_no_step_is_no_measurement(tmp_path) -> None:
    """A cell stopped while evaluating and resumed trains 0 steps in its last sitting: its
    seconds are no measure of training (they would be spread over all its steps)."""
    from mm1.ablate.runner import estimate, plan_study

    grid = load_grid(_grid(tmp_path, axes={"model.connector.num_tokens": [16, 4]}))
    plans = plan_study(grid, tmp_path / "studies" / "mine")
    done = plans[0]
    _finished_cell(done.run_dir, done.cfg, train_seconds=0.4, steps=done.cfg.train.steps)
    rec = json.loads((done.run_dir / "cell.json").read_text())
    rec["trained_steps_this_sitting"] = 0
    (done.run_dir / "cell.json").write_text(json.dumps(rec))
    _, how = estimate(plan_study(grid, tmp_path / "studies" / "mine"))
    assert how.startswith("training FLOPs at this machine's matmul rate")


def test_an_unreadable_study_file_is_named(tmp_path) -> None:
    study = tmp_path / "study"
    grid = load_grid(_grid(tmp_path, axes={"train.steps": [5, 6]}))
    write_study_file(grid, study)
    path = study / "grid.json"
    path.write_text(path.read_text()[:40])  # cut short
    with pytest.raises(ConfigError) as err:
        check_study_dir(grid, study, force=False, log=print)
    message = str(err.value)
    assert message.startswith(f"{path}: not valid JSON (") and "\n" not in message
    assert message.endswith("use --force to run this grid there, or another study directory")
    check_study_dir(grid, study, force=True, log=lambda _: None)  # --force: run it there


def test_fingerprints_leave_out_keys_added_since_at_their_defaults() -> None:
    """A study's fingerprint and its cells' hashes see the whole config, defaults included (a
    changed default changes what a run means), except `train.run_dir` and the keys added to
    the schema since studies were written, where those hold their defaults: a study written
    before them keeps its fingerprint."""
    from mm1.ablate.runner import config_hash
    from mm1.config import ADDED_KEYS, config_identity, load_config, to_dict
    from mm1.config.loading import key_holder

    cfg = load_config(None, ["train.steps=7"])
    ident = config_identity(cfg)
    full = to_dict(cfg)
    removed: list[str] = []
    for key in ADDED_KEYS:
        if any(key.startswith(f"{k}.") for k in removed):
            continue  # in a section added since, gone with it (at its default)
        (in_full, name), (in_ident, _) = key_holder(full, key), key_holder(ident, key)
        assert name in in_full and name not in in_ident, key
        del in_full[name]
        removed.append(key)
    del full["train"]["run_dir"]
    assert ident == full  # every other value, at its default or not
    # A key added to a section added earlier: out of a section that differs from its default
    # as long as the key holds its default (a LoRA study keeps its fingerprint).
    lora = config_identity(load_config(None, ["train.lora.rank=4"]))["train"]["lora"]
    assert lora["rank"] == 4 and "quantize" not in lora
    moved = load_config(None, ["train.steps=7", "train.run_dir=elsewhere"])
    assert config_hash(moved) == config_hash(cfg)
    for change in ("train.steps=8", "data.max_text_chars=5", "train.profile_at=3"):
        assert config_hash(load_config(None, ["train.steps=7", change])) != config_hash(cfg)
