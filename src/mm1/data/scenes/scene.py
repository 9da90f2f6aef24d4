"""The world's vocabulary and English word helpers, scenes of coloured shapes (sampling,
splits) and their rendering."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

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
POS_PHRASE = {
    "top": "at the top",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom": "at the bottom",
}
POS_PHRASE_VARIANTS = {
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
SIZE_VARIANTS = {"small": ("small", "little", "small"), "large": ("large", "big", "large")}
_LIGHT_BACKGROUNDS = ("light gray", "beige")


def count_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def join_list(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def plural(n: int, word: str) -> str:
    return word if n == 1 else word + ("es" if word.endswith(("s", "x")) else "s")


def with_article(word: str) -> str:
    """The indefinite article for `word`: "a red", "an orange"."""
    return "an" if word[:1] in "aeiou" else "a"


def capitalized(s: str) -> str:
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
        text = with_article(words[0]) + " " + " ".join(words)
        return f"{text} {POS_PHRASE[self.position]}" if with_position else text


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
