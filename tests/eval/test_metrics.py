"""Tests for mm1.eval.metrics against the reference tools and hand-computed values.

Caption metrics are compared with pycocoevalcap (a test dependency) on generated corpora; the PTB
tokenizer with the real Stanford PTBTokenizer that pycocoevalcap ships (needs `java`); VQA, ANLS,
relaxed accuracy and multiple choice with values worked out by hand from the reference code.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import subprocess
import tempfile

import pytest

from mm1.eval.metrics import (
    anls,
    bleu,
    caption_scores,
    cider,
    extract_choice,
    mean_std,
    multiple_choice_accuracy,
    ptb_tokenize,
    ptb_tokenize_corpus,
    relaxed_accuracy,
    rouge_l,
    vqa_accuracy,
    vqa_accuracy_corpus,
    vqa_normalize,
)

needs_java = pytest.mark.skipif(
    shutil.which("java") is None,
    reason="java is not on PATH, so pycocoevalcap's Stanford PTBTokenizer cannot run",
)


def _pycoco():
    return pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (test extra) not installed")


# ------------------------------------------------------------------------------------------------
# CIDEr / BLEU / ROUGE-L
# ------------------------------------------------------------------------------------------------

CHECK_REFS = {
    1: ["a man riding a horse on the beach", "a person rides a horse near the ocean"],
    2: ["two dogs play in the snow", "dogs playing outside in snow winter"],
}
CHECK_CANDS = {1: "a man rides a horse on a beach", 2: "two dogs playing in the snow"}


def test_cider_reference_check_value():
    score, per_image = cider(CHECK_REFS, CHECK_CANDS)
    assert score == pytest.approx(3.046959324927448, abs=1e-12)
    assert per_image[1] == pytest.approx(2.86854772, abs=1e-8)
    assert per_image[2] == pytest.approx(3.22537093, abs=1e-8)
    assert list(per_image) == [1, 2]


def _generated_corpus(seed: int, num_images: int) -> tuple[dict, dict]:
    """Seeded captions from a tiny vocabulary: lots of shared and repeated n-grams."""
    rng = random.Random(seed)
    vocab = ["a", "the", "man", "dog", "cat", "on", "in", "riding", "red", "two", "of", "snow"]

    def sentence(lo: int, hi: int) -> str:
        words = [rng.choice(vocab) for _ in range(rng.randint(lo, hi))]
        if words and rng.random() < 0.2:  # repeated n-grams
            words = words + words[: rng.randint(1, len(words))]
        if rng.random() < 0.1:  # ROUGE-L splits on single spaces: doubled/trailing ones count
            return "  ".join(words) + rng.choice(["", " "])
        return " ".join(words)

    refs, cands = {}, {}
    for i in range(num_images):
        key = f"img{i}" if seed % 2 else i
        refs[key] = [sentence(1, 12) for _ in range(rng.randint(1, 6))]
        kind = rng.random()
        if kind < 0.08:
            cands[key] = ""  # 0 words
        elif kind < 0.16:
            cands[key] = rng.choice(vocab)  # 1 word
        elif kind < 0.24:
            cands[key] = rng.choice(refs[key])  # exact copy of a reference
        else:
            cands[key] = sentence(2, 14)
    return refs, cands


CORPORA = [(0, 200), (1, 120), (2, 50), (3, 1), (4, 2)]


@pytest.mark.parametrize(("seed", "num_images"), CORPORA)
def test_cider_matches_pycocoevalcap(seed, num_images):
    _pycoco()
    from pycocoevalcap.cider.cider import Cider

    refs, cands = _generated_corpus(seed, num_images)
    ref_score, ref_scores = Cider().compute_score(refs, {k: [v] for k, v in cands.items()})
    score, per_image = cider(refs, cands)
    assert score == pytest.approx(float(ref_score), abs=1e-9)
    assert list(per_image) == list(refs)
    for key, expected in zip(refs, ref_scores):
        assert per_image[key] == pytest.approx(float(expected), abs=1e-9)


@pytest.mark.parametrize(("seed", "num_images"), CORPORA)
def test_bleu_matches_pycocoevalcap(seed, num_images):
    _pycoco()
    from pycocoevalcap.bleu.bleu import Bleu

    refs, cands = _generated_corpus(seed, num_images)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its counts
        ref_score, ref_scores = Bleu(4).compute_score(refs, {k: [v] for k, v in cands.items()})
    score, per_image = bleu(refs, cands)
    assert score == pytest.approx(ref_score, abs=1e-9)
    for i, key in enumerate(refs):
        assert per_image[key] == pytest.approx([ref_scores[k][i] for k in range(4)], abs=1e-9)


@pytest.mark.parametrize(("seed", "num_images"), CORPORA)
def test_rouge_l_matches_pycocoevalcap(seed, num_images):
    _pycoco()
    from pycocoevalcap.rouge.rouge import Rouge

    refs, cands = _generated_corpus(seed, num_images)
    ref_score, ref_scores = Rouge().compute_score(refs, {k: [v] for k, v in cands.items()})
    score, per_image = rouge_l(refs, cands)
    assert score == pytest.approx(float(ref_score), abs=1e-9)
    for key, expected in zip(refs, ref_scores):
        assert per_image[key] == pytest.approx(float(expected), abs=1e-9)


def test_bleu_and_rouge_hand_values():
    # Candidate equal to its only reference: every precision 1, no brevity penalty.
    b, _ = bleu({0: ["a b c d"]}, {0: "a b c d"})
    assert b == pytest.approx([1.0] * 4, abs=1e-9)
    # "a b" vs "a b c d": 2/2 unigrams, 1/1 bigram, closest ref length 4 -> BP = exp(1 - 4/2).
    b, _ = bleu({0: ["a b c d"]}, {0: "a b"})
    assert b[0] == pytest.approx(math_exp(1 - 2), rel=1e-6)
    # LCS("a x c", "a b c") = 2: P = R = 2/3 -> F = 2/3 for any beta.
    r, _ = rouge_l({0: ["a b c"]}, {0: "a x c"})
    assert r == pytest.approx(2 / 3, abs=1e-12)


def math_exp(x: float) -> float:
    import math

    return math.exp(x)


def test_empty_candidate_scores_zero():
    _, per = cider({0: ["a dog"], 1: ["a cat on a mat"]}, {0: "", 1: "a cat on a mat"})
    assert per[0] == 0.0
    assert per[1] > 0.0


@pytest.mark.parametrize("metric", [cider, bleu, rouge_l])
def test_caption_metrics_reject_mismatched_ids(metric):
    refs = {"a": ["x y"], "b": ["x z"], "c": ["y z"]}
    with pytest.raises(ValueError, match="'c'") as err:
        metric(refs, {"a": "x", "b": "y", "zz": "q"})
    assert "'zz'" in str(err.value)  # extra ids are named too
    with pytest.raises(ValueError, match="no references"):
        metric({"a": ["x"], "b": []}, {"a": "x", "b": "y"})
    with pytest.raises(ValueError, match="empty"):
        metric({}, {})
    with pytest.raises(TypeError):
        metric({"a": "x y"}, {"a": "x"})  # a bare string is not a list of references


def test_candidates_may_be_pycocoevalcap_style_lists():
    score, _ = cider(CHECK_REFS, {k: [v] for k, v in CHECK_CANDS.items()})
    assert score == pytest.approx(3.046959324927448, abs=1e-12)


def test_a_candidate_list_must_hold_exactly_one_caption():
    for metric in (cider, bleu, rouge_l):
        with pytest.raises(ValueError, match="must be one caption, got 2"):
            metric(CHECK_REFS, {1: ["a man", "a horse"], 2: CHECK_CANDS[2]})
        with pytest.raises(ValueError, match="must be one caption, got 0"):
            metric(CHECK_REFS, {1: [], 2: CHECK_CANDS[2]})


# ------------------------------------------------------------------------------------------------
# PTB tokenizer
# ------------------------------------------------------------------------------------------------

# Outputs of pycocoevalcap's PTBTokenizer (Java) for single captions, recorded once; these run
# without Java.
PTB_KNOWN = {
    "A man riding a horse on the beach.": "a man riding a horse on the beach",
    "It's a man's hat, don't you think? I can't.": "it 's a man 's hat do n't you think i ca n't",
    "Two dogs (in the snow) [winter] {x}": "two dogs -lrb- in the snow -rrb- -lsb- winter -rsb- "
    "-lcb- x -rcb-",
    "A sign that reads \"STOP\" and 'go'": "a sign that reads stop and go",
    "A 3.5 inch e-mail at 10 a.m. from the U.S.A. !! & $": "a 3.5 inch e-mail at 10 a.m. from "
    "the u.s.a. !! & $",
    "He's gonna win; he cannot lose -- ok...": "he 's gon na win he can not lose ok",
    "AT&T vs. at&t and/or 1 1/2 cups": "at&t vs. at & t and/or 1\u00a01/2 cups",
    # The e-mail token keeps the ideographic space; pycocoevalcap's line.rstrip() removes it.
    "mail x@y\u3000": "mail x@y",
    "": "",
}


@pytest.mark.parametrize(("text", "expected"), list(PTB_KNOWN.items()))
def test_ptb_tokenize_known_outputs(text, expected):
    assert ptb_tokenize(text) == expected


ORDINARY_CAPTIONS = [
    "A man riding a horse on the beach.",
    "A woman's hand holding a cell-phone!!",
    "It's a man's hat, don't you think? I can't.",
    "They're waiting; we'll see: you've got it, isn't it?",
    "A 3.5 inch e-mail from the U.S.A. at 10 a.m.",
    "The bus is going to Main St. and 5th Ave. today",
    "A sign that reads \"STOP\" at the corner of 'Elm' street",
    "Two dogs (brown and white) play in the [fresh] snow {winter}",
    "A dog... waiting -- patiently - for food; then it left: happy.",
    "Kids' toys on a wooden floor, near the 2-year-old's bed",
    "A $5 bill, 50% off, 1,000 people & a t-shirt",
    "He said \u201cI\u2019m gonna win\u201d and he cannot lose \u2014 ever\u2026",
    "An old-fashioned clock says 12:30 p.m. on Jan. 5th",
    "This is plan b.",
    "A photo taken in the U.S. The dog is here.",
    "A close up of a pizza with pepperoni & cheese",
    "Mr. Smith and Dr. Jones at St. Mary's, etc.",
    "A man with a C++ book, AT&T logo and/or a t-shirt; 1 1/2 cups",
    "A smiley :) on a wall, the '90s style, y'all",
    "a bowl of food on a table",
    "mail to x@y\u3000",
    "",
]


def _ptb_noise(seed: int, count: int) -> list[str]:
    """Seeded captions glued from fragments that exercise many tokenizer rules."""
    fragments = [
        "A", "the", "dog", "man's", "it's", "don't", "can't", "I'm", "we're", "cannot", "gonna",
        "3.5", "1,000", "10:30", "$5", "5%", "e-mail", "a.m.", "U.S.", "Mr.", "etc.", "vs.",
        "e.g.", "!!", "?!", "&", "(dog)", "[cat]", "{x}", '"q"', "'s'", "-", "--", "---", "...",
        ". . .", "\u2026", "\u2013", "1/2", "1 1/2", "\u00bd", "and/or", "AT&T", "at&t", "o'clock",
        "y'all", "'90s", "'90", "2-year-old", "dog.", "dog,", "x.", "b.", "I.", "no. 5", "sq.",
        "co.", "Inc.", "Calif.", "www.google.com", "foo@bar.com", "@user", "#tag", "<b>", ":)",
        ";p", "(x_x)", "1st", "5pm", "9/11/2001", "(555) 555-1234", "\u00a35", "\u20ac10",
        "\u00a9", "*", "=", "caf\u00e9", "\u65e5\u672c", "\U0001f436", "\u2018hi\u2019", "n't",
        "photo.jpg", "-5", "snake_case", "Ph.D.", "Co. Ltd", "O'Neil", "dogs'", "&amp;",
        "&quot;hi&quot;",
    ]  # fmt: skip
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        parts = [rng.choice(fragments) for _ in range(rng.randint(0, 10))]
        out.append("".join(p + rng.choice([" ", " ", " ", "", "  "]) for p in parts))
    return out


def _ptb_module():
    _pycoco()
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = os.path.join(
        os.path.dirname(ptbtokenizer.__file__), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    )
    # The exact command pycocoevalcap runs, for the cases where we call Java ourselves.
    cmd = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
           "-lowerCase"]  # fmt: skip
    return ptbtokenizer, cmd


def _java_ptb_corpus(captions: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer on the list (one JVM), one output caption per input."""
    ptbtokenizer, cmd = _ptb_module()
    corpus = {i: [{"caption": c}] for i, c in enumerate(captions)}
    if os.access(os.path.dirname(ptbtokenizer.__file__), os.W_OK):
        out = ptbtokenizer.PTBTokenizer().tokenize(corpus)
        return [out[i][0] for i in range(len(captions))]
    # Its package folder is read-only here (it writes its temp file there): run the same command.
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(c.replace("\n", " ") for c in captions))
    try:
        out = subprocess.run([*cmd, f.name], capture_output=True, check=True).stdout
        lines = out.decode().split("\n")
    finally:
        os.remove(f.name)
    punct = ptbtokenizer.PUNCTUATIONS
    return [
        " ".join(w for w in line.rstrip().split(" ") if w not in punct)
        for line in lines[: len(captions)]
    ]


