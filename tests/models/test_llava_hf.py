"""LLaVA / LLaVA-NeXT directories out (`mm1 convert --to-hf`) and in (`train.init.weights`):
transformers loads the export whole, its processor writes our ids and pixels, and its model
gives our logits and greedy tokens on images of several sizes; the directory read back as a
starting point gives the same model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm1.config import (
    DataConfig,
    DecoderConfig,
    ImageLayoutConfig,
    InitConfig,
    ModelConfig,
    VisionConfig,
    validate_model,
)
from mm1.data.images import ImageProcessor
from mm1.data.prompt_format import PromptFormat
from mm1.data.tokenizer import Tokenizer, tokenize_prompt
from mm1.data.world import image_processor_for
from mm1.hf_export import save_hf
from mm1.models.build import build_model
from mm1.models.generation import generate
from mm1.models.hf.llava import llava_model_type
from mm1.models.mllm import MM1
from mm1.pretrained import Pretrained
from tests.models.helpers import perturb

transformers = pytest.importorskip("transformers")

SIZES = [(32, 32), (50, 77), (120, 40), (7, 300), (300, 2)]
PROMPT = "<image>Output:"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory, world_copy) -> Tokenizer:
    root = world_copy(tmp_path_factory.mktemp("world"))
    return Tokenizer.from_file(root / "tokenizer.json")


def _config(tok: Tokenizer, layout: str, variant: str = "clip") -> ModelConfig:
    cfg = ModelConfig(
        vision=VisionConfig(
            variant=variant,
            image_size=32,
            patch_size=8,
            width=32,
            layers=3,
            heads=2,
            mlp_dim=64,
            act="quick_gelu" if variant == "clip" else "gelu_tanh",
            feature_layer=-2,
        ),
        connector={"type": "mlp", "num_tokens": 0},
        decoder=DecoderConfig(
            vocab_size=tok.vocab_size, dim=32, layers=2, heads=4, kv_heads=2, ffn_dim=64
        ),
        image_token_id=tok.image_id,
        image_layout=ImageLayoutConfig(type=layout, grid=[1, 3] if layout == "anyres" else None),
    )
    validate_model(cfg)
    return cfg


def _export(
    tok: Tokenizer, layout: str, variant: str, out: Path, pad: bool = False
) -> tuple[MM1, PromptFormat]:
    cfg = _config(tok, layout, variant)
    torch.manual_seed(0)
    model = perturb(MM1(cfg))  # away from the init's zeros and ones, so every weight matters
    proc = ImageProcessor.clip(32) if variant == "clip" else ImageProcessor.siglip(32)
    proc = replace(proc, pad_to_square=pad)
    fmt = PromptFormat.from_config(DataConfig(image_boundaries=False), model.num_image_tokens, cfg)
    save_hf(Pretrained(model, tok, proc, out, fmt), out)
    return model, fmt


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("layout", "variant"),
    [("single", "clip"), ("anyres", "clip"), ("single", "siglip"), ("single", "clip_pad")],
)
def test_export_runs_in_transformers_as_in_mm1(
    tmp_path: Path, tok: Tokenizer, layout: str, variant: str
) -> None:
    pad = variant == "clip_pad"  # LLaVA-1.5's expand-to-square
    variant = variant.removesuffix("_pad")
    model, fmt = _export(tok, layout, variant, tmp_path, pad)
    cls = {
        "single": transformers.LlavaForConditionalGeneration,
        "anyres": transformers.LlavaNextForConditionalGeneration,
    }[layout]
    hf, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    hf = hf.eval()
    processor = transformers.AutoProcessor.from_pretrained(tmp_path)
    ours_proc = ImageProcessor.clip(32) if variant == "clip" else ImageProcessor.siglip(32)
    ours_proc = replace(ours_proc, pad_to_square=pad)
    for i, (w, h) in enumerate(SIZES):
        image = _image(w, h, i)
        enc = processor(images=image, text=PROMPT, return_tensors="pt")
        ids = tokenize_prompt(PROMPT, [image], tok, fmt)
        assert enc["input_ids"][0].tolist() == ids, (w, h)
        pixels = fmt.pixel_values(ours_proc, [image])
        crops, sizes = fmt.image_info([image])
        hf_pixels = enc["pixel_values"][0] if layout == "anyres" else enc["pixel_values"]
        assert torch.equal(pixels, hf_pixels), (w, h)
        with torch.no_grad():
            ours = model(torch.tensor([ids]), pixel_values=pixels, image_sizes=sizes).logits
            theirs = hf(**enc).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        greedy = hf.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_id)
        mine = generate(
            model, [ids], pixels, max_new_tokens=6, image_crops=crops, image_sizes=sizes
        )
        assert greedy[0, len(ids) :].tolist() == mine[0], (w, h)


@pytest.mark.parametrize("layout", ["single", "anyres"])
def test_a_llava_directory_is_a_starting_point(tmp_path: Path, tok: Tokenizer, layout: str) -> None:
    exported, fmt = _export(tok, layout, "clip", tmp_path / "hf")
    # another architecture in the config: the LLaVA directory's replaces it
    cfg = _config(tok, "single")
    cfg.connector = {"type": "avgpool", "num_tokens": 4}
    init = InitConfig(weights=str(tmp_path / "hf"))
    model = build_model(cfg, tok.vocab_size, tok.image_id, init=init).eval()
    assert model.cfg.image_layout.type == layout and model.cfg.connector.type == "mlp"
    for k, v in exported.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    processor = image_processor_for(model.cfg, init)
    assert processor == ImageProcessor.clip(32)
    image = _image(70, 30, 0)
    ids = torch.tensor([tokenize_prompt(PROMPT, [image], tok, fmt)])
    pixels, (crops, sizes) = fmt.pixel_values(processor, [image]), fmt.image_info([image])
    with torch.no_grad():
        got = model(ids, pixel_values=pixels, image_crops=crops, image_sizes=sizes).logits
        want = exported(ids, pixel_values=pixels, image_crops=crops, image_sizes=sizes).logits
    assert torch.equal(got, want)
    if layout == "anyres":  # a grid is laid out by the image's size: crops alone are refused
        with pytest.raises(ValueError, match="anyres layout needs image_sizes"):
            model(ids, pixel_values=pixels, image_crops=crops)


@pytest.mark.parametrize("layout", ["single", "anyres"])
def test_a_llava_directory_is_a_model_for_eval_generate_and_serve(
    tmp_path: Path, tok: Tokenizer, layout: str
) -> None:
    """`load_pretrained` (so `mm1 eval / generate / chat / serve`) takes a LLaVA directory as
    it is: its weights, its tokenizer, its processor, its layout's prompts, at its own crop
    size; the ids and greedy tokens are the exported model's."""
    from mm1.pretrained import load_pretrained

    exported, fmt = _export(tok, layout, "clip", tmp_path)
    p = load_pretrained(tmp_path)
    # (LLaVA-NeXT's canvases come back as the list of pinpoints its grid gave)
    assert p.prompt_format.layout == fmt.layout and p.processor == ImageProcessor.clip(32)
    assert p.cfg.vision.image_size == 32 and p.cfg.image_layout.type == layout
    for k, v in exported.state_dict().items():
        assert torch.equal(p.model.state_dict()[k], v), k
    image = _image(70, 30, 0)
    ids = tokenize_prompt(PROMPT, [image], p.tokenizer, p.prompt_format)
    assert ids == tokenize_prompt(PROMPT, [image], tok, fmt)
    pixels, (crops, sizes) = fmt.pixel_values(p.processor, [image]), fmt.image_info([image])
    kw = dict(max_new_tokens=5, image_crops=crops, image_sizes=sizes)
    assert generate(p.model, [ids], pixels, **kw) == generate(exported, [ids], pixels, **kw)


