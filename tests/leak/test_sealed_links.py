"""Sealed paging links (gateway.web.pages): the links a client pages with say nothing of what
the gateway withheld, and a token opens only as the request it seals, for whoever follows it.

Scenario: Dr Gomez holds Ana's general opt-in, which does not open her HIV tests; the fake FHIR
server pages with ``_count``/``_offset`` (tests.leak.test_refill.Pager), so its own ``next``
link after a page that lost matches counts them (``_offset=13`` after ten visible ones). Each
test goes through the real request path and reads the raw answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.hidden import hidden_in
from tests.leak.test_refill import SECRETS, Pager, hiv, link, matches, rbc
from tests.leak.test_side_doors import batch, call, slots
from tests.sealed import SEALED_LINK, inner, is_sealed, opaque

MakeGateway = Callable[..., Awaitable[GatewayUnderTest]]
FHIR_JSON = "application/fhir+json"
FORM = "application/x-www-form-urlencoded"
VISIBLE = [rbc(n) for n in range(1, 13)]
# Eight hidden results after the first visible one: with five a page, the hidden world's next
# page starts at upstream offset 10 (two digits) where the other's starts at 5.
HIDING = [VISIBLE[0], *(hiv(n) for n in range(1, 9)), *VISIBLE[1:]]
SEARCH = f"/Observation?patient={c.PAT_ANA}&_count=5"
OTHER_DOCTOR = "Practitioner/dr-okafor-31"


def second_page(status: int) -> list[str]:
    """What the first page's next link gives: 404, the refilled page cut inside the upstream's
    third; 403, the upstream's second page, which lost four matches."""
    return [r["id"] for r in VISIBLE[5:10]] if status == 404 else [VISIBLE[1]["id"]]


@pytest.fixture
def ana(fake_fhir: FakeFhir) -> FakeFhir:
    fake_fhir.add(c.ANA, c.BEN, c.PRACTITIONER, c.opt_in(c.PAT_ANA), c.opt_in(c.PAT_BEN, "consent-ben-in"))
    return fake_fhir


def searched(fake: FakeFhir) -> list[str]:
    """The searches the upstream received (the gateway's own consent lookups apart)."""
    return [r.path_qs for r in fake.requests if r.path_qs.startswith(("/fhir/Observation", "/fhir?", "/fhir/?"))
            or r.path_qs in ("/fhir", "/fhir/")]


def page_links(body: bytes) -> dict[str, str]:
    return {lk["relation"]: lk["url"] for lk in orjson.loads(body).get("link") or ()}


def readings(url: str) -> str:
    """A link as a client could read it: as written, and its token's bytes."""
    found = SEALED_LINK.fullmatch(url)
    if found is None:
        return url
    token = found.group(2)
    from gateway.sealing import decode_token

    raw = decode_token(token)
    assert raw is not None
    return url + raw.decode("latin-1")


# ---------------------------------------------------------------- what the client holds


@pytest.mark.parametrize("status", [403, 404])
async def test_two_worlds_that_differ_only_in_hidden_matches_hand_out_links_alike(
    ana: FakeFhir, make_gateway: MakeGateway, status: int,
) -> None:
    """The hidden world's next link continues at upstream offset 10 (404: refilled, cut inside
    that page with gateway-skip; 403: after a page that lost four matches), the other's at 5:
    the client holds a link of the same length, in which no offset can be read."""
    gw = await make_gateway(ana.base_url, enforcement={"denied_read_status": status})
    ana.override = Pager(ana, HIDING)
    hidden = await call(gw, "GET", SEARCH)
    ana.override = Pager(ana, VISIBLE)
    missing = await call(gw, "GET", SEARCH)
    assert hidden[0] == missing[0] == 200
    for answer in (hidden, missing):
        links = page_links(answer[2])
        assert set(links) - {"self"} and all(is_sealed(url) for rel, url in links.items() if rel != "self"), links
        for url in links.values():
            assert "_offset" not in readings(url) and "gateway-skip" not in readings(url), url
        assert hidden_in(answer[2].decode(), SECRETS) == []
    hidden_links, missing_links = page_links(hidden[2]), page_links(missing[2])
    assert {rel: len(url) for rel, url in hidden_links.items()} == {rel: len(url) for rel, url in missing_links.items()}
    if status == 404:
        # What the gateway reads when the link is followed: the hidden world's offset, counted upstream.
        assert "_offset=10" in inner(gw, hidden_links["next"]) and "_offset=5" in inner(gw, missing_links["next"])
        assert opaque(hidden[2]) == opaque(missing[2]), "the refilled page reads like the page of the other world"


