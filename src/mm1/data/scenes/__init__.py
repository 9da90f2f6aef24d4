"""The synthetic world's content: scenes of coloured shapes, their rendering, and the language
about them (captions in two styles, VQA questions and answers, interleaved documents, text
documents, SFT conversations). Every fact is known, so grounded answers can be checked.
`mm1.data.synthetic` writes this content to disk in the formats users bring.

    scene       the vocabulary, scenes (sampling, splits) and their rendering
    language    captions, alt text, VQA questions and answers about one scene
    documents   interleaved, text-only and SFT documents built from scenes
"""

from __future__ import annotations

from mm1.data.scenes.documents import (
    Part,
    interleaved_document,
    sft_conversation,
    text_document,
)
from mm1.data.scenes.language import (
    QA,
    alt_text,
    detailed_caption,
    reference_captions,
    scene_questions,
    vecap_caption,
    vqa_answers,
)
from mm1.data.scenes.scene import (
    BACKGROUNDS,
    COLORS,
    MAX_NUMBER,
    NUMBER_WORDS,
    POSITIONS,
    SHAPE_CORNERS,
    SHAPES,
    SIZE_NAMES,
    SIZES,
    SPECIAL_TOKENS,
    TEXTURES,
    WORDS,
    WORLD_FORMAT_VERSION,
    Scene,
    SceneObject,
    render_scene,
    sample_scene,
    scene_split,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "MAX_NUMBER",
    "NUMBER_WORDS",
    "POSITIONS",
    "QA",
    "SHAPES",
    "SHAPE_CORNERS",
    "SIZES",
    "SIZE_NAMES",
    "SPECIAL_TOKENS",
    "TEXTURES",
    "WORDS",
    "WORLD_FORMAT_VERSION",
    "Part",
    "Scene",
    "SceneObject",
    "alt_text",
    "detailed_caption",
    "interleaved_document",
    "reference_captions",
    "render_scene",
    "sample_scene",
    "scene_questions",
    "scene_split",
    "sft_conversation",
    "text_document",
    "vecap_caption",
    "vqa_answers",
]
