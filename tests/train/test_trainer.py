"""The trainer end to end: metrics, exact resume after SIGKILL (1 and 2 processes), FSDP2 on gloo,
refusal of a changed config, export."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mm1.data.prompt_format import PromptFormat
from mm1.train.logging import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def run_cli(args: list[str], nproc: int = 1, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "mm1.cli", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "mm1.cli",
            *args,
        ]
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )


def finish(p: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_and_resume_gives_bit_identical_losses(
    tmp_path, world, nproc: int, tiny_config
) -> None:
    cfg = tiny_config(tmp_path, world)
    full, broken = tmp_path / "full", tmp_path / "broken"
    finish(run_cli(["train", str(cfg), f"train.run_dir={full}"], nproc))
    reference = losses(full)
    assert sorted(reference) == list(range(1, 7))

    # Kill the run hard once its step-4 checkpoint is complete, then start it again.
    p = run_cli(["train", str(cfg), f"train.run_dir={broken}"], nproc, start_new_session=True)
    marker = broken / "checkpoints" / "step_4" / "meta.json"
    deadline = time.time() + 240
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), p.communicate()[0][-3000:]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    out = finish(run_cli(["train", str(cfg), f"train.run_dir={broken}"], nproc))
    assert "resumed from" in out and "step_" in out
    assert losses(broken) == reference  # bit-identical on CPU
    val = [r["val_loss"] for r in read_metrics(broken) if "val_loss" in r]
    assert len(val) == 2  # steps 3 and 6, once each
    # every rank's files are in the checksums the resume checked (each rank a share)
    step_4 = marker.parent
    sums = json.loads(marker.read_text())["checksums"]
    assert set(sums) == {p.name for p in step_4.iterdir()} - {"meta.json"}
    assert sum(n.endswith(".distcp") for n in sums) >= nproc


def test_metrics_and_artifacts(tmp_path, world, tiny_config, capsys) -> None:
    from mm1 import cli

    cfg = tiny_config(tmp_path, world, steps=2, save_every=2, parallel="none")
    run = tmp_path / "run"
    boundaries = "data.image_boundaries=true"
    assert cli.main(["train", str(cfg), f"train.run_dir={run}", boundaries]) == 0
    records = [r for r in read_metrics(run) if "loss" in r]
    for key in ("step", "loss", "lr", "tokens_per_s", "images_per_s", "grad_norm", "data_wait"):
        assert key in records[-1], key
    # the rows' non-padding share; a cap of one image per row ends rows early, so fills less
    capped = tmp_path / "capped"
    assert (
        cli.main(["train", str(cfg), f"train.run_dir={capped}", "data.max_images_per_seq=1"]) == 0
    )
    fill = [r["fill"] for r in read_metrics(capped) if "fill" in r][-1]
    assert 0 < fill < records[-1]["fill"] <= 1
    assert any(k.startswith("loss_") for k in records[-1])
    assert (run / "config.yaml").exists() and (run / "model.json").exists()
    assert (run / "checkpoints" / "step_2" / "meta.json").exists()

    # the run loads for inference, and exports to safetensors that load the same model
    from mm1.pretrained import load_pretrained, save_pretrained

    p = load_pretrained(run)
    out = save_pretrained(p.model, p.tokenizer, p.processor, tmp_path / "export", p.prompt_format)
    weights, beside = out / "model.safetensors", out / "model.json"
    assert weights.stat().st_mode & 0o777 == beside.stat().st_mode & 0o777  # not 0600
    q = load_pretrained(out)
    ids = torch.tensor([[p.tokenizer.bos_id or 1, 5, 6, 7]])
    torch.testing.assert_close(p.model(ids).logits, q.model(ids).logits)
    # prompts are written as the model was trained: <img> ... </img> here
    assert p.image_boundaries and q.image_boundaries
    trained = PromptFormat(p.model.num_image_tokens, image_boundaries=True)
    assert p.prompt_format == q.prompt_format == trained  # saved whole with the run and export
    saved = run / "tokenizer" / "prompt_format.json"
    saved.write_text('{"image_boundaries": true}\n')  # the file's first layout
    assert load_pretrained(run).prompt_format == trained
    saved.unlink()  # a run from before the file existed
    assert load_pretrained(run).prompt_format == trained  # read from its config.yaml

    # a changed model refuses to resume, naming the key; --force overrides
    capsys.readouterr()
    changed = [boundaries, "model.decoder.layers=3", "train.steps=3"]
    assert cli.main(["train", str(cfg), f"train.run_dir={run}", *changed]) != 0
    assert "model.decoder.layers" in capsys.readouterr().out


def test_attention_backend_is_not_a_change_of_meaning() -> None:
    from mm1.train.config_change import meaningful

    keys = ["model.decoder.attention", "model.decoder.layers", "train.log_every", "data.seq_len"]
    assert meaningful(keys) == ["model.decoder.layers", "data.seq_len"]


def test_sources_saved_before_they_had_names_are_not_a_changed_config() -> None:
    from mm1.config import load_config, to_dict
    from mm1.train.config_change import config_diff, current_shape

    cfg = load_config(None, ["data.sources=[{format: wds, path: a}]"])
    saved = to_dict(cfg)
    del saved["data"]["sources"][0]["name"]  # as runs wrote it before source names
    assert config_diff(saved, to_dict(cfg)) == ["data.sources"]
    assert config_diff(current_shape(saved), to_dict(cfg)) == []


def test_weight_decay_shrinks_weights_by_lr_times_point_one() -> None:
    from mm1.config import OptimConfig
    from mm1.train.optim import build_optimizer, lr_factor

    model = torch.nn.Linear(4, 4)
    opt, sched = build_optimizer(model, OptimConfig(warmup_steps=2, weight_decay=0.1), 0.5, 10)
    w0 = model.weight.detach().clone()
    for step in range(3):
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(0.5 * lr_factor(step, 2, 10, 0.1))
        model.weight.grad = torch.zeros_like(model.weight)  # no gradient: decay alone acts
        model.bias.grad = torch.zeros_like(model.bias)
        before = model.weight.detach().clone()
        opt.step()
        sched.step()
        torch.testing.assert_close(model.weight, before * (1 - 0.1 * lr))
    assert not torch.equal(model.weight, w0)


def test_schedule_warmup_then_cosine_to_ten_percent() -> None:
    from mm1.train.optim import lr_factor

    assert lr_factor(0, 100, 1000, 0.1) == pytest.approx(0.01)
    assert lr_factor(99, 100, 1000, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 1000, 0.1) == pytest.approx(1.0)
    assert lr_factor(550, 100, 1000, 0.1) == pytest.approx(0.55)
    assert lr_factor(1000, 100, 1000, 0.1) == pytest.approx(0.1)


def test_mm1_peak_lr_matches_the_paper() -> None:
    from mm1.train.optim import mm1_peak_lr

    assert mm1_peak_lr(3e9) == pytest.approx(5.8e-5, rel=0.02)
    assert mm1_peak_lr(7e9) == pytest.approx(4.1e-5, rel=0.02)
    assert mm1_peak_lr(30e9) == pytest.approx(2.2e-5, rel=0.03)


def test_3b_preset_builds_on_meta_without_allocating() -> None:
    from mm1.config import load_config
    from mm1.models.summary import summarize

    cfg = load_config(ROOT / "configs" / "models" / "mm1_3b.yaml")
    s = summarize(cfg.model)
    assert 2.8e9 < s.decoder < 3.3e9
    assert 0.6e9 < s.vision < 0.7e9  # ViT-H/14
    assert s.image_tokens == 144


@pytest.mark.parametrize("to", ["process", "group"])
def test_sigterm_saves_exits_143_and_the_next_run_resumes(
    tmp_path, world, tiny_config, to: str
) -> None:
    """SIGTERM to the trainer alone, or to its whole process group with its data worker (as
    torchrun and schedulers send it): the worker leaves the signal to the trainer, which
    saves and exits 143."""
    cfg = tiny_config(tmp_path, world, steps=10_000, save_every=10_000, parallel="none")
    run = tmp_path / "run"
    p = run_cli(
        ["train", str(cfg), f"train.run_dir={run}", "data.num_workers=1"], start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(losses(run)) < 2:
        time.sleep(0.05)
    assert losses(run), p.communicate()[0][-3000:]
    if to == "group":
        os.killpg(p.pid, signal.SIGTERM)
    else:
        p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM == 143, out[-3000:]
    assert "done:" not in out and "Traceback" not in out
    saved = sorted((run / "checkpoints").glob("step_*/meta.json"))
    assert len(saved) == 1
    step = int(saved[0].parent.name.split("_")[1])
    assert step == max(losses(run))
    line = " ".join(out.split())
    assert f"stopped early by SIGTERM at step {step} of 10000" in line
    assert f"resume with mm1 train {cfg} train.run_dir={run} data.num_workers=1" in line

    more = [f"train.run_dir={run}", "data.num_workers=1", f"train.steps={step + 2}"]
    out = finish(run_cli(["train", str(cfg), *more]))
    assert f"resumed from {run / 'checkpoints' / f'step_{step}'} at step {step}" in out
    assert f"done: step {step + 2}" in out

    # the loader's position is per worker: another worker count is refused, even under --force
    from mm1.config import ConfigError, load_config
    from mm1.train.trainer import Trainer

    other = load_config(cfg, [f"train.run_dir={run}", "data.num_workers=2", "train.steps=99"])
    with pytest.raises(
        ConfigError, match=r"^data\.num_workers=2: .* saved with data\.num_workers=1"
    ):
        Trainer(other, force=True).fit()


def test_nonfinite_losses_are_skipped_then_abort_naming_the_step(
    tmp_path, world, monkeypatch, tiny_config
) -> None:
    from mm1.config import load_config
    from mm1.models import mllm
    from mm1.train.trainer import NonFiniteLossError, Trainer

    cfg = load_config(
        tiny_config(tmp_path, world, parallel="none", val_every=0, max_nonfinite_in_a_row=3),
        [f"train.run_dir={tmp_path / 'run'}"],
    )
    real_forward = mllm.MM1.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 2:  # the first step (2 micro-batches) is healthy
            out.loss = out.loss * float("nan")
            out.token_loss = out.token_loss * float("nan")
        return out

    monkeypatch.setattr(mllm.MM1, "forward", poisoned)
    trainer = Trainer(cfg)
    with pytest.raises(NonFiniteLossError, match="step 4"):
        trainer.fit()
    assert trainer.counters["nonfinite_steps"] == 3
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert math.isfinite(records[0]["loss"])  # step 1
    assert records[-1]["nonfinite_steps"] >= 1
    # Resumed from step 2 (one bad step into the streak), the streak goes on where it was.
    again = Trainer(cfg)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 4"):
        again.fit()


def test_skipped_steps_end_as_one_line(tmp_path, world, monkeypatch, tiny_config, capsys) -> None:
    """`mm1 train`: steps skipped for a non-finite loss are named in the `done:` line; a run
    that stops for them is one error line, exit 1 (it was a traceback)."""
    from mm1.models import mllm
    from tests.cli_helpers import one_line

    cfg = tiny_config(tmp_path, world, parallel="none", val_every=0, max_nonfinite_in_a_row=3)
    real_forward = mllm.MM1.forward

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(mllm.MM1, "forward", poisoned)
    from mm1 import cli

    args = ["train", str(cfg), "train.progress=false"]
    assert cli.main([*args, f"train.run_dir={tmp_path / 'short'}", "train.steps=2"]) == 0
    done = " ".join(capsys.readouterr().out.split())
    assert done.endswith("(2 step(s) skipped: non-finite loss or gradient)"), done
    stopped = one_line(capsys, [*args, f"train.run_dir={tmp_path / 'long'}"], 1)
    start = "error: non-finite gradient norm at step 3 for 3 steps in a row (each skipped;"
    assert stopped.startswith(start), stopped


def test_training_from_hf_starting_points(
    tmp_path, world, make_hf_checkpoints, tiny_config
) -> None:
    """train.init.vision / .decoder take HF checkpoint directories; the tokenizer comes from
    the decoder's directory, gets mm1's special tokens, and the embeddings are resized to it."""
    from mm1.config import load_config
    from mm1.data.tokenizer import Tokenizer
    from mm1.models.build import build_model

    dec_dir, vis_dir, llama, _ = make_hf_checkpoints(tmp_path, world)
    base_vocab = llama.config.vocab_size  # the world's BPE vocabulary before mm1's additions
    cfg = load_config(
        tiny_config(tmp_path, world, steps=2, save_every=2, parallel="none", val_every=0),
        [
            f"train.init.vision={vis_dir}",
            "model.vision.image_size=48",  # position embeddings interpolated 32 -> 48 px
            "model.vision.width=32",
            f"train.init.decoder={dec_dir}",
            f"train.run_dir={tmp_path / 'run'}",
        ],
    )
    tok = Tokenizer.from_file(dec_dir)
    assert tok.vocab_size > base_vocab  # <img> and </img> were added
    model = build_model(cfg.model, tok.vocab_size, tok.image_id, init=cfg.train.init)
    assert model.decoder.embed_tokens.weight.shape[0] == tok.vocab_size
    # pre-trained rows are the checkpoint's; new rows start at their mean
    hf_emb = llama.get_input_embeddings().weight.detach()
    n = hf_emb.shape[0]
    torch.testing.assert_close(model.decoder.embed_tokens.weight[:n], hf_emb)
    torch.testing.assert_close(model.decoder.embed_tokens.weight[n], hf_emb.mean(0))
    assert model.vision.pos_embed.shape[1] == 1 + 36

    from mm1.train.trainer import Trainer

    result = Trainer(cfg).fit()
    assert result["step"] == 2 and math.isfinite(result["loss"])


def test_activation_checkpointing_gives_the_same_losses(tmp_path, world, tiny_config) -> None:
    from mm1.config import load_config
    from mm1.train.trainer import Trainer

    out = {}
    for ac in (False, True):
        cfg = load_config(
            tiny_config(tmp_path, world, steps=3, parallel="none", val_every=0, save_every=100),
            [f"train.run_dir={tmp_path / f'run-{ac}'}", f"train.activation_checkpointing={ac}"],
        )
        Trainer(cfg).fit()
        out[ac] = losses(tmp_path / f"run-{ac}")
    assert out[True].keys() == out[False].keys()
    for step in out[False]:
        assert out[True][step] == pytest.approx(out[False][step], rel=1e-5)


def test_two_process_ddp_training(tmp_path, world, tiny_config) -> None:
    cfg = tiny_config(tmp_path, world, steps=2, save_every=2, parallel="ddp", val_every=0)
    run = tmp_path / "ddp"
    finish(run_cli(["train", str(cfg), f"train.run_dir={run}"], nproc=2))
    got = losses(run)
    assert sorted(got) == [1, 2] and all(math.isfinite(v) for v in got.values())
    assert read_meta_world(run / "checkpoints" / "step_2") == 2


def test_four_process_hsdp_run_resumes_bit_exactly_and_as_plain_fsdp(
    tmp_path, world, tiny_config, torchrun_cli
) -> None:
    """`train.shard_size=2` on 4 processes (2 replicas of 2 shards), two micro-batches per
    step (gradients accumulated without syncing): resumed from its step-2 checkpoint, the run
    logs the uninterrupted one's losses bit for bit; the same checkpoint resumed with every
    process one shard group (plain FSDP2) continues to about the same losses, only the sums'
    order differing."""
    cfg = tiny_config(
        tmp_path, world, steps=4, save_every=2, val_every=0, batch_size=8, micro_batch_size=1
    )
    runs = {name: tmp_path / name for name in ("full", "resumed", "fsdp")}

    def train(name: str, *args: str) -> str:
        return torchrun_cli(["train", str(cfg), f"train.run_dir={runs[name]}", *args], 4)

    out = train("full", "train.shard_size=2")
    assert "HSDP: each weight sharded over 2 processes, replicated 2x" in out
    for name in ("resumed", "fsdp"):
        shutil.copytree(runs["full"], runs[name])
        shutil.rmtree(runs[name] / "checkpoints" / "step_4")
    assert "resumed from" in train("resumed", "train.shard_size=2")
    out = train("fsdp")
    assert "resumed from" in out and "HSDP" not in out
    full = losses(runs["full"])
    assert sorted(full) == [1, 2, 3, 4] and losses(runs["resumed"]) == full
    for step in (3, 4):
        assert losses(runs["fsdp"])[step] == pytest.approx(full[step], rel=1e-5)


def test_two_process_ddp_run_accumulating_gradients_resumes_bit_exactly(
    tmp_path, world, tiny_config, two_process_run_and_resume
) -> None:
    """DDP through `parallelize` (gradients as views of its buckets), two micro-batches per
    step, the first without syncing: a run resumed from its step-2 checkpoint logs the
    uninterrupted run's losses and gradient norms bit for bit."""
    cfg = tiny_config(tmp_path, world, steps=4, save_every=2, val_every=0, parallel="ddp")
    full, resumed = two_process_run_and_resume(tmp_path, cfg, ["train.micro_batch_size=1"])
    assert sorted(losses(full)) == [1, 2, 3, 4] and losses(resumed) == losses(full)
    norms = {r["step"]: r["grad_norm"] for r in read_metrics(full) if "grad_norm" in r}
    assert norms == {r["step"]: r["grad_norm"] for r in read_metrics(resumed) if "grad_norm" in r}


