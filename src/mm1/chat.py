"""`mm1 chat`: a multi-turn conversation with a trained model in the terminal, or one answer for
a script.

Each turn the whole conversation (every message so far, and every image attached so far) is
rendered again through the model's chat template with its generation prompt, written as training
wrote conversations (`tokenize_chat_prompt`), and the answer is decoded one token per
`DecodeBatch.step`, its text printed as it grows. An answer ends at EOS or at one of the
tokenizer's end-of-turn tokens, which are never printed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import jinja2
import torch
from PIL import Image

from mm1.config import ConfigError
from mm1.data.chat_template import (
    BUILTIN_TEMPLATES,
    BUILTIN_TOKENS,
    check_template,
    select_template,
)
from mm1.data.sources import DataError
from mm1.data.sources.base import BadImage, image_from_path
from mm1.data.tokenizer import IMAGE_TOKEN, Tokenizer, tokenize_chat_prompt
from mm1.models.generation import DecodeBatch, Sampling, check_prompt_fits
from mm1.models.mllm import MLLM
from mm1.pretrained import Pretrained
from mm1.reasoning import ReasoningSplitter, chat_reasoning

HELP = """\
Type a message and press Enter; the answer is printed as it is written.
  /image PATH   attach an image to your next message: before its text, or at each <image> in it
  /reset        forget the conversation and the attached images
  /help         this list
  /quit         end the chat (so does Ctrl-D); Ctrl-C stops an answer while it is written"""

PROMPT = "you> "
GREEDY = Sampling()


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str  # jinja
    notice: str | None = None  # said once when the template was not the model's own choice


def resolve_chat_template(tok: Tokenizer, option: str | None) -> ChatTemplate:
    """The template a chat renders with: `option` (a .jinja file, one of the tokenizer's named
    templates, or a built-in name), else the tokenizer's own, else `plain` with a notice."""
    if option is None:
        if tok.chat_template is None:
            notice = (
                "the model's tokenizer has no chat template: using the built-in 'plain' "
                "(--chat-template chooses another)"
            )
            return _checked(tok, ChatTemplate("plain", BUILTIN_TEMPLATES["plain"], notice))
        name, source = select_template(tok.chat_template, None)
        where = f"the model's tokenizer's chat template ({name})"
        return _checked(tok, ChatTemplate(name, source), where)
    path = Path(option).expanduser()
    if path.is_file():
        template = ChatTemplate(path.name, path.read_text(encoding="utf-8"))
        return _checked(tok, template, f"--chat-template {option}")
    if option.endswith(".jinja") or "/" in option:
        raise ConfigError(f"--chat-template: no file {option}")
    try:
        name, source = select_template(tok.chat_template, option)
    except ValueError as err:
        raise ConfigError(f"--chat-template: {err}") from None
    return _checked(tok, ChatTemplate(name, source))


def _checked(tok: Tokenizer, template: ChatTemplate, where: str | None = None) -> ChatTemplate:
    """`template` once its special tokens are known to the tokenizer and it renders a tiny chat:
    else a ConfigError naming `where` it came from (`--chat-template NAME` by default), raised
    at start-up rather than on every request."""
    where = where or f"--chat-template {template.name}"
    missing = [t for t in BUILTIN_TOKENS.get(template.name, ()) if tok.token_to_id(t) is None]
    if missing:
        raise ConfigError(f"{where}: the model's tokenizer lacks its special tokens {missing}")
    try:
        check_template(template.source, tok.template_variables)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    return template


def template_variables(
    template: ChatTemplate, tok: Tokenizer, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The tokenizer's named tokens with `kwargs` (`--chat-template-kwargs`), once `template`
    renders a tiny chat with them; else a ConfigError naming the option, at start-up."""
    variables = {**tok.template_variables, **kwargs}
    try:
        check_template(template.source, variables)
    except ValueError as err:
        raise ConfigError(f"--chat-template-kwargs: {err}") from None
    return variables


def load_image(path: str | Path) -> Image.Image:
    """An image decoded as training decodes it; a DataError naming the file otherwise."""
    try:
        return image_from_path(Path(path).expanduser())
    except BadImage as err:  # its detail names the file
        raise DataError(f"image: {err.detail}") from None


def user_content(text: str, n_images: int) -> str:
    """A user message's content with its images: at its `<image>` tags if it has any (one per
    image), else the tags first, one per line, as the training conversations write them."""
    tags = text.count(IMAGE_TOKEN)
    if tags and tags != n_images:
        raise ValueError(
            f"the message has {tags} {IMAGE_TOKEN} tag(s) but {n_images} image(s) attached: "
            f"put one {IMAGE_TOKEN} where each image goes, or none to put them first"
        )
    if tags or not n_images:
        return text
    lead = "\n".join([IMAGE_TOKEN] * n_images)
    return f"{lead}\n{text}" if text else lead


class TextStream:
    """Decodes a growing token list and hands out only the new text. Text ending in an
    incomplete character (U+FFFD: a byte-level token split one) is held back until it
    completes, so the pieces join up to the decoding of all tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""  # handed out so far

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        return self._advance(self.tokenizer.decode(self.tokens))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.text):  # a decoder that rewrote earlier text: keep going
            return ""
        piece, self.text = text[len(self.text) :], text
        return piece