@needs_java
def test_ptb_tokenize_corpus_matches_java_ptbtokenizer():
    captions = ORDINARY_CAPTIONS + _ptb_noise(0, 400)
    expected = _java_ptb_corpus(captions)
    ours = ptb_tokenize_corpus({i: [c] for i, c in enumerate(captions)})
    mismatches = [
        (c, e, ours[i][0]) for i, (c, e) in enumerate(zip(captions, expected)) if ours[i][0] != e
    ]
    assert not mismatches, mismatches[:5]
    # The test must be able to fail: the corpus exercises the rules, not only plain words.
    assert sum("-lrb-" in e for e in expected) > 10
    assert sum("n't" in e for e in expected) > 10


@needs_java
def test_ptb_tokenize_single_caption_matches_java_at_end_of_file():
    """ptb_tokenize(c) is the reference run on a corpus of just c (end of file after it)."""
    ptbtokenizer, cmd = _ptb_module()
    captions = [*ORDINARY_CAPTIONS, "final :)", "the '90", "plan b.", "U.S.", *_ptb_noise(1, 60)]
    with tempfile.TemporaryDirectory() as tmp:
        pairs = []
        for i, c in enumerate(captions):
            with open(f"{tmp}/in{i}", "w", encoding="utf-8") as f:
                f.write(c.replace("\n", " "))
            pairs.append(f"{tmp}/in{i} {tmp}/out{i}")
        with open(f"{tmp}/list", "w") as f:
            f.write("\n".join(pairs))
        # -ioFileList tokenizes each file separately (each ends the file) in one JVM.
        subprocess.run([*cmd, "-ioFileList", f"{tmp}/list"], capture_output=True, check=True)
        for i, c in enumerate(captions):
            with open(f"{tmp}/out{i}", encoding="utf-8") as f:
                line = f.read().split("\n")[0]
            expected = " ".join(
                w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS
            )
            assert ptb_tokenize(c) == expected, c


