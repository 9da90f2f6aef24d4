"""Evaluation metrics that reproduce the reference tools users compare against.

Everything here is pure standard-library Python: no Java, no pycocoevalcap, no numpy needed.

- Captioning: :func:`ptb_tokenize` / :func:`ptb_tokenize_corpus` (pycocoevalcap's PTBTokenizer, i.e.
  Stanford CoreNLP 3.4.1 ``PTBTokenizer -preserveLines -lowerCase`` followed by pycocoevalcap's
  punctuation removal), :func:`cider` (pycocoevalcap "CIDEr", which is CIDEr-D), :func:`bleu`
  (pycocoevalcap ``Bleu(4)``) and :func:`rouge_l` (pycocoevalcap ``Rouge``). The scorers take
  already-tokenized text, exactly like pycocoevalcap; :func:`caption_scores` does both steps.
- VQA: :func:`vqa_normalize`, :func:`vqa_accuracy`, :func:`vqa_accuracy_corpus` (official
  GT-Vision-Lab evaluator, with its quirks; or the always-normalising variant).
- Documents and charts: :func:`anls` (DocVQA, lmms-eval convention), :func:`relaxed_accuracy`
  (ChartQA / pix2struct convention).
- POPE: :func:`pope_answer`, :func:`pope_scores` (accuracy, precision, recall, F1, yes-ratio).
- Multiple choice: :func:`extract_choice`, :func:`multiple_choice_accuracy` (in `eval/choice.py`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

from mm1.eval.choice import extract_choice, multiple_choice_accuracy  # re-exported
from mm1.eval.ptb import ptb_tokenize, ptb_tokenize_corpus

__all__ = [
    "anls",
    "bleu",
    "caption_scores",
    "cider",
    "extract_choice",
    "mean_std",
    "multiple_choice_accuracy",
    "pope_answer",
    "pope_scores",
    "ptb_tokenize",
    "ptb_tokenize_corpus",
    "relaxed_accuracy",
    "rouge_l",
    "vqa_accuracy",
    "vqa_accuracy_corpus",
    "vqa_normalize",
]

K = TypeVar("K", bound=Hashable)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation of `values` (at least one): the spread of a
    score over seeds or demonstration draws."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


# =================================================================================================
# Caption metrics: CIDEr-D, BLEU, ROUGE-L (pycocoevalcap semantics, on tokenized text)
# =================================================================================================


def _show(ids: Iterable[object], limit: int = 5) -> str:
    ids = sorted(ids, key=repr)
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _check_caption_inputs(
    references: Mapping[K, Sequence[str]], candidates: Mapping[K, object]
) -> list[K]:
    missing = set(references) - set(candidates)
    extra = set(candidates) - set(references)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no candidate for {len(missing)} id(s): {_show(missing)}")
        if extra:
            parts.append(f"no references for {len(extra)} candidate id(s): {_show(extra)}")
        raise ValueError("references and candidates must have the same ids; " + "; ".join(parts))
    if not references:
        raise ValueError("nothing to score: references and candidates are empty")
    for key, refs in references.items():
        if isinstance(refs, (str, bytes)):
            raise TypeError(f"references[{key!r}] must be a list of captions, not a single string")
        if len(refs) == 0:
            raise ValueError(f"image {key!r} has no references")
    return list(references)


def _candidate(candidates: Mapping[K, object], key: K) -> str:
    cand = candidates[key]
    # Accept pycocoevalcap's one-element list too, since users port code that builds those.
    if isinstance(cand, (list, tuple)):
        if len(cand) != 1:
            raise ValueError(f"candidate {key!r} must be one caption, got {len(cand)}")
        cand = cand[0]
    if not isinstance(cand, str):
        raise TypeError(f"candidate {key!r} must be a str, got {type(cand).__name__}")
    return cand


def _ngrams(sentence: str, n: int = 4) -> Counter[tuple[str, ...]]:
    words = sentence.split()
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def cider(
    references: Mapping[K, Sequence[str]],
    candidates: Mapping[K, str],
    *,
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, dict[K, float]]:
    """CIDEr-D exactly as pycocoevalcap's ``Cider().compute_score`` (×1, not ×100).

    ``references`` maps an id to its tokenized reference captions, ``candidates`` the same ids to
    one tokenized caption (see :func:`ptb_tokenize_corpus`). The document frequencies come from
    the references of all scored images, so score the whole split in one call. Returns the corpus
    score (mean over images) and the per-image scores keyed like the input.
    """
    keys = _check_caption_inputs(references, candidates)
    cand_counts = [_ngrams(_candidate(candidates, k), n) for k in keys]
    ref_counts = [[_ngrams(r, n) for r in references[k]] for k in keys]

    # Document frequency: in how many images' reference sets each n-gram occurs.
    df: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        df.update({g for counts in refs for g in counts})
    log_num_images = math.log(float(len(keys)))

    def vectorize(
        counts: Counter[tuple[str, ...]],
    ) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            w = float(tf) * (log_num_images - math.log(max(1.0, float(df.get(gram, 0)))))
            vec[k][gram] = w
            norm[k] += w * w
            # Quirk kept from the reference: the "length" in the length penalty is the number of
            # bigrams, i.e. max(words - 1, 0), not the number of words. (It only differs when a
            # sentence is empty, and an empty sentence scores 0 anyway.)
            if k == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores: dict[K, float] = {}
    for key, cand, refs in zip(keys, cand_counts, ref_counts):
        vec, norm, length = vectorize(cand)
        total = [0.0] * n
        for ref in refs:
            vec_r, norm_r, length_r = vectorize(ref)
            penalty = math.exp(-(float(length - length_r) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = 0.0
                for gram, w in vec[k].items():
                    wr = vec_r[k].get(gram, 0.0)
                    val += min(w, wr) * wr  # clipped candidate weight
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                total[k] += val * penalty
        scores[key] = sum(total) / n / len(refs) * 10.0
    return sum(scores.values()) / len(scores), scores


def bleu(
    references: Mapping[K, Sequence[str]], candidates: Mapping[K, str]
) -> tuple[list[float], dict[K, list[float]]]:
    """BLEU-1..4 exactly as pycocoevalcap's ``Bleu(4).compute_score``.

    Corpus BLEU from summed clipped counts, with the brevity penalty against the "closest"
    reference length (ties go to the shorter reference) and pycocoevalcap's additive constants
    (1e-15 on matches, 1e-9 on guesses), which make zero-match scores tiny but not zero. Returns
    ``[B1, B2, B3, B4]`` and per-image ``[B1, ..., B4]`` computed the same way per sentence.
    """
    keys = _check_caption_inputs(references, candidates)
    n = 4
    tiny, small = 1e-15, 1e-9
    total_test = 0
    total_ref = 0
    total_guess = [0] * n
    total_correct = [0] * n
    per_image: dict[K, list[float]] = {}
    for key in keys:
        words = _candidate(candidates, key).split()
        test_len = len(words)
        counts = _ngrams(" ".join(words), n)
        ref_lens = []
        max_ref: dict[tuple[str, ...], int] = {}
        for ref in references[key]:
            ref_lens.append(len(ref.split()))
            for gram, c in _ngrams(ref, n).items():
                max_ref[gram] = max(max_ref.get(gram, 0), c)
        ref_len = min((abs(length - test_len), length) for length in ref_lens)[1]
        guess = [max(0, test_len - k) for k in range(n)]
        correct = [0] * n
        for gram, c in counts.items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), c)
        total_test += test_len
        total_ref += ref_len
        for k in range(n):
            total_guess[k] += guess[k]
            total_correct[k] += correct[k]
        per_image[key] = _bleu_from_counts(correct, guess, test_len, ref_len, tiny, small)
    corpus = _bleu_from_counts(total_correct, total_guess, total_test, total_ref, tiny, small)
    return corpus, per_image


def _bleu_from_counts(
    correct: list[int], guess: list[int], test_len: int, ref_len: int, tiny: float, small: float
) -> list[float]:
    out = []
    prod = 1.0
    for k in range(len(correct)):
        prod *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
        out.append(prod ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        out = [b * math.exp(1 - 1 / ratio) for b in out]
    return out


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(
    references: Mapping[K, Sequence[str]], candidates: Mapping[K, str], *, beta: float = 1.2
) -> tuple[float, dict[K, float]]:
    """ROUGE-L exactly as pycocoevalcap's ``Rouge().compute_score`` (β = 1.2).

    Per image: LCS-based precision and recall against each reference, the maximum of each over the
    references, then the F-measure. Sentences are split on single spaces as in the reference (so
    an empty caption is one empty token). Returns the mean and the per-image scores.
    """
    keys = _check_caption_inputs(references, candidates)
    scores: dict[K, float] = {}
    for key in keys:
        cand = _candidate(candidates, key).split(" ")
        precisions, recalls = [], []
        for ref in references[key]:
            ref_tokens = ref.split(" ")
            lcs = _lcs_length(ref_tokens, cand)
            precisions.append(lcs / float(len(cand)))
            recalls.append(lcs / float(len(ref_tokens)))
        p, r = max(precisions), max(recalls)
        if p != 0 and r != 0:
            scores[key] = ((1 + beta**2) * p * r) / float(r + beta**2 * p)
        else:
            scores[key] = 0.0
    return sum(scores.values()) / len(scores), scores


def caption_scores(
    references: Mapping[K, Sequence[str]],
    candidates: Mapping[K, str],
    *,
    tokenize: bool = True,
) -> dict[str, float]:
    """COCO caption metrics as pycocoevalcap's ``COCOEvalCap`` names them (no METEOR/SPICE).

    With ``tokenize=True`` (the reference pipeline) raw captions are PTB-tokenized first.
    Returns ``{"Bleu_1": ..., "Bleu_4": ..., "ROUGE_L": ..., "CIDEr": ...}``.
    """
    _check_caption_inputs(references, candidates)
    refs: Mapping[K, Sequence[str]] = references
    cands: Mapping[K, str] = {k: _candidate(candidates, k) for k in references}
    if tokenize:
        refs = ptb_tokenize_corpus(references)
        cands = {
            k: v[0] for k, v in ptb_tokenize_corpus({k: [c] for k, c in cands.items()}).items()
        }
    b, _ = bleu(refs, cands)
    out = {f"Bleu_{i + 1}": b[i] for i in range(4)}
    out["ROUGE_L"] = rouge_l(refs, cands)[0]
    out["CIDEr"] = cider(refs, cands)[0]
    return out


# =================================================================================================
# VQA accuracy (official GT-Vision-Lab/VQA evaluator, last change 2021-03-11)
# =================================================================================================

# Characters the evaluator deletes or turns into spaces (note: no "'", ":" or ".").
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
              "@", "`", ",", "?", "!")  # fmt: skip
_VQA_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The evaluator's pattern is "(?!<=\d)(\.)(?!\d)": the first group is a (typo'd) look-ahead that
# can never fail in front of a ".", so it removes every "." not followed by a digit. It passes
# re.UNICODE where the count goes, so at most 32 periods are removed.
_VQA_PERIOD = re.compile(r"\.(?!\d)")
_VQA_MAX_PERIODS = int(re.UNICODE)
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_VQA_ARTICLES = frozenset(["a", "an", "the"])
# The evaluator's contraction table as {written form: space-separated spellings it replaces}. Its
# keys with capitals ("Im", "Ive", "Id've", "I'dve") can never match lower-cased words and its
# identity entries ("let's", "she's") change nothing, so they are left out. "somebody'd" ->
# "somebodyd" really goes that way round in the reference.
_VQA_CONTRACTION_SPELLINGS = {
    "ain't": "aint", "aren't": "arent", "can't": "cant", "could've": "couldve",
    "couldn't": "couldnt", "couldn't've": "couldn'tve couldnt've", "didn't": "didnt",
    "doesn't": "doesnt", "don't": "dont", "hadn't": "hadnt", "hadn't've": "hadnt've hadn'tve",
    "hasn't": "hasnt", "haven't": "havent", "he'd": "hed", "he'd've": "hed've he'dve",
    "he's": "hes", "how'd": "howd", "how'll": "howll", "how's": "hows", "isn't": "isnt",
    "it'd": "itd", "it'd've": "itd've it'dve", "it'll": "itll", "ma'am": "maam",
    "mightn't": "mightnt", "mightn't've": "mightnt've mightn'tve", "might've": "mightve",
    "mustn't": "mustnt", "must've": "mustve", "needn't": "neednt", "not've": "notve",
    "o'clock": "oclock", "oughtn't": "oughtnt", "'ow's'at": "ow's'at 'ows'at 'ow'sat",
    "shan't": "shant", "she'd've": "shed've she'dve", "should've": "shouldve",
    "shouldn't": "shouldnt", "shouldn't've": "shouldnt've shouldn'tve", "somebodyd": "somebody'd",
    "somebody'd've": "somebodyd've somebody'dve", "somebody'll": "somebodyll",
    "somebody's": "somebodys", "someone'd": "someoned", "someone'd've": "someoned've someone'dve",
    "someone'll": "someonell", "someone's": "someones", "something'd": "somethingd",
    "something'd've": "somethingd've something'dve", "something'll": "somethingll",
    "that's": "thats", "there'd": "thered", "there'd've": "thered've there'dve",
    "there're": "therere", "there's": "theres", "they'd": "theyd",
    "they'd've": "theyd've they'dve", "they'll": "theyll", "they're": "theyre",
    "they've": "theyve", "'twas": "twas", "wasn't": "wasnt", "we'd've": "wed've we'dve",
    "we've": "weve", "weren't": "werent", "what'll": "whatll", "what're": "whatre",
    "what's": "whats", "what've": "whatve", "when's": "whens", "where'd": "whered",
    "where's": "wheres", "where've": "whereve", "who'd": "whod", "who'd've": "whod've who'dve",
    "who'll": "wholl", "who's": "whos", "who've": "whove", "why'll": "whyll", "why're": "whyre",
    "why's": "whys", "won't": "wont", "would've": "wouldve", "wouldn't": "wouldnt",
    "wouldn't've": "wouldnt've wouldn'tve", "y'all": "yall", "y'all'll": "yall'll y'allll",
    "y'all'd've": "yall'd've y'alld've y'all'dve", "you'd": "youd", "you'd've": "youd've you'dve",
    "you'll": "youll", "you're": "youre", "you've": "youve",
}  # fmt: skip
_VQA_CONTRACTIONS = {
    spelling: written
    for written, spellings in _VQA_CONTRACTION_SPELLINGS.items()
    for spelling in spellings.split()
}
_VQA_MODES = ("official", "always")


def _vqa_strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _vqa_punctuation(text: str) -> str:
    # Whether a character is deleted or becomes a space is decided on the ORIGINAL string, for
    # every character separately: "red, blue" deletes "," (", " occurs) but "red,blue" spaces it.
    out = text
    delete_all = _VQA_DIGIT_COMMA.search(text) is not None
    for p in _VQA_PUNCT:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _VQA_PERIOD.sub("", out, count=_VQA_MAX_PERIODS)


def _vqa_digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _VQA_NUMBERS.get(word, word)
        if word not in _VQA_ARTICLES:
            words.append(_VQA_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_normalize(answer: str) -> str:
    """The official VQA answer normalisation: ``"The Dog!"`` → ``"dog"``, ``"two"`` → ``"2"``.

    Newlines/tabs become spaces and the ends are stripped; punctuation is deleted or turned into
    spaces (deleted when it touches a space anywhere in the string or the string has a
    digit-comma-digit); periods not followed by a digit are removed (at most 32, a quirk of the
    reference); then lower-case, number words zero..ten (and "none") to digits, articles dropped,
    contractions restored ("dont" → "don't"), single spaces.
    """
    return _vqa_digits_articles(_vqa_punctuation(_vqa_strip(answer)))


def vqa_accuracy(prediction: str, answers: Sequence[str], normalize: str = "official") -> float:
    """VQA accuracy of one prediction against the human answers, in [0, 1].

    For each answer, the prediction's matches among the OTHER answers count as min(1, matches / 3);
    the result is the mean over answers (leave-one-out over however many answers there are; VQA
    has 10). ``normalize="official"`` is the official evaluator: answers and prediction are
    normalised (see :func:`vqa_normalize`) only when the answers are not all identical, so
    ``"Yes"`` against ten ``"yes"`` scores 0. ``normalize="always"`` always normalises both (the
    OpenFlamingo / lmms-eval style).
    """
    if normalize not in _VQA_MODES:
        raise ValueError(f"normalize must be one of {_VQA_MODES}, got {normalize!r}")
    if isinstance(answers, str):
        raise TypeError("answers must be a list of answers, not a single string")
    if len(answers) == 0:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = _vqa_strip(prediction)
    gts = [_vqa_strip(a) for a in answers]
    if normalize == "always" or len(set(gts)) > 1:
        gts = [_vqa_digits_articles(_vqa_punctuation(a)) for a in gts]
        pred = _vqa_digits_articles(_vqa_punctuation(pred))
    matches = sum(1 for a in gts if a == pred)
    accs = [min(1.0, float(matches - (a == pred)) / 3) for a in gts]
    return float(sum(accs)) / len(accs)


def _check_ids(predictions: Mapping[K, object], references: Mapping[K, object], what: str) -> None:
    missing = set(references) - set(predictions)
    extra = set(predictions) - set(references)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} {what} without a prediction: {_show(missing)}")
        if extra:
            parts.append(f"{len(extra)} prediction id(s) not in the annotations: {_show(extra)}")
        raise ValueError(
            "predictions must cover exactly the annotated ids (a subset would silently change "
            "the score); " + "; ".join(parts)
        )
    if not references:
        raise ValueError("nothing to score: no annotations")


def vqa_accuracy_corpus(
    predictions: Mapping[K, str],
    answers: Mapping[K, Sequence[str]],
    normalize: str = "official",
) -> tuple[float, dict[K, float]]:
    """Overall VQA accuracy like the official script: ×100, rounded to 2 decimals.

    ``predictions`` and ``answers`` are keyed by question id and must have exactly the same ids
    (missing and extra ids are both reported). Also returns the per-question accuracies in [0, 1],
    unrounded, so per-type breakdowns can be computed the way the reference does
    (``round(100 * mean, 2)`` over the raw values).
    """
    _check_ids(predictions, answers, "question id(s)")
    per_question = {q: vqa_accuracy(predictions[q], answers[q], normalize) for q in answers}
    overall = round(100 * float(sum(per_question.values())) / len(per_question), 2)
    return overall, per_question


# =================================================================================================
# ANLS (DocVQA / InfographicVQA) and relaxed accuracy (ChartQA)
# =================================================================================================


def _levenshtein(a: str, b: str) -> int:
    if len(a) > len(b):
        a, b = b, a
    prev = list(range(len(a) + 1))
    for j, cb in enumerate(b, start=1):
        cur = [j]
        for i, ca in enumerate(a, start=1):
            cur.append(prev[i - 1] if ca == cb else 1 + min(prev[i - 1], prev[i], cur[i - 1]))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average-normalised-Levenshtein similarity of one prediction (DocVQA; lmms-eval convention).

    Both strings are lower-cased with whitespace collapsed; the distance is divided by the longer
    of the two ORIGINAL strings (the reference code's choice, which only differs when the
    strings had extra whitespace). The score is 1 − the smallest normalised distance over the
    answers, set to 0 when it is below ``threshold`` (a score of exactly 0.5 is kept). The
    dataset score is the mean over questions.
    """
    if isinstance(answers, str):
        raise TypeError("answers must be a list of answers, not a single string")
    if len(answers) == 0:
        raise ValueError("anls needs at least one ground-truth answer")
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        gold = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(0.0 if length == 0 else _levenshtein(gold, pred) / float(length))
    score = 1.0 - min(distances)
    return 0.0 if score < threshold else score


