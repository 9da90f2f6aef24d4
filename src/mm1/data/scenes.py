"""The synthetic world's content: scenes of coloured shapes, their rendering, and the language
about them (captions in two styles, VQA questions and answers, interleaved documents, text
documents, SFT conversations). Every fact is known, so grounded answers can be checked.
`mm1.data.synthetic` writes this content to disk in the formats users bring."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORLD_FORMAT_VERSION = 1
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<image>", "<|endofchunk|>")
SIZE_NAMES = ("tiny", "small", "medium")

# ----------------------------------------------------------------------------------------------
# Vocabulary of the world
# ----------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SHAPE_CORNERS = {"circle": 0, "square": 4, "triangle": 3, "star": 10, "diamond": 4, "cross": 12}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 84, 225),
    "yellow": (245, 212, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
    "white": (246, 246, 246),
    "black": (18, 18, 18),
}
SIZES = ("small", "large")
# Also the canonical reading order in which objects are listed.
POSITIONS = ("top", "left", "center", "right", "bottom")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "light gray": (180, 180, 180),
    "dark gray": (82, 82, 82),
    "beige": (196, 182, 156),
}
TEXTURES = ("plain", "noise", "stripes", "gradient")
# Short words only: a 4-letter word rendered with PIL's bitmap font stays readable at 64 px.
WORDS = (
    "stop", "open", "sale", "exit", "cat", "dog", "sun", "moon", "fish", "tree", "book", "cake",
    "milk", "rain", "ship", "bird", "frog", "hat", "car", "bus", "egg", "key", "map", "pen",
)  # fmt: skip
MAX_NUMBER = 99
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip

# Relative centres of the five positions and object diameters (fractions of the image side).
# A small object is 0.26 × 64 ≈ 17 px; a large one 0.36 × 64 ≈ 23 px. With more than one object a
# centre object is always small, so neighbours never overlap.
_POS_XY = {
    "top": (0.5, 0.19),
    "left": (0.19, 0.5),
    "center": (0.5, 0.5),
    "right": (0.81, 0.5),
    "bottom": (0.5, 0.81),
}
_DIAMETER = {"small": 0.26, "large": 0.36}
_POS_PHRASE = {
    "top": "at the top",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom": "at the bottom",
}
_POS_PHRASE_VARIANTS = {
    "top": ("at the top", "near the top", "at the top of the image", "in the upper part"),
    "left": ("on the left", "to the left", "on the left side", "at the left"),
    "center": ("in the center", "in the middle", "in the center of the image"),
    "right": ("on the right", "to the right", "on the right side", "at the right"),
    "bottom": (
        "at the bottom",
        "near the bottom",
        "at the bottom of the image",
        "in the lower part",
    ),
}
_SIZE_VARIANTS = {"small": ("small", "little", "small"), "large": ("large", "big", "large")}
_LIGHT_BACKGROUNDS = ("light gray", "beige")


def _count_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + ("es" if word.endswith(("s", "x")) else "s")


def _a(word: str) -> str:
    """The indefinite article for `word`: "a red", "an orange"."""
    return "an" if word[:1] in "aeiou" else "a"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: str

    def phrase(self, with_size: bool = True, with_position: bool = True) -> str:
        words = ([self.size] if with_size else []) + [self.color, self.shape]
        text = _a(words[0]) + " " + " ".join(words)
        return f"{text} {_POS_PHRASE[self.position]}" if with_position else text


@dataclass(frozen=True)
class Scene:
    """What an image shows. `noise_seed` only drives the background texture."""

    objects: tuple[SceneObject, ...]
    background: str
    texture: str
    text: str | None = None
    text_color: str | None = None
    noise_seed: int = 0

    @property
    def count(self) -> int:
        return len(self.objects)

    @property
    def text_kind(self) -> str | None:
        if self.text is None:
            return None
        return "number" if self.text.isdigit() else "word"

    def signature(self) -> str:
        """The visible content (everything but the texture noise), as a canonical string."""
        d = self.to_dict()
        d.pop("count")
        return json.dumps(d, sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "objects": [asdict(o) for o in self.objects],
            "count": self.count,
            "background": self.background,
            "texture": self.texture,
            "text": self.text,
            "text_color": self.text_color,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(
            objects=tuple(SceneObject(**o) for o in d["objects"]),
            background=d["background"],
            texture=d["texture"],
            text=d.get("text"),
            text_color=d.get("text_color"),
        )


def scene_split(scene: Scene) -> str:
    """The split a scene belongs to: "val" (5%), "support" (5%) or "train" (90%).

    Decided by a hash of the visible content, so evaluation scenes never occur in training data.
    """
    h = int(hashlib.sha256(scene.signature().encode()).hexdigest()[:8], 16) % 20
    return "val" if h == 0 else "support" if h == 1 else "train"


def _draw_scene(rng: random.Random, text_kind: str | None) -> Scene:
    if text_kind is not None:
        text = rng.choice(WORDS) if text_kind == "word" else str(rng.randint(0, MAX_NUMBER))
        n = rng.choice((0, 0, 1, 1, 2))
        positions = rng.sample(("top", "bottom"), n)
        sizes = ["small"] * n
    else:
        text = None
        n = rng.choices((1, 2, 3, 4), weights=(25, 30, 25, 20))[0]
        positions = rng.sample(POSITIONS, n)
        sizes = [rng.choice(SIZES) for _ in range(n)]
        if n > 1 and "center" in positions:
            sizes[positions.index("center")] = "small"
    objects = [
        SceneObject(rng.choice(SHAPES), rng.choice(tuple(COLORS)), size, pos)
        for size, pos in zip(sizes, positions)
    ]
    objects.sort(key=lambda o: POSITIONS.index(o.position))
    background = rng.choice(tuple(BACKGROUNDS))
    texture = rng.choices(TEXTURES, weights=(40, 25, 20, 15))[0]
    text_color = None
    if text is not None:
        if background in _LIGHT_BACKGROUNDS:
            text_color = "black"
        elif background == "dark gray":
            text_color = "white"
        else:
            text_color = rng.choice(("black", "white"))
    return Scene(tuple(objects), background, texture, text, text_color, rng.getrandbits(32))


def sample_scene(
    rng: random.Random,
    split: str = "train",
    text_rich: bool | None = None,
    text_kind: str | None = None,
) -> Scene:
    """Draw a random scene of `split` ("train", "val" or "support").

    `text_rich=None` makes 15% of scenes text-rich; `text_kind` ("word"/"number") forces one.
    """
    if split not in ("train", "val", "support"):
        raise ValueError(f"unknown split {split!r}: expected train, val or support")
    while True:
        kind = text_kind
        if kind is None:
            rich = rng.random() < 0.15 if text_rich is None else text_rich
            kind = rng.choice(("word", "word", "number")) if rich else None
        scene = _draw_scene(rng, kind)
        if scene_split(scene) == split:
            return scene


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

_SUPERSAMPLE = 2


def _font() -> ImageFont.ImageFont:
    if hasattr(ImageFont, "load_default_imagefont"):  # Pillow >= 10.1: always the bitmap font
        return ImageFont.load_default_imagefont()
    return ImageFont.load_default()  # type: ignore[return-value]


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.86 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        cy += 0.12 * r
        return [
            (cx + r * np.cos(a), cy + r * np.sin(a)) for a in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6)
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy + 0.06 * r + rad * np.sin(a)))
        return pts
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.78 * r, cy), (cx, cy + r), (cx - 0.78 * r, cy)]
    if shape == "cross":
        w = 0.34 * r
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def _background(scene: Scene, side: int) -> np.ndarray:
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    arr = np.broadcast_to(base, (side, side, 3)).copy()
    rng = np.random.default_rng(scene.noise_seed)
    if scene.texture == "noise":
        arr += rng.normal(0.0, 9.0, size=(side, side, 1)).astype(np.float32)
    elif scene.texture == "stripes":
        period = side / rng.choice((6, 8, 10))
        yy, xx = np.mgrid[0:side, 0:side]
        direction = (xx + yy) if rng.random() < 0.5 else (xx - yy)
        arr += (7.0 * np.sign(np.sin(2 * np.pi * direction / period)))[..., None]
    elif scene.texture == "gradient":
        ramp = np.linspace(-16.0, 16.0, side, dtype=np.float32)
        arr += (ramp[:, None] if rng.random() < 0.5 else ramp[None, :])[..., None]
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw `scene` as an RGB image of `image_size`² pixels (drawn at 2× and box-downsampled)."""
    side = image_size * _SUPERSAMPLE
    img = Image.fromarray(_background(scene, side), "RGB")
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        fx, fy = _POS_XY[obj.position]
        cx, cy, r = fx * side, fy * side, _DIAMETER[obj.size] * side / 2
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=fill)
    if scene.text is not None:
        font = _font()
        left, top, right, bottom = font.getbbox(scene.text)
        w, h = right - left, bottom - top
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).text((-left, -top), scene.text, fill=255, font=font)
        max_h = (0.30 if scene.objects else 0.42) * side
        k = min(0.8 * side / w, max_h / h)
        tw, th = max(1, round(w * k)), max(1, round(h * k))
        mask = mask.resize((tw, th), Image.NEAREST)
        x0, y0 = (side - tw) // 2, (side - th) // 2
        img.paste(COLORS[scene.text_color or "black"], (x0, y0, x0 + tw, y0 + th), mask)
    return img.resize((image_size, image_size), Image.BOX)