@pytest.mark.parametrize("layout", ["single", "anyres"])
def test_a_llava_directory_in_bf16_is_transformers_in_bf16(
    tmp_path: Path, tok: Tokenizer, layout: str
) -> None:
    """`load_pretrained(dtype=bfloat16)` (`--dtype bf16`) reads a LLaVA / LLaVA-NeXT directory
    as transformers' `from_pretrained(dtype=bfloat16)` does: the weights rounded once, the
    rotary frequencies kept in fp32 (a bf16 copy of them moves the logits by ~0.02). The same
    ops in the same dtype: the logits are equal, not close, and so are the greedy tokens."""
    from mm1.pretrained import load_pretrained

    _export(tok, layout, "clip", tmp_path)
    p = load_pretrained(tmp_path, dtype="bfloat16")
    assert p.model.decoder.embed_tokens.weight.dtype == torch.bfloat16
    assert p.runtime == {"device": "cpu", "dtype": "bfloat16"}
    cls = {
        "single": transformers.LlavaForConditionalGeneration,
        "anyres": transformers.LlavaNextForConditionalGeneration,
    }[layout]
    hf = cls.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    processor = transformers.AutoProcessor.from_pretrained(tmp_path)
    for i, (w, h) in enumerate(SIZES[:3]):
        image = _image(w, h, i)
        enc = processor(images=image, text=PROMPT + " a b c", return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        enc["pixel_values"] = enc["pixel_values"].to(torch.bfloat16)
        pixels = p.prompt_format.pixel_values(p.processor, [image])  # fp32: cast on entry
        crops, sizes = p.prompt_format.image_info([image])
        with torch.no_grad():
            ours = p.model(torch.tensor([ids]), pixel_values=pixels, image_sizes=sizes).logits
            theirs = hf(**enc).logits
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs), (w, h)
        greedy = hf.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_id)
        kw = dict(max_new_tokens=6, image_crops=crops, image_sizes=sizes)
        mine = generate(p.model, [ids], pixels, **kw)[0]
        assert greedy[0, len(ids) :].tolist() == mine, (w, h)


