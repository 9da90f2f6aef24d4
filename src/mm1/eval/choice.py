"""Multiple-choice answers: which option letter a model's free-form answer picks (MMMU /
SEED / ScienceQA style). Re-exported by `mm1.eval.metrics`."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_MC_WHOLE = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:)]?")
_MC_LEADING = re.compile(r"(?:[(\[]([A-Za-z])[)\]]|([A-Z])[.:)])(?:\s|$)")
# Only the keywords are case-insensitive: "the answer is a cat" must not read as option A.
_MC_PHRASE = re.compile(
    r"\b(?i:answer|option|choice)(?:\s+(?i:is))?\s*[:\-]?\s*(?:[(\[]([A-Za-z])[)\]]|([A-Z])\b)"
)
_MC_BRACKETED = re.compile(r"[(\[]([A-Z])[)\]]")


def _mc_text(text: str) -> str:
    text = text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    return " ".join(text.split())


def extract_choice(prediction: str, options: Sequence[str] | None = None) -> str | None:
    """The option letter a model's answer picks, or None when it cannot be told.

    Rules, first that applies wins (letters limited to A.. as many options as given, else A-Z):
    1. the whole answer is a letter, optionally bracketed or followed by ``.``/``:``/``)``:
       ``"B"``, ``"b"``, ``"(B)"``, ``"B."``;
    2. it starts with a bracketed letter, or a capital letter followed by ``.``/``:``/``)``:
       ``"(B) cat"``, ``"B. cat"``, ``"B: cat"``;
    3. "answer/option/choice [is] [:]" followed by a bracketed or capital letter:
       ``"The answer is B."``, ``"Option (b)"``;
    4. exactly one distinct bracketed capital letter anywhere: ``"I think (C) fits"``;
    5. with ``options``: the answer equals one option's text (case, punctuation and spacing
       ignored), or contains exactly one option's text as whole words (options contained in a
       longer matching option are ignored).
    """
    n = len(options) if options is not None else 26
    if not 1 <= n <= 26:
        raise ValueError(f"need 1 to 26 options, got {n}")
    valid = string.ascii_uppercase[:n]
    text = prediction.strip()

    def ok(letter: str | None) -> str | None:
        letter = letter.upper() if letter else None
        return letter if letter and letter in valid else None

    m = _MC_WHOLE.fullmatch(text)
    if m and ok(m.group(1)):
        return ok(m.group(1))
    m = _MC_LEADING.match(text)
    if m and ok(m.group(1) or m.group(2)):
        return ok(m.group(1) or m.group(2))
    m = _MC_PHRASE.search(text)
    if m and ok(m.group(1) or m.group(2)):
        return ok(m.group(1) or m.group(2))
    bracketed = {x for x in _MC_BRACKETED.findall(text) if x in valid}
    if len(bracketed) == 1:
        return bracketed.pop()
    if options:
        said = _mc_text(text)
        norm = [_mc_text(o) for o in options]
        exact = [i for i, o in enumerate(norm) if o and o == said]
        if len(exact) == 1:
            return valid[exact[0]]
        padded = f" {said} "
        found = [i for i, o in enumerate(norm) if o and f" {o} " in padded]
        found = [i for i in found if not any(j != i and norm[i] in norm[j] for j in found)]
        if len(found) == 1:
            return valid[found[0]]
    return None


def multiple_choice_accuracy(
    prediction: str, answer: str, options: Sequence[str] | None = None
) -> bool:
    """Whether the model picked the right option (see :func:`extract_choice` for the rules).

    ``answer`` is the correct letter (``"B"``, ``"(B)"``) or, when ``options`` are given, the
    correct option's text. A prediction from which no option can be read is wrong.
    """
    n = len(options) if options is not None else 26
    gold_m = _MC_WHOLE.fullmatch(answer.strip())
    gold: str | None = gold_m.group(1).upper() if gold_m else None
    if gold is not None and gold not in string.ascii_uppercase[:n]:
        gold = None
    if gold is None and options:
        texts = [_mc_text(o) for o in options]
        if _mc_text(answer) in texts:
            gold = string.ascii_uppercase[texts.index(_mc_text(answer))]
    if gold is None:
        raise ValueError(
            f"answer {answer!r} is neither an option letter nor the text of one of the options"
        )
    return extract_choice(prediction, options) == gold