# ----------------------------------------------------------------------------------------------
# Language about scenes
# ----------------------------------------------------------------------------------------------


def _text_phrase(scene: Scene, rng: random.Random | None = None) -> str:
    written = "written in" if rng is None else rng.choice(("written in", "in", "written in"))
    if scene.text_kind == "number":
        return f"the number {scene.text} {written} {scene.text_color}"
    return f'the word "{scene.text}" {written} {scene.text_color}'


def _objects_phrase(scene: Scene, rng: random.Random | None = None) -> str:
    """Canonical (rng=None) or naturally varied listing of the objects."""
    if rng is None:
        return _join([o.phrase() for o in scene.objects])
    objs = list(scene.objects)
    if rng.random() < 0.4:
        rng.shuffle(objs)
    phrases = []
    for o in objs:
        size = rng.choice(_SIZE_VARIANTS[o.size])
        pos = rng.choice(_POS_PHRASE_VARIANTS[o.position])
        phrases.append(f"a {size} {o.color} {o.shape} {pos}")
    return _join(phrases)


def _content_phrase(scene: Scene, rng: random.Random | None = None) -> str:
    if scene.text is None:
        return _objects_phrase(scene, rng)
    text = _text_phrase(scene, rng)
    if not scene.objects:
        return text
    return f"{text}, with {_objects_phrase(scene, rng)}"


