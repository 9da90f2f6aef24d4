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
- Multiple choice: :func:`extract_choice`, :func:`multiple_choice_accuracy`.
"""

from __future__ import annotations

import functools
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

__all__ = [
    "anls",
    "bleu",
    "caption_scores",
    "cider",
    "extract_choice",
    "multiple_choice_accuracy",
    "ptb_tokenize",
    "ptb_tokenize_corpus",
    "relaxed_accuracy",
    "rouge_l",
    "vqa_accuracy",
    "vqa_accuracy_corpus",
    "vqa_normalize",
]

K = TypeVar("K", bound=Hashable)

# =================================================================================================
# PTB tokenization (pycocoevalcap's PTBTokenizer without Java)
# =================================================================================================
#
# pycocoevalcap writes all captions, one per line, to a file and runs Stanford CoreNLP 3.4.1's
# PTBTokenizer with -preserveLines -lowerCase and its default ("ptb3Escaping") options; it then
# splits every output line on " " and drops the tokens in its PUNCTUATIONS list. The Java tokenizer
# is a JFlex scanner: at each position the rule with the LONGEST match wins (trailing context
# "r/s" counts towards the length but only r is consumed), ties go to the rule listed first. We
# re-implement that with one Python regex per rule (alternatives that Python would resolve
# first-match instead of longest-match are split into separate sub-rules of equal priority) and a
# small longest-match loop. Tokens are lower-cased only after lexing, so the case-sensitive rules
# (AT&T vs at&t, "U.S. The") behave like the Java tokenizer.

# Tokens that pycocoevalcap removes after tokenization. Its list also has "-LRB-", "-RRB-",
# "-LCB-", "-RCB-", but it compares after -lowerCase turned them into "-lrb-" etc., so those
# entries never match and brackets are kept. Only the entries that can match are listed here.
_PTB_REMOVED = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"])

# pycocoevalcap replaces "\n" inside a caption by a space, but the Java lexer also breaks lines at
# these characters, which would shift every later caption onto the wrong image. We treat them as
# spaces instead (a deliberate difference; "\x85" is an ellipsis for the lexer, not a line break).
_LINE_BREAKS = re.compile("\r\n|[\r\n\u2028\u2029\x0b\x0c]")


def _ranges_to_class(ranges: Iterable[tuple[int, int]]) -> str:
    parts = []
    for lo, hi in ranges:
        parts.append(f"\\u{lo:04x}" if lo == hi else f"\\u{lo:04x}-\\u{hi:04x}")
    return "".join(parts)


def _bmp_ranges(pred: Callable[[str], bool]) -> list[tuple[int, int]]:
    # JFlex 1.4 works on UTF-16 code units, so only the Basic Multilingual Plane has classes;
    # characters outside it (emoji) are untokenizable there and get deleted, as here.
    ranges: list[tuple[int, int]] = []
    start = -1
    for cp in range(0x10000):
        if 0xD800 <= cp <= 0xDFFF:
            ok = False
        else:
            ok = pred(chr(cp))
        if ok and start < 0:
            start = cp
        elif not ok and start >= 0:
            ranges.append((start, cp - 1))
            start = -1
    if start >= 0:
        ranges.append((start, 0xFFFF))
    return ranges


# Characters the CoreNLP lexer adds to Java's letters (mostly combining marks of various scripts,
# plus the soft hyphen, which it later deletes from words).
_EXTRA_LETTER_RANGES = (
    (0x00AD, 0x00AD), (0x0237, 0x024F), (0x02C2, 0x02C5), (0x02D2, 0x02DF), (0x02E5, 0x02FF),
    (0x0300, 0x036F), (0x0370, 0x037D), (0x0384, 0x0385), (0x03CF, 0x03CF), (0x03F6, 0x03F6),
    (0x03FC, 0x03FF), (0x0483, 0x0487), (0x04CF, 0x04CF), (0x04F6, 0x04FF), (0x0510, 0x0525),
    (0x055A, 0x055F), (0x0591, 0x05BD), (0x05BF, 0x05BF), (0x05C1, 0x05C2), (0x05C4, 0x05C5),
    (0x05C7, 0x05C7), (0x0615, 0x061A), (0x063B, 0x063F), (0x064B, 0x065E), (0x0670, 0x0670),
    (0x06D6, 0x06EF), (0x06FA, 0x06FF), (0x070F, 0x070F), (0x0711, 0x0711), (0x0730, 0x074F),
    (0x0750, 0x077F), (0x07A6, 0x07B1), (0x07CA, 0x07F5), (0x07FA, 0x07FA), (0x0900, 0x0903),
    (0x093C, 0x093C), (0x093E, 0x094E), (0x0951, 0x0955), (0x0962, 0x0963), (0x0981, 0x0983),
    (0x09BC, 0x09C4), (0x09C7, 0x09C8), (0x09CB, 0x09CD), (0x09D7, 0x09D7), (0x09E2, 0x09E3),
    (0x0A01, 0x0A03), (0x0A3C, 0x0A3C), (0x0A3E, 0x0A4F), (0x0A81, 0x0A83), (0x0ABC, 0x0ACF),
    (0x0B82, 0x0B82), (0x0BBE, 0x0BC2), (0x0BC6, 0x0BC8), (0x0BCA, 0x0BCD), (0x0C01, 0x0C03),
    (0x0C3E, 0x0C56), (0x0D3E, 0x0D44), (0x0D46, 0x0D48), (0x0E30, 0x0E3A), (0x0E47, 0x0E4E),
    (0x0EB1, 0x0EBC), (0x0EC8, 0x0ECD),
)  # fmt: skip

# Stand-alone symbols (one token per character).
_MISC_SYMBOL_RANGES = (
    (0x002B, 0x002B), (0x0025, 0x0025), (0x0026, 0x0026), (0x007E, 0x007E), (0x005E, 0x005E),
    (0x007C, 0x007C), (0x005C, 0x005C), (0x00A6, 0x00A7), (0x00A8, 0x00A9), (0x00AC, 0x00AC),
    (0x00AE, 0x00AF), (0x00B0, 0x00BA), (0x00D7, 0x00D7), (0x00F7, 0x00F7), (0x0387, 0x0387),
    (0x05BE, 0x05BE), (0x05C0, 0x05C0), (0x05C3, 0x05C3), (0x05C6, 0x05C6), (0x05F3, 0x05F4),
    (0x0600, 0x0603), (0x0606, 0x060A), (0x060C, 0x060C), (0x0614, 0x0614), (0x061B, 0x061B),
    (0x061E, 0x061E), (0x066A, 0x066A), (0x066D, 0x066D), (0x0703, 0x070D), (0x07F6, 0x07F8),
    (0x0964, 0x0965), (0x0E4F, 0x0E4F), (0x1FBD, 0x1FBD), (0x2016, 0x2017), (0x2020, 0x2023),
    (0x2030, 0x2038), (0x203B, 0x203B), (0x203E, 0x2042), (0x2044, 0x2044), (0x207A, 0x207F),
    (0x208A, 0x208E), (0x2100, 0x214F), (0x2190, 0x21FF), (0x2200, 0x2BFF), (0x3012, 0x3012),
    (0x30FB, 0x30FB), (0xFF01, 0xFF0F), (0xFF1A, 0xFF20), (0xFF3B, 0xFF40), (0xFF5B, 0xFF65),
)  # fmt: skip


def _ci(word: str) -> str:
    """A regex for ``word`` matching ASCII letters in either case (JFlex %caseless literals)."""
    out = []
    for ch in word:
        if ch.isascii() and ch.isalpha():
            out.append(f"[{ch.lower()}{ch.upper()}]")
        else:
            out.append(re.escape(ch))
    return "".join(out)


def _alt(*parts: str) -> str:
    return "(?:" + "|".join(parts) + ")"


def _words(*words: str) -> str:
    return _alt(*(_ci(w) for w in words))


# --- token actions: each gets the match and returns (token or None, characters consumed) --------

_Action = Callable[[re.Match[str]], tuple[str | None, int]]
_AMP = re.compile("&[aA][mM][pP];")


def _remove_soft_hyphens(text: str) -> str:
    if "\u00ad" not in text:
        return text
    out = text.replace("\u00ad", "")
    return out or "-"  # the lexer never makes an empty token


def _tok(m: re.Match[str]) -> str:
    return m.group("tok")


def _plain(m: re.Match[str]) -> tuple[str | None, int]:
    return _tok(m), len(_tok(m))


def _soft(m: re.Match[str]) -> tuple[str | None, int]:
    return _remove_soft_hyphens(_tok(m)), len(_tok(m))


def _amp(m: re.Match[str]) -> tuple[str | None, int]:
    return _AMP.sub("&", _tok(m)), len(_tok(m))


def _skip(m: re.Match[str]) -> tuple[str | None, int]:
    return None, len(_tok(m))


def _const(value: str) -> _Action:
    return lambda m: (value, len(_tok(m)))


def _pushback(count: int) -> _Action:
    # "cannot" -> "can" + "not", "gonna" -> "gon" + "na": emit all but the last ``count``
    # characters and lex those again.
    return lambda m: (_tok(m)[:-count], len(_tok(m)) - count)


def _redup(m: re.Match[str]) -> tuple[str | None, int]:
    # Abbreviation at a sentence end: the token keeps its period and the period is lexed again.
    t = _tok(m)
    return t, len(t) - 1


def _acronym_before_pronoun(m: re.Match[str]) -> tuple[str | None, int]:
    t = _tok(m)
    if len(t) == 2:  # "I." before "The": the letter alone, then the period
        return t[0], 1
    return t, len(t) - 1


def _nbsp(m: re.Match[str]) -> tuple[str | None, int]:
    return _tok(m).replace(" ", "\u00a0"), len(_tok(m))


def _parens(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


def _phone(m: re.Match[str]) -> tuple[str | None, int]:
    return _parens(_tok(m).replace(" ", "\u00a0")), len(_tok(m))


def _smiley(m: re.Match[str]) -> tuple[str | None, int]:
    return _parens(_tok(m)), len(_tok(m))


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


def _fraction(m: re.Match[str]) -> tuple[str | None, int]:
    t = _tok(m)
    return _FRACTIONS.get(t, t), len(t)


def _currency(m: re.Match[str]) -> tuple[str | None, int]:
    t = _tok(m)
    t = t.replace("\u00a2", "cents").replace("\u00a3", "#")
    t = re.sub("[\u0080\u00a4\u20a0\u20ac]", "$", t)
    return t, len(_tok(m))


def _hyphens(m: re.Match[str]) -> tuple[str | None, int]:
    t = _tok(m)
    return ("--" if 3 <= len(t) <= 4 else t), len(t)


def _latex_quotes(text: str, probably_left: bool) -> str:
    # PTB3 quote escaping: ASCII quotes by guessed side, curly quotes by their own side.
    if probably_left:
        text = re.sub("&apos;|'", "`", text)
        text = re.sub('"|&quot;', "``", text)
    else:
        text = re.sub("&apos;|'", "'", text)
        text = re.sub('"|&quot;', "''", text)
    text = re.sub("[\u0091\u2018\u201b\u2039]", "`", text)
    text = re.sub("[\u0092\u2019\u203a]", "'", text)
    text = re.sub("[\u0093\u201c\u00ab]", "``", text)
    return re.sub("[\u0094\u201d\u00bb]", "''", text)


def _quote(probably_left: bool) -> _Action:
    return lambda m: (_latex_quotes(_tok(m), probably_left), len(_tok(m)))


def _newline(m: re.Match[str]) -> tuple[str | None, int]:
    return "\n", len(_tok(m))


@functools.cache
def _ptb_rules() -> tuple[tuple[re.Pattern[str], _Action], ...]:
    """Compile the lexer rules once, on first use (about 0.1 s: large Unicode classes)."""
    plain_letter = _ranges_to_class(_bmp_ranges(lambda c: unicodedata.category(c)[0] == "L"))
    digit = _ranges_to_class(_bmp_ranges(lambda c: unicodedata.category(c) == "Nd"))
    upper = _ranges_to_class(_bmp_ranges(lambda c: unicodedata.category(c) == "Lu"))
    extra = _ranges_to_class(_EXTRA_LETTER_RANGES)
    misc = _ranges_to_class(_MISC_SYMBOL_RANGES)

    D = f"[{digit}\\u07c0-\\u07c9]"
    PL = f"[{plain_letter}]"  # Java's [:letter:]
    PLD = f"[{plain_letter}{digit}]"
    SPLET = "&[aeiouAEIOU]" + _words("acute", "grave", "uml") + ";"
    LD = f"(?:[{plain_letter}{extra}{digit}\\u07c0-\\u07c9]|{SPLET})"  # LETTER or DIGIT
    LETTER = f"(?:[{plain_letter}{extra}]|{SPLET})"
    WORD = f"{LETTER}{LD}*(?:[.!?]{LETTER}{LD}*)*"
    SPACE = "[ \\t\\u00a0\\u2000-\\u200a\\u3000]"
    SPACENL = "[ \\t\\u00a0\\u2000-\\u200a\\u3000\\r\\n\\u2028\\u2029\\x0b\\x0c\\x85]"
    SGML_NAME = "[A-Za-z][A-Za-z0-9_:.\\-]*"
    SGML = (
        "<(?:[!?][A-Za-z\\-][^>\\r\\n]*"
        f"|{SGML_NAME}(?:[ ]+(?:{SGML_NAME}[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")|{SGML_NAME}))*[ ]*/?"
        f"|/{SGML_NAME})[ ]*>"
    )
    SENTEND = f"{SPACENL}(?:{SPACENL}|[{upper}]|{SGML})"
    NUM = f"(?:{D}*(?:[.:,\\u00ad\\u066b\\u066c]{D}+)+|{D}+)"
    APOS = "(?:['\\u0092\\u2019]|&apos;)"
    APOSETC = "(?:['\\u0092\\u2019`\\u0091\\u2018\\u201b]|&apos;)"
    REDAUX = APOS + _alt("[msdMSD]", _ci("re"), _ci("ve"), _ci("ll"))
    SWORD = "[A-Za-z\\u00ad]*[A-MO-Za-mo-z]\\u00ad*"
    SREDAUX = f"[nN]{APOSETC}[tT]"
    HYPHEN = "[\\-_\\u058a\\u2010\\u2011]"
    THING_PART = f"(?:[dDoOlL]{APOSETC}{PLD})?{PLD}+"
    THING = f"{THING_PART}(?:{HYPHEN}{THING_PART})*"
    AMP = "(?:&|" + _ci("&amp;") + ")"
    THINGA = f"[A-Z]+(?:(?:[+]|{AMP})[A-Z]+)+"
    THING3 = "[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
    ACRO2 = "[A-Za-z](?:\\.[A-Za-z])+"
    HTHING = f"[A-Za-z0-9][A-Za-z0-9.,\\u00ad]*(?:-(?:{ACRO2}\\.|[A-Za-z0-9\\u00ad]+))+"
    ACRO_SPECIAL = _alt(
        _words("Canada", "Sino", "Korean", "EU", "Japan", "non") + "-" + _ci("U.S"),
        _ci("U.S.-") + _alt(_ci("U.K"), _ci("U.S.S.R")),
    )
    ACRO = _alt(ACRO_SPECIAL, "[A-Za-z](?:\\.[A-Za-z])*")
    FILENAME_EXT = _words(
        "docx", "doc", "bat", "bmp", "class", "cgi", "cpp", "c", "dll", "exe", "gif", "gz",
        "html", "htm", "h", "jar", "java", "jpeg", "jpg", "mov", "mp3", "pdf", "php", "pl", "png",
        "ppt", "ps", "py", "sql", "tar", "txt", "wav", "xml", "x", "zip",
    )  # fmt: skip
    FILENAME = f"{LD}+(?:[.]{LD}+)*[.]{FILENAME_EXT}"
    URL_CH = '[^ \\t\\n\\f\\r"<>|(){}]'
    URL_END = '[^ \\t\\n\\f\\r"<>|.!?(){},\\-]'
    FULLURL = f"[hH][tT][tT][pP][sS]?://{URL_CH}+{URL_END}"
    URL_PATH = f'(?:/[^ \\t\\n\\f\\r"<>|()]+{URL_END})?'
    # The Java class "[^ ...,-_$]" holds the RANGE ','..'_', which excludes digits and capitals.
    LIKELYURL_WWW = _ci("www.") + '(?:[^ \\t\\n\\f\\r"<>|.!?(){},]+\\.)+[a-zA-Z]{2,4}' + URL_PATH
    LIKELYURL_TLD = (
        "(?:[^ \\t\\n\\f\\r\"`'<>|.!?(){}\\x2c-\\x5f$]+\\.)+"
        + _words("com", "net", "org", "edu")
        + URL_PATH
    )
    EMAIL_CH = '[^ \\t\\n\\f\\r"<>|(){}.\\u00a0]'
    EMAIL = (
        "(?:&[lL][tT];|<)?[a-zA-Z0-9]"
        '[^ \\t\\n\\f\\r"<>|()\\u00a0{}]*@'
        f"(?:{EMAIL_CH}+\\.)*{EMAIL_CH}+(?:&[gG][tT];|>)?"
    )
    # Abbreviations, all "caseless" except for the explicitly capitalised first letters.
    ABMONTH = _words("Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug", "Sept", "Sep", "Oct", "Nov",
                     "Dec")  # fmt: skip
    ABDAYS = _words("Mon", "Tues", "Tue", "Wed", "Thurs", "Thu", "Fri")
    ABSTATE = _alt(
        _words("Ala", "Ariz", "Calif", "Colo", "Conn", "Ct", "Dak", "Fla", "Ga", "Ind", "Kans",
               "Kan", "Ky", "Md", "Mich", "Minn", "Mo", "Mont", "Neb", "Nev", "Okla", "Penn",
               "Tenn", "Va", "Vt", "Wisc", "Wis", "Wyo"),
        "A" + _ci("z"), "A" + _ci("rk"), "D" + _ci("el"), "I" + _ci("ll"), "L" + _ci("a"),
        "M" + _ci("ass"), "M" + _ci("iss"), "O" + _ci("re"), "P" + _ci("a"), "T" + _ci("ex"),
        "W" + _ci("ash"),
    )  # fmt: skip
    ABCOMP = _alt(
        _words("Inc", "Cos", "Co", "Corp", "Ltd", "Plc", "Rt", "Bancorp", "Bhd", "Assn", "Univ",
               "Intl", "Sys"),
        "[pP][pP]?[tT][ye][sS]?",
    )  # fmt: skip
    ABNUM = _words("tel", "est", "ext", "sq")
    ABPTIT = _alt(_words("Jr", "Sr", "Bros", "Blvd", "Rd", "Esq"), _words("Ed", "Ph") + "\\.[dD]")
    ABBREV1 = _alt(ABMONTH, ABDAYS, ABSTATE, ABCOMP, ABNUM, ABPTIT,
                   _words("etc", "al", "seq", "Bldg")) + "\\."  # fmt: skip
    ABTITLE = _alt(
        _words("Mrs", "Mr", "Ms", "Drs", "Dr", "Profs", "Prof", "Sens", "Sen", "Reps", "Rep",
               "Attys", "Atty", "Lt", "Col", "Gen", "Messrs", "Govs", "Gov", "Adm", "Rev", "Maj",
               "Sgt", "Cpl", "Pvt", "Capt", "Ste", "St", "Ave", "Pres", "Lieut", "Hon", "Brig",
               "Comdr", "Cmdr", "Pfc", "Spc", "Supts", "Supt", "Det", "Mt", "Ft", "Adj", "Adv",
               "Asst", "Assoc", "Ens", "Insp", "Mlle", "Mme", "Msgr", "Sfc"),
        "M" + _ci("iss"),
    )  # fmt: skip
    ABBREV4_WORDS = _alt(
        ABTITLE,
        _words("vs", "Alex", "Wm", "Jos", "Cie", "a.k.a", "cf", "TREAS", "Ph", "Invt", "Elec",
               "Natl", "Mfg", "Mtg", "Dept"),
    )  # fmt: skip
    ABBREV3 = _words("ca", "figs", "fig", "prop", "nos", "no", "art", "bldg", "pp", "op") + "\\."
    PRONOUN = _alt(*(
        w[0] + _ci(w[1:])
        for w in ("About", "According", "Additionally", "After", "An", "A", "As", "At", "But",
                  "Earlier", "He", "Her", "Here", "However", "If", "In", "It", "Last", "Many",
                  "More", "Mr.", "Ms.", "Now", "Once", "One", "Other", "Our", "She", "Since", "So",
                  "Some", "Such", "That", "The", "Their", "Then", "There", "These", "They", "This",
                  "We", "When", "While", "What", "Yet", "You")
    ), SGML)  # fmt: skip
    PHONE_SEP = "[\\- \\u00a0]"
    PHONE_1 = (
        f"(?:\\([0-9]{{2,3}}\\)[ \\u00a0]?|(?:\\+\\+?)?(?:[0-9]{{2,4}}{PHONE_SEP})?"
        f"[0-9]{{2,4}}{PHONE_SEP})[0-9]{{3,4}}{PHONE_SEP}?[0-9]{{3,5}}"
    )
    PHONE_2 = "(?:(?:\\+\\+?)?[0-9]{2,4}\\.)?[0-9]{2,4}\\.[0-9]{3,4}\\.[0-9]{3,5}"
    SMILEY = "[<>]?[:;=][\\-o*']?[()DPdpO\\\\{@|\\[\\]]"
    ASIAN = "[\\-^x=~<>']"
    QUOTES = (
        f"(?:''|[`\\u2018\\u2019\\u201a\\u201b\\u201c\\u201d\\u0091\\u0092\\u0093\\u0094"
        f"\\u201e\\u201f\\u2039\\u203a\\u00ab\\u00bb]{{1,2}}|{APOS})"
    )
    INSENTP = "[,;:\\u3001]"

    def r(pattern: str, context: str = "") -> str:
        return f"(?P<tok>{pattern}){context}"

    # One group per Java rule, in the Java order (earlier wins ties). A group holds the rule's
    # top-level alternatives as separate patterns so that each is matched longest-first.
    rules: list[list[tuple[str, _Action]]] = [
        [(r("[cC][+][+]"), _plain)],
        [(r("[cCfF]#"), _plain)],
        [(r(_ci("cannot")), _pushback(3))],
        [(r("'" + _ci("twas")), _pushback(3))],
        [(r("'" + _ci("tis")), _pushback(2))],
        [(r(_words("gonna", "gotta", "lemme", "gimme", "wanna")), _pushback(2))],
        [(r(SGML), _nbsp)],
        [
            (
                r("&" + _words("MD", "mdash", "ndash") + ";|[\\u0096\\u0097\\u2013\\u2014\\u2015]"),
                _const("--"),
            )
        ],
        [(r(_ci("&amp;")), _amp)],
        [
            (
                r(
                    "&"
                    + _alt(
                        _words("HT", "TL", "UR", "LR", "QC", "QL", "QR", "odq", "cdq"), "#[0-9]+"
                    )
                    + ";"
                ),
                _plain,
            )
        ],
        [(r(WORD, REDAUX), _soft)],
        [(r(SWORD, SREDAUX), _soft)],
        [(r(WORD), _soft)],
        [  # APOWORD: words with an internal or leading apostrophe that stay whole
            (r(f"{APOS}[nN]{APOS}?"), _plain),
            (r(f"[lLdDjJ]{APOS}"), _plain),
            (r(_ci("Dunkin") + APOS), _plain),
            (r(_ci("somethin") + APOS), _plain),
            (r(_ci("ol") + APOS), _plain),
            (r(APOS + _ci("em")), _plain),
            (r(f"[A-HJ-XZn]{APOSETC}{PL}{{2}}{PL}*"), _plain),
            (r(f"{APOS}[2-9]0[sS]"), _plain),
            (r(APOS + _ci("til") + "[lL]?"), _plain),
            (r(f"{PL}+[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]{PL}*"), _plain),
            (r(APOS + _ci("cause")), _plain),
            (r(_ci("cont'd") + "\\.?"), _plain),
            (
                r(
                    _words(
                        "'twas", "nor'easter", "c'mon", "e'er", "s'mores", "ev'ry", "li'l", "nat'l"
                    )
                ),
                _plain,
            ),
            (r(f"[oO]{APOSETC}[oO]"), _plain),
        ],
        [(r(f"[yY]{APOS}", PL), _plain)],
        [(r(FULLURL), _plain)],
        [(r(LIKELYURL_WWW), _plain), (r(LIKELYURL_TLD), _plain)],
        [(r(EMAIL), _plain)],
        [(r("@[a-zA-Z_][a-zA-Z_0-9]*"), _plain), (r(f"#{LETTER}+"), _plain)],
        [(r(REDAUX, "[^A-Za-z]"), _quote(False))],
        [(r(SREDAUX, "[^A-Za-z]"), _quote(False))],
        [(r(f"{D}{{1,2}}[\\-/]{D}{{1,2}}[\\-/]{D}{{2,4}}"), _plain)],
        [(r(f"[\\-+]?{NUM}"), _soft)],
        [
            (
                r(
                    "[\\u207a\\u207b\\u208a\\u208b]?(?:[\\u2070\\u00b9\\u00b2\\u00b3\\u2074-\\u2079]+"
                    "|[\\u2080-\\u2089]+)"
                ),
                _plain,
            )
        ],
        [(r(f"(?:{D}{{1,4}}[\\- \\u00a0])?{D}{{1,4}}(?:\\\\?/|\\u2044){D}{{1,4}}"), _nbsp)],
        [(r("[\\u00bc\\u00bd\\u00be\\u2153-\\u215e]"), _fraction)],
        [
            (r("-" + _words("RRB", "LRB", "RCB", "LCB", "RSB", "LSB") + "-"), _amp),
            (r(_ci("C.D.s")), _amp),
            (r(_ci("pro-")), _amp),
            (r(_ci("anti-")), _amp),
            (r("[sS]" + AMP + "[pP]-500"), _amp),
            (r("[sS]" + AMP + "[lL][sS]"), _amp),
            (r(_ci("Cap") + APOS + "[nN]"), _amp),
            (r("[cC]" + APOS + _ci("est")), _amp),
        ],
        [(r(THING3), _plain)],
        [(r("[A-Z]*\\$|#"), _plain)],
        [
            (
                r(
                    "[\\u00a2\\u00a3\\u00a4\\u00a5\\u0080\\u20a0\\u20ac\\u060b\\u0e3f\\u20a4\\uffe0"
                    "\\uffe1\\uffe5\\uffe6]"
                ),
                _currency,
            )
        ],
        [
            (r(f"{ACRO_SPECIAL}\\.", f"{SPACENL}+{PRONOUN}{SPACENL}"), _acronym_before_pronoun),
            (
                r("[A-Za-z](?:\\.[A-Za-z])*\\.", f"{SPACENL}+{PRONOUN}{SPACENL}"),
                _acronym_before_pronoun,
            ),
        ],
        [(r(ABBREV3, f"{SPACENL}?{D}"), _plain)],
        [(r("(?:[pP][tT][eyEY]|[cC][oO])\\.", f"{SPACE}{_words('ltd', 'lim')}"), _plain)],
        [(r(ABBREV1, SENTEND), _redup)],
        [(r(ABBREV1, "[\\s\\S][\\s\\S]"), _plain)],
        [(r(ABBREV1), _redup)],
        [(r(ABBREV4_WORDS + "\\."), _plain), (r(ACRO + "\\."), _plain)],
        [(r(ABBREV4_WORDS, SPACE), _plain), (r(ACRO, SPACE), _plain)],
        [(r(ACRO, SPACENL), _plain)],
        [(r(f"{APOS}[0-9][0-9]", SPACENL), _plain)],
        [(r(FILENAME, f"(?:{SPACENL}|[.?!,])"), _plain)],
        [(r(f"{WORD}\\.", INSENTP), _soft)],
        [(r(PHONE_1), _phone), (r(PHONE_2), _phone)],
        [(r('"|&[qQ][uU][oO][tT];', "[A-Za-z0-9$]"), _quote(True))],
        [(r('"|&[qQ][uU][oO][tT];'), _quote(False))],
        [(r("\\x7f"), _skip)],
        [(r("<|&[lL][tT];"), _const("<")), (r(">|&[gG][tT];"), _const(">"))],
        [(r(SMILEY, "[^A-Za-z0-9]"), _smiley)],
        [
            (r(f"{ASIAN}_{ASIAN}"), _smiley),
            (r(f"\\({ASIAN}[_.]?{ASIAN}\\)"), _smiley),
            (r("\\([\\^x=~<>']-[\\^x=~<>'`]\\)"), _smiley),
        ],
        [
            (r("\\{"), _const("-LCB-")),
            (r("\\}"), _const("-RCB-")),
            (r("\\["), _const("-LSB-")),
            (r("\\]"), _const("-RSB-")),
            (r("\\("), _const("-LRB-")),
            (r("\\)"), _const("-RRB-")),
        ],
        [(r("-+"), _hyphens)],
        [
            (r("\\.{3,5}"), _const("...")),
            (r("(?:\\.[ \\u00a0]){2,4}\\."), _const("...")),
            (r("[\\u0085\\u2026]"), _const("...")),
        ],
        [(r("@+|#+|_+"), _plain)],
        [(r("\\*+|(?:\\\\\\*){1,3}"), _plain)],
        [(r(INSENTP), _plain)],
        [(r("[?!]+"), _plain)],
        [(r("[.\\u00a1\\u00bf\\u037e\\u0589\\u061f\\u06d4\\u0700-\\u0702\\u07fa\\u3002]"), _plain)],
        [(r("="), _plain)],
        [(r("/"), _plain)],
        [(r(f"{HTHING}\\.", INSENTP), _soft)],
        [(r(HTHING), _soft)],
        [(r(f"{THING}\\.", INSENTP), _plain)],
        [(r(THING), _plain)],
        [(r(f"{THINGA}\\.", INSENTP), _amp)],
        [(r(THINGA), _amp)],
        [(r("'", "[A-Za-z][^ \\t\\n\\r\\u00a0]"), _quote(True))],
        [(r(REDAUX), _quote(False))],
        [(r(SREDAUX), _quote(False))],
        [(r(QUOTES), _quote(False))],
        [(r("<<|>>"), _plain)],
        [(r(f"[{misc}]"), _plain)],
        [(r(f"\\x00|{SPACE}+|[\\u200b\\u200e\\u200f\\ufeff]"), _skip)],
        [(r("\\r\\n|[\\r\\n\\u2028\\u2029\\x0b\\x0c\\x85]"), _newline)],
        [(r(_ci("&nbsp;")), _skip)],
        [(r("[^\\n]"), _skip)],  # untokenizable: deleted (CoreNLP's default "firstDelete")
    ]
    return tuple((re.compile(pattern), action) for group in rules for pattern, action in group)


# Fast path: a run of ASCII letters up to whitespace or the end is one plain word token, except
# for the words the lexer splits ("cannot" -> "can not", "gonna" -> "gon na").
_FAST_WORD = re.compile(r"[A-Za-z]+(?=[ \t\n]|\Z)")
_FAST_SPACE = re.compile(r"[ \t]+")
_SPLIT_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _ptb_lex(text: str) -> list[list[str]]:
    """Lex ``text`` like the Java PTBTokenizer with -preserveLines: tokens per line, original case.

    The end of ``text`` is the end of the file (which matters for a few look-ahead rules).
    """
    rules = _ptb_rules()
    lines: list[list[str]] = [[]]
    pos, n = 0, len(text)
    while pos < n:
        m = _FAST_SPACE.match(text, pos)
        if m:
            pos = m.end()
            continue
        m = _FAST_WORD.match(text, pos)
        if m and m.group().lower() not in _SPLIT_WORDS:
            lines[-1].append(m.group())
            pos = m.end()
            continue
        best_len, best = 0, None
        for pattern, action in rules:
            m = pattern.match(text, pos)
            # Only a strictly longer match replaces the best, so ties go to the earlier rule.
            if m is not None and m.end() - pos > best_len:
                best_len, best = m.end() - pos, (m, action)
        # The last rules match "\n" and any other single character, so there is always a match.
        assert best is not None
        token, consumed = best[1](best[0])
        if token == "\n":
            lines.append([])
        elif token is not None:
            lines[-1].append(token)
        pos += consumed
    return lines


def _ptb_finish(tokens: list[str]) -> str:
    # -lowerCase lower-cases each token (Java's Locale.ENGLISH) and the line is written with single
    # spaces; pycocoevalcap then rstrip()s the line (which also eats Unicode spaces such as U+3000
    # that the lexer left at the end of an e-mail-like token), splits on " " and drops its
    # punctuation tokens.
    line = " ".join(tok.lower() for tok in tokens).rstrip()
    return " ".join(t for t in line.split(" ") if t not in _PTB_REMOVED)


def _clean_caption(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"captions must be str, got {type(text).__name__}")
    return _LINE_BREAKS.sub(" ", text)


def ptb_tokenize(text: str) -> str:
    """Tokenize one caption exactly like pycocoevalcap's ``PTBTokenizer`` (no Java needed).

    Lower-cased PTB tokens joined by single spaces, with pycocoevalcap's punctuation tokens
    removed: ``"It's a (big) dog."`` → ``"it 's a -lrb- big -rrb- dog"``. Equals
    ``PTBTokenizer().tokenize({0: [{"caption": text}]})[0][0]``; for whole corpora use
    :func:`ptb_tokenize_corpus`, which also reproduces how neighbouring captions influence each
    other in the reference (it tokenizes them as one file).
    """
    lines = _ptb_lex(_clean_caption(text))
    return _ptb_finish([t for line in lines for t in line])


def ptb_tokenize_corpus(
    captions: Mapping[K, Sequence[str] | Sequence[Mapping[str, str]]],
) -> dict[K, list[str]]:
    """Tokenize ``{id: [caption, ...]}`` exactly like pycocoevalcap's ``PTBTokenizer().tokenize``.

    Captions may be strings or COCO annotation dicts with a ``"caption"`` key. The reference joins
    all captions (in dict order) into one file, and a few rules look past the end of a caption
    (e.g. ``"plan b."`` keeps ``"b."`` unless the next caption starts with ``"A "``), so this
    tokenizes the same joined text. One deliberate difference: a caption containing a line-break
    character other than ``"\\n"`` (``"\\r"``, U+2028, ...) is treated as if that were a space,
    where the reference would split it and shift every later caption onto the wrong image.
    """
    keys: list[K] = []
    texts: list[str] = []
    for key, caps in captions.items():
        if isinstance(caps, (str, bytes)):
            raise TypeError(f"captions[{key!r}] must be a list of captions, not a single string")
        for cap in caps:
            text = cap["caption"] if isinstance(cap, Mapping) else cap
            keys.append(key)
            texts.append(_clean_caption(text))
    out: dict[K, list[str]] = {key: [] for key in captions}
    if not texts:
        return out
    lines = _ptb_lex("\n".join(texts))
    if len(lines) != len(texts):  # cannot happen: captions hold no line breaks any more
        raise RuntimeError("PTB tokenization lost the caption alignment")
    for key, line in zip(keys, lines):
        out[key].append(_ptb_finish(line))
    return out


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
# Multiple choice
# =================================================================================================

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