def stream_tokens(
    model: MLLM,
    prompt: list[int],
    pixel_values: torch.Tensor | None,
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
    pad_token_id: int = 0,
    image_crops: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
    compile: bool = False,
) -> Iterator[int]:
    """The new tokens of one prompt, one per step, ending before a stop id (never yielded) or
    after `max_new_tokens`. Greedy, these are `generate`'s tokens up to its stop token.
    `image_crops` / `image_sizes`: per image, as in `Batch` (tiled layouts); `compile`: the
    decode steps compiled (`DecodeBatch`)."""
    if max_new_tokens <= 0:
        return
    batch = DecodeBatch(
        model,
        1,
        len(prompt) + max_new_tokens,
        sampling=sampling,
        generator=generator,
        pad_token_id=pad_token_id,
        compile=compile,
    )
    (seq,) = batch.prefill([prompt], pixel_values, image_crops, image_sizes)
    for _ in range(max_new_tokens):
        token = batch.step()[seq]
        if token in stop_ids:
            return
        yield token


@dataclass(frozen=True)
class ChatSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    compile: bool = False  # decode steps compiled at fixed shapes (a CUDA graph on GPU)
    # A reasoning block (`<think>…</think>`) is shown set apart from the answer, or not at all.
    hide_reasoning: bool = False
    # Extra chat-template variables (`--chat-template-kwargs`: Qwen3's `enable_thinking`).
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        check_sampling(self.max_new_tokens, self.temperature, self.top_p)


