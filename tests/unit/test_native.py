"""The C reader (``gateway/core/_native.c``) answers as the Python reference or not at all.

Generated texts go to both: valid JSON of every shape (deep nesting, every escape including
surrogate pairs and keys spelled with ``\\u``, big numbers, whitespace everywhere, repeated keys
at every depth, search-set Bundles with entries of every shape) and invalid JSON (truncated at
any byte, a byte dropped, changed or added, unbalanced brackets, bad escapes, invalid UTF-8,
NUL bytes, a byte order mark, trailing garbage). Wherever the C reader gives an answer, orjson
reads the text and the Python check (``strict_json.python_has_duplicate_keys``,
``view.python_spans_of``) gives the same one; on a text orjson refuses, the C reader says it
cannot tell (None). The public functions are checked both ways too: with the reader, and with
``GATEWAY_NATIVE=0`` (a fresh interpreter), where the Python path runs alone. The reference
scan (``references.unreleased_named``) answers on any bytes as the Python scan does, over the
texts of ``test_reference_scans`` and the ones above.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.core import native, strict_json, view

_native: Any = pytest.importorskip("gateway.core._native", reason="the C reader is not built here")

Draw = Callable[[st.SearchStrategy[Any]], Any]


def _fast(examples: int) -> settings:
    return settings(derandomize=True, database=None, deadline=None, max_examples=examples,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------- texts

_WS = st.sampled_from([b"", b"", b"", b" ", b"\n", b"\r\n", b"\t", b"  \n\t "])
# Few distinct keys, so objects repeat them; "entry" and its escaped spellings among them.
_KEYS = st.sampled_from(["a", "b", "entry", "resource", "resourceType", "reference", "display", "é", "😀", "a\"b",
                         "\\", "", "\u0000x", "ab"])
_STRINGS = st.one_of(st.text(max_size=8), st.sampled_from(["Bundle", "Binary", "Observation", "Patient/p1", "\":", "\\\":"]))
_NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr).filter(lambda t: "e" not in t or len(t) < 24),
    st.sampled_from(["0", "-0", "1e5", "1E+5", "2.5e-3", "-0.0", "1.000", "4.10", "1e99", "1e308", "1e400",
                     "1" + "0" * 199, "1" + "0" * 200, "0." + "0" * 300 + "1", "123456789012345678901234567890"]),
)


@dataclass
class Text:
    data: bytearray
    refusable: bool = False  # holds what the C reader may decline (a number it cannot vouch for)


def _escaped(draw: Draw, text: str) -> bytes:
    """A JSON string for ``text``, each character written plainly or escaped some way."""
    out = bytearray(b'"')
    for ch in text:
        code = ord(ch)
        how = draw(st.sampled_from(["plain", "plain", "plain", "u", "U"]))
        short = {'"': b'\\"', "\\": b"\\\\", "\b": b"\\b", "\f": b"\\f", "\n": b"\\n", "\r": b"\\r", "\t": b"\\t"}
        if ch in short and (how == "plain" or code < 0x20):
            out += short[ch] if draw(st.booleans()) or code < 0x20 else b"\\u%04x" % code
        elif how == "plain" and code >= 0x20:
            out += b"\\/" if ch == "/" and draw(st.booleans()) else ch.encode("utf-8", "surrogatepass")
        elif code > 0xFFFF:
            high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
            out += (b"\\u%04X\\u%04X" if how == "U" else b"\\u%04x\\u%04x") % (high, low)
        else:
            out += (b"\\u%04X" if how == "U" else b"\\u%04x") % code
    return bytes(out + b'"')


@st.composite
def _value(draw: Draw, depth: int = 0, text: Text | None = None) -> bytes:
    assert text is not None
    kind = draw(st.sampled_from(["string", "number", "literal", "object", "array"] if depth < 6 else ["string", "number"]))
    if kind == "string":
        return _escaped(draw, draw(_STRINGS))
    if kind == "number":
        number = draw(_NUMBERS)
        digits = sum(c.isdigit() for c in number.split("e")[0].split("E")[0])
        exponent = number.lower().partition("e")[2].lstrip("+-")
        if digits > 200 or len(exponent) > 2:
            text.refusable = True
        return number.encode()
    if kind == "literal":
        return draw(st.sampled_from([b"true", b"false", b"null"]))
    if kind == "array":
        items = draw(st.lists(_value(depth + 1, text), max_size=4))
        return b"[" + draw(_WS) + (draw(_WS) + b"," + draw(_WS)).join(items) + draw(_WS) + b"]"
    keys = draw(st.lists(_KEYS, max_size=5))
    members = [_escaped(draw, key) + draw(_WS) + b":" + draw(_WS) + draw(_value(depth + 1, text)) for key in keys]
    return b"{" + draw(_WS) + (draw(_WS) + b"," + draw(_WS)).join(members) + draw(_WS) + b"}"


@st.composite
def _bundle(draw: Draw, text: Text) -> bytes:
    """A search-set Bundle whose entries are objects of any shape (resources of the types
    ``spans_of`` rewrites among them), other values, or a large entry."""
    entries = []
    for _ in range(draw(st.integers(0, 5))):
        shape = draw(st.sampled_from(["resource", "resource", "object", "value", "large"]))
        if shape == "resource":
            rtype = draw(st.sampled_from(["Observation", "Patient", "Bundle", "Binary", "Composition", "Parameters"]))
            body = draw(_value(2, text))
            entries.append(b'{"fullUrl":"x",' + draw(_WS) + b'"resource":{"resourceType":' + _escaped(draw, rtype)
                           + b',"id":"1","x":' + body + b'},"search":{"mode":"match"}}')
        elif shape == "object":
            entries.append(draw(_value(5, text).filter(lambda v: v.startswith(b"{")) | st.just(b"{}")))
        elif shape == "value":
            entries.append(draw(_value(5, text)))
        else:
            entries.append(b'{"resource":{"resourceType":"Observation","note":"' + b"x" * 4100 + b'"}}')
    entry_key = _escaped(draw, "entry")
    tail = draw(st.sampled_from([b"", b',"total":3', b',"entry":[]', b',"link":[{"relation":"self"}]']))
    return (b'{"resourceType":"Bundle",' + draw(_WS) + b'"type":"searchset",' + entry_key + b":" + draw(_WS) + b"["
            + (b"," + draw(_WS)).join(entries) + b"]" + tail + b"}")


@st.composite
def valid_texts(draw: Draw) -> Text:
    text = Text(bytearray())
    body = draw(_bundle(text)) if draw(st.booleans()) else draw(_value(0, text))
    text.data = bytearray(draw(_WS) + body + draw(_WS))
    return text


_SPECIAL = st.sampled_from([b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80",
                            b"\xf4\x90\x80\x80", b"\xc0\x80", b"\\u", b"\\ud800", b"\\udc00", b"\\x", b"\x1f", b"e", b"-",
                            b".", b"0", b"\xef\xbb\xbf", b"nul", b"\x7f", b"\n"])


@st.composite
def any_texts(draw: Draw) -> bytes:
    """Valid texts and texts broken every way."""
    text = bytes(draw(valid_texts()).data)
    how = draw(st.sampled_from(["valid", "truncate", "drop", "change", "insert", "append", "bom"]))
    if how == "valid" or not text:
        return text
    at = draw(st.integers(0, len(text) - 1))
    if how == "truncate":
        return text[:at]
    if how == "drop":
        return text[:at] + text[at + 1:]
    if how == "change":
        return text[:at] + draw(_SPECIAL) + text[at + 1:]
    if how == "insert":
        return text[:at] + draw(_SPECIAL) + text[at:]
    if how == "append":
        return text + draw(_SPECIAL)
    return b"\xef\xbb\xbf" + text


# ---------------------------------------------------------------------- the properties

def _orjson(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _REFUSED


_REFUSED = object()


def assert_duplicates_agree(raw: bytes) -> bool | None:
    found = _native.duplicate_keys(raw)
    parsed = _orjson(raw)
    if parsed is _REFUSED:
        assert found is None, raw
    elif found is not None:
        assert found == strict_json.python_has_duplicate_keys(raw, parsed), raw
    return found  # type: ignore[no-any-return]


@_fast(1000)
@given(valid_texts())
@example(Text(bytearray(b'{"a":1,"\\u0061":2}')))
@example(Text(bytearray(b'{"x":[{"k":1,"k":2}]}')))
@example(Text(bytearray(b'{"\\ud83d\\ude00":1,"\xf0\x9f\x98\x80":2}')))
@example(Text(bytearray(b'{"a\\"":1,"a\\u0022":2}')))
@example(Text(bytearray(b"{" + b",".join(b'"k%d":0' % i for i in range(40)) + b',"k7":1}')))
@example(Text(bytearray(b"{" + b",".join(b'"k%d":0' % i for i in range(40)) + b"}")))
def test_duplicate_keys_agree_on_valid_texts(text: Text) -> None:
    raw = bytes(text.data)
    found = assert_duplicates_agree(raw)
    if not text.refusable:
        assert found is not None, raw  # every valid text within its limits gets an answer


@_fast(2500)
@given(any_texts())
@example(b'{"a":"\\ud800"}')
@example(b'{"a":"\\udc00\\ud800"}')
@example(b'"\xed\xa0\x80"')
@example(b'{"a":1}\x00')
@example(b'{"a":1} x')
@example(b"[" * 600 + b"]" * 600)
@example(b"[" * 2000 + b"]" * 1999)
@example(b"1e400")
@example(b"\xef\xbb\xbf{}")
@example(b'{"a":1,}')
@example(b'{"a" 1}')
@example(b'["\\u00e"]')
def test_duplicate_keys_agree_or_refuse_on_any_text(raw: bytes) -> None:
    assert_duplicates_agree(raw)


def test_every_truncation_of_an_answer_is_refused() -> None:
    raw = (b'{"resourceType":"Bundle","type":"searchset","entry":[{"resource":{"resourceType":"Patient",'
           b'"name":[{"text":"\\u00e9\\ud83d\\ude00 \xc3\xa9"}],"n":-1.5e+3,"b":[true,false,null]}}]}')
    assert _native.duplicate_keys(raw) is False
    for end in range(len(raw)):
        assert _native.duplicate_keys(raw[:end]) is None, end
        assert _native.entry_spans(raw[:end], bytes) is None, end


def _python_index(raw: bytes, body: Any) -> view.AnswerView | None:
    return view.python_spans_of(raw, body, view.AnswerView(raw, body, partial=False))


def _native_index(raw: bytes, body: Any, check: bool = False) -> view.AnswerView | None | str:
    answer = view.AnswerView(raw, body, partial=False)
    indexed = _native.index_entries(raw, body["entry"], msgspec.Raw, view.WHOLE_TYPES, view._CONTENT_KEY_MAX_BYTES,
                                    answer.spans, answer.rewritten, answer.content_keys, check)
    if indexed == native.REPEATED:
        assert check and not (answer.spans or answer.rewritten or answer.content_keys)
        return "repeated"
    return "cannot tell" if indexed is None else answer if indexed == native.INDEXED else None


def _indexed(answer: view.AnswerView) -> tuple[dict[int, bytes], set[int], dict[int, bytes]]:
    return {k: bytes(v) for k, v in answer.spans.items()}, answer.rewritten, answer.content_keys


@_fast(1000)
@given(any_texts())
def test_entry_spans_agree_with_the_python_index(raw: bytes) -> None:
    spans = _native.entry_spans(raw, bytes)
    body = _orjson(raw)
    if body is _REFUSED:
        assert spans is None
        return
    if not isinstance(body, dict) or not isinstance(body.get("entry"), list):
        return
    checked = _native_index(raw, body, check=True)
    if strict_json.python_has_duplicate_keys(raw, body):
        assert checked in ("repeated", "cannot tell")
        return  # refused before any span is read
    assert checked != "repeated"
    if isinstance(checked, view.AnswerView):
        reference = _python_index(raw, body)
        assert reference is not None and _indexed(checked) == _indexed(reference)
    try:
        items = [bytes(item) for item in view._ENTRIES.decode(raw).entry]
    except msgspec.DecodeError:
        items = None
    assert spans is None or spans == items
    mine, reference = _native_index(raw, body), _python_index(raw, body)
    assert (mine == "cannot tell") == (checked == "cannot tell")
    if mine == "cannot tell":
        return
    assert (mine is None) == (reference is None)
    if isinstance(mine, view.AnswerView) and reference is not None:
        assert _indexed(mine) == _indexed(reference)


def test_checked_spans_of_refuses_repeated_keys_at_any_depth() -> None:
    for raw in (b'{"resourceType":"Bundle","type":"searchset","entry":[{"resource":{"a":1,"\\u0061":2}}]}',
                b'{"resourceType":"Bundle","type":"searchset","entry":[],"entry":[]}',
                b'{"resourceType":"Bundle","type":"searchset","entry":[{"x":[{"k":{"b":1,"b":1}}]}]}',
                b'{"resourceType":"Patient","name":[{"family":"a","family":"b"}]}'):
        with pytest.raises(strict_json.DuplicateKey):
            view.checked_spans_of(raw, orjson.loads(raw))


def test_spans_of_uses_the_reader_and_matches_python() -> None:
    raw = (b'{"resourceType":"Bundle","type":"searchset","entry":[ {"resource":{"resourceType":"Observation",'
           b'"valueQuantity":{"value":4.10}}} ,{"resource":{"resourceType":"Binary","data":"eA=="}}]}')
    body = orjson.loads(raw)
    answer = view.spans_of(raw, body)
    reference = _python_index(raw, body)
    assert answer is not None and reference is not None
    assert _indexed(answer) == _indexed(reference)
    spliced = answer.splice()
    again = orjson.loads(raw)
    reference = _python_index(raw, again)
    assert reference is not None and spliced == reference.splice()
    assert b'{"value":4.10}' in spliced
    checked = view.checked_spans_of(raw, orjson.loads(raw))
    assert checked is not None and checked.splice() == spliced


# ---------------------------------------------------------------------- built, used, and off

def _compiler() -> bool:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) is not None


def test_the_reader_is_used_where_it_was_built() -> None:
    if os.environ.get("GATEWAY_NATIVE", "1").strip() == "0":
        assert not native.ENABLED
        return
    assert native.ENABLED or not _compiler()
    assert native.duplicate_keys(b'{"a":1,"a":2}') is True


def test_gateway_native_0_runs_the_python_path_alone() -> None:
    probe = (
        "from gateway.core import native, strict_json, view\n"
        "import orjson\n"
        "raw = b'{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"entry\":[{\"a\":1,\"\\\\u0061\":2}]}'\n"
        "print(native.ENABLED, native.duplicate_keys(raw), strict_json.has_duplicate_keys(raw, orjson.loads(raw)))\n"
    )
    env = {**os.environ, "GATEWAY_NATIVE": "0"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.split() == ["False", "None", "True"]


# ---------------------------------------------------------------------- references and displays

from gateway.core import references  # noqa: E402
from tests.unit.test_reference_scans import _THE_BASE, outcome, released_sets, texts  # noqa: E402


def assert_reference_scans_agree(raw: bytes, released: frozenset[str]) -> None:
    found = _native.reference_displays(raw)
    if found is None:
        return  # an object text beyond the reader's limits
    assert outcome(lambda: references._named(found, released, _THE_BASE)) == outcome(
        lambda: references.python_unreleased_named(raw, released, _THE_BASE)), raw


@_fast(1500)
@given(texts, released_sets)
@example(b'{"a":{"reference":"Patient/p2","n":1e100},"display":"x"}', frozenset())
@example(b'{"a":"{\\"n\\":1e100,\\"reference\\":\\"x","reference":"Patient/p2"}', frozenset())
def test_reference_scan_agrees_with_the_python_scan(raw: bytes, released: frozenset[str]) -> None:
    assert_reference_scans_agree(raw, released)


@_fast(1500)
@given(any_texts(), released_sets)
def test_reference_scan_agrees_or_refuses_on_any_text(raw: bytes, released: frozenset[str]) -> None:
    assert_reference_scans_agree(raw, released)
