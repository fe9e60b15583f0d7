"""JSON read one way only: a body with duplicate keys is refused, not guessed at.

``{"subject": A, "subject": B}`` is decided on B by a parser that keeps the last key and
read as A by one that keeps the first; the gateway must never decide one and pass on the
other. The check costs two byte counts and one compact re-serialisation: every key of a
compact JSON text ends in ``":``, so the raw text has more of those than the parsed tree
re-serialised exactly when a key was given twice. Texts the count cannot vouch for (a
space before a colon, an escaped quote before a colon) are checked by the exact, slower
parser.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

BOM = b"\xef\xbb\xbf"
_KEY_END = b'":'
_DOUBTFUL = (b'\\":', b'" :', b'"\n:', b'"\r:', b'"\t:')


class DuplicateKey(ValueError):
    """The JSON text names one key twice in an object."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise DuplicateKey("duplicate key")
    return found


def has_duplicate_keys(raw: bytes, parsed: object) -> bool:
    """True when the JSON text ``raw`` (already parsed into ``parsed``) repeats a key."""
    if _KEY_END not in raw:
        return False
    compact = orjson.dumps(parsed)
    if not any(d in raw for d in _DOUBTFUL) and b'\\":' not in compact:
        return raw.count(_KEY_END) != compact.count(_KEY_END)
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
