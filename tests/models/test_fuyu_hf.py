"""A transformers `FuyuForCausalLM` directory as a starting point (`train.init.weights`): Fuyu-8B's
own architecture (a Persimmon text model, a rectangular canvas, `|NEWLINE|` in the vocabulary),
built tiny (tests/models/fuyu_files.py), read into a `model.family: fuyu` model whose logits and greedy tokens are
transformers' on its processor's inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm1.config import ConfigError, InitConfig, ModelConfig
from mm1.models.build import build_model
from mm1.models.hf.fuyu import NEWLINE_TOKEN, hf_input_ids, hf_pixel_values
from tests.models.fuyu_files import (
    CANVAS,
    NEWLINE,
    PATCH,
    WORDS,
    processor_reference,
    write_fuyu,
    write_tokenizer,
)
from tests.models.helpers import perturb

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def _noise_image(w: int, h: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _read(out: Path):
    """The fuyu model mm1 builds from the directory (its own vocabulary: no tokenizer given)."""
    return build_model(ModelConfig(), init=InitConfig(weights=str(out))).eval()


@pytest.mark.parametrize(
    "text",
    [{}, {"qk_layernorm": False, "hidden_act": "gelu_pytorch_tanh"}, {"tie": True}],
    ids=["fuyu-8b", "no-qk-norm-gelu-tanh", "tied"],
)
def test_a_fuyu_directory_gives_the_architecture_and_the_weights(tmp_path, text):
    theirs = write_fuyu(tmp_path, **text).eval()
    if text.get("tie"):  # transformers writes no head, and the text config says untied
        assert "lm_head.weight" not in _saved_keys(tmp_path)
    model = _read(tmp_path)
    cfg = model.cfg
    assert cfg.family == "fuyu" and cfg.image_layout.type == "fuyu"
    assert cfg.image_layout.canvas == list(CANVAS) and cfg.vision.patch_size == PATCH
    d = cfg.decoder
    assert (d.norm, d.rope_fraction, d.ffn_type, d.vocab_size) == ("layer", 0.5, "mlp", len(WORDS))
    assert model.num_image_tokens == (24 // 8) * (40 // 8 + 1)
    emb = theirs.get_input_embeddings().weight
    torch.testing.assert_close(model.image_newline.data, emb[NEWLINE].data, rtol=0, atol=0)

    from mm1.data.images import ImageProcessor
    from mm1.data.layouts import FuyuFormat

    # Three images of different shapes, the widest shrunk to the canvas; two rows.
    images = [_noise_image(w, h, i) for i, (w, h) in enumerate([(50, 30), (9, 70), (40, 24)])]
    fmt = FuyuFormat(model.num_image_tokens, canvas=CANVAS, patch_size=PATCH)
    processor = ImageProcessor.from_pretrained(tmp_path)  # Fuyu's: no resize, mean / std 0.5
    assert processor.size is processor.shortest_edge is None and processor.image_mean == (0.5,) * 3
    pixels = fmt.pixel_values(processor, images)
    _, sizes = fmt.image_info(images)
    g = torch.Generator().manual_seed(5)
    text_ids = [torch.randint(5, len(WORDS), (n,), generator=g) for n in (3, 4, 2, 5)]
    slot = [torch.full((fmt.slots(im),), model.image_token_id) for im in images]
    rows = [
        torch.cat([text_ids[0], slot[0], text_ids[1], slot[1]]),
        torch.cat([text_ids[2], slot[2], text_ids[3]]),
    ]
    length = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([r, torch.full((length - len(r),), 5)]) for r in rows])
    # The HF model reads the directory's own ids: |SPEAKER| slots, |NEWLINE| row ends.
    hf_ids = hf_input_ids(model, ids, sizes, newline_id=NEWLINE)
    assert int((hf_ids == NEWLINE).sum()) == sum(fmt.grid_for_size(im.size)[0] for im in images)
    hf_pixels = hf_pixel_values(model, pixels, sizes)
    their_proc = _their_patches(tmp_path, images)
    torch.testing.assert_close(hf_pixels, their_proc, rtol=0, atol=1e-6)
    with torch.no_grad():
        ours = model(ids, pixel_values=pixels, image_sizes=sizes).logits
        ref = theirs(input_ids=hf_ids, pixel_values=hf_pixels).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def _saved_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        return set(f.keys())


def test_a_transformers_4_fuyu_config_reads_its_top_level_text_keys():
    """transformers 4 saved `text_config` without the values equal to its Persimmon defaults
    (rope_theta 25,000; transformers 5's is 10,000), which stay at the top level."""
    from mm1.models.hf.decoder import decoder_config_from_hf
    from mm1.models.hf.fuyu import fuyu_text_config

    sizes = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    saved = {
        "model_type": "fuyu",
        "rope_theta": 25000.0,
        "partial_rotary_factor": 0.5,
        "vocab_size": 64,
        "intermediate_size": 96,
        "text_config": {"model_type": "persimmon", **sizes},
    }
    decoder = decoder_config_from_hf(fuyu_text_config(saved))
    assert (decoder.rope_theta, decoder.rope_fraction, decoder.vocab_size) == (25000.0, 0.5, 64)
    saved["text_config"]["rope_theta"] = 123.0  # the text config's own value wins
    assert decoder_config_from_hf(fuyu_text_config(saved)).rope_theta == 123.0


def _their_patches(path: Path, images: list) -> torch.Tensor:
    """transformers' Fuyu image processor, read from the directory: each image's patches that
    carry tokens, in order (1, patches, p x p x 3)."""
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    patches = processor_reference(images, PATCH, proc=FuyuImageProcessorPil.from_pretrained(path))[
        2
    ]
    return torch.cat(patches)[None]


def test_a_fuyu_directory_starts_the_whole_model_only(tmp_path):
    write_fuyu(tmp_path)
    with pytest.raises(ConfigError, match="FuyuForCausalLM checkpoint: it starts the whole"):
        build_model(ModelConfig(), init=InitConfig(decoder=str(tmp_path)))
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"\|NEWLINE\| token, and no tokenizer.json"):
        _read(tmp_path)