def detailed_caption(scene: Scene, template: int = 0, rng: random.Random | None = None) -> str:
    """A detailed re-caption (VeCap style). Template 0 with rng=None is the canonical caption,
    e.g. "a large red circle on the left and a small blue square at the top."."""
    content = _content_phrase(scene, rng)
    n = scene.count
    if template == 0:
        return f"{content}."
    if template == 1:
        if scene.text is not None:
            return f"{content}, on a {scene.background} background."
        return (
            f"{_count_word(n)} {_plural(n, 'shape')} on a {scene.background} background: {content}."
        )
    if template == 2:
        return f"a picture of {content}, on a {scene.background} background."
    if template == 3:
        start = rng.choice(("there is", "an image of", "this picture shows", "a drawing of"))
        return f"{start} {content}."
    if template == 4:
        if n == 0:
            return f"a {scene.background} picture showing {content}."
        return f"{_count_word(n)} {_plural(n, 'object')}: {content}."
    raise ValueError(f"unknown caption template {template}")


def vecap_caption(scene: Scene, rng: random.Random) -> str:
    """The re-caption written to the VeCap-style caption source: mostly canonical."""
    template = rng.choices((0, 1, 2), weights=(50, 25, 25))[0]
    return detailed_caption(scene, template)


def reference_captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """`n` distinct COCO-style references: the canonical caption plus natural variations."""
    refs = [detailed_caption(scene, 0)]
    tries = 0
    while len(refs) < n and tries < 200:
        tries += 1
        cand = detailed_caption(scene, rng.choice((0, 1, 2, 3, 4)), rng)
        if cand not in refs:
            refs.append(cand)
    while len(refs) < n:  # a scene too simple to vary: repeat with a different opener
        refs.append(f"an image with {refs[len(refs) % len(refs)]}")
    return refs


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 4:
        return word
    i = rng.randrange(1, len(word) - 1)
    op = rng.choice(("drop", "swap", "double"))
    if op == "drop":
        return word[:i] + word[i + 1 :]
    if op == "swap":
        return word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]


