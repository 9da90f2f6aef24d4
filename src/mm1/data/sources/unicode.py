"""Text that is not valid Unicode: bytes that are not UTF-8, and lone UTF-16 surrogates.

JSON can hold any `\\uXXXX` escape, including a lone surrogate (`"\\ud800"`), which Python keeps
in the `str` but no UTF-8 encoder (the HF tokenizer's included) accepts. Bytes that are not UTF-8
are decoded with `surrogateescape`, which keeps each bad byte as a lone surrogate
U+DC80..U+DCFF, so both problems are found (and repaired) in one place: the record's strings.
Repairing replaces every lone surrogate with U+FFFD, as a `replace` decode would have; the
record is kept and counted in `ReadStats.repaired` by reason.
"""

from __future__ import annotations

import re
from typing import Any

LONE_SURROGATE = "lone_surrogate"
INVALID_UTF8 = "invalid_utf8"

_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def decode_utf8(data: bytes) -> tuple[str, bool]:
    """(text, whether some bytes were not UTF-8); bad bytes are kept as lone surrogates."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="surrogateescape"), True


def has_escaped_bytes(text: str) -> bool:
    """Whether raw text read with `errors="surrogateescape"` held bytes that are not UTF-8 (a
    strict UTF-8 decode never yields surrogates, so any there stand for bad bytes)."""
    return _ESCAPED_BYTE.search(text) is not None


def repair_text(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def repair_value(value: Any, invalid_bytes: bool = False) -> tuple[Any, set[str]]:
    """Repair every string (dict keys included) of a JSON-like value.

    Returns the repaired value (the same object when nothing needed repair) and the reasons
    found: `invalid_utf8` for U+DC80..U+DCFF when the value came from bytes that were not UTF-8
    (`invalid_bytes`), else `lone_surrogate`."""
    reasons: set[str] = set()

    def fix(s: str) -> str:
        if _SURROGATE.search(s) is None:
            return s
        if invalid_bytes and _ESCAPED_BYTE.search(s) is not None:
            reasons.add(INVALID_UTF8)
            if _SURROGATE.search(_ESCAPED_BYTE.sub("", s)) is not None:
                reasons.add(LONE_SURROGATE)
        else:
            reasons.add(LONE_SURROGATE)
        return repair_text(s)

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return fix(v)
        if isinstance(v, dict):
            return {fix(k) if isinstance(k, str) else k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    if not _needs_repair(value):
        return value, reasons
    return walk(value), reasons


def _needs_repair(v: Any) -> bool:
    """Cheap scan first: almost every record is clean and is returned as is."""
    if isinstance(v, str):
        return _SURROGATE.search(v) is not None
    if isinstance(v, dict):
        return any(
            (isinstance(k, str) and _SURROGATE.search(k) is not None) or _needs_repair(x)
            for k, x in v.items()
        )
    if isinstance(v, list):
        return any(_needs_repair(x) for x in v)
    return False
