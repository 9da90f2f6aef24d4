"""LoRA fine-tuning (`train.lora`): fresh adapters compute the base model exactly, a merged
state dict computes the adapted one, only the adapters (and the parts `train.train_*` name)
train, every reader of the run sees the merged plain model, FSDP2 builds them on the meta
device and resumes bit-exactly, and a resume cannot change them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mm1.config import ConfigError, LoRAConfig
from mm1.models.lora import LoRAAdapter, LoRALinear, add_lora, merge_lora
from mm1.models.mllm import MM1
from tests.train.run_configs import logged, tiny_mm1, tiny_mm1_logits

LORA = ["train.lora.rank=4", "train.lora.alpha=8"]


def _model(**decoder: object) -> MM1:
    shape = {"dim": 32, "layers": 2, "heads": 4, "kv_heads": 2, "ffn_dim": 64}
    return tiny_mm1(**{**shape, **decoder})


def test_fresh_adapters_compute_the_base_model_and_merge_into_the_adapted_one() -> None:
    base = _model()
    model = copy.deepcopy(base)
    assert add_lora(model.decoder, LoRAConfig(rank=4, alpha=8)) == 2 * 7  # every target, 2 blocks
    layer = model.decoder.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and float(layer.lora.scale) == 2.0
    assert torch.equal(tiny_mm1_logits(model), tiny_mm1_logits(base))  # B starts at zero
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAAdapter):
                m.b.normal_(std=0.5)
    adapted = tiny_mm1_logits(model)
    assert not torch.allclose(adapted, tiny_mm1_logits(base), atol=1e-3)
    merged = merge_lora(dict(model.state_dict()))
    assert set(merged) == set(base.state_dict())  # the plain model's keys
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged)
    torch.testing.assert_close(tiny_mm1_logits(plain), adapted, atol=1e-5, rtol=1e-5)
    only_q = copy.deepcopy(base)
    assert add_lora(only_q.decoder, LoRAConfig(rank=2, targets=["q_proj", "down_proj"])) == 4


def test_activation_checkpointing_recomputes_the_adapters_dropout_as_drawn() -> None:
    """With LoRA's dropout on, a checkpointed block's recomputed forward draws the forward's
    masks again: the gradients equal the unwrapped model's."""
    from mm1.config import TrainConfig
    from mm1.train.parallel import Dist, parallelize

    lora = LoRAConfig(rank=4, alpha=8, dropout=0.5)
    grads = []
    for checkpointing in (False, True):
        model = _model()
        add_lora(model.decoder, lora)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRAAdapter):
                    m.b.normal_(std=0.5)
        cfg = TrainConfig(parallel="none", activation_checkpointing=checkpointing, lora=lora)
        model = parallelize(model, cfg, Dist()).train()
        torch.manual_seed(3)
        _logits_with_grad(model).square().mean().backward()
        grads.append(model.decoder.layers[0].self_attn.q_proj.lora.a.grad)
    assert torch.equal(grads[0], grads[1])


def _logits_with_grad(model: MM1) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.full((4,), 49), torch.randint(0, 49, (12,), generator=g)])[None]
    size = model.cfg.vision.image_size
    return model(ids, pixel_values=torch.randn(1, 3, size, size, generator=g)).logits


def test_a_run_saved_before_lora_existed_cannot_resume_with_it(tmp_path: Path) -> None:
    """An older run's config has no `train.lora`: it trained without adapters, so a resume
    that turns them on is refused (its checkpoint has none), not read as if it had them."""
    from mm1.config import load_config, to_dict
    from mm1.train.config_change import current_shape, refuse_trained_parts_change

    old = to_dict(load_config(None, []))
    del old["train"]["lora"]
    new = to_dict(load_config(None, ["train.lora.rank=16"]))
    with pytest.raises(ConfigError, match=r"train\.lora\.rank"):
        refuse_trained_parts_change(tmp_path, current_shape(old, new), new)
    plain = to_dict(load_config(None, []))
    refuse_trained_parts_change(tmp_path, current_shape(old, plain), plain)  # unchanged: fine


def test_a_moe_decoders_experts_take_no_adapter() -> None:
    moe = _model(ffn={"type": "moe", "experts": 4, "top_k": 2})
    assert add_lora(moe.decoder, LoRAConfig(rank=2)) == 2 * 4  # q, k, v, o of each block


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lora.rank=-1"], r"train\.lora\.rank=-1 must be >= 0 \(0 = no LoRA\)"),
        (["train.lora.rank=4", "train.lora.alpha=0"], r"train\.lora\.alpha=0\.0 must be"),
        (["train.lora.rank=4", "train.lora.dropout=1"], r"train\.lora\.dropout=1\.0 must be"),
        (["train.lora.rank=4", "train.lora.targets=[qproj]"], r"train\.lora\.targets=\['qproj'\]"),
        (["train.lora.rank=4", "train.train_decoder=false"], r"train\.train_decoder=false freezes"),
    ],
)
def test_bad_lora_settings_name_the_key(overrides: list[str], message: str) -> None:
    from mm1.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_an_encoder_run_refuses_lora() -> None:
    from mm1.config.encoder import load_encoder_config

    with pytest.raises(ConfigError, match=r"train\.lora\.rank=2: LoRA adapts an MM1 decoder"):
        load_encoder_config(None, ["train.lora.rank=2"])


