"""The record every reader yields: one document of text and images in reading order."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from PIL import Image

# A message's role as written by LLaVA-style data (or already canonical) -> its canonical role
# in `Conversation.messages`.
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class Document:
    """Text and images in reading order.

    `parts` alternates freely between strings and decoded PIL images. A caption pair is
    `[image, caption]`, an interleaved web document any order, a text document `[text]`.
    """

    id: str
    kind: str  # captions | interleaved | text | sft (how it is packed, whose loss it counts in)
    parts: list[str | Image.Image]
    meta: dict = field(default_factory=dict)

    @property
    def images(self) -> list[Image.Image]:
        return [p for p in self.parts if isinstance(p, Image.Image)]

    @property
    def num_images(self) -> int:
        return sum(isinstance(p, Image.Image) for p in self.parts)

    @property
    def text_chars(self) -> int:
        """Characters of text, what tokenizing it costs (`data.max_text_chars`)."""
        return sum(len(p) for p in self.parts if isinstance(p, str))


@dataclass
class Conversation:
    """A supervised fine-tuning sample in LLaVA's shape.

    `messages` is a list of {"role": "user" | "assistant" | "system", "content": str}; each
    `<image>` in a content string marks where the next image of `images` goes. Text-only samples
    have no images.
    """

    id: str
    images: list[Image.Image]
    messages: list[dict[str, str]]
    kind: str = "sft"
    meta: dict = field(default_factory=dict)

    @property
    def text_chars(self) -> int:
        """Characters of text in its messages (`data.max_text_chars`)."""
        return sum(len(c) for m in self.messages if isinstance(c := m.get("content"), str))


def caption_first(doc: Document, share: float, seed: int) -> Document:
    """A caption pair ([image, caption], kind captions) written [caption, image] for `share` of
    the pairs, drawn by its id and `seed`, so every read of a record draws the same
    (`data.caption_first`; two sources' records of the same id draw alike); any other document
    as it is."""
    parts = doc.parts
    if share <= 0 or doc.kind != "captions" or len(parts) != 2:
        return doc
    if not (isinstance(parts[0], Image.Image) and isinstance(parts[1], str)):
        return doc
    if random.Random(f"{seed}:{doc.id}").random() >= share:
        return doc
    return replace(doc, parts=[parts[1], parts[0]])
