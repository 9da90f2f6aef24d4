"""The `mm1` command end to end on a tiny trained run: info, data, convert, generate, eval."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mm1 import cli
from mm1.data.sources import decode_image
from mm1.eval.tasks import TaskSpec
from mm1.models import generation
from mm1.pretrained import Pretrained
from tests.cli_helpers import one_line, torchrun

ROOT = Path(__file__).resolve().parents[1]


def _run(args: tuple[str, ...], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mm1.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def mm1(*args: str, timeout: float = 300) -> str:
    """`mm1 ARGS` in a new interpreter, as a user starts it; its standard output."""
    p = _run(args, timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout


def mm1_here(capsys, *args: str) -> str:
    """`mm1 ARGS` in this process (no interpreter start-up, a few seconds each); its standard
    output."""
    code = cli.main(list(args))
    captured = capsys.readouterr()
    assert code == 0, (captured.out + captured.err)[-3000:]
    return captured.out


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_train_args) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    world = tmp / "world"
    assert cli.main(["data", "synth", "--out", str(world), "--size", "tiny"]) == 0
    run_dir = tmp / "run"
    assert cli.main(tiny_train_args(run_dir)) == 0
    return run_dir


def test_info_reports_components() -> None:
    out = mm1("info", str(ROOT / "configs" / "models" / "mm1_3b.yaml"))
    for word in ("vision encoder", "connector", "decoder", "144 image tokens", "peak learning"):
        assert word in out
    # the model states of a full run: fp32 weights, gradients as large, AdamW's two moments
    line = next(x for x in out.splitlines() if x.startswith("model states in training:"))
    weights = float(line.split("weights ")[1].split(" GiB")[0])
    assert f"gradients {weights:.2f} GiB" in line and "activations not counted" in line


def test_info_gives_what_each_training_process_holds(capsys) -> None:
    """`--processes N`: FSDP2 shards the model states (the first process, holding ceil(rows / N)
    rows of each weight, a little over 1/N); DDP gives each process all of them."""
    preset = str(ROOT / "configs" / "models" / "mm1_3b.yaml")

    def states(*args: str) -> float:
        out = mm1_here(capsys, "info", preset, *args)
        line = next(x for x in out.splitlines() if x.startswith("model states in training:"))
        return float(line.split(": ")[1].split(" GiB")[0])

    one, fsdp, ddp = (
        states(),
        states("--processes", "8"),
        states("--processes", "8", "train.parallel=ddp"),
    )
    assert ddp == one and one / 8 <= fsdp < 1.01 * one / 8
    # HSDP: sharded over 8, replicated twice: each of 16 holds what each of 8 FSDP2 ones does
    assert states("--processes", "16", "train.shard_size=8") == fsdp
    for argv, message in (
        (["--processes", "0"], "--processes 0 must be at least 1"),
        (["--processes", "2", "train.parallel=none"], "train.parallel=none with 2 processes"),
        (["--processes", "6", "train.shard_size=4"], "does not divide the 6 processes"),
        (["--processes", "2", "train.lora.rank=4", "train.lora.quantize=nf4"], "nf4 runs in one"),
    ):
        assert message in one_line(capsys, ["info", preset, *argv], 2)


def test_info_counts_each_layouts_crops_and_tokens(capsys) -> None:
    preset = str(ROOT / "configs" / "models" / "mm1_3b.yaml")  # 378 px crops, 144 tokens each
    lines = {}
    for layout in ("single", "mm1", "anyres"):
        assert cli.main(["info", preset, f"model.image_layout.type={layout}"]) in (0, None)
        out = capsys.readouterr().out
        lines[layout] = next(x for x in out.splitlines() if x.startswith("image layout"))
    assert lines["single"].endswith(": 1 crop(s) of 378px -> 144 image tokens per image")
    assert lines["mm1"].endswith(": 5 crop(s) of 378px -> 720 image tokens per image")
    # LLaVA-NeXT's canvases: the base image and 2 or 4 tiles, with a newline after each row
    assert lines["anyres"].endswith(": 3-5 crop(s) of 378px -> 300-744 image tokens per image")


def test_data_stats_shows_a_source_over_the_error_rate_then_fails(run, tmp_path, capsys) -> None:
    """The statistics are what one reads to see why a source is bad: they are printed whole,
    then the error training would stop with (exit 2); --json carries it as a key."""
    lines = [
        "{not json" if i % 10 == 3 else json.dumps({"text": f"a red cube and a blue ball {i}"})
        for i in range(300)
    ]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"extends: {ROOT / 'configs' / 'demo.yaml'}\n"
        f"data: {{world: {run.parent / 'world'}, sources: [{{format: text, path: {tmp_path / 't.jsonl'}}}]}}\n"
    )
    argv = ["data", "stats", str(cfg), "--sequences", "20"]
    assert cli.main(argv) == 2
    out = capsys.readouterr().out
    assert "packing efficiency" in out
    assert re.search(r"records skipped \d+ \(malformed_json=\d+\)", " ".join(out.split()))
    error = out.strip().splitlines()[-1]
    assert error.startswith(f"error: data source '{tmp_path / 't.jsonl'}': ")
    assert "malformed_json=" in error and "data.max_error_rate=0.01" in error
    assert cli.main([*argv, "--json"]) == 2
    stats = json.loads(capsys.readouterr().out)
    assert len(stats["error_rate_exceeded"]) == 1 and stats["read"]["skipped"]["malformed_json"]
    assert cli.main([*argv, "data.max_error_rate=0.5"]) in (0, None)


def test_info_of_a_fuyu_model_counts_its_patches_and_newlines(capsys) -> None:
    preset = str(ROOT / "configs" / "models" / "tiny.yaml")  # 64 px
    args = ["info", preset, "model.family=fuyu", "model.vision.patch_size=16"]
    assert cli.main(args) in (0, None)
    out = capsys.readouterr().out
    assert "no encoder: the square 64 x 64px / patch 16 = 4 x 4 patches, each patch's" in out
    assert "-> 20 image tokens" in out  # 4 rows of 4 patches and a newline
    canvas = ["model.image_layout.type=fuyu", "model.image_layout.canvas=[32,64]"]
    assert cli.main([*args, *canvas]) in (0, None)
    out = capsys.readouterr().out
    assert "no encoder: Fuyu's canvas 32 x 64px / patch 16 = 2 x 4 patches" in out
    assert "-> 10 image tokens" in out and "1 crop(s) of 32 x 64px -> 4-10 image" in out
    assert "vision encoder" not in out and "connector" not in out  # it has neither
    assert "training FLOPs per crop (patches' Linear)" in out
    # p x p x 3 -> dim with a bias, the one image weight, and the newline: 768 x 192 + 2 x 192
    assert "147,840" in next(x for x in out.splitlines() if "patches' Linear, newline" in x)


def test_data_inspect_and_stats(run, capsys) -> None:
    world = run.parent / "world"
    out = mm1_here(capsys, "data", "inspect", str(world / "captions"), "--format", "wds", "-n", "2")
    assert '"format": "wds"' in out
    whole = json.loads(mm1_here(capsys, "data", "inspect", str(world), "-n", "1"))
    sample = whole["sources"]["text"]["samples"][0]
    assert sample["text_tokens"] > 0 and whole["sources"]["captions"]["records"] > 0
    stats = json.loads(
        mm1_here(
            capsys,
            "data",
            "stats",
            str(ROOT / "configs" / "demo.yaml"),
            f"data.world={world}",
            "--json",
            "--sequences",
            "20",
        )
    )
    assert stats["packing_efficiency"] > 0.9 and set(stats["mixture"]) == {
        "captions",
        "interleaved",
        "text",
    }


def _greedy_output(p: Pretrained, image: Path) -> str:
    """What `mm1 generate MODEL --image IMAGE --prompt '<image>Output:' --max-new-tokens 4`
    prints, through the Python API."""
    from mm1.data.sources.base import image_from_path
    from mm1.data.tokenizer import tokenize_prompt

    pil = image_from_path(image)
    ids = tokenize_prompt("<image>Output:", [pil], p.tokenizer, p.prompt_format)
    pixels = p.prompt_format.pixel_values(p.processor, [pil])
    tok = p.tokenizer
    new_ids = generation.generate(
        p.model, [ids], pixels, max_new_tokens=4, eos_token_id=[tok.eos_id], pad_token_id=tok.pad_id
    )[0]
    return tok.decode(new_ids) + "\n"


def test_convert_generate_and_eval(run, tmp_path, capsys) -> None:
    export = tmp_path / "export"
    mm1_here(capsys, "convert", str(run), "--export", str(export), "--to-hf", str(tmp_path / "hf"))
    assert (export / "model.safetensors").exists() and (export / "model.json").exists()
    assert (tmp_path / "hf" / "decoder" / "config.json").exists()
    assert (tmp_path / "hf" / "vision" / "config.json").exists()

    image = next((run.parent / "world" / "eval" / "val" / "images").iterdir())
    out = mm1_here(
        capsys,
        "generate",
        str(export),
        "--image",
        str(image),
        "--prompt",
        "<image>Output:",
        "--max-new-tokens",
        "4",
    )
    # the exported model's greedy continuation, as the Python API gives it
    from mm1.pretrained import load_pretrained

    assert out == _greedy_output(load_pretrained(export), image) and out.strip()

    out_dir = tmp_path / "eval"
    # the run's own world is found from its saved config: no --world needed
    mm1_here(
        capsys,
        "eval",
        str(run),
        "--shots",
        "0,2",
        "--seeds",
        "1",
        "--max-examples",
        "4",
        "--out",
        str(out_dir),
    )
    results = json.loads((out_dir / "results.json").read_text())
    assert set(results["tasks"]) == {"synth_coco", "synth_vqa"}
    assert (out_dir / "results.md").exists() and (out_dir / "scores_vs_shots.png").exists()


def test_generate_and_eval_run_in_the_dtype_asked(run, tmp_path, capsys) -> None:
    """`--dtype bf16`: the run's checkpoint read straight into bf16; `mm1 generate` prints that
    model's greedy continuation, and `mm1 eval`'s results say where and in what precision its
    figures were computed."""
    from mm1.pretrained import load_pretrained

    image = next((run.parent / "world" / "eval" / "val" / "images").iterdir())
    prompt = ["--prompt", "<image>Output:", "--max-new-tokens", "4"]
    assert cli.main(["generate", str(run), "--image", str(image), *prompt, "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    p = load_pretrained(run, dtype="bfloat16")
    assert {v.dtype for v in p.model.parameters()} == {torch.bfloat16}
    assert out == _greedy_output(p, image)

    shots = ["--shots", "0", "--seeds", "1", "--max-examples", "2", "--out", str(tmp_path / "e")]
    assert cli.main(["eval", str(run), *shots, "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["settings"]["runtime"] == {"device": "cpu", "dtype": "bfloat16", "processes": 1}

    flags = ["--image", str(image), *prompt]
    line = one_line(capsys, ["generate", str(run), *flags, "--dtype", "float64"], 2)
    assert "--dtype float64: not a dtype a model runs in; give float32, bfloat16" in line
    line = one_line(
        capsys, ["eval", str(run), "--device", "cuda:99", "--out", str(tmp_path / "x")], 2
    )
    assert line.startswith("config error: --device cuda:99: not usable here")
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_eval_under_torchrun_shares_the_batches_and_scores_what_one_process_does(
    run, tmp_path
) -> None:
    """`torchrun --nproc_per_node 2 -m mm1.cli eval`: each rank generates every other batch (3
    batches: 2 and 1), the outputs are gathered in order, and the first rank writes the one
    report: the predictions and scores one process (this one) makes, both on one thread a
    process."""
    args = ["eval", str(run), "--shots", "0,2", "--seeds", "1", "--max-examples", "6"]
    args += ["--batch-size", "2"]
    two = torchrun([*args, "--out", str(tmp_path / "two")], nproc=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one_r, two_r = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two_r["predictions"] == one_r["predictions"] and two_r["tasks"] == one_r["tasks"]
    preds = [
        r["raw"]
        for runs in one_r["predictions"].values()
        for rs in runs.values()
        for recs in rs.values()
        for r in recs
    ]
    assert len(preds) == 2 * 3 * 6 and len(set(preds)) > 1  # a mix-up of order would show
    assert two_r["settings"]["runtime"]["processes"] == 2
    assert two.count("# Few-shot evaluation") == 1  # the first rank reports


def test_commands_that_run_in_one_process_refuse_torchrun(run, capsys, monkeypatch) -> None:
    """Under torchrun (`WORLD_SIZE` > 1) a command that would run whole on every rank, each
    writing the same files, is refused at once; the first rank says so."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    line = one_line(capsys, ["eval", str(run), "--suite", "sft"], 2)
    assert line.startswith("config error: mm1 eval --suite runs in one process")
    for argv in (
        ["generate", str(run), "--prompt", "hi"],
        ["recaption", str(run), "--in", "x.tar", "--out", "y"],
        ["eval-generation", str(run)],
        ["serve", str(run)],
    ):
        line = one_line(capsys, argv, 2)
        assert line.startswith(f"config error: mm1 {argv[0]} runs in one process"), line
        assert "torchrun runs train, train-encoder, eval;" in line


