"""404 mode: a search page that lost matches is refilled from the upstream's further pages.

Without refilling, a page that lost matches to withholding is short yet has a ``next`` link
(which never happens when nothing is hidden), and a page whose every match was withheld comes
back empty with one: "there are matching records you cannot see". Scenario: Dr Gomez holds
Ana's general opt-in, which does not open her HIV tests; the fake FHIR server pages its
searches with ``_count``/``_offset`` like the real engine under tests/upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
import pytest
from aiohttp import web

from gateway.core.ds4p import NORDSLCD, NOTICE_EXTENSION
from tests.conftest import GatewayUnderTest, serving
from tests.sealed import inner, is_sealed, opaque
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.hidden import hidden_in

MakeGateway = Callable[..., Awaitable[GatewayUnderTest]]
FHIR_JSON = "application/fhir+json"
ANA_ID = c.PAT_ANA.split("/", 1)[1]
BEN_ID = c.PAT_BEN.split("/", 1)[1]
HIV_CODE = "75622-1"
RBC = c.concept(c.LOINC, "789-8", "Erythrocytes [#/volume] in Blood by Automated count")
HIV = c.concept(c.LOINC, HIV_CODE, "HIV 1 and 2 tests - Meaningful Use set")


def rbc(n: int, patient: str = c.PAT_ANA) -> dict[str, Any]:
    """A visible result whose value the upstream writes as 4.10 (splicing keeps it so)."""
    return c.observation(f"obs-rbc-{n:02d}", patient, RBC, {"valueQuantity": {
        "value": 4.1, "unit": "10*6/uL", "system": "http://unitsofmeasure.org", "code": "10*6/uL"}},
        f"2023-01-{n:02d}T08:00:00Z")


def hiv(n: int) -> dict[str, Any]:
    return c.observation(f"obs-hiv-{n:02d}", c.PAT_ANA, HIV, {"valueCodeableConcept": c.concept(
        c.SNOMED, "10828004", "Positive (qualifier value)")}, f"2022-01-{n:02d}T08:00:00Z")


SECRETS = ("obs-hiv-", HIV_CODE, "HIV 1 and 2", "10828004")


class Pager:
    """Answers ``GET <path>`` (and ``POST <path>/_search``) from a list of records, filtered by
    ``patient`` and ``code``, paged by ``_count`` and ``_offset`` with self, first, next and
    previous links; ``include`` comes with every page as included entries; ``next_base``
    replaces the base of the ``next`` links of pages from offset ``next_base_from`` on;
    ``fail`` answers pages by offset its own way."""

    def __init__(self, fake: FakeFhir, records: list[dict[str, Any]], path: str = "/Observation") -> None:
        self.fake, self.records, self.path = fake, records, path
        self.include: tuple[dict[str, Any], ...] = ()
        self.next_base: str | None = None
        self.next_base_from = 0
        self.fail: dict[int, Callable[[], Awaitable[web.StreamResponse]]] = {}

    async def __call__(self, request: web.Request) -> web.StreamResponse | None:
        path = request.path.removeprefix("/fhir")
        if request.method == "POST" and path == self.path + "/_search":
            query = parse_qsl((await request.read()).decode(), keep_blank_values=True)
        elif request.method == "GET" and path == self.path:
            query = list(request.query.items())
        else:
            return None
        params = dict(query)
        offset = int(params.get("_offset", "0"))
        if offset in self.fail:
            return await self.fail[offset]()
        count = int(params.get("_count", "20"))
        found = [r for r in self.records
                 if params.get("patient") in (None, r["subject"]["reference"])
                 and params.get("code") in (None, *(cd["code"] for cd in r["code"]["coding"]))]
        base = self.fake.base_url

        def page(at: int, where: str = base) -> str:
            kept = [(k, v) for k, v in query if k != "_offset"] + [("_offset", str(at))]
            return f"{where}{self.path}?{urlencode(kept)}"

        bundle = c.bundle(found[offset:offset + count], base, include=self.include if found[offset:offset + count] else (),
                          self_url=page(offset))
        bundle["total"] = len(found)
        bundle["link"].append({"relation": "first", "url": page(0)})
        if offset + count < len(found):
            elsewhere = self.next_base if self.next_base and offset >= self.next_base_from else base
            bundle["link"].append({"relation": "next", "url": page(offset + count, elsewhere)})
        if offset > 0:
            bundle["link"].append({"relation": "previous", "url": page(max(0, offset - count))})
        raw = orjson.dumps(bundle).replace(b'"value":4.1,', b'"value":4.10,')
        return web.Response(body=raw, content_type=FHIR_JSON)


def pages_read(fake: FakeFhir, path: str = "/Observation") -> list[str]:
    return [r.path_qs for r in fake.requests if r.path_qs.startswith(f"/fhir{path}")]


async def call(gw: GatewayUnderTest, path: str, actor: str = c.DOCTOR, **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with gw.session.get(gw.url + path, headers={"X-Actor": actor, **headers}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def matches(body: bytes) -> list[str]:
    bundle = orjson.loads(body)
    return [e["resource"]["id"] for e in bundle.get("entry") or () if e.get("search", {}).get("mode") == "match"]


def link(body: bytes, relation: str) -> str | None:
    return next((lk["url"] for lk in orjson.loads(body).get("link") or () if lk["relation"] == relation), None)


async def walk(gw: GatewayUnderTest, path: str, limit: int = 40) -> list[bytes]:
    """Every page of a search, following the gateway's own next links."""
    url: str | None = gw.url + path
    bodies = []
    while url is not None and len(bodies) < limit:
        assert url.startswith(gw.url), f"paging left the gateway: {url}"
        status, _, body = await call(gw, url.removeprefix(gw.url))
        assert status == 200, body
        bodies.append(body)
        url = link(body, "next")
    assert url is None, "the walk did not end"
    return bodies


