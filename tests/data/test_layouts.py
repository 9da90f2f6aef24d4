"""High-resolution layouts against their references: transformers' LLaVA-NeXT (PIL image
processor, token count, grid shape, unpadding) and InternVL's dynamic tiling (lmms-eval's copy);
and the data side's token count against what the model produces, for every layout."""

from __future__ import annotations

import ast
import importlib.util
import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mm1.config import ImageLayoutConfig, validate_model
from mm1.data.images import ImageProcessor, select_best_resolution
from mm1.data.layouts import AnyresFormat, DynamicFormat, MM1Format
from mm1.data.prompt_format import PromptFormat, load_prompt_format
from mm1.models.mllm import MM1

llava_next_pil = pytest.importorskip(
    "transformers.models.llava_next.image_processing_pil_llava_next"
)
llava_next_modeling = pytest.importorskip("transformers.models.llava_next.modeling_llava_next")
from transformers.image_processing_utils import select_best_resolution as hf_best  # noqa: E402
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor  # noqa: E402

CROP = 32
PINPOINTS_HW = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # transformers: (h, w)


def _noise(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return image if mode == "RGB" else image.convert(mode)


def _random_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = [(1, 1), (1, 400), (400, 1), (2, 3), (31, 32), (32, 32), (64, 32), (1, 4000)]
    while len(sizes) < n:
        aspect = math.exp(rng.uniform(-2.5, 2.5))
        area = rng.uniform(10, 200) ** 2
        sizes.append(
            (max(1, round(math.sqrt(area * aspect))), max(1, round(math.sqrt(area / aspect))))
        )
    return sizes


# -- select_best_resolution ------------------------------------------------------------------------


def test_select_best_resolution_is_transformers_with_width_height_pairs() -> None:
    rng = random.Random(1)
    for w, h in _random_sizes(300):
        cands = [(rng.randint(1, 8) * 16, rng.randint(1, 8) * 16) for _ in range(rng.randint(1, 9))]
        cands += cands[: rng.randint(0, 2)]  # duplicates: the first of equals wins
        expected_h, expected_w = hf_best((h, w), [(ch, cw) for cw, ch in cands])
        assert select_best_resolution((w, h), cands) == (expected_w, expected_h)


def test_select_best_resolution_ties_and_truncation() -> None:
    # equal effective resolution: the least waste wins, then the first
    assert select_best_resolution((100, 100), [(200, 100), (100, 100), (100, 200)]) == (100, 100)
    assert select_best_resolution((100, 100), [(200, 200), (300, 300)]) == (200, 200)
    # the downscaled size is truncated: 333 x (1000/3) -> 333 x 333, not 333 x 334
    assert select_best_resolution((1000, 1001), [(333, 334), (334, 333)]) == (333, 334)


# -- anyres: pixels, grid, tokens, unpadding against transformers ------------------------------------


def _hf_processor() -> object:
    return llava_next_pil.LlavaNextImageProcessorPil(
        size={"shortest_edge": CROP},
        crop_size={"height": CROP, "width": CROP},
        image_grid_pinpoints=PINPOINTS_HW,
    )


def _anyres(q: int = 16) -> AnyresFormat:
    return AnyresFormat(q, crop_size=CROP, pinpoints=[[w, h] for h, w in PINPOINTS_HW])


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "RGBA", "LA"])
def test_anyres_pixels_equal_llava_next_pil_processor(mode: str) -> None:
    hf, fmt, ours = _hf_processor(), _anyres(), ImageProcessor.clip(CROP)
    for i, (w, h) in enumerate(_random_sizes(14 if mode == "RGB" else 5, seed=2)):
        image = _noise(w, h, seed=i, mode=mode)
        if mode == "RGBA":
            image.putalpha(Image.fromarray(np.full((h, w), 7 * i % 256, dtype=np.uint8)))
        expected = hf(image, return_tensors="np")
        got = fmt.pixel_values(ours, [image])
        assert got.shape[0] == fmt.crops(image) == expected["pixel_values"].shape[1], (w, h)
        assert np.array_equal(got.numpy(), expected["pixel_values"][0]), (mode, w, h)
        crops, sizes = fmt.image_info([image])
        assert sizes.tolist() == expected["image_sizes"].tolist()
        assert int(crops[0]) == llava_next_modeling.image_size_to_num_patches(
            (h, w), PINPOINTS_HW, CROP
        )