def alt_text(scene: Scene, rng: random.Random) -> str:
    """Short, noisy web alt-text: partial, sometimes uninformative, with typos and clutter."""
    objs = scene.objects
    n = scene.count
    options: list[Callable[[], str]] = [
        lambda: rng.choice(("shapes", "image", "untitled", "clipart", "geometric shapes")),
        lambda: f"IMG_{rng.randint(1000, 9999)}.jpg",
        lambda: "shapes on " + scene.background + " background",
    ]
    if objs:
        options += [
            lambda: f"pic of {n} {_plural(n, 'shape')}",
            lambda: f"{n} {_plural(n, 'shape')} on {scene.background}",
        ]
        o = rng.choice(objs)
        options += [
            lambda: f"{o.color} {o.shape}",
            lambda: f"{o.color} {o.shape}",
            lambda: f"{o.shape}",
            lambda: f"{o.size} {o.color} {o.shape}",
            lambda: ", ".join(sorted({x.shape for x in objs})),
            lambda: " and ".join(f"{x.color} {x.shape}" for x in objs[:2]),
            lambda: f"{_count_word(n)} {_plural(n, 'shape')}: " + ", ".join(x.shape for x in objs),
        ]
    if scene.text is not None:
        options += [
            lambda: f'"{scene.text.upper()}" sign',
            lambda: scene.text.upper(),
            lambda: f"number {scene.text}" if scene.text_kind == "number" else scene.text,
        ]
    text = rng.choice(options)()
    if rng.random() < 0.15:
        words = text.split(" ")
        j = rng.randrange(len(words))
        words[j] = _typo(words[j], rng)
        text = " ".join(words)
    r = rng.random()
    if r < 0.12:
        text = text.title()
    elif r < 0.18:
        text = text.upper()
    if rng.random() < 0.15:
        text += rng.choice((" - stock photo", " | free clipart", " #shapes", " (vector)", " png"))
    return text


class QA(NamedTuple):
    """A question about a scene with its short answer and a full-sentence answer."""

    question: str
    answer: str
    question_type: str  # VQAv2-style question prefix
    answer_type: str  # "yes/no" | "number" | "other"
    long: str
    kind: str  # color | count | color_count | exists | shape_at | where | size | size_yn | text


def _scene_qas(scene: Scene, rng: random.Random) -> dict[str, list[QA]]:
    objs = scene.objects
    n = scene.count
    shape_count = Counter(o.shape for o in objs)
    pair_count = Counter((o.color, o.shape) for o in objs)
    out: dict[str, list[QA]] = {}

    def add(kind: str, *args: str) -> None:
        out.setdefault(kind, []).append(QA(*args, kind=kind))

    for o in objs:
        if shape_count[o.shape] == 1:
            add(
                "color",
                f"What color is the {o.shape}?",
                o.color,
                "what color is the",
                "other",
                f"The {o.shape} is {o.color}.",
            )
            add(
                "size",
                f"What size is the {o.shape}?",
                o.size,
                "what size is the",
                "other",
                f"The {o.shape} is {o.size}.",
            )
            yn = rng.choice(SIZES)
            add(
                "size_yn",
                f"Is the {o.shape} {yn}?",
                "yes" if o.size == yn else "no",
                "is the",
                "yes/no",
                f"{'Yes' if o.size == yn else 'No'}, the {o.shape} is {o.size}.",
            )
        if pair_count[(o.color, o.shape)] == 1:
            add(
                "where",
                f"Where is the {o.color} {o.shape}?",
                o.position,
                "where is the",
                "other",
                f"The {o.color} {o.shape} is {_POS_PHRASE[o.position]}.",
            )
        add(
            "shape_at",
            f"What shape is {_POS_PHRASE[o.position]}?",
            o.shape,
            "what shape is",
            "other",
            f"There is {_a(o.color)} {o.color} {o.shape} {_POS_PHRASE[o.position]}.",
        )
    if objs or scene.text is None:
        q = rng.choice(
            (
                "How many objects are there?",
                "How many shapes are in the picture?",
                "How many shapes are there?",
            )
        )
        what = "object" if "objects" in q else "shape"
        add(
            "count",
            q,
            str(n),
            "how many",
            "number",
            f"There {'is' if n == 1 else 'are'} {n} {_plural(n, what)}.",
        )
    if objs:
        color = rng.choice([o.color for o in objs] + list(COLORS)[:2])
        c = sum(o.color == color for o in objs)
        add(
            "color_count",
            f"How many {color} objects are there?",
            str(c),
            "how many",
            "number",
            f"There {'is' if c == 1 else 'are'} {c} {color} {_plural(c, 'object')}.",
        )
        if rng.random() < 0.5:
            o = rng.choice(objs)
            color, shape = o.color, o.shape
        else:
            color, shape = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
        there = (color, shape) in pair_count
        add(
            "exists",
            f"Is there {_a(color)} {color} {shape}?",
            "yes" if there else "no",
            "is there a",
            "yes/no",
            f"Yes, there is {_a(color)} {color} {shape}."
            if there
            else f"No, there is no {color} {shape}.",
        )
    if scene.text is not None:
        if scene.text_kind == "number":
            add(
                "text",
                rng.choice(("What number is shown?", "What number is written in the image?")),
                scene.text,
                "what number is",
                "number",
                f"The number {scene.text} is written in the image.",
            )
        else:
            q = rng.choice(("What word is written in the image?", "What does the sign say?"))
            add(
                "text",
                q,
                scene.text,
                "what does the" if "sign" in q else "what word is",
                "other",
                f'The text says "{scene.text}".',
            )
    return out