def test_convert_writes_the_dtype_asked(run, tmp_path) -> None:
    """`mm1 convert --dtype bf16`: the export and the transformers directories hold bf16
    weights (half the bytes), which read back as the run reads in bf16; transformers loads the
    decoder in bf16, as its config.json says."""
    import transformers
    from safetensors import safe_open

    from mm1.pretrained import load_pretrained

    e32, e16, hf = tmp_path / "e32", tmp_path / "e16", tmp_path / "hf"
    assert cli.main(["convert", str(run), "--export", str(e32)]) == 0
    argv = ["convert", str(run), "--export", str(e16), "--to-hf", str(hf), "--dtype", "bf16"]
    assert cli.main(argv) == 0
    with safe_open(e16 / "model.safetensors", "pt") as f:
        names = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    size = {d: (d / "model.safetensors").stat().st_size for d in (e32, e16)}
    assert size[e16] < 0.55 * size[e32]
    low = load_pretrained(run, dtype="bf16").model.state_dict()
    back = load_pretrained(e16, dtype="bf16").model.state_dict()
    assert all(torch.equal(back[k], v) for k, v in low.items())
    assert json.loads((hf / "decoder" / "config.json").read_text())["dtype"] == "bfloat16"
    decoder = transformers.AutoModelForCausalLM.from_pretrained(hf / "decoder", dtype="auto")
    assert decoder.dtype == torch.bfloat16


