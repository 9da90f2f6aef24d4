"""QLoRA (`train.lora.quantize: nf4`): the adapted layers hold torchao's NF4 quantization of
their weights, fresh adapters compute the model with those weights dequantized, a run trains
the adapters against codes that never move and that its checkpoints keep exactly (a resume is
bit-exact), and every reader gets the dequantized weights with the adapters merged."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mm1.config import ConfigError, LoRAConfig
from mm1.models.lora import LoRAAdapter, NF4LoRALinear, add_lora, merge_lora
from mm1.models.mllm import MM1
from mm1.models.nf4 import NF4Weight, dequantize_state, scaler_block_size, torchao_nf4
from tests.train.run_configs import logged, tiny_mm1, tiny_mm1_logits

# Every target weight a whole number of QLoRA's scaler blocks (64 x 256 values): 128 x 128
# attention projections, 128 x 256 MLP ones. (The runs below use the tests' tiny decoder,
# 32 wide, whose weights take smaller scaler blocks.)
SHAPE = {"dim": 128, "layers": 2, "heads": 4, "kv_heads": 4, "ffn_dim": 256}
QLORA = ["train.lora.rank=4", "train.lora.alpha=8", "train.lora.quantize=nf4"]


def _model(**decoder: object) -> MM1:
    return tiny_mm1(**{**SHAPE, **decoder})


def test_nf4_layers_compute_the_dequantized_model_and_merge_into_the_adapted_one() -> None:
    base = _model()
    model = copy.deepcopy(base)
    assert add_lora(model.decoder, LoRAConfig(rank=4, alpha=8, quantize="nf4")) == 2 * 7
    layer = model.decoder.layers[0].self_attn.q_proj
    assert isinstance(layer, NF4LoRALinear) and layer.weight is None
    # torchao's quantization of the weight, stored as it made it
    original = base.decoder.layers[0].self_attn.q_proj.weight
    reference = torchao_nf4().to_nf4(original.detach(), 64, 256)
    assert torch.equal(layer.nf4.codes, reference.quantized_data)
    assert torch.equal(layer.nf4.scalers, reference.quantized_scalers)
    dequantized = layer.nf4.tensor().get_original_weight()
    assert torch.equal(dequantized, reference.get_original_weight())
    error = (dequantized - original).norm() / original.norm()
    assert 0.05 < error < 0.12  # 4 bits: about 9% of the weight's norm (0.092 measured)

    # Fresh adapters: exactly the plain model holding the dequantized weights.
    merged = merge_lora(dict(model.state_dict()))
    assert set(merged) == set(base.state_dict())  # the plain model's keys
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged)
    assert torch.equal(tiny_mm1_logits(model), tiny_mm1_logits(plain))
    assert not torch.allclose(
        tiny_mm1_logits(model), tiny_mm1_logits(base), atol=1e-4
    )  # 4 bits, not fp32
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAAdapter):
                m.b.normal_(std=0.5)
    plain.load_state_dict(merge_lora(dict(model.state_dict())))
    torch.testing.assert_close(tiny_mm1_logits(plain), tiny_mm1_logits(model), atol=1e-5, rtol=1e-5)
    stored = sum(b.nbytes for m in model.modules() if isinstance(m, NF4Weight) for b in m.buffers())
    assert stored < 0.14 * sum(
        4 * int(m.shape.prod()) for m in model.modules() if isinstance(m, NF4Weight)
    )


def test_scalers_take_the_largest_whole_blocks_up_to_qloras_256() -> None:
    """The demo's 192-wide decoder: 192 x 192 weights have 576 scalers, in blocks of 192 (256
    would leave a part block, which torchao refuses); 192 x 512 ones 1,536, in blocks of 256."""
    assert [scaler_block_size(n) for n in (192 * 192, 192 * 512, 64 * 192, 32 * 32)] == [
        192,
        256,
        192,
        16,
    ]
    w = torch.randn(192, 192)
    layer = NF4Weight(w)
    reference = torchao_nf4().to_nf4(w, 64, 192)
    assert torch.equal(layer.tensor().get_original_weight(), reference.get_original_weight())
    state = dequantize_state({f"q.nf4.{k}": v for k, v in layer.state_dict().items()})
    assert list(state) == ["q.weight"]
    assert torch.equal(state["q.weight"], reference.get_original_weight())


def test_a_layer_nf4_cannot_block_is_named_and_nothing_changes() -> None:
    model = _model(dim=36, heads=2, kv_heads=2, ffn_dim=64)  # q_proj: 36 x 36 = 1,296 values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"layers\.0\.self_attn\.q_proj's weight \(36, 36\)"):
        add_lora(model.decoder, LoRAConfig(rank=4, quantize="nf4"))
    assert model.state_dict().keys() == before.keys()  # no layer replaced
    assert add_lora(model.decoder, LoRAConfig(rank=4, quantize="nf4", targets=["up_proj"])) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lora.rank=4", "train.lora.quantize=int4"], r"train\.lora\.quantize='int4'"),
        (["train.lora.quantize=nf4"], r"train\.lora\.rank=0 turns LoRA off"),
    ],
)
def test_bad_quantize_settings_name_the_key(overrides: list[str], message: str) -> None:
    from mm1.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_fsdp_sharding_refuses_nf4_before_any_work(tmp_path: Path, world, tiny_config) -> None:
    from mm1.config import load_config
    from mm1.train.parallel import Dist
    from mm1.train.trainer import Trainer

    cfg = load_config(tiny_config(tmp_path, world), [*QLORA, f"train.run_dir={tmp_path / 'r'}"])
    trainer = Trainer(cfg)
    trainer.d = Dist(rank=0, world_size=2)  # as under torchrun: nothing distributed runs first
    with pytest.raises(ConfigError, match=r"train\.lora\.quantize=nf4 runs in one process or"):
        trainer.setup()
    assert not (tmp_path / "r").exists()


def test_a_qlora_run_trains_its_adapters_over_fixed_codes_and_resumes_bit_exactly(
    tmp_path: Path, world, tiny_config, capsys
) -> None:
    """From a trained run: the checkpoints hold the NF4 codes of the starting weights
    (unchanged by training), a run resumed from step 2 ends as the uninterrupted one did, and
    a reader gets the dequantized weights plus the adapters; a resume cannot turn NF4 off."""
    import shutil

    from mm1 import cli
    from mm1.checkpoint import _read_dcp_model, read_model_weights

    cfg = tiny_config(tmp_path, world, steps=4, save_every=2, parallel="none", val_every=0)
    base, run, resumed = tmp_path / "base", tmp_path / "qlora", tmp_path / "resumed"
    assert cli.main(["train", str(cfg), f"train.run_dir={base}", "train.steps=2"]) == 0
    start = [f"train.init.weights={base}", "train.train_vision=false", "train.optim.lr=0.05"]
    capsys.readouterr()
    assert cli.main(["train", str(cfg), f"train.run_dir={run}", *start, *QLORA]) == 0
    out = capsys.readouterr().out
    assert "NF4: the adapted layers' frozen weights take 0.01 MiB (0.07 MiB in float32)" in out

    before = read_model_weights(base).state
    key = "decoder.layers.1.mlp.down_proj"
    codes = torchao_nf4().to_nf4(before[f"{key}.weight"], 64, 32)  # 32 x 64: 32 scalers
    for step in (2, 4):
        saved = _read_dcp_model(run / "checkpoints" / f"step_{step}")
        assert torch.equal(saved[f"{key}.nf4.codes"], codes.quantized_data)
        assert torch.equal(saved[f"{key}.nf4.scalers"], codes.quantized_scalers)
        assert f"{key}.weight" not in saved
    after = read_model_weights(run).state
    assert set(after) == set(before)
    adapter = saved[f"{key}.lora.b"] @ saved[f"{key}.lora.a"] * 2.0
    expected = codes.get_original_weight() + adapter
    torch.testing.assert_close(after[f"{key}.weight"], expected, atol=1e-6, rtol=0)
    for name, value in before.items():  # what is neither adapted nor the connector: unchanged
        if not (".weight" in name and "_proj" in name) and not name.startswith("connector."):
            assert torch.equal(after[name], value), name
    # read for bf16 inference: cast as DCP reads each weight in, except the adapted layers,
    # dequantized and merged in fp32 first; the same as the fp32 read cast
    low = read_model_weights(run, torch.bfloat16).state
    for name, value in after.items():
        assert low[name].dtype == torch.bfloat16, name
        assert torch.equal(low[name], value.to(torch.bfloat16)), name

    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_4")
    assert cli.main(["train", str(cfg), f"train.run_dir={resumed}", *start, *QLORA]) == 0
    assert logged(resumed, "loss") == logged(run, "loss")
    again = read_model_weights(resumed).state
    assert all(torch.equal(after[k], again[k]) for k in after)
    assert cli.main(["generate", str(run), "--prompt", "a red", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    plain_lora = [*start, "train.lora.rank=4", "train.lora.alpha=8", "train.steps=6"]
    assert cli.main(["train", str(cfg), f"train.run_dir={run}", *plain_lora]) == 2
    assert "train.lora.quantize is nf4, the config's none" in capsys.readouterr().out


def test_ddp_leaves_the_nf4_buffers_out_of_its_broadcasts(tmp_path: Path) -> None:
    """Each rank quantized the same weights: broadcast as buffers before every forward, the
    codes would cost half a byte per weight each step. DDP's other buffers it still syncs."""
    import torch.distributed as dist

    from mm1.config import TrainConfig
    from mm1.train.parallel import Dist, parallelize

    model = _model()
    add_lora(model.decoder, LoRAConfig(rank=4, quantize="nf4"))
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        ddp = parallelize(model, TrainConfig(parallel="ddp"), Dist(world_size=2))
        ignored = {n for n in ddp.parameters_to_ignore if ".nf4." in n}
        nf4 = {n for n, _ in model.named_buffers() if ".nf4." in n}
        assert ignored == nf4 and len(nf4) == 2 * 7 * 6
        assert "decoder.layers.0.self_attn.q_proj.lora.scale" not in ddp.parameters_to_ignore
        out = ddp(torch.full((1, 8), 3), labels=torch.full((1, 8), 3))
        out.loss.backward()
    finally:
        dist.destroy_process_group()


