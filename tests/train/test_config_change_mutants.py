"""What a resume may change (`mm1.train.config_change`), checked on saved run directories
written here (a config.yaml and an empty complete checkpoint) without training: keys that change
the run's meaning are refused unless forced, the model's shape and the worker count even then,
and a saved config in an older shape still resumes unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from mm1.checkpoint import META_FILE, checkpoints_root
from mm1.config import ConfigError, load_config, to_dict, to_yaml
from mm1.train.config_change import (
    check_resumed_config,
    config_diff,
    current_shape,
    model_changes,
)

SOURCES = "data.sources=[{format: wds, path: a}]"


def saved_run(tmp_path: Path, overrides: list[str], checkpoint: bool = True) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_config(None, [SOURCES, *overrides])))
    if checkpoint:
        step = checkpoints_root(run) / "step_2"
        step.mkdir(parents=True)
        (step / META_FILE).write_text("{}")
    return run


def resume(run: Path, overrides: list[str], force: bool = False) -> None:
    check_resumed_config(run, load_config(None, [SOURCES, *overrides]), force)


def test_a_changed_meaning_is_refused_unless_forced(tmp_path) -> None:
    run = saved_run(tmp_path, ["train.seed=0", "train.steps=10"])
    resume(run, ["train.seed=0", "train.steps=20"])  # steps are not compared
    with pytest.raises(ConfigError, match=r"config differs in train\.seed; .* or --force"):
        resume(run, ["train.seed=1"])
    resume(run, ["train.seed=1"], force=True)


def test_a_changed_worker_count_is_refused_even_when_forced(tmp_path) -> None:
    run = saved_run(tmp_path, ["data.num_workers=1"])
    with pytest.raises(
        ConfigError, match=r"^data\.num_workers=2: .* saved with data\.num_workers=1"
    ):
        resume(run, ["data.num_workers=2"], force=True)


def test_a_run_without_a_checkpoint_is_not_compared(tmp_path) -> None:
    """A run that stopped before its first save has nothing to resume: it starts over."""
    run = saved_run(tmp_path, ["train.seed=0"], checkpoint=False)
    resume(run, ["train.seed=1"])


@pytest.mark.parametrize(
    "change",
    [
        "model.vision.feature_layer=-2",
        "model.connector.num_tokens=64",
        "model.decoder.layers=3",
        "model.decoder.norm=layer",
        "model.decoder.o_bias=true",
    ],
)
def test_keys_that_shape_the_parameters_are_refused_even_when_forced(tmp_path, change) -> None:
    run = saved_run(tmp_path, [])
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=rf"--force cannot change the model: .*'s {key} is"):
        resume(run, [change], force=True)


def test_an_mlp_ffns_bias_shapes_the_parameters(tmp_path) -> None:
    run = saved_run(tmp_path, ["model.decoder.ffn={type: mlp}"])
    resume(run, ["model.decoder.ffn={type: mlp, activation: gelu}"], force=True)  # no weights
    with pytest.raises(
        ConfigError,
        match=r"--force cannot change the model: .*'s model\.decoder\.ffn\.bias is True, the "
        r"config's False",
    ):
        resume(run, ["model.decoder.ffn={type: mlp, bias: false}"], force=True)


FUYU = ["model.family=fuyu", "model.vision.patch_size=16", "model.image_layout.type=fuyu"]


@pytest.mark.parametrize(
    "change", ["model.vision.width=512", "model.vision.layers=4", "model.connector.num_tokens=64"]
)
def test_a_fuyu_run_resumes_whatever_its_unused_encoder_keys_say(tmp_path, change) -> None:
    """fuyu builds no encoder and no connector of those options: their keys mean nothing to
    it, so a resume may change them, forced or not; its patch size still shapes the Linear."""
    run = saved_run(tmp_path, FUYU)
    resume(run, [*FUYU, change])
    with pytest.raises(ConfigError, match=r"--force cannot change the model: .*patch_size"):
        resume(run, [*FUYU[:2], "model.vision.patch_size=8", FUYU[2]], force=True)
    # an MM1 run's same change is its model's
    (tmp_path / "mm1").mkdir()
    mm1 = saved_run(tmp_path / "mm1", [])
    with pytest.raises(ConfigError, match="--force cannot change the model"):
        resume(mm1, [change], force=True)


def test_config_diff_sees_keys_on_either_side_and_sections_replaced() -> None:
    old = {"a": {"b": 1, "c": 2}, "d": 1}
    assert config_diff(old, {"a": None, "d": 1}) == ["a"]
    assert config_diff(old, {"a": {"b": 1, "c": 2}, "d": 1, "e": 0}) == ["e"]
    assert config_diff(old, {"a": {"b": 1}, "d": 1}) == ["a.c"]


def test_an_hf_text_tower_counts_as_a_model_change_only_when_set_or_unset() -> None:
    old = {"encoder": {"objective": "clip", "text": {"hf": None, "width": 32}}}
    moved = {"encoder": {"objective": "clip", "text": {"hf": "/towers/b", "width": 32}}}
    assert model_changes(old, moved) == [("encoder.text.hf", None, "/towers/b")]
    elsewhere = {"encoder": {"objective": "clip", "text": {"hf": "/towers/c", "width": 32}}}
    assert model_changes(moved, elsewhere) == []  # its shapes are checked when it loads


def test_the_vq_tokenizer_counts_where_it_is_built() -> None:
    """`model.vq` sets the parameters of a VQ tokenizer run (whatever its model.family) and of
    a chameleon model, and of no other model; a tokenizer run builds no ViT."""

    def cfg(family: str, objective: str | None, book: int, width: int = 32) -> dict:
        out: dict = {"model": {"family": family, "vq": {"codebook_size": book}}}
        out["model"]["vision"] = {"width": width}
        if objective:
            out["encoder"] = {"objective": objective}
        return out

    book = ("model.vq.codebook_size", 16, 32)
    assert model_changes(cfg("mm1", "vq", 16), cfg("mm1", "vq", 32)) == [book]
    assert model_changes(cfg("mm1", "vq", 16, 32), cfg("mm1", "vq", 16, 64)) == []
    assert model_changes(cfg("chameleon", None, 16), cfg("chameleon", None, 32)) == [book]
    assert model_changes(cfg("mm1", None, 16), cfg("mm1", None, 32)) == []
    assert model_changes(cfg("mm1", "aim", 16), cfg("mm1", "aim", 32)) == []


def test_the_seed_tokenizer_counts_where_it_is_built() -> None:
    """`model.seed` sets the parameters of a SEED tokenizer run and of a seed model, and of no
    other model; a SEED tokenizer run and a seed model read the ViT (frozen), not a connector,
    nor `model.vq`."""

    def cfg(family: str, objective: str | None, queries: int, **model: object) -> dict:
        out: dict = {"model": {"family": family, "seed": {"num_queries": queries}, **model}}
        if objective:
            out["encoder"] = {"objective": objective}
        return out

    queries = ("model.seed.num_queries", 16, 32)
    width = ("model.vision.width", 32, 64)
    for family, objective in (("mm1", "seed"), ("seed", None)):
        assert model_changes(cfg(family, objective, 16), cfg(family, objective, 32)) == [queries]
        wider = [cfg(family, objective, 16, vision={"width": w}) for w in (32, 64)]
        assert model_changes(*wider) == [width]
        for unread in ({"connector": {"type": "mlp"}}, {"vq": {"code_dim": 8}}):
            assert (
                model_changes(cfg(family, objective, 16), cfg(family, objective, 16, **unread))
                == []
            )
    for family, objective in (("mm1", None), ("mm1", "clip"), ("chameleon", None), ("mm1", "vq")):
        assert model_changes(cfg(family, objective, 16), cfg(family, objective, 32)) == []
    # a SEED run's text tower is its CLIP run's, in its checkpoint: a change is refused
    tower = [cfg("mm1", "seed", 16), cfg("mm1", "seed", 16)]
    tower[1]["encoder"]["text"] = {"width": 64}
    tower[0]["encoder"]["text"] = {"width": 32}
    assert model_changes(*tower) == [("encoder.text.width", 32, 64)]


def test_a_config_saved_in_an_older_shape_is_unchanged() -> None:
    cfg = load_config(
        None,
        [
            "data.sources=[{format: wds, path: a, name: cc3m}]",
            "data.val_sources=[{format: wds, path: v}]",
        ],
    )
    saved = to_dict(cfg)
    del saved["data"]["val_sources"][0]["name"]  # written before sources had names
    del saved["model"]["connector"]["layer_norm"]  # written before the option existed
    assert config_diff(current_shape(saved), to_dict(cfg)) == []


@pytest.mark.parametrize(
    "key", ["train.train_vision", "train.train_connector", "train.train_decoder"]
)
def test_what_trains_cannot_change_on_a_resume(tmp_path, key) -> None:
    """The optimizer's state and groups are the trained parts': a resume that froze or thawed
    one crashed in the scheduler a few steps in, or failed to read the checkpoint. Refused even
    when forced, pointing at a new stage; a family that never trains its image tokenizer reads
    no train.train_vision."""
    run = saved_run(tmp_path, [f"{key}=true"])
    resume(run, [f"{key}=true"])
    with pytest.raises(
        ConfigError,
        match=rf"cannot change what trains, not even with --force: the checkpoint's {key} is "
        rf"True, the config's False .* train\.init\.weights={run}",
    ):
        resume(run, [f"{key}=false"], force=True)
    (tmp_path / "chameleon").mkdir()
    chameleon = ["model.family=chameleon", "model.image_layout.type=single"]
    tokens = saved_run(tmp_path / "chameleon", [*chameleon, "train.train_vision=true"])
    if key == "train.train_vision":
        resume(tokens, [*chameleon, "train.train_vision=false"])