@pytest.fixture
def ana(fake_fhir: FakeFhir) -> FakeFhir:
    """Ana and Ben each hold a general opt-in (their HIV results stay closed to Dr Gomez)."""
    fake_fhir.add(c.ANA, c.BEN, c.PRACTITIONER, c.opt_in(c.PAT_ANA), c.opt_in(c.PAT_BEN, "consent-ben-in"))
    return fake_fhir


@pytest.fixture
async def gw404(ana: FakeFhir, make_gateway: MakeGateway) -> GatewayUnderTest:
    return await make_gateway(ana.base_url, enforcement={"denied_read_status": 404})


# ---------------------------------------------------------------- the page whose every match is hidden


async def test_all_hidden_first_page_answers_like_a_search_that_found_nothing(ana: FakeFhir, gw404: GatewayUnderTest) -> None:
    ana.override = Pager(ana, [hiv(1), hiv(2), rbc(1, c.PAT_BEN)])
    hidden = await call(gw404, f"/Observation?patient={c.PAT_ANA}&code={HIV_CODE}&_count=1")
    nothing = await call(gw404, f"/Observation?patient={c.PAT_BEN}&code={HIV_CODE}&_count=1")
    (s1, h1, b1), (s2, h2, b2) = hidden, nothing
    assert s1 == s2 == 200
    assert link(b1, "next") is None, "an empty page with a next link says there are hidden matches"
    assert opaque(b1).replace(ANA_ID.encode(), BEN_ID.encode()) == opaque(b2), (b1, b2)
    names = {"date"}
    assert sorted(k.lower() for k in h1 if k.lower() not in names) == sorted(k.lower() for k in h2 if k.lower() not in names)
    for name in ("Content-Type", "Transfer-Encoding", "X-Consent-Decision"):
        assert h1.get(name) == h2.get(name), name
    assert h1.get("Transfer-Encoding") == "chunked" and "Content-Length" not in h1
    assert hidden_in(b1.decode() + repr(h1), [s for s in SECRETS if s != HIV_CODE]) == []  # the code was asked
    assert len(pages_read(ana)) == 3, "the hidden search's second page was read, the empty one's none"