def test_an_exports_results_go_outside_it(run, tmp_path, monkeypatch, capsys) -> None:
    """An export is a model to hand on (and may be read-only): `mm1 eval EXPORT` without
    --out writes to runs/eval-cli/NAME in the current directory, not into the export."""
    export = tmp_path / "export"
    assert cli.main(["convert", str(run), "--export", str(export)]) == 0
    before = sorted(p.name for p in export.iterdir())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = ["eval", str(export), "--shots", "0", "--seeds", "1", "--max-examples", "2"]
    argv += ["--world", str(run.parent / "world")]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in export.iterdir()) == before
    (out,) = (work / "runs" / "eval-cli").iterdir()  # export-HASH: exports named alike differ
    assert out.name.startswith("export-") and (out / "results.json").is_file()
    capsys.readouterr()
    monkeypatch.chdir(export)  # from inside the export, the default would be inside it
    assert one_line(capsys, argv, 2).startswith(f"config error: {export} is an export and")
    assert sorted(p.name for p in export.iterdir()) == before


def test_a_checkpoint_of_a_run_is_a_model_too(run, tmp_path) -> None:
    """`RUN/checkpoints/step_N` loads with its run's tokenizer and prompt format (the same model
    as the run when it is the newest); `mm1 eval` on it reads the run's eval settings and
    writes into the run, since the checkpoint is deleted once newer ones replace it."""
    import shutil

    from mm1.checkpoint import latest_checkpoint
    from mm1.pretrained import load_pretrained

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = latest_checkpoint(copy)
    assert ckpt is not None
    whole, one = load_pretrained(copy), load_pretrained(ckpt)
    assert one.prompt_format == whole.prompt_format
    one_state = one.model.state_dict()
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, one_state[key]), key
    world = run.parent / "world"
    argv = ["eval", str(ckpt), "--shots", "0", "--seeds", "1", "--max-examples", "2"]
    assert cli.main([*argv, "--world", str(world)]) == 0
    results = json.loads((copy / "eval-cli" / ckpt.name / "results.json").read_text())
    assert results["settings"]["from"] == str(copy / "config.yaml")
    assert results["name"] == f"run/{ckpt.name}"
    assert not (ckpt / "eval-cli").exists()


def mm1_fails(*args: str, timeout: float = 300) -> str:
    """Run `mm1` expecting a clean failure: non-zero exit and no traceback; stdout + stderr."""
    p = _run(args, timeout)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return out


@pytest.fixture
def pretrained(run, monkeypatch) -> Pretrained:
    """The tiny run loaded in-process; the CLI's `load_pretrained` returns this very object, so a
    test can steer or observe the model that `mm1 generate` drives."""
    from mm1 import pretrained as pretrained_module

    p = pretrained_module.load_pretrained(run)
    monkeypatch.setattr(pretrained_module, "load_pretrained", lambda *a, **k: p)
    return p


def test_generate_stops_at_a_special_token_stop(run, pretrained, capsys) -> None:
    # `--stop "<|endofchunk|>"` (the README's tour): decoding skips special tokens, so the stop
    # must end generation by token id. The model is made to say "<before> <|endofchunk|>
    # <after>..." whatever it is given, by making the scripted token's logit dominant.
    tok = pretrained.tokenizer
    before, after = tok.encode(" red"), tok.encode(" blue")
    assert before and after and tok.decode(after).strip() == "blue"
    script = [*before, tok.endofchunk_id, *after * 10]
    steps: list[int] = []

    def force(module: torch.nn.Module, inputs: tuple, logits: torch.Tensor) -> torch.Tensor:
        token = script[min(len(steps), len(script) - 1)]  # one lm_head call per new token
        steps.append(token)
        logits = logits.clone()
        logits[:, -1] = -1e4
        logits[:, -1, token] = 1e4
        return logits

    handle = pretrained.model.decoder.lm_head.register_forward_hook(force)
    try:
        rc = cli.main(
            [
                "generate",
                str(run),
                "--prompt",
                "Output:",
                "--max-new-tokens",
                "12",
                "--stop",
                "<|endofchunk|>",
            ]
        )
    finally:
        handle.remove()
    assert rc == 0
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(before)
    assert steps[-1] == tok.endofchunk_id  # generation ended there instead of running on


def test_generate_decodes_transparency_as_training_does(
    run, pretrained, tmp_path, monkeypatch
) -> None:
    # A transparent PNG whose hidden colour is red: training and eval composite it onto white
    # (`decode_image`); a plain convert("RGB") would show the red.
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :20, 3] = 255  # left half opaque red, right half fully transparent
    path = tmp_path / "transparent.png"
    Image.fromarray(rgba, "RGBA").save(path)
    seen: list[torch.Tensor] = []
    real = generation.generate

    def spy(model, prompts: list, pixel_values: torch.Tensor | None = None, **kw: object) -> list:
        seen.append(pixel_values)
        return real(model, prompts, pixel_values, **kw)

    monkeypatch.setattr(generation, "generate", spy)
    args = ["generate", str(run), "--image", str(path), "--prompt", "<image>Output:"]
    assert cli.main([*args, "--max-new-tokens", "1"]) == 0
    expected = pretrained.processor([decode_image(path.read_bytes())])
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
    with Image.open(path) as im:
        alpha_dropped = pretrained.processor([im.convert("RGB")])
    assert not torch.equal(expected, alpha_dropped)  # the check can tell the two apart


def test_generate_writes_prompts_as_the_model_was_trained(
    run, pretrained, tmp_path, monkeypatch
) -> None:
    # A model trained with image boundaries and the vicuna_v1 template (data.chat_template sets
    # the tokenizer's, which the run's tokenizer directory saves): `--chat` prompts through both.
    from mm1.data.chat_template import BUILTIN_TEMPLATES

    fmt = replace(pretrained.prompt_format, image_boundaries=True)
    monkeypatch.setattr(pretrained, "prompt_format", fmt)
    monkeypatch.setattr(pretrained.tokenizer, "chat_template", BUILTIN_TEMPLATES["vicuna_v1"])
    tok = pretrained.tokenizer
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 40), "red").save(path)
    seen: list[list[int]] = []
    real = generation.generate

    def spy(model, prompts: list, pixel_values: torch.Tensor | None = None, **kw: object) -> list:
        seen.append(prompts[0])
        return real(model, prompts, pixel_values, **kw)

    monkeypatch.setattr(generation, "generate", spy)
    args = ["generate", str(run), "--image", str(path), "--max-new-tokens", "1"]
    assert cli.main([*args, "--prompt", "<image>What colour?", "--chat"]) == 0
    assert cli.main([*args, "--prompt", "<image>Output:"]) == 0
    chat, plain = seen
    q = pretrained.model.num_image_tokens
    for ids in seen:
        start = ids.index(tok.boi_id)
        assert ids[start : start + q + 2] == [tok.boi_id, *[tok.image_id] * q, tok.eoi_id]
    text = tok.decode(chat)
    assert (
        text.startswith("A chat between")
        and "USER:" in text
        and text.rstrip().endswith("ASSISTANT:")
    )
    assert "USER:" not in tok.decode(plain)  # without --chat the prompt is the text itself


