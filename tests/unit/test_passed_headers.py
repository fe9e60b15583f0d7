"""The allow-list of the FHIR server's response headers (core.answer_headers, web.passed_headers):
which kind of answer passes which header, in one pass, with URLs rewritten."""

from __future__ import annotations

from pathlib import Path

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import ConfigError, build_settings, load_settings
from gateway.core.answer_headers import check_passed_name, content_type
from gateway.core.links import LinkRewriter, paging_links
from gateway.web.passed_headers import PassedHeaders, passed_headers

UP = "http://fhir.internal:8080/fhir"
PUBLIC = "https://gw.example.org/fhir"
LINKS = LinkRewriter(UP, PUBLIC)
DEFAULT = PassedHeaders.of(())
BUNDLE = {"resourceType": "Bundle", "type": "searchset"}
RECORD = {"resourceType": "Condition", "id": "c1"}


def server(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def names(headers: CIMultiDict[str]) -> list[str]:
    return list(headers.keys())


# ---------------------------------------------------------------- which kind of answer passes what

@pytest.mark.parametrize("interaction,status,parsed,kind", [
    ("read", 200, RECORD, "record"),
    ("vread", 200, RECORD, "record"),
    ("create", 201, RECORD, "record"),
    ("update", 200, RECORD, "record"),
    ("read", 200, BUNDLE, "record"),      # a stored Bundle: its ETag goes (settle_bundle_headers)
    ("search", 200, BUNDLE, "bundle"),
    ("history", 200, BUNDLE, "bundle"),
    ("operation", 200, BUNDLE, "bundle"),
    ("batch", 200, BUNDLE, "bundle"),
    ("operation", 200, {"resourceType": "Parameters"}, "answer"),
    ("search", 200, RECORD, "answer"),
    ("read", 302, RECORD, "answer"),      # a redirect's Location is not decided
    ("read", 412, RECORD, "answer"),
    ("search", 500, BUNDLE, "answer"),
    ("read", 401, RECORD, "challenge"),
    ("search", 403, BUNDLE, "answer"),
])
def test_a_decided_answer_passes_by_its_kind(interaction: str, status: int, parsed: dict[str, str], kind: str) -> None:
    assert DEFAULT.decided(interaction, status, parsed) is getattr(DEFAULT, kind)


@pytest.mark.parametrize("interaction,status,kind", [
    ("create", 201, "record"), ("delete", 204, "record"), ("patch", 200, "record"),
    ("create", 400, "answer"), ("update", 409, "answer"),
    ("read", 200, "answer"), ("search", 200, "answer"), ("capabilities", 200, "answer"), ("other", 200, "answer"),
    ("read", 401, "challenge"), ("create", 401, "challenge"), ("read", 403, "answer"),
])
def test_an_unchecked_answer_keeps_record_headers_only_for_a_write_that_succeeded(interaction: str, status: int, kind: str) -> None:
    assert DEFAULT.unchecked(interaction, status) is getattr(DEFAULT, kind)


def test_each_kind_passes_its_headers_and_nothing_unknown() -> None:
    every = server(
        ("Content-Type", "application/fhir+json"), ("Cache-Control", "no-store"), ("Pragma", "no-cache"),
        ("Expires", "0"), ("Vary", "Accept"), ("Content-Language", "en"), ("Preference-Applied", "return=minimal"),
        ("Retry-After", "5"), ("Allow", "GET"), ("WWW-Authenticate", 'Bearer realm="fhir"'),
        ("X-Content-Type-Options", "nosniff"),
        ("Access-Control-Allow-Origin", "https://app.example.org"), ("Access-Control-Expose-Headers", "ETag, Location"),
        ("ETag", 'W/"2"'), ("Last-Modified", "Tue, 05 Mar 2024 10:00:00 GMT"), ("Location", f"{UP}/Condition/c1"),
        ("Content-Location", f"{UP}/Condition/c1/_history/2"), ("Link", f'<{UP}/Condition?page=2>; rel="next"'),
        ("X-Resource-Ids", "Condition/c9"), ("Set-Cookie", "s=1"), ("Warning", '299 - "x"'), ("X-Powered-By", "HAPI"),
        ("Strict-Transport-Security", "max-age=1"), ("Content-Disposition", 'attachment; filename="c9.json"'),
        ("X-Correlation-Id", "abc"), ("X-Request-Id", "up-1"), ("X-Consent-Decision", "permit"),
        ("X-Break-Glass-Audit-Id", "ae-1"), ("Server", "up"), ("Date", "x"), ("Content-Length", "9"),
        ("Transfer-Encoding", "chunked"), ("Keep-Alive", "timeout=5"), ("Accept-Ranges", "bytes"),
    )
    answer = ["Content-Type", "Cache-Control", "Pragma", "Expires", "Vary", "Content-Language",
              "Preference-Applied", "Retry-After", "Allow", "X-Content-Type-Options",
              "Access-Control-Allow-Origin", "Access-Control-Expose-Headers"]
    assert names(passed_headers(every, DEFAULT.answer, LINKS)) == answer
    assert names(passed_headers(every, DEFAULT.record, LINKS)) == [
        *answer, "ETag", "Last-Modified", "Location", "Content-Location"]
    assert names(passed_headers(every, DEFAULT.bundle, LINKS)) == [*answer, "Link"]
    assert names(passed_headers(every, DEFAULT.challenge, LINKS)) == [*answer[:9], "WWW-Authenticate", *answer[9:]]
    # With the gateway's own credentials, a 401 refused those: its challenge is not the client's.
    assert names(passed_headers(every, PassedHeaders.of((), clients_credentials=False).challenge, LINKS)) == answer


def test_urls_are_rewritten_and_link_keeps_its_paging_links_alone() -> None:
    headers = server(
        ("Location", f"{UP}/Condition/c1/_history/2"), ("Content-Location", f"{UP}/Condition/c1"),
        ("Link", f'<{UP}/Condition?page=2>; rel="next"; title="Condition/c9", <{UP}/Condition/c9>; rel="related"'),
        ("Link", f'<{UP}/Condition/c9>; rel="item"'),
    )
    record = passed_headers(headers, DEFAULT.record, LINKS)
    assert (record["Location"], record["Content-Location"]) == (
        f"{PUBLIC}/Condition/c1/_history/2", f"{PUBLIC}/Condition/c1")
    bundle = passed_headers(headers, DEFAULT.bundle, LINKS)
    assert bundle.getall("Link") == [f'<{PUBLIC}/Condition?page=2>; rel="next"']


def test_duplicates_odd_casing_and_connection_named_headers() -> None:
    headers = server(
        ("content-TYPE", "application/fhir+json; charset=UTF-8"), ("Content-Type", "text/html"),
        ("cache-control", "no-store"), ("CACHE-CONTROL", "private"),
        ("Connection", "keep-alive, Vary, X-Rate"), ("Vary", "Accept"), ("X-Rate", "10"), ("x-rate", "9"),
    )
    passed = PassedHeaders.of(("X-Rate",)).answer
    out = passed_headers(headers, passed, LINKS)
    # Written under one spelling; every occurrence of an allowed header but one Content-Type.
    assert list(out.items()) == [
        ("Content-Type", "application/fhir+json; charset=UTF-8"),
        ("Cache-Control", "no-store"), ("Cache-Control", "private"),
    ]
    # Without a Connection header, a configured name passes, every occurrence.
    out = passed_headers(server(("X-Rate", "10"), ("x-rate", "9"), ("X-Other", "1")), passed, LINKS)
    assert list(out.items()) == [("X-Rate", "10"), ("X-Rate", "9")]


@pytest.mark.parametrize("value,expected", [
    ("application/fhir+json", "application/fhir+json"),
    ("application/fhir+json;charset=UTF-8", "application/fhir+json;charset=UTF-8"),
    ("application/fhir+json; fhirVersion=4.0", "application/fhir+json; fhirVersion=4.0"),
    ('application/fhir+json; charset=utf-8; x-source="Condition/c9"', "application/fhir+json; charset=utf-8"),
    ("application/json; profile=Condition/c9", "application/json"),
    ("application/fhir+json; charset=Condition-c9", "application/fhir+json"),
    ("application/fhir+json; fhirVersion=c9", "application/fhir+json"),
    ("Condition c9", "application/fhir+json"),
    ("", "application/fhir+json"),
])
def test_content_type_keeps_its_media_type_charset_and_fhir_version(value: str, expected: str) -> None:
    assert content_type(value) == expected


@pytest.mark.parametrize("value,expected", [
    ('<http://h/a?p=2>; rel="next"', '<http://h/a?p=2>; rel="next"'),
    ("<http://h/a?p=2>;rel=next, <http://h/a?p=0>; REL=PREV", '<http://h/a?p=2>; rel="next", <http://h/a?p=0>; rel="prev"'),
    ('<http://h/a?p=2>; rel="next"; title="Condition/c9"; anchor="#c9"', '<http://h/a?p=2>; rel="next"'),
    ('<http://h/Condition/c9>; rel="related"', None),
    ('<http://h/Condition/c9>; rel="next related"', None),  # a paging link that is also something else
    ("<http://h/Condition/c9>", None),                        # no relation: not a paging link
    ("http://h/a?p=2; rel=next", None),                        # unreadable
    ("", None),
])
def test_paging_links_keep_only_paging_relations(value: str, expected: str | None) -> None:
    assert paging_links(value) == expected


# ---------------------------------------------------------------- upstream.passed_response_headers

@pytest.mark.parametrize("name,problem", [
    ("Connection", "hop-by-hop"), ("keep-alive", "hop-by-hop"), ("Transfer-Encoding", "hop-by-hop"),
    ("X-Consent-Decision", "gateway's own"), ("x-consent-decision-shadow", "gateway's own"),
    ("X-Break-Glass-Audit-Id", "gateway's own"), ("X-Request-Id", "gateway's own"), ("X-Actor", "gateway's own"),
    ("Content-Length", "gateway's own"), ("Server", "gateway's own"),
    ("ETag", "own rule"), ("Location", "own rule"), ("content-location", "own rule"), ("Link", "own rule"),
    ("Content-Type", "own rule"), ("Last-Modified", "own rule"), ("WWW-Authenticate", "own rule"),
    ("X Rate", "not a header name"), ("X-Rate:", "not a header name"), ("", "not a header name"),
    ("X-Ráte", "not a header name"),
])
def test_a_name_the_gateway_governs_or_no_name_cannot_be_passed(name: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        check_passed_name(name)
    with pytest.raises(ConfigError) as caught:
        build_settings({"upstream": {"url": UP, "passed_response_headers": ["X-Rate-Limit", name]}})
    message = str(caught.value)
    assert message.startswith("upstream.passed_response_headers: ") and problem in message and "\n" not in message


def test_passed_response_headers_default_empty_from_file_or_environment(tmp_path: Path) -> None:
    assert build_settings({"upstream": {"url": UP}}).upstream.passed_response_headers == ()
    path = tmp_path / "gateway.yaml"
    path.write_text(f"upstream: {{url: '{UP}', passed_response_headers: [X-RateLimit-Remaining, Set-Cookie]}}\n")
    assert load_settings(path, {}).upstream.passed_response_headers == ("X-RateLimit-Remaining", "Set-Cookie")
    env = {"GATEWAY_UPSTREAM__PASSED_RESPONSE_HEADERS": "X-RateLimit-Remaining, X-RateLimit-Reset"}
    assert load_settings(path, env).upstream.passed_response_headers == ("X-RateLimit-Remaining", "X-RateLimit-Reset")
    configured = PassedHeaders.of(("x-ratelimit-remaining",))
    for kind in (configured.answer, configured.record, configured.bundle, configured.challenge):
        assert kind["x-ratelimit-remaining"] == "x-ratelimit-remaining"
