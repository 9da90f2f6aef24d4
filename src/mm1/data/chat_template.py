"""Chat templates: jinja2 rendering as transformers' `apply_chat_template` does it, the built-in
templates, and the character regions a training sample learns from.

Rendering follows transformers (`utils/chat_template_utils.py`, `tokenization_utils_base.py`):
a sandboxed `ImmutableSandboxedEnvironment` with `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension and a `{% generation %}` tag (it renders its body and records where);
the globals `raise_exception` (raises a `TemplateError`), `strftime_now`, a restricted `dict` and a
`namespace` that refuses underscore names; a `tojson` filter that does not HTML-escape. The
template sees `messages` (rebuilt from plain JSON types, keys whose value is None dropped),
`tools=None`, `documents=None`, `add_generation_prompt` and the tokenizer's named special tokens
(`bos_token`, `eos_token`, ...).

Templates come from a tokenizer directory the way transformers finds them: `chat_template.jinja`
(plus named ones in `chat_templates/*.jinja`), else `chat_template.json` (a processor's), else the
`chat_template` key of `tokenizer_config.json` (a string, or a list of {"name", "template"}).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

ChatTemplateSource = str | dict[str, str]

# -- built-ins ----------------------------------------------------------------------------------

_VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

BUILTIN_TEMPLATES: dict[str, str] = {
    # "User: …\nAssistant: …</s>User: …" (a system message, if any, on the first line).
    "plain": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}"
        "{% if message['content'] %}{{ message['content'] + '\\n' }}{% endif %}"
        "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
        "{% else %}{{ 'Assistant: ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
    # LLaVA-1.5's conv_vicuna_v1: "SYSTEM USER: … ASSISTANT: …</s>USER: …".
    "vicuna_v1": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        '{% else %}{% set system = "' + _VICUNA_SYSTEM + '" %}{% set turns = messages %}'
        "{% endif %}"
        "{% if system %}{{ system + ' ' }}{% endif %}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
        "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    # ChatML (Qwen2 and others), without a default system prompt.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # The Llama 3 Instruct format: BOS, then headers and <|eot_id|> per message.
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}
BUILTIN_TEMPLATES["llava_v1"] = BUILTIN_TEMPLATES["vicuna_v1"]

# Special tokens a built-in writes itself: the tokenizer must know them as whole tokens.
BUILTIN_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "chat_templates"
PROCESSOR_CHAT_TEMPLATE_FILE = "chat_template.json"


def is_jinja(text: str) -> bool:
    """A template source rather than a name: it has a jinja statement or expression."""
    return "{%" in text or "{{" in text


def select_template(
    own: ChatTemplateSource | None, chat_template: str | None = None
) -> tuple[str, str]:
    """(name, jinja source) the way transformers' `get_chat_template` chooses, plus our
    built-ins: `chat_template` is a jinja source, a name of one of the tokenizer's named
    templates, or a built-in name; None means the tokenizer's own (its "default" one)."""
    if chat_template is not None:
        if isinstance(own, dict) and chat_template in own:
            return chat_template, own[chat_template]
        if chat_template in BUILTIN_TEMPLATES:
            return chat_template, BUILTIN_TEMPLATES[chat_template]
        if is_jinja(chat_template):
            return "custom", chat_template
        known = sorted(BUILTIN_TEMPLATES) + (sorted(own) if isinstance(own, dict) else [])
        raise ValueError(f"unknown chat template {chat_template!r}; known: {known}")
    if isinstance(own, dict):
        if "default" not in own:
            raise ValueError(
                f"the tokenizer has several chat templates ({sorted(own)}) and none is "
                "'default': name one"
            )
        return "default", own["default"]
    if own is None:
        raise ValueError(
            "the tokenizer has no chat template: pass chat_template (a jinja template or one "
            f"of {sorted(BUILTIN_TEMPLATES)})"
        )
    return "tokenizer", own


def template_from_option(value: str) -> tuple[str, str]:
    """(name, jinja source) of an option naming a template (`data.chat_template`): a built-in
    name or a .jinja file."""
    if value in BUILTIN_TEMPLATES:
        return value, BUILTIN_TEMPLATES[value]
    path = Path(value)
    if path.suffix == ".jinja" and path.is_file():
        return path.name, path.read_text(encoding="utf-8")
    raise ValueError(
        f"{value!r} is neither a built-in chat template ({', '.join(sorted(BUILTIN_TEMPLATES))}) "
        "nor a .jinja file"
    )


# -- loading ------------------------------------------------------------------------------------