def test_a_fuyu_directory_is_a_model_for_generate(tmp_path, capsys):
    """`load_pretrained` (so `mm1 eval / generate / chat / serve`) takes the directory as it
    is: the weights a run would start from, Fuyu's layout and canvas, its tokenizer."""
    from mm1 import cli
    from mm1.pretrained import load_pretrained

    write_fuyu(tmp_path / "fuyu")
    p = load_pretrained(tmp_path / "fuyu")
    assert p.prompt_format.layout == "fuyu" and p.prompt_format.canvas == CANVAS
    assert (
        p.tokenizer.token_to_id(NEWLINE_TOKEN) == NEWLINE and p.processor.image_mean == (0.5,) * 3
    )
    started = _read(tmp_path / "fuyu")
    for k, v in started.state_dict().items():
        if k.startswith("decoder.embed_tokens") or k.startswith("decoder.lm_head"):
            v = v[: len(WORDS)]  # the run's tokenizer adds mm1's special tokens after these
            assert torch.equal(p.model.state_dict()[k][: len(WORDS)], v), k
        else:
            assert torch.equal(p.model.state_dict()[k], v), k
    write_fuyu(tmp_path / "tied", tie=True)
    tied = load_pretrained(tmp_path / "tied").model
    assert tied.decoder.lm_head.weight is tied.decoder.embed_tokens.weight
    _noise_image(50, 30, 0).save(tmp_path / "im.png")
    argv = ["generate", str(tmp_path / "fuyu"), "--prompt", "<image>w1 w2"]
    assert cli.main([*argv, "--image", str(tmp_path / "im.png"), "--max-new-tokens", "3"]) in (
        0,
        None,
    )
    assert capsys.readouterr().out.strip()


def test_a_single_layout_export_and_a_directory_without_a_processor_config(tmp_path, caplog):
    """mm1's --to-hf of a fuyu model with the `single` layout writes mm1's own processor: read
    back, the directory keeps `single` (each image resized to the square), with the exported
    model's weights. A Fuyu directory with no processor config at all is read with Fuyu's
    [-1, 1] normalisation and the config's canvas, and says so."""
    import logging

    from mm1.config import DecoderConfig, VisionConfig
    from mm1.data.images import ImageProcessor
    from mm1.data.tokenizer import Tokenizer
    from mm1.hf_export import save_hf
    from mm1.models.fuyu import Fuyu
    from mm1.pretrained import Pretrained, load_pretrained

    write_tokenizer(tmp_path)
    tok = Tokenizer.from_file(tmp_path)
    dec = dict(vocab_size=tok.vocab_size, dim=32, layers=2, heads=4, kv_heads=4, ffn_dim=64)
    cfg = ModelConfig(
        family="fuyu",
        vision=VisionConfig(image_size=32, patch_size=8),
        decoder=DecoderConfig(**dec),
        image_token_id=tok.image_id,
    )
    torch.manual_seed(0)
    model = perturb(Fuyu(cfg))
    from mm1.config import DataConfig
    from mm1.data.prompt_format import PromptFormat

    fmt = PromptFormat.from_config(DataConfig(image_boundaries=False), model.num_image_tokens, cfg)
    out = tmp_path / "hf"
    save_hf(Pretrained(model, tok, ImageProcessor.siglip(32), out, fmt), out)
    p = load_pretrained(out)
    assert p.cfg.image_layout.type == "single" and p.prompt_format.layout == "single"
    assert p.processor == ImageProcessor.siglip(32)
    for k, v in model.state_dict().items():
        assert torch.equal(p.model.state_dict()[k][: v.shape[0]], v), k

    fuyu = tmp_path / "fuyu"
    fuyu.mkdir()
    write_fuyu(fuyu)
    (fuyu / "preprocessor_config.json").unlink()
    with caplog.at_level(logging.WARNING):
        p = load_pretrained(fuyu)
    assert "has no image processor config" in caplog.text
    assert p.processor.image_mean == (0.5,) * 3 and p.cfg.image_layout.type == "fuyu"