def _vqa_task(world: Path, name: str, support: bool) -> dict:
    def split(s: str) -> dict:
        d = world / "eval" / s
        return {
            "questions": str(d / "vqa_questions.json"),
            "annotations": str(d / "vqa_annotations.json"),
            "image_dir": str(d / "images"),
        }

    task = {"name": name, "kind": "vqa", "query": split("val")}
    return {**task, "support": split("support")} if support else task


@pytest.mark.parametrize("command", [["eval"], ["eval", "--suite", "sft"], ["eval-generation"]])
def test_evaluating_a_path_that_holds_no_model_says_so(tmp_path, capsys, monkeypatch, command):
    """A mistyped model path is said as such, before the synthetic world is looked for (its
    absence beside the wrong path was the error a user got)."""
    monkeypatch.chdir(tmp_path)
    out = one_line(capsys, [command[0], "runs/mistyped", *command[1:]], 2)
    assert out == "error: runs/mistyped does not exist"
    out = one_line(capsys, [command[0], str(tmp_path), *command[1:]], 2)
    assert out.startswith(f"error: {tmp_path} is neither an exported model")


def test_eval_task_without_support_is_a_clean_error(run, tmp_path, capsys) -> None:
    task_file = tmp_path / "tasks.yaml"
    task_file.write_text(yaml.safe_dump([_vqa_task(run.parent / "world", "myvqa", False)]))
    out = mm1_fails("eval", str(run), "--task-file", str(task_file), "--out", str(tmp_path / "e"))
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out  # one line, however narrow the console
    assert "config error" in out and "'myvqa'" in out and "no support split" in out
    assert "--shots 0" in out and "support:" in out and str(task_file) in out
    # the remedy it names works: zero-shot needs no demonstrations
    mm1_here(
        capsys,
        "eval",
        str(run),
        "--task-file",
        str(task_file),
        "--shots",
        "0",
        "--seeds",
        "1",
        "--max-examples",
        "2",
        "--out",
        str(tmp_path / "e"),
    )
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert set(results["tasks"]) == {"myvqa"}


def test_eval_input_mistakes_are_config_errors(run, tmp_path, capsys) -> None:
    """Mistakes in what `mm1 eval` is given are one-line config errors naming the file, the
    task's key or the option, before the model loads (not internal errors after it)."""
    world = run.parent / "world"
    base = ["eval", str(run), "--seeds", "1", "--max-examples", "2", "--out", str(tmp_path / "e")]
    twice = tmp_path / "twice.yaml"
    twice.write_text(yaml.safe_dump([_vqa_task(world, "c", True)] * 2))
    out = one_line(capsys, [*base, "--task-file", str(twice)], 2)
    assert out.startswith(f"config error: {twice}: task names must be distinct"), out
    wrong = tmp_path / "wrong.yaml"
    task = {
        "name": "c",
        "kind": "caption",
        "query": {
            "captions": str(world / "eval" / "val" / "vqa_questions.json"),
            "image_dir": str(world / "eval" / "val" / "images"),
        },
    }
    wrong.write_text(yaml.safe_dump([task]))
    out = one_line(capsys, [*base, "--task-file", str(wrong), "--shots", "0"], 2)
    assert out.startswith("config error: task 'c': query.captions: "), out
    assert "not a COCO captions file" in out
    out = one_line(capsys, [*base, "--world", str(world), "--shots", "0,1000"], 2)
    assert out.startswith("config error: --shots 0,1000: 1000-shot needs 1000 demonstrations"), out
    assert "task 'synth_coco' has only 32" in out


def test_generate_names_a_folder_and_a_missing_preprocessor_config(run, tmp_path, capsys) -> None:
    """A folder given as an image is said to be one; a model without its
    preprocessor_config.json is told how to get one from the command line."""
    import shutil

    out = one_line(
        capsys, ["generate", str(run), "--image", str(tmp_path), "--prompt", "<image>x"], 2
    )
    assert out == f"error: --image: {tmp_path} is a directory, not an image file"
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "tokenizer" / "preprocessor_config.json").unlink()
    out = one_line(capsys, ["generate", str(copy), "--prompt", "hi"], 2)
    assert "no preprocessor_config.json at" in out and "mm1 convert RUN --export DIR" in out
    assert "ImageProcessor" not in out  # Python advice is no help at the command line


