"""`train.init`: a run started from another run (or an export) begins where that one ended, the
deprecated `model.*.init` keys still work and warn, and the run records where it started."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm1.config import ConfigError, load_config


def _logits(model: torch.nn.Module, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch.model_inputs(), return_logits=True).logits


@pytest.fixture(scope="module")
def source_run(make_trainer, tmp_path_factory, world, tiny_config) -> Path:
    """A tiny run trained for 2 steps (its weights are no longer the random init)."""
    tmp = tmp_path_factory.mktemp("source")
    cfg = tiny_config(tmp, world, steps=2, save_every=2, parallel="none", val_every=0)
    make_trainer(cfg, tmp / "run").fit()
    return tmp / "run"


@pytest.mark.parametrize("point_at", ["run", "checkpoint", "export"])
def test_a_run_started_from_a_run_has_its_logits_at_step_0(
    make_trainer,
    tmp_path,
    world,
    source_run,
    point_at,
    tiny_config,
) -> None:
    from mm1.pretrained import load_pretrained, save_pretrained

    src = load_pretrained(source_run)
    path = {
        "run": source_run,
        "checkpoint": source_run / "checkpoints" / "step_2",
        "export": tmp_path / "export",
    }[point_at]
    if point_at == "export":
        save_pretrained(src.model, src.tokenizer, src.processor, path)
    cfg = tiny_config(tmp_path, world, steps=4, parallel="none", val_every=0)
    trainer = make_trainer(cfg, tmp_path / "run", f"train.init.weights={path}", "train.seed=7")
    trainer.setup()
    batch = next(iter(trainer.loader))
    torch.testing.assert_close(_logits(trainer.model, batch), _logits(src.model, batch))
    # ... and the record of where it started
    record = json.loads((tmp_path / "run" / "init.json").read_text())
    (entry,) = record["sources"]
    assert entry["step"] == (None if point_at == "export" else 2)
    assert entry["parts"] == ["vision", "connector", "decoder"]
    expected = path if point_at != "run" else source_run / "checkpoints" / "step_2"
    assert Path(entry["path"]) == expected.resolve()


@pytest.mark.parametrize("start", ["run", "upcycled", "bf16_export"])
def test_a_start_given_every_weight_builds_no_random_model(source_run, tmp_path, start) -> None:
    """A model all of whose weights the starting point gives is built on the meta device and
    takes them: no random initialisation (the RNG is untouched; it took 9x the time and twice
    the memory, benchmarks/load_memory.py), the same weights as a random model with them copied
    in, and each weight in its own memory, in fp32, however the chain made it (an upcycled
    expert is a copy of the dense FFN, which a view would make one tensor to the optimizer)."""
    from mm1.config import InitConfig
    from mm1.models.build import build_model, starting_point_state_dict
    from mm1.pretrained import load_pretrained, save_pretrained

    src = load_pretrained(source_run)
    tok, path = src.tokenizer, source_run
    if start == "bf16_export":  # its weights become fp32 parameters, as copying made them
        path = tmp_path / "export"
        save_pretrained(src.model.to(torch.bfloat16), tok, src.processor, path)
    moe = ["model.decoder.ffn.type=moe", "model.decoder.ffn.experts=4"]
    cfg = load_config(source_run / "config.yaml", moe if start == "upcycled" else []).model
    init = InitConfig(weights=str(path))
    args = (cfg, tok.vocab_size, tok.image_id)
    rng = torch.random.get_rng_state()
    model = build_model(*args, init=init, new_token_ids=tok.added_ids)
    assert torch.equal(torch.random.get_rng_state(), rng)
    before = build_model(*args, init=init, load_weights=False)  # the way before
    before.load_state_dict(starting_point_state_dict(before, init, tok.added_ids), strict=False)
    got, want = model.state_dict(), before.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    params = list(model.parameters())
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in params)
    storages = [p.untyped_storage() for p in params]
    assert all(s.nbytes() == p.numel() * p.element_size() for s, p in zip(storages, params))
    assert len({s.data_ptr() for s in storages}) == len(params)
    # the computed buffers are made (no state holds them)
    assert not any(b.is_meta for b in model.buffers())
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, dict(before.named_buffers())[name], rtol=0, atol=0)


def test_assigned_weights_are_contiguous_fp32_and_each_its_own(tiny_model_config) -> None:
    """However a chain hands the tensors over (a transposed bf16 copy, a view of a fused
    tensor, one tensor under two names), the parameters `build_model` assigns are contiguous,
    in the model's dtype, and share no memory: the optimizer updates each alone."""
    from mm1.models.build import _owned
    from mm1.models.family import family_spec

    cfg = tiny_model_config()
    with torch.device("meta"):
        shell = family_spec(cfg.family).model(cfg)
    state = {k: torch.randn(v.shape) for k, v in shell.state_dict().items()}
    wq, wk = "decoder.layers.0.self_attn.q_proj.weight", "decoder.layers.0.self_attn.k_proj.weight"
    state[wq] = state[wq].t().contiguous().to(torch.bfloat16).t()  # transposed strides
    fused = torch.cat([state[wk], state[wk]])
    state[wk] = fused[: state[wk].shape[0]]  # a view of a larger tensor
    down = "decoder.layers.1.mlp.down_proj.weight"
    state["decoder.layers.0.mlp.down_proj.weight"] = state[down]  # one tensor, two names
    got = _owned(state, shell)
    assert got.keys() == state.keys()
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in got.values())
    assert torch.equal(got[wq], state[wq].float()) and torch.equal(got[wk], state[wk])
    pointers = [t.untyped_storage().data_ptr() for t in got.values()]
    assert len(set(pointers)) == len(pointers)