def read_meta_world(path: Path) -> int:
    return json.loads((path / "meta.json").read_text())["world_size"]


def test_alignment_stage_trains_the_connector_alone(tmp_path, world, tiny_config) -> None:
    from mm1.config import load_config
    from mm1.train.trainer import Trainer

    cfg = load_config(
        tiny_config(tmp_path, world, steps=1, parallel="none", val_every=0),
        [
            f"train.run_dir={tmp_path / 'align'}",
            "train.train_vision=false",
            "train.train_decoder=false",
        ],
    )
    trainer = Trainer(cfg)
    trainer.setup()
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step([next(iter(trainer.loader)) for _ in range(trainer.accum)])
    after = trainer.model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"connector"}


def test_a_resumed_run_reads_images_with_its_own_saved_processor(
    tmp_path, world, tiny_config
) -> None:
    """The processor a run saved when it started (`RUN/tokenizer`) is the one it resumes with,
    whatever its starting point or the defaults say now, and it stays as saved."""
    import json

    from mm1.config import load_config
    from mm1.train.trainer import Trainer

    path = tiny_config(tmp_path, world, steps=2, save_every=2, parallel="none", val_every=0)
    run = tmp_path / "own_processor"
    Trainer(load_config(path, [f"train.run_dir={run}"])).fit()
    saved = run / "tokenizer" / "preprocessor_config.json"
    edited = {**json.loads(saved.read_text()), "image_mean": [0.25, 0.25, 0.25]}
    saved.write_text(json.dumps(edited))
    trainer = Trainer(load_config(path, [f"train.run_dir={run}", "train.steps=4"]))
    trainer.setup()
    assert trainer.data.processor.image_mean == (0.25, 0.25, 0.25)
    assert json.loads(saved.read_text())["image_mean"] == [0.25, 0.25, 0.25]


