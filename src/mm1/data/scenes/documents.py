"""Documents built from scenes: interleaved image-text documents, text-only documents, SFT
conversations (lists of str | Scene)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from mm1.data.scenes.language import (
    QA,
    content_phrase,
    detailed_caption,
    scene_questions,
)
from mm1.data.scenes.scene import (
    COLORS,
    SHAPE_CORNERS,
    SHAPES,
    Scene,
    capitalized,
    count_word,
    join_list,
    plural,
    sample_scene,
    with_article,
)

# ----------------------------------------------------------------------------------------------
# Documents (lists of str | Scene)
# ----------------------------------------------------------------------------------------------

Part = str | Scene
# The most images an interleaved document shows (so the most a training context ever holds).
MAX_DOC_IMAGES = 6


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
            parts += [sc, capitalized(cap)]
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
            f"has {a} {plural(a, 'object')} and",
            scenes[1],
            f"has {b}, so {total} in total.",
        ]
    parts: list[Part] = []
    for i, sc in enumerate(scenes):
        n = counts[i]
        word = (
            "This picture" if i == 0 else rng.choice(("This one", "The next one", "This picture"))
        )
        parts += [sc, f"{word} has {n} {plural(n, 'object')}."]
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
    parts: list[Part] = [f"Compare these {count_word(len(scenes))} pictures."]
    for i, sc in enumerate(scenes):
        if explicit:
            parts += [
                sc,
                f"The {ordinals[i]} picture has {sc.count} {plural(sc.count, 'object')}.",
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
        sentences.append(f"All the pictures have {with_article(color)} {color} shape.")
    elif len(having) == 1:
        sentences.append(f"Only the {having[0]} picture has {with_article(color)} {color} shape.")
    elif having:
        sentences.append(
            f"The {' and '.join(having)} pictures have {with_article(color)} {color} shape."
        )
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
    k = rng.randint(2, 3) if doc_type == "comparison" else rng.randint(2, MAX_DOC_IMAGES)
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
        return rng.choice(
            (f"{n} is written {count_word(n)}.", f"{capitalized(count_word(n))} is {n}.")
        )
    if topic == "shapes":
        s = rng.choice(SHAPES)
        c = SHAPE_CORNERS[s]
        if s == "circle":
            return rng.choice(("A circle has no corners.", "A circle is round."))
        if s == "star":
            return rng.choice(("A star has five points.", "A star has ten corners."))
        return f"A {s} has {count_word(c)} corners."
    if topic == "colors":
        return rng.choice(
            (
                f"{capitalized(rng.choice(tuple(COLORS)))} is a color.",
                "Orange is a mix of red and yellow.",
                "Purple is a mix of red and blue.",
                "Green is a mix of blue and yellow.",
                "White and black are colors too.",
                f"{capitalized(join_list(rng.sample(tuple(COLORS), 3)))} are colors.",
            )
        )
    if topic == "compare":
        a, b = rng.sample(range(0, 21), 2)
        return f"{a} is more than {b}." if a > b else f"{a} is less than {b}."
    if topic == "counting":
        start = rng.randint(0, 10)
        return (
            capitalized(", ".join(count_word(i) for i in range(start, start + rng.randint(3, 6))))
            + "."
        )
    if topic == "scene":
        sc = sample_scene(rng, "train")
        n = sc.count
        return f"Imagine a picture with {content_phrase(sc)}. It has {n} {plural(n, 'object')}."
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

# LLaVA-1.5's short-answer prompt: the SFT data, the SFT tasks and the evaluation suite all use
# this one string, so a model is asked at evaluation exactly as it was trained.
SHORT_SUFFIX = "Answer the question using a single word or phrase."
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
            qa_pairs = [(rng.choice(_CAPTION_PROMPTS), capitalized(detailed_caption(sc, 0)))]
        elif kind == "ocr":
            qa_pairs = [("Please transcribe all the text in the picture.", sc.text or "")]
        else:
            qas = scene_questions(sc, rng, k=rng.randint(2, 4) if kind == "multi_turn" else 1)
            qa_pairs = []
            for qa in qas:
                if kind == "short" or (kind == "multi_turn" and rng.random() < 0.5):
                    qa_pairs.append((f"{qa.question}\n{SHORT_SUFFIX}", capitalized(qa.answer)))
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
                f"{'is' if t == 1 else 'are'} {t} {plural(t, 'object')}."
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
                        f"A {s} has {count_word(SHAPE_CORNERS[s])} corners.",
                    ),
                    (
                        "Name three colors.",
                        capitalized(join_list(rng.sample(tuple(COLORS), 3))) + ".",
                    ),
                )
            )
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": ans}]
    return kind, scenes, turns