def _relaxed_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    """ChartQA relaxed correctness (pix2struct / lmms-eval convention).

    If both strings parse as numbers (a trailing ``%`` divides by 100) and the target is not zero,
    correct when ``|p - t| / |t| <= tolerance``; otherwise a case-insensitive exact string match.
    The strings are used as given (Python's ``float`` ignores surrounding whitespace, the string
    comparison does not), so strip model output before calling.
    """
    p, t = _relaxed_float(prediction), _relaxed_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= tolerance
    return prediction.lower() == target.lower()


# =================================================================================================
# POPE (yes/no object presence)
# =================================================================================================


def pope_answer(prediction: str) -> str:
    """A free-form answer read as "yes" or "no" as POPE's evaluation reads it: only the first
    sentence counts; it is "no" when a word of it (commas dropped) is "no", "No" or "not", else
    "yes"."""
    text = prediction.strip()
    if "." in text:
        text = text.split(".", 1)[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("no", "No", "not") for w in words) else "yes"


def pope_scores(predictions: Mapping[K, str], labels: Mapping[K, str]) -> dict[str, float]:
    """POPE's scores ×100 of free-form `predictions` against "yes"/"no" `labels` (same ids):
    accuracy, precision, recall and F1 with "yes" as the positive class, and the share of "yes"
    answers (yes-ratio). Precision (recall) is 0 when nothing is predicted (labelled) "yes"."""
    _check_ids(predictions, labels, "question id(s)")
    bad = sorted({str(v) for v in labels.values()} - {"yes", "no"})
    if bad:
        raise ValueError(f"POPE labels must be 'yes' or 'no', got {bad[:3]}")
    said = {k: pope_answer(predictions[k]) for k in labels}
    tp = sum(1 for k in labels if said[k] == "yes" and labels[k] == "yes")
    fp = sum(1 for k in labels if said[k] == "yes" and labels[k] == "no")
    tn = sum(1 for k in labels if said[k] == "no" and labels[k] == "no")
    fn = len(labels) - tp - fp - tn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / len(labels),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / len(labels),
    }