def test_anyres_stage_from_a_single_layout_model_starts_a_fresh_newline(
    tmp_path: Path, tok: Tokenizer
) -> None:
    """MM1 moves to high resolution after pre-training: an anyres model started from a
    single-layout export takes every weight, and its newline starts fresh."""
    from mm1.pretrained import save_pretrained

    torch.manual_seed(0)
    single = perturb(MM1(_config(tok, "single")))
    save_pretrained(single, tok, ImageProcessor.clip(32), tmp_path / "export")
    init = InitConfig(weights=str(tmp_path / "export"))
    model = build_model(_config(tok, "anyres"), tok.vocab_size, tok.image_id, init=init)
    assert model.image_newline is not None and torch.isfinite(model.image_newline).all()
    for k, v in single.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("template", ["plain", "vicuna_v1"])
def test_the_exported_chat_template_takes_content_parts(
    tmp_path: Path, tok: Tokenizer, template: str
) -> None:
    """AutoProcessor is prompted with lists of content parts, which mm1's string templates
    could not add to a string (a TypeError): the export's template reads them as the text mm1
    trained on, and mm1 reads the template back as it was."""
    from mm1.data.chat_template import BUILTIN_TEMPLATES

    source = BUILTIN_TEMPLATES[template]
    tok.save(tmp_path / "tok")
    trained = Tokenizer.from_file(tmp_path / "tok")
    trained.chat_template = source
    cfg = _config(trained, "single", "clip")
    model = MM1(cfg)
    fmt = PromptFormat.from_config(DataConfig(), model.num_image_tokens, cfg)
    save_hf(Pretrained(model, trained, ImageProcessor.clip(32), tmp_path, fmt), tmp_path / "hf")
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    as_text = [{"role": "user", "content": "<image>\nDescribe it."}]
    as_parts = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}
    ]
    want = trained.apply_chat_template(as_text, add_generation_prompt=True, tokenize=False)
    for messages in (as_parts, as_text):
        got = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert got == want
    assert Tokenizer.from_file(tmp_path / "hf").chat_template == source


def test_other_connectors_and_layouts_say_why_they_are_not_llava(tok: Tokenizer) -> None:
    cfg = _config(tok, "single")
    cfg.connector = {"type": "avgpool", "num_tokens": 4}
    validate_model(cfg)
    with pytest.raises(ValueError, match="connector is 'avgpool'"):
        llava_model_type(cfg)
    cfg = _config(tok, "single")
    cfg.image_layout = ImageLayoutConfig(type="mm1")
    with pytest.raises(ValueError, match="image_layout.type='mm1'"):
        llava_model_type(cfg)


