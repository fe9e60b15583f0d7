"""The pure paging helpers of refilled 404-mode pages (core.paging)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.core.errors import BadRequest
from gateway.core.links import under_base
from gateway.core.paging import PageWindow, answer_parts, read_skip, refilled, upstream_page


def test_read_skip_strips_the_parameter_in_any_spelling() -> None:
    assert read_skip("patient=P1&gateway-skip=2&_count=3") == ("patient=P1&_count=3", 2)
    assert read_skip("gateway%2Dskip=0") == ("", 0)
    assert read_skip("patient=P1") == ("patient=P1", None)


@pytest.mark.parametrize("query", ["gateway-skip=-1", "gateway-skip=10001", "gateway-skip=x", "gateway-skip=",
                                   "gateway-skip=1&gateway-skip=1", "gateway-skip=%EF%BC%91"])
def test_read_skip_refuses_anything_but_one_bounded_whole_number(query: str) -> None:
    with pytest.raises(BadRequest, match="gateway-skip"):
        read_skip(query)


@pytest.mark.parametrize("url,followed", [
    ("http://fhir:8080/fhir/Observation?_offset=2", True),
    ("http://fhir:8080/fhir?_getpages=abc", True),
    ("http://fhir:8080/fhir", True),
    ("http://fhir:8080/fhirx/Observation", False),
    ("http://fhir:8080/other/Observation", False),
    ("http://fhir:8080.evil.org/fhir/Observation", False),
    ("https://fhir:8080/fhir/Observation", False),
    ("http://evil.org/fhir/Observation", False),
])
def test_only_links_under_the_upstream_base_are_followed(url: str, followed: bool) -> None:
    assert under_base(url, "http://fhir:8080/fhir/") is followed


def entry(rid: str, mode: str | None = "match", rtype: str = "Observation") -> dict[str, Any]:
    out: dict[str, Any] = {"resource": {"resourceType": rtype, "id": rid}}
    if mode is not None:
        out["search"] = {"mode": mode}
    return out


def test_a_window_keeps_its_matches_and_their_includes() -> None:
    bundle = {"resourceType": "Bundle", "entry": [entry("a"), entry("p", "include", "Practitioner"), entry("b"),
                                                  entry("c", None), entry("o", "outcome", "OperationOutcome")]}
    window = PageWindow(skip=1, take=1, further=True)
    assert window.trim(bundle)
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["p", "b"]
    assert (window.matches, window.taken) == (3, 1)


def test_a_window_that_takes_no_match_leaves_no_entry_list() -> None:
    bundle = {"resourceType": "Bundle", "entry": [entry("a"), entry("p", "Include ", "Practitioner")]}
    window = PageWindow(skip=1)
    assert window.trim(bundle) and "entry" not in bundle
    assert (window.matches, window.taken) == (1, 0)


def test_the_refilled_answer_keeps_entry_bytes_and_drops_previous_links() -> None:
    first = answer_parts(b'{"resourceType":"Bundle","type":"searchset","link":[{"relation":"self","url":"s"},'
                         b'{"relation":"previous","url":"p"},{"relation":"next","url":"n"}]}')
    later = answer_parts(b'{"resourceType":"Bundle","type":"searchset","entry":[{"resource":{"resourceType":'
                         b'"Observation","valueQuantity":{"value":4.10}},"search":{"mode":"match"}}]}')
    assert first is not None and later is not None and later.matches() == 1
    body = refilled(first, later.entries, "c", skip=2)
    assert b'"value":4.10}' in body
    assert orjson.loads(body)["link"] == [{"relation": "self", "url": "s?gateway-skip=2"}, {"relation": "next", "url": "c"}]
    assert list(orjson.loads(refilled(first, [], None))) == ["resourceType", "type", "link"]


def test_upstream_page_reads_matches_and_the_next_link() -> None:
    raw = orjson.dumps({"resourceType": "Bundle", "type": "searchset", "link": [{"relation": "next", "url": "u"}],
                        "entry": [entry("a"), entry("b", "include"), entry("c", None), entry("o", None, "OperationOutcome")]})
    page = upstream_page(raw)
    assert page is not None and (page.matches, page.next) == (2, "u")
    assert upstream_page(b'{"resourceType":"Bundle","type":"history"}') is None
