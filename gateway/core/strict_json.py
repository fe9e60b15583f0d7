"""JSON read one way only: a body with duplicate keys is refused, not guessed at.

``{"subject": A, "subject": B}`` is decided on B by a parser that keeps the last key and
read as A by one that keeps the first; the gateway must never decide one and pass on the
other. The check costs one compact re-serialisation and two byte counts
(``has_duplicate_keys``); the texts the counts cannot vouch for are settled by the exact,
slower parser. When the C reader is built (``core.native``), one pass of it answers instead,
whatever the text's layout; the Python check remains the reference and decides whatever the C
reader cannot tell.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from gateway.core import native

BOM = b"\xef\xbb\xbf"
_KEY_END = b'":'
_WHITESPACE = b" \n\r\t"


class DuplicateKey(ValueError):
    """The JSON text names one key twice in an object."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise DuplicateKey("duplicate key")
    return found


def has_duplicate_keys(raw: bytes, parsed: object) -> bool:
    """True when the JSON text ``raw`` (already parsed into ``parsed``) repeats a key.

    Every key of ``raw`` ends in ``"`` and a colon, perhaps with whitespace between: with the
    whitespace removed, the text counts at least as many ``":`` as it has keys (more only where
    a string holds an escaped quote before a colon). The compact re-serialisation counts
    exactly its distinct keys when none of its strings holds ``\\":``. Equal counts therefore
    prove that no key was given twice; unequal ones are settled by the exact parser.
    The C reader (``core.native``) answers first when it is built.
    """
    found = native.duplicate_keys(raw)
    if found is not None:
        return found
    return python_has_duplicate_keys(raw, parsed)


def python_has_duplicate_keys(raw: bytes, parsed: object) -> bool:
    """``has_duplicate_keys`` in Python alone: the reference the C reader is held to."""
    compact = orjson.dumps(parsed)
    if compact == raw:
        # The text is its own compact re-serialisation, which names each key of an object once.
        return False
    if b'\\":' not in compact:
        if raw.translate(None, _WHITESPACE).count(_KEY_END) == compact.count(_KEY_END):
            return False
    try:
        json.loads(raw, object_pairs_hook=_pairs)
    except DuplicateKey:
        return True
    except ValueError:
        return True  # orjson read it, the exact parser does not: not one reading either
    return False


def loads(raw: bytes) -> Any:
    """Parse a request body: a leading UTF-8 byte order mark is allowed, duplicate keys are not.

    Raises ValueError (``orjson.JSONDecodeError`` or ``DuplicateKey``) when the body has no
    single reading.
    """
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    parsed = orjson.loads(raw)
    if has_duplicate_keys(raw, parsed):
        raise DuplicateKey("duplicate key")
    return parsed