def test_biased_layers_keep_autocasts_dtype() -> None:
    """Under bf16 autocast a biased NF4 layer returns bf16, as `nn.Linear` does (torchao adds
    the fp32 bias after its product, which would promote q, k and v to fp32)."""
    base = _model(qkv_bias=True, o_bias=True)
    model = copy.deepcopy(base)
    add_lora(model.decoder, LoRAConfig(rank=4, quantize="nf4"))
    plain = copy.deepcopy(base)
    plain.load_state_dict(merge_lora(dict(model.state_dict())))
    x = torch.randn(2, 5, SHAPE["dim"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.decoder.layers[0].self_attn.q_proj(x)
        want = plain.decoder.layers[0].self_attn.q_proj(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0.02, rtol=0.02)


def test_compile_with_checkpointing_compiles_the_blocks_inside_the_checkpoints() -> None:
    """A checkpointed region compiles whole or not at all, and NF4's products break the graph:
    QLoRA's blocks are compiled, then checkpointed (other runs: checkpointed, then compiled)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from mm1.config import TrainConfig
    from mm1.train.parallel import Dist, parallelize

    for quantize, outer in (("nf4", CheckpointWrapper), ("none", torch._dynamo.OptimizedModule)):
        model = _model()
        lora = LoRAConfig(rank=4, quantize=quantize)
        add_lora(model.decoder, lora)
        train = TrainConfig(compile=True, activation_checkpointing=True, parallel="none", lora=lora)
        parallelize(model, train, Dist())
        block = model.decoder.layers[0]
        assert isinstance(block, outer), quantize
        inner = block._checkpoint_wrapped_module if quantize == "nf4" else block._orig_mod
        assert isinstance(inner, (torch._dynamo.OptimizedModule, CheckpointWrapper))
        assert type(inner) is not type(block)