def test_ptb_tokenize_corpus_context_and_formats():
    # "b." before a caption starting with "A " loses its period in the reference (one file).
    out = ptb_tokenize_corpus({1: ["This is plan b."], 2: [{"caption": "A dog."}]})
    assert out == {1: ["this is plan b"], 2: ["a dog"]}
    assert ptb_tokenize("This is plan b.") == "this is plan b."
    assert ptb_tokenize_corpus({}) == {}
    with pytest.raises(TypeError):
        ptb_tokenize_corpus({1: "a bare string"})
    # Line breaks inside a caption do not shift the captions after it.
    out = ptb_tokenize_corpus({1: ["a\rb\u2028c", "d\ne"], 2: ["f"]})
    assert out == {1: ["a b c", "d e"], 2: ["f"]}


@needs_java
def test_caption_scores_match_pycocoevalcap_pipeline():
    _pycoco()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    raw_refs = {
        1: ["A man riding a horse on the beach.", "A person rides a horse near the ocean!"],
        2: ["Two dogs play in the snow.", "Dogs playing outside, in snow (winter)."],
        3: ["A man's hat; it's red.", "The red hat isn't small."],
    }
    raw_cands = {1: "A man rides a horse on a beach.", 2: "Two dogs playing in snow", 3: "A hat."}
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in raw_refs.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in raw_cands.items()})
    with contextlib.redirect_stdout(io.StringIO()):
        b, _ = Bleu(4).compute_score(gts, res)
    expected = {f"Bleu_{i + 1}": b[i] for i in range(4)}
    expected["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]
    got = caption_scores(raw_refs, raw_cands)
    assert got == pytest.approx(expected, abs=1e-9)


# ------------------------------------------------------------------------------------------------
# VQA accuracy
# ------------------------------------------------------------------------------------------------

# REFERENCE.md §2 check values: (prediction, answers, official, always-normalised)
VQA_CHECKS = [
    ("Yes?", ["yes"] * 10, 0.0, 1.0),
    ("two", ["2"] * 10, 0.0, 1.0),
    ("2", ["2"] * 10, 1.0, 1.0),
    ("the dog", ["dog"] * 2 + ["a dog"] + ["dogs"] * 7, 0.9, 0.9),
    ("red, blue", ["red blue"] * 2 + ["red"] * 8, 0.6, 0.6),
    ("1,000", ["1000"] * 3 + ["1,000"] * 7, 1.0, 1.0),
]


@pytest.mark.parametrize(("pred", "answers", "official", "always"), VQA_CHECKS)
def test_vqa_reference_check_values(pred, answers, official, always):
    assert vqa_accuracy(pred, answers) == pytest.approx(official, abs=1e-12)
    assert vqa_accuracy(pred, answers, normalize="official") == pytest.approx(official, abs=1e-12)
    assert vqa_accuracy(pred, answers, normalize="always") == pytest.approx(always, abs=1e-12)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        # "-" touches no space -> becomes a space; ", " occurs -> "," deleted.
        ("x-ray, photo", "x ray photo"),
        # " -" occurs -> "-" deleted everywhere (even where it touched no space).
        ("t - shirt well-done", "t shirt welldone"),
        # Decided on the original: "/" becomes a space, and that new " -" must not make "-"
        # deleted (it would give "x yz").
        ("x/-y-z", "x y z"),
        # a digit,digit anywhere -> every punctuation character is deleted, not spaced.
        ("1,000 people-ish (approx)", "1000 peopleish approx"),
        ("none", "0"),
        ("None of them", "0 of them"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("The cat and a dog an", "cat and dog"),
        ("the", ""),
        ("dont", "don't"),
        ("Dont know", "don't know"),
        ("Im", "im"),  # the table's capitalised keys can never match
        ("somebody'd", "somebodyd"),  # that table entry really goes this way round
        ("3.5.", "3.5"),  # a period before a digit stays
        ("a.m.", "am"),
        ("yes!", "yes"),
        ("\tYes\n", "yes"),
        ("it's", "it's"),  # apostrophes are not punctuation for VQA
        ("." * 40, "." * 8),  # only 32 periods are removed (re.UNICODE passed as the count)
    ],
)
def test_vqa_normalize_cases_from_the_official_evaluator(raw, normalized):
    assert vqa_normalize(raw) == normalized