def test_a_batch_without_its_optional_groups_still_trains(tmp_path, world, tiny_config) -> None:
    """`Batch.kind_ids` and `dataset_ids` are optional (a loader of one's own may leave them
    out): the step then counts every token as real and logs no per-group loss."""
    import dataclasses

    from mm1.config import load_config
    from mm1.train.trainer import Trainer

    cfg = load_config(
        tiny_config(tmp_path, world, steps=1, parallel="none", val_every=0),
        [f"train.run_dir={tmp_path / 'bare'}"],
    )
    trainer = Trainer(cfg)
    trainer.setup()
    micro = [
        dataclasses.replace(next(iter(trainer.loader)), kind_ids=None, dataset_ids=None)
        for _ in range(trainer.accum)
    ]
    result = trainer.train_step(micro)
    assert math.isfinite(result.loss) and not result.per_kind and not result.per_dataset
    assert result.tokens == result.slots == sum(b.input_ids.numel() for b in micro)


def test_vision_lr_multiplier_and_no_decay_on_norms(tiny_model_config) -> None:
    from mm1.config import OptimConfig
    from mm1.models.mllm import MM1
    from mm1.train.optim import build_optimizer

    model = MM1(tiny_model_config())
    opt, _ = build_optimizer(model, OptimConfig(vision_lr_mult=0.1, weight_decay=0.1), 1e-3, 10)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        assert g["lr_mult"] == (0.1 if name.startswith("vision.") else 1.0), name
        assert (g["weight_decay"] > 0) == (p.ndim >= 2 and "pos_embed" not in name), name


