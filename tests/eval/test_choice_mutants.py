"""Multiple-choice extraction rules the metric tests left unpinned (found by mutation
testing): option counts, trailing punctuation, leading letters that are words, lowercase after
a keyword, ambiguity (two bracketed letters, two option texts, duplicate options), whole-word
option matches, surrounding whitespace and the gold answer's letter."""

from __future__ import annotations

import pytest

from mm1.eval.choice import extract_choice, multiple_choice_accuracy

OPTIONS = ["a cat", "the dog", "cat", "a bird"]


@pytest.mark.parametrize("options", [[], [f"o{i}" for i in range(27)]])
def test_option_counts_outside_1_to_26_are_refused(options) -> None:
    with pytest.raises(ValueError, match="need 1 to 26 options"):
        extract_choice("A", options)


@pytest.mark.parametrize(
    ("pred", "letter"),
    [
        ("b.", "B"),  # a whole answer: a lowercase letter with its full stop
        ("c)", "C"),
        (" C. something else", "C"),  # surrounding whitespace is stripped first
        ("A.I. is not the answer", None),  # "A." followed by a letter is no option letter
        ("Not sure. C. maybe", None),  # a letter-dot is read only at the start
        ("the answer is a bird", "D"),  # lowercase "a" after a keyword is a word
        ("I think (B) or (C)", None),  # two bracketed letters: ambiguous
        ("Not (E), so (B)", "B"),  # a bracketed letter beyond the options is no choice
        ("the doggo", None),  # option texts match as whole words only
        ("a cat and a bird", None),  # two options' texts: ambiguous
    ],
)
def test_extract_choice_edge_cases(pred: str, letter: str | None) -> None:
    assert extract_choice(pred, OPTIONS) == letter


def test_empty_and_duplicate_option_texts_pick_nothing() -> None:
    assert extract_choice("?!", ["", "dog"]) is None  # an empty text is never said
    assert extract_choice("dog", ["", "dog"]) == "B"
    assert extract_choice("cat", ["cat", "Cat."]) is None  # the same text twice


def test_gold_letters() -> None:
    assert multiple_choice_accuracy("B", "b", OPTIONS) is True
    assert multiple_choice_accuracy("the dog", "(b)", OPTIONS) is True
    with pytest.raises(ValueError, match="neither an option letter"):
        multiple_choice_accuracy("E", "E", OPTIONS)  # 4 options: E is no letter of theirs