def test_anyres_token_count_is_the_llava_next_processors() -> None:
    fmt = _anyres(q=16)  # a 4 x 4 feature grid per crop: patch size 8 on 32 px crops
    proc = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=PINPOINTS_HW),
        patch_size=CROP // 4,
        num_additional_image_tokens=0,
    )
    proc._get_unpadded_features = LlavaNextProcessor._get_unpadded_features.__get__(proc)
    for w, h in _random_sizes(300, seed=3):
        expected = LlavaNextProcessor._get_number_of_features(proc, h, w, CROP, CROP)
        assert fmt.slots_for_size((w, h)) == expected, (w, h)
        rows, cols = fmt.grid_for_size((w, h))
        assert (rows, cols) == llava_next_modeling.get_anyres_image_grid_shape(
            (h, w), PINPOINTS_HW, CROP
        )


def _model(connector: str, layout: ImageLayoutConfig, tiny_model_config) -> MM1:
    cfg = tiny_model_config(connector)
    cfg.image_layout = layout
    validate_model(cfg)
    torch.manual_seed(0)
    return MM1(cfg).eval()


def test_anyres_features_are_llava_next_packing(tiny_model_config) -> None:
    """The model's assembly (grid, unpadding, newlines, base first) is transformers'
    `pack_image_features` on the same per-crop features."""
    layout = ImageLayoutConfig(type="anyres", pinpoints=[[w, h] for h, w in PINPOINTS_HW])
    model = _model("mlp", layout, tiny_model_config)
    hf_self = SimpleNamespace(
        config=SimpleNamespace(
            vision_config=SimpleNamespace(image_size=CROP, patch_size=8),
            image_grid_pinpoints=PINPOINTS_HW,
        )
    )
    fmt = AnyresFormat(model.num_image_tokens, crop_size=CROP, pinpoints=layout.pinpoints)
    processor = ImageProcessor.clip(CROP)
    images = [_noise(w, h, seed=i) for i, (w, h) in enumerate(_random_sizes(12, seed=4))]
    pixels = fmt.pixel_values(processor, images)
    crops, sizes = fmt.image_info(images)
    with torch.no_grad():
        ours = model.image_tokens(pixels, crops, sizes)
        feats = model.image_features(pixels)
        theirs, lens = llava_next_modeling.LlavaNextModel.pack_image_features(
            hf_self, feats.split(crops.tolist()), sizes, "default", model.image_newline
        )
    assert torch.equal(ours, torch.cat(theirs))
    assert lens.tolist() == [fmt.slots(im) for im in images]


def test_unpadding_is_transformers_unpad_image() -> None:
    from mm1.tiling import unpadded_rows_cols

    for w, h in _random_sizes(200, seed=5):
        for rows, cols in ((8, 16), (16, 8), (12, 12), (4, 20)):
            grid = torch.arange(rows * cols).reshape(1, rows, cols)
            r0, r1, c0, c1 = unpadded_rows_cols((w, h), rows, cols)
            expected = llava_next_modeling.unpad_image(grid, (h, w))
            assert torch.equal(grid[:, r0:r1, c0:c1], expected), (w, h, rows, cols)


# -- mm1 and dynamic -------------------------------------------------------------------------------


def test_mm1_layout_of_a_1344_px_image_is_720_tokens_at_q144() -> None:
    fmt = MM1Format(144, crop_size=672)
    image = _noise(1344, 1344)
    assert fmt.slots(image) == 720 and fmt.crops(image) == 5
    pieces = fmt.crop(image, ImageProcessor.clip(672))
    assert [p.size for p in pieces] == [(672, 672)] * 5
    # the overview is the plain (single) view; the crops are the 2x view's quarters, row-major
    proc = ImageProcessor.clip(672)
    assert np.array_equal(np.asarray(pieces[0]), proc.resized_pixels(image).transpose(1, 2, 0))
    big = proc.scaled(2).resized_pixels(image).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(pieces[2]), big[:672, 672:])  # top right
    assert np.array_equal(np.asarray(pieces[3]), big[672:, :672])  # bottom left


