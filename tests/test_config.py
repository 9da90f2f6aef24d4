"""Config mistakes are one line naming the key or the file as the user wrote it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mm1 import cli
from mm1.config import ConfigError, load_config


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
    assert str(err.value) == "config file not found: models/none.yaml ('extends' of child.yaml)"
