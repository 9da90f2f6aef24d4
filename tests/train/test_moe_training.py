"""MoE decoders in training: sparse upcycling (`mm1 upcycle` and `train.init` on the fly) starts
at the dense model's logits with every expert in use; bad upcycling requests are one-line errors
naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm1.config import ConfigError, load_config
from mm1.models.moe import MoE

MOE = ["model.decoder.ffn.type=moe", "model.decoder.ffn.experts=4", "model.decoder.ffn.every=1"]


@pytest.fixture(scope="module")
def dense_run(make_trainer, tmp_path_factory, world, tiny_config) -> Path:
    """A tiny dense run trained for 2 steps (its FFNs are no longer the random init)."""
    tmp = tmp_path_factory.mktemp("dense")
    cfg = tiny_config(tmp, world, steps=2, save_every=2, parallel="none", val_every=0)
    make_trainer(cfg, tmp / "run").fit()
    return tmp / "run"


def _inputs(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of random text, each with one image's slots."""
    g = torch.Generator().manual_seed(seed)
    image, q = model.image_token_id, model.num_image_tokens
    ids = torch.randint(0, model.cfg.decoder.vocab_size - 1, (2, 40), generator=g)
    ids[ids == image] = 0
    ids[0, 3 : 3 + q] = image
    ids[1, 10 : 10 + q] = image
    size = model.cfg.vision.image_size
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, size, size, generator=g)}


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _expert_tokens(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Top-k assignments per expert in each MoE layer on `inputs`."""
    counts: list[torch.Tensor] = []

    def hook(m: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        top = out.float().softmax(-1).topk(2, dim=-1).indices
        counts.append(torch.bincount(top.reshape(-1), minlength=out.shape[-1]))

    moes = [m for m in model.modules() if isinstance(m, MoE)]
    handles = [m.gate.register_forward_hook(hook) for m in moes]
    try:
        _logits(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return counts


def test_upcycled_export_equals_the_dense_model_and_uses_every_expert(tmp_path, dense_run) -> None:
    from mm1.pretrained import load_pretrained
    from mm1.upcycling import upcycle

    dense = load_pretrained(dense_run).model
    out = upcycle(dense_run, tmp_path / "moe", experts=8, every=1)
    moe = load_pretrained(out).model
    assert [type(b.mlp) for b in moe.decoder.layers] == [MoE, MoE]
    inputs = _inputs(dense)
    torch.testing.assert_close(_logits(moe, inputs), _logits(dense, inputs), atol=1e-5, rtol=0)
    for counts in _expert_tokens(moe, inputs):
        assert (counts > 0).all(), counts  # every expert is someone's top 2
    # the experts are copies of the dense FFN, the router is not zero
    w = moe.decoder.layers[1].mlp.experts.gate_up_proj
    dense_ffn = dense.decoder.layers[1].mlp
    assert torch.equal(w[5], torch.cat([dense_ffn.gate_proj.weight, dense_ffn.up_proj.weight]))
    assert moe.decoder.layers[1].mlp.gate.weight.abs().sum() > 0
    # with expert noise the experts differ (symmetry broken) and the logits move a little
    noisy = load_pretrained(upcycle(dense_run, tmp_path / "noisy", 8, 2, noise=0.01)).model
    assert [type(b.mlp).__name__ for b in noisy.decoder.layers] == ["SwiGLU", "MoE"]
    e = noisy.decoder.layers[1].mlp.experts.down_proj
    assert not torch.equal(e[0], e[1])
    assert not torch.equal(_logits(noisy, inputs), _logits(dense, inputs))


def test_train_init_from_a_dense_run_upcycles_on_the_fly(
    make_trainer, tmp_path, world, dense_run, tiny_config
) -> None:
    from mm1.pretrained import load_pretrained

    dense = load_pretrained(dense_run).model
    cfg = tiny_config(tmp_path, world, steps=4, parallel="none", val_every=0)
    trainer = make_trainer(cfg, tmp_path / "run", *MOE, f"train.init.weights={dense_run}")
    trainer.setup()
    inputs = _inputs(dense)
    torch.testing.assert_close(
        _logits(trainer.model, inputs), _logits(dense, inputs), atol=1e-5, rtol=0
    )
    # unnormalised top-k is refused: its output at initialisation is not the dense one
    bad = make_trainer(
        cfg,
        tmp_path / "bad",
        *MOE,
        "model.decoder.ffn.norm_topk_prob=false",
        f"train.init.weights={dense_run}",
    )
    with pytest.raises(ValueError, match=r"model\.decoder\.ffn\.norm_topk_prob=true"):
        bad.setup()


def test_a_moe_config_over_a_llava_directory_upcycles_it(
    make_trainer, tmp_path, world, tiny_config
) -> None:
    """A transformers LLaVA directory gives the architecture, except a MoE FFN configured over
    its dense decoder: upcycled as from a run (it was dropped without a word, training dense)."""
    from mm1.hf_export import save_hf
    from mm1.pretrained import load_pretrained

    cfg = tiny_config(tmp_path, world, steps=1, parallel="none", val_every=0)
    mlp = ["model.connector.type=mlp", "model.connector.num_tokens=16"]
    make_trainer(cfg, tmp_path / "dense", *mlp).fit()
    dense = load_pretrained(tmp_path / "dense")
    save_hf(dense, tmp_path / "hf")
    start = f"train.init.weights={tmp_path / 'hf'}"
    trainer = make_trainer(cfg, tmp_path / "run", *mlp, *MOE, start)
    trainer.setup()
    assert all(isinstance(b.mlp, MoE) for b in trainer.raw_model.decoder.layers)
    inputs = _inputs(dense.model)
    torch.testing.assert_close(
        _logits(trainer.model, inputs), _logits(dense.model, inputs), atol=1e-5, rtol=0
    )


def test_bad_upcycling_requests_name_the_option(tmp_path, dense_run) -> None:
    from mm1.upcycling import upcycle

    with pytest.raises(ConfigError, match=r"^--experts=1 must be >= 2$"):
        upcycle(dense_run, tmp_path / "a", experts=1)
    with pytest.raises(ConfigError, match=r"^--top-k=5 must be in 1\.\.--experts=4$"):
        upcycle(dense_run, tmp_path / "b", experts=4, top_k=5)
    # an extra zero or three: refused before the experts are made (an allocator traceback)
    with pytest.raises(ConfigError, match=r"^--experts=1000000000: the MoE export takes about"):
        upcycle(dense_run, tmp_path / "huge", experts=10**9)
    assert not (tmp_path / "huge").exists()
    for noise in (-1.0, float("nan"), float("inf")):  # nan / inf filled every expert with nan
        with pytest.raises(ConfigError, match=r"must be a finite number >= 0$"):
            upcycle(dense_run, tmp_path / "n", experts=4, noise=noise)
    with pytest.raises(ConfigError, match=r"upcycle_noise=inf must be a finite number >= 0"):
        load_config(None, ["train.init.upcycle_noise=inf"])
    with pytest.raises(ConfigError, match=r"^--every=3 leaves no sparse layer"):
        upcycle(dense_run, tmp_path / "c", experts=4, every=3)
    moe = upcycle(dense_run, tmp_path / "moe", experts=4)
    with pytest.raises(ConfigError, match="is already a MoE model"):
        upcycle(moe, tmp_path / "d", experts=4)


def test_an_ungated_ffn_is_not_upcycled(tmp_path, world) -> None:
    """Persimmon's FFN (up, squared ReLU, down) has no gate: SwiGLU experts cannot start as
    copies of it, which both ways to upcycle say (before, the train.init path failed on
    missing expert keys)."""
    from mm1.config import DecoderConfig, InitConfig, ModelConfig, VisionConfig
    from mm1.data.images import ImageProcessor
    from mm1.data.tokenizer import Tokenizer
    from mm1.models.build import build_model
    from mm1.models.fuyu import Fuyu
    from mm1.models.moe import MoEConfig
    from mm1.pretrained import save_pretrained
    from mm1.upcycling import upcycle

    tok = Tokenizer.from_file(world / "tokenizer.json")
    dec = dict(vocab_size=tok.vocab_size, dim=32, layers=2, heads=4, kv_heads=4, ffn_dim=64)
    cfg = ModelConfig(
        family="fuyu",
        vision=VisionConfig(image_size=32, patch_size=16),
        decoder=DecoderConfig(**dec, ffn={"type": "mlp", "activation": "relu2"}),
        image_token_id=tok.image_id,
    )
    out = save_pretrained(Fuyu(cfg), tok, ImageProcessor.siglip(32), tmp_path / "dense")
    with pytest.raises(ConfigError, match=r"model\.decoder\.ffn\.type=mlp \(ungated"):
        upcycle(out, tmp_path / "moe", experts=4)
    moe = ModelConfig(
        family="fuyu",
        vision=VisionConfig(image_size=32, patch_size=16),
        decoder=DecoderConfig(**dec, ffn=MoEConfig(experts=4)),
        image_token_id=tok.image_id,
    )
    with pytest.raises(ValueError, match=r"ungated FFN \(model\.decoder\.ffn\.type=mlp"):
        build_model(moe, init=InitConfig(weights=str(out)))


def test_moe_training_logs_aux_losses_and_expert_load(
    make_trainer, tmp_path, world, tiny_config
) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mm1.train.logging import read_metrics

    cfg = tiny_config(tmp_path, world, steps=2, parallel="none", val_every=0, tensorboard=True)
    run = tmp_path / "run"
    trainer = make_trainer(cfg, run, *MOE, "model.decoder.ffn.every=2")
    trainer.fit()
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert len(rows) == 2
    per_source = {f"loss_ds_{name}" for name in trainer.dataset_names}
    for r in rows:
        # per-source losses under the sources' names (they were split by the aux losses' names)
        logged = {k for k in r if k.startswith("loss_ds_")}
        assert logged and logged <= per_source, logged
        b, z = r["aux_loss_router_balance"], r["aux_loss_router_z"]
        assert b > 0 and z > 0
        assert r["loss_total"] == pytest.approx(r["loss"] + 0.01 * b + 0.001 * z)
        shares = r["expert_load_l1"]  # every=2 over 2 layers: layer 1 only
        assert "expert_load_l0" not in r and len(shares) == 4
        assert sum(shares) == pytest.approx(1.0)
        assert r["expert_load_min_l1"] == pytest.approx(min(shares), abs=1e-6)
        assert r["expert_load_max_l1"] == pytest.approx(max(shares), abs=1e-6)
        assert min(shares) <= 0.25 <= max(shares)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"expert_load_min_l1", "expert_load_max_l1", "aux_loss_router_balance"} <= set(tags)


def test_two_process_fsdp_moe_run_resumes_bit_exactly(
    tmp_path, world, tiny_config, two_process_run_and_resume
) -> None:
    """2 gloo processes, FSDP2 (experts sharded with their block): a run resumed from its
    step-2 checkpoint logs the very losses, aux losses and expert loads of the uninterrupted
    run."""

    from mm1.checkpoint import read_model_weights
    from mm1.train.logging import read_metrics

    cfg = tiny_config(tmp_path, world, steps=4, save_every=2, parallel="fsdp", val_every=0)
    full, resumed = two_process_run_and_resume(tmp_path, cfg, MOE)

    def logged(run: Path) -> dict[int, dict]:
        keep = ("loss", "aux_loss_router_balance", "aux_loss_router_z", "expert_load_l0")
        return {r["step"]: {k: r[k] for k in keep} for r in read_metrics(run) if "loss" in r}

    want = logged(full)
    assert sorted(want) == [1, 2, 3, 4]
    assert logged(resumed) == want  # bit-exact on CPU
    a, b = read_model_weights(full).state, read_model_weights(resumed).state
    key = "decoder.layers.1.mlp.experts.gate_up_proj"
    assert a[key].shape[0] == 4 and all(torch.equal(a[k], b[k]) for k in a)