def test_two_process_fsdp_loads_hf_starting_points_into_the_shards(
    tmp_path, world, make_hf_checkpoints, tiny_config
) -> None:
    """Sharded runs build on the meta device; rank 0 reads the HF weights and broadcasts them."""
    from mm1.pretrained import load_pretrained

    dec_dir, vis_dir, llama, clip = make_hf_checkpoints(tmp_path, world)
    cfg = tiny_config(tmp_path, world, steps=1, save_every=1, parallel="fsdp", val_every=0)
    run = tmp_path / "run"
    args = [
        "train",
        str(cfg),
        f"train.run_dir={run}",
        f"train.init.vision={vis_dir}",
        f"train.init.decoder={dec_dir}",
        "train.train_vision=false",
        "train.train_decoder=false",
    ]
    finish(run_cli(args, nproc=2))
    model = load_pretrained(run).model
    torch.testing.assert_close(model.vision.patch_embed.weight, clip.get_input_embeddings().weight)
    hf_emb = llama.get_input_embeddings().weight.detach()
    emb = model.decoder.embed_tokens.weight
    torch.testing.assert_close(emb[: hf_emb.shape[0]], hf_emb)
    torch.testing.assert_close(
        emb[hf_emb.shape[0] :], hf_emb.mean(0).expand_as(emb[hf_emb.shape[0] :])
    )