def test_vqa_accuracy_more_cases():
    # Official gate: ten identical answers -> nothing normalised, not even the prediction.
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes.", ["yes"] * 10, normalize="always") == 1.0
    # ...but newlines/tabs are stripped in both modes.
    assert vqa_accuracy("\tyes\n", ["yes"] * 10) == 1.0
    # 3 answers: leave-one-out over 3. Matches among the others: cat->1, cat->1, dog->2.
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    # 10 answers with 1 match: the 9 non-matching answers see 1 match (1/3), the match sees 0.
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    # 4+ matches among the others caps at 1.
    assert vqa_accuracy("Red", ["red"] * 5 + ["blue"] * 5) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 4 + ["no"] * 6) == 1.0
    assert vqa_accuracy("one", ["1"] * 3 + ["2"] * 7) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    assert vqa_accuracy("", ["yes", "no"]) == 0.0


def test_vqa_tabs_and_newlines_inside_answers_are_spaces_before_the_gate():
    # The official evaluator replaces "\n" and "\t" by spaces in the prediction and every
    # answer BEFORE it checks whether the answers are all identical.
    assert vqa_accuracy("big\tdog", ["big dog"] * 10) == 1.0
    assert vqa_accuracy("big dog", ["big\ndog"] * 10) == 1.0
    # these answers are identical once tabs are spaces: no normalisation, so "Big" misses
    assert vqa_accuracy("Big dog", ["big\tdog"] * 5 + ["big dog"] * 5) == 0.0