# What an HF export puts before a template that reads a message's content as a string:
# transformers' processors are prompted with content as a list of typed parts ({"type":
# "image"}, {"type": "text", ...}), which such a template cannot add to a string. Each list
# becomes the text mm1 trained on (an image as `<image>` and a line break, text as it is); mm1
# reads the template back without it.
PARTS_AS_TEXT = (
    "{#- mm1: content given as a list of parts is read as text (an image: <image> and a line "
    "break) -#}\n"
    "{%- set ns = namespace(messages=[], text='') -%}\n"
    "{%- for m in messages -%}\n"
    "{%- if m['content'] is string -%}{%- set ns.messages = ns.messages + [m] -%}\n"
    "{%- else -%}{%- set ns.text = '' -%}\n"
    "{%- for part in m['content'] -%}\n"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\\n' -%}\n"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': ns.text}] -%}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- set messages = ns.messages -%}\n"
    "{#- mm1: the template as trained -#}\n"
)


def with_parts_as_text(source: str) -> str:
    """`source` for an HF export: it reads lists of content parts too (`PARTS_AS_TEXT`)."""
    return source if uses_typed_parts(source) else PARTS_AS_TEXT + source


def load_chat_template(directory: Path) -> ChatTemplateSource | None:
    """The chat template(s) stored in a tokenizer directory, None when it has none (an HF
    export's `PARTS_AS_TEXT` removed: the template as trained)."""
    found = _stored_template(directory)
    if isinstance(found, dict):
        return {k: v.removeprefix(PARTS_AS_TEXT) for k, v in found.items()}
    return found.removeprefix(PARTS_AS_TEXT) if found is not None else None


def _stored_template(directory: Path) -> ChatTemplateSource | None:
    templates: dict[str, str] = {}
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (directory / CHAT_TEMPLATE_DIR).is_dir():
        for file in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    for name in (PROCESSOR_CHAT_TEMPLATE_FILE, "tokenizer_config.json"):
        file = directory / name
        if file.is_file():
            value = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
            if value is not None:
                return _template_value(value, file)
    return None


def _template_value(value: Any, file: Path) -> ChatTemplateSource:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ValueError(f"{file}: chat_template is neither a string nor a list of named templates")


def template_config_value(template: ChatTemplateSource) -> str | list[dict[str, str]]:
    """The `chat_template` value of tokenizer_config.json (transformers' legacy form)."""
    if isinstance(template, dict):
        return [{"name": k, "template": v} for k, v in template.items()]
    return template


# -- rendering ----------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}`: renders its body; while the environment's
    `mm1_tracker` is set (a `(blocks, spans)` pair: the output blocks generated so far and a list
    of spans), appends the body's (start, end) in the output to `spans`."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_mark", [])
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _mark(self, caller: Any) -> str:
        text = caller()
        tracker = getattr(self.environment, "mm1_tracker", None)
        if tracker is not None:
            blocks, spans = tracker
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(text)))
        return text