def test_readme_task_file_example_supports_the_default_shots() -> None:
    # `mm1 eval --task-file` runs 0,4,8 shots by default: every task of the README's example
    # needs a support split (and valid keys).
    readme = (ROOT / "README.md").read_text()
    block = readme.split("A task file lists", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    specs = [TaskSpec.from_dict(d, root=ROOT) for d in yaml.safe_load(block)]
    assert {s.kind for s in specs} == {"caption", "vqa"}
    assert all(s.support is not None for s in specs)


def test_info_counts_the_model_training_builds(run, capsys) -> None:
    """`mm1 info` resolves the vocabulary from the tokenizer training would use (here the
    world's), so its parameter count is the trained model's."""
    from mm1.pretrained import load_pretrained

    world = run.parent / "world"
    assert cli.main(["info", str(ROOT / "configs" / "demo.yaml"), f"data.world={world}"]) == 0
    out = capsys.readouterr().out
    trained = load_pretrained(run).model
    assert f"{sum(p.numel() for p in trained.parameters()):,}" in out
    assert f"vocabulary: {trained.cfg.decoder.vocab_size:,} (the tokenizer of the world" in out


def test_training_a_finished_run_says_so(run, capsys, tiny_train_args) -> None:
    assert cli.main(tiny_train_args(run)) == 0
    # the console wraps long lines (the run's path is in this one)
    assert "already at step 3 (train.steps)" in " ".join(capsys.readouterr().out.split())


def test_user_mistakes_are_one_line_errors(run, tmp_path, capsys, monkeypatch) -> None:
    def fails(*args: str, code: int = 2) -> str:
        assert cli.main(list(args)) == code
        out = capsys.readouterr().out
        assert "Traceback" not in out
        return " ".join(out.split())

    assert "1 <image> tag(s) but 0 --image" in fails("generate", str(run), "--prompt", "<image>x")
    assert "unknown nope; known:" in fails("eval", str(run), "--tasks", "nope")
    assert "give shot counts" in fails("eval", str(run), "--shots", "0,x")
    task = {**_vqa_task(run.parent / "world", "t", True), "kind": "captions"}
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump([task]))
    assert "tasks.yaml: task 1:" in fails(
        "eval", str(run), "--task-file", str(tmp_path / "tasks.yaml")
    )
    task = _vqa_task(run.parent / "world", "t", True)
    task["qeury"] = task.pop("query")
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump([task]))
    assert "typo.yaml: task 1: unknown key(s) ['qeury']; missing key(s) ['query']; the keys" in (
        fails("eval", str(run), "--task-file", str(tmp_path / "typo.yaml"))
    )
    out = fails("eval", str(run), "--task-file", str(tmp_path / "nope.yaml"))
    assert out == f"error: task file {tmp_path / 'nope.yaml'} does not exist"
    (tmp_path / "bad.yaml").write_text("train:\n  steps: [1\n")
    assert "not valid YAML" in fails("info", str(tmp_path / "bad.yaml"))
    (tmp_path / "map.yaml").write_text("data:\n  sources: {format: wds, path: x}\n")
    assert "data.sources is a list" in fails("info", str(tmp_path / "map.yaml"))
    assert "--world DIR" in fails("eval", str(run), "--world", str(tmp_path / "nowhere"))

    # Anything else still ends in one line, with the traceback on request.
    def broken(args) -> None:
        raise ValueError("boom")

    monkeypatch.setattr("mm1.cli.run.cmd_info", broken)
    assert "error: boom" in fails("info", "x.yaml", code=1)
    monkeypatch.setenv("MM1_TRACEBACK", "1")
    with pytest.raises(ValueError, match="boom"):
        cli.main(["info", "x.yaml"])


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_tampered_run_directory_is_refused_without_running_code(run, tmp_path, capsys) -> None:
    import pickle
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    index = copy / "checkpoints" / "step_3" / ".metadata"
    marker = tmp_path / "pwned"
    index.write_bytes(pickle.dumps(_Payload(marker)))
    args = ["convert", str(copy), "--export", str(tmp_path / "out")]
    assert cli.main(args) == 1  # the checksums see the change first, and read nothing of it
    out = capsys.readouterr().out
    assert "step_3 is damaged: .metadata" in out and not marker.exists()
    # an attacker rewrites meta.json too: the safe reader refuses the index without running it
    meta = json.loads((index.parent / "meta.json").read_text())
    del meta["checksums"]
    (index.parent / "meta.json").write_text(json.dumps(meta))
    for args in (
        ["convert", str(copy), "--export", str(tmp_path / "out")],
        ["generate", str(copy), "--prompt", "a"],
    ):
        assert cli.main(args) == 1
        out = capsys.readouterr().out
        assert "Traceback" not in out and not marker.exists()
        assert out.splitlines()[0].startswith(f"error: {index}: refused to load")


def test_a_full_disk_while_exporting_is_one_line_and_leaves_nothing(
    run, tmp_path, capsys, monkeypatch
) -> None:
    """safetensors reports a full disk as an error of its own, without a path: it was a
    traceback, and the half-written directory was left to be loaded later."""
    import safetensors.torch

    def full(*args, **kwargs):  # what safetensors raises on ENOSPC
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    import sys

    import transformers.modeling_utils  # noqa: F401  (binds save_file under names of its own)

    # every module's name for it (`from safetensors.torch import save_file as ...`)
    original = safetensors.torch.save_file
    for module in list(sys.modules.values()):
        for name, value in list(getattr(module, "__dict__", {}).items()):
            if value is original:
                monkeypatch.setattr(module, name, full)
    for argv, out in (
        (["convert", str(run), "--export"], tmp_path / "export"),
        (["convert", str(run), "--to-hf"], tmp_path / "hf"),
        (["upcycle", str(run), "--experts", "2", "--out"], tmp_path / "moe"),
    ):
        assert one_line(capsys, [*argv, str(out)], 1) == f"error: {out}: No space left on device"
        assert not out.exists()


def test_what_transformers_cannot_express_is_a_config_error(run, tmp_path, capsys, monkeypatch):
    """A model --to-hf cannot write (anyres with avgpool, Persimmon with grouped-query
    attention) was said with "(MM1_TRACEBACK=1 shows the traceback)", as for a bug."""
    import mm1.hf_export

    def refuse(*args, **kwargs):
        raise ValueError("persimmon needs model.decoder.kv_heads=6 (= heads)")

    monkeypatch.setattr(mm1.hf_export, "save_hf", refuse)
    out = one_line(capsys, ["convert", str(run), "--to-hf", str(tmp_path / "hf")], 2)
    assert out == "config error: --to-hf: persimmon needs model.decoder.kv_heads=6 (= heads)"
    assert not (tmp_path / "hf").exists()


def test_convert_and_upcycle_refuse_output_dirs_holding_something_else(
    run, tmp_path, capsys
) -> None:
    """An export written into a run directory would be loaded instead of its checkpoints from
    then on; other non-empty directories are not overwritten either. Refused before loading;
    writing over an earlier output of the same kind goes on as before."""
    import shutil

    from mm1.checkpoint import is_export
    from mm1.config import ConfigError
    from mm1.pretrained import load_pretrained, save_pretrained

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    in_run = "a training run directory (checkpoints/ inside); writing a model there would shadow"
    for argv in (
        ["convert", str(copy), "--export", str(copy)],
        ["convert", str(copy), "--to-hf", str(copy)],
        ["upcycle", str(copy), "--experts", "2", "--out", str(copy)],
    ):
        out = one_line(capsys, argv, 2)
        assert out.startswith(f"config error: {argv[-2]} {copy}: {in_run}"), out
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before
    assert not is_export(copy)
    p = load_pretrained(copy)
    with pytest.raises(ConfigError, match=r"out_dir .*: a training run directory"):
        save_pretrained(p.model, p.tokenizer, p.processor, copy, p.prompt_format)
    assert not is_export(copy)

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine\n")
    for option, what in (("--export", "an mm1 export"), ("--to-hf", "a transformers directory")):
        out = one_line(capsys, ["convert", str(copy), option, str(other)], 2)
        assert out == (
            f"config error: {option} {other}: the directory holds other files and is not "
            f"{what}{' (config.json)' if option == '--to-hf' else ''}; give a new or empty "
            "directory (or remove it first)"
        )
    out = one_line(capsys, ["upcycle", str(copy), "--experts", "2", "--out", str(other)], 2)
    assert out.startswith(f"config error: --out {other}: the directory holds other files")
    assert [p.name for p in other.iterdir()] == ["todo.txt"]

    # Again over the earlier output: a normal workflow, still allowed.
    export, hf = tmp_path / "export", tmp_path / "hf"
    for _ in range(2):
        assert cli.main(["convert", str(copy), "--export", str(export), "--to-hf", str(hf)]) == 0
    assert cli.main(["upcycle", str(copy), "--experts", "2", "--out", str(export)]) == 0
    capsys.readouterr()
    out = one_line(capsys, ["convert", str(export), "--export", str(export)], 2)
    assert out == (
        f"config error: --export {export}: that is the source model itself; give another directory"
    )


