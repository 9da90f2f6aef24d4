"""The fuyu family (no image encoder: patches -> Linear -> decoder, a newline after each row)
against transformers' Fuyu: its processor's patch order, and `FuyuForCausalLM` with the same
weights (mm1's decoder as its text model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mm1.config import ConfigError, DecoderConfig, ModelConfig, VisionConfig, validate_model
from mm1.models.family import family_spec
from mm1.models.fuyu import Fuyu, Patchify
from mm1.models.hf.fuyu import fuyu_to_hf, hf_input_ids, hf_pixel_values, image_newline_id
from tests.models.fuyu_files import processor_reference
from tests.models.helpers import perturb

transformers = pytest.importorskip("transformers")


def _config(patch: int = 8, **decoder: object) -> ModelConfig:
    dec = {"vocab_size": 96, "dim": 48, "layers": 2, "heads": 4, "kv_heads": 2, "ffn_dim": 64}
    dec.update(decoder)
    return ModelConfig(
        family="fuyu",
        vision=VisionConfig(image_size=32, patch_size=patch),
        decoder=DecoderConfig(**dec),  # type: ignore[arg-type]
    )


def test_patch_order_is_fuyus_processor() -> None:
    # The PIL processor (numpy): the torch one needs torchvision, which does not import here.
    from transformers.image_utils import SizeDict
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    x = torch.randn(2, 3, 24, 36, generator=torch.Generator().manual_seed(0))
    size = SizeDict(height=6, width=6)
    theirs = FuyuImageProcessorPil().patchify_image(x.numpy(), patch_size=size)
    torch.testing.assert_close(Patchify(6)(x), torch.from_numpy(theirs), rtol=0, atol=0)


@pytest.mark.parametrize("patch", [8, 16])
def test_image_tokens_are_laid_out_as_fuyus_processor_writes_them(patch: int) -> None:
    """Placeholders row by row, a newline after each row: mm1's slots, as the HF model reads
    them (`hf_input_ids`), equal the ids transformers' Fuyu processor writes for the image."""
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    model = Fuyu(_config(patch))
    placeholder, newline = model.image_token_id, image_newline_id(model)
    image = torch.zeros(1, 1, 3, 32, 32)
    size = torch.tensor([[32]])
    theirs = FuyuImageProcessorPil().preprocess_with_tokenizer_info(
        image,
        torch.ones(1, 1, 1),
        size,
        size,
        placeholder,
        newline,
        True,
        {"height": patch, "width": patch},
    )["image_input_ids"][0][0]
    slots = torch.full((1, model.num_image_tokens), placeholder)
    assert hf_input_ids(model, slots)[0].tolist() == theirs.tolist()


@torch.no_grad()
def test_each_row_of_patches_ends_with_the_newline_vector() -> None:
    model = Fuyu(_config(16))  # 2 x 2 patches: tokens p00 p01 NL p10 p11 NL
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    tokens = model.image_tokens(pixels)
    patches = model.connector(Patchify(16)(pixels))[0]
    assert tokens.shape == (6, 48)
    for i, want in enumerate([patches[0], patches[1], None, patches[2], patches[3], None]):
        torch.testing.assert_close(tokens[i], model.image_newline if want is None else want)


def _ids_with_images(model: Fuyu, rows: int, length: int, starts: list[list[int]]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, model.image_token_id, (rows, length), generator=g)
    q = model.num_image_tokens
    for r, row in enumerate(starts):
        for s in row:
            ids[r, s : s + q] = model.image_token_id
    return ids


