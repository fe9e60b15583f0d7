"""The byte-level reads of the answer path in C, when built (``gateway/core/_native.c``).

One pass of a small C reader over an answer's text replaces, where it can, what the Python
code does with orjson, msgspec and a pattern: the exact repeated-key check of ``strict_json``,
the entry spans of ``view.spans_of`` and the reference scan of ``references.unreleased_named``. The Python code stays the reference: the C reader answers
only for a text it has read whole as strict JSON and returns None ("cannot tell") for anything
else (a malformed text, invalid UTF-8, a lone surrogate escape, nesting deeper than 512, a
number that may not fit a double), and the Python path then decides, as it does when the
module is not built or ``GATEWAY_NATIVE=0`` is set in the environment.
``tests/unit/test_native.py`` holds both to the same answers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import Any


def _load() -> ModuleType | None:
    if os.environ.get("GATEWAY_NATIVE", "1").strip() == "0":
        return None
    try:
        from gateway.core import _native  # type: ignore[attr-defined]
    except ImportError:  # not built: no compiler where it was installed
        return None
    return _native  # type: ignore[no-any-return]


_NATIVE = _load()
ENABLED = _NATIVE is not None


def duplicate_keys(raw: bytes) -> bool | None:
    """Whether the JSON text names a key twice in one object (keys compared unescaped, at every
    depth); None when the C reader is off or cannot tell."""
    if _NATIVE is None:
        return None
    return _NATIVE.duplicate_keys(raw)  # type: ignore[no-any-return]


def entry_spans(raw: bytes, wrap: Callable[[bytes], Any]) -> list[Any] | None:
    """The texts of the items of the top-level object's ``entry`` array, each passed to
    ``wrap``; None when the C reader is off, cannot tell, or finds no such array."""
    if _NATIVE is None:
        return None
    return _NATIVE.entry_spans(raw, wrap)  # type: ignore[no-any-return]


def reference_displays(raw: bytes) -> dict[bytes, bool] | bool | None:
    """What ``references.unreleased_named`` reads of the bytes, in one C pass: each distinct
    value its pattern matches (as written) with whether the object around any of its matches may
    have a display; False when the pattern matches fewer times than ``"reference"`` occurs (any
    reference may then be named); None when the C reader is off or cannot tell."""
    if _NATIVE is None:
        return None
    return _NATIVE.reference_displays(raw)  # type: ignore[no-any-return]


# What ``index_entries`` answers.
INDEXED, UNMATCHED, REPEATED = 1, 0, 2


def index_entries(
    raw: bytes, entries: list[Any], wrap: Callable[[bytes], Any], whole_types: frozenset[str], content_max: int,
    spans: dict[int, Any], rewritten: set[int], content: dict[int, bytes], check: bool = False,
) -> int | None:
    """``view.spans_of``'s indexing of a search set's entries in one C pass (with ``check``,
    the repeated-key check of ``strict_json`` in the same pass): INDEXED; UNMATCHED when
    ``raw`` does not read as the entries (or an entry is no object); REPEATED when ``check``
    and a key is repeated; None (nothing filled) when the C reader is off or cannot tell."""
    if _NATIVE is None:
        return None
    return _NATIVE.index_entries(  # type: ignore[no-any-return]
        raw, entries, wrap, whole_types, content_max, spans, rewritten, content, check)