async def test_following_sealed_links_gives_every_visible_match_once(ana: FakeFhir, make_gateway: MakeGateway) -> None:
    """403 mode: each page loses what it withheld; walking the sealed links reads every page."""
    gw = await make_gateway(ana.base_url)
    ana.override = Pager(ana, HIDING)
    url: str | None = gw.url + SEARCH
    seen: list[str] = []
    while url is not None:
        status, _, body = await call(gw, "GET", url.removeprefix(gw.url))
        assert status == 200, body
        seen += matches(body)
        url = page_links(body).get("next")
        assert url is None or is_sealed(url)
    assert seen == [r["id"] for r in VISIBLE]


async def test_self_is_the_url_the_client_asked(ana: FakeFhir, make_gateway: MakeGateway) -> None:
    """The server's self link names its own offset; the answer's is what the client asked: the
    search, then the sealed link it followed."""
    gw = await make_gateway(ana.base_url, enforcement={"denied_read_status": 404})
    ana.override = Pager(ana, HIDING)
    _, _, first = await call(gw, "GET", SEARCH)
    assert page_links(first)["self"] == gw.url + SEARCH
    following = page_links(first)["next"]
    _, _, second = await call(gw, "GET", following.removeprefix(gw.url))
    assert page_links(second)["self"] == following
    assert "previous" not in page_links(second) and "prev" not in page_links(second)
    assert matches(second) == [r["id"] for r in VISIBLE[5:10]]