def test_vqa_accuracy_errors():
    with pytest.raises(ValueError, match="'lenient'"):
        vqa_accuracy("yes", ["yes"], normalize="lenient")
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])
    with pytest.raises(TypeError):
        vqa_accuracy("yes", "yes")


def test_vqa_accuracy_corpus_rounds_like_official_and_checks_ids():
    answers = {
        1: ["yes"] * 10,
        2: ["2"] * 10,
        3: ["dog"] * 2 + ["a dog"] + ["dogs"] * 7,
    }
    overall, per_q = vqa_accuracy_corpus({1: "yes", 2: "two", 3: "the dog"}, answers)
    assert per_q == pytest.approx({1: 1.0, 2: 0.0, 3: 0.9})
    assert overall == 63.33  # round(100 * 1.9 / 3, 2)
    overall, _ = vqa_accuracy_corpus({1: "yes", 2: "two", 3: "the dog"}, answers, "always")
    assert overall == 96.67
    with pytest.raises(ValueError) as err:
        vqa_accuracy_corpus({1: "yes", 2: "two", 99: "x"}, answers)
    assert "3" in str(err.value) and "99" in str(err.value)
    with pytest.raises(ValueError, match="without a prediction"):
        vqa_accuracy_corpus({1: "yes"}, answers)
    with pytest.raises(ValueError, match="not in the annotations"):
        vqa_accuracy_corpus({**{q: "x" for q in answers}, 7: "x"}, answers)