_QA_WEIGHTS = {
    "color": 5,
    "count": 4,
    "exists": 3,
    "text": 6,
    "where": 2,
    "shape_at": 2,
    "color_count": 1,
    "size": 1,
    "size_yn": 1,
}


def scene_questions(scene: Scene, rng: random.Random, k: int = 3) -> list[QA]:
    """Up to `k` distinct questions about `scene`, of different kinds where possible."""
    by_kind = _scene_qas(scene, rng)
    kinds = sorted(by_kind)
    picked: list[QA] = []
    while kinds and len(picked) < k:
        kind = rng.choices(kinds, weights=[_QA_WEIGHTS[x] for x in kinds])[0]
        kinds.remove(kind)
        picked.append(rng.choice(by_kind[kind]))
    return picked


_ANSWER_SHADES = {
    "red": "dark red",
    "green": "dark green",
    "blue": "light blue",
    "yellow": "gold",
    "purple": "violet",
    "orange": "dark orange",
    "white": "off white",
    "black": "dark",
}
_SHAPE_SYNONYMS = {
    "circle": "round",
    "square": "rectangle",
    "triangle": "triangular",
    "star": "stars",
    "diamond": "rhombus",
    "cross": "plus",
}


def _answer_variant(qa: QA, rng: random.Random) -> str:
    a = qa.answer
    if qa.kind in ("color",):
        return rng.choice((_cap(a), f"{a} color", _ANSWER_SHADES[a], a))
    if qa.answer_type == "number":
        n = int(a)
        return rng.choice((_count_word(n), f"{a} ", _count_word(n), f"{a} objects"))
    if qa.answer_type == "yes/no":
        return rng.choice((_cap(a), f"{a}.", "yeah" if a == "yes" else "nope", _cap(a)))
    if qa.kind == "shape_at":
        return rng.choice((f"a {a}", _cap(a), _SHAPE_SYNONYMS[a], f"{a}s"))
    if qa.kind == "where":
        return rng.choice(
            (f"on the {a}" if a != "center" else "in the middle", _cap(a), f"{a} side")
        )
    if qa.kind == "size":
        return rng.choice(({"small": "little", "large": "big"}[a], _cap(a), f"very {a}"))
    if qa.kind == "text":
        return rng.choice((a.upper(), f'"{a}"', _cap(a)))
    return _cap(a)


def _wrong_answer(qa: QA, rng: random.Random) -> str:
    a = qa.answer
    if qa.answer_type == "number":
        return str(max(0, int(a) + rng.choice((-1, 1))))
    if qa.answer_type == "yes/no":
        return "no" if a == "yes" else "yes"
    pools = {"color": tuple(COLORS), "shape_at": SHAPES, "where": POSITIONS, "size": SIZES}
    pool = [x for x in pools.get(qa.kind, WORDS) if x != a]
    return rng.choice(pool)


def vqa_answers(qa: QA, rng: random.Random) -> list[str]:
    """Ten human-like answers: mostly the right one, some variants, an occasional wrong one."""
    variant_rate = rng.choice((0.0, 0.1, 0.2, 0.3))
    wrong_rate = rng.choice((0.0, 0.0, 0.05, 0.1))
    answers = []
    for _ in range(10):
        r = rng.random()
        if r < wrong_rate:
            answers.append(_wrong_answer(qa, rng))
        elif r < wrong_rate + variant_rate:
            answers.append(_answer_variant(qa, rng))
        else:
            answers.append(qa.answer)
    if answers.count(qa.answer) < 5:  # keep the right answer the clear majority
        answers = [qa.answer] * 5 + answers[5:]
    return answers


# ----------------------------------------------------------------------------------------------
# Documents (lists of str | Scene)
# ----------------------------------------------------------------------------------------------

Part = str | Scene


def _qa_format(rng: random.Random) -> Callable[[QA], str]:
    style = rng.choice(("answer", "short", "qa"))
    if style == "answer":
        return lambda qa: f"Question: {qa.question} Answer: {qa.answer}."
    if style == "short":
        return lambda qa: f"Question:{qa.question} Short answer:{qa.answer}"
    return lambda qa: f"Q: {qa.question} A: {qa.answer}."


def _doc_catalogue(rng: random.Random, scenes: list[Scene]) -> list[Part]:
    header = rng.choice(
        (
            "Catalogue of shapes.",
            "Our collection of pictures.",
            "Items for sale:",
            "Shape catalogue.",
        )
    )
    parts: list[Part] = [header]
    for i, sc in enumerate(scenes, 1):
        parts += [f"Item {i}:", sc, detailed_caption(sc, 0)]
    return parts