def _internvl() -> dict:
    """InternVL's `find_closest_aspect_ratio` / `dynamic_preprocess`, as lmms-eval ships them
    (its module imports torchvision, which does not import beside our torch: read the two
    functions out of the file)."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or spec.origin is None:
        pytest.skip("lmms-eval is not installed")
    path = Path(spec.origin).parent / "models" / "simple" / "internvideo2_5.py"
    tree = ast.parse(path.read_text())
    wanted = {"find_closest_aspect_ratio", "dynamic_preprocess"}
    module = ast.Module([n for n in tree.body if getattr(n, "name", "") in wanted], [])
    namespace: dict = {}
    exec(compile(module, str(path), "exec"), namespace)
    return namespace


def test_dynamic_tiles_are_internvl_including_ties() -> None:
    ref = _internvl()
    processor = ImageProcessor.clip(CROP)
    sizes = [*_random_sizes(40, seed=6), (40, 32), (48, 32), (80, 48), (5, 3), (100, 60)]
    for min_tiles, max_tiles in ((1, 6), (1, 12), (2, 4), (3, 3)):
        for i, (w, h) in enumerate(sizes):
            fmt = DynamicFormat(4, crop_size=CROP, min_tiles=min_tiles, max_tiles=max_tiles)
            image = _noise(w, h, seed=i)
            expected = ref["dynamic_preprocess"](image, min_tiles, max_tiles, CROP, True)
            pieces = fmt.crop(image, processor)
            assert len(pieces) == len(expected) == fmt.crops(image), (w, h, max_tiles)
            for got, want in zip(pieces, expected):
                assert np.array_equal(np.asarray(got), np.asarray(want)), (w, h)
    first = DynamicFormat(4, crop_size=CROP, overview="first")
    wide = _noise(64, 32)
    assert np.array_equal(
        np.asarray(first.crop(wide, processor)[0]), np.asarray(wide.resize((CROP, CROP)))
    )


# -- data side == model side -----------------------------------------------------------------------

LAYOUTS = [
    ImageLayoutConfig(type="single"),
    ImageLayoutConfig(type="mm1"),
    ImageLayoutConfig(type="anyres"),
    ImageLayoutConfig(type="anyres", grid=[1, 3]),
    ImageLayoutConfig(type="dynamic", max_tiles=4, overview="first"),
]


@pytest.mark.parametrize("connector", ["mlp", "avgpool"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"{lay.type}{lay.grid or ''}")
def test_data_side_token_count_is_what_the_model_produces(
    connector: str, layout: ImageLayoutConfig, tiny_model_config
) -> None:
    model = _model(connector, layout, tiny_model_config)
    data = SimpleNamespace(image_boundaries=False)
    fmt = PromptFormat.from_config(data, model.num_image_tokens, model.cfg)  # type: ignore[arg-type]
    assert fmt.layout == layout.type
    processor = ImageProcessor.clip(CROP)
    sizes = _random_sizes(16, seed=sum(map(ord, layout.type)))  # fixed, unlike hash(str)
    images = [
        _noise(w, h, seed=i, mode="L" if i % 5 == 0 else "RGB") for i, (w, h) in enumerate(sizes)
    ]
    high_res = [i % 4 != 1 for i in range(len(images))]  # some in the single form
    pixels = fmt.pixel_values(processor, images, high_res)
    crops, image_sizes = fmt.image_info(images, high_res)
    with torch.no_grad():
        tokens = model.image_tokens(pixels, crops, image_sizes)
    expected = [fmt.slots(im, hi) for im, hi in zip(images, high_res)]
    assert tokens.shape[0] == sum(expected)
    assert model.image_token_counts(crops, image_sizes) == expected
    # written into a prompt: the model consumes exactly the slots the data side wrote
    ids = torch.tensor([[1, *[model.image_token_id] * sum(expected), 2]])
    assert (
        model(ids, pixel_values=pixels, image_crops=crops, image_sizes=image_sizes).logits.shape[1]
        == ids.shape[1]
    )


def test_prompt_format_files_keep_the_layout(tmp_path: Path) -> None:
    for fmt in (
        _anyres(4),
        AnyresFormat(4, crop_size=CROP, grid=[1, 2]),
        DynamicFormat(4, crop_size=CROP, min_tiles=2, max_tiles=9, overview="first"),
        MM1Format(4, image_boundaries=True, crop_size=CROP),
    ):
        fmt.save(tmp_path)
        assert load_prompt_format(tmp_path, 4) == fmt


def test_a_layout_that_cannot_fit_seq_len_is_a_config_error(tiny_model_config) -> None:
    from mm1.config import Config, ConfigError, validate

    cfg = Config()
    cfg.model = tiny_model_config("avgpool")
    cfg.model.image_layout = ImageLayoutConfig(type="dynamic", max_tiles=12)
    cfg.data.seq_len = 40
    with pytest.raises(ConfigError, match=r"data.seq_len=40 .*model.image_layout"):
        validate(cfg)
    cfg.model.image_layout = ImageLayoutConfig(type="anyres", pinpoints=[[48, 32]])
    with pytest.raises(ConfigError, match=r"model.image_layout.pinpoints\[0\]"):
        validate_model(cfg.model)
    cfg.model = tiny_model_config("linear")
    cfg.model.connector.num_tokens = 0
    cfg.model.image_layout = ImageLayoutConfig(type="anyres", grid=[2, 1])
    with pytest.raises(ConfigError, match=r"model.image_layout.grid"):
        validate_model(cfg.model)