def test_one_part_from_a_run_the_others_random(
    make_trainer, tmp_path, world, source_run, tiny_config
) -> None:
    """`train.init.connector` alone: the connector equals the source's, the rest is not."""
    from mm1.pretrained import load_pretrained

    src = load_pretrained(source_run).model.state_dict()
    cfg = tiny_config(tmp_path, world, steps=4, parallel="none", val_every=0)
    trainer = make_trainer(cfg, tmp_path / "run", f"train.init.connector={source_run}")
    trainer.setup()
    got = trainer.model.state_dict()
    for k, v in got.items():
        same = torch.equal(v, src[k])
        assert same == k.startswith("connector."), k


def test_architecture_mismatch_names_the_first_differing_parameter(
    make_trainer,
    tmp_path,
    world,
    source_run,
    tiny_config,
) -> None:
    cfg = tiny_config(tmp_path, world, steps=4, parallel="none", val_every=0)
    trainer = make_trainer(
        cfg, tmp_path / "run", f"train.init.weights={source_run}", "model.decoder.ffn_dim=96"
    )
    with pytest.raises(ConfigError) as err:  # the config's mistake: exit 2, not 1
        trainer.setup()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("train.init.weights: ")
    assert "decoder.layers.0.mlp.gate_proj.weight is (64, 32) there but (96, 32)" in msg


def test_a_mismatch_in_a_part_several_keys_name_points_at_each_key(
    make_trainer, tmp_path, world, source_run, tiny_config
) -> None:
    """The connector changes type while `weights` still names the run the encoder and decoder
    come from: the one source is named by both keys, and the error names both."""
    cfg = tiny_config(tmp_path, world, steps=4, parallel="none", val_every=0)
    overrides = [f"train.init.{k}={source_run}" for k in ("weights", "vision", "decoder")]
    mlp = ["model.connector.type=mlp", "model.connector.num_tokens=0"]
    trainer = make_trainer(cfg, tmp_path / "run", *overrides, *mlp)
    with pytest.raises(ConfigError) as err:
        trainer.setup()
    msg = str(err.value)
    assert msg.startswith("train.init.vision / train.init.weights / train.init.decoder: ")
    assert "has no connector.proj.0.weight" in msg


def test_a_larger_image_size_interpolates_the_position_embeddings(
    make_trainer,
    tmp_path,
    world,
    source_run,
    tiny_config,
) -> None:
    """Starting at 48 px from a 32 px run: the encoder's (CLS + 4x4 -> 6x6) and the avgpool
    connector's grids are interpolated, everything else is copied."""
    from mm1.models.vision import interpolate_pos_embed
    from mm1.pretrained import load_pretrained

    src = load_pretrained(source_run).model.state_dict()
    cfg = tiny_config(tmp_path, world, steps=4, parallel="none", val_every=0)
    trainer = make_trainer(
        cfg, tmp_path / "run", f"train.init.weights={source_run}", "model.vision.image_size=48"
    )
    trainer.setup()
    got = trainer.model.state_dict()
    want = interpolate_pos_embed(src["vision.pos_embed"], 6, True)
    assert got["vision.pos_embed"].shape == (1, 37, 32)
    torch.testing.assert_close(got["vision.pos_embed"], want)
    assert all(torch.equal(got[k], src[k]) for k in src if k != "vision.pos_embed")