def test_eval_checks_its_output_directory_before_loading_the_model(
    run, tmp_path, capsys, monkeypatch
) -> None:
    """Scoring takes minutes: an output directory that cannot be written is reported first."""
    import shutil

    from mm1 import pretrained

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(pretrained, "load_pretrained", no_loading)
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(cli.EVAL_OUT))
    (copy / cli.EVAL_OUT).write_text("in the way\n")  # root too cannot make a directory here
    out = one_line(capsys, ["eval", str(copy)], 2)
    assert out == (
        f"config error: the results directory {copy / cli.EVAL_OUT}: cannot write there (a "
        "file, not a directory): pass --out DIR to write elsewhere"
    )
    under_file = copy / cli.EVAL_OUT / "sub"
    for extra in ([], ["--suite", "sft"]):
        out = one_line(capsys, ["eval", str(copy), *extra, "--out", str(under_file)], 2)
        assert out == (
            f"config error: --out {under_file}: cannot write there (Not a directory): give a "
            "directory you can write to"
        )
    if os.geteuid() != 0:  # root ignores permissions
        (copy / cli.EVAL_OUT).unlink()
        copy.chmod(0o555)
        try:
            out = one_line(capsys, ["eval", str(copy)], 2)
        finally:
            copy.chmod(0o755)
        assert "cannot write there (Permission denied): pass --out DIR" in out


def test_the_users_file_system_errors_areone_line(tmp_path, capsys, monkeypatch) -> None:
    import errno

    blocker = tmp_path / "file"
    blocker.write_text("")
    out = one_line(capsys, ["data", "synth", "--out", str(blocker / "world")], 1)
    assert out == f"error: {blocker / 'world'}: Not a directory"

    for code in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENAMETOOLONG):

        def fail(args, code=code) -> None:
            raise OSError(code, os.strerror(code), "/some/path")

        monkeypatch.setattr("mm1.cli.run.cmd_info", fail)
        out = one_line(capsys, ["info", "x.yaml"], 1)
        assert out == f"error: /some/path: {os.strerror(code)}"


def test_a_second_stop_signal_says_nothing_was_saved_and_exits_as_that_signal(
    capsys, monkeypatch
) -> None:
    """The trainer's first SIGTERM asks for a save at the step's end; a second one while the
    step still runs stops at once: the message says nothing was saved (it was swallowed into
    "interrupted") and the status is SIGTERM's 143 (it was Ctrl-C's 130)."""
    from types import SimpleNamespace

    from mm1.train.errors import StoppedAgain
    from mm1.train.trainer import Trainer

    trainer = SimpleNamespace(_stop_signal=None)
    Trainer._install_signal_handlers(trainer)  # type: ignore[arg-type]
    try:
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)
        assert trainer._stop_signal == signal.SIGTERM
        with pytest.raises(StoppedAgain) as stopped:
            handler(signal.SIGTERM, None)
    finally:
        Trainer._restore_signal_handlers(trainer)  # type: ignore[arg-type]

    def again(args) -> None:
        raise stopped.value

    monkeypatch.setattr("mm1.cli.run.cmd_info", again)
    assert cli.main(["info", "x.yaml"]) == 128 + signal.SIGTERM
    said = "signal 15 again: stopped without saving (the last checkpoint is kept)"
    assert capsys.readouterr().err == f"mm1: {said}\n"


def test_a_config_error_under_torchrun_is_said_by_the_first_rank_only(capsys, monkeypatch):
    """Every rank reads the same config: its error was printed once per rank."""
    argv = ["info", str(ROOT / "configs" / "models" / "tiny.yaml"), "model.decoder.layerz=2"]
    monkeypatch.setenv("RANK", "1")
    assert cli.main(argv) == 2
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert one_line(capsys, argv, 2).startswith("config error: model.decoder.layerz")