# ------------------------------------------------------------------------------------------------
# ANLS, relaxed accuracy, multiple choice
# ------------------------------------------------------------------------------------------------


def test_anls_hand_values():
    assert anls("hello", ["hello"]) == 1.0
    assert anls("helo", ["hello"]) == pytest.approx(1 - 1 / 5)
    assert anls("abc", ["xyz"]) == 0.0
    assert anls("ab", ["ax"]) == 0.5  # exactly at the threshold: kept
    assert anls("abc", ["axy"]) == 0.0  # 1/3 < 0.5
    assert anls("  Hello   World ", ["hello world"]) == 1.0
    # Best of several answers.
    assert anls("helo", ["xyz", "hello", "help"]) == pytest.approx(0.8)
    # Denominator = longer ORIGINAL string: "ab  c" (5 chars) vs "abd": distance("ab c", "abd") = 2.
    assert anls("ab  c", ["abd"]) == pytest.approx(1 - 2 / 5)
    assert anls("abc", ["axy"], threshold=0.3) == pytest.approx(1 / 3)
    assert anls("", [""]) == 1.0
    with pytest.raises(ValueError):
        anls("x", [])
    with pytest.raises(TypeError):
        anls("x", "x")


@pytest.mark.parametrize(
    ("pred", "target", "ok"),
    [
        ("10.4", "10", True),
        ("10.6", "10", False),
        ("9.5", "10", True),
        ("5%", "0.05", True),
        ("50%", "0.5", True),
        ("0.051", "5%", True),
        ("0", "0", True),  # zero target: exact string match
        ("0.0", "0", False),
        ("Yes", "yes", True),
        ("abc", "abd", False),
        ("1,000", "1000", False),  # not a number for float(): string comparison
        ("-10.3", "-10", True),
    ],
)
def test_relaxed_accuracy(pred, target, ok):
    assert relaxed_accuracy(pred, target) is ok


def test_relaxed_accuracy_tolerance():
    assert relaxed_accuracy("11", "10", tolerance=0.1) is True
    assert relaxed_accuracy("11", "10") is False


OPTIONS = ["a cat", "the dog", "cat", "a bird"]


@pytest.mark.parametrize(
    ("pred", "letter"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("(b) the dog", "B"),
        ("B. the dog", "B"),
        ("C: cat", "C"),
        ("The answer is D.", "D"),
        ("Answer: (c)", "C"),
        ("I think (C) fits best", "C"),
        ("the answer is a cat", "A"),  # not option A by letter: by the text "a cat"
        ("A bird.", "D"),  # capital A followed by a space is a word, not a letter
        ("The Dog", "B"),
        ("cat", "C"),
        ("E", None),  # only 4 options
        ("dog", None),
        ("I think B or C", None),
    ],
)
def test_extract_choice(pred, letter):
    assert extract_choice(pred, OPTIONS) == letter


def test_multiple_choice_accuracy():
    assert multiple_choice_accuracy("(B)", "B", OPTIONS) is True
    assert multiple_choice_accuracy("the dog", "B", OPTIONS) is True
    assert multiple_choice_accuracy("the dog", "the dog", OPTIONS) is True
    assert multiple_choice_accuracy("C", "B", OPTIONS) is False
    assert multiple_choice_accuracy("no idea", "B", OPTIONS) is False
    assert multiple_choice_accuracy("Z", "Z") is True  # no options: letters A-Z
    with pytest.raises(ValueError):
        multiple_choice_accuracy("B", "a horse", OPTIONS)


def test_mean_std():
    assert mean_std([3.0]) == (3.0, 0.0)
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)  # the population (not sample) deviation
    mean, std = mean_std([2, 4, 4, 4, 5, 5, 7, 9])
    assert (mean, std) == (5.0, 2.0)