# ---------------------------------------------------------------- pages that lost some matches


# v: visible, h: hidden. With _count=3 the first page loses one match, the second is cut after
# one, the third starts after that one (gateway-skip) and is refilled from the fourth.
PATTERN = "vhvvvvhhvvv"


def records(pattern: str = PATTERN) -> list[dict[str, Any]]:
    out = []
    for n, kind in enumerate(pattern, start=1):
        out.append(rbc(n) if kind == "v" else hiv(n))
    return out


def visible(pattern: str = PATTERN) -> list[str]:
    return [f"obs-rbc-{n:02d}" for n, kind in enumerate(pattern, start=1) if kind == "v"]


@pytest.mark.parametrize("count", [1, 2, 3, 4])
async def test_walking_refilled_pages_gives_every_visible_match_once(ana: FakeFhir, gw404: GatewayUnderTest, count: int) -> None:
    gw = gw404
    ana.override = Pager(ana, records())
    bodies = await walk(gw, f"/Observation?patient={c.PAT_ANA}&_count={count}")
    pages = [matches(b) for b in bodies]
    assert [m for page in pages for m in page] == visible(), pages
    assert all(len(page) == count for page in pages[:-1]), pages
    assert 1 <= len(pages[-1]) <= count
    for body in bodies:
        assert hidden_in(body.decode(), SECRETS) == []
        assert b'"value":4.10,' in body, "kept entries keep the upstream's bytes"
        assert link(body, "previous") is None and link(body, "prev") is None
        assert "total" not in orjson.loads(body)
    assert all("gateway-skip" not in path for path in pages_read(ana)), "the gateway's own parameter is never sent on"


async def test_the_cut_page_continues_exactly_after_the_last_match_sent(ana: FakeFhir, gw404: GatewayUnderTest) -> None:
    ana.override = Pager(ana, records())
    status, _, first = await call(gw404, f"/Observation?patient={c.PAT_ANA}&_count=3")
    assert status == 200 and matches(first) == ["obs-rbc-01", "obs-rbc-03", "obs-rbc-04"]
    following = link(first, "next") or ""
    assert is_sealed(following) and following.startswith(gw404.url)
    assert "_offset=3" in inner(gw404, following) and inner(gw404, following).endswith("gateway-skip=1")
    status, _, second = await call(gw404, following.removeprefix(gw404.url))
    assert status == 200 and matches(second) == ["obs-rbc-05", "obs-rbc-06", "obs-rbc-09"]
    assert link(second, "self") == following, "self is the link the client followed"
    assert inner(gw404, link(second, "self") or "").endswith("gateway-skip=1")


async def test_a_search_by_post_is_refilled_too(ana: FakeFhir, gw404: GatewayUnderTest) -> None:
    ana.override = Pager(ana, records())
    async with gw404.session.post(
        f"{gw404.url}/Observation/_search", data=f"patient={c.PAT_ANA}&_count=3",
        headers={"X-Actor": c.DOCTOR, "Content-Type": "application/x-www-form-urlencoded"},
    ) as resp:
        body = await resp.read()
        assert resp.status == 200, body
    assert matches(body) == ["obs-rbc-01", "obs-rbc-03", "obs-rbc-04"]


async def test_includes_of_the_matches_taken_stay(ana: FakeFhir, gw404: GatewayUnderTest) -> None:
    pager = Pager(ana, [hiv(1), rbc(2), rbc(3)])
    pager.include = (c.PRACTITIONER,)
    ana.override = pager
    status, _, body = await call(gw404, f"/Observation?patient={c.PAT_ANA}&_include=Observation:performer&_count=1")
    assert status == 200
    entries = orjson.loads(body)["entry"]
    assert [(e["resource"]["id"], e["search"]["mode"]) for e in entries] == [
        ("obs-rbc-02", "match"), (c.PRACTITIONER["id"], "include")]


