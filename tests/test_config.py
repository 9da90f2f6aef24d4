"""The config: mistakes are one line naming the key or the file as the user wrote it; values
are checked before anything is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mm1 import cli
from mm1.config import ConfigError, SourceConfig, load_config, source_names
from tests.cli_helpers import one_line


@pytest.mark.parametrize("betas", ["[0.9]", "[0.9,0.95,0.99]"])
def test_tuple_of_wrong_length_names_its_key(betas: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^train\.optim\.betas=.*needs exactly 2 values"):
        load_config(None, [f"train.optim.betas={betas}"])
    path = tmp_path / "cfg.yaml"
    path.write_text(f"train:\n  optim:\n    betas: {betas}\n")
    with pytest.raises(ConfigError, match=rf"^train\.optim\.betas=.*\({path}\): needs exactly 2"):
        load_config(path)
    assert load_config(None, ["train.optim.betas=[0.8,0.9]"]).train.optim.betas == (0.8, 0.9)


def test_tuple_error_through_the_cli_is_one_line(capsys) -> None:
    assert cli.main(["info", str(cli_config()), "train.optim.betas=[0.9]"]) == 2
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and "train.optim.betas" in out, out


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("eval.shots.0=3", ("eval.shots is a list", "e.g. eval.shots=[3,4,8]")),
        ("train.optim.betas.0=0.5", ("e.g. train.optim.betas=[0.5,0.95]",)),
        ("data.sources.0.weight=2", ("data.sources is a list", "data.sources=[{...},...]")),
        ("train.optim=5", ("train.optim is a mapping of keys, not 5",)),
        ("model=5", ("model is a mapping of keys, not 5",)),
        ("eval.shots=5", ("eval.shots is a list, not 5",)),
    ],
)
def test_override_of_the_wrong_shape_names_the_override(
    override: str, expected: tuple[str, ...], tmp_path: Path, capsys
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("train:\n  steps: 3\n")  # no sources: the file is not to blame
    out = one_line(capsys, ["info", str(path), override], 2)
    assert out.startswith(f"config error: override {override}: "), out
    assert all(part in out for part in expected), out
    assert "t.yaml" not in out


def test_yaml_value_of_the_wrong_shape_names_its_key(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    for text, expected in [
        ("model: 5\n", "model is a mapping of keys, not 5"),
        ("eval:\n  shots: {0: 3}\n", "eval.shots is a list, not a mapping"),
        (
            "data:\n  sources: {path: x}\n",
            "data.sources is a list, not a mapping (entries: - {format",
        ),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert str(err.value).startswith(f"{path}: {expected}"), err.value


def cli_config() -> Path:
    return Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.yaml"


def test_missing_config_is_named_as_typed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    Path("link.yaml").symlink_to(tmp_path / "elsewhere" / "gone.yaml")  # dangling symlink
    with pytest.raises(ConfigError) as err:
        load_config("link.yaml")
    assert str(err.value) == "config file not found: link.yaml"
    with pytest.raises(ConfigError) as err:
        load_config("missing.yaml")
    assert str(err.value) == "config file not found: missing.yaml"

    # a symlink to a real file: errors in it still name the path typed
    (tmp_path / "elsewhere" / "bad.yaml").write_text("train:\n  steps: [1\n")
    Path("bad_link.yaml").symlink_to(tmp_path / "elsewhere" / "bad.yaml")
    with pytest.raises(ConfigError, match=r"^bad_link\.yaml: not valid YAML"):
        load_config("bad_link.yaml")

    # a missing parent: the `extends` entry as written, and the file that names it
    Path("child.yaml").write_text("extends: [models/none.yaml]\n")
    with pytest.raises(ConfigError) as err:
        load_config("child.yaml")
    where = Path("models/none.yaml").resolve()  # relative to child.yaml's folder, the cwd here
    assert str(err.value) == (
        f"config file not found: models/none.yaml ('extends' of child.yaml); looked for at {where}"
    )
    # `extends` that names no file: one line naming the key, not a traceback from the merge
    for value in ("3", "[models/tiny.yaml, 3]", "{a: 1}"):
        Path("child.yaml").write_text(f"extends: {value}\n")
        with pytest.raises(ConfigError, match=r"^child\.yaml: 'extends' must be a config file"):
            load_config("child.yaml")


def test_config_rejects_unknown_keys_and_bad_values(tmp_path) -> None:
    with pytest.raises(ConfigError, match="model.conector"):
        load_config(None, ["model.conector.type=mlp"])
    with pytest.raises(ConfigError, match="model.decoder.dim"):
        load_config(None, ["model.decoder.dim=wide"])
    with pytest.raises(ConfigError, match=r"model\.connector\.num_tokens=99"):
        load_config(None, ["model.connector.num_tokens=99"])
    with pytest.raises(ConfigError, match="train.parallel"):
        load_config(None, ["train.parallel=zero3"])
    with pytest.raises(ConfigError, match=r"train\.optim\.grad_clip=-1"):
        load_config(None, ["train.optim.grad_clip=-1"])
    assert load_config(None, ["train.optim.grad_clip=0"]).train.optim.grad_clip == 0  # no clip
    # checked at load, not at the first save or the first batch
    with pytest.raises(ConfigError, match=r"^train\.keep_checkpoints=0 must be positive"):
        load_config(None, ["train.keep_checkpoints=0"])
    with pytest.raises(ConfigError, match=r"^data\.pack_buffer=0 must be positive"):
        load_config(None, ["data.pack_buffer=0"])
    for weight in (".nan", ".inf", "-1"):
        with pytest.raises(ConfigError, match=r"^data\.sources\[0\]\.weight=.* a finite number"):
            load_config(None, [f"data.sources=[{{format: wds, path: a, weight: {weight}}}]"])
    # every reader's format is accepted; image_root only where a format has image paths
    coco = load_config(None, ["data.sources=[{format: coco, path: c.json, image_root: imgs}]"])
    assert coco.data.sources[0].resolved_kind == "captions"
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.pth .*not a source key"):
        load_config(None, ["data.sources=[{format: wds, path: a}, {format: text, pth: b}]"])
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.image_root.*wds"):
        load_config(None, ["data.sources=[{format: wds, path: s.tar, image_root: imgs}]"])
    # one image with boundaries is <img> + Q slots + </img>
    q = ["model.connector.num_tokens=16", "data.image_boundaries=true"]
    assert load_config(None, [*q, "data.seq_len=19"]).data.seq_len == 19
    with pytest.raises(ConfigError, match="cannot hold one image of 18 tokens"):
        load_config(None, [*q, "data.seq_len=18"])

    bad = tmp_path / "x.yaml"
    bad.write_text(json.dumps({"train": {"stepz": 3}}))
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(bad)


def test_config_formats_are_the_readers_formats() -> None:
    from mm1.config import FORMAT_KINDS, SOURCE_FORMATS
    from mm1.data.sources import FORMATS, READERS

    assert set(SOURCE_FORMATS) == set(FORMATS) == set(READERS) == set(FORMAT_KINDS)


def test_sources_are_named_uniquely_from_their_paths_or_by_the_config() -> None:
    def named(*specs: tuple[str, str]) -> list[str]:
        return source_names([SourceConfig(format="wds", path=p, name=n) for p, n in specs])

    assert named(("data/cc3m/{00000..00009}.tar", ""), ("data/laion/*.tar", "")) == [
        "cc3m",
        "laion",
    ]
    assert named(("d/llava_v1.5_665k.json", ""), ("d/text.jsonl.gz", ""), ("/", "")) == [
        "llava_v1.5_665k",
        "text",
        "source2",
    ]
    # a derived name never takes a given one, nor another derived one; no stem: the index
    assert named(("a/x.tar", ""), ("b/x.tar", "x"), ("c/x", ""), ("*", "")) == [
        "x_0",
        "x",
        "x_2",
        "source3",
    ]


def test_source_names_are_validated() -> None:
    two = "data.sources=[{format: wds, path: a, name: %s}, {format: wds, path: b, name: %s}]"
    assert load_config(None, [two % ("web", "re-cap.v2")]).data.sources[1].name == "re-cap.v2"
    with pytest.raises(
        ConfigError, match=r"^data\.sources\[1\]\.name='web' is also data\.sources\[0\]"
    ):
        load_config(None, [two % ("web", "web")])
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]\.name='a b' may hold only"):
        load_config(None, [two % ("'a b'", "c")])
    with pytest.raises(ConfigError, match=r"^data\.val_sources\[0\]\.name='x/y'"):
        load_config(None, ["data.val_sources=[{format: coco, path: c.json, name: x/y}]"])


def test_world_image_size_is_checked_against_the_world(tmp_path: Path) -> None:
    from mm1.data.world import ensure_world

    with pytest.raises(ConfigError, match=r"^data\.world_image_size=16 must be at least 32"):
        load_config(None, ["data.world_image_size=16"])
    cfg = load_config(None, [f"data.world={tmp_path / 'w'}", "data.world_image_size=48"])
    assert ensure_world(cfg.data).image_size == 48  # written at the size asked for
    cfg = load_config(None, [f"data.world={tmp_path / 'w'}"])
    with pytest.raises(ConfigError, match=r"^data\.world_image_size=64, but the world .* 48 px"):
        ensure_world(cfg.data)
