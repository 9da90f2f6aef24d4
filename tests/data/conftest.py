"""What the data tests share, built as fixtures: the tiny synthetic world and its tokenizer
(once per module), and small BPE tokenizers trained on a fixed corpus, laid out like Llama's
and Qwen2's."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from mm1.data.synthetic import WorldManifest
from mm1.data.tokenizer import Tokenizer

CORPUS = [
    "A cat sits on a red mat.",
    "Two dogs play in the snow, and one dog barks!",
    "User: what is in the picture? Assistant: a small blue cube.",
    "The quick brown fox jumps over the lazy dog 42 times.",
    "Question: what colour is the ball? Short answer: green",
] * 4
ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?:'")


def _llama_like(d: Path) -> Path:
    """SentencePiece-style BPE (Metaspace) with <unk>/<s>/</s> and a tokenizer_config.json."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=150,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=ALPHABET,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    bos = {"content": "<s>", "lstrip": False, "normalized": False, "special": True}
    cfg = {"bos_token": bos, "eos_token": "</s>", "pad_token": None, "add_bos_token": True}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def _qwen_like(d: Path, config: bool = True) -> Path:
    """Byte-level BPE without BOS; <|endoftext|> is EOS and pad, as in Qwen2."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    if config:
        cfg = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="session")
def llama_like() -> Callable[[Path], Path]:
    """`llama_like(dir)`: writes a Llama-style tokenizer directory at `dir` (which must not exist)."""
    return _llama_like


@pytest.fixture(scope="session")
def qwen_like() -> Callable[..., Path]:
    """`qwen_like(dir, config=True)`: writes a Qwen2-style tokenizer directory at `dir`."""
    return _qwen_like


@pytest.fixture(scope="module")
def world(tmp_path_factory, world_copy) -> WorldManifest:
    """The tiny synthetic world (seed 0), a copy for each test module."""
    return WorldManifest.load(world_copy(tmp_path_factory.mktemp("world")))


@pytest.fixture(scope="module")
def tok(world: WorldManifest) -> Tokenizer:
    return Tokenizer.from_file(world.tokenizer_path)