def check_sampling(
    max_new_tokens: int, temperature: float, top_p: float, stops: Sequence[str] = ()
) -> None:
    """The decoding flags of `mm1 chat` and `mm1 generate`, checked before the model loads:
    NaN passes every comparison (a NaN temperature would sample from NaN logits), top_p 0
    keeps no token, and an empty stop string matches everywhere."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(
            f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}"
        )
    if not 0 < top_p <= 1:  # also refuses NaN
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")
    if any(stop == "" for stop in stops):
        raise ConfigError("--stop must not be empty: give the text that ends the answer")


@dataclass
class Answer:
    text: str
    tokens: list[int]
    stopped: bool = False  # cut short by Ctrl-C


@dataclass
class ChatSession:
    """A conversation with a loaded model: the messages so far and their images in order."""

    pretrained: Pretrained
    template: ChatTemplate
    settings: ChatSettings = field(default_factory=ChatSettings)
    messages: list[dict[str, Any]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.settings.validate()
        tok = self.pretrained.tokenizer
        variables = {**tok.template_variables, **self.settings.template_kwargs}
        if self.settings.template_kwargs:  # a variable that breaks the template: said now
            variables = template_variables(self.template, tok, self.settings.template_kwargs)
        # Whether answers hold a reasoning block, and start inside it (`chat_reasoning`).
        self.reasoning = chat_reasoning(self.template.source, variables)
        ends = (tok.token_to_id(t) for t in tok.end_of_turn_tokens())
        self.stop_ids = {tok.eos_id, *(i for i in ends if i is not None)}
        self.length = 0  # tokens of the last prompt and its answer
        self.generator: torch.Generator | None = None
        if self.settings.seed is not None:
            device = self.pretrained.model.decoder.embed_tokens.weight.device
            self.generator = torch.Generator(device).manual_seed(self.settings.seed)

    def reset(self) -> None:
        self.messages.clear()
        self.images.clear()
        self.length = 0

    def prompt_ids(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> list[int]:
        """The prompt for the assistant's turn after `messages`."""
        p = self.pretrained
        try:
            # The model's prompt format (slots, boundaries) with this session's template.
            fmt = replace(p.prompt_format, chat_template=self.template.source)
            kwargs = self.settings.template_kwargs
            return tokenize_chat_prompt(messages, images, p.tokenizer, fmt, kwargs)
        except jinja2.TemplateError as err:
            raise ValueError(f"the chat template {self.template.name!r} failed: {err}") from None

    def reply(
        self,
        text: str,
        images: list[Image.Image],
        on_text: Callable[[str], None],
        on_reasoning: Callable[[str], None] | None = None,
    ) -> Answer:
        """Add a user message (`images` placed by `user_content`), answer it, passing the text
        to `on_text` piece by piece, and keep both turns. With `on_reasoning`, an answer's
        reasoning block goes there and only the answer after it to `on_text` (split as
        `mm1.reasoning` splits it; the conversation keeps the whole text, which the template
        reads). Ctrl-C (KeyboardInterrupt) while the answer is written ends it there; what was
        written stays in the conversation."""
        message = {"role": "user", "content": user_content(text, len(images))}
        messages, all_images = [*self.messages, message], [*self.images, *images]
        prompt = self.prompt_ids(messages, all_images)
        p, s = self.pretrained, self.settings
        # a prompt past the context is refused, as serve refuses it; the answer stops at it
        room = check_prompt_fits(len(prompt), p.model.cfg.decoder.max_seq_len)
        device = p.model.decoder.embed_tokens.weight.device
        pixels = crops = sizes = None
        if all_images:
            pixels = p.prompt_format.pixel_values(p.processor, all_images).to(device)
            crops, sizes = p.prompt_format.image_info(all_images)
        sampling = Sampling(s.temperature > 0, s.temperature, top_p=s.top_p)
        stream = TextStream(p.tokenizer)
        show = _Split(on_text, on_reasoning, self.reasoning)
        stopped = False
        try:
            for token in stream_tokens(
                p.model,
                prompt,
                pixels,
                max_new_tokens=min(s.max_new_tokens, room),
                stop_ids=self.stop_ids,
                sampling=sampling,
                generator=self.generator,
                pad_token_id=p.tokenizer.pad_id,
                image_crops=crops,
                image_sizes=sizes,
                compile=s.compile,
            ):
                piece = stream.push(token)
                if piece:
                    show.push(piece)
        except KeyboardInterrupt:
            stopped = True
        show.finish(stream.flush())
        # What was printed, unless the decoder rewrote earlier text as tokens arrived.
        said = p.tokenizer.decode(stream.tokens)
        self.messages[:] = [*messages, {"role": "assistant", "content": said}]
        self.images[:] = all_images
        self.length = len(prompt) + len(stream.tokens)
        return Answer(said, list(stream.tokens), stopped)

    def context_notice(self) -> str | None:
        """A note once the next turn may outgrow the length the model was configured for."""
        limit = self.pretrained.model.cfg.decoder.max_seq_len
        # room for a next answer, but not all of a large --max-new-tokens
        if self.length + min(self.settings.max_new_tokens, limit // 4) <= limit:
            return None
        return f"(the conversation nears the model's {limit} tokens: /reset starts over)"


class _Split:
    """Streamed answer text to `on_text`, or, when answers hold a reasoning block (`opened` not
    None) and `on_reasoning` is given, its reasoning there and the rest to `on_text`."""

    def __init__(
        self,
        on_text: Callable[[str], None],
        on_reasoning: Callable[[str], None] | None,
        opened: bool | None,
    ) -> None:
        self.on_text, self.on_reasoning = on_text, on_reasoning
        split = opened is not None and on_reasoning is not None
        self.splitter = ReasoningSplitter(opened=bool(opened)) if split else None
        self.text = ""

    def push(self, piece: str, final: bool = False) -> None:
        if self.splitter is None:
            if piece:
                self.on_text(piece)
            return
        self.text += piece
        split = self.splitter.finish if final else self.splitter.push
        reasoning, content = split(self.text)
        if reasoning and self.on_reasoning is not None:
            self.on_reasoning(reasoning)
        if content:
            self.on_text(content)

    def finish(self, rest: str) -> None:
        self.push(rest, final=True)


class ReasoningDisplay:
    """How `mm1 chat` prints a reasoning block: after a "Thinking..." line and before a
    "...done thinking." one, dimmed on a terminal (as `ollama run` sets it apart), or not at
    all with `hide`; the answer after it as it comes."""

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, write: Callable[[str], None], hide: bool, tty: bool) -> None:
        self.write, self.hide, self.tty = write, hide, tty
        self.state = "none"  # -> "thinking" (or "hidden") -> "done"

    def reasoning(self, piece: str) -> None:
        if self.hide:
            self.state = "hidden" if self.state == "none" else self.state
            return
        if self.state == "none":
            self.write(self._dim("Thinking...\n"))
            self.state = "thinking"
        self.write(self._dim(piece))

    def text(self, piece: str) -> None:
        if self.state == "thinking":
            self.write(self._dim("\n...done thinking.\n\n"))
        self.state = "done"
        self.write(piece)

    def end(self) -> None:
        """An answer that ended inside its reasoning block still closes the block; a hidden
        one says that nothing came after it."""
        if self.state == "thinking":
            self.write(self._dim("\n...done thinking.\n"))
        elif self.state == "hidden":
            self.write(self._dim("(the answer ended inside its reasoning block)"))
        self.state = "none"

    def _dim(self, text: str) -> str:
        return f"{self.DIM}{text}{self.RESET}" if self.tty else text


