"""Few-shot prompts: templates, demonstrations and query as text, tokenization, and the
post-processing of generations (OpenFlamingo's protocol, REFERENCE §1).

- Templates: captioning `<image>Output:{caption}<|endofchunk|>`, VQA
  `<image>Question:{question} Short answer:{answer}<|endofchunk|>`; the query is the template cut
  right before its answer field (`<image>Output:`). The text is tokenized the way training
  documents are (`tokenize_document`: one encode call, BOS first, each `<image>` expanded to the
  image slots of the model's `PromptFormat`, with its boundaries). Few-shot prompts are
  pre-training style: the chat template is not used.
- Demonstrations are each followed by a newline, captions stripped, as OpenFlamingo writes them
  (`open_flamingo/eval/evaluate.py`); generation stops at `<|endofchunk|>` (and EOS).
- Post-processing (OpenFlamingo's): the text is cut at the first stop string and at the start of
  a new example (the template's "Output:" / "Question:"); captions are also cut at "Output" and
  lose their double quotes; VQA answers are cut at "Question", "Answer" or "Short" and at the
  first ", ". Case is left to the metric (the official VQA rules compare it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mm1.data.document import Document
from mm1.data.prompt_format import PromptFormat
from mm1.data.tokenizer import (
    ENDOFCHUNK_TOKEN,
    IMAGE_TOKEN,
    Tokenizer,
    tokenize_document,
    tokenize_prompt,
)
from mm1.eval.tasks import Example

CAPTION_TEMPLATE = "<image>Output:{caption}<|endofchunk|>"
VQA_TEMPLATE = "<image>Question:{question} Short answer:{answer}<|endofchunk|>"
DEFAULT_STOP_STRINGS = (ENDOFCHUNK_TOKEN,)
DEMO_SEPARATOR = "\n"  # after every demonstration, as OpenFlamingo joins them
_ANSWER_FIELD = {"caption": "{caption}", "vqa": "{answer}"}
# Marks where an image goes when only the token ids are wanted (the single-crop format's slot
# count does not depend on the image; a layout whose count does must be given the images).
_SLOT = Image.new("RGB", (1, 1))


@dataclass(frozen=True)
class PromptTemplates:
    """One template per task kind; `{caption}` / `{answer}` is where the demonstration's answer
    goes (the query stops right before it), `{question}` the VQA question, and exactly one
    `<image>` marks the image, before the answer field."""

    caption: str = CAPTION_TEMPLATE
    vqa: str = VQA_TEMPLATE

    def __post_init__(self) -> None:
        for kind in ("caption", "vqa"):
            t = getattr(self, kind)
            field_ = _ANSWER_FIELD[kind]
            if t.count(field_) != 1:
                raise ValueError(f"{kind} template {t!r} needs exactly one {field_}")
            if t.count(IMAGE_TOKEN) != 1 or t.index(IMAGE_TOKEN) > t.index(field_):
                raise ValueError(f"{kind} template {t!r} needs one {IMAGE_TOKEN} before {field_}")

    def get(self, kind: str) -> str:
        return getattr(self, kind)


def format_demo(template: str, example: Example, with_image: bool = True) -> str:
    """A demonstration: the template filled with the example's question and answer."""
    target = example.target.strip()
    text = template.format(question=example.question or "", caption=target, answer=target)
    return text if with_image else text.replace(IMAGE_TOKEN, "")


def format_query(template: str, kind: str, example: Example) -> str:
    """The query: the template up to (not including) the answer field."""
    head = template[: template.index(_ANSWER_FIELD[kind])]
    return head.format(question=example.question or "")


def new_example_markers(templates: PromptTemplates, kind: str) -> tuple[str, ...]:
    """Text that starts a new example (e.g. "Output:", "Question:"): a generation is cut there."""
    t = templates.get(kind)
    start = t.index(IMAGE_TOKEN) + len(IMAGE_TOKEN)
    marker = t[start:].split("{", 1)[0].strip()
    return (marker,) if marker else ()


@dataclass
class Prompt:
    """A tokenized prompt: `input_ids` with image slots expanded, `images` in slot order."""

    text: str
    input_ids: list[int]
    images: list[Path]
    # Per image, whether it is written in the model's high-resolution layout (None: all are);
    # a tiled layout's few-shot prompts keep only their last images high-res.
    high_res: list[bool] | None = None


def high_res_flags(n_images: int, last: int) -> list[bool]:
    """Which of a prompt's `n_images` images keep the high-resolution layout: the last `last`
    (0: all), the others take the `single` form (MM1's many-shot prompts)."""
    return [last == 0 or i >= n_images - last for i in range(n_images)]


def encode_prompt(
    tokenizer: Tokenizer,
    text: str,
    fmt: PromptFormat,
    images: Sequence[Image.Image] | None = None,
) -> list[int]:
    """Token ids of a prompt whose images are marked by `<image>`: BOS, the text encoded in one
    call, each `<image>` expanded to its image's slots as `fmt` writes them (as training
    documents). Without `images`, a placeholder stands for each."""
    pieces = text.split(IMAGE_TOKEN)
    if images is not None and len(images) != len(pieces) - 1:
        raise ValueError(
            f"the prompt has {len(pieces) - 1} {IMAGE_TOKEN} tags for {len(images)} images"
        )
    parts: list[str | Image.Image] = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append(_SLOT if images is None else images[i - 1])
        if piece:
            parts.append(piece)
    doc = Document(id="prompt", kind="eval", parts=parts)
    return tokenize_document(doc, tokenizer, fmt, add_eos=False).input_ids


def build_prompt(
    tokenizer: Tokenizer,
    fmt: PromptFormat,
    kind: str,
    demos: Sequence[Example],
    query: Example,
    *,
    templates: PromptTemplates | None = None,
    text_only_demos: bool = False,
    query_image: Path | None = None,
    image_size: Callable[[Path], tuple[int, int]] | None = None,
    high_res_last: int = 0,
) -> Prompt:
    """Demonstrations then the query, tokenized; `query_image` replaces the query's own image
    (the shuffled-image control). A tiled layout's slots depend on each image's size:
    `image_size(path)` gives it (width, height), and only the last `high_res_last` images
    (0: all) are tiled, the others written in the `single` form."""
    templates = templates or PromptTemplates()
    template = templates.get(kind)
    text = "".join(format_demo(template, d, not text_only_demos) + DEMO_SEPARATOR for d in demos)
    text += format_query(template, kind, query)
    images = [] if text_only_demos else [d.image for d in demos]
    images.append(query.image if query_image is None else query_image)
    if image_size is None:
        return Prompt(text, encode_prompt(tokenizer, text, fmt), images)
    flags = high_res_flags(len(images), high_res_last)
    # Blank stand-ins of the right sizes: slots depend on the size alone.
    stand_ins = [Image.new("L", image_size(p)) for p in images]
    ids = tokenize_prompt(text, stand_ins, tokenizer, fmt, flags)
    return Prompt(text, ids, images, flags)


def postprocess(text: str, kind: str, stops: Sequence[str] = DEFAULT_STOP_STRINGS) -> str:
    """Cut a generation at the first of `stops`, then as OpenFlamingo does
    (`postprocess_captioning_generation` + quote removal; `postprocess_vqa_generation`), and
    strip it."""
    for s in stops:
        if s:
            text = text.split(s, 1)[0]
    if kind == "vqa":
        text = re.split("Question|Answer|Short", text, maxsplit=1)[0]
        text = text.split(", ", 1)[0]
    else:
        text = text.split("Output", 1)[0].replace('"', "")
    return text.strip()