def test_large_models_are_written_in_shards_with_an_index(tmp_path: Path, tok: Tokenizer) -> None:
    from mm1.models.hf.llava import save_llava_hf

    model, fmt = _export(tok, "anyres", "clip", tmp_path / "one")
    save_llava_hf(model, tmp_path / "one", max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "one").glob("model*.safetensors*"))
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert len(files) > 3  # the index and several shards
    hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "one").eval()
    image = _image(40, 90, 1)
    enc = transformers.AutoProcessor.from_pretrained(tmp_path / "one")(
        images=image, text=PROMPT, return_tensors="pt"
    )
    _, sizes = fmt.image_info([image])
    pixels = enc["pixel_values"][0]
    with torch.no_grad():
        torch.testing.assert_close(
            hf(**enc).logits,
            model(enc["input_ids"], pixel_values=pixels, image_sizes=sizes).logits,
            rtol=1e-4,
            atol=1e-5,
        )
    back = build_model(
        _config(tok, "anyres"),
        tok.vocab_size,
        tok.image_id,
        init=InitConfig(weights=str(tmp_path / "one")),
    )
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_llava_hf_hub_key_layout_reads_the_same(tmp_path: Path, tok: Tokenizer) -> None:
    """llava-hf's Hub checkpoints keep the encoder under `vision_tower.vision_model.`."""
    from safetensors.torch import load_file, save_file

    model, _ = _export(tok, "anyres", "clip", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    hub = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in state.items()}
    save_file(hub, tmp_path / "model.safetensors", metadata={"format": "pt"})
    init = InitConfig(weights=str(tmp_path))
    back = build_model(_config(tok, "single"), tok.vocab_size, tok.image_id, init=init)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_a_llava_start_at_another_image_size_keeps_its_canvases_in_crops(
    tmp_path: Path, tok: Tokenizer
) -> None:
    from mm1.models.vision import interpolate_pos_embed

    exported, _ = _export(tok, "anyres", "clip", tmp_path)
    cfg = _config(tok, "single")
    cfg.vision.image_size = 48  # the config's size wins, as for an HF encoder
    model = build_model(cfg, tok.vocab_size, tok.image_id, init=InitConfig(weights=str(tmp_path)))
    assert model.cfg.vision.image_size == 48 and model.cfg.image_layout.type == "anyres"
    ours = sorted(map(tuple, model.cfg.image_layout.pinpoints))
    theirs = sorted((w * 48 // 32, h * 48 // 32) for w, h in _canvases(exported))
    assert ours == theirs
    want = interpolate_pos_embed(exported.vision.pos_embed.detach(), 6, True)
    assert torch.equal(model.vision.pos_embed.detach(), want)
    assert torch.equal(model.image_newline, exported.image_newline)


def _canvases(model: MM1) -> list[tuple[int, int]]:
    from mm1.tiling import canvas_candidates

    lay = model.cfg.image_layout
    return canvas_candidates(model.cfg.vision.image_size, lay.pinpoints, lay.grid)


@pytest.mark.parametrize("decoder", ["tied", "qwen3", "mixtral", "qwen3_moe", "persimmon"])
def test_tied_and_moe_decoders_go_out_and_back(
    tmp_path: Path, tok: Tokenizer, decoder: str
) -> None:
    """A tied head (not written; transformers re-ties it), a dense decoder with a q/k norm
    (Qwen3), MoE text models (per-expert weights, fused again on the way back) and Persimmon
    (q / k / v fused per head, split again) give transformers' logits and read back
    unchanged."""
    cfg = _config(tok, "single")
    cfg.decoder.tie_embeddings = decoder == "tied"
    cfg.decoder.qk_norm = decoder in ("qwen3", "qwen3_moe", "persimmon")
    if decoder in ("mixtral", "qwen3_moe"):
        cfg.decoder.ffn = {"type": "moe", "experts": 4, "top_k": 2, "norm_topk_prob": True}
    if decoder == "persimmon":
        d = cfg.decoder
        d.kv_heads, d.norm, d.rope_fraction, d.qkv_bias, d.o_bias = (
            d.heads,
            "layer",
            0.5,
            True,
            True,
        )
        d.ffn = {"type": "mlp", "activation": "gelu_tanh"}  # written as gelu_pytorch_tanh
    validate_model(cfg)
    torch.manual_seed(0)
    model = perturb(MM1(cfg))
    fmt = PromptFormat.from_config(DataConfig(image_boundaries=False), model.num_image_tokens, cfg)
    save_hf(Pretrained(model, tok, ImageProcessor.clip(32), tmp_path, fmt), tmp_path)
    text = transformers.AutoConfig.from_pretrained(tmp_path).text_config
    assert text.model_type == {"tied": "llama"}.get(decoder, decoder)
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info.values()), info
    image = _image(50, 30, 2)
    ids = torch.tensor([tokenize_prompt(PROMPT, [image], tok, fmt)])
    pixels = fmt.pixel_values(ImageProcessor.clip(32), [image])
    with torch.no_grad():
        theirs = hf.eval()(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(model(ids, pixel_values=pixels).logits, theirs)
    back = build_model(cfg, tok.vocab_size, tok.image_id, init=InitConfig(weights=str(tmp_path)))
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
