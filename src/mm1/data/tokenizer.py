"""Tokenizer with image placeholders, and the tokenization of documents and conversations.

`Tokenizer` wraps a `tokenizers.Tokenizer` loaded from any HF `tokenizer.json` and adds the
special tokens mm1 needs when they are missing, in this order (so that a fresh `<image>` lands on
the last id, which is what `ModelConfig.image_token_id = -1` assumes):
`<pad>` (only when there is no pad token), `<|endofchunk|>` (OpenFlamingo's few-shot separator),
`<img>`, `</img>` (optional begin/end-of-image markers), `<image>` (the placeholder of one image
slot). Saving and loading keeps every id.

Tokenization builds ONE string per sample, with `<image>` where each image goes, and encodes it in
one call: this is exactly what HF processors do (`tokenizer(prompt_with_<image>)`), so the text
tokens around images are the ones an HF pipeline would give. Each `<image>` token is then
expanded to `num_image_tokens` slots (wrapped in `<img>` … `</img>` with `image_boundaries`).

Target-mask conventions (`target_mask[t]` = "token t is a valid prediction target"):
- text tokens and EOS are targets; BOS never is (nothing precedes it);
- image slots are never targets (the model's output there is not a text prediction);
- `<img>` IS a target (predicting that an image comes is a real prediction), `</img>` is NOT
  (it always follows the Q-th slot: a free prediction that would only dilute the loss);
- in conversations, only the tokens of assistant turns and the EOS that ends each assistant turn
  are targets (a token is in a turn when its characters overlap the turn's text; the turn's
  text starts at the space after "Assistant:", so a generation prompt ends at "Assistant:");
  `<img>` follows the same rule.

Documents must not contain the literal text `<image>`: their images live in `Document.parts`,
and a tag in the text would silently add an image slot with no image. Conversations, which come
from LLaVA-style data, mark images with `<image>` tags; their count must equal `len(images)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
from PIL import Image

from mm1.batch import IGNORE_INDEX
from mm1.data.document import Conversation, Document
from mm1.data.sources.unicode import repair_text

IMAGE_TOKEN = "<image>"
BOI_TOKEN = "<img>"
EOI_TOKEN = "</img>"
ENDOFCHUNK_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<pad>"

MM1_TOKENIZER_CONFIG = "mm1_tokenizer.json"

# Used only when no config file names BOS / EOS: the usual names of Llama 1/2, Llama 3, Gemma,
# GPT-2 / Qwen2 and Mistral vocabularies.
_BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_GUESSES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the BOS/EOS/pad and image special tokens mm1 uses.

    `bos_token` may be None (Qwen2 has no BOS; then none is inserted). `eos_token` must exist in
    the vocabulary. `pad_token` None adds `<pad>`. The wrapped tokenizer is copied, not changed.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        eos_token: str | None,
        bos_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        if eos_token is None:
            raise ValueError(
                "tokenizer has no EOS token: name it as eos_token in tokenizer_config.json "
                "(or special_tokens_map.json) next to tokenizer.json"
            )
        for role, name in (("bos_token", bos_token), ("eos_token", eos_token)):
            if name is not None and tok.token_to_id(name) is None:
                raise ValueError(f"{role} {name!r} is not in the tokenizer's vocabulary")
        pad_token = pad_token or PAD_TOKEN
        names = [n for n in (bos_token, eos_token, pad_token) if n is not None]
        names += [ENDOFCHUNK_TOKEN, BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN]
        # Registering a token that is already in the vocabulary keeps its id; a new one gets the
        # next id. As special tokens they are matched whole in text and skipped by decode.
        known = tok.get_vocab(with_added_tokens=True)
        for name in dict.fromkeys(names):
            tok.add_special_tokens([tokenizers.AddedToken(name, special=True, normalized=False)])
        # Ids new to the wrapped tokenizer: a pre-trained embedding has no trained row for them
        # (even where a padded vocabulary has a row at that id), so they start at the mean row.
        self.added_ids = tuple(tok.token_to_id(n) for n in dict.fromkeys(names) if n not in known)
        self._tok = tok
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        # Max id + 1, not the count: a vocabulary with holes still needs every id embedded.
        self._vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (a file, or a directory holding one).

        BOS / EOS / pad names come from the first of `mm1_tokenizer.json`, `tokenizer_config.json`
        and `special_tokens_map.json` (next to tokenizer.json) that names them — an explicit null
        counts; values may be strings or {"content": ...} dicts — else from the usual names.
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        tok = tokenizers.Tokenizer.from_file(str(file))
        configs = []
        for name in (MM1_TOKENIZER_CONFIG, "tokenizer_config.json", "special_tokens_map.json"):
            cfg_file = file.parent / name
            if cfg_file.is_file():
                configs.append(json.loads(cfg_file.read_text()))
        vocab = tok.get_vocab(with_added_tokens=True)
        found: dict[str, str | None] = {}
        for key, guesses in (("bos_token", _BOS_GUESSES), ("eos_token", _EOS_GUESSES)):
            named = [_token_name(cfg[key]) for cfg in configs if key in cfg]
            found[key] = named[0] if named else next((g for g in guesses if g in vocab), None)
        pads = [_token_name(cfg["pad_token"]) for cfg in configs if "pad_token" in cfg]
        return cls(tok, found["eos_token"], found["bos_token"], pads[0] if pads else None)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json (with the added tokens), mm1_tokenizer.json and a minimal
        tokenizer_config.json (overwritten: save into a fresh directory)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        names = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
        }
        mm1 = {
            **names,
            "image_token": IMAGE_TOKEN,
            "boi_token": BOI_TOKEN,
            "eoi_token": EOI_TOKEN,
            "endofchunk_token": ENDOFCHUNK_TOKEN,
        }
        (directory / MM1_TOKENIZER_CONFIG).write_text(json.dumps(mm1, indent=2) + "\n")
        # So that an exported directory also loads with transformers' AutoTokenizer.
        hf = {"tokenizer_class": "PreTrainedTokenizerFast", **names}
        (directory / "tokenizer_config.json").write_text(json.dumps(hf, indent=2) + "\n")

    # -- ids -------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids including the added tokens (max id + 1): the embedding table's size."""
        return self._vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        assert token_id is not None, token  # registered in __init__
        return token_id

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self._id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self._id(self.pad_token)

    @property
    def image_id(self) -> int:
        return self._id(IMAGE_TOKEN)

    @property
    def boi_id(self) -> int:
        return self._id(BOI_TOKEN)

    @property
    def eoi_id(self) -> int:
        return self._id(EOI_TOKEN)

    @property
    def endofchunk_id(self) -> int:
        return self._id(ENDOFCHUNK_TOKEN)

    # -- text ------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS/EOS added. Special tokens written in the text (e.g.
        `<|endofchunk|>`) become their ids, as in HF; `<image>` is refused (use
        `tokenize_document`, which knows where the images are)."""
        if IMAGE_TOKEN in text:
            raise ValueError(
                f"text contains {IMAGE_TOKEN!r}: image slots come from tokenize_document / "
                "tokenize_conversation, not from encode"
            )
        # A lone surrogate makes the HF tokenizer raise a TypeError naming nothing; readers
        # repair and count them, this covers text from anywhere else (prompts, task files).
        return self._tok.encode(repair_text(text), add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(repair_text(text), add_special_tokens=False)
        return enc.ids, enc.offsets


def _token_name(value: Any) -> str | None:
    """tokenizer_config values are a string, null, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


