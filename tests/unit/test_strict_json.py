"""The duplicate-key check against the exact parser, over generated JSON texts: repeated keys
at any depth, whitespace anywhere, escaped quotes and colons inside strings."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.strict_json import has_duplicate_keys

KEYS = st.sampled_from(["a", "b", "code", 'x":', "y\\", "\u00e9", 'q" :', "c\n:"])
STRINGS = st.sampled_from(["", "v", '":', '\\":', ' : ', "\u2028", '"', "http://x/y"])
SPACE = st.sampled_from(["", " ", "\n", "\t ", "\r\n"])


def text_of(value: Any, draw: Any) -> str:
    """``value`` written as JSON with random whitespace, random \\u escapes, and some objects
    given a key twice."""
    pad = lambda: draw(SPACE)  # noqa: E731
    if isinstance(value, dict):
        pairs = list(value.items())
        if pairs and draw(st.booleans()):
            pairs.append((pairs[0][0], draw(STRINGS)))  # a repeated key
        items = [f"{pad()}{string(k, draw)}{pad()}:{pad()}{text_of(v, draw)}{pad()}" for k, v in pairs]
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(pad() + text_of(v, draw) + pad() for v in value) + "]"
    if isinstance(value, str):
        return string(value, draw)
    return json.dumps(value)


def string(value: str, draw: Any) -> str:
    if draw(st.booleans()):
        return json.dumps(value)  # \u escapes for non-ASCII
    return json.dumps(value, ensure_ascii=False)


JSON_VALUES = st.recursive(
    st.one_of(STRINGS, st.integers(-5, 5), st.booleans(), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)


def exact(text: bytes) -> bool:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in items}) != len(items):
            raise KeyError("repeated")
        return dict(items)

    try:
        json.loads(text, object_pairs_hook=pairs)
    except KeyError:
        return True
    return False


@settings(max_examples=400, derandomize=True, deadline=None)
@given(st.data())
def test_the_count_agrees_with_the_exact_parser(data: st.DataObject) -> None:
    value = data.draw(JSON_VALUES)
    text = text_of(value, data.draw).encode()
    parsed = orjson.loads(text)
    assert has_duplicate_keys(text, parsed) == exact(text), text


def test_a_repeated_key_hidden_by_whitespace_before_its_colon_is_found() -> None:
    text = b'{"a" :1,"b":2,"b":3}'
    assert has_duplicate_keys(text, orjson.loads(text))


def test_an_escaped_quote_before_a_colon_in_a_string_is_no_repeated_key() -> None:
    text = b'{"note":"he said \\": here","a":1}'
    assert not has_duplicate_keys(text, orjson.loads(text))


def test_a_compact_text_is_checked_by_its_re_serialisation_and_a_repeat_still_found() -> None:
    same = b'{"resourceType":"Observation","subject":{"reference":"Patient/a"}}'
    assert orjson.dumps(orjson.loads(same)) == same and not has_duplicate_keys(same, orjson.loads(same))
    repeated = b'{"resourceType":"Observation","subject":{"reference":"Patient/a"},"subject":{"reference":"Patient/b"}}'
    assert has_duplicate_keys(repeated, orjson.loads(repeated))