def test_deprecated_model_init_keys_still_work_and_warn(
    make_trainer, tmp_path, world, caplog, make_hf_checkpoints, tiny_config
) -> None:
    from mm1.config import validation

    dec_dir, vis_dir, llama, clip = make_hf_checkpoints(tmp_path, world)
    validation._DEPRECATION_WARNED.clear()  # warned once per process
    cfg_path = tiny_config(tmp_path, world, steps=1, parallel="none", val_every=0)
    with caplog.at_level(logging.WARNING, logger="mm1.config"):
        cfg = load_config(
            cfg_path, [f"model.vision.init={vis_dir}", f"model.decoder.init={dec_dir}"]
        )
        load_config(cfg_path, [f"model.vision.init={vis_dir}"])  # warned once per key
    # mm1's own: importing transformers first in this process logs torch's deprecations too
    ours = [r for r in caplog.records if r.name.startswith("mm1.")]
    warnings = [r.getMessage() for r in ours if "deprecated" in r.getMessage()]
    assert len(warnings) == 2 and "train.init.vision" in warnings[0]
    assert cfg.train.init.vision == str(vis_dir) and cfg.train.init.decoder == str(dec_dir)
    assert cfg.model.vision.init is None and cfg.model.decoder.init is None

    trainer = make_trainer(
        cfg_path, tmp_path / "run", f"model.vision.init={vis_dir}", f"model.decoder.init={dec_dir}"
    )
    trainer.setup()
    emb = trainer.model.decoder.embed_tokens.weight
    hf_emb = llama.get_input_embeddings().weight.detach()
    torch.testing.assert_close(emb[: hf_emb.shape[0]], hf_emb)
    torch.testing.assert_close(
        trainer.model.vision.patch_embed.weight, clip.get_input_embeddings().weight
    )
    saved = json.loads((tmp_path / "run" / "model.json").read_text())
    assert saved["vision"]["init"] is None  # the architecture names no weights any more
    kinds = [s["kind"] for s in json.loads((tmp_path / "run" / "init.json").read_text())["sources"]]
    assert kinds == ["hf", "hf"]

    with pytest.raises(ConfigError, match="model.decoder.init=.* and train.init.decoder=.*"):
        load_config(cfg_path, [f"model.decoder.init={dec_dir}", f"train.init.decoder={vis_dir}"])


def test_a_resumed_run_started_from_deprecated_keys_is_not_a_changed_config(
    make_trainer,
    tmp_path,
    world,
    make_hf_checkpoints,
    tiny_config,
) -> None:
    """A run whose config.yaml still names model.decoder.init resumes with the same keys."""
    import yaml

    dec_dir, _, _, _ = make_hf_checkpoints(tmp_path, world)
    cfg_path = tiny_config(tmp_path, world, steps=1, save_every=1, parallel="none", val_every=0)
    run = tmp_path / "run"
    make_trainer(cfg_path, run, f"model.decoder.init={dec_dir}").fit()
    # As written before train.init existed: the key in the model section, no train.init.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["decoder"]["init"] = str(dec_dir)
    del saved["train"]["init"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    result = make_trainer(cfg_path, run, f"model.decoder.init={dec_dir}", "train.steps=2").fit()
    assert result["steps_run"] == 1


def test_an_hf_directory_cannot_start_every_part(
    make_trainer, tmp_path, world, make_hf_checkpoints, tiny_config
) -> None:
    dec_dir, _, _, _ = make_hf_checkpoints(tmp_path, world)
    cfg = tiny_config(tmp_path, world, steps=1, parallel="none", val_every=0)
    with pytest.raises(ConfigError, match="train.init.weights=.* is an HF checkpoint"):
        make_trainer(cfg, tmp_path / "run", f"train.init.weights={dec_dir}").setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="train.init.connector=.* not an mm1 run"):
        make_trainer(cfg, tmp_path / "r2", f"train.init.connector={tmp_path / 'empty'}").setup()


@pytest.mark.parametrize("module", ["mm1.pretrained", "mm1.eval.fewshot", "mm1.checkpoint"])
def test_loading_for_inference_does_not_import_training(module: str) -> None:
    code = f"import {module}, sys; assert not any(m.startswith('mm1.train') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, world: Path, make_hf_checkpoints) -> dict[str, Path]:
    """A tiny Llama directory and broken copies of it (weights, config.json, model type)."""
    import shutil

    tmp = tmp_path_factory.mktemp("hf")
    dec_dir, _, _, _ = make_hf_checkpoints(tmp, world)
    out = {}
    for name in ("truncated", "random", "bad_json", "onevision"):
        out[name] = shutil.copytree(dec_dir, tmp / name)
    with open(out["truncated"] / "model.safetensors", "r+b") as f:
        f.truncate(100_000)  # a download cut short
    (out["random"] / "model.safetensors").write_bytes(random.Random(0).randbytes(300_000))
    (out["bad_json"] / "config.json").write_text("{'model_type': 'llama'}")
    config = json.loads((dec_dir / "config.json").read_text())
    (out["onevision"] / "config.json").write_text(
        json.dumps(config | {"model_type": "llava_onevision"})
    )
    return out


