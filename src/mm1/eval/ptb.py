"""pycocoevalcap's PTB tokenization (Stanford CoreNLP's PTBTokenizer + punctuation removal) in
pure Python, so captions are tokenized exactly as the reference scorers expect without Java."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

__all__ = ["ptb_tokenize", "ptb_tokenize_corpus"]

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
