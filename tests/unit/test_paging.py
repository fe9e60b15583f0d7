"""The pure paging helpers of refilled 404-mode pages (core.paging)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.core.errors import BadRequest
from gateway.core.links import LinkRewriter, under_base
from gateway.core.paging import PageWindow, answer_parts, paging_relations, read_skip, refilled, upstream_page


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


# ---------------------------------------------------------------- the bases links are read under


def test_links_under_any_base_the_server_writes_for_itself_are_the_upstreams() -> None:
    links = LinkRewriter("http://fhir:8080/fhir/", "https://gw.example/fhir",
                         also=("https://EHR.example:443/r4/", "https://ehr.example/r4/dstu"))
    assert links.header("https://ehr.example/r4/Observation?_offset=2") == "https://gw.example/fhir/Observation?_offset=2"
    assert links.header("https://EHR.example:443/r4") == "https://gw.example/fhir"
    assert links.header("https://ehr.example/r4/dstu/Patient/1") == "https://gw.example/fhir/Patient/1", "the longest base first"
    assert links.header("http://fhir:8080/fhir/Patient/1") == "https://gw.example/fhir/Patient/1"
    for elsewhere in ("https://ehr.example/r4x/Patient/1", "https://other.example/r4/Patient/1", "https://ehr.example/r"):
        assert links.header(elsewhere) == elsewhere
        assert links.upstream_url(elsewhere) is None
    assert links.upstream_url("https://ehr.example/r4/Observation?_offset=2") == "http://fhir:8080/fhir/Observation?_offset=2"
    assert links.upstream_url("http://fhir:8080/fhir?_getpages=x") == "http://fhir:8080/fhir?_getpages=x"
    raw = (b'{"link":[{"relation":"next","url":"https://ehr.example/r4/Observation?_offset=2"}],'
           b'"entry":[{"fullUrl":"https:\\/\\/ehr.example\\/r4\\/Observation\\/o1"},{"fullUrl":"https://ehr.example/r4x/O/1"}]}')
    out = orjson.loads(links.body(raw))
    assert out["link"][0]["url"] == "https://gw.example/fhir/Observation?_offset=2"
    assert out["entry"][0]["fullUrl"] == "https://gw.example/fhir/Observation/o1"
    assert out["entry"][1]["fullUrl"] == "https://ehr.example/r4x/O/1"


def test_a_listed_base_that_is_the_public_one_is_left_alone() -> None:
    links = LinkRewriter("http://fhir:8080/fhir", "https://gw.example/fhir", also=("https://gw.example/fhir",))
    raw = b'{"fullUrl":"https://gw.example/fhir/Patient/1"}'
    assert links.body(raw) == raw
    assert links.upstream_url("https://gw.example/fhir/Patient/1") is None


@pytest.mark.parametrize("body, expected", [
    ({"resourceType": "Bundle", "link": [{"relation": "self", "url": "a"}, {"relation": "next", "url": "b"}]}, {"next"}),
    ({"resourceType": "Bundle", "link": [{"relation": " Previous ", "url": "a"}, {"relation": "PREV", "url": "b"}]},
     {"previous", "prev"}),
    ({"resourceType": "Bundle", "link": [{"relation": "self", "url": "a"}, {"relation": "last", "url": "b"}]}, set()),
    ({"resourceType": "Bundle", "link": {"relation": "next"}}, set()),
    ({"resourceType": "Bundle", "link": [{"relation": ["next"]}, "next"]}, set()),
    ({"resourceType": "Bundle"}, set()),
    ({"resourceType": "Observation", "link": [{"relation": "next"}]}, set()),
])
def test_paging_relations_are_a_bundles_own_links_to_other_pages(body: dict[str, Any], expected: set[str]) -> None:
    assert paging_relations(body) == expected
