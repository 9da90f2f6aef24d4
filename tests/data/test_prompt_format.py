"""PromptFormat: one object for image slots, image boundaries and the chat template; saved with
runs and exports, read back from older layouts, and followed by tokenization, the loader, the
image processor and the model."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from mm1.config import (
    ConnectorConfig,
    DataConfig,
    DecoderConfig,
    ModelConfig,
    SourceConfig,
    VisionConfig,
)
from mm1.data.document import Conversation, Document
from mm1.data.images import ImageProcessor
from mm1.data.loader import LoaderSettings, PackedDataset
from mm1.data.prompt_format import (
    LAYOUTS,
    PROMPT_FORMAT,
    PromptFormat,
    load_prompt_format,
    register_layout,
)
from mm1.data.synthetic import train_world_tokenizer
from mm1.data.tokenizer import (
    Tokenizer,
    tokenize_chat_prompt,
    tokenize_conversation,
    tokenize_document,
    tokenize_prompt,
)
from mm1.models.mllm import MM1
from mm1.pretrained import load_pretrained, save_pretrained

Q = 4
TEXTS = ["a red cube on a blue floor", "two green spheres", "what colour is the cube?"] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(train_world_tokenizer(TEXTS, vocab_size=300), "</s>", "<s>")


def tiny_model(tok: Tokenizer) -> MM1:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=VisionConfig(
            image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32, act="gelu"
        ),
        connector=ConnectorConfig(type="avgpool", num_tokens=Q),
        decoder=DecoderConfig(
            vocab_size=tok.vocab_size, dim=16, layers=1, heads=2, kv_heads=1, ffn_dim=32
        ),
        image_token_id=tok.image_id,
    )
    return MM1(cfg)


@register_layout
class WideTwoCrops(PromptFormat):
    """A test layout: an image wider than tall is two crops (its halves), others one."""

    layout = "test_wide_two_crops"

    def crops_for_size(self, size: tuple[int, int]) -> int:
        return 2 if size[0] > size[1] else 1

    def crop(
        self, image: Image.Image, processor: object = None, high_res: bool = True
    ) -> list[Image.Image]:
        if self.crops(image, high_res) == 1:
            return [image]
        w, h = image.size
        return [image.crop((0, 0, w // 2, h)), image.crop((w // 2, 0, w, h))]


# -- files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt",
    [
        PromptFormat(Q),
        PromptFormat(7, image_boundaries=True),
        PromptFormat(Q, True, "vicuna_v1"),
        PromptFormat(Q, False, "{% for m in messages %}{{ m['content'] }}{% endfor %}"),
        WideTwoCrops(Q, True),
    ],
)
def test_format_round_trips_through_its_file(tmp_path: Path, fmt: PromptFormat) -> None:
    fmt.save(tmp_path)
    saved = json.loads((tmp_path / PROMPT_FORMAT).read_text())
    assert saved["version"] == 2 and saved["image_layout"] == fmt.layout
    back = load_prompt_format(tmp_path, fmt.image_tokens)
    assert back == fmt and type(back) is type(fmt)


def test_old_layouts_load_with_the_same_format(tmp_path: Path) -> None:
    # version 1: {"image_boundaries": bool}; Q comes from the model
    (tmp_path / PROMPT_FORMAT).write_text('{"image_boundaries": true}\n')
    assert load_prompt_format(tmp_path, Q) == PromptFormat(Q, image_boundaries=True)
    # before prompt_format.json: a run's tokenizer/ reads <run>/config.yaml, an export has none
    run_tok = tmp_path / "run" / "tokenizer"
    run_tok.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("data:\n  image_boundaries: true\n")
    assert load_prompt_format(run_tok, Q) == PromptFormat(Q, image_boundaries=True)
    (tmp_path / "run" / "config.yaml").write_text("data:\n  seq_len: 64\n")
    assert load_prompt_format(run_tok, Q) == PromptFormat(Q)
    export = tmp_path / "export"
    export.mkdir()
    assert load_prompt_format(export, Q) == PromptFormat(Q)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ({"image_tokens": 9}, "image_tokens 9 but the model fills 4"),
        ({"image_layout": "mosaic"}, "unknown image_layout 'mosaic'"),
        ({"image_layout": "anyres", "image_tokens": 4}, "anyres layout needs crop_size"),
        ({"version": 3}, "version 3 is newer"),
        ({"image_slots": 4}, r"unknown keys \['image_slots'\]"),
        ({"chat_template": 3}, "chat_template must be a string"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path: Path, content: dict, error: str) -> None:
    (tmp_path / PROMPT_FORMAT).write_text(json.dumps(content))
    with pytest.raises(ValueError, match=error):
        load_prompt_format(tmp_path, Q)


def test_format_from_config() -> None:
    data = DataConfig(image_boundaries=True, chat_template="chatml")
    # the template is set on the tokenizer (saved in tokenizer_config.json): the format refers
    assert PromptFormat.from_config(data, 9) == PromptFormat(9, True, None)
    with pytest.raises(ValueError, match="image_tokens must be positive"):
        PromptFormat(0)


def test_export_saves_the_format_whole_and_older_exports_load(
    tmp_path: Path, tok: Tokenizer
) -> None:
    model = tiny_model(tok)
    fmt = PromptFormat(Q, image_boundaries=True, chat_template="vicuna_v1")
    out = save_pretrained(model, tok, ImageProcessor.clip(16), tmp_path / "export", fmt)
    loaded = load_pretrained(out)
    assert loaded.prompt_format == fmt and loaded.image_boundaries
    # an export written before the format held more than the boundaries bool
    (out / PROMPT_FORMAT).write_text('{"image_boundaries": true}\n')
    assert load_pretrained(out).prompt_format == PromptFormat(Q, image_boundaries=True)
    (out / PROMPT_FORMAT).unlink()  # and before prompt_format.json existed
    assert load_pretrained(out).prompt_format == PromptFormat(Q)
    # the default is the model's own slot count; a format for another Q is refused
    plain = save_pretrained(model, tok, ImageProcessor.clip(16), out)
    assert load_pretrained(plain).prompt_format == PromptFormat(Q)
    with pytest.raises(ValueError, match="writes 5 slots per image but the model fills 4"):
        save_pretrained(model, tok, ImageProcessor.clip(16), out, PromptFormat(5))


# -- tokens ----------------------------------------------------------------------------------------


def test_chat_prompt_is_the_template_with_its_generation_prompt(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "what colour is the cube?"}]
    for template in ("plain", "vicuna_v1"):
        fmt = PromptFormat(Q, chat_template=template)
        ids = tokenize_chat_prompt(messages, [], tok, fmt)
        rendered = tok.apply_chat_template(messages, True, chat_template=template)
        assert ids == [tok.bos_id, *rendered]
    # the prompt is what a conversation's ids hold before the assistant's answer
    conv = Conversation("c", [], [*messages, {"role": "assistant", "content": "red"}])
    fmt = PromptFormat(Q, chat_template="vicuna_v1")
    full = tokenize_conversation(conv, tok, fmt)
    prompt = tokenize_chat_prompt(messages, [], tok, fmt)
    first_target = full.target_mask.index(True)
    assert full.input_ids[:first_target] == prompt[:first_target]
    # images: the format's slots, between boundaries when it has them
    image = Image.new("RGB", (8, 8))
    user = [{"role": "user", "content": "<image>\nwhat colour?"}]
    ids = tokenize_chat_prompt(user, [image], tok, replace(fmt, image_boundaries=True))
    start = ids.index(tok.boi_id)
    assert ids[start : start + Q + 2] == [tok.boi_id, *[tok.image_id] * Q, tok.eoi_id]
    with pytest.raises(ValueError, match="1 <image> tags but 0 images"):
        tokenize_chat_prompt(user, [], tok, fmt)


def test_a_layout_with_more_crops_flows_to_the_model(
    tmp_path: Path, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fmt = WideTwoCrops(Q, image_boundaries=True)
    wide, square = Image.new("RGB", (32, 16), "red"), Image.new("RGB", (16, 16), "blue")
    doc = tokenize_document(Document("d", "interleaved", [wide, "a red cube", square]), tok, fmt)
    assert [e - s for s, e in doc.image_spans] == [2 * Q + 2, Q + 2]
    assert tokenize_prompt("<image>a<image>", [wide, square], tok, fmt).count(tok.image_id) == 3 * Q

    # a wds shard of wide and square images through the loader: tokenize, pack, crop, collate
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            image = Image.new("RGB", (32 if i % 2 else 16, 16), (40 * i, 0, 0))
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            for name, data in ((f"{i:03d}.png", buf.getvalue()), (f"{i:03d}.txt", b"a cube")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    settings = LoaderSettings(
        [SourceConfig(format="wds", path=str(shard))],
        seq_len=64,
        micro_batch_size=2,
        prompt_format=fmt,
    )
    model = tiny_model(tok)
    processor = ImageProcessor.clip(16)
    batch = next(iter(PackedDataset(settings, tok, processor)))
    slots = int((batch.input_ids == tok.image_id).sum())
    assert batch.pixel_values is not None and slots == batch.pixel_values.shape[0] * Q
    assert batch.pixel_values.shape[0] > int((batch.input_ids == tok.boi_id).sum())  # 2 crops
    out = model(batch.input_ids, batch.labels, batch.position_ids, batch.document_ids,
                batch.pixel_values)  # fmt: skip
    assert torch.isfinite(out.loss)
    # a processor that does not crop as the format writes is caught where pixels are made
    monkeypatch.setattr(WideTwoCrops, "crop", lambda self, image, *args: [image])
    with pytest.raises(ValueError, match="gave 2 crops for 2 images; .* writes slots for 3"):
        fmt.pixel_values(processor, [wide, square])
    assert LAYOUTS[fmt.layout] is WideTwoCrops
