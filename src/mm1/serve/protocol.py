"""OpenAI's chat-completions request, checked and turned into an engine `Request`.

Messages carry text and `image_url` parts; an image is a base64 data URL, or a local file
(`file://` URL or path) under the folder the server allows, none otherwise. The prompt is
written by the model's chat template with its generation prompt, the images by the model's own
preprocessing, as `mm1 chat` writes them. Every refusal is an `APIError` with OpenAI's error
body and the HTTP status OpenAI uses for it.

An image's bytes are bounded (`max_image_bytes`) and so are its pixels (`max_image_pixels`,
read from the header before decoding): a 300 kB PNG can declare a 10000 x 10000 bitmap.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import jinja2
from PIL import Image

from mm1.config import ConfigError
from mm1.data.sources.base import BadImage, image_from_bytes
from mm1.data.sources.decode import DEFAULT_MAX_IMAGE_PIXELS, OVERSIZE_FACTOR
from mm1.data.tokenizer import IMAGE_TOKEN, tokenize_chat_prompt
from mm1.models.generation import Sampling, check_prompt_fits
from mm1.pretrained import Pretrained
from mm1.reasoning import chat_reasoning
from mm1.serve.engine import Request

ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer system
MAX_STOPS = 4  # as OpenAI
_DATA_URL = re.compile(
    r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),(?P<data>.*)", re.S
)
# 8192 x 8192 (67 Mpx), the readers' limit at the default cap: a 24 Mpx photo, a 50 Mpx phone
# photo and a 61 Mpx camera's pass (reduced to the cap as the readers reduce them).
MAX_IMAGE_PIXELS = OVERSIZE_FACTOR * DEFAULT_MAX_IMAGE_PIXELS
# Images decoded at once: one at the pixel limit takes ~0.4 GB (RGB) to ~1 GB (RGBA) while
# decoding, and requests are parsed in a thread pool of 40, so unbounded that is 40 GB.
_DECODE_SLOTS = threading.BoundedSemaphore(2)


class APIError(Exception):
    """An OpenAI-style error: `body()` is what the client gets with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ServeOptions:
    model_name: str
    chat_template: str  # jinja source the prompts are written with
    image_dir: Path | None = None  # local images allowed under here; None: data URLs only
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = MAX_IMAGE_PIXELS  # per image, from its header; 0 = no limit
    max_body_bytes: int = 100 * 2**20  # a request's JSON, images included (base64: 4/3 bytes)
    request_timeout: float | None = 600.0
    # The template's extra variables (`--chat-template-kwargs`), which a request's
    # `chat_template_kwargs` (vLLM's field) add to, and how answers written with them are
    # read (`mm1.reasoning.chat_reasoning`).
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    reasoning: bool | None = None


@dataclass(frozen=True)
class ChatRequest:
    request: Request
    stream: bool
    include_usage: bool