def test_ctrl_c_before_a_command_handles_it_is_exit_130_without_traceback(
    capsys, monkeypatch
) -> None:
    def interrupted(args) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("mm1.cli.run.cmd_info", interrupted)
    try:
        code = cli.main(["info", "x.yaml"])
    except KeyboardInterrupt:  # not let through: pytest would take it for the user's Ctrl-C
        pytest.fail("the KeyboardInterrupt went through `main`")
    out = capsys.readouterr()
    assert (code, out.out, out.err) == (130, "", "mm1: interrupted\n")
    # Interrupted while importing torch: torch.distributed half-made, and importing more of
    # torch fails (here: mm1.train.parallel, which imports it). No group to close: 130 still.
    import types

    monkeypatch.setitem(sys.modules, "torch.distributed", types.ModuleType("torch.distributed"))
    monkeypatch.setitem(sys.modules, "mm1.train.parallel", None)
    assert cli.main(["info", "x.yaml"]) == 130
    assert capsys.readouterr().err == "mm1: interrupted\n"
    # The console script imports mm1.cli before `main` runs: nothing slow loads there, so a
    # Ctrl-C while starting lands in `main`.
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, mm1.cli; print(sorted(set(sys.modules) & "
            "{'torch', 'rich', 'omegaconf', 'mm1.config', 'mm1.cli.run'}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert loaded.strip() == "[]"


def test_eval_sft_suite_end_to_end(run, tmp_path, capsys, monkeypatch) -> None:
    """`mm1 eval RUN --suite sft`: the world gains the suite's files (its own stay as they
    were), the pre-trained run is prompted few-shot, `--suite-mode chat` zero-shot through the
    template, and the report holds the paper-style table and the plot."""
    world = run.parent / "world"
    own = {p: p.read_bytes() for p in (world / "eval" / "val").glob("*.json")}
    out = tmp_path / "suite"
    common = ("--seeds", "2", "--max-examples", "3")
    printed = mm1_here(capsys, "eval", str(run), "--suite", "sft", *common, "--out", str(out))
    assert (world / "eval" / "sft" / "suite.yaml").is_file()
    assert {p: p.read_bytes() for p in own} == own
    runs = json.loads((out / "suite.json").read_text())
    model, prior = runs
    assert model["mode"] == "4-shot" and prior["name"].startswith("prior")
    assert set(model["tasks"]) == {"sft_vqav2", "sft_textvqa", "sft_pope", "sft_multi", "sft_bench"}
    pope = model["tasks"]["sft_pope"]
    assert pope["metric"] == "F1" and len(pope["metrics"]["accuracy"]["scores"]) == 2
    pooled = {"F1", "accuracy", "precision", "recall", "yes_ratio"}
    kinds = {"accuracy_random", "accuracy_popular", "accuracy_adversarial"}
    assert pooled < set(pope["metrics"]) <= pooled | kinds  # 3 queries: not every kind
    assert all(len(r["demos"]) == 4 for r in model["predictions"]["sft_vqav2"]["0"])
    assert "| Model | VQAv2 (VQA accuracy) | TextVQA" in (out / "suite.md").read_text()
    assert (out / "suite.png").stat().st_size > 0 and "POPE (F1)" in printed

    # one seed from here on: the seeds' pooling is the few-shot run's to show
    common = ("--seeds", "1", "--max-examples", "3")
    suite = ("--suite", "sft", "--suite-mode", "chat", *common)
    mm1_here(capsys, "eval", str(run), *suite, "--out", str(out))
    chat = json.loads((out / "suite.json").read_text())[0]
    assert chat["mode"] == "chat, 0-shot"
    assert all(r["demos"] == [] for r in chat["predictions"]["sft_pope"]["0"])
    # `--compile` reaches every greedy decoding of the suite's tasks. That compiled `generate`
    # predicts what eager `generate` does is tests/models/test_generation.py's (compiling here
    # too would cost 20 s more with a cold compile cache).
    from mm1.eval import suite as suite_module

    asked: list[bool] = []
    generate = suite_module.generate

    def recording(*args, compile: bool = False, **kwargs):
        asked.append(compile)
        return generate(*args, **kwargs)

    monkeypatch.setattr(suite_module, "generate", recording)
    one = ("--seeds", "1", "--max-examples", "1")
    compiled = tmp_path / "compiled"
    mm1_here(capsys, "eval", str(run), *suite[:4], *one, "--compile", "--out", str(compiled))
    assert len(asked) >= 5 and all(asked)  # the five tasks (and the prior's row)


def test_a_mistyped_suite_name_points_at_sft(run, capsys) -> None:
    out = one_line(capsys, ["eval", str(run), "--suite", "sftt"], 2)
    assert out == (
        "config error: --suite sftt: no such suite file (the synthetic world's suite is --suite sft)"
    )


def test_suite_runs_and_their_controls_keep_their_own_results(run, tmp_path, monkeypatch):
    """A suite file's run replaced `--suite sft`'s results in RUN/eval-suite, and so did the
    shuffled-image control, whose row was named as the model's."""
    from mm1.eval import suite as suite_module

    seen: list[tuple[Path, str]] = []

    def suite(p, run_dir, suite, *, world, name, out, **kw):
        seen.append((out, name))
        out.mkdir(parents=True, exist_ok=True)
        (out / "suite.md").write_text("# suite\n")
        return {
            "files": {
                k: str(out / f)
                for k, f in (("markdown", "suite.md"), ("json", "s.json"), ("plot", "s.png"))
            }
        }

    monkeypatch.setattr(suite_module, "run_suite", suite)
    mine = tmp_path / "mine.yaml"
    mine.write_text("[]\n")
    for extra in (
        [],
        ["--shuffle-images"],
        ["--suite", str(mine)],  # the last --suite counts
        ["--shuffle-images", "--name", "control"],
    ):
        assert cli.main(["eval", str(run), "--suite", "sft", *extra]) in (0, None)
    outs = [out.relative_to(run).as_posix() for out, _ in seen]
    assert outs == ["eval-suite", "eval-suite-shuffled", "eval-suite-mine", "eval-suite-shuffled"]
    assert [name for _, name in seen] == ["run", "run (shuffled images)", "run", "control"]


def test_sft_demo_at_toy_scale(run, tmp_path) -> None:
    """The demo's SFT stage: fine-tune the tiny run on its world's conversations, the suite
    for three runs and the prior, three example conversations, and a report naming them."""
    from mm1.demo_sft import RUNS, add_to_demo_report, run_sft_demo

    overrides = [
        "train.steps=2",
        "train.save_every=2",
        "train.tensorboard=false",
        "train.progress=false",
        "data.num_workers=0",
    ]
    report = run_sft_demo(run, tmp_path / "sft", overrides, seeds=1, examples=2)
    text = report.read_text()
    assert all(f"| {name} (" in text for name in RUNS)
    assert "prior (most frequent answer)" in text and "SFT > PT beyond spread" in text
    assert text.count("**Conversation") == 3 and text.count("> **assistant:**") == 5
    runs = json.loads((tmp_path / "sft" / "eval-suite" / "suite.json").read_text())
    assert [r["mode"] for r in runs[:3]] == [
        "4-shot",
        "chat, 0-shot",
        "chat, 0-shot",
    ]
    # the world's tokenizer has no chat template: the run saves the plain one it trained with,
    # so chat and serve use it without a notice
    from mm1.chat import resolve_chat_template
    from mm1.data.chat_template import BUILTIN_TEMPLATES
    from mm1.data.tokenizer import Tokenizer

    saved = Tokenizer.from_file(tmp_path / "sft" / "tokenizer")
    assert saved.chat_template == BUILTIN_TEMPLATES["plain"]
    assert resolve_chat_template(saved, None).notice is None
    assert Tokenizer.from_file(run / "tokenizer").chat_template is None  # pre-training: none
    shuffled = runs[2]["predictions"]["sft_pope"]["0"]
    shown = [r["images"] for r in runs[1]["predictions"]["sft_pope"]["0"]]
    assert [r["images"] for r in shuffled] == shown[1:] + shown[:1]  # the control's rotation
    pics = sorted((tmp_path / "sft" / "examples").iterdir())
    assert 4 <= len(pics) <= 5 and all(f'src="examples/{p.name}"' in text for p in pics)
    # `mm1 demo` appends it to the pre-training report, links pointing into the SFT run
    demo_report = tmp_path / "demo" / "report.md"
    demo_report.parent.mkdir()
    demo_report.write_text("# mm1 demo report\n\nscores\n")
    add_to_demo_report(demo_report, report)
    merged = demo_report.read_text()
    assert merged.startswith("# mm1 demo report\n\nscores\n\n# Supervised fine-tuning (sft)")
    assert all(f'src="../sft/examples/{p.name}"' in merged for p in pics)
    assert "(../sft/eval-suite/suite.png)" in merged and "(eval-suite/" not in merged


def _fails(capsys, *args: str, code: int = 2) -> str:
    """`mm1 ARGS` in process: exits `code` with one line (no traceback); that line."""
    assert cli.main(list(args)) == code
    out = capsys.readouterr().out
    assert "Traceback" not in out and len([x for x in out.splitlines() if x.strip()]) >= 1
    return " ".join(out.split())


def test_a_task_file_cannot_shadow_a_synthetic_task(run, tmp_path, capsys) -> None:
    # a user task named synth_vqa would be silently replaced by the world's built-in one
    task_file = tmp_path / "tasks.yaml"
    task_file.write_text(yaml.safe_dump([_vqa_task(run.parent / "world", "synth_vqa", True)]))
    out = _fails(capsys, "eval", str(run), "--task-file", str(task_file), "--out", str(tmp_path))
    assert out == (
        f"config error: {task_file}: task 'synth_vqa': that name is reserved for a built-in "
        "synthetic task (synth_coco, synth_vqa); rename it"
    )


@pytest.mark.parametrize(
    "extra, named",
    [
        (("--shots", "0"), "--shots does not apply to --suite"),
        (("--beams", "3"), "--beams does not apply to --suite"),
        (("--tasks", "synth_vqa"), "--tasks does not apply to --suite"),
        (("--task-file", "t.yaml"), "--task-file does not apply to --suite"),
        (("--bad-images", "empty"), "--bad-images does not apply to --suite"),
        (("--rices",), "--rices does not apply to --suite"),
        (("eval.max_new_tokens=1",), "eval.max_new_tokens=1: --suite takes no eval.* overrides"),
        (("eval.bogus=3",), "eval.bogus=3: --suite takes no eval.* overrides"),
        (("--seeds", "0"), "--seeds 0 must be >= 1"),
        (("--seeds", "-1"), "--seeds -1 must be >= 1"),
        (("--batch-size", "0"), "--batch-size 0 must be >= 1"),
        (("--max-examples", "-1"), "--max-examples -1 must be >= 0 (0 = every query)"),
    ],
)
def test_eval_suite_refuses_what_it_would_ignore(run, tmp_path, capsys, extra, named) -> None:
    out = _fails(capsys, "eval", str(run), "--suite", "sft", "--out", str(tmp_path), *extra)
    assert out.startswith("config error: ") and named in out
    assert "eval.max_new_tokens" in named or "must be" in named or "--suite-mode, --seeds" in out


def test_suite_mode_without_suite_is_refused(run, tmp_path, capsys) -> None:
    # it would be ignored: plain `mm1 eval` prompts as the run's eval section says
    out = _fails(capsys, "eval", str(run), "--suite-mode", "chat", "--out", str(tmp_path))
    assert out == "config error: --suite-mode applies only with --suite (sft or a suite file)"


def test_run_suite_checks_seeds_and_max_examples(run) -> None:
    from mm1.config import ConfigError
    from mm1.eval.suite import run_suite

    for kw, msg in (({"seeds": 0}, "--seeds 0"), ({"max_examples": -1}, "--max-examples -1")):
        with pytest.raises(ConfigError, match=msg):
            run_suite(None, run, "sft", world=run.parent / "world", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--top-p", "0", "--temperature", "1"), "--top-p must be in (0, 1], got 0.0"),
        (("--top-p", "-1", "--temperature", "1"), "--top-p must be in (0, 1], got -1.0"),
        (("--max-new-tokens", "0"), "--max-new-tokens must be at least 1, got 0"),
        (("--max-new-tokens", "-5"), "--max-new-tokens must be at least 1, got -5"),
        (
            ("--temperature", "-1"),
            "--temperature must be a finite number >= 0 (0: greedy), got -1.0",
        ),
        (
            ("--temperature", "nan"),
            "--temperature must be a finite number >= 0 (0: greedy), got nan",
        ),
        (("--stop", ""), "--stop must not be empty: give the text that ends the answer"),
    ],
)
def test_generate_checks_its_sampling_flags(run, capsys, extra, message) -> None:
    out = _fails(capsys, "generate", str(run), "--prompt", "Hi", *extra)
    assert out == f"config error: {message}"


def test_generate_refuses_a_prompt_longer_than_the_context(run, pretrained, capsys) -> None:
    limit = pretrained.model.cfg.decoder.max_seq_len
    out = _fails(capsys, "generate", str(run), "--prompt", "red " * limit)
    assert out.startswith("config error: the prompt takes ") and out.endswith(
        f"tokens, more than the model's context of {limit} leaves room for an answer"
    )


def test_a_run_without_a_checkpoint_says_so(run, tmp_path, capsys) -> None:
    young = tmp_path / "young"
    (young / "checkpoints").mkdir(parents=True)  # training started, nothing saved yet
    for name in ("model.json", "config.yaml"):
        (young / name).write_bytes((run / name).read_bytes())
    out = _fails(capsys, "generate", str(young), "--prompt", "Hi")
    assert out == f"error: {young} has no checkpoint yet (training has not saved one)"


def test_info_names_the_command_for_other_yaml_files(capsys) -> None:
    clip = ROOT / "configs" / "encoder_clip.yaml"
    assert _fails(capsys, "info", str(clip)) == (
        f"config error: {clip}: an encoder config: train it with mm1 train-encoder {clip} "
        "(mm1 info summarises MM1 configs)"
    )
    grid = ROOT / "configs" / "studies" / "connectors.yaml"
    assert _fails(capsys, "info", str(grid)) == (
        f"config error: {grid}: a study grid: list its cells and their cost with mm1 ablate "
        f"{grid} --dry-run (mm1 info summarises MM1 configs)"
    )
    preset = str(ROOT / "configs" / "models" / "mm1_3b.yaml")
    assert _fails(capsys, "info", preset, "--seq-len", "-5") == (
        "config error: --seq-len -5 must be positive (0: the model's max_seq_len)"
    )


def test_hf_type_offers_every_decoder_family_mm1_writes() -> None:
    """`mm1 convert --hf-type` lists its choices without importing torch; they are the decoder
    families `models/hf/decoder.py` writes (persimmon was missing when it was added there)."""
    from mm1.cli import build_parser
    from mm1.models.hf.decoder import DECODER_TYPES

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    convert = sub.choices["convert"]
    hf_type = next(a for a in convert._actions if a.dest == "hf_type")
    assert sorted(hf_type.choices) == sorted(DECODER_TYPES)


def test_a_damaged_export_is_one_line_naming_the_file(run, tmp_path, capsys) -> None:
    """An export cut short in a download, or with a side file emptied or edited, is one line
    naming the file, exit 2, in every command that reads it (it was a 26-line SafetensorError
    traceback, json's "Expecting value" naming no file, or torch listing every tensor)."""
    import shutil

    export = tmp_path / "export"
    mm1_here(capsys, "convert", str(run), "--export", str(export))
    cases = {
        "model.safetensors": (b"\0" * 100, "model.safetensors is not a readable safetensors file"),
        "prompt_format.json": (b"", "prompt_format.json is not valid JSON (Expecting value"),
        "tokenizer_config.json": (b"{", "tokenizer_config.json is not valid JSON ("),
        "model.json": (b"[1]", "model.json is not a model config (a JSON object)"),
    }
    model_json = json.loads((export / "model.json").read_text())
    model_json["decoder"]["ffn_dim"] *= 2
    edited = json.dumps(model_json).encode()
    cases["model.json "] = (edited, "the weights are not those of the model its model.json")
    for name, (content, said) in cases.items():
        damaged = tmp_path / f"damaged-{name.strip()}"
        shutil.copytree(export, damaged, dirs_exist_ok=True)
        (damaged / name.strip()).write_bytes(content)
        commands = [
            ["generate", str(damaged), "--prompt", "hi"],
            ["convert", str(damaged), "--to-hf", str(tmp_path / "hf")],
        ]
        for argv in commands:
            line = one_line(capsys, argv, 2)
            assert said in line and str(damaged) in line, line
    # a run whose model.json is gone: it said "no checkpoint yet (training has not saved one)"
    bare = tmp_path / "bare-run"
    shutil.copytree(run, bare)
    (bare / "model.json").unlink()
    line = one_line(capsys, ["convert", str(bare), "--export", str(tmp_path / "x")], 2)
    assert line == (
        f"error: {bare} has checkpoints but no model.json (the run's model config): resuming the "
        "run with `mm1 train` writes it again"
    )