async def test_part2_data_a_further_page_brought_carries_the_notice(ana: FakeFhir, gw404: GatewayUnderTest) -> None:
    """Dr Gomez may see Ana's opioid-use record (a permit names its labels), not her HIV test."""
    ana.add(c.opt_in(c.PAT_ANA, labels=("42CFRPart2", "OPIOIDUD")))
    hidden = {**c.condition("cond-hiv-b20-2c1", c.PAT_ANA, c.concept(
        "http://hl7.org/fhir/sid/icd-10-cm", "B20", "Human immunodeficiency virus [HIV] disease"), "2021-03-04")}
    ana.override = Pager(ana, [hidden, c.OUD_CONDITION], path="/Condition")
    status, _, body = await call(gw404, f"/Condition?patient={c.PAT_ANA}&_count=1")
    assert status == 200 and matches(body) == [c.OUD_CONDITION["id"]]
    bundle = orjson.loads(body)
    assert [e["url"] for e in bundle["meta"]["extension"]] == [NOTICE_EXTENSION]
    assert NORDSLCD in {s["code"] for s in bundle["entry"][0]["resource"]["meta"]["security"]}
    assert hidden_in(body, ("cond-hiv", "B20")) == []  # not counting chance matches inside sealed links


async def test_a_refilled_request_counts_one_decision(ana: FakeFhir, gw404: GatewayUnderTest) -> None:
    ana.override = Pager(ana, records("hhhv"))
    status, _, body = await call(gw404, f"/Observation?patient={c.PAT_ANA}&_count=1")
    assert status == 200 and matches(body) == ["obs-rbc-04"]
    decided = sum(gw404.metric("consent_gateway_decisions_total", {"decision": d}) for d in ("permit", "filtered", "deny"))
    assert decided == 1
    assert gw404.metric("consent_gateway_decisions_total", {"decision": "filtered"}) == 1


# ---------------------------------------------------------------- the gateway's continuation parameter


@pytest.mark.parametrize("value", ["-1", "10001", "99999999999999999999", "abc", "1.5", "", "%201", "1&gateway-skip=2"])
async def test_a_tampered_skip_is_a_clear_400(ana: FakeFhir, gw404: GatewayUnderTest, value: str) -> None:
    ana.override = Pager(ana, records())
    status, headers, body = await call(gw404, f"/Observation?patient={c.PAT_ANA}&_count=3&gateway-skip={value}")
    assert status == 400, body
    assert headers["Content-Type"].startswith(FHIR_JSON)
    outcome = orjson.loads(body)
    assert outcome["resourceType"] == "OperationOutcome" and "gateway-skip" in outcome["issue"][0]["diagnostics"]
    assert pages_read(ana) == []


@pytest.mark.parametrize("skip", [2, 3, 10000])
async def test_a_skip_past_the_visible_matches_of_a_page_skips_only_visible_ones(
    ana: FakeFhir, gw404: GatewayUnderTest, skip: int,
) -> None:
    """A client's own value skips its own visible records (of the page it names and the pages
    after it, as a continuation from an anchor does) and never brings a hidden one."""
    ana.override = Pager(ana, records("vhvhvv"))
    status, _, body = await call(gw404, f"/Observation?patient={c.PAT_ANA}&_count=3&gateway-skip={skip}")
    assert status == 200, body
    expected = {2: ["obs-rbc-05", "obs-rbc-06"], 3: ["obs-rbc-06"], 10000: []}[skip]
    assert matches(body) == expected
    assert hidden_in(body.decode(), SECRETS) == []


async def test_skip_in_403_mode_is_the_gateways_too(ana: FakeFhir, make_gateway: MakeGateway) -> None:
    """403 mode continues from anchors as well (a cursor naming a withheld entry is never handed
    out): the parameter is the gateway's, checked and not sent on; in shadow mode it is the client's."""
    gw = await make_gateway(ana.base_url)
    ana.override = Pager(ana, records())
    status, _, _ = await call(gw, f"/Observation?patient={c.PAT_ANA}&_count=3&gateway-skip=abc")
    assert status == 400
    assert not [p for p in pages_read(ana) if "gateway-skip" in p]
    shadow = await make_gateway(ana.base_url, enforcement={"mode": "shadow"})
    status, _, _ = await call(shadow, f"/Observation?patient={c.PAT_ANA}&_count=3&gateway-skip=abc")
    assert status == 200
    assert [p for p in pages_read(ana) if "gateway-skip=abc" in p]


