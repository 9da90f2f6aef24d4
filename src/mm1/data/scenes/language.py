"""Language about one scene: captions in two styles, alt text, VQA questions and answers."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

from mm1.data.scenes.scene import (
    COLORS,
    POS_PHRASE,
    POS_PHRASE_VARIANTS,
    POSITIONS,
    SHAPES,
    SIZE_VARIANTS,
    SIZES,
    WORDS,
    Scene,
    capitalized,
    count_word,
    join_list,
    plural,
    with_article,
)

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
        return join_list([o.phrase() for o in scene.objects])
    objs = list(scene.objects)
    if rng.random() < 0.4:
        rng.shuffle(objs)
    phrases = []
    for o in objs:
        size = rng.choice(SIZE_VARIANTS[o.size])
        pos = rng.choice(POS_PHRASE_VARIANTS[o.position])
        phrases.append(f"a {size} {o.color} {o.shape} {pos}")
    return join_list(phrases)


def content_phrase(scene: Scene, rng: random.Random | None = None) -> str:
    if scene.text is None:
        return _objects_phrase(scene, rng)
    text = _text_phrase(scene, rng)
    if not scene.objects:
        return text
    return f"{text}, with {_objects_phrase(scene, rng)}"


def detailed_caption(scene: Scene, template: int = 0, rng: random.Random | None = None) -> str:
    """A detailed re-caption (VeCap style). Template 0 with rng=None is the canonical caption,
    e.g. "a large red circle on the left and a small blue square at the top."."""
    content = content_phrase(scene, rng)
    n = scene.count
    if template == 0:
        return f"{content}."
    if template == 1:
        if scene.text is not None:
            return f"{content}, on a {scene.background} background."
        return (
            f"{count_word(n)} {plural(n, 'shape')} on a {scene.background} background: {content}."
        )
    if template == 2:
        return f"a picture of {content}, on a {scene.background} background."
    if template == 3:
        openers = ("there is", "an image of", "this picture shows", "a drawing of")
        start = openers[0] if rng is None else rng.choice(openers)
        return f"{start} {content}."
    if template == 4:
        if n == 0:
            return f"a {scene.background} picture showing {content}."
        return f"{count_word(n)} {plural(n, 'object')}: {content}."
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
            lambda: f"pic of {n} {plural(n, 'shape')}",
            lambda: f"{n} {plural(n, 'shape')} on {scene.background}",
        ]
        o = rng.choice(objs)
        options += [
            lambda: f"{o.color} {o.shape}",
            lambda: f"{o.color} {o.shape}",
            lambda: f"{o.shape}",
            lambda: f"{o.size} {o.color} {o.shape}",
            lambda: ", ".join(sorted({x.shape for x in objs})),
            lambda: " and ".join(f"{x.color} {x.shape}" for x in objs[:2]),
            lambda: f"{count_word(n)} {plural(n, 'shape')}: " + ", ".join(x.shape for x in objs),
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
                f"The {o.color} {o.shape} is {POS_PHRASE[o.position]}.",
            )
        add(
            "shape_at",
            f"What shape is {POS_PHRASE[o.position]}?",
            o.shape,
            "what shape is",
            "other",
            f"There is {with_article(o.color)} {o.color} {o.shape} {POS_PHRASE[o.position]}.",
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
            f"There {'is' if n == 1 else 'are'} {n} {plural(n, what)}.",
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
            f"There {'is' if c == 1 else 'are'} {c} {color} {plural(c, 'object')}.",
        )
        if rng.random() < 0.5:
            o = rng.choice(objs)
            color, shape = o.color, o.shape
        else:
            color, shape = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
        there = (color, shape) in pair_count
        add(
            "exists",
            f"Is there {with_article(color)} {color} {shape}?",
            "yes" if there else "no",
            "is there a",
            "yes/no",
            f"Yes, there is {with_article(color)} {color} {shape}."
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
        return rng.choice((capitalized(a), f"{a} color", _ANSWER_SHADES[a], a))
    if qa.answer_type == "number":
        n = int(a)
        return rng.choice((count_word(n), f"{a} ", count_word(n), f"{a} objects"))
    if qa.answer_type == "yes/no":
        return rng.choice(
            (capitalized(a), f"{a}.", "yeah" if a == "yes" else "nope", capitalized(a))
        )
    if qa.kind == "shape_at":
        return rng.choice((f"a {a}", capitalized(a), _SHAPE_SYNONYMS[a], f"{a}s"))
    if qa.kind == "where":
        return rng.choice(
            (f"on the {a}" if a != "center" else "in the middle", capitalized(a), f"{a} side")
        )
    if qa.kind == "size":
        return rng.choice(({"small": "little", "large": "big"}[a], capitalized(a), f"very {a}"))
    if qa.kind == "text":
        return rng.choice((a.upper(), f'"{a}"', capitalized(a)))
    return capitalized(a)


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
