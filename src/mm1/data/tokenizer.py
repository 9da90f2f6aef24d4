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
expanded to its image's slots, as the model's `PromptFormat` says (`fmt.slots(image)`, wrapped in
`<img>` … `</img>` with `fmt.image_boundaries`); the format also names the chat template.

Target-mask conventions (`target_mask[t]` = "token t is a valid prediction target"):
- text tokens and EOS are targets; BOS never is (nothing precedes it);
- image slots are never targets (the model's output there is not a text prediction);
- `<img>` IS a target (predicting that an image comes is a real prediction), `</img>` is NOT
  (it always follows the Q-th slot: a free prediction that would only dilute the loss);
- in conversations, only the tokens of assistant turns and the end-of-turn token after each are
  targets (a token is in a turn when its characters overlap the turn's region, which starts
  where the template's generation prompt ends: plain's turn text starts at the space after
  "Assistant:"); `<img>` follows the same rule. Conversations are written by a chat template
  (`mm1.data.chat_template`): the tokenizer's own, or a built-in (`plain` by default).

Documents must not contain the literal text `<image>`: their images live in `Document.parts`,
and a tag in the text would silently add an image slot with no image. Conversations, which come
from LLaVA-style data, mark images with `<image>` tags; their count must equal `len(images)`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from PIL import Image

from mm1.batch import IGNORE_INDEX
from mm1.data.chat_template import (
    BUILTIN_TOKENS,
    CHAT_TEMPLATE_FILE,
    ChatTemplateSource,
    load_chat_template,
    render,
    select_template,
    template_config_value,
    training_text,
    uses_typed_parts,
)
from mm1.data.document import ROLES, Conversation, Document
from mm1.data.prompt_format import PromptFormat
from mm1.data.sources.unicode import repair_text
from mm1.fs import read_json

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
# transformers' other named special tokens, which templates may read.
_OTHER_SPECIAL_KEYS = ("unk_token", "sep_token", "cls_token", "mask_token")


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
        chat_template: ChatTemplateSource | None = None,
        other_special_tokens: dict[str, str] | None = None,
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
        # The template(s) of tokenizer_config.json / chat_template.jinja: a jinja source, or
        # named sources; None when the tokenizer has none.
        self.chat_template = chat_template
        # unk / sep / cls / mask token names from the config files, passed to templates as HF does.
        self.other_special_tokens = dict(other_special_tokens or {})
        # Max id + 1, not the count: a vocabulary with holes still needs every id embedded.
        self._vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (a file, or a directory holding one).

        BOS / EOS / pad names come from the first of `mm1_tokenizer.json`, `tokenizer_config.json`
        and `special_tokens_map.json` (next to tokenizer.json) that names them — an explicit null
        counts; values may be strings or {"content": ...} dicts — else from the usual names.
        The chat template comes from the same directory (see `mm1.data.chat_template`).
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # the library raises a bare Exception for any bad file
            why = (str(err).splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{file}: not a tokenizers tokenizer.json ({why})") from None
        configs = []
        for name in (MM1_TOKENIZER_CONFIG, "tokenizer_config.json", "special_tokens_map.json"):
            cfg_file = file.parent / name
            if cfg_file.is_file():
                configs.append(read_json(cfg_file))
        vocab = tok.get_vocab(with_added_tokens=True)
        found: dict[str, str | None] = {}
        for key, guesses in (("bos_token", _BOS_GUESSES), ("eos_token", _EOS_GUESSES)):
            named = [_token_name(cfg[key]) for cfg in configs if key in cfg]
            found[key] = named[0] if named else next((g for g in guesses if g in vocab), None)
        pads = [_token_name(cfg["pad_token"]) for cfg in configs if "pad_token" in cfg]
        others: dict[str, str] = {}
        for key in _OTHER_SPECIAL_KEYS:
            named = [_token_name(cfg[key]) for cfg in configs if key in cfg]
            if named and named[0] is not None:
                others[key] = named[0]
        return cls(
            tok,
            found["eos_token"],
            found["bos_token"],
            pads[0] if pads else None,
            chat_template=load_chat_template(file.parent),
            other_special_tokens=others,
        )

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json (with the added tokens), mm1_tokenizer.json and a minimal
        tokenizer_config.json holding the chat template, as transformers' legacy form does
        (overwritten: save into a fresh directory)."""
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
        hf: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **names}
        hf.update(self.other_special_tokens)
        if self.chat_template is not None:
            hf["chat_template"] = template_config_value(self.chat_template)
        (directory / "tokenizer_config.json").write_text(json.dumps(hf, indent=2) + "\n")
        # A template file would take precedence over the config's on loading.
        (directory / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)

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

    # -- chat ------------------------------------------------------------------------------------

    @property
    def template_variables(self) -> dict[str, str]:
        """The named special tokens a chat template sees (transformers' `special_tokens_map`)."""
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        names |= {"pad_token": self.pad_token, **self.other_special_tokens}
        return {k: v for k, v in names.items() if v is not None}

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
    ) -> list[int] | str:
        """Render `messages` as transformers' `apply_chat_template` does: the same text, and with
        `tokenize` the same ids (its `input_ids`: the text encoded without added BOS/EOS).

        `chat_template`: None for the tokenizer's own template, a name (of one of the
        tokenizer's named templates, or a built-in: plain, vicuna_v1, chatml, llama3), or a jinja
        source. Message content is a string or a list of typed parts ({"type": "image"},
        {"type": "text", "text": ...}).
        """
        _, source = select_template(self.chat_template, chat_template)
        text, _ = render(source, messages, add_generation_prompt, self.template_variables)
        if not tokenize:
            return text
        return self._tok.encode(text, add_special_tokens=False).ids

    def end_of_turn_tokens(self) -> tuple[str, ...]:
        """Special tokens that may end a turn: every special token but BOS and mm1's own."""
        skip = {self.bos_token, self.pad_token, ENDOFCHUNK_TOKEN, BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN}
        skip.discard(self.eos_token)  # Qwen2's pad is its EOS
        added = self._tok.get_added_tokens_decoder().values()
        return tuple(t.content for t in added if t.special and t.content not in skip)


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
    kind: str
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


def tokenize_document(
    doc: Document,
    tok: Tokenizer,
    fmt: PromptFormat,
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
                    f"document {doc.id!r} ({doc.kind}): a text part contains the literal "
                    f"{IMAGE_TOKEN!r}; images belong in Document.parts as PIL images"
                )
            text += part
        else:
            raise TypeError(f"document {doc.id!r}: part of type {type(part).__name__}")
    out = _expand(tok, text, [(0, len(text))], images, fmt, add_bos)
    if add_eos:
        out.input_ids.append(tok.eos_id)
        out.target_mask.append(True)
    out.kind, out.id = doc.kind, doc.id
    return out


def tokenize_prompt(
    text: str,
    images: list[Image.Image],
    tok: Tokenizer,
    fmt: PromptFormat,
    high_res: Sequence[bool] | None = None,
) -> list[int]:
    """Prompt ids for generation: BOS, then `text` with each `<image>` tag expanded to the
    next image's slots (between `<img>` and `</img>` with boundaries, as in training);
    no EOS. The tag count must equal the number of images. `high_res[k]` False writes image
    k in the `single` form (few-shot prompts keep only their last images high-res)."""
    chunks = text.split(IMAGE_TOKEN)
    if len(chunks) - 1 != len(images):
        raise ValueError(
            f"the prompt has {len(chunks) - 1} {IMAGE_TOKEN} tags but {len(images)} images"
        )
    parts: list[str | Image.Image] = [chunks[0]]
    for image, chunk in zip(images, chunks[1:]):
        parts += [image, chunk]
    doc = Document(id="prompt", kind="prompt", parts=[p for p in parts if p != ""])
    if high_res is None:
        return tokenize_document(doc, tok, fmt, add_eos=False).input_ids
    return _expand(tok, text, [], images, fmt, True, high_res).input_ids


def tokenize_conversation(
    conv: Conversation, tok: Tokenizer, fmt: PromptFormat, add_bos: bool = True
) -> TokenizedDocument:
    """Tokenize an SFT conversation through the format's chat template: only the assistant
    turns' content and the end-of-turn token after each are targets (see
    `chat_template.training_text`).

    `fmt.chat_template`: a built-in name, a jinja source, or None for the tokenizer's own
    template (`plain` when it has none). Roles `human` / `gpt` are read as user / assistant. For a
    template that reads typed parts (llava-hf's), each message's `<image>` tags become
    {"type": "image"} parts and the text between them {"type": "text"} parts (stripped); the
    rendered text must then hold one `<image>` per image. BOS is added unless the template
    writes it. Malformed conversations raise a ValueError naming the record (training skips
    and counts them).
    """
    where = f"conversation {conv.id!r}"
    messages = _checked_messages(conv, where)
    source, messages = _template_and_messages(tok, fmt, messages)
    try:
        text, regions, _ = training_text(
            source, messages, tok.template_variables, tok.end_of_turn_tokens(), tok.eos_token
        )
    except jinja2.TemplateError as err:
        raise ValueError(f"{where}: the chat template failed: {err}") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if text.count(IMAGE_TOKEN) != len(conv.images):
        raise ValueError(
            f"{where}: the chat template wrote {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} tags for "
            f"{len(conv.images)} images"
        )
    add_bos = add_bos and not (tok.bos_token and text.startswith(tok.bos_token))
    out = _expand(tok, text, regions, conv.images, fmt, add_bos)
    out.kind, out.id = conv.kind, conv.id
    return out


def tokenize_chat_prompt(
    messages: list[dict[str, Any]],
    images: list[Image.Image],
    tok: Tokenizer,
    fmt: PromptFormat,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Prompt ids for generation in a chat: `messages` (role and text content with `<image>`
    tags, ending with a user turn) rendered by the format's chat template with the generation
    prompt, BOS unless the template writes it, each `<image>` expanded as in training.
    `template_kwargs` are extra template variables, as transformers' `apply_chat_template`
    takes them (Qwen3's `enable_thinking`)."""
    tags = sum(str(m.get("content", "")).count(IMAGE_TOKEN) for m in messages)
    if tags != len(images):
        raise ValueError(f"the messages have {tags} {IMAGE_TOKEN} tags but {len(images)} images")
    messages = [{**m, "role": ROLES.get(m.get("role"), m.get("role"))} for m in messages]
    source, messages = _template_and_messages(tok, fmt, messages)
    text, _ = render(source, messages, True, {**tok.template_variables, **(template_kwargs or {})})
    if text.count(IMAGE_TOKEN) != len(images):
        raise ValueError(
            f"the chat template wrote {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} tags for "
            f"{len(images)} images"
        )
    add_bos = not (tok.bos_token and text.startswith(tok.bos_token))
    return _expand(tok, text, [], images, fmt, add_bos).input_ids


def _template_and_messages(
    tok: Tokenizer, fmt: PromptFormat, messages: list[dict[str, Any]]
) -> tuple[str, list[dict[str, Any]]]:
    """The format's template source (its special tokens checked), and the messages as it reads
    them: for a template of typed parts (llava-hf's), `<image>` tags become image parts."""
    name, source = select_template(tok.chat_template, fmt.template_choice(tok.chat_template))
    missing = [t for t in BUILTIN_TOKENS.get(name, ()) if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"chat template {name!r} needs the special tokens {missing}")
    if uses_typed_parts(source):
        messages = [{**m, "content": _typed_parts(m["content"])} for m in messages]
    return source, messages


def _checked_messages(conv: Conversation, where: str) -> list[dict[str, Any]]:
    """Messages with canonical roles, or a ValueError: an optional system message first, then
    user and assistant turns alternating from the user, no empty assistant turn, at least one
    assistant turn, and as many `<image>` tags as images."""
    n_tags = sum(str(m.get("content", "")).count(IMAGE_TOKEN) for m in conv.messages)
    if n_tags != len(conv.images):
        raise ValueError(
            f"{where}: {n_tags} {IMAGE_TOKEN} tags in the messages but {len(conv.images)} images"
        )
    messages = []
    for i, m in enumerate(conv.messages):
        role = ROLES.get(m.get("role"))
        if role is None:
            raise ValueError(f"{where}: unknown role {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} has no text content")
        if role == "system" and i > 0:
            raise ValueError(f"{where}: a system message after the first message")
        messages.append({"role": role, "content": m["content"]})
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            first = i == 0 and m["role"] == "assistant"
            detail = "starts with the assistant" if first else "roles do not alternate"
            raise ValueError(f"{where}: {detail} (turn {i} is {m['role']!r}, not {expected!r})")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"{where}: empty assistant turn (turn {i})")
    if not any(m["role"] == "assistant" for m in turns):
        raise ValueError(f"{where} has no assistant turn to learn from")
    return messages


def _typed_parts(content: str) -> list[dict[str, str]]:
    """ "<image>\nWhat is it?" -> [{"type": "image"}, {"type": "text", "text": "What is it?"}]."""
    parts: list[dict[str, str]] = []
    for k, piece in enumerate(content.split(IMAGE_TOKEN)):
        if k > 0:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def _expand(
    tok: Tokenizer,
    text: str,
    regions: list[tuple[int, int]],
    images: list[Image.Image],
    fmt: PromptFormat,
    add_bos: bool,
    high_res: Sequence[bool] | None = None,
) -> TokenizedDocument:
    """Encode `text` in one call, mark targets by the character `regions`, expand the k-th
    `<image>` to `fmt.slots(images[k], high_res[k])` slots."""
    flags = [True] * len(images) if high_res is None else list(high_res)
    if len(flags) != len(images):
        raise ValueError(f"high_res has {len(flags)} flags for {len(images)} images")
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
        if fmt.image_boundaries:
            ids.append(tok.boi_id)
            mask.append(in_region)
        k = len(spans)
        n = fmt.slots(images[k], flags[k]) if k < len(images) else fmt.image_tokens
        ids += [image_id] * n
        mask += [False] * n
        if fmt.image_boundaries:
            ids.append(tok.eoi_id)
            mask.append(False)
        spans.append((start, len(ids)))
    if len(spans) != len(images):  # only if the tokenizer failed to keep <image> whole
        raise ValueError(f"found {len(spans)} image tokens for {len(images)} images")
    return TokenizedDocument(ids, mask, list(images), kind="", id="", image_spans=spans)