# ---------------------------------------------------------------------------------------------
# Documents and conversations
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenizedDocument:
    """One document as token ids, ready for packing.

    `image_spans[i]` = (start, end), end exclusive, of image i's slot block in `input_ids`,
    boundary tokens included; `images` are in slot order.
    """

    input_ids: list[int]
    target_mask: list[bool]
    images: list[Image.Image]
    source: str
    id: str
    image_spans: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def labels(self) -> list[int]:
        """Shifted labels of the document alone: label[t] = input_ids[t+1] where that token is a
        target, else -100; the last position has no next token."""
        ids, mask = self.input_ids, self.target_mask
        out = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
        return [*out, IGNORE_INDEX] if ids else []


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation is written out.

    The text is `system_format` (when there is a system prompt), then per turn `user_format`, or
    `assistant_prefix` + content + EOS + `turn_separator`. Only content + EOS of assistant turns
    (with the prefix's trailing whitespace) are targets.
    """

    name: str
    system: str = ""  # default system prompt, used when the conversation has none
    system_format: str = "{content}\n"
    user_format: str = "User: {content}\n"
    assistant_prefix: str = "Assistant: "
    turn_separator: str = ""


CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    # "User: …\nAssistant: …</s>User: …" — no system prompt.
    "plain": ChatTemplate("plain"),
    # LLaVA-1.5's conv_vicuna_v1: "SYSTEM USER: … ASSISTANT: …</s>USER: …".
    "vicuna_v1": ChatTemplate(
        "vicuna_v1",
        system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        system_format="{content} ",
        user_format="USER: {content} ",
        assistant_prefix="ASSISTANT: ",
    ),
}
CHAT_TEMPLATES["llava_v1"] = CHAT_TEMPLATES["vicuna_v1"]

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def tokenize_document(
    doc: Document,
    tok: Tokenizer,
    num_image_tokens: int,
    image_boundaries: bool = False,
    add_bos: bool = True,
    add_eos: bool = True,
) -> TokenizedDocument:
    """Tokenize a pre-training document: every text token and the EOS are targets."""
    text, images = "", []
    for part in doc.parts:
        if isinstance(part, Image.Image):
            text += IMAGE_TOKEN
            images.append(part)
        elif isinstance(part, str):
            if IMAGE_TOKEN in part:
                raise ValueError(
                    f"document {doc.id!r} ({doc.source}): a text part contains the literal "
                    f"{IMAGE_TOKEN!r}; images belong in Document.parts as PIL images"
                )
            text += part
        else:
            raise TypeError(f"document {doc.id!r}: part of type {type(part).__name__}")
    out = _expand(tok, text, [(0, len(text))], images, num_image_tokens, image_boundaries, add_bos)
    if add_eos:
        out.input_ids.append(tok.eos_id)
        out.target_mask.append(True)
    out.source, out.id = doc.source, doc.id
    return out


def tokenize_prompt(
    text: str,
    images: list[Image.Image],
    tok: Tokenizer,
    num_image_tokens: int,
    image_boundaries: bool = False,
) -> list[int]:
    """Prompt ids for generation: BOS, then `text` with each `<image>` tag expanded to the
    next image's slots (between `<img>` and `</img>` with `image_boundaries`, as in training);
    no EOS. The tag count must equal the number of images."""
    chunks = text.split(IMAGE_TOKEN)
    if len(chunks) - 1 != len(images):
        raise ValueError(
            f"the prompt has {len(chunks) - 1} {IMAGE_TOKEN} tags but {len(images)} images"
        )
    parts: list[str | Image.Image] = [chunks[0]]
    for image, chunk in zip(images, chunks[1:]):
        parts += [image, chunk]
    doc = Document(id="prompt", source="prompt", parts=[p for p in parts if p != ""])
    return tokenize_document(doc, tok, num_image_tokens, image_boundaries, add_eos=False).input_ids


def tokenize_conversation(
    conv: Conversation,
    tok: Tokenizer,
    num_image_tokens: int,
    template: ChatTemplate | str = "plain",
    image_boundaries: bool = False,
    add_bos: bool = True,
) -> TokenizedDocument:
    """Tokenize an SFT conversation: only assistant turns (and their EOS) are targets."""
    if isinstance(template, str):
        if template not in CHAT_TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; known: {sorted(CHAT_TEMPLATES)}")
        template = CHAT_TEMPLATES[template]
    n_tags = sum(m["content"].count(IMAGE_TOKEN) for m in conv.messages)
    if n_tags != len(conv.images):
        raise ValueError(
            f"conversation {conv.id!r}: {n_tags} {IMAGE_TOKEN} tags in the messages but "
            f"{len(conv.images)} images"
        )
    messages = list(conv.messages)
    system = template.system
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
    text = template.system_format.format(content=system) if system else ""
    regions: list[tuple[int, int]] = []
    for m in messages:
        role = _ROLES.get(m["role"])
        if role is None:
            raise ValueError(f"conversation {conv.id!r}: unknown role {m['role']!r}")
        if role == "user":
            text += template.user_format.format(content=m["content"])
        else:
            # The prefix's trailing space belongs to the answer: generation prompts end at
            # "Assistant:" and the model predicts " word" (or a lone space token) itself.
            head = template.assistant_prefix.rstrip()
            text += head
            start = len(text)
            text += template.assistant_prefix[len(head) :] + m["content"] + tok.eos_token
            regions.append((start, len(text)))
            text += template.turn_separator
    if not regions:
        raise ValueError(f"conversation {conv.id!r} has no assistant turn to learn from")
    out = _expand(tok, text, regions, conv.images, num_image_tokens, image_boundaries, add_bos)
    out.source, out.id = conv.source, conv.id
    return out


def _expand(
    tok: Tokenizer,
    text: str,
    regions: list[tuple[int, int]],
    images: list[Image.Image],
    num_image_tokens: int,
    image_boundaries: bool,
    add_bos: bool,
) -> TokenizedDocument:
    """Encode `text` in one call, mark targets by the character `regions`, expand `<image>`."""
    if images and num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
    ids: list[int] = []
    mask: list[bool] = []
    spans: list[tuple[int, int]] = []
    if add_bos and tok.bos_id is not None:
        ids.append(tok.bos_id)
        mask.append(False)
    image_id = tok.image_id
    for token_id, (s, e) in zip(*tok._encode_with_offsets(text)):
        in_region = any((s < re and e > rs) or (s == e and rs <= s < re) for rs, re in regions)
        if token_id != image_id:
            ids.append(token_id)
            mask.append(in_region)
            continue
        start = len(ids)
        if image_boundaries:
            ids.append(tok.boi_id)
            mask.append(in_region)
        ids += [image_id] * num_image_tokens
        mask += [False] * num_image_tokens
        if image_boundaries:
            ids.append(tok.eoi_id)
            mask.append(False)
        spans.append((start, len(ids)))
    if len(spans) != len(images):  # only if the tokenizer failed to keep <image> whole
        raise ValueError(f"found {len(spans)} image tokens for {len(images)} images")
    return TokenizedDocument(ids, mask, list(images), source="", id="", image_spans=spans)
