"""`model.family: fuyu` end to end from the CLI: training (one process, and FSDP2 on two that
resumes bit-exactly), few-shot evaluation, and `mm1 convert --to-hf` as transformers'
`FuyuForCausalLM`, whose logits and greedy tokens are mm1's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# 32 px canvas: at most 2 x 2 patches and 2 newlines, 6 tokens
FUYU = ["model.family=fuyu", "model.vision.patch_size=16", "model.image_layout.type=fuyu"]


def same_as_transformers(model, theirs, prompt, pixels, sizes) -> torch.Tensor:
    """mm1's logits over its vocabulary and 6 greedy tokens equal the FuyuForCausalLM
    `theirs` on the same inputs (mm1's newline row written as the HF model reads it, and the
    pixels as its patches, which are returned); the newline is not suppressed."""
    from mm1.models.generation import generate
    from mm1.models.hf.fuyu import hf_input_ids, hf_pixel_values

    hf_ids, patches = hf_input_ids(model, prompt, sizes), hf_pixel_values(model, pixels, sizes)
    vocab = model.cfg.decoder.vocab_size
    with torch.no_grad():
        ours = model(prompt, pixel_values=pixels, image_sizes=sizes).logits
        ref = theirs(input_ids=hf_ids, pixel_values=patches).logits
        torch.testing.assert_close(ours, ref[..., :vocab], rtol=1e-5, atol=1e-5)
        new = generate(
            model, prompt.tolist(), pixels, max_new_tokens=6, eos_token_id=[], image_sizes=sizes
        )
        out = theirs.generate(
            input_ids=hf_ids,
            pixel_values=patches,
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
            suppress_tokens=None,
        )
    assert out[0, prompt.shape[1] :].tolist() == new[0]
    return patches


def test_a_fuyu_run_trains_evaluates_and_goes_out_as_transformers_fuyu(
    tmp_path, world, tiny_config
) -> None:
    transformers = pytest.importorskip("transformers")

    from mm1 import cli
    from mm1.models.fuyu import Fuyu
    from mm1.pretrained import load_pretrained

    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    cfg = tiny_config(tmp_path, world, steps=2, save_every=2, parallel="none", val_every=2)
    assert cli.main(["train", str(cfg), f"train.run_dir={run}", *FUYU]) == 0
    p = load_pretrained(run)
    model = p.model.eval()
    assert isinstance(model, Fuyu) and model.num_image_tokens == 6
    assert p.prompt_format.image_tokens == 6 and p.prompt_format.layout == "fuyu"
    shots = ["eval.shots=[0]", "eval.seeds=1", "eval.max_examples=4", "eval.max_new_tokens=3"]
    assert cli.main(["eval", str(run), *shots]) == 0
    results = json.loads((run / "eval-cli" / "results.json").read_text())
    assert results  # the scores themselves are an untrained model's

    assert cli.main(["convert", str(run), "--to-hf", str(hf_dir)]) == 0
    theirs = transformers.FuyuForCausalLM.from_pretrained(hf_dir).eval()
    newline = model.cfg.decoder.vocab_size
    assert theirs.generation_config.suppress_tokens == [newline]
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tok.convert_tokens_to_ids("|NEWLINE|") == newline
    # a 32 x 12 px image on the 32 px canvas: one row of 2 patches and its newline
    sizes = torch.tensor([[12, 32]])
    q = 3
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 200, (1, q + 9), generator=g)
    prompt[0, 2 : 2 + q] = model.image_token_id
    pixels = torch.randn(1, 3, 32, 32, generator=g)
    patches = same_as_transformers(model, theirs, prompt, pixels, sizes)
    assert patches.shape == (1, 2, 16 * 16 * 3)


def test_two_process_fsdp_fuyu_run_resumes_bit_exactly(
    tmp_path: Path, world, tiny_config, two_process_run_and_resume
) -> None:
    """2 gloo processes, FSDP2 over the decoder's blocks (fuyu has no encoder blocks): a run
    resumed from its step-2 checkpoint logs the losses of the uninterrupted run and ends with
    its weights."""
    from mm1.checkpoint import read_model_weights
    from mm1.train.logging import read_metrics

    cfg = tiny_config(tmp_path, world, steps=4, save_every=2, parallel="fsdp", val_every=0)
    full, resumed = two_process_run_and_resume(tmp_path, cfg, FUYU)

    def logged(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}

    assert sorted(logged(full)) == [1, 2, 3, 4]
    assert logged(resumed) == logged(full)  # bit-exact on CPU
    a, b = read_model_weights(full).state, read_model_weights(resumed).state
    assert "image_newline" in a and "connector.weight" in a
    assert not any(k.startswith("vision.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fuyu_8b_shaped_directory_trains_and_goes_back_out_as_itself(
    tmp_path, world, tiny_config
) -> None:
    """A FuyuForCausalLM directory with Fuyu-8B's architecture (Persimmon text model, a 24 x 40
    canvas, |NEWLINE| in its vocabulary) as `train.init.weights`: the run takes its
    architecture, tokenizer and image processor, trains, and `--to-hf` writes it back as
    FuyuForCausalLM with a Persimmon text model whose logits and greedy tokens are mm1's; that
    directory read again gives mm1's logits."""
    transformers = pytest.importorskip("transformers")

    from mm1 import cli
    from mm1.config import InitConfig, ModelConfig
    from mm1.models.build import build_model
    from mm1.models.hf.fuyu import IMAGE_NEWLINE_TOKEN
    from mm1.pretrained import load_pretrained
    from tests.models.fuyu_files import CANVAS, NEWLINE, write_fuyu

    fuyu_dir, run, hf_dir = tmp_path / "fuyu", tmp_path / "run", tmp_path / "hf"
    fuyu_dir.mkdir()
    write_fuyu(fuyu_dir)
    cfg = tiny_config(tmp_path, world, steps=2, save_every=2, parallel="none", val_every=0)
    assert (
        cli.main(["train", str(cfg), f"train.run_dir={run}", f"train.init.weights={fuyu_dir}"]) == 0
    )
    p = load_pretrained(run)
    model = p.model.eval()
    m = model.cfg
    assert (m.family, m.image_layout.type, m.image_layout.canvas) == ("fuyu", "fuyu", list(CANVAS))
    assert (m.decoder.norm, m.decoder.ffn_type) == ("layer", "mlp")
    # Fuyu's normalisation, at the directory's square (the fuyu layout places images itself)
    assert p.processor.image_mean == (0.5,) * 3 and p.processor.size == (CANVAS[0],) * 2
    assert p.tokenizer.token_to_id("|NEWLINE|") == NEWLINE  # the directory's tokenizer

    assert cli.main(["convert", str(run), "--to-hf", str(hf_dir)]) == 0
    theirs = transformers.FuyuForCausalLM.from_pretrained(hf_dir).eval()
    assert theirs.config.text_config.model_type == "persimmon"
    newline = m.decoder.vocab_size
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tok.convert_tokens_to_ids(IMAGE_NEWLINE_TOKEN) == newline  # |NEWLINE| was taken
    # a 40 x 13 px image on the 24 x 40 canvas: 2 rows of 5 patches, each with its newline
    sizes = torch.tensor([[13, 40]])
    q = 12
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 60, (1, q + 9), generator=g)
    prompt[0, 2 : 2 + q] = model.image_token_id
    pixels = torch.randn(1, 3, *CANVAS, generator=g)
    patches = same_as_transformers(model, theirs, prompt, pixels, sizes)
    assert patches.shape == (1, 10, 8 * 8 * 3)
    with torch.no_grad():
        ours = model(prompt, pixel_values=pixels, image_sizes=sizes).logits
    # ... and that directory read back is mm1's model again (one more vocabulary row).
    back = build_model(ModelConfig(), init=InitConfig(weights=str(hf_dir))).eval()
    assert back.cfg.image_layout.canvas == list(CANVAS)
    with torch.no_grad():
        again = back(prompt, pixel_values=pixels, image_sizes=sizes).logits
    torch.testing.assert_close(again[..., :newline], ours, rtol=1e-5, atol=1e-5)