@pytest.mark.parametrize(
    "broken, key, says",
    [
        ("truncated", "decoder", "{d}/model.safetensors is not a readable safetensors file ("),
        ("random", "decoder", "{d}/model.safetensors is not a readable safetensors file ("),
        ("bad_json", "weights", "{d}/config.json is not valid JSON (Expecting property name"),
        ("bad_json", "decoder", "{d}/config.json is not valid JSON (Expecting property name"),
        ("onevision", "weights", "is a llava_onevision model, which mm1 does not read (it reads"),
    ],
)
def test_a_broken_hf_starting_point_is_one_line_naming_the_option_and_file(
    capsys, tmp_path, world, hf_dirs, tiny_config, broken: str, key: str, says: str
) -> None:
    from tests.cli_helpers import one_line

    d = hf_dirs[broken]
    cfg = tiny_config(tmp_path, world, steps=1, parallel="none", val_every=0)
    argv = ["train", str(cfg), f"train.run_dir={tmp_path / 'run'}", f"train.init.{key}={d}"]
    line = one_line(capsys, argv, 2)
    assert line.startswith(f"config error: train.init.{key}={d}"), line
    assert says.format(d=d) in line, line
    assert "name it as train.init.vision" not in line  # not the advice for one part
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_starting_point_says_it_does_not_exist(
    make_trainer, tmp_path, world, tiny_config
) -> None:
    cfg = tiny_config(tmp_path, world, steps=1, parallel="none", val_every=0)
    nowhere = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=rf"^train.init.vision={nowhere} does not exist$"):
        make_trainer(cfg, tmp_path / "run", f"train.init.vision={nowhere}").setup()


def test_an_encoder_run_as_train_init_weights_says_to_use_it_as_vision(
    capsys, tmp_path, world, tiny_config
) -> None:
    from mm1 import cli
    from tests.cli_helpers import one_line
    from tests.train.run_configs import encoder_config

    enc = tmp_path / "enc"
    enc_cfg = encoder_config(
        tmp_path, world, run_dir=str(enc), steps=1, batch_size=4, val_every=0, save_every=1
    )
    assert cli.main(["train-encoder", str(enc_cfg)]) == 0
    capsys.readouterr()
    (tmp_path / "mm1").mkdir()
    cfg = tiny_config(tmp_path / "mm1", world, steps=1, parallel="none", val_every=0)
    for start in (enc, enc / "checkpoints" / "step_1"):
        argv = [
            "train",
            str(cfg),
            f"train.run_dir={tmp_path / 'run'}",
            f"train.init.weights={start}",
        ]
        assert one_line(capsys, argv, 2) == (
            f"config error: train.init.weights={start} is an image-encoder run "
            "(mm1 train-encoder): use it as train.init.vision"
        )


def test_a_qwen3_decoder_trains_from_the_cli_and_goes_out_as_llava(
    tmp_path, world, tiny_config, make_hf_decoder
) -> None:
    """A Qwen3 checkpoint (q/k norm, tied head) as `train.init.decoder`: the run keeps its
    architecture, trains, and `mm1 convert --to-hf` writes a LLaVA whose Qwen3 text model
    gives mm1's logits."""
    transformers = pytest.importorskip("transformers")

    from mm1 import cli
    from mm1.pretrained import load_pretrained

    dec = tmp_path / "qwen3"
    qwen3 = make_hf_decoder(dec, world, "Qwen3", head_dim=16, tie_word_embeddings=True)
    vocab = qwen3.config.vocab_size
    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    cfg = tiny_config(tmp_path, world, steps=2, save_every=2, parallel="none", val_every=0)
    args = ["train", str(cfg), f"train.run_dir={run}", f"train.init.decoder={dec}"]
    args += ["model.connector.type=mlp", "model.connector.num_tokens=0"]
    args += ["data.image_boundaries=false"]
    assert cli.main(args) == 0
    p = load_pretrained(run)
    d = p.model.decoder.cfg
    assert (d.qk_norm, d.tie_embeddings, d.resolved_head_dim) == (True, True, 16)
    assert cli.main(["convert", str(run), "--to-hf", str(hf_dir)]) == 0
    llava = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    assert llava.config.text_config.model_type == "qwen3"
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(p.model(ids).logits, llava(input_ids=ids).logits)