def _doc_gallery(rng: random.Random, scenes: list[Scene]) -> list[Part]:
    style = rng.choice(("output", "photo", "plain", "caption"))
    parts: list[Part] = []
    if rng.random() < 0.5:
        parts.append(rng.choice(("My drawings.", "A gallery of shapes.", "Some pictures I made.")))
    for i, sc in enumerate(scenes, 1):
        cap = detailed_caption(sc, 0) if rng.random() < 0.6 else detailed_caption(sc, 3, rng)
        if style == "output":
            parts += [sc, f"Output:{cap}"]
        elif style == "photo":
            parts += [sc, f"Photo {i} shows {cap}"]
        elif style == "caption":
            parts += [sc, f"Caption: {cap}"]
        else:
            parts += [sc, _cap(cap)]
    return parts


def _doc_vqa(rng: random.Random, scenes: list[Scene]) -> list[Part]:
    fmt = _qa_format(rng)
    parts: list[Part] = []
    if rng.random() < 0.4:
        parts.append("Answer the questions about each picture.")
    for sc in scenes:
        qas = scene_questions(sc, rng, k=rng.choice((1, 1, 2)))
        parts += [sc, " ".join(fmt(qa) for qa in qas)]
    return parts


def _doc_counting(rng: random.Random, scenes: list[Scene]) -> list[Part]:
    counts = [sc.count for sc in scenes]
    total = sum(counts)
    if len(scenes) == 2 and rng.random() < 0.5:
        a, b = counts
        return [
            scenes[0],
            f"has {a} {_plural(a, 'object')} and",
            scenes[1],
            f"has {b}, so {total} in total.",
        ]
    parts: list[Part] = []
    for i, sc in enumerate(scenes):
        n = counts[i]
        word = (
            "This picture" if i == 0 else rng.choice(("This one", "The next one", "This picture"))
        )
        parts += [sc, f"{word} has {n} {_plural(n, 'object')}."]
    expr = " plus ".join(str(c) for c in counts)
    parts.append(
        rng.choice(
            (
                f"So there are {total} objects in total.",
                f"{expr} is {total}, so there are {total} objects altogether.",
                f"In total: {total}.",
            )
        )
    )
    return parts


def _doc_comparison(rng: random.Random, scenes: list[Scene]) -> list[Part]:
    scenes = scenes[:3]
    ordinals = ("first", "second", "third")
    explicit = rng.random() < 0.5
    parts: list[Part] = [f"Compare these {_count_word(len(scenes))} pictures."]
    for i, sc in enumerate(scenes):
        if explicit:
            parts += [
                sc,
                f"The {ordinals[i]} picture has {sc.count} {_plural(sc.count, 'object')}.",
            ]
        else:
            parts += [sc, f"This is the {ordinals[i]} picture."]
    sentences = []
    for i in range(len(scenes) - 1):
        a, b = scenes[i].count, scenes[i + 1].count
        rel = (
            "more objects than"
            if a > b
            else "fewer objects than"
            if a < b
            else "as many objects as"
        )
        sentences.append(f"The {ordinals[i]} picture has {rel} the {ordinals[i + 1]}.")
    colors = [{o.color for o in sc.objects} for sc in scenes]
    color = rng.choice(sorted(set().union(*colors)) or ["red"])
    having = [ordinals[i] for i, cs in enumerate(colors) if color in cs]
    if len(having) == len(scenes):
        sentences.append(f"All the pictures have {_a(color)} {color} shape.")
    elif len(having) == 1:
        sentences.append(f"Only the {having[0]} picture has {_a(color)} {color} shape.")
    elif having:
        sentences.append(f"The {' and '.join(having)} pictures have {_a(color)} {color} shape.")
    parts.append(" ".join(sentences))
    return parts


def _doc_text_reading(rng: random.Random, scenes: list[Scene]) -> list[Part]:
    parts: list[Part] = []
    numbers = []
    for sc in scenes:
        if sc.text_kind == "number":
            numbers.append(int(sc.text))  # type: ignore[arg-type]
            parts += [
                sc,
                rng.choice((f"The number shown is {sc.text}.", f"This card says {sc.text}.")),
            ]
        else:
            parts += [
                sc,
                rng.choice((f'The sign says "{sc.text}".', f'This one reads "{sc.text}".')),
            ]
    if len(numbers) >= 2:
        a, b = numbers[:2]
        parts.append(f"{a} plus {b} is {a + b}.")
    return parts


