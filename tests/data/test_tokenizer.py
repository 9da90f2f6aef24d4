"""Tokenizer wrapper, image placeholders, target masks and chat templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from PIL import Image
from tokenizers import models

from mm1.data.document import Conversation, Document
from mm1.data.prompt_format import PromptFormat
from mm1.data.tokenizer import (
    BOI_TOKEN,
    ENDOFCHUNK_TOKEN,
    EOI_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    PAD_TOKEN,
    Tokenizer,
    tokenize_conversation,
    tokenize_document,
    tokenize_prompt,
)

TEXTS = [
    "A cat sits on a red mat.",
    "  two   spaces and UPPER case, digits 1234 and unseen zqxj!",
    "Output: a dog.<|endofchunk|>",
    "",
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory, llama_like, qwen_like) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {"llama": llama_like(root / "llama"), "qwen": qwen_like(root / "qwen")}


@pytest.fixture(scope="module")
def llama(dirs: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_file(dirs["llama"])


@pytest.fixture(scope="module")
def qwen(dirs: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_file(dirs["qwen"])


def _image() -> Image.Image:
    return Image.new("RGB", (8, 8), (255, 0, 0))


# -- the tokenizer --------------------------------------------------------------------------------


def test_special_tokens_added_once_and_image_last(dirs: dict[str, Path]) -> None:
    for name, added in (("llama", 5), ("qwen", 4)):  # qwen already has a pad token
        base = tokenizers.Tokenizer.from_file(str(dirs[name] / "tokenizer.json"))
        tok = Tokenizer.from_file(dirs[name])
        assert tok.vocab_size == base.get_vocab_size(with_added_tokens=True) + added
        assert len(tok) == tok.vocab_size
        assert tok.image_id == tok.vocab_size - 1  # ModelConfig.image_token_id = -1 relies on it
        specials = [IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN, ENDOFCHUNK_TOKEN]
        ids = [tok.image_id, tok.boi_id, tok.eoi_id, tok.endofchunk_id, tok.eos_id]
        assert len(set(ids)) == len(ids)
        assert tok.pad_id not in ids[:4]
        assert [tok.token_to_id(s) for s in specials] == ids[:4]
        # The wrapped tokenizers.Tokenizer was copied, not changed.
        assert base.token_to_id(IMAGE_TOKEN) is None
        # The ids new to the wrapped tokenizer (a checkpoint has no trained rows for them).
        base_size = base.get_vocab_size(with_added_tokens=True)
        assert sorted(tok.added_ids) == list(range(base_size, base_size + added))


def test_bos_eos_pad_resolution(llama: Tokenizer, qwen: Tokenizer) -> None:
    assert (llama.bos_token, llama.eos_token, llama.pad_token) == ("<s>", "</s>", PAD_TOKEN)
    assert llama.bos_id == 1 and llama.eos_id == 2
    assert qwen.bos_token is None and qwen.bos_id is None
    assert qwen.eos_token == qwen.pad_token == "<|endoftext|>"
    assert qwen.pad_id == qwen.eos_id == 0


def test_names_guessed_without_config_and_missing_eos(tmp_path: Path, qwen_like) -> None:
    bare = Tokenizer.from_file(qwen_like(tmp_path / "bare", config=False) / "tokenizer.json")
    assert bare.bos_id is None and bare.eos_token == "<|endoftext|>"
    assert bare.pad_token == PAD_TOKEN
    # special_tokens_map.json is read too.
    d = qwen_like(tmp_path / "map", config=False)
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    assert Tokenizer.from_file(d).eos_token == "<|im_end|>"
    # No config and no usual EOS name: a clear error.
    tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="no EOS token"):
        Tokenizer(tok, eos_token=None)
    with pytest.raises(ValueError, match="'</s>' is not in the tokenizer's vocabulary"):
        Tokenizer(tok, eos_token="</s>")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_file(tmp_path / "nowhere")


def test_save_load_keeps_ids(tmp_path: Path, llama: Tokenizer, qwen: Tokenizer) -> None:
    for name, tok in (("llama", llama), ("qwen", qwen)):
        tok.save(tmp_path / name)
        again = Tokenizer.from_file(tmp_path / name)
        for attr in ("vocab_size", "bos_id", "eos_id", "pad_id", "image_id", "boi_id", "eoi_id"):
            assert getattr(again, attr) == getattr(tok, attr), attr
        assert again.endofchunk_id == tok.endofchunk_id
        assert again.added_ids == ()  # saved with mm1's specials: nothing new
        assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
        saved = json.loads((tmp_path / name / "mm1_tokenizer.json").read_text())
        assert saved["image_token"] == IMAGE_TOKEN and saved["eos_token"] == tok.eos_token


def test_encode_decode_round_trip(llama: Tokenizer, qwen: Tokenizer) -> None:
    text = "A cat sits on a red mat."
    for tok in (llama, qwen):
        ids = tok.encode(text)
        assert ids and tok.bos_id not in ids and tok.eos_id not in ids  # nothing added
        assert tok.decode(ids) == text
    # Special tokens written in text become their id; decode skips them unless asked not to.
    ids = qwen.encode("Output: a dog.<|endofchunk|>")
    assert ids[-1] == qwen.endofchunk_id
    assert qwen.decode(ids) == "Output: a dog."
    assert qwen.decode(ids, skip_special_tokens=False) == "Output: a dog.<|endofchunk|>"
    with pytest.raises(ValueError, match="tokenize_document"):
        qwen.encode("look: <image>")


def test_encode_equals_transformers(tmp_path: Path, dirs: dict[str, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    for name in ("llama", "qwen"):
        file = str(dirs[name] / "tokenizer.json")
        ours = Tokenizer.from_file(dirs[name])
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=file)
        for text in TEXTS[:2]:
            assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
        # Our saved tokenizer (added tokens included) loads in transformers with the same ids.
        ours.save(tmp_path / name)
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / name))
        assert len(hf) == ours.vocab_size
        assert (hf.eos_token_id, hf.pad_token_id) == (ours.eos_id, ours.pad_id)
        assert hf.bos_token_id == ours.bos_id
        assert hf.convert_tokens_to_ids(IMAGE_TOKEN) == ours.image_id
        for text in TEXTS:
            ids = ours.encode(text)
            assert ids == hf.encode(text, add_special_tokens=False)
            assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


# -- documents ----------------------------------------------------------------------------------


def test_text_document_is_bos_text_eos(llama: Tokenizer, qwen: Tokenizer) -> None:
    text = "The quick brown fox."
    doc = Document("t1", "text", [text])
    out = tokenize_document(doc, llama, PromptFormat(4))
    assert out.input_ids == [llama.bos_id, *llama.encode(text), llama.eos_id]
    assert out.target_mask == [False] + [True] * (len(out) - 1)
    assert (out.id, out.kind, out.images, out.image_spans) == ("t1", "text", [], [])
    # Qwen2-like: no BOS, nothing inserted; add_bos / add_eos switch them off.
    out = tokenize_document(doc, qwen, PromptFormat(4))
    assert out.input_ids == [*qwen.encode(text), qwen.eos_id]
    out = tokenize_document(doc, llama, PromptFormat(4), add_bos=False, add_eos=False)
    assert out.input_ids == llama.encode(text)


@pytest.mark.parametrize("boundaries", [False, True])
def test_image_slots_spans_and_masks(llama: Tokenizer, boundaries: bool) -> None:
    q = 5
    images = [_image(), Image.new("RGB", (4, 4))]
    parts = ["Intro text.", images[0], "A cat sits.", images[1]]
    out = tokenize_document(Document("d", "interleaved", parts), llama, PromptFormat(q, boundaries))
    assert out.images == images
    assert out.input_ids.count(llama.image_id) == 2 * q
    assert len(out.image_spans) == 2
    assert len(out.input_ids) == len(out.target_mask)
    for start, end in out.image_spans:
        block = out.input_ids[start:end]
        masks = out.target_mask[start:end]
        if boundaries:
            assert block == [llama.boi_id] + [llama.image_id] * q + [llama.eoi_id]
            assert masks == [True] + [False] * q + [False]  # <img> target, </img> not
        else:
            assert block == [llama.image_id] * q
            assert masks == [False] * q
    # Image slots are never targets, anywhere.
    assert not any(m for i, m in zip(out.input_ids, out.target_mask) if i == llama.image_id)
    # The text between the two images is the text part; the document ends image, EOS.
    first_end, second_start = out.image_spans[0][1], out.image_spans[1][0]
    assert llama.decode(out.input_ids[first_end:second_start]) == "A cat sits."
    assert out.input_ids[-1] == llama.eos_id and out.image_spans[1][1] == len(out) - 1
    assert out.input_ids[0] == llama.bos_id


@pytest.mark.parametrize("boundaries", [False, True])
def test_generation_prompt_writes_images_as_training_does(
    llama: Tokenizer, boundaries: bool
) -> None:
    image = _image()
    prompt = tokenize_prompt("<image>A cat", [image], llama, PromptFormat(3, boundaries))
    doc = tokenize_document(
        Document("d", "captions", [image, "A cat"]), llama, PromptFormat(3, boundaries)
    )
    assert prompt == doc.input_ids[:-1]  # the training document without its EOS


def test_labels_shift(qwen: Tokenizer) -> None:
    out = tokenize_document(
        Document("c", "captions", [_image(), "a red cube"]), qwen, PromptFormat(3, True)
    )
    labels = out.labels()
    assert len(labels) == len(out)
    for t in range(len(out) - 1):
        want = out.input_ids[t + 1] if out.target_mask[t + 1] else IGNORE_INDEX
        assert labels[t] == want
    assert labels[-1] == IGNORE_INDEX
    # No BOS: position 0 is <img>, which predicts the first image slot -> ignored; the last slot
    # predicts </img> -> ignored; </img> predicts the first caption token.
    start, end = out.image_spans[0]
    assert (start, end) == (0, 5)
    assert labels[: end - 1] == [IGNORE_INDEX] * (end - 1)
    assert labels[end - 1] == qwen.encode("a red cube")[0]
    assert labels[-2] == qwen.eos_id


def test_document_with_literal_image_tag_is_refused(llama: Tokenizer) -> None:
    doc = Document("web-7", "interleaved", ["see <image> here", _image()])
    with pytest.raises(ValueError, match=r"web-7.*literal '<image>'"):
        tokenize_document(doc, llama, PromptFormat(4))


# -- conversations ------------------------------------------------------------------------------


def _conv(images: int = 1) -> Conversation:
    return Conversation(
        id="sft-1",
        images=[_image() for _ in range(images)],
        messages=[
            {"role": "user", "content": "<image>\nWhat is in the picture?"},
            {"role": "assistant", "content": "A small blue cube."},
            {"role": "user", "content": "What colour is the ball?"},
            {"role": "assistant", "content": "green"},
        ],
    )


@pytest.mark.parametrize("template", ["plain", "vicuna_v1"])
@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_conversation_targets_are_assistant_turns(
    which: str, template: str, request: pytest.FixtureRequest
) -> None:
    qwen = request.getfixturevalue(which)
    out = tokenize_conversation(_conv(), qwen, PromptFormat(3, chat_template=template))
    targets = [i for i, m in zip(out.input_ids, out.target_mask) if m]
    others = [i for i, m in zip(out.input_ids, out.target_mask) if not m]
    assert targets.count(qwen.eos_id) == 2  # the EOS ending each assistant turn
    assert " ".join(qwen.decode(targets).split()) == "A small blue cube. green"
    assert "cube" not in qwen.decode(others) and "picture" in qwen.decode(others)
    assert out.input_ids.count(qwen.image_id) == 3 and len(out.image_spans) == 1
    assert out.input_ids[-1] == qwen.eos_id and out.target_mask[-1]
    assert out.kind == "sft" and out.id == "sft-1"


def test_conversation_text_follows_the_template(qwen: Tokenizer, llama: Tokenizer) -> None:
    conv = _conv(images=0)
    conv.messages[0]["content"] = "What is in the picture?"
    out = tokenize_conversation(conv, qwen, PromptFormat(3, chat_template="vicuna_v1"))
    system = (
        "A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions."
    )
    text = (
        f"{system} USER: What is in the picture? ASSISTANT: A small blue cube.<|endoftext|>"
        "USER: What colour is the ball? ASSISTANT: green<|endoftext|>"
    )
    assert qwen.decode(out.input_ids, skip_special_tokens=False) == text
    # One encode call of the whole text, as an HF pipeline would tokenize it.
    assert out.input_ids == qwen.encode(text)
    plain = tokenize_conversation(conv, llama, PromptFormat(3, chat_template="plain"))
    assert plain.input_ids[0] == llama.bos_id
    plain_text = (
        "User: What is in the picture?\nAssistant: A small blue cube.</s>"
        "User: What colour is the ball?\nAssistant: green</s>"
    )
    assert plain.input_ids[1:] == llama.encode(plain_text)
    # The generation prompt ends at "Assistant:"; the answer (with its space) is the target.
    prompt = qwen.encode("User: What is in the picture?\nAssistant:")
    out = tokenize_conversation(conv, qwen, PromptFormat(3))
    assert out.input_ids[: len(prompt)] == prompt
    assert not any(out.target_mask[: len(prompt)]) and out.target_mask[len(prompt)]
    # A system message replaces the template's default; custom templates work.
    conv.messages.insert(0, {"role": "system", "content": "Be brief."})
    custom = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n' }}"
        "{% elif m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\n' }}"
        "{% else %}{{ 'A:' + m['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
    )
    out = tokenize_conversation(conv, qwen, PromptFormat(3, chat_template=custom))
    assert qwen.decode(out.input_ids, skip_special_tokens=False).startswith("Be brief.\nQ: What")


def test_conversation_image_boundaries_not_targets_in_user_turn(qwen: Tokenizer) -> None:
    out = tokenize_conversation(_conv(), qwen, PromptFormat(2, image_boundaries=True))
    start, end = out.image_spans[0]
    assert out.input_ids[start:end] == [qwen.boi_id, qwen.image_id, qwen.image_id, qwen.eoi_id]
    assert out.target_mask[start:end] == [False] * 4


def test_conversation_errors(qwen: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"'sft-1': 1 <image> tags in the messages but 2 images"):
        tokenize_conversation(_conv(images=2), qwen, PromptFormat(3))
    with pytest.raises(ValueError, match=r"'sft-1': 1 <image> tags .* but 0 images"):
        tokenize_conversation(_conv(images=0), qwen, PromptFormat(3))
    with pytest.raises(ValueError, match="unknown chat template 'zephyr'"):
        tokenize_conversation(_conv(), qwen, PromptFormat(3, chat_template="zephyr"))
    conv = _conv()
    conv.messages[1]["role"] = "robot"
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        tokenize_conversation(conv, qwen, PromptFormat(3))
    conv.messages = conv.messages[:1]
    with pytest.raises(ValueError, match="no assistant turn"):
        tokenize_conversation(conv, qwen, PromptFormat(3))