async def test_shadow_mode_passes_links_as_the_server_wrote_them(ana: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(ana.base_url, enforcement={"mode": "shadow"})
    ana.override = Pager(ana, HIDING)
    _, _, body = await call(gw, "GET", SEARCH)
    links = page_links(body)
    assert links["next"] == f"{gw.url}/Observation?patient={c.PAT_ANA.replace('/', '%2F')}&_count=5&_offset=5"
    assert not any(is_sealed(url) for url in links.values())


# ---------------------------------------------------------------- tokens that do not open


async def _first_next(gw: GatewayUnderTest) -> str:
    _, _, body = await call(gw, "GET", SEARCH)
    following = page_links(body)["next"]
    assert is_sealed(following)
    return following


def _tampered(url: str) -> str:
    head, token = url.split("gateway-page=")
    flipped = "B" if token[20] != "B" else "C"
    return f"{head}gateway-page={token[:20]}{flipped}{token[21:]}"


def _assert_invalid(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 400, body
    assert headers["Content-Type"].startswith(FHIR_JSON)
    outcome = orjson.loads(body)
    assert outcome["resourceType"] == "OperationOutcome"
    (issue,) = outcome["issue"]
    assert issue["code"] == "invalid" and "not valid here" in issue["diagnostics"] and "Repeat the search" in issue["diagnostics"]
    assert issue["details"]["coding"][0]["code"] == "paging-link-invalid"


@pytest.mark.parametrize("how", ["tampered", "cut", "other-key", "extra-parameter", "named-twice", "other-path",
                                 "garbage", "empty", "other-host"])
@pytest.mark.parametrize("status", [403, 404])
async def test_a_token_that_does_not_open_is_a_400_and_nothing_is_sent(
    ana: FakeFhir, make_gateway: MakeGateway, how: str, status: int,
) -> None:
    gw = await make_gateway(ana.base_url, enforcement={"denied_read_status": status})
    ana.override = Pager(ana, HIDING)
    following = await _first_next(gw)
    token = following.split("gateway-page=")[1]
    path = {
        "tampered": _tampered(following).removeprefix(gw.url),
        "cut": following.removeprefix(gw.url)[:-8],
        "extra-parameter": following.removeprefix(gw.url) + "&_count=50",
        "named-twice": following.removeprefix(gw.url) + f"&gateway-page={token}",
        "other-path": f"/Observation?gateway-page={token}",
        "garbage": "/?gateway-page=" + "A" * 380,
        "empty": "/?Gateway-Page=",
    }.get(how)
    headers: dict[str, str] = {}
    if how == "other-key":
        other = await make_gateway(ana.base_url, enforcement={"denied_read_status": status})
        path = (await _first_next(other)).removeprefix(other.url)
    elif how == "other-host":
        path = following.removeprefix(gw.url)
        headers = {"Host": "gw.elsewhere.example"}  # the same key, another public base
    assert path is not None
    before = len(searched(ana))
    _assert_invalid(*await call(gw, "GET", path, **headers))
    assert searched(ana)[before:] == [], "nothing is sent upstream"


async def test_a_token_is_followed_with_get_never_posted(ana: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(ana.base_url)
    ana.override = Pager(ana, HIDING)
    following = await _first_next(gw)
    before = len(searched(ana))
    token = following.split("gateway-page=")[1]
    # In a _search form body, with the search's own parameters or alone at the base.
    for path, form in ((f"/Observation/_search", f"patient={c.PAT_ANA}&gateway-page={token}"),
                       ("/Observation/_search", f"gateway%2Dpage={token}")):
        _assert_invalid(*await call(gw, "POST", path, body=form.encode(), **{"Content-Type": FORM}))
    _assert_invalid(*await call(gw, "POST", following.removeprefix(gw.url), body=b"", **{"Content-Type": FORM}))
    _assert_invalid(*await call(gw, "DELETE", following.removeprefix(gw.url)))
    assert searched(ana)[before:] == []


# ---------------------------------------------------------------- a token is a place, never an authority


@pytest.mark.parametrize("status", [403, 404])
async def test_a_token_is_decided_for_whoever_follows_it(ana: FakeFhir, make_gateway: MakeGateway, status: int) -> None:
    """Dr Gomez's link, followed by Dr Okafor (whom Ana's second consent shuts out): the page it
    seals is decided for him, who sees none of Ana's results; followed by Dr Gomez, it gives hers."""
    ana.add(c.not_this_doctor(c.PAT_ANA, OTHER_DOCTOR))
    gw = await make_gateway(ana.base_url, enforcement={"denied_read_status": status})
    ana.override = Pager(ana, HIDING)
    following = await _first_next(gw)
    code, _, as_other = await call(gw, "GET", following.removeprefix(gw.url), actor=OTHER_DOCTOR)
    assert code == 200 and matches(as_other) == [], as_other
    assert not any(r["id"].encode() in as_other for r in VISIBLE)
    _, _, as_doctor = await call(gw, "GET", following.removeprefix(gw.url))
    assert matches(as_doctor) == second_page(status)
    assert (await call(gw, "GET", following.removeprefix(gw.url), actor=None))[0] == 401


# ---------------------------------------------------------------- batch entries: the same door


@pytest.mark.parametrize("written", ["absolute", "relative"])
async def test_a_sealed_link_in_a_batch_entry_answers_like_the_link_alone(
    ana: FakeFhir, make_gateway: MakeGateway, written: str,
) -> None:
    gw = await make_gateway(ana.base_url)
    ana.override = Pager(ana, HIDING)
    following = await _first_next(gw)
    _, _, alone = await call(gw, "GET", following.removeprefix(gw.url))
    url = following if written == "absolute" else following.removeprefix(gw.url + "/")
    status, _, body = await call(gw, "POST", "/", body=batch(("GET", url), ("GET", _tampered(url))))
    assert status == 200, body
    got, bad = slots(body)
    assert got["response"]["status"].startswith("200"), got
    slot = orjson.dumps(got["resource"])
    assert matches(slot) == matches(alone) == second_page(403)
    assert opaque(orjson.dumps([e for e in got["resource"]["entry"]])) == opaque(
        orjson.dumps(orjson.loads(alone)["entry"]))
    # The slot's own links are sealed too; its self is the URL the entry named.
    links = page_links(slot)
    assert is_sealed(links["next"]) and "_offset=10" in inner(gw, links["next"])
    assert links["self"] == following
    assert bad["response"]["status"].startswith("400") and "resource" not in bad
    assert bad["response"]["outcome"]["issue"][0]["code"] == "invalid"
    entry_reads = [r.path_qs for r in ana.requests if "gateway-page" in r.path_qs or "gateway-page" in r.body.decode()]
    assert entry_reads == [], "no token reaches the server"


async def test_a_bad_token_refuses_a_whole_transaction(ana: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(ana.base_url)
    ana.override = Pager(ana, HIDING)
    following = await _first_next(gw)
    before = len(ana.requests)
    status, headers, body = await call(gw, "POST", "/", body=batch(("GET", _tampered(following)), kind="transaction"))
    _assert_invalid(status, headers, body)
    assert [r for r in ana.requests[before:] if not r.path_qs.startswith("/fhir/Consent")] == []


# ---------------------------------------------------------------- the Link header


async def test_a_servers_link_header_goes(ana: FakeFhir, make_gateway: MakeGateway) -> None:
    """A server that pages with a Link header too: its next there counts the hidden matches
    (``_offset=10``); the gateway answers without it (the Bundle's sealed links are not repeated
    there either: three of them make a header near proxies' default limits)."""
    gw = await make_gateway(ana.base_url, enforcement={"denied_read_status": 404})
    pager = Pager(ana, HIDING)

    async def with_header(request: Any) -> Any:
        answer = await pager(request)
        if answer is not None:
            nxt = next((lk["url"] for lk in orjson.loads(answer.body)["link"] if lk["relation"] == "next"), None)
            if nxt:
                answer.headers["Link"] = f'<{nxt}>; rel="next"'
        return answer

    ana.override = with_header
    status, headers, body = await call(gw, "GET", SEARCH)
    assert status == 200
    assert "Link" not in headers and "link" not in {name.lower() for name in headers}
    assert is_sealed(page_links(body)["next"])


# ---------------------------------------------------------------- the decision log


async def test_the_log_names_the_request_a_token_seals_never_the_token(
    ana: FakeFhir, make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    """Following a sealed link logs the search it seals (its values masked as any search's);
    a bad token is logged as a refused request; no line holds a token or a hidden record."""
    import logging

    from gateway.web.middleware import JsonLogFormatter

    caplog.set_level(logging.DEBUG, logger="gateway")
    gw = await make_gateway(ana.base_url, enforcement={"denied_read_status": 404})
    ana.override = Pager(ana, HIDING)
    following = await _first_next(gw)
    token = following.split("gateway-page=")[1]
    assert (await call(gw, "GET", following.removeprefix(gw.url)))[0] == 200
    assert (await call(gw, "GET", _tampered(following).removeprefix(gw.url)))[0] == 400
    formatter = JsonLogFormatter()
    records = [r for r in caplog.records if r.name.startswith("gateway")]
    logs = "\n".join(formatter.format(r) + repr(r.__dict__) for r in records)
    assert token[:40] not in logs and _tampered(following).split("gateway-page=")[1][:40] not in logs
    assert hidden_in(logs, SECRETS) == []
    decisions = [orjson.loads(formatter.format(r)) for r in records if r.getMessage() == "decision"]
    followed, refused = decisions[-2], decisions[-1]
    assert (followed["path"], followed["interaction"]) == ("/Observation", "search")
    assert "_offset=" in followed["query"] and "gateway-page" not in followed["query"], followed
    assert refused["status"] == 400 and refused["query"] == "gateway-page=*", refused


async def test_a_relation_is_a_name_never_a_text(ana: FakeFhir, make_gateway: MakeGateway) -> None:
    """A server's own relation text could name a record: only relation names go out (in lower
    case), each link sealed."""
    pager = Pager(ana, HIDING)

    async def odd(request: Any) -> Any:
        answer = await pager(request)
        if answer is not None:
            bundle = orjson.loads(answer.body)
            bundle["link"] += [{"relation": "Next", "url": bundle["link"][-1]["url"]},
                               {"relation": "related obs-hiv-01", "url": f"{ana.base_url}/Observation/obs-hiv-01"},
                               {"relation": "alternate", "url": f"{ana.base_url}/Observation/obs-hiv-02"}]
            answer.body = orjson.dumps(bundle)
        return answer

    ana.override = odd
    gw = await make_gateway(ana.base_url)
    status, _, body = await call(gw, "GET", SEARCH)
    assert status == 200 and hidden_in(body.decode(), SECRETS) == [], body
    relations = [lk["relation"] for lk in orjson.loads(body)["link"]]
    assert "related obs-hiv-01" not in relations and "Next" not in relations and "alternate" in relations, relations