_DOC_TYPES: dict[str, tuple[Callable[[random.Random, list[Scene]], list[Part]], int]] = {
    "catalogue": (_doc_catalogue, 15),
    "gallery": (_doc_gallery, 17),
    "vqa": (_doc_vqa, 25),
    "counting": (_doc_counting, 15),
    "comparison": (_doc_comparison, 15),
    "text_reading": (_doc_text_reading, 13),
}


def interleaved_document(
    rng: random.Random, split: str = "train", text_scale: float = 0.0
) -> tuple[str, list[Part]]:
    """An interleaved document of 2–6 images: (doc_type, parts in reading order).

    With `text_scale` > 0 the images sit inside a web page: an introduction and a closing
    paragraph of about 20 x text_scale sentences each (long-tailed), as real interleaved
    documents carry far more text than images (OBELICS: hundreds of text tokens per image)."""
    doc_type = rng.choices(list(_DOC_TYPES), weights=[w for _, w in _DOC_TYPES.values()])[0]
    k = rng.randint(2, 3) if doc_type == "comparison" else rng.randint(2, 6)
    if doc_type == "text_reading":
        scenes = [sample_scene(rng, split, text_rich=True) for _ in range(k)]
    else:
        scenes = [sample_scene(rng, split) for _ in range(k)]
    parts = _DOC_TYPES[doc_type][0](rng, scenes)
    if text_scale > 0:
        intro = _paragraph(rng, _long_tail(rng, 20 * text_scale))
        outro = _paragraph(rng, _long_tail(rng, 20 * text_scale))
        parts = [
            p
            for p in (intro + " " if intro else "", *parts, " " + outro if outro else "")
            if p != ""
        ]
    return doc_type, _merge_text(parts)


def _long_tail(rng: random.Random, mean: float) -> int:
    """A sentence count with the given mean and an exponential tail (mostly short, some long)."""
    return int(rng.expovariate(1.0 / mean)) if mean > 0 else 0


def _paragraph(rng: random.Random, n: int) -> str:
    topics = rng.sample(_TEXT_TOPICS, 2)
    return " ".join(_sentence(rng.choice(topics), rng) for _ in range(n))


def _merge_text(parts: Iterable[Part]) -> list[Part]:
    out: list[Part] = []
    for p in parts:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] = out[-1] + " " + p
        else:
            out.append(p)
    return out


# --- text-only documents --------------------------------------------------------------------


def _sentence(topic: str, rng: random.Random) -> str:
    if topic == "arithmetic":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        r = rng.random()
        if r < 0.5:
            return f"{a} plus {b} is {a + b}."
        if r < 0.8:
            a, b = max(a, b), min(a, b)
            return f"{a} minus {b} is {a - b}."
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a} times {b} is {a * b}."
    if topic == "number_words":
        n = rng.randint(0, 20)
        return rng.choice((f"{n} is written {_count_word(n)}.", f"{_cap(_count_word(n))} is {n}."))
    if topic == "shapes":
        s = rng.choice(SHAPES)
        c = SHAPE_CORNERS[s]
        if s == "circle":
            return rng.choice(("A circle has no corners.", "A circle is round."))
        if s == "star":
            return rng.choice(("A star has five points.", "A star has ten corners."))
        return f"A {s} has {_count_word(c)} corners."
    if topic == "colors":
        return rng.choice(
            (
                f"{_cap(rng.choice(tuple(COLORS)))} is a color.",
                "Orange is a mix of red and yellow.",
                "Purple is a mix of red and blue.",
                "Green is a mix of blue and yellow.",
                "White and black are colors too.",
                f"{_cap(_join(rng.sample(tuple(COLORS), 3)))} are colors.",
            )
        )
    if topic == "compare":
        a, b = rng.sample(range(0, 21), 2)
        return f"{a} is more than {b}." if a > b else f"{a} is less than {b}."
    if topic == "counting":
        start = rng.randint(0, 10)
        return (
            _cap(", ".join(_count_word(i) for i in range(start, start + rng.randint(3, 6)))) + "."
        )
    if topic == "scene":
        sc = sample_scene(rng, "train")
        n = sc.count
        return f"Imagine a picture with {_content_phrase(sc)}. It has {n} {_plural(n, 'object')}."
    if topic == "qa":
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        s = rng.choice(SHAPES[1:])
        return rng.choice(
            (
                f"Question: what is {a} plus {b}? Answer: {a + b}.",
                f"Question: how many corners does a {s} have? Answer: {SHAPE_CORNERS[s]}.",
            )
        )
    raise ValueError(topic)