class _SafeDict:
    """`dict(...)` for templates without handing them the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace, refusing underscore-prefixed attributes (CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes on a namespace: {name!r}"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes; templates expect plain JSON.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """One environment per template, so that the generation tracker never crosses renders."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _SafeDict()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """What a template may see: plain JSON types; anything else becomes "<TypeName>" (templates
    only test whether media keys exist, and rich objects carry methods the sandbox can't judge)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _prepare_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        message = _plain({k: v for k, v in message.items() if v is not None})
        # Older names for a message's reasoning are copied to the one templates read.
        reasoning = next(
            (message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None
        )
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render(
    source: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    variables: Mapping[str, Any],
    track_generation: bool = False,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text, and the character spans of `{% generation %}` blocks (tracked only
    with `track_generation`)."""
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    template = compile_template(source)
    context = {
        **_plain(dict(variables)),
        "messages": _prepare_messages(messages),
        "tools": None,
        "documents": None,
        "add_generation_prompt": add_generation_prompt,
    }
    if not track_generation:
        return template.render(**context), []
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    template.environment.mm1_tracker = (blocks, spans)  # type: ignore[attr-defined]
    try:
        for block in template.generate(**context):
            blocks.append(block)
    finally:
        template.environment.mm1_tracker = None  # type: ignore[attr-defined]
    return "".join(blocks), spans


# -- training targets ---------------------------------------------------------------------------

# The tiny conversation a chosen template is tried on (`check_template`).
SAMPLE_QUESTION = "What colour is the sky?"
SAMPLE_ANSWER = "The sky is blue."


def check_template(
    source: str,
    variables: dict[str, str],
    training: tuple[tuple[str, ...], str] | None = None,
) -> None:
    """Render `source` once on a tiny conversation (a user question, an assistant answer), so
    that a template that cannot render fails when it is chosen rather than on every record or
    request. With `training` (the tokenizer's end-of-turn tokens and EOS) the rendering is
    training's (`training_text`), and the answer must be in a learned region. A ValueError
    says what is wrong (with jinja's message)."""
    try:
        compile_template(source)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"it has a syntax error at line {err.lineno}: {err.message}") from None

    def content(text: str) -> str | list[dict[str, str]]:
        # As `tokenize_conversation` hands an `<image>`-free text to a typed-parts template.
        return [{"type": "text", "text": text}] if uses_typed_parts(source) else text

    user = {"role": "user", "content": content(SAMPLE_QUESTION)}
    messages = [user, {"role": "assistant", "content": content(SAMPLE_ANSWER)}]
    try:
        if training is None:  # what a chat renders: its first turn, and a later one
            render(source, messages[:1], True, variables)
            render(source, [*messages, user], True, variables)
            return
        text, regions, _ = training_text(source, messages, variables, *training)
    except Exception as err:  # a template is a program: any failure (TemplateError, ...) is its
        # training_text's own ValueError: the answer is not written where it can be found.
        located = training is not None and type(err) is ValueError
        what = "it cannot be trained on" if located else "it fails to render a conversation"
        raise ValueError(f"{what}: {err}") from None
    if not any(SAMPLE_ANSWER in text[s:e] for s, e in regions):
        raise ValueError(
            "it does not write the assistant's answer, so a conversation has nothing to learn"
        )


_TYPE_KEY = re.compile(r"""\[\s*['"]type['"]\s*\]|\.type\b|['"]type['"]""")


def uses_typed_parts(source: str) -> bool:
    """Whether a template reads content as a list of typed parts ({"type": "image"}, ...), as
    multimodal processors' templates do, rather than as a string."""
    return bool(_TYPE_KEY.search(source))


def text_pieces(content: str | list[dict[str, Any]]) -> list[str]:
    if isinstance(content, str):
        return [content]
    return [p.get("text", "") for p in content if p.get("type") == "text"]


def training_text(
    source: str,
    messages: list[dict[str, Any]],
    variables: dict[str, str],
    end_tokens: tuple[str, ...],
    eos_token: str,
) -> tuple[str, list[tuple[int, int]], bool]:
    """The rendered conversation and the character regions of what the model learns to write:
    each assistant turn's content and the end-of-turn token that follows it. Returns (text,
    regions, eos_appended).

    Locating the content: if the template marks it with `{% generation %}`, those marks. If not,
    the prefix method: the text the model sees before it writes turn i is `messages[:i]`
    rendered with `add_generation_prompt=True`; when the full rendering starts with that prefix,
    the turn's region starts where the prefix ends (so what the template writes between the
    generation prompt and the content, e.g. plain's space, is learned too), and it ends after the
    content (whitespace-stripped, as templates may `trim` it), searched in the text from there.
    A template that does not start turn i with that prefix falls back to searching the content
    after the previous region. A content the template does not write verbatim is an error.

    End of turn: a special token of `end_tokens` right after the content (whitespace between
    allowed) joins the region. A template with no end-of-turn token (llava-hf's) would train a
    model that never stops, so `eos_token` is inserted right after such a turn's content and
    learned; the text then differs from the template's rendering by exactly those EOS tokens.
    """
    text, spans = render(source, messages, False, variables, track_generation=True)
    regions: list[tuple[int, int]] = []
    if spans:
        for s, e in sorted(spans):
            if regions and s <= regions[-1][1]:  # adjacent marks of one turn (several parts)
                regions[-1] = (regions[-1][0], max(e, regions[-1][1]))
            elif e > s:
                regions.append((s, e))
    else:
        pos = 0
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            start: int | None = None
            if i > 0:
                prompt, _ = render(source, messages[:i], True, variables)
                if len(prompt) >= pos and text.startswith(prompt):
                    start = len(prompt)
            end = pos if start is None else start
            for piece in text_pieces(message.get("content", "")):
                piece = piece.strip()
                if not piece:
                    continue
                found = text.find(piece, end)
                if found < 0:
                    raise ValueError(
                        f"message {i}: the chat template does not write the assistant's content "
                        "verbatim, so its targets cannot be located (mark them with "
                        "{% generation %})"
                    )
                start = found if start is None else start
                end = found + len(piece)
            if start is None:
                raise ValueError(f"message {i}: empty assistant turn")
            regions.append((start, end))
            pos = end
    ordered = sorted(end_tokens, key=len, reverse=True)
    out: list[tuple[int, int]] = []
    shift, appended = 0, False
    for s, e in regions:
        s, e = s + shift, e + shift
        body = text[s:e].rstrip()
        if any(body.endswith(t) for t in ordered):  # a marked span that holds its end token
            out.append((s, e))
            continue
        tail = text[e:]
        gap = len(tail) - len(tail.lstrip())
        token = next((t for t in ordered if tail[gap:].startswith(t)), None)
        if token is not None:
            out.append((s, e + gap + len(token)))
            continue
        cut = s + len(body)
        text = text[:cut] + eos_token + text[cut:]
        out.append((s, cut + len(eos_token)))
        shift += len(eos_token)
        appended = True
    return text, out, appended
