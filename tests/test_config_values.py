"""Config values that used to be accepted silently: each is refused at load, in one line naming
the key (or, for a key of a type not chosen, warned about); and every shipped config and study
grid still loads."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from mm1 import cli
from mm1.config import ConfigError, load_config, load_eval_config, model_config_from_dict
from mm1.config.encoder import load_encoder_config
from tests.cli_helpers import one_line

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "mm1" / "configs"
TINY = str(CONFIGS / "models" / "tiny.yaml")


def _refused(overrides: list[str], pattern: str, path: str | None = TINY) -> None:
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(path, overrides)
    assert len(str(err.value).splitlines()) == 1, str(err.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.optim.lr=inf", "train.optim.lr=inf"),
        ("train.optim.lr=nan", "train.optim.lr=nan"),
        ("train.optim.weight_decay=nan", "train.optim.weight_decay=nan"),
        ("train.optim.eps=inf", "train.optim.eps=inf"),
        ("train.optim.vision_lr_mult=-inf", "train.optim.vision_lr_mult=-inf"),
        ("train.optim.betas=[0.9,nan]", r"train.optim.betas\[1\]=nan"),
        ("model.init_std=inf", "model.init_std=inf"),
        ("model.vision.norm_eps=nan", "model.vision.norm_eps=nan"),
        ("model.decoder.rope_theta=inf", "model.decoder.rope_theta=inf"),
        ("model.decoder.rope_scaling.factor=nan", "model.decoder.rope_scaling.factor=nan"),
        ("data.world_text_scale=inf", "data.world_text_scale=inf"),
        ("eval.length_penalty=nan", "eval.length_penalty=nan"),
    ],
)
def test_non_finite_floats_are_refused_naming_the_key(override: str, key: str) -> None:
    _refused([override], rf"^{key} must be a finite number$")


def test_non_finite_checks_keep_the_specific_messages() -> None:
    _refused(["train.optim.lr=-inf"], r"^train\.optim\.lr=-inf must be >= 0 \(0 = the MM1 law\)")
    _refused(["train.optim.grad_clip=nan"], r"^train\.optim\.grad_clip=nan must be >= 0")
    _refused(["train.init.upcycle_noise=inf"], r"^train\.init\.upcycle_noise=inf must be a finite")
    _refused(["train.aux_loss_weights.router_z=nan"], r"^train\.aux_loss_weights\.router_z=nan")
    _refused(["data.max_error_rate=nan"], r"^data\.max_error_rate=nan must be within \[0, 1\]")
    assert load_config(TINY, ["train.optim.lr=1e-3"]).train.optim.lr == 1e-3


def test_non_finite_floats_are_refused_in_every_entry_point(tmp_path: Path) -> None:
    """The model alone (an exported config.json), the eval section alone (`mm1 eval RUN`), the
    registered parts' own options and an extended schema's sections are walked too."""
    with pytest.raises(ConfigError, match=r"^model\.decoder\.norm_eps=inf must be a finite"):
        model_config_from_dict({"decoder": {"norm_eps": float("inf")}})
    with pytest.raises(ConfigError, match=r"^eval\.length_penalty=nan must be a finite"):
        load_eval_config(None, ["eval.length_penalty=nan"])
    clip = str(CONFIGS / "encoder_clip.yaml")
    with pytest.raises(ConfigError, match=r"^encoder\.clip\.logit_scale_max=inf must be a fin"):
        load_encoder_config(clip, ["encoder.clip.logit_scale_max=inf"])


def test_non_finite_lr_through_the_cli_is_one_config_error(capsys) -> None:
    out = one_line(capsys, ["info", TINY, "train.optim.lr=inf"], 2)
    assert out == "config error: train.optim.lr=inf must be a finite number"


def test_shard_groups_need_fsdp() -> None:
    with pytest.raises(
        ConfigError, match=r"^train\.shard_size=8 sets FSDP2's shard groups: it needs "
    ):
        load_config(TINY, ["train.shard_size=8", "train.parallel=ddp"])
    with pytest.raises(ConfigError, match=r"^train\.shard_size=1 would keep the whole model"):
        load_config(TINY, ["train.shard_size=1"])
    assert load_config(TINY, ["train.shard_size=8"]).train.shard_size == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.val_every=-1", "train.val_every=-1 must be >= 0 (0 = no validation)"),
        ("train.val_batches=-1", "train.val_batches=-1 must be >= 0"),
        ("train.optim.warmup_steps=-5", "train.optim.warmup_steps=-5 must be >= 0 (0 = no warmup)"),
        ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
        ("data.max_text_chars=-1", "data.max_text_chars=-1 must be >= 0 (0 = no cap)"),
        ("train.profile_at=-1", "train.profile_at=-1 must be >= 0 (0 = no profiling)"),
        ("train.shard_size=-8", "train.shard_size=-8 must be >= 0 (0 = shard over every process)"),
        ("train.profile_steps=0", "train.profile_steps=0 must be positive"),
        ("train.max_nonfinite_in_a_row=0", "train.max_nonfinite_in_a_row=0 must be positive"),
        (
            "model.decoder.head_dim=-64",
            "model.decoder.head_dim=-64 must be >= 0 (0 = dim // heads)",
        ),
        (
            "model.decoder.sliding_window=-1",
            "model.decoder.sliding_window=-1 must be >= 0 (0 = full attention)",
        ),
    ],
)
def test_negative_counts_are_refused_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert str(err.value) == message


@pytest.mark.parametrize(
    "override",
    [
        "train.val_every=0",
        "train.val_batches=0",
        "train.optim.warmup_steps=0",
        "data.num_workers=0",
        "train.max_nonfinite_in_a_row=1",
        "model.decoder.head_dim=0",
        "model.decoder.sliding_window=0",
    ],
)
def test_zero_keeps_its_meaning(override: str) -> None:
    load_config(TINY, [override])


def test_rope_scaling_is_checked_for_the_types_that_read_it() -> None:
    _refused(
        ["model.decoder.rope_scaling.type=linear", "model.decoder.rope_scaling.factor=0"],
        r"^model\.decoder\.rope_scaling\.factor=0\.0 must be positive$",
    )
    _refused(
        [
            "model.decoder.rope_scaling.type=llama3",
            "model.decoder.rope_scaling.original_max_position_embeddings=0",
        ],
        r"^model\.decoder\.rope_scaling\.original_max_position_embeddings=0 must be positive$",
    )
    # the default type reads neither
    load_config(TINY, ["model.decoder.rope_scaling.factor=0"])


@pytest.mark.parametrize("connector", ["linear", "mlp", "avgpool", "c_abstractor"])
def test_connector_num_tokens_zero_means_every_patch(connector: str) -> None:
    """num_tokens=0 is documented (`ConnectorConfig.num_tokens`) as one token per patch, the
    only choice for linear / mlp: the model still sees the image; a negative count is refused."""
    over = [f"model.connector.type={connector}", "model.connector.num_tokens=0"]
    m = load_config(TINY, over).model
    assert m.connector.num_tokens == 0 and m.num_image_tokens == m.vision.num_patches > 0
    _refused(
        [f"model.connector.type={connector}", "model.connector.num_tokens=-4"],
        r"^model\.connector\.num_tokens=-4 must be >= 0$",
    )


def test_attnpool_needs_queries() -> None:
    _refused(
        ["model.connector.type=attnpool", "model.connector.num_tokens=0"],
        r"^model\.connector\.num_tokens=0 must be positive$",
    )


def test_keys_of_another_type_are_warned_about(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mm1.config.validation"):
        cfg = load_config(TINY, ["model.decoder.ffn.experts=8"])
    assert cfg.model.decoder.ffn.type == "swiglu"
    warned = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    assert warned == [
        "model.decoder.ffn.experts=8 is ignored: model.decoder.ffn.type is swiglu "
        "(set model.decoder.ffn.type=moe to use it)"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mm1.config.validation"):
        load_config(TINY, ["model.connector.mlp_depth=3"])  # tiny's connector is avgpool
    assert [r.getMessage() for r in caplog.records] == [
        "model.connector.mlp_depth=3 is ignored: model.connector.type is avgpool "
        "(set model.connector.type=c_abstractor or mlp or pixel_shuffle to use it)"
    ]
    # a key no type declares is still an error; the chosen type's own keys warn about nothing
    _refused(["model.decoder.ffn.bogus=8"], r"^model\.decoder\.ffn\.bogus is not an option")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mm1.config.validation"):
        load_config(TINY, ["model.decoder.ffn.type=moe", "model.decoder.ffn.experts=4"])
    assert not [r for r in caplog.records if "is ignored" in r.getMessage()]


def test_info_names_the_key_of_a_missing_starting_point(tmp_path: Path, capsys) -> None:
    """An SFT config before its pre-training run exists: the error names train.init.weights."""
    missing = tmp_path / "runs" / "mm1_3b"
    argv = ["info", str(CONFIGS / "sft.yaml"), f"train.init.weights={missing}"]
    assert one_line(capsys, argv, 2) == (
        f"config error: train.init.weights={missing}: does not exist (not trained yet?)"
    )
    missing.mkdir(parents=True)  # there, but holding no model (it said "no tokenizer.json")
    assert one_line(capsys, argv, 2) == (
        f"config error: train.init.weights={missing}: not an mm1 run directory, checkpoint "
        "(RUN/checkpoints/step_N) or export, nor an HF checkpoint directory"
    )
    (missing / "config.json").write_text("{}")  # an HF directory without a tokenizer
    assert one_line(capsys, argv, 2) == (
        f"config error: train.init.weights={missing}: has no tokenizer.json (give one with "
        "data.tokenizer)"
    )
    argv = ["info", TINY, f"train.init.decoder={missing}"]
    assert one_line(capsys, argv, 2).startswith(f"config error: train.init.decoder={missing}: ")
    argv = ["info", TINY, f"data.tokenizer={missing}"]
    assert (
        one_line(capsys, argv, 2)
        == f"config error: data.tokenizer={missing}: has no tokenizer.json"
    )
    assert cli.main(["info", TINY]) in (0, None)


def _is_grid(path: Path) -> bool:
    """A study grid (`mm1 ablate`), not a run config: studies/ holds both."""
    return "study" in (yaml.safe_load(path.read_text()) or {})


SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize(
    "path", [p for p in SHIPPED if not _is_grid(p)], ids=lambda p: str(p.relative_to(CONFIGS))
)
def test_every_shipped_config_still_loads(path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mm1.config.validation"):
        if path.name.startswith("encoder_"):
            load_encoder_config(path)
        else:
            load_config(path)
    assert not [r for r in caplog.records if "is ignored" in r.getMessage()]


@pytest.mark.parametrize("path", [p for p in SHIPPED if _is_grid(p)], ids=lambda p: p.name)
def test_every_study_grid_still_loads(path: Path) -> None:
    from mm1.ablate.grid import load_grid

    assert load_grid(path).cells