def parse_chat_request(
    body: Any, pretrained: Pretrained, opts: ServeOptions, context: int
) -> ChatRequest:
    """The engine request a chat-completions body asks for, or an APIError."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter", "model")
    if model != opts.model_name:
        raise model_not_found(model, opts.model_name)
    n = body.get("n")
    if n not in (None, 1):
        raise bad(f"only n=1 is supported, got {n!r}", "n")
    _refuse_unsupported(body)
    messages, images = _messages(body.get("messages"), opts)
    asked = body.get("chat_template_kwargs")
    asked = {} if asked is None else asked
    if not isinstance(asked, dict):
        raise bad("chat_template_kwargs must be an object", "chat_template_kwargs")
    kwargs = {**opts.template_kwargs, **asked}
    prompt = _prompt(messages, images, pretrained, opts, kwargs)
    reasoning = opts.reasoning
    if asked:  # the variables may change whether the prompt opens a reasoning block
        variables = {**pretrained.tokenizer.template_variables, **kwargs}
        reasoning = chat_reasoning(opts.chat_template, variables)
    try:
        room = check_prompt_fits(len(prompt), context)  # as generate and chat refuse it
    except ConfigError as err:
        raise bad(str(err), "messages", "context_length_exceeded") from None
    max_tokens = _max_tokens(body, room, len(prompt), context)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p must be greater than 0", "top_p")
    seed = body.get("seed")
    if seed is not None and (
        not isinstance(seed, int) or isinstance(seed, bool) or not -(2**63) <= seed < 2**64
    ):
        raise bad("seed must be an integer in [-2**63, 2**64)", "seed")  # torch's seed range
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise bad("stream must be a boolean", "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not stream:
        raise bad("stream_options is only allowed when stream is true", "stream_options")
    stream_options = stream_options or {}
    if not isinstance(stream_options, dict):
        raise bad("stream_options must be an object", "stream_options")
    pixels = crops = sizes = None
    if images:
        pixels = pretrained.prompt_format.pixel_values(pretrained.processor, images)
        crops, sizes = pretrained.prompt_format.image_info(images)
    request = Request(
        prompt=prompt,
        pixel_values=pixels,
        max_new_tokens=max_tokens,
        sampling=Sampling(do_sample=temperature > 0, temperature=temperature, top_p=top_p),
        seed=seed,
        stop=_stops(body.get("stop")),
        timeout=opts.request_timeout,
        image_crops=crops,
        image_sizes=sizes,
        reasoning=reasoning,
    )
    return ChatRequest(request, stream, bool(stream_options.get("include_usage", False)))


def model_not_found(model: str, served: str) -> APIError:
    return APIError(
        404,
        f"the model {model!r} does not exist; this server serves {served!r}",
        param="model",
        code="model_not_found",
    )


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Options that would change the answer or its form, refused rather than ignored (their
    defaults, which clients often send, pass)."""
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(body, key, 0.0, -2.0, 2.0) != 0:
            raise bad(f"{key} is not supported by this server (only 0)", key)
    unsupported = {
        "logprobs": body.get("logprobs") not in (None, False),
        "top_logprobs": body.get("top_logprobs") not in (None, 0),
        "logit_bias": bool(body.get("logit_bias")),
        "tools": bool(body.get("tools")),
        "functions": bool(body.get("functions")),
        "tool_choice": body.get("tool_choice") not in (None, "none", "auto"),
        "response_format": body.get("response_format") not in (None, {"type": "text"}),
        "audio": body.get("audio") is not None,
        "modalities": body.get("modalities") not in (None, ["text"]),
    }
    for key, asked in unsupported.items():
        if asked:
            raise bad(f"{key} is not supported by this server", key)


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise bad(f"{key} must be a number in [{low:g}, {high:g}], got {value!r}", key)
    return float(value)


def _max_tokens(body: dict[str, Any], room: int, prompt: int, context: int) -> int:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    if value is None:
        return room
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise bad(f"{key} must be a positive integer, got {value!r}", key)
    if value > room:
        raise bad(
            f"{prompt} prompt tokens plus {key}={value} exceed the model's context of {context}",
            key,
            "context_length_exceeded",
        )
    return value


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"at most {MAX_STOPS} stop sequences, got {len(stops)}", "stop")
    return tuple(stops)


def _messages(raw: Any, opts: ServeOptions) -> tuple[list[dict[str, str]], list[Image.Image]]:
    """Messages as our templates read them (text with `<image>` tags) and the images in order."""
    if not isinstance(raw, list) or not raw:
        raise bad("messages must be a non-empty list", "messages")
    messages: list[dict[str, str]] = []
    images: list[Image.Image] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"{where}: role must be one of {', '.join(ROLES)}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            if IMAGE_TOKEN in content:
                raise bad(f"{where}: images go in image_url parts, not {IMAGE_TOKEN} tags", where)
            text = content
        elif isinstance(content, list):
            text = _parts(content, where, images, opts, m["role"])
        else:
            raise bad(f"{where}: content must be a string or a list of parts", f"{where}.content")
        # the templates know system; OpenAI's developer role is its newer name
        role = "system" if m["role"] == "developer" else m["role"]
        messages.append({"role": role, "content": text})
    if messages[-1]["role"] != "user":
        raise bad("the last message must be the user's", "messages")
    return messages, images