_TEXT_TOPICS = (
    "arithmetic",
    "number_words",
    "shapes",
    "colors",
    "compare",
    "counting",
    "scene",
    "qa",
)


def text_document(rng: random.Random, text_scale: float = 0.0) -> tuple[list[str], str]:
    """A text-only document on 1–3 topics: (topics, text). 4–12 sentences, plus a long tail of
    about 120 x text_scale more (web text runs to thousands of tokens)."""
    topics = rng.sample(_TEXT_TOPICS, rng.randint(1, 3))
    n = rng.randint(4, 12) + _long_tail(rng, 120 * text_scale)
    sentences = [_sentence(rng.choice(topics), rng) for _ in range(n)]
    return sorted(topics), " ".join(sentences)


# --- SFT conversations ----------------------------------------------------------------------

_SHORT_SUFFIX = "Answer the question using a single word or phrase."
_CAPTION_PROMPTS = (
    "Provide a brief description of the given image.",
    "Describe the image concisely.",
    "Give a short caption for the image.",
    "What is in this picture?",
)
_SYSTEM_PROMPT = "You are a helpful assistant who answers questions about pictures of shapes."


def _with_image(text: str, rng: random.Random, n: int = 1) -> str:
    tags = "\n".join(["<image>"] * n)
    return f"{text}\n{tags}" if rng.random() < 0.2 else f"{tags}\n{text}"


def sft_conversation(rng: random.Random) -> tuple[str, list[Scene], list[dict[str, str]]]:
    """A LLaVA-style conversation: (kind, scenes, [{"from": human|gpt|system, "value"}])."""
    kind = rng.choices(
        ("short", "long", "describe", "ocr", "multi_turn", "multi_image", "text_only"),
        weights=(20, 15, 15, 8, 20, 12, 10),
    )[0]
    turns: list[dict[str, str]] = []
    scenes: list[Scene] = []
    if rng.random() < 0.05:
        turns.append({"from": "system", "value": _SYSTEM_PROMPT})
    if kind in ("short", "long", "describe", "ocr", "multi_turn"):
        sc = sample_scene(rng, "train", text_rich=True if kind == "ocr" else None)
        scenes = [sc]
        if kind == "describe":
            qa_pairs = [(rng.choice(_CAPTION_PROMPTS), _cap(detailed_caption(sc, 0)))]
        elif kind == "ocr":
            qa_pairs = [("Please transcribe all the text in the picture.", sc.text or "")]
        else:
            qas = scene_questions(sc, rng, k=rng.randint(2, 4) if kind == "multi_turn" else 1)
            qa_pairs = []
            for qa in qas:
                if kind == "short" or (kind == "multi_turn" and rng.random() < 0.5):
                    qa_pairs.append((f"{qa.question}\n{_SHORT_SUFFIX}", _cap(qa.answer)))
                else:
                    qa_pairs.append((qa.question, qa.long))
        for i, (q, a) in enumerate(qa_pairs):
            turns.append({"from": "human", "value": _with_image(q, rng) if i == 0 else q})
            turns.append({"from": "gpt", "value": a})
    elif kind == "multi_image":
        k = rng.randint(2, 3)
        scenes = [sample_scene(rng, "train") for _ in range(k)]
        counts = [sc.count for sc in scenes]
        ordinals = ("first", "second", "third")
        task = rng.choice(("more", "total", "describe"))
        if task == "more" and len(set(counts)) > 1:
            i = max(range(k), key=lambda j: counts[j])
            q = "Which picture has the most objects?"
            a = f"The {ordinals[i]} picture, with {counts[i]} objects."
        elif task == "describe":
            q = "Describe each picture."
            a = " ".join(
                f"Picture {i + 1}: {detailed_caption(sc, 0)}" for i, sc in enumerate(scenes)
            )
        else:
            q = "How many objects are there in all the pictures together?"
            t = sum(counts)
            a = (
                f"{' plus '.join(map(str, counts))} is {t}, so there "
                f"{'is' if t == 1 else 'are'} {t} {_plural(t, 'object')}."
            )
        turns.append({"from": "human", "value": _with_image(q, rng, n=k)})
        turns.append({"from": "gpt", "value": a})
    else:
        for _ in range(rng.randint(1, 2)):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            s = rng.choice(SHAPES[1:])
            q, ans = rng.choice(
                (
                    (f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."),
                    (
                        f"How many corners does a {s} have?",
                        f"A {s} has {_count_word(SHAPE_CORNERS[s])} corners.",
                    ),
                    ("Name three colors.", _cap(_join(rng.sample(tuple(COLORS), 3))) + "."),
                )
            )
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": ans}]
    return kind, scenes, turns