def test_per_kind_and_per_dataset_sums_match_masked_sums() -> None:
    from mm1.batch import IGNORE_INDEX, Batch
    from mm1.train.loss_groups import step_sums

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 9, (2, 12), generator=g)
    labels[:, ::3] = IGNORE_INDEX
    kinds = torch.randint(-1, 4, (2, 12), generator=g)  # -1: padding
    datasets = torch.randint(-1, 3, (2, 12), generator=g)
    zeros = torch.zeros_like(labels)
    batch = Batch(labels, labels, zeros, zeros, kind_ids=kinds, dataset_ids=datasets)
    token_loss = torch.rand(2, 12, generator=g)
    got = step_sums(token_loss, batch, 4, 3)
    assert got.shape == (1 + 2 * 4 + 2 * 3,) and got[0] == token_loss.sum()
    for ids, n, at in ((kinds, 4, 1), (datasets, 3, 9)):
        for j in range(n):
            m = (labels != IGNORE_INDEX) & (ids == j)
            torch.testing.assert_close(got[at + j], token_loss[m].sum())
            assert got[at + n + j] == m.sum()


def test_tensorboard_hides_the_steps_a_resume_logs_again(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mm1.train.logging import MetricsLogger

    first = MetricsLogger(tmp_path, 10, progress=False)
    for step in range(1, 7):  # killed after logging step 6; its last checkpoint is step 4
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = MetricsLogger(tmp_path, 10, progress=False, start_step=4)
    for step in range(5, 8):
        resumed.log(step, {"loss": 100.0 + step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("loss")]
    assert got == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0), (7, 107.0)]


def test_a_fresh_start_over_logged_steps_says_so(tmp_path, capsys) -> None:
    """A run directory whose checkpoints were deleted (or never written) starts at step 0 and
    replaces its metrics: said in one line (it was silent over 32 logged steps)."""
    from mm1.train.logging import MetricsLogger

    MetricsLogger(tmp_path, 10, progress=False, tensorboard=False).close()
    assert capsys.readouterr().out == ""  # nothing logged before: nothing to say
    first = MetricsLogger(tmp_path, 40, progress=False, tensorboard=False)
    for step in range(1, 33):
        first.log(step, {"loss": 1.0})
    first.close()
    MetricsLogger(tmp_path, 40, progress=False, tensorboard=False).close()
    out = " ".join(capsys.readouterr().out.split())
    assert out == (
        f"{tmp_path}: no complete checkpoint, so training starts at step 0; the metrics an "
        "earlier attempt logged (to step 32) are replaced"
    )


def test_a_full_disk_while_logging_names_the_file(tmp_path) -> None:
    """metrics.jsonl's write error names no file, and TensorBoard's writer thread printed its
    own traceback: both are one error naming where (the CLI prints it in one line)."""
    import errno
    import threading

    pytest.importorskip("tensorboard")
    from mm1.train.logging import MetricsLogger

    class Full:
        name = str(tmp_path / "metrics.jsonl")

        def write(self, text: str) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            pass

    logger = MetricsLogger(tmp_path, 10, progress=False, tensorboard=False)
    logger._jsonl = Full()
    with pytest.raises(OSError, match="metrics.jsonl") as err:
        logger.log(1, {"loss": 1.0})
    assert err.value.errno == errno.ENOSPC and err.value.filename == Full.name
    logger.close()

    hook = threading.excepthook
    logger = MetricsLogger(tmp_path, 10, progress=False, tensorboard=True)

    def writer() -> None:  # as TensorBoard's event-writer thread fails on a full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join()
    with pytest.raises(OSError) as err:
        logger.log(2, {"loss": 1.0})
    assert err.value.filename == str(tmp_path / "tensorboard")
    # ... and TensorBoard re-raises its writer's error from the next call, naming no file
    logger._thread_error = None

    def full(*args) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    logger._tb.add_scalar = full
    with pytest.raises(OSError) as err:
        logger.log(3, {"loss": 1.0})
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(tmp_path / "tensorboard"))
    real_close, logger._tb.close = logger._tb.close, full
    with pytest.raises(OSError, match="tensorboard"):
        logger.close()
    real_close()
    assert threading.excepthook is hook