@pytest.mark.parametrize(
    ("patch", "decoder"),
    [(8, {}), (16, {"tie_embeddings": True}), (8, {"qk_norm": True, "head_dim": 16})],
)
def test_logits_equal_transformers_fuyu(patch: int, decoder: dict[str, object]) -> None:
    torch.manual_seed(0)
    cfg = _config(patch, **decoder)
    validate_model(cfg)
    model = perturb(Fuyu(cfg))
    assert model.num_image_tokens == cfg.num_image_tokens == (32 // patch) * (32 // patch + 1)
    hf_cfg, tensors = fuyu_to_hf(model)
    theirs = transformers.FuyuForCausalLM(transformers.FuyuConfig(**hf_cfg)).eval()
    missing, unexpected = theirs.load_state_dict(tensors, strict=False)
    assert not unexpected
    assert set(missing) == ({"lm_head.weight"} if cfg.decoder.tie_embeddings else set())
    if cfg.decoder.tie_embeddings:
        assert theirs.lm_head.weight.data_ptr() == theirs.get_input_embeddings().weight.data_ptr()
    q = model.num_image_tokens
    ids = _ids_with_images(model, 2, 2 * q + 12, [[3, q + 6], [5]])  # 3 images, row 1 has one
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    theirs_ids = hf_input_ids(model, ids)
    newline = image_newline_id(model)
    assert int((theirs_ids == newline).sum()) == 3 * model.rows
    assert int((theirs_ids == model.image_token_id).sum()) == 3 * model.rows * model.cols
    with torch.no_grad():
        ours = model(ids, pixel_values=pixels).logits
        hf_patches = Patchify(patch)(pixels)
        ref = theirs(input_ids=theirs_ids, pixel_values=hf_patches[None].flatten(1, 2)).logits
    torch.testing.assert_close(ours, ref[..., : cfg.decoder.vocab_size], rtol=1e-5, atol=1e-5)


def test_images_change_the_logits_and_every_image_parameter_learns() -> None:
    torch.manual_seed(0)
    model = Fuyu(_config())
    q = model.num_image_tokens
    ids = _ids_with_images(model, 1, q + 8, [[2]])
    a, b = torch.randn(2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = model(ids, labels=ids.masked_fill(ids == model.image_token_id, -100), pixel_values=a)
    out.loss.backward()
    for name in ("connector.weight", "connector.bias", "image_newline"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    with torch.no_grad():
        after = ids[0] != model.image_token_id
        la = model(ids, pixel_values=a).logits[0, -1]
        lb = model(ids, pixel_values=b).logits[0, -1]
    assert after[-1] and not torch.allclose(la, lb)


def test_a_text_only_training_batch_still_touches_the_image_parameters() -> None:
    """DDP / FSDP need every parameter in the graph, as MM1's blank-image path ensures."""
    model = Fuyu(_config()).train()
    ids = torch.randint(0, 90, (1, 10))
    model(ids, labels=ids).loss.backward()
    assert model.connector.weight.grad is not None and model.image_newline.grad is not None


def test_config_counts_and_checks() -> None:
    cfg = _config(16)
    validate_model(cfg)  # the default connector (c_abstractor, 144 tokens) is not the family's
    assert cfg.num_image_tokens == 2 * 3
    cfg.vision.width, cfg.vision.heads = 30, 4  # a ViT's keys: fuyu has none to check
    validate_model(cfg)
    cfg.vision.patch_size = 12
    with pytest.raises(ConfigError, match="image_size=32 is not a multiple of .*patch_size=12"):
        validate_model(cfg)
    cfg.vision.patch_size = 16
    cfg.image_layout.type = "anyres"
    with pytest.raises(ConfigError, match="model.image_layout.type=anyres: model.family=fuyu"):
        validate_model(cfg)
    spec = family_spec("fuyu")
    model = Fuyu(_config())
    assert not spec.has_encoder and sum(p.numel() for p in model.vision.parameters()) == 0
    assert [list(b) for b in spec.blocks(model)] == [list(model.decoder.layers)]


def test_meta_build_then_init_weights_matches_a_fresh_build_in_kind() -> None:
    with torch.device("meta"):
        model = Fuyu(_config())
    model.to_empty(device="cpu")
    model.init_weights()
    model.init_buffers()
    assert torch.isfinite(model.image_newline).all() and model.connector.bias.abs().sum() == 0
    ids = torch.randint(0, 90, (1, 10))
    assert torch.isfinite(model(ids).logits).all()


def test_train_init_vision_is_refused(tmp_path) -> None:
    from mm1.config import InitConfig
    from mm1.models.build import build_model

    with pytest.raises(ConfigError, match="train.init.vision=.*has no image encoder"):
        build_model(_config(), init=InitConfig(vision=str(tmp_path)))


# -- the fuyu layout: Fuyu's canvas (aspect kept, padded), tokens only where the image is -----

SIZES = [(50, 30), (20, 40), (64, 64), (100, 37), (16, 16), (32, 32), (33, 7), (9, 70)]


def _fuyu_layout(patch: int = 8, canvas: list[int] | None = None, **decoder: object) -> ModelConfig:
    cfg = _config(patch, **decoder)
    cfg.image_layout.type = "fuyu"
    cfg.image_layout.canvas = canvas
    validate_model(cfg)
    return cfg


def _noise_image(w: int, h: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("patch", "canvas"), [(8, None), (16, None), (8, [32, 48]), (16, [48, 32])]
)
def test_fuyu_layout_pixels_slots_and_patches_are_fuyus_processor(
    patch: int, canvas: list[int] | None
) -> None:
    from mm1.data.prompt_format import PromptFormat
    from mm1.data.world import image_processor_for

    cfg = _fuyu_layout(patch, canvas)
    model = Fuyu(cfg)
    fmt = PromptFormat.from_config(
        SimpleNamespace(image_boundaries=False), model.num_image_tokens, cfg
    )  # type: ignore[arg-type]
    assert fmt.layout == "fuyu"
    images = [_noise_image(w, h, i) for i, (w, h) in enumerate(SIZES)]
    # A run's processor resizes to the square (Fuyu normalises as SigLIP); the layout places
    # each image on the canvas itself and leaves that resize out.
    cfg.vision.variant = "siglip"
    processor = image_processor_for(cfg)
    assert processor.size == (32, 32)
    pixels = fmt.pixel_values(processor, images)
    _, sizes = fmt.image_info(images)
    their_pixels, their_ids, their_patches = processor_reference(images, patch, model.canvas)
    torch.testing.assert_close(pixels, torch.stack(their_pixels), rtol=0, atol=1e-6)
    slots = [fmt.slots(im) for im in images]
    assert slots == [len(i) for i in their_ids]
    assert max(slots) <= model.num_image_tokens and min(slots) < model.num_image_tokens
    flat = torch.full((1, sum(slots)), model.image_token_id)
    newline = image_newline_id(model)
    want = torch.cat(their_ids).masked_fill(torch.cat(their_ids) == 9, newline)
    want = want.masked_fill(want == 7, model.image_token_id)
    assert hf_input_ids(model, flat, sizes)[0].tolist() == want.tolist()
    theirs = torch.cat(their_patches)[None]
    torch.testing.assert_close(hf_pixel_values(model, pixels, sizes), theirs, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert model.image_tokens(pixels, None, sizes).shape[0] == sum(slots)


def test_fuyu_layout_logits_equal_transformers_fuyu_on_its_processors_inputs() -> None:
    """Two rows, three images of different shapes: mm1 from its own pixels and slots, the HF
    model from its processor's patches and ids."""
    from mm1.data.images import ImageProcessor
    from mm1.data.layouts import FuyuFormat

    torch.manual_seed(0)
    cfg = _fuyu_layout(8)
    model = perturb(Fuyu(cfg))
    hf_cfg, tensors = fuyu_to_hf(model)
    theirs = transformers.FuyuForCausalLM(transformers.FuyuConfig(**hf_cfg)).eval()
    theirs.load_state_dict(tensors, strict=False)
    fmt = FuyuFormat(model.num_image_tokens, canvas=32, patch_size=8)
    images = [_noise_image(w, h, i) for i, (w, h) in enumerate([(50, 30), (9, 70), (40, 40)])]
    pixels = fmt.pixel_values(ImageProcessor.siglip(32), images)
    _, sizes = fmt.image_info(images)
    _, their_ids, their_patches = processor_reference(images)
    g = torch.Generator().manual_seed(5)
    text = [torch.randint(1, 90, (n,), generator=g) for n in (3, 4, 2, 5)]
    slot = [torch.full((fmt.slots(im),), model.image_token_id) for im in images]
    ours_rows = [
        torch.cat([text[0], slot[0], text[1], slot[1]]),
        torch.cat([text[2], slot[2], text[3]]),
    ]
    newline = image_newline_id(model)
    hf_img = [
        i.long().masked_fill(i == 9, newline).masked_fill(i == 7, model.image_token_id)
        for i in their_ids
    ]
    their_rows = [
        torch.cat([text[0], hf_img[0], text[1], hf_img[1]]),
        torch.cat([text[2], hf_img[2], text[3]]),
    ]
    length = max(len(r) for r in ours_rows)
    pad = lambda r: torch.cat([r, torch.ones(length - len(r), dtype=torch.long)])  # noqa: E731
    ids = torch.stack([pad(r) for r in ours_rows])
    hf_ids = torch.stack([pad(r) for r in their_rows])
    assert torch.equal(hf_input_ids(model, ids, sizes), hf_ids)
    with torch.no_grad():
        ours = model(ids, pixel_values=pixels, image_sizes=sizes).logits
        ref = theirs(input_ids=hf_ids, pixel_values=torch.cat(their_patches)[None]).logits
    torch.testing.assert_close(ours, ref[..., : cfg.decoder.vocab_size], rtol=1e-5, atol=1e-5)


def test_a_sliver_of_an_image_keeps_one_patch() -> None:
    from mm1.data.images import ImageProcessor
    from mm1.data.layouts import FuyuFormat
    from mm1.tiling import fuyu_fit, fuyu_grid

    assert fuyu_fit((1, 1000), 32) == (1, 32) and fuyu_grid((1, 1000), 32, 8) == (4, 1)
    assert fuyu_fit((1000, 1), 32) == (32, 1) and fuyu_grid((1000, 1), 32, 8) == (1, 4)
    assert fuyu_fit((33, 1), 32) == (32, 1) and fuyu_fit((1, 33), 32) == (1, 32)
    fmt = FuyuFormat(20, canvas=32, patch_size=8)
    image = _noise_image(1000, 1, 0)
    assert fmt.pixel_values(ImageProcessor.siglip(32), [image]).shape == (1, 3, 32, 32)
    assert fmt.slots(image) == 5


def test_fuyu_layout_needs_the_fuyu_family_and_sizes() -> None:
    cfg = _config()
    cfg.family, cfg.image_layout.type = "mm1", "fuyu"
    cfg.vision = VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64)
    cfg.connector = {"type": "avgpool", "num_tokens": 4}
    with pytest.raises(ConfigError, match="image_layout.type=fuyu: .*needs model.family=fuyu"):
        validate_model(cfg)
    model = Fuyu(_fuyu_layout())
    with pytest.raises(ValueError, match="fuyu layout needs image_sizes"):
        model.image_tokens(torch.zeros(1, 3, 32, 32))


def test_rices_warns_that_without_an_encoder_it_ranks_by_colour(caplog, tiny_model_config) -> None:
    from mm1.eval.demos import warn_if_rices_is_weak
    from mm1.models.mllm import MM1

    mm1_model, fuyu = MM1(tiny_model_config()), Fuyu(_config())

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "mm1.eval.demos"]

    with caplog.at_level("WARNING", logger="mm1.eval.demos"):
        warn_if_rices_is_weak(mm1_model, "rices")
        warn_if_rices_is_weak(fuyu, "random")
        assert not warned()
        warn_if_rices_is_weak(fuyu, "rices")
    assert len(warned()) == 1 and "model.family=fuyu has no image encoder" in warned()[0]


def test_flops_of_an_image_are_counted_on_the_canvas() -> None:
    """One crop of the fuyu layout is the whole canvas: a 32 x 64 canvas is twice the work of
    the 32 px square (`mm1 info`, MFU)."""
    from mm1.models.summary import summarize

    square, wide = _fuyu_layout(8), _fuyu_layout(8, [32, 64])
    assert summarize(wide).image_flops == 2 * summarize(square).image_flops > 0
    assert summarize(wide).image_tokens == 4 * (8 + 1)