# ---------------------------------------------------------------- what is never followed, and the bound


@pytest.mark.parametrize("where", ["other-host", "other-base"])
async def test_a_next_link_off_the_upstream_base_is_not_followed(ana: FakeFhir, gw404: GatewayUnderTest, where: str) -> None:
    """The first page's next link is followed; the second page's points elsewhere and is not."""
    other = FakeFhir()
    async with serving(other.app()) as root:
        other.base_url = root + other.base_path
        pager = Pager(ana, records("hvhvvv"))
        pager.next_base = other.base_url if where == "other-host" else ana.base_url.removesuffix("/fhir") + "/elsewhere"
        pager.next_base_from = 2
        ana.override = pager
        status, _, body = await call(gw404, f"/Observation?patient={c.PAT_ANA}&_count=2")
        assert status == 200
        assert matches(body) == ["obs-rbc-02", "obs-rbc-04"]
        assert other.requests == []
        assert not [r for r in ana.requests if r.path_qs.startswith("/elsewhere")]
        assert len(pages_read(ana)) == 2
        assert link(body, "next") is None, "a link elsewhere is not handed out: paging would leave the gateway"


async def test_the_bound_answers_what_was_gathered_with_a_link_to_continue(ana: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(ana.base_url, enforcement={"denied_read_status": 404, "refill_max_pages": 2})
    ana.override = Pager(ana, records("hhhhhv"))
    status, _, body = await call(gw, f"/Observation?patient={c.PAT_ANA}&_count=1")
    assert status == 200 and matches(body) == []
    assert len(pages_read(ana)) == 3, "the first page and two more"
    following = inner(gw, link(body, "next") or "")
    assert following.startswith(gw.url) and "_offset=3" in following and "gateway-skip" not in following
    assert [m for b in await walk(gw, f"/Observation?patient={c.PAT_ANA}&_count=1") for m in matches(b)] == ["obs-rbc-06"]


async def test_a_next_link_back_to_a_page_read_ends_the_chain(ana: FakeFhir, gw404: GatewayUnderTest) -> None:
    """An upstream whose second page names itself as next: it is read once, sent once."""
    pager = Pager(ana, records("hv"))
    looping = f"{ana.base_url}/Observation?patient={c.PAT_ANA.replace('/', '%2F')}&_count=1&_offset=1"

    async def itself() -> web.StreamResponse:
        bundle = c.bundle([rbc(2)], ana.base_url, self_url=looping)
        bundle["link"].append({"relation": "next", "url": looping})
        return web.Response(body=orjson.dumps(bundle), content_type=FHIR_JSON)

    pager.fail = {1: itself}
    ana.override = pager
    status, _, body = await call(gw404, f"/Observation?patient={c.PAT_ANA}&_count=1")
    assert status == 200 and matches(body) == ["obs-rbc-02"]
    assert link(body, "next") is None
    assert len(pages_read(ana)) == 2


async def test_refilling_off_leaves_the_page_as_it_was(ana: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(ana.base_url, enforcement={"denied_read_status": 404, "refill_max_pages": 0})
    ana.override = Pager(ana, records("hv"))
    status, _, body = await call(gw, f"/Observation?patient={c.PAT_ANA}&_count=1")
    assert status == 200 and matches(body) == [] and link(body, "next")
    assert len(pages_read(ana)) == 1


# ---------------------------------------------------------------- upstream errors while refilling


async def _server_error() -> web.StreamResponse:
    return web.Response(status=500, body=b'{"resourceType":"OperationOutcome","issue":[{"severity":"error",'
                        b'"code":"exception","diagnostics":"obs-hiv-02 could not be read"}]}', content_type=FHIR_JSON)


async def _slow() -> web.StreamResponse:
    await asyncio.sleep(2)
    return web.Response(status=500)


async def _not_a_bundle() -> web.StreamResponse:
    return web.Response(body=orjson.dumps(c.ANA), content_type=FHIR_JSON)


@pytest.mark.parametrize("fail,status", [(_server_error, 502), (_slow, 504), (_not_a_bundle, 502)],
                         ids=["500", "timeout", "not-a-bundle"])
async def test_an_upstream_error_while_refilling_fails_closed(
    ana: FakeFhir, make_gateway: MakeGateway, fail: Callable[[], Awaitable[web.StreamResponse]], status: int,
) -> None:
    gw = await make_gateway(ana.base_url, enforcement={"denied_read_status": 404}, upstream={"timeout_s": 1})
    pager = Pager(ana, records("hvv"))
    pager.fail = {1: fail}
    ana.override = pager
    got, headers, body = await call(gw, f"/Observation?patient={c.PAT_ANA}&_count=1")
    assert got == status, body
    assert orjson.loads(body)["resourceType"] == "OperationOutcome"
    assert headers["Content-Type"].startswith(FHIR_JSON)
    assert hidden_in(body.decode(), SECRETS) == [] and b"obs-rbc" not in body


# ---------------------------------------------------------------- unchanged elsewhere


async def test_403_mode_break_glass_and_shadow_are_not_refilled(ana: FakeFhir, make_gateway: MakeGateway) -> None:
    """Control: outside enforced 404 mode, and under break-glass, a page is answered as it was."""
    path = f"/Observation?patient={c.PAT_ANA}&_count=1"
    for enforcement, headers in (
        ({}, {}),
        ({"denied_read_status": 404}, {"X-Break-Glass": "Medical emergency"}),
        ({"denied_read_status": 404, "mode": "shadow"}, {}),
    ):
        ana.requests.clear()
        gw = await make_gateway(ana.base_url, enforcement=enforcement)
        ana.override = Pager(ana, records("hvv"))
        status, _, body = await call(gw, path, **headers)
        assert status == 200, body
        assert len(pages_read(ana)) == 1, (enforcement, headers)
        assert link(body, "next")


# ---------------------------------------------------------------- a server that writes its external name


EXTERNAL = "https://FHIR.hospital.example:443/r4"  # listed spelled otherwise than the server writes it
WRITTEN = "https://fhir.hospital.example/r4"


@pytest.mark.parametrize("status", [404, 403])
async def test_pages_the_server_links_under_its_external_name_stay_behind_the_gateway(
    ana: FakeFhir, make_gateway: MakeGateway, status: int,
) -> None:
    """A server reached by an internal name that writes its external one (``reference_bases``)
    in its next links: clients page through the gateway, and in 404 mode the gateway refills
    from those pages, reading them at the upstream base."""
    gw = await make_gateway(ana.base_url, enforcement={"denied_read_status": status},
                            upstream={"reference_bases": [EXTERNAL + "/"]})
    pager = Pager(ana, records())
    pager.next_base = WRITTEN
    ana.override = pager
    bodies = await walk(gw, f"/Observation?patient={c.PAT_ANA}&_count=3")
    assert [m for b in bodies for m in matches(b)] == visible()
    for body in bodies:
        assert "hospital.example" not in body.decode().lower(), "a link under the external name leaves the gateway"
        assert hidden_in(body.decode(), SECRETS) == []
    if status == 404:
        assert all(len(matches(b)) == 3 for b in bodies[:-1]), "pages under the external name are refilled"


async def test_a_next_link_under_the_external_name_is_not_followed_unless_listed(ana: FakeFhir, gw404: GatewayUnderTest) -> None:
    pager = Pager(ana, records("hvhvvv"))
    pager.next_base = WRITTEN
    ana.override = pager
    status, _, body = await call(gw404, f"/Observation?patient={c.PAT_ANA}&_count=2")
    assert status == 200 and matches(body) == ["obs-rbc-02"]
    assert len(pages_read(ana)) == 1
    assert link(body, "next") is None, "a link under another base is not handed out: paging would leave the gateway"