def test_a_run_restarted_before_its_first_checkpoint_logs_each_step_once(
    tmp_path, world, monkeypatch, tiny_config
) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mm1.config import load_config
    from mm1.train.trainer import Trainer

    run = tmp_path / "run"
    cfg = load_config(
        tiny_config(tmp_path, world, parallel="none", val_every=0, steps=3, tensorboard=True),
        [f"train.run_dir={run}", "train.save_every=100"],
    )

    def killed(self) -> None:  # the first attempt dies at its first checkpoint (step 3)
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "save", killed)
        with pytest.raises(RuntimeError, match="killed"):
            Trainer(cfg).fit()
    assert sorted(losses(run)) == [1, 2, 3]
    Trainer(cfg).fit()  # no checkpoint: starts from scratch
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(run / "tensorboard"), purge_orphaned_data=False)
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]


def test_two_sources_log_per_dataset_losses_that_average_to_the_step_loss(
    tmp_path, world, monkeypatch, tiny_config
) -> None:
    """Two caption datasets (one kind): each gets `loss_ds_<name>` in metrics.jsonl and
    TensorBoard, and their label-weighted mean is the step's loss."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mm1.batch import IGNORE_INDEX
    from mm1.config import load_config
    from mm1.train.trainer import Trainer

    run = tmp_path / "run"
    sources = (
        f"data.sources=[{{format: wds, path: {world / 'captions'}, name: alt}},"
        f" {{format: wds, path: {world / 'captions_vecap'}, weight: 2}}]"
    )
    cfg = load_config(
        tiny_config(tmp_path, world, parallel="none", val_every=0, steps=3, tensorboard=True),
        [f"train.run_dir={run}", "train.save_every=100", sources],
    )
    counts: list[list[int]] = []  # label tokens per dataset, per step
    real_step = Trainer.train_step

    def counting(self, micro):
        labelled = [(b.labels != IGNORE_INDEX) & (b.dataset_ids >= 0) for b in micro]
        ids = [b.dataset_ids[m] for b, m in zip(micro, labelled, strict=True)]
        counts.append([sum(int((x == i).sum()) for x in ids) for i in range(2)])
        return real_step(self, micro)

    monkeypatch.setattr(Trainer, "train_step", counting)
    trainer = Trainer(cfg)
    trainer.fit()
    assert trainer.dataset_names == ["alt", "captions_vecap"]  # the second from its path
    records = [r for r in read_metrics(run) if "loss" in r]
    assert len(records) == len(counts) == 3
    for r, (n_alt, n_vecap) in zip(records, counts, strict=True):
        assert n_alt > 0 and n_vecap > 0
        assert r["loss_ds_alt"] != r["loss_ds_captions_vecap"]
        mean = (r["loss_ds_alt"] * n_alt + r["loss_ds_captions_vecap"] * n_vecap) / (
            n_alt + n_vecap
        )
        assert mean == pytest.approx(r["loss"], rel=1e-5)
        assert r["loss_captions"] == pytest.approx(r["loss"], rel=1e-5)  # one kind: all of it
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss_ds_alt")] == [1, 2, 3]


def test_a_users_file_named_like_a_checkpoint_is_refused_before_training(
    tmp_path, world, tiny_config, make_trainer
) -> None:
    """A save of step 2 would replace it: the run refuses to start, naming it."""
    from mm1.train.checkpoint import CheckpointError

    cfg = tiny_config(tmp_path, world, steps=2, save_every=2, parallel="none")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_2").write_text("my notes")
    with pytest.raises(CheckpointError, match=r"checkpoints/step_2 is named like a checkpoint"):
        make_trainer(cfg, run).setup()
    assert (run / "checkpoints" / "step_2").read_text() == "my notes"


def test_a_resume_over_changed_data_is_refused_before_it_is_reported(
    tmp_path, world, tiny_config, make_trainer, capsys
) -> None:
    """The loader checks each source's files as the checkpoint's state loads, in the main
    process: the refusal is the only line, with no "resumed from" before it."""
    from mm1.data.sources import DataError

    copy = shutil.copytree(world, tmp_path / "world")
    cfg = tiny_config(tmp_path, copy, steps=2, save_every=2, parallel="none")
    run = tmp_path / "run"
    make_trainer(cfg, run).fit()
    shards = sorted((copy / "text").iterdir())
    shards[-1].unlink()
    capsys.readouterr()
    with pytest.raises(DataError, match=rf"text changed since the checkpoint \({len(shards)} file"):
        make_trainer(cfg, run).setup()
    assert "resumed from" not in capsys.readouterr().out
    from mm1.config import load_config
    from mm1.train.trainer import Trainer

    forced = Trainer(load_config(cfg, [f"train.run_dir={run}", "train.steps=3"]), force=True)
    assert forced.fit()["step"] == 3  # --force: that source starts its next epoch


def test_changed_optimizer_settings_apply_from_the_resumed_step(
    tmp_path, world, tiny_config, make_trainer, capsys
) -> None:
    """Loading a checkpoint restores its optimizer settings: a changed `train.optim.lr` or
    weight decay was written into the run's config.yaml but not used. They now apply from the
    resumed step, said in one line; an unchanged resume says nothing (and stays bit-exact:
    `test_sigkill_and_resume_gives_bit_identical_losses`)."""
    from mm1.train.optim import lr_factor

    cfg = tiny_config(tmp_path, world, steps=4, save_every=2, parallel="none")
    run = tmp_path / "run"
    make_trainer(cfg, run).fit()
    shutil.rmtree(run / "checkpoints" / "step_4")
    capsys.readouterr()
    same = make_trainer(cfg, run)
    same.setup()
    assert "train.optim changed" not in capsys.readouterr().out
    saved_lrs = [g["lr"] for g in same.optimizer.param_groups]

    changed = make_trainer(cfg, run, "train.optim.lr=0.01", "train.optim.weight_decay=0.5")
    changed.setup()
    out = capsys.readouterr().out
    assert (
        "train.optim changed since the checkpoint: lr 0.001 -> 0.01, weight_decay 0.1 -> 0.5" in out
    )
    step = changed.scheduler.last_epoch
    assert step == 2
    for group, before in zip(changed.optimizer.param_groups, saved_lrs, strict=True):
        assert group["lr"] == pytest.approx(0.01 * group["lr_mult"] * lr_factor(2, 2, 4, 0.1))
        assert group["lr"] == pytest.approx(10 * before)
        assert group["weight_decay"] in (0.0, 0.5)
    assert {g["weight_decay"] for g in changed.optimizer.param_groups} == {0.0, 0.5}
    changed.fit()
    lrs = {r["step"]: r["lr"] for r in read_metrics(run) if "lr" in r}
    assert lrs[4] == pytest.approx(0.01 * lr_factor(4, 2, 4, 0.1))


def test_a_second_stop_signal_stops_at_once(tmp_path, world, tiny_config, make_trainer) -> None:
    """The first SIGTERM / SIGINT asks for a save at the step's end; a second one, while that
    step never ends (a data wait, a hung collective), stops at once, the last checkpoint kept."""
    trainer = make_trainer(tiny_config(tmp_path, world, parallel="none"), tmp_path / "run")
    trainer._install_signal_handlers()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert trainer._stop_signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="stopped without saving"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes: here at the latest
    finally:
        trainer._restore_signal_handlers()


def test_a_changed_micro_batch_is_refused_with_what_it_changes_and_forced_trains_alike(
    tmp_path, world, tiny_config, make_trainer, capsys
) -> None:
    """A resume at another `train.micro_batch_size` (a bigger GPU) reads the same rows into
    each step (one loader process), so under --force its losses match the uninterrupted run's
    to float rounding; the refusal says that only the validation rows change with it."""
    from mm1.config import ConfigError, load_config
    from mm1.train.trainer import Trainer

    cfg = tiny_config(tmp_path, world, steps=4, save_every=2, parallel="none", val_every=0)
    straight = tmp_path / "straight"
    make_trainer(cfg, straight).fit()
    run = tmp_path / "run"
    make_trainer(cfg, run, "train.steps=2").fit()
    with pytest.raises(ConfigError, match=r"micro_batch_size only splits .* validation rows"):
        make_trainer(cfg, run, "train.micro_batch_size=4").setup()
    args = [f"train.run_dir={run}", "train.micro_batch_size=4"]
    capsys.readouterr()
    Trainer(load_config(cfg, args), force=True).fit()
    assert "--force: resuming with train.micro_batch_size 2 -> 4" in capsys.readouterr().out

    resumed, expected = losses(run), losses(straight)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_a_profiled_window_writes_a_trace_and_a_table_and_trains_alike(
    tmp_path, world, tiny_config, make_trainer, capsys
) -> None:
    """`train.profile_at=2 train.profile_steps=2`: torch.profiler over steps 2-3 (step 1 its
    unrecorded warm-up), a Chrome trace holding those two steps' operators and a table by self
    time, and losses bit-identical to an unprofiled run's."""
    cfg = tiny_config(tmp_path, world, steps=4, save_every=4, parallel="none", val_every=0)
    plain, profiled = tmp_path / "plain", tmp_path / "profiled"
    make_trainer(cfg, plain).fit()
    capsys.readouterr()
    make_trainer(cfg, profiled, "train.profile_at=2", "train.profile_steps=2").fit()
    out = profiled / "profile" / "steps_2-3"
    assert f"profiled steps 2-3: {out / 'rank0.json'}" in capsys.readouterr().out
    events = json.loads((out / "rank0.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"aten::mm", "aten::scaled_dot_product_attention"} & names
    assert sorted(n for n in names if str(n).startswith("ProfilerStep")) == [
        "ProfilerStep#1",
        "ProfilerStep#2",
    ]
    assert "Self CPU" in (out / "rank0.txt").read_text()
    assert losses(profiled) == losses(plain)


@pytest.mark.parametrize(
    ("settings", "steps", "written"),
    [
        (["train.profile_at=1", "train.profile_steps=1"], 4, "steps_1-1"),  # no warm-up step
        (["train.profile_at=3", "train.profile_steps=5"], 4, "steps_3-4"),  # cut short at 4
        (["train.profile_at=9"], 4, None),  # never reached
    ],
)
def test_profile_windows_at_the_edges(
    tmp_path, world, tiny_config, make_trainer, settings, steps: int, written
) -> None:
    """The first step (no warm-up), a window the run's end cuts short (written as far as it
    got), one the run never reaches; each trace holds the steps it names, and only those."""
    cfg = tiny_config(tmp_path, world, steps=steps, save_every=4, parallel="none", val_every=0)
    run = tmp_path / "run"
    make_trainer(cfg, run, *settings).fit()
    if written is None:
        assert not (run / "profile").exists()
        return
    events = json.loads((run / "profile" / written / "rank0.json").read_text())["traceEvents"]
    profiled = {e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep")}
    expected = (
        {"ProfilerStep#0"} if written == "steps_1-1" else {"ProfilerStep#1", "ProfilerStep#2"}
    )
    assert profiled == expected
    assert {"aten::mm", "aten::addmm"} & {e.get("name") for e in events}


def test_a_profile_resumed_past_at_or_unwritable_leaves_training_alone(
    tmp_path, world, tiny_config, make_trainer, caplog, capsys
) -> None:
    """A resume past the window's start profiles nothing and says so; one right at its start
    profiles it (without the warm-up step, which ran before); a window that cannot be written
    (its folder is a file) is a warning, and the run trains on to the same losses; a window a
    signal stops is not written (a long trace would hold up the exit for minutes)."""
    cfg = tiny_config(tmp_path, world, steps=4, save_every=2, parallel="none", val_every=0)
    run = tmp_path / "run"
    make_trainer(cfg, run, "train.steps=2").fit()
    at_start = tmp_path / "at_start"
    shutil.copytree(run, at_start)
    capsys.readouterr()
    make_trainer(cfg, run, "train.profile_at=2").fit()
    assert not (run / "profile").exists()
    said = "train.profile_at=2: steps 2-3 not profiled: the run resumed at step 2, past its start"
    assert said in capsys.readouterr().out
    make_trainer(cfg, at_start, "train.profile_at=3").fit()
    assert (at_start / "profile" / "steps_3-4" / "rank0.json").is_file()
    blocked = tmp_path / "blocked"
    (blocked / "profile").mkdir(parents=True)
    (blocked / "profile" / "steps_2-3").write_text("not a folder")
    make_trainer(cfg, blocked, "train.profile_at=2").fit()
    assert "profiling steps 2-3 failed, training goes on" in caplog.text
    assert losses(blocked) == losses(run)
    stopped = make_trainer(cfg, tmp_path / "stopped", "train.profile_at=2")
    stopped._stop_requested = lambda: stopped.step >= 2  # a SIGTERM in step 2
    capsys.readouterr()
    assert stopped.fit()["stopped_by"] is not None
    assert not (tmp_path / "stopped" / "profile").exists()
    assert "not profiled: a signal stopped the run inside it" in capsys.readouterr().out


def test_a_run_resumes_on_another_number_of_processes_with_reshard(
    tmp_path, world, tiny_config, capsys
) -> None:
    """2 FSDP processes to step 2, then one: refused, naming --reshard (--force is not it);
    with it the model, optimizer and schedule are resharded and the data restarts in a new
    shuffle, which later resumes keep (a run stopped at step 3 and resumed ends as the one that
    went on to 4). The one-process runs run in this process."""
    from mm1 import cli

    cfg = tiny_config(tmp_path, world, steps=4, save_every=2, val_every=0)
    two = tmp_path / "two"
    finish(run_cli(["train", str(cfg), f"train.run_dir={two}", "train.steps=2"], nproc=2))
    # how the run was started: a config error, exit 2 (it was 1, with the traceback hint)
    assert cli.main(["train", str(cfg), f"train.run_dir={two}"]) == 2
    out = capsys.readouterr().out
    assert "saved by 2 process(es)" in out and "--reshard" in out, out
    assert "MM1_TRACEBACK" not in out
    assert cli.main(["train", "--force", str(cfg), f"train.run_dir={two}"]) == 2
    assert "--reshard to continue on 1" in capsys.readouterr().out
    stopped = tmp_path / "stopped"
    shutil.copytree(two, stopped)
    # a new machine may have another core count: with no loader position restored, the data
    # worker count may change too
    workers = "data.num_workers=1"
    assert cli.main(["train", "--reshard", str(cfg), f"train.run_dir={two}", workers]) == 0
    out = capsys.readouterr().out
    assert "the model, optimizer and schedule were resharded" in out
    assert "data.seed + 1" in out and "done: step 4" in out
    args = ["train", "--reshard", str(cfg), f"train.run_dir={stopped}", "train.steps=3", workers]
    assert cli.main(args) == 0
    assert cli.main(["train", str(cfg), f"train.run_dir={stopped}", workers]) == 0  # same world
    assert losses(stopped) == losses(two)  # steps 1-2 on two processes, 3-4 on one
    assert sorted(losses(two)) == [1, 2, 3, 4]


def test_the_micro_batch_note_is_for_mm1_runs_only() -> None:
    """An encoder run's micro-batch is its contrastive batch: its refusal says no more than
    that the meaning changed."""
    from mm1.config import ConfigError
    from mm1.train.config_change import refuse_changes

    with pytest.raises(ConfigError, match="only splits each step's batch"):
        refuse_changes(Path("run"), ["train.micro_batch_size"], force=False)
    with pytest.raises(ConfigError, match="would change its meaning") as err:
        refuse_changes(Path("run"), ["train.micro_batch_size"], force=False, encoder=True)
    assert "only splits" not in str(err.value)
    refuse_changes(Path("run"), ["train.micro_batch_size"], force=True)  # --force: allowed