def test_a_lora_run_trains_only_its_adapters_and_reads_as_a_plain_model(
    tmp_path: Path, world, tiny_config, capsys
) -> None:
    """From a trained run: the decoder's own weights, its embeddings, norms and head stay as
    they were except for the merged adapters; the connector (trained by default) moves; every
    reader (load_pretrained, an export, a next stage's starting point) gets the plain model.
    A resume that changes the adapters is refused."""
    from mm1 import cli
    from mm1.checkpoint import read_model_weights
    from mm1.pretrained import load_pretrained

    cfg = tiny_config(tmp_path, world, steps=2, save_every=2, parallel="none", val_every=0)
    base, run = tmp_path / "base", tmp_path / "lora"
    assert cli.main(["train", str(cfg), f"train.run_dir={base}"]) == 0
    start = [f"train.init.weights={base}", "train.train_vision=false", "train.optim.lr=0.05"]
    capsys.readouterr()
    assert cli.main(["train", str(cfg), f"train.run_dir={run}", *start, *LORA]) == 0
    assert "LoRA: 14 adapters (rank 4, alpha 8) on q_proj, k_proj" in capsys.readouterr().out
    before, after = read_model_weights(base).state, read_model_weights(run).state
    assert set(after) == set(before)  # merged: no adapter keys
    targets = (".q_proj.", ".k_proj.", ".v_proj.", ".o_proj.", ".gate_proj.", ".up_proj.")
    for key, value in before.items():
        moved = not torch.equal(after[key], value)
        adapted = key.startswith("decoder.layers.") and (
            key.endswith(".weight") and any(t in key for t in (*targets, ".down_proj."))
        )
        assert moved == (adapted or key.startswith("connector.")), key
    p = load_pretrained(run)
    assert not any(isinstance(m, LoRALinear) for m in p.model.modules())
    assert cli.main(["generate", str(run), "--prompt", "a red", "--max-new-tokens", "3"]) == 0
    export = tmp_path / "export"
    assert cli.main(["convert", str(run), "--export", str(export)]) == 0
    exported = read_model_weights(export).state
    assert all(torch.equal(exported[k], v) for k, v in after.items())
    capsys.readouterr()
    more = ["train.steps=4", f"train.run_dir={run}", *start]
    assert cli.main(["train", str(cfg), *more, "train.lora.rank=8", "train.lora.alpha=8"]) == 2
    assert "train.lora.rank" in capsys.readouterr().out


def test_two_process_fsdp_lora_run_starts_from_the_base_and_resumes_bit_exactly(
    tmp_path: Path, world, tiny_config, two_process_run_and_resume, torchrun_cli
) -> None:
    """FSDP2 builds the model on the meta device: the adapters are initialised after
    `to_empty` (A drawn, B zero, the scale alpha / rank), so the first step's loss is the base
    model's; a run resumed from its step-2 checkpoint logs the uninterrupted run's losses and
    ends with its weights."""
    from mm1 import cli
    from mm1.checkpoint import _read_dcp_model, read_model_weights

    cfg = tiny_config(tmp_path, world, steps=4, save_every=2, parallel="none", val_every=0)
    base = tmp_path / "base"
    assert cli.main(["train", str(cfg), f"train.run_dir={base}", "train.steps=2"]) == 0
    start = [f"train.init.weights={base}", "train.parallel=fsdp", "train.train_vision=false"]
    full, resumed = two_process_run_and_resume(tmp_path, cfg, [*start, *LORA])
    plain = tmp_path / "plain"  # the same first step without adapters: the same loss
    torchrun_cli(["train", str(cfg), f"train.run_dir={plain}", *start, "train.steps=1"], 2)
    assert logged(full, "loss")[1] == pytest.approx(logged(plain, "loss")[1], rel=1e-6)
    state = _read_dcp_model(full / "checkpoints" / "step_4")
    assert float(state["decoder.layers.1.mlp.down_proj.lora.scale"]) == 2.0  # after to_empty
    a_rows = state["decoder.layers.0.self_attn.q_proj.lora.a"]  # each rank's shard of one draw
    assert torch.linalg.matrix_rank(a_rows) == 4 and not torch.equal(a_rows[:2], a_rows[2:])
    assert sorted(logged(full, "loss")) == [1, 2, 3, 4]
    assert logged(resumed, "loss") == logged(full, "loss")  # bit-exact on CPU
    a, b = read_model_weights(full).state, read_model_weights(resumed).state
    assert all(torch.equal(a[k], b[k]) for k in a)