def _parts(
    parts: list[Any], where: str, images: list[Image.Image], opts: ServeOptions, role: str
) -> str:
    pieces: list[str] = []
    for j, part in enumerate(parts):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if IMAGE_TOKEN in part["text"]:
                raise bad(f"{at}: images go in image_url parts, not {IMAGE_TOKEN} tags", at)
            pieces.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise bad(f"{at}: only user messages may hold images", at)
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad(f"{at}: image_url needs a url", f"{at}.image_url")
            images.append(load_image_url(url, opts, at))
            pieces.append(IMAGE_TOKEN)
        else:
            raise bad(f"{at}: a part is {{'type': 'text', 'text': ...}} or image_url", at)
    return "\n".join(pieces)


def load_image_url(url: str, opts: ServeOptions, where: str = "image_url") -> Image.Image:
    """A data URL's image, or a local file's under the allowed folder."""
    if url.startswith("data:"):
        return _data_url_image(url, opts, where)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise bad(f"{where}: this server fetches no remote images; send a data URL", where)
    if parsed.scheme not in ("", "file"):
        raise bad(f"{where}: unsupported image URL scheme {parsed.scheme!r}", where)
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        # file://im1.jpg is host "im1.jpg" and no path: say what to write instead
        raise bad(
            f"{where}: {url} names a host ({parsed.netloc!r}), not a file: write "
            f"file:///ABSOLUTE/PATH, or the path under the image folder ({parsed.netloc}"
            f"{parsed.path})",
            where,
        )
    if opts.image_dir is None:
        raise APIError(
            403,
            f"{where}: local images are off (start the server with --image-dir to allow a folder)",
            type="permission_error",
            param=where,
        )
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else url).expanduser()
    root = opts.image_dir.resolve()
    try:
        resolved = (path if path.is_absolute() else root / path).resolve()
    except OSError as err:
        raise bad(f"{where}: cannot resolve the path: {err.strerror}", where) from None
    if not resolved.is_relative_to(root):
        raise APIError(
            403,
            f"{where}: {path} is outside the allowed image folder",
            type="permission_error",
            param=where,
        )
    if not resolved.is_file():
        raise bad(f"{where}: no image file {path}", where)
    if resolved.stat().st_size > opts.max_image_bytes:
        raise _too_large(where, opts)
    return _decoded(resolved.read_bytes(), where, str(path), opts)


def _data_url_image(url: str, opts: ServeOptions, where: str) -> Image.Image:
    m = _DATA_URL.fullmatch(url)
    if m is None or ";base64" not in m["params"]:
        raise bad(f"{where}: a data URL must be data:image/...;base64,...", where)
    if not (m["mime"] or "").startswith("image/"):
        raise bad(f"{where}: the data URL holds {m['mime'] or 'no type'}, not an image", where)
    if len(m["data"]) * 3 // 4 > opts.max_image_bytes:
        raise _too_large(where, opts)
    try:
        data = base64.b64decode(m["data"], validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{where}: the data URL is not valid base64", where) from None
    return _decoded(data, where, "data URL", opts)


def _too_large(where: str, opts: ServeOptions) -> APIError:
    return APIError(
        413, f"{where}: the image is over the {opts.max_image_bytes} byte limit", param=where
    )


def _decoded(data: bytes, where: str, name: str, opts: ServeOptions) -> Image.Image:
    try:
        with _DECODE_SLOTS:
            return image_from_bytes(data, name, opts.max_image_pixels)
    except BadImage as err:
        if err.reason == "oversize_image":
            raise bad(
                f"{where}: {err.detail} (this server's --max-image-pixels); send a smaller image",
                where,
                "image_too_large",
            ) from None
        raise bad(f"{where}: not a readable image ({err.detail})", where) from None


def _prompt(
    messages: list[dict[str, str]],
    images: list[Image.Image],
    p: Pretrained,
    opts: ServeOptions,
    kwargs: Mapping[str, Any],
) -> list[int]:
    fmt = replace(p.prompt_format, chat_template=opts.chat_template)
    try:
        return tokenize_chat_prompt(messages, images, p.tokenizer, fmt, kwargs)
    # the messages and chat_template_kwargs are the client's: a template failing on them
    # (a variable of the wrong type: TypeError, AttributeError...) is a bad request
    except (
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        IndexError,
        jinja2.TemplateError,
    ) as err:
        raise bad(f"the chat template refused the messages: {err}", "messages") from None