def message_images(message: str, image_paths: list[str]) -> list[Image.Image]:
    """The images of the non-interactive form's message, checked against its `<image>` tags."""
    try:
        user_content(message, len(image_paths))
    except ValueError as err:
        raise ConfigError(f"--message: {err}") from None
    return [load_image(path) for path in image_paths]


def answer_once(
    session: ChatSession, message: str, images: list[Image.Image], out: TextIO | None = None
) -> Answer:
    """The non-interactive form: one message, its answer printed (streamed) and a newline."""
    out = out or sys.stdout

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    shown = ReasoningDisplay(write, session.settings.hide_reasoning, _is_tty(out))
    answer = session.reply(message, images, shown.text, shown.reasoning)
    shown.end()
    out.write("\n")
    out.flush()
    return answer


def _is_tty(out: TextIO) -> bool:
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty())


def run_interactive(
    session: ChatSession, stdin: TextIO | None = None, out: TextIO | None = None
) -> None:
    """Read lines until /quit or end of input; each line that is not a command is a message."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    chat = _Interactive(session, out)
    chat.say(
        f"mm1 chat with {session.pretrained.source} (chat template: {session.template.name}); "
        "/help lists the commands"
    )
    while True:
        out.write(PROMPT)
        out.flush()
        try:
            line = stdin.readline()
            if not line:  # end of input (Ctrl-D)
                chat.say("")
                return
            if not chat.handle(line.strip()):
                return
        except KeyboardInterrupt:  # at the prompt: drops the line being typed
            chat.say("")


class _Interactive:
    def __init__(self, session: ChatSession, out: TextIO) -> None:
        self.session, self.out = session, out
        self.pending: list[Image.Image] = []  # images for the next message

    def say(self, text: str) -> None:
        self.write(text + "\n")

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def handle(self, line: str) -> bool:
        """Act on one line; False once the chat should end."""
        command, _, rest = line.partition(" ")
        if not line:
            pass
        elif command == "/quit":
            return False
        elif command == "/help":
            self.say(HELP)
        elif command == "/reset":
            self.session.reset()
            self.pending.clear()
            self.say("(conversation and images cleared)")
        elif command == "/image":
            self.attach(rest.strip().strip("'\""))
        elif command.startswith("/") and IMAGE_TOKEN not in command:
            self.say(f"unknown command {command}: /help lists the commands")
        else:
            self.send(line)
        return True

    def attach(self, path: str) -> None:
        if not path:
            self.say("usage: /image PATH")
            return
        try:
            self.pending.append(load_image(path))
        except DataError as err:
            self.say(f"error: {err}")
            return
        self.say(f"(image {len(self.pending)} attached to your next message: {path})")

    def send(self, text: str) -> None:
        try:
            user_content(text, len(self.pending))
        except ValueError as err:
            self.say(f"error: {err}")
            return
        images, self.pending = self.pending, []
        shown = ReasoningDisplay(
            self.write, self.session.settings.hide_reasoning, _is_tty(self.out)
        )
        try:
            answer = self.session.reply(text, images, shown.text, shown.reasoning)
        except ValueError as err:  # the template refused the conversation
            self.say(f"error: {err}")
            return
        finally:
            shown.end()
        self.say(" [stopped]" if answer.stopped else "")
        notice = self.session.context_notice()
        if notice:
            self.say(notice)
