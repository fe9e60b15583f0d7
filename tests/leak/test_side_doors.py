"""Side doors (issue 14): every way in to hidden data must be the same door.

Scenario: a clinician (``c.DOCTOR``) holds Ana's general opt-in permit, which does not open
her HIV and opioid-use records. Each test goes through the real request path (HTTP to the
gateway, the fake FHIR server on a real socket, batches processed entry by entry by the
fake) and searches the RAW response bytes and headers for the hidden ids, codes and texts.

A test the gateway does not pass yet is ``xfail(strict=True)`` with the leak in its reason.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.core.breakglass import GATEWAY_CODE_SYSTEM
from gateway.web.middleware import JsonLogFormatter

from tests.conftest import GatewayUnderTest
from tests.fakes import BATCH_ENTRY_HEADER, FakeFhir
from tests.fixtures import clinical as c
from tests.unit._util import raw_http, split_http
from tests.hidden import hidden_in

MakeGateway = Callable[..., Awaitable[GatewayUnderTest]]
Override = Callable[[web.Request], Awaitable[web.StreamResponse | None]]
FHIR_JSON = "application/fhir+json"
FORM = "application/x-www-form-urlencoded"
BOM = b"\xef\xbb\xbf"
ANA_ID = c.PAT_ANA.split("/", 1)[1]
BEN_ID = c.PAT_BEN.split("/", 1)[1]

# ---------------------------------------------------------------- more of Ana's hidden records

VL_DISPLAY = "HIV 1 RNA [#/volume] (viral load) in Serum or Plasma by NAA with probe detection"
VIRAL_LOAD = c.observation(
    "obs-hiv-vl-20447-5d1", c.PAT_ANA, c.concept(c.LOINC, "20447-9", VL_DISPLAY),
    {"valueQuantity": {"value": 12000, "unit": "copies/mL", "system": "http://unitsofmeasure.org",
                       "code": "{copies}/mL"}},
    "2023-03-02T08:30:00Z",
)
VL_REF = f"Observation/{VIRAL_LOAD['id']}"
NOTE_TEXT = b"Forensic examination record: bruising, statement taken."
HIDDEN_BINARY = {
    "resourceType": "Binary", "id": "bin-v-9a0", "contentType": "text/plain",
    "securityContext": {"reference": f"DocumentReference/{c.VERY_RESTRICTED_DOCUMENT['id']}"},
    "data": base64.b64encode(NOTE_TEXT).decode(),
}
ORDINARY_BINARY = {
    "resourceType": "Binary", "id": "bin-cbc-ana-11c", "contentType": "text/plain",
    "securityContext": {"reference": f"Observation/{c.ANA_CBC['id']}"},
    "data": base64.b64encode(b"CBC printout, all values within range").decode(),
}
BUPNAL_MEDICATION = {
    "resourceType": "Medication", "id": "med-bupnal-film-3c9",
    "code": c.concept(c.RXNORM, "1010600", c.BUPRENORPHINE_DISPLAY),
    "form": c.concept(c.SNOMED, "385206009", "Sublingual film"),
}
# A kit as a pharmacy system writes it: a local product code, the drug as its ingredient.
BUPNAL_KIT = {
    "resourceType": "Medication", "id": "med-bupnal-kit-71a",
    "code": {"coding": [{"system": "urn:oid:2.16.840.1.113883.3.9999.1", "code": "KIT-0042"}], "text": "Induction kit 0042"},
    "ingredient": [{"itemCodeableConcept": c.concept(c.RXNORM, "1010600", c.BUPRENORPHINE_DISPLAY), "isActive": True}],
}
LISINOPRIL = {
    "resourceType": "Medication", "id": "med-lisinopril-10-2a4",
    "code": c.concept(c.RXNORM, "314076", "lisinopril 10 MG Oral Tablet"),
}


def med_request(rid: str, medication: str, contained: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    order: dict[str, Any] = {
        "resourceType": "MedicationRequest", "id": rid, "status": "active", "intent": "order",
        "medicationReference": {"reference": medication},
        "subject": {"reference": c.PAT_ANA}, "authoredOn": "2022-06-10",
        "requester": {"reference": c.DOCTOR},
        "dosageInstruction": [{"text": "One film under the tongue daily"}],
    }
    if contained:
        order["contained"] = contained
    return order


VL_SECRETS = (VIRAL_LOAD["id"], "20447-9", "HIV 1 RNA", "12000", "copies/mL")
BINARY_SECRETS = (HIDDEN_BINARY["data"], "Forensic", c.VERY_RESTRICTED_DOCUMENT["id"])
MED_SECRETS = ("1010600", "buprenorphine", "naloxone", "Sublingual", "med-bupnal", "medrx-bupnal", "KIT-0042")
ALL_SECRETS = (*c.SECRETS, *VL_SECRETS, *BINARY_SECRETS, *MED_SECRETS)


# ---------------------------------------------------------------- helpers


def fhir(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=FHIR_JSON, headers=headers)


def routes(table: dict[tuple[str, str], Callable[[web.Request], Any]]) -> Override:
    """Answer ``(method, decoded path below /fhir)``; a function may return JSON or a Response."""

    async def override(request: web.Request) -> web.StreamResponse | None:
        make = table.get((request.method, request.path.removeprefix("/fhir") or "/"))
        if make is None:
            return None
        result = make(request)
        if hasattr(result, "__await__"):
            result = await result
        if result is None or isinstance(result, web.StreamResponse):
            return result
        return fhir(result)

    return override


async def call(
    gw: GatewayUnderTest, method: str, path: str, actor: str | None = c.DOCTOR, body: Any = None,
    **headers: str,
) -> tuple[int, dict[str, str], bytes]:
    hdrs = dict(headers)
    if actor is not None:
        hdrs["X-Actor"] = actor
    data: bytes | None = None
    if body is not None:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        hdrs.setdefault("Content-Type", FHIR_JSON)
    async with gw.session.request(method, gw.url + path, headers=hdrs, data=data) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def raw(gw: GatewayUnderTest, request: bytes) -> tuple[int, dict[str, str], bytes]:
    return split_http(await raw_http(gw.running.proxy_port, request))


def leaks(body: bytes, headers: dict[str, str] | None = None, secrets: tuple[str, ...] = ALL_SECRETS) -> list[str]:
    """The secrets found in the raw body bytes or the response headers."""
    text = body.decode("utf-8", "replace") + "\n" + repr(sorted((headers or {}).items()))
    return hidden_in(text, secrets)


def batch(*entries: tuple[str, str] | tuple[str, str, dict[str, Any]], kind: str = "batch") -> dict[str, Any]:
    out = []
    for entry in entries:
        item: dict[str, Any] = {"request": {"method": entry[0], "url": entry[1]}}
        if len(entry) == 3:
            item["resource"] = entry[2]  # type: ignore[misc]
        out.append(item)
    return {"resourceType": "Bundle", "type": kind, "entry": out}


def sent_upstream(fake: FakeFhir) -> list[str]:
    """Every request line and body the upstream received, except the gateway's consent lookups."""
    return [
        f"{r.method} {r.path_qs} {r.body.decode('utf-8', 'replace')}" for r in fake.requests
        if not r.path_qs.startswith(("/fhir/Consent?", "/fhir/metadata"))
    ]


def entry_requests(fake: FakeFhir) -> list[str]:
    """The requests the fake made for single batch entries (method and path with query)."""
    return [f"{r.method} {r.path_qs}" for r in fake.requests if BATCH_ENTRY_HEADER in r.headers]


def slots(body: bytes) -> list[dict[str, Any]]:
    bundle = orjson.loads(body)
    assert bundle["resourceType"] == "Bundle" and bundle["type"].endswith("-response"), bundle
    return bundle["entry"]


def entries(body: bytes) -> list[dict[str, Any]]:
    return orjson.loads(body).get("entry") or []


def ids_in(body: bytes) -> set[str]:
    return {e["resource"]["id"] for e in entries(body) if "id" in e.get("resource", {})}


def is_outcome(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict[str, Any]:
    assert status == expected, body
    assert headers.get("Content-Type", headers.get("content-type", "")).startswith(FHIR_JSON), headers
    outcome = orjson.loads(body)
    assert outcome["resourceType"] == "OperationOutcome"
    return outcome


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    """Ana's and Ben's records; Ana has a general opt-in, Ben too (only ordinary data opens)."""
    c.seed_all(fake_fhir)
    fake_fhir.add(VIRAL_LOAD, HIDDEN_BINARY, ORDINARY_BINARY, c.opt_in(c.PAT_ANA), c.opt_in(c.PAT_BEN, "consent-ben-in"))
    return fake_fhir


async def test_fake_processes_batches_entry_by_entry(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    """The fixture itself: a batch slot holds what the entry alone answers; the check sees a leak."""
    status, _, body = await call(gateway, "POST", "/", actor=c.PAT_ANA, body=batch(
        ("GET", VL_REF), ("GET", "Observation/not-there-000")))
    assert status == 200, body
    first, second = slots(body)
    assert first["resource"]["id"] == VIRAL_LOAD["id"] and first["response"]["status"].startswith("200")
    assert second["response"]["status"].startswith("404")
    assert "20447-9" in leaks(body)
    assert entry_requests(world) == [f"GET /fhir/{VL_REF}", "GET /fhir/Observation/not-there-000"]


# ---------------------------------------------------------------- 1. refusals inside a batch


def _has_answer(request: web.Request) -> Any:
    """The FHIR server answers the reverse chain truthfully: Ana has an HIV viral load."""
    if any(k.startswith("_has") for k in request.query):
        return c.bundle([c.ANA], str(request.url.origin()) + "/fhir", self_url=str(request.url))
    return None


def _type_history(request: web.Request) -> Any:
    return c.history_bundle([VIRAL_LOAD, c.HIV_TEST], str(request.url.origin()) + "/fhir")


REFUSED_ENTRIES = {
    "has": "Patient?_has:Observation:subject:code=20447-9",
    "type-history": "Observation/_history",
    "has-percent-encoded": "Patient?%5Fhas:Observation:subject:code=20447-9",
    "has-encoded-colon": "Patient?_has%3AObservation%3Asubject%3Acode=20447-9",
    "type-history-encoded": "Observation/%5Fhistory",
    "system-history": "_history",
}


@pytest.mark.parametrize("kind", ["batch", "transaction"])
@pytest.mark.parametrize("name", list(REFUSED_ENTRIES))
async def test_refused_search_inside_a_batch_is_refused(
    world: FakeFhir, gateway: GatewayUnderTest, kind: str, name: str
) -> None:
    world.override = routes({("GET", "/Patient"): _has_answer, ("GET", "/Observation/_history"): _type_history,
                             ("GET", "/_history"): _type_history})
    url = REFUSED_ENTRIES[name]
    status, headers, body = await call(gateway, "POST", "/", body=batch(
        ("GET", f"Observation/{c.BEN_CBC['id']}"), ("GET", url), kind=kind))
    sent = entry_requests(world)
    assert not any("_has" in s or "_history" in s for s in sent), sent
    assert leaks(body, headers, (*VL_SECRETS, "pat-ana-5581", "Reyes", *c.SECRETS)) == []
    if kind == "batch":
        assert status == 200, body
        ben, refused = slots(body)
        assert ben["resource"]["id"] == c.BEN_CBC["id"]
        assert refused["response"]["status"].startswith("403")
        assert "resource" not in refused
    else:
        is_outcome(status, headers, body, 403)
        assert not any(r.method == "POST" for r in world.requests), "a refused transaction was sent"


@pytest.mark.parametrize("kind", ["batch", "transaction"])
async def test_absolute_url_entry_is_refused_like_a_relative_one(
    world: FakeFhir, gateway: GatewayUnderTest, kind: str
) -> None:
    world.override = routes({("GET", "/Patient"): _has_answer})
    for url in (f"{world.base_url}/Patient?_has:Observation:subject:code=20447-9",
                f"{gateway.url}/Patient?_has:Observation:subject:code=20447-9",
                "/fhir/Patient?_has:Observation:subject:code=20447-9",
                "https://elsewhere.example/r4/Patient?_has:Observation:subject:code=20447-9"):
        status, headers, body = await call(gateway, "POST", "/", body=batch(("GET", url), kind=kind))
        assert status in (200, 400, 403), body
        assert leaks(body, headers, ("pat-ana-5581", "Reyes")) == [], url
    assert not any("_has" in s for s in sent_upstream(world)), sent_upstream(world)


async def test_system_level_has_in_a_batch_entry_is_refused(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("GET", "/"): _has_answer, ("GET", "/Patient"): _has_answer})
    status, headers, body = await call(gateway, "POST", "/", body=batch(
        ("GET", "?_type=Patient&_has:Observation:subject:code=20447-9")))
    assert status in (200, 400, 403), body
    assert leaks(body, headers, ("pat-ana-5581", "Reyes")) == []
    assert not any("_has" in s for s in sent_upstream(world))


async def test_nested_batch_is_not_a_way_around_the_entry_checks(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("GET", "/Patient"): _has_answer})
    inner = batch(("GET", "Patient?_has:Observation:subject:code=20447-9"))
    for url in ("", "/", world.base_url, f"{gateway.url}/"):
        status, headers, body = await call(gateway, "POST", "/", body=batch(("POST", url, inner)))
        assert status in (200, 400, 403), body
        assert leaks(body, headers, ("pat-ana-5581", "Reyes")) == [], url
    assert not any("_has" in s.split(" ", 2)[1] for s in sent_upstream(world) if s.startswith("GET"))
    assert entry_requests(world) == [], "a nested batch was processed by the server"


@pytest.mark.parametrize("url", [
    "Observation?patient=Patient/pat-ana-5581&_summary=count",
    "Observation?patient=Patient/pat-ana-5581&_filter=code eq 20447-9",
    "Observation?subject.name=Reyes&code=20447-9",
    "Patient/pat-ana-5581/$graphql?query={ObservationList{code{text}}}",
])
async def test_other_unfilterable_entries_are_refused_in_their_slot(
    world: FakeFhir, gateway: GatewayUnderTest, url: str
) -> None:
    status, headers, body = await call(gateway, "POST", "/", body=batch(("GET", url)))
    assert status == 200, body
    [slot] = slots(body)
    assert slot["response"]["status"].startswith("403"), slot
    assert entry_requests(world) == []
    assert leaks(body, headers) == []


# ---------------------------------------------------------------- 2. projection inside a batch


def _projected(resource: dict[str, Any], elements: str | None) -> dict[str, Any]:
    """What a FHIR server answers for ``_elements``: the named elements only (codes gone)."""
    if not elements:
        return resource
    keep = {n.strip() for n in elements.split(",")} | {"resourceType", "id", "meta"}
    return {k: v for k, v in resource.items() if k in keep}


def _honour_elements(fake: FakeFhir) -> Override:
    """Any read of a stored resource honours ``_elements`` (query or form body) like a real server."""

    async def override(request: web.Request) -> web.StreamResponse | None:
        parts = [p for p in request.path.removeprefix("/fhir").split("/") if p]
        if request.method == "GET" and len(parts) == 2 and "/".join(parts) in fake.resources:
            elements = next((v for k, v in request.query.items() if k.split(":")[0] == "_elements"), None)
            return fhir(_projected(fake.resources["/".join(parts)], elements))
        return None

    return override


@pytest.mark.parametrize("query", [
    "_elements=id,subject,valueQuantity",
    "_elements:exclude=code,category",
    "_%65lements=id,subject,valueQuantity",
    "_summary=true&_elements=id,valueQuantity",
])
async def test_batch_entry_with_elements_is_decided_on_the_full_record(
    world: FakeFhir, gateway: GatewayUnderTest, query: str
) -> None:
    world.override = _honour_elements(world)
    status, headers, body = await call(gateway, "POST", "/", body=batch(
        ("GET", f"{VL_REF}?{query}"), ("GET", f"Observation/{c.ANA_CBC['id']}?{query}")))
    assert status == 200, body
    hidden, cbc = slots(body)
    assert hidden["response"]["status"].startswith("403") and "resource" not in hidden
    assert cbc["resource"]["id"] == c.ANA_CBC["id"]
    assert leaks(body, headers) == []
    assert not any("lements" in s or "_summary" in s for s in sent_upstream(world)), sent_upstream(world)


# ---------------------------------------------------------------- 3. projection in an operation body


def _everything(fake: FakeFhir) -> Callable[[web.Request], Awaitable[Any]]:
    async def answer(request: web.Request) -> Any:
        body = await request.read()
        params = dict(request.query)
        if FORM in request.headers.get("Content-Type", ""):
            params.update(parse_qsl(body.decode()))
        elif body:
            for p in orjson.loads(body).get("parameter", []):
                params[p["name"]] = next(v for k, v in p.items() if k.startswith("value"))
        records = [c.ANA, VIRAL_LOAD, c.HIV_CONDITION, c.OUD_CONDITION, c.BUPRENORPHINE, c.ANA_CBC]
        return c.bundle([_projected(r, params.get("_elements")) for r in records], fake.base_url)

    return answer


@pytest.mark.parametrize("how", ["form", "parameters", "parameters-valueCode"])
async def test_everything_with_elements_in_the_body_is_filtered(world: FakeFhir, gateway: GatewayUnderTest, how: str) -> None:
    world.override = routes({("POST", f"/Patient/{ANA_ID}/$everything"): _everything(world)})
    if how == "form":
        body: bytes = b"_elements=id,subject,valueQuantity"
        ctype = FORM
    else:
        key = "valueString" if how == "parameters" else "valueCode"
        body = orjson.dumps({"resourceType": "Parameters", "parameter": [
            {"name": "_elements", key: "id,subject,valueQuantity"}]})
        ctype = FHIR_JSON
    status, headers, raw_body = await call(gateway, "POST", f"/Patient/{ANA_ID}/$everything", body=body,
                                           **{"Content-Type": ctype})
    assert status == 200, raw_body
    assert leaks(raw_body, headers) == []
    kept = ids_in(raw_body)
    assert c.ANA_CBC["id"] in kept and VIRAL_LOAD["id"] not in kept
    cbc = next(e["resource"] for e in entries(raw_body) if e.get("resource", {}).get("id") == c.ANA_CBC["id"])
    assert "code" not in cbc, "the projection asked for is applied by the gateway"
    sent = [r for r in world.requests if "$everything" in r.path_qs]
    assert sent and all(b"_elements" not in r.body and "_elements" not in r.path_qs for r in sent)


async def test_search_post_form_with_elements_is_decided_on_the_full_record(
    world: FakeFhir, gateway: GatewayUnderTest
) -> None:
    async def search(request: web.Request) -> Any:
        form = dict(parse_qsl((await request.read()).decode()))
        return c.bundle([_projected(VIRAL_LOAD, form.get("_elements"))], world.base_url)

    world.override = routes({("POST", "/Observation/_search"): search})
    status, headers, body = await call(gateway, "POST", "/Observation/_search",
                                       body=f"_id={VIRAL_LOAD['id']}&_elements=id,subject,valueQuantity".encode(),
                                       **{"Content-Type": FORM})
    assert status == 200, body
    assert leaks(body, headers) == []
    assert all(b"_elements" not in r.body for r in world.requests)


# ---------------------------------------------------------------- 4. Binary, wherever it appears


BINARY_DOORS = {
    "read": ("GET", f"/Binary/{HIDDEN_BINARY['id']}"),
    "search-by-id": ("GET", f"/Binary?_id={HIDDEN_BINARY['id']}"),
    "bare-search": ("GET", "/Binary"),
    "history": ("GET", f"/Binary/{HIDDEN_BINARY['id']}/_history"),
    "vread": ("GET", f"/Binary/{HIDDEN_BINARY['id']}/_history/1"),
    "batch": ("POST", "/"),
    "head": ("HEAD", f"/Binary/{HIDDEN_BINARY['id']}"),
}


@pytest.mark.parametrize("door", list(BINARY_DOORS))
async def test_binary_of_a_hidden_document_is_hidden_everywhere(world: FakeFhir, gateway: GatewayUnderTest, door: str) -> None:
    world.override = routes({
        ("GET", f"/Binary/{HIDDEN_BINARY['id']}/_history/1"): lambda r: HIDDEN_BINARY,
        ("HEAD", f"/Binary/{HIDDEN_BINARY['id']}"): lambda r: web.Response(status=200, headers={"ETag": 'W/"1"'}),
    })
    method, path = BINARY_DOORS[door]
    body_sent = batch(("GET", f"Binary/{HIDDEN_BINARY['id']}"), ("GET", f"Binary/{ORDINARY_BINARY['id']}")) \
        if door == "batch" else None
    status, headers, body = await call(gateway, method, path, body=body_sent)
    assert leaks(body, headers) == []
    if door in ("read", "history", "vread", "head"):
        assert status == 403, body
        assert "ETag" not in headers
    elif door == "batch":
        hidden, ordinary = slots(body)
        assert hidden["response"]["status"].startswith("403") and "resource" not in hidden
        assert ordinary["resource"]["id"] == ORDINARY_BINARY["id"]
    else:
        assert status == 200, body
        assert HIDDEN_BINARY["id"] not in ids_in(body)
        if door == "bare-search":
            assert ORDINARY_BINARY["id"] in ids_in(body), "the permitted Binary must still show"


async def test_included_binary_of_a_hidden_document_is_removed(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("GET", "/DocumentReference"): lambda r: c.bundle(
        [c.ANA_CBC], world.base_url, include=(HIDDEN_BINARY, ORDINARY_BINARY))})
    status, headers, body = await call(gateway, "GET", f"/DocumentReference?patient={c.PAT_ANA}&_include=*")
    assert status == 200, body
    assert leaks(body, headers) == []
    assert ORDINARY_BINARY["id"] in ids_in(body)


async def test_binary_answered_as_raw_bytes_is_not_passed(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    """A server that ignores Accept and sends the Binary's own bytes: nothing to decide on."""
    world.override = routes({("GET", f"/Binary/{HIDDEN_BINARY['id']}"):
                             lambda r: web.Response(body=NOTE_TEXT, content_type="text/plain")})
    status, headers, body = await call(gateway, "GET", f"/Binary/{HIDDEN_BINARY['id']}", Accept="text/plain")
    assert status in (403, 406, 502), body
    assert leaks(body, headers) == []


async def test_binary_whose_context_cannot_be_read_is_withheld(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("GET", f"/DocumentReference/{c.VERY_RESTRICTED_DOCUMENT['id']}"):
                             lambda r: fhir({"resourceType": "OperationOutcome", "issue": []}, 500)})
    status, headers, body = await call(gateway, "GET", f"/Binary/{HIDDEN_BINARY['id']}")
    assert status in (403, 503), body
    assert leaks(body, headers) == []


@pytest.mark.parametrize("status", [404, 410])
async def test_binary_whose_context_is_gone_is_withheld(world: FakeFhir, gateway: GatewayUnderTest, status: int) -> None:
    """The document the Binary belongs to was deleted (its Binary kept, as servers do): the
    context is unknown, so the note is not released as no one's data."""
    world.override = routes({("GET", f"/DocumentReference/{c.VERY_RESTRICTED_DOCUMENT['id']}"):
                             lambda r: fhir({"resourceType": "OperationOutcome", "issue": []}, status)})
    for path in (f"/Binary/{HIDDEN_BINARY['id']}", f"/Binary?_id={HIDDEN_BINARY['id']}"):
        code, headers, body = await call(gateway, "GET", path)
        assert code in (200, 403), body
        assert leaks(body, headers) == []


# ---------------------------------------------------------------- 5. medicationReference


@pytest.mark.parametrize("where", ["in-the-answer", "contained", "on-the-server", "ingredient-on-the-server"])
async def test_order_naming_buprenorphine_by_reference_is_hidden(world: FakeFhir, gateway: GatewayUnderTest, where: str) -> None:
    world.add(BUPNAL_MEDICATION, BUPNAL_KIT, LISINOPRIL)
    ordinary = med_request("medrx-lisinopril-8f0", f"Medication/{LISINOPRIL['id']}")
    if where == "contained":
        inline = {**BUPNAL_MEDICATION, "id": "m1"}
        order = med_request("medrx-bupnal-contained-5b1", "#m1", contained=[inline])
    elif where == "ingredient-on-the-server":
        order = med_request("medrx-bupnal-kit-90d", f"Medication/{BUPNAL_KIT['id']}")
    else:
        order = med_request("medrx-bupnal-ref-8b2", f"Medication/{BUPNAL_MEDICATION['id']}")
    world.add(order, ordinary)
    secrets = ("1010600", "buprenorphine", "naloxone", order["id"], BUPNAL_MEDICATION["id"], BUPNAL_KIT["id"])
    # The read alone.
    status, headers, body = await call(gateway, "GET", f"/MedicationRequest/{order['id']}")
    assert status == 403, body
    assert leaks(body, headers, secrets) == []
    # A search of Ana's orders: the order goes, the ordinary one stays.
    if where == "in-the-answer":
        world.override = routes({("GET", "/MedicationRequest"): lambda r: c.bundle(
            [order, ordinary], world.base_url, include=(BUPNAL_MEDICATION, LISINOPRIL))})
        path = f"/MedicationRequest?patient={c.PAT_ANA}&_include=MedicationRequest:medication"
        secrets = (order["id"],)  # the Medication itself is not patient data (see the next test)
    else:
        world.resources = {k: v for k, v in world.resources.items()
                           if not (k.startswith("MedicationRequest/") and v["id"] not in (order["id"], ordinary["id"]))}
        path = f"/MedicationRequest?patient={c.PAT_ANA}"
    status, headers, body = await call(gateway, "GET", path)
    assert status == 200, body
    assert ordinary["id"] in ids_in(body)
    assert leaks(body, headers, secrets) == []


async def test_included_medication_of_a_withheld_order_does_not_name_the_drug(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    order = med_request("medrx-bupnal-ref-8b2", f"Medication/{BUPNAL_MEDICATION['id']}")
    world.add(BUPNAL_MEDICATION, order)
    world.override = routes({("GET", "/MedicationRequest"): lambda r: c.bundle(
        [order], world.base_url, include=(BUPNAL_MEDICATION,))})
    status, headers, body = await call(gateway, "GET", f"/MedicationRequest?patient={c.PAT_ANA}&_include=MedicationRequest:medication")
    assert status == 200, body
    assert leaks(body, headers, ("1010600", "buprenorphine", BUPNAL_MEDICATION["id"])) == []


async def test_order_naming_an_ordinary_medication_is_released(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    """Control: the reference check must not close ordinary orders."""
    world.add(LISINOPRIL, med_request("medrx-lisinopril-8f0", f"Medication/{LISINOPRIL['id']}"))
    status, _, body = await call(gateway, "GET", "/MedicationRequest/medrx-lisinopril-8f0")
    assert status == 200, body


async def test_order_whose_medication_cannot_be_read_is_withheld(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    order = med_request("medrx-bupnal-ref-8b2", "Medication/med-unreadable-000")
    world.add(order)
    world.override = routes({("GET", "/Medication/med-unreadable-000"): lambda r: fhir(
        {"resourceType": "OperationOutcome", "issue": []}, 500)})
    status, headers, body = await call(gateway, "GET", f"/MedicationRequest/{order['id']}")
    assert status in (403, 503), body


# ---------------------------------------------------------------- 6. Reference.display


REPORT = {
    "resourceType": "DiagnosticReport", "id": "dr-lab-panel-ana-4e2", "status": "final",
    "code": c.concept(c.LOINC, "58410-2", "CBC panel - Blood by Automated count"),
    "subject": {"reference": c.PAT_ANA}, "effectiveDateTime": "2023-03-02T08:30:00Z",
    "result": [
        {"reference": f"Observation/{c.ANA_CBC['id']}", "display": "CBC panel, within normal limits"},
        {"reference": VL_REF, "display": "HIV-1 viral load 12000 copies/mL"},
    ],
    "conclusion": "See results.",
}
DISPLAY_SECRETS = ("HIV-1 viral load", "12000", "copies/mL", "viral load")


async def test_report_result_display_naming_a_withheld_result_is_removed(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.add(REPORT)
    status, headers, body = await call(gateway, "GET", f"/DiagnosticReport/{REPORT['id']}")
    assert status == 200, body
    assert leaks(body, headers, DISPLAY_SECRETS) == []
    # With the results included, the released one keeps its display, the withheld one loses it.
    world.override = routes({("GET", "/DiagnosticReport"): lambda r: c.bundle(
        [REPORT], world.base_url, include=(c.ANA_CBC, VIRAL_LOAD))})
    status, headers, body = await call(gateway, "GET", f"/DiagnosticReport?patient={c.PAT_ANA}&_include=DiagnosticReport:result")
    assert status == 200, body
    assert leaks(body, headers, (*DISPLAY_SECRETS, "20447-9")) == []
    report = next(e["resource"] for e in entries(body) if e.get("resource", {}).get("id") == REPORT["id"])
    assert report["result"][0]["display"] == "CBC panel, within normal limits"


PROVENANCE = {
    "resourceType": "Provenance", "id": "prov-lab-import-7a1",
    "target": [{"reference": VL_REF, "display": "HIV-1 viral load 12000 copies/mL"}],
    "patient": {"reference": c.PAT_ANA},
    "recorded": "2023-03-02T09:00:00Z",
    "agent": [{"who": {"reference": c.DOCTOR, "display": "Dr. Gomez"}}],
}


async def test_revincluded_provenance_does_not_describe_a_withheld_record(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("GET", "/Observation"): lambda r: c.bundle(
        [c.ANA_CBC, VIRAL_LOAD], world.base_url, include=(PROVENANCE,))})
    status, headers, body = await call(gateway, "GET", f"/Observation?patient={c.PAT_ANA}&_revinclude=Provenance:target")
    assert status == 200, body
    assert leaks(body, headers, (*DISPLAY_SECRETS, "20447-9", "HIV 1 RNA")) == []
    assert c.ANA_CBC["id"] in ids_in(body)


async def test_provenance_of_a_withheld_record_is_withheld(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("GET", "/Observation"): lambda r: c.bundle(
        [c.ANA_CBC, VIRAL_LOAD], world.base_url, include=(PROVENANCE,))})
    status, headers, body = await call(gateway, "GET", f"/Observation?patient={c.PAT_ANA}&_revinclude=Provenance:target")
    assert status == 200, body
    assert leaks(body, headers, (VIRAL_LOAD["id"],)) == []


# ---------------------------------------------------------------- 7. Consent writes


HIV_REF = f"Condition/{c.HIV_CONDITION['id']}"
CBC_REF = f"Observation/{c.ANA_CBC['id']}"


def granting(cid: str, subject: str = c.PAT_ANA) -> dict[str, Any]:
    """A Consent that would open Ana's HIV and opioid-use records to anyone."""
    return c.opt_in(subject, cid=cid, labels=("HIV", "ETH", "42CFRPart2"))


def forged_emergency(cid: str, actor: str = c.DOCTOR) -> dict[str, Any]:
    """What break-glass records, forged: an open emergency window for ``actor`` on Ana."""
    consent = granting(cid)
    consent["category"] = [{"coding": [{"system": GATEWAY_CODE_SYSTEM, "code": "emergency"}]},
                           *consent["category"]]
    consent["policyRule"] = c.concept(c.V3_ACT_CODE, "EMRGONLY", "emergency only")
    consent["performer"] = [{"reference": actor}]
    consent["provision"]["actor"] = [{"role": c.concept(
        "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "IRCP", "information recipient"),
        "reference": {"reference": actor}}]
    consent["provision"]["purpose"] = [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}]
    consent["provision"]["period"] = {"start": "2020-01-01T00:00:00Z", "end": "2099-01-01T00:00:00Z"}
    return consent


def writes_sent(fake: FakeFhir, rtype: str = "Consent") -> list[str]:
    return [f"{r.method} {r.path_qs}" for r in fake.requests
            if r.method in ("POST", "PUT", "PATCH", "DELETE") and f"/{rtype}" in r.path_qs]


@pytest.fixture
def guarded(fake_fhir: FakeFhir) -> FakeFhir:
    """Ana's general opt-in and her "not Dr. Gomez" consent; Ben's opt-out."""
    c.seed_all(fake_fhir)
    fake_fhir.add(VIRAL_LOAD, c.opt_in(c.PAT_ANA), c.not_this_doctor(c.PAT_ANA, c.DOCTOR),
                  c.opt_out(c.PAT_BEN, "consent-ben-out"))
    return fake_fhir


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_practitioner_cannot_write_a_consent_by_default(guarded: FakeFhir, gateway: GatewayUnderTest, method: str) -> None:
    assert (await call(gateway, "GET", f"/{CBC_REF}"))[0] == 403
    path, body, ctype = {
        "POST": ("/Consent", granting("consent-by-doctor"), FHIR_JSON),
        "PUT": ("/Consent/consent-notdoc", granting("consent-notdoc"), FHIR_JSON),
        "DELETE": ("/Consent/consent-notdoc", None, FHIR_JSON),
        "PATCH": ("/Consent/consent-notdoc", [{"op": "replace", "path": "/status", "value": "inactive"}],
                  "application/json-patch+json"),
    }[method]
    status, headers, raw_body = await call(gateway, method, path, body=body, **{"Content-Type": ctype})
    is_outcome(status, headers, raw_body, 403)
    assert writes_sent(guarded) == []
    assert "Consent/consent-notdoc" in guarded.resources
    assert (await call(gateway, "GET", f"/{CBC_REF}"))[0] == 403
    assert (await call(gateway, "GET", f"/{HIV_REF}"))[0] == 403


@pytest.mark.parametrize("how", ["direct", "batch", "transaction", "absolute-url-batch", "conditional"])
async def test_requester_without_writer_role_cannot_delete_a_consent(
    guarded: FakeFhir, make_gateway: MakeGateway, how: str
) -> None:
    gw = await make_gateway(guarded.base_url, consent={"writer_roles": ["HIM"]})
    assert (await call(gw, "GET", f"/{CBC_REF}"))[0] == 403
    role = {"X-Actor-Role": "PRCP"}
    if how == "direct":
        status, _, body = await call(gw, "DELETE", "/Consent/consent-notdoc", **role)
        assert status == 403, body
    elif how == "conditional":
        status, _, body = await call(gw, "DELETE", f"/Consent?patient={c.PAT_ANA}", **role)
        assert status == 403, body
    else:
        url = f"{guarded.base_url}/Consent/consent-notdoc" if how.startswith("absolute") else "Consent/consent-notdoc"
        kind = "transaction" if how == "transaction" else "batch"
        status, _, body = await call(gw, "POST", "/", body=batch(("DELETE", url), kind=kind), **role)
        if kind == "batch":
            assert status == 200, body
            assert slots(body)[0]["response"]["status"].startswith("403")
        else:
            assert status == 403, body
    assert writes_sent(guarded) == [] and entry_requests(guarded) == []
    assert "Consent/consent-notdoc" in guarded.resources
    assert (await call(gw, "GET", f"/{CBC_REF}"))[0] == 403


async def test_writer_role_may_delete_a_consent(guarded: FakeFhir, make_gateway: MakeGateway) -> None:
    """Control: the listed role gets through, and the deletion takes effect."""
    gw = await make_gateway(guarded.base_url, consent={"writer_roles": ["HIM"]})
    assert (await call(gw, "GET", f"/{CBC_REF}"))[0] == 403
    status, _, body = await call(gw, "POST", "/", body=batch(("DELETE", "Consent/consent-notdoc")), **{"X-Actor-Role": "HIM"})
    assert status == 200 and slots(body)[0]["response"]["status"].startswith("200"), body
    assert "Consent/consent-notdoc" not in guarded.resources
    assert (await call(gw, "GET", f"/{CBC_REF}"))[0] == 200


@pytest.mark.parametrize("how", ["put", "batch-put", "patch-revoke"])
async def test_patient_cannot_write_over_another_patients_consent(guarded: FakeFhir, gateway: GatewayUnderTest, how: str) -> None:
    mine = {**c.opt_in(c.PAT_ANA, cid="consent-ben-out")}
    if how == "put":
        status, _, body = await call(gateway, "PUT", "/Consent/consent-ben-out", actor=c.PAT_ANA, body=mine)
        assert status == 403, body
    elif how == "batch-put":
        status, _, body = await call(gateway, "POST", "/", actor=c.PAT_ANA, body=batch(("PUT", "Consent/consent-ben-out", mine)))
        assert status in (200, 403), body
        if status == 200:
            assert slots(body)[0]["response"]["status"].startswith("403")
    else:
        status, _, body = await call(gateway, "PATCH", "/Consent/consent-ben-out", actor=c.PAT_ANA,
                                     body=[{"op": "replace", "path": "/status", "value": "inactive"}],
                                     **{"Content-Type": "application/json-patch+json"})
        assert status == 403, body
    assert writes_sent(guarded) == [] and entry_requests(guarded) == []
    assert guarded.resources["Consent/consent-ben-out"]["patient"]["reference"] == c.PAT_BEN
    assert guarded.resources["Consent/consent-ben-out"]["status"] == "active"


@pytest.mark.parametrize("actor", [c.DOCTOR, c.PAT_ANA])
@pytest.mark.parametrize("bom", [True, False], ids=["bom", "plain"])
async def test_forged_emergency_consent_is_refused(world: FakeFhir, gateway: GatewayUnderTest, actor: str, bom: bool) -> None:
    assert (await call(gateway, "GET", f"/{HIV_REF}"))[0] == 403
    body = (BOM if bom else b"") + orjson.dumps(forged_emergency("consent-forged-em"))
    status, headers, raw_body = await call(gateway, "PUT", "/Consent/consent-forged-em", actor=actor, body=body)
    is_outcome(status, headers, raw_body, 403)
    assert "Consent/consent-forged-em" not in world.resources and writes_sent(world) == []
    status, headers, raw_body = await call(gateway, "GET", f"/{HIV_REF}")
    assert status == 403
    assert leaks(raw_body, headers) == []


async def test_forged_emergency_consent_in_a_transaction_is_refused(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    body = BOM + orjson.dumps(batch(("POST", "Consent", forged_emergency("consent-forged-em")), kind="transaction"))
    status, headers, raw_body = await call(gateway, "POST", "/", body=body)
    is_outcome(status, headers, raw_body, 403)
    assert entry_requests(world) == [] and not any(k.startswith("Consent/") and "forged" in k for k in world.resources)
    assert (await call(gateway, "GET", f"/{HIV_REF}"))[0] == 403


async def test_bom_consent_is_checked_like_any_other(world: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(world.base_url, consent={"writer_roles": ["HIM"]})
    body = BOM + orjson.dumps(granting("consent-bom"))
    status, _, raw_body = await call(gw, "PUT", "/Consent/consent-bom", body=body, **{"X-Actor-Role": "PRCP"})
    assert status == 403, raw_body
    assert "Consent/consent-bom" not in world.resources
    # The patient's own BOM-prefixed Consent is read and passed on without its BOM.
    status, _, raw_body = await call(gw, "PUT", "/Consent/consent-bom", actor=c.PAT_ANA, body=body)
    assert status in (200, 201), raw_body
    put = [r for r in world.requests if r.method == "PUT"][-1]
    assert not put.body.startswith(BOM)


@pytest.mark.parametrize("body", [
    b'{"resourceType":"Consent",',
    b"\xff\xfe{\x00}\x00",
    b"not json at all",
    b'["Consent"]',
    b'{"resourceType":"Consent","patient":{"reference":"Patient/pat-ben-7702"},"patient":{"reference":"Patient/pat-ana-5581"},"status":"active"}',
    b'{"resourceType":"Consent","status":"active","status":"active"}',
], ids=["truncated", "utf16", "text", "array", "duplicate-patient", "duplicate-status"])
async def test_unparsable_consent_body_is_a_400(world: FakeFhir, gateway: GatewayUnderTest, body: bytes) -> None:
    status, headers, raw_body = await call(gateway, "PUT", "/Consent/consent-x", actor=c.PAT_ANA, body=body)
    assert status == 400, raw_body
    is_outcome(status, headers, raw_body, 400)
    assert writes_sent(world) == []


async def test_unparsable_consent_in_a_batch_entry_is_refused(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    bad = {"resourceType": "Consent", "id": "consent-x", "patient": "Patient/pat-ana-5581"}
    status, _, body = await call(gateway, "POST", "/", actor=c.DOCTOR, body=batch(("PUT", "Consent/consent-x", bad)))
    assert status in (200, 400, 403), body
    if status == 200:
        assert not slots(body)[0]["response"]["status"].startswith("2")
    assert "Consent/consent-x" not in world.resources


@pytest.mark.parametrize("ctype", ["application/json-patch+json", FHIR_JSON])
async def test_consent_patch_in_a_batch_is_refused(guarded: FakeFhir, gateway: GatewayUnderTest, ctype: str) -> None:
    patch = [{"op": "remove", "path": "/provision/provision"}]
    resource = {"resourceType": "Binary", "contentType": "application/json-patch+json",
                "data": base64.b64encode(orjson.dumps(patch)).decode()} if ctype != FHIR_JSON else {
        "resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
            {"name": "type", "valueCode": "delete"}, {"name": "path", "valueString": "Consent.provision.provision"}]}]}
    status, _, body = await call(gateway, "POST", "/", body=batch(("PATCH", "Consent/consent-notdoc", resource)))
    assert status in (200, 403), body
    if status == 200:
        assert slots(body)[0]["response"]["status"].startswith("403")
    assert entry_requests(guarded) == []


async def test_conditional_consent_delete_by_a_practitioner_is_refused(fake_fhir: FakeFhir, make_gateway: MakeGateway) -> None:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_BEN, "consent-ben-in"), c.not_this_doctor(c.PAT_BEN, c.BANNED_DOCTOR, "consent-ben-notdoc"))
    gw = await make_gateway(fake_fhir.base_url, sensitivity={"explicit_consent_required": "none"})
    assert (await call(gw, "GET", f"/Observation/{c.BEN_CBC['id']}"))[0] == 200
    status, _, body = await call(gw, "DELETE", f"/Consent?patient={c.PAT_BEN}")
    assert status == 403, body
    assert writes_sent(fake_fhir) == []


async def test_conditional_consent_patch_by_a_practitioner_is_refused(fake_fhir: FakeFhir, make_gateway: MakeGateway) -> None:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_BEN, "consent-ben-in"))
    gw = await make_gateway(fake_fhir.base_url, sensitivity={"explicit_consent_required": "none"})
    status, _, body = await call(gw, "PATCH", f"/Consent?patient={c.PAT_BEN}",
                                 body=[{"op": "replace", "path": "/status", "value": "inactive"}],
                                 **{"Content-Type": "application/json-patch+json"})
    assert status == 403, body
    assert writes_sent(fake_fhir) == []


async def test_conditional_consent_update_in_a_transaction_is_refused(guarded: FakeFhir, gateway: GatewayUnderTest) -> None:
    status, _, body = await call(gateway, "POST", "/", body=batch(
        ("PUT", f"Consent?patient={c.PAT_ANA}", granting("consent-cond")), kind="transaction"))
    assert status in (400, 403), body
    assert entry_requests(guarded) == [] and writes_sent(guarded) == []


async def test_consent_write_by_another_spelling_of_the_path_is_refused(guarded: FakeFhir, gateway: GatewayUnderTest) -> None:
    """The Consent type written with a trailing slash, under the base path, percent-encoded."""
    for path in ("/Consent/", "/fhir/Consent", "/%43onsent", "/fhir//Consent", "/Consent/consent-notdoc/"):
        method = "PUT" if "notdoc" in path else "POST"
        status, _, body = await call(gateway, method, path, body=granting("consent-notdoc"))
        assert status in (400, 403, 404), (path, body)
    assert writes_sent(guarded) == [], writes_sent(guarded)
    assert guarded.resources["Consent/consent-notdoc"]["provision"]["provision"][0]["type"] == "deny"


# ---------------------------------------------------------------- 8. identity headers


@pytest.mark.parametrize("lines", [
    ["X-Actor: Patient/pat-ana-5581", "X-Actor: Practitioner/dr-gomez"],
    ["X-Actor: Patient/pat-ana-5581", "x-actor: Practitioner/dr-gomez"],
    ["X-Actor: Patient/pat-ana-5581, Practitioner/dr-gomez"],
    ["X-Actor: Practitioner/dr-gomez", "X-Actor-Role: PRCP", "X-Actor-Role: HIM"],
    ["X-Actor: Practitioner/dr-gomez", "X-Actor-Organization: Organization/a,Organization/b"],
    ["X-Actor: Practitioner/dr-gomez", "X-Purpose-Of-Use: TREAT", "X-Purpose-Of-Use: ETREAT"],
    ["X-Actor: Practitioner/dr-gomez", "X-Break-Glass: Medical emergency", "X-Break-Glass: Medical emergency"],
], ids=["twice", "twice-other-case", "comma", "role-twice", "org-comma", "purpose-twice", "break-glass-twice"])
async def test_identity_header_given_twice_is_a_400(world: FakeFhir, gateway: GatewayUnderTest, lines: list[str]) -> None:
    request = (f"GET /{HIV_REF} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{l}\r\n" for l in lines)
               + "Connection: close\r\n\r\n").encode()
    status, headers, body = await raw(gateway, request)
    is_outcome(status, headers, body, 400)
    assert leaks(body, headers) == []
    assert sent_upstream(world) == []


# ---------------------------------------------------------------- 9. 404 mode: hidden = missing


def alike(a: tuple[int, dict[str, str], bytes], b: tuple[int, dict[str, str], bytes]) -> None:
    """Two answers a client cannot tell apart: status, body, Content-Type, header names."""
    (sa, ha, ba), (sb, hb, bb) = a, b
    assert sa == sb
    assert ba == bb
    lower_a = {k.lower(): v for k, v in ha.items()}
    lower_b = {k.lower(): v for k, v in hb.items()}
    assert lower_a.get("content-type") == lower_b.get("content-type")
    assert sorted(lower_a) == sorted(lower_b)
    assert lower_a.get("x-consent-decision") == lower_b.get("x-consent-decision")


def hapi_404(table: dict[tuple[str, str], Callable[[web.Request], Any]] | None = None) -> Override:
    """Missing records answered as HAPI FHIR does: its own Content-Type, headers and text."""
    inner = routes(table or {})

    async def override(request: web.Request) -> web.StreamResponse | None:
        if "nothing-here" in request.path and "$everything" not in request.path:
            rtype, rid = request.path.removeprefix("/fhir/").split("/")[:2]
            body = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing",
                    "diagnostics": f"HAPI-2001: Resource {rtype}/{rid} is not known"}]}
            return web.Response(status=404, body=orjson.dumps(body), headers={
                "Content-Type": "application/fhir+json;charset=UTF-8", "X-Powered-By": "HAPI FHIR 6.10.0 REST Server",
                "Vary": "Accept"})
        return await inner(request)

    return override


@pytest.fixture
async def gw404(world: FakeFhir, make_gateway: MakeGateway) -> GatewayUnderTest:
    world.add(c.opt_out(c.PAT_BEN, "consent-ben-in"))  # Ben opts out (replaces his opt-in)
    world.override = hapi_404()
    return await make_gateway(world.base_url, enforcement={"denied_read_status": 404})


async def test_404_mode_denied_read_equals_missing_record(world: FakeFhir, gw404: GatewayUnderTest) -> None:
    hidden = await call(gw404, "GET", f"/{HIV_REF}")
    missing = await call(gw404, "GET", "/Condition/cond-nothing-here-000")
    assert hidden[0] == 404
    alike(hidden, missing)
    assert leaks(hidden[2], hidden[1]) == []


async def test_404_mode_batch_slot_equals_missing_records_slot(world: FakeFhir, gw404: GatewayUnderTest) -> None:
    status, _, body = await call(gw404, "POST", "/", body=batch(
        ("GET", HIV_REF), ("GET", "Condition/cond-nothing-here-000"),
        ("GET", f"Binary/{HIDDEN_BINARY['id']}"), ("GET", "Binary/bin-nothing-here-000"),
        ("GET", f"{HIV_REF}/$meta"), ("GET", "Condition/cond-nothing-here-000/$meta")))
    assert status == 200, body
    got = slots(body)
    assert got[0] == got[1]
    assert got[2] == got[3]
    assert got[4] == got[5]
    assert got[0]["response"]["status"].startswith("404")
    assert leaks(body) == []


@pytest.mark.parametrize("hidden,missing", [
    (f"/{HIV_REF}/$meta", "/Condition/cond-nothing-here-000/$meta"),
    (f"/Binary/{HIDDEN_BINARY['id']}", "/Binary/bin-nothing-here-000"),
    (f"/Binary/{HIDDEN_BINARY['id']}/_history", "/Binary/bin-nothing-here-000/_history"),
    (f"/Binary/{HIDDEN_BINARY['id']}/$meta", "/Binary/bin-nothing-here-000/$meta"),
    (f"/{HIV_REF}/_history", "/Condition/cond-nothing-here-000/_history"),
    (f"/Patient/{BEN_ID}/$everything", "/Patient/pat-nothing-here-000/$everything"),
    (f"/Patient/{BEN_ID}", "/Patient/pat-nothing-here-000"),
], ids=["meta", "binary", "binary-history", "binary-meta", "history", "everything-opted-out", "patient-opted-out"])
async def test_404_mode_hidden_equals_missing(world: FakeFhir, gw404: GatewayUnderTest, hidden: str, missing: str) -> None:
    async def everything(request: web.Request) -> Any:
        pid = request.path.split("/")[-2]
        if f"Patient/{pid}" not in world.resources:
            body = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing",
                    "diagnostics": f"HAPI-2001: Resource Patient/{pid} is not known"}]}
            return web.Response(status=404, body=orjson.dumps(body), headers={
                "Content-Type": "application/fhir+json;charset=UTF-8", "X-Powered-By": "HAPI FHIR 6.10.0 REST Server"})
        return c.bundle([r for r in world.resources.values() if r.get("resourceType") != "Consent"
                         and (r.get("id") == pid or (r.get("subject") or {}).get("reference") == f"Patient/{pid}")],
                        world.base_url)

    world.override = hapi_404({("GET", f"/Patient/{BEN_ID}/$everything"): everything,
                               ("GET", "/Patient/pat-nothing-here-000/$everything"): everything})
    a = await call(gw404, "GET", hidden)
    b = await call(gw404, "GET", missing)
    assert a[0] == 404, a[2]
    alike(a, b)
    assert leaks(a[2], a[1], (*ALL_SECRETS, "Okafor", c.BEN_CBC["id"])) == []


def _condition(rid: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": rid, "subject": {"reference": c.PAT_ANA},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I10"}]}}


@pytest.mark.parametrize("how", ["direct", "batch"])
async def test_404_mode_update_of_hidden_equals_update_of_missing(
    world: FakeFhir, gw404: GatewayUnderTest, how: str,
) -> None:
    """A server that creates on update (a client-chosen id) would answer 201 for an id that
    holds nothing and the gateway 404 for one that holds a hidden record: in 404 mode neither
    update is sent."""
    hidden_id, missing_id = HIV_REF.split("/")[1], "cond-nothing-here-000"
    if how == "direct":
        # A server that deletes nothing with 200 would tell these apart too.
        world.override = routes({("DELETE", f"/Condition/{missing_id}"): lambda r: {
            "resourceType": "OperationOutcome", "issue": [{"severity": "information", "code": "informational"}]}})
        alike(await call(gw404, "DELETE", f"/{HIV_REF}"), await call(gw404, "DELETE", f"/Condition/{missing_id}"))
        a = await call(gw404, "PUT", f"/{HIV_REF}", body=_condition(hidden_id))
        b = await call(gw404, "PUT", f"/Condition/{missing_id}", body=_condition(missing_id))
        assert a[0] == 404, a[2]
        alike(a, b)
    else:
        status, _, body = await call(gw404, "POST", "/", body=batch(
            ("PUT", HIV_REF, _condition(hidden_id)), ("PUT", f"Condition/{missing_id}", _condition(missing_id))))
        assert status == 200, body
        hidden_slot, missing_slot = slots(body)
        assert hidden_slot == missing_slot and hidden_slot["response"]["status"].startswith("404")
    assert writes_sent(world, "Condition") == []
    assert f"Condition/{missing_id}" not in world.resources


async def test_403_mode_update_of_a_missing_record_creates_it(world: FakeFhir, make_gateway: MakeGateway) -> None:
    """Control: outside 404 mode an update of an id that holds nothing goes to the server."""
    gateway = await make_gateway(world.base_url)
    status, _, body = await call(gateway, "PUT", "/Condition/cond-new-4f1", body=_condition("cond-new-4f1"))
    assert status in (200, 201), body
    assert writes_sent(world, "Condition") == ["PUT /fhir/Condition/cond-new-4f1"]


async def test_404_mode_head_of_hidden_equals_missing(world: FakeFhir, gw404: GatewayUnderTest) -> None:
    alike(await call(gw404, "HEAD", f"/{HIV_REF}"), await call(gw404, "HEAD", "/Condition/cond-nothing-here-000"))


# ---------------------------------------------------------------- 10. self access counts


JOINT = {
    "resourceType": "Appointment", "id": "appt-joint-ana-ben-6d0", "status": "booked",
    "description": "Couples counselling", "start": "2024-05-02T15:00:00Z", "end": "2024-05-02T16:00:00Z",
    "participant": [{"actor": {"reference": c.PAT_ANA}, "status": "accepted"},
                    {"actor": {"reference": c.PAT_BEN}, "status": "accepted"}],
}
SOLO = {
    "resourceType": "Appointment", "id": "appt-ana-solo-2b7", "status": "booked",
    "start": "2024-06-10T09:00:00Z", "end": "2024-06-10T09:20:00Z",
    "participant": [{"actor": {"reference": c.PAT_ANA}, "status": "accepted"},
                    {"actor": {"reference": c.DOCTOR}, "status": "accepted"}],
}


def _page(fake: FakeFhir, records: list[dict[str, Any]], request: web.Request) -> dict[str, Any]:
    """One page of ``_count`` records; total counts every match, a next link when more."""
    count = int(request.query.get("_count", len(records)))
    page = c.bundle(records[:count], fake.base_url, self_url=str(request.url))
    page["total"] = len(records)
    if count < len(records):
        page["link"].append({"relation": "next", "url": f"{fake.base_url}/?_getpages=abc&_getpagesoffset={count}"})
    return page


@pytest.mark.parametrize("path", [
    f"/Patient/{ANA_ID}/$everything?_count=1",
    f"/Appointment?actor={c.PAT_ANA}",
    f"/Appointment?patient={c.PAT_ANA}",
    f"/Appointment?actor={c.PAT_ANA}&_count=1",
])
async def test_self_access_total_does_not_count_a_joint_record(world: FakeFhir, gateway: GatewayUnderTest, path: str) -> None:
    world.add(c.opt_out(c.PAT_BEN, "consent-ben-in"), JOINT, SOLO)
    everything = [c.ANA, c.ANA_CBC, SOLO, JOINT]
    world.override = routes({
        ("GET", f"/Patient/{ANA_ID}/$everything"): lambda r: _page(world, everything, r),
        ("GET", "/Appointment"): lambda r: _page(world, [SOLO, JOINT], r),
    })
    status, headers, body = await call(gateway, "GET", path, actor=c.PAT_ANA)
    assert status == 200, body
    bundle = orjson.loads(body)
    visible = 3 if "$everything" in path else 1
    assert bundle.get("total", 0) <= visible, f"total {bundle.get('total')} counts what she cannot see"
    assert leaks(body, headers, (JOINT["id"], "Couples counselling", c.BEN_CBC["id"], "Okafor")) == []


# ---------------------------------------------------------------- 11. duplicate keys from the upstream


DUPLICATE_SUBJECT = (
    b'{"resourceType":"Observation","id":"obs-dup-subject-01","status":"final",'
    b'"code":{"coding":[{"system":"http://loinc.org","code":"58410-2"}]},'
    b'"subject":{"reference":"Patient/pat-ben-7702"},"valueString":"Okafor result",'
    b'"subject":{"reference":"Patient/pat-ana-5581"}}'
)


@pytest.mark.parametrize("shape", ["read", "search", "spaced", "nested", "batch"])
async def test_upstream_answer_with_a_duplicate_key_is_a_502(world: FakeFhir, gateway: GatewayUnderTest, shape: str) -> None:
    world.add(c.opt_out(c.PAT_BEN, "consent-ben-in"))
    resource = DUPLICATE_SUBJECT
    if shape == "spaced":
        resource = resource.replace(b'"subject":', b'"subject" :')
    if shape == "nested":
        resource = resource.replace(b'"subject":{"reference":"Patient/pat-ben-7702"}',
                                    b'"subject":{"reference":"Patient/pat-ben-7702","reference":"Patient/pat-ana-5581"}')
        resource = resource.rsplit(b',"subject"', 1)[0] + b"}"
    if shape in ("search", "spaced"):
        body = b'{"resourceType":"Bundle","type":"searchset","entry":[{"resource":' + resource + b"}]}"
        path = f"/Observation?patient={c.PAT_ANA}"
    elif shape == "batch":
        body = b'{"resourceType":"Bundle","type":"batch-response","entry":[{"response":{"status":"200 OK"},"resource":' + resource + b"}]}"
        path = "/"
    else:
        body = resource
        path = "/Observation/obs-dup-subject-01"
    method = "POST" if shape == "batch" else "GET"
    world.override = routes({(method, path.split("?")[0]): lambda r: web.Response(body=body, content_type=FHIR_JSON)})
    status, headers, raw_body = await call(gateway, method, path,
                                           body=batch(("GET", "Observation/obs-dup-subject-01")) if shape == "batch" else None)
    is_outcome(status, headers, raw_body, 502)
    assert leaks(raw_body, headers, ("Okafor", "pat-ben-7702", "obs-dup-subject-01")) == []


async def test_request_body_with_a_duplicate_key_is_refused(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    """A batch whose entry names its url twice: checked on one, sent on the other."""
    body = (b'{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"GET",'
            b'"url":"Patient?_has:Observation:subject:code=20447-9","url":"Observation/obs-cbc-58410-ben"}}]}')
    world.override = routes({("GET", "/Patient"): _has_answer})
    status, headers, raw_body = await call(gateway, "POST", "/", body=body)
    is_outcome(status, headers, raw_body, 400)
    assert entry_requests(world) == [] and not any("_has" in s for s in sent_upstream(world))


# ---------------------------------------------------------------- 12. errors of the HTTP layer


ECHO = "pat-ana-5581-B20-echo"


@pytest.mark.parametrize("request_bytes", [
    f"GET /Condition?patient={ECHO} HTTP/1.1\r\nHost: x\r\nX-Actor: Practitioner/dr-gomez\r\n"
    f"X-Junk: {ECHO}{'A' * 20000}\r\nConnection: close\r\n\r\n".encode(),
    f"GET /Condition?patient={ECHO}{'B' * 20000} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    f"GET /Condition?patient={ECHO} HTTP/1.1 extra\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    f"G\x01T /Condition?patient={ECHO} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    f"GET /Condition?patient={ECHO} HTTP/9.9\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    f"GET /Condition?patient={ECHO} HTTP/1.1\r\nHost: x\r\nBad Header{ECHO}: y\r\nConnection: close\r\n\r\n".encode(),
    f"POST /Condition HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\nX-Actor: {ECHO}\r\n"
    "Connection: close\r\n\r\nhello!".encode(),
], ids=["header-too-long", "request-line-too-long", "extra-token", "control-char-method", "bad-version",
        "bad-header-name", "two-content-lengths"])
async def test_http_layer_error_is_an_outcome_that_echoes_nothing(gateway: GatewayUnderTest, request_bytes: bytes) -> None:
    answer = await raw_http(gateway.running.proxy_port, request_bytes)
    status, headers, body = split_http(answer)
    assert 400 <= status < 500, answer[:300]
    assert headers.get("content-type", "").startswith(FHIR_JSON), answer[:300]
    assert orjson.loads(body)["resourceType"] == "OperationOutcome"
    assert ECHO not in answer.decode("latin-1") and "AAAA" not in answer.decode("latin-1")


# ---------------------------------------------------------------- beyond the issue: more doors


@pytest.mark.parametrize("kind", ["batch", "transaction"])
async def test_conditional_create_entry_probing_a_hidden_code_is_refused(world: FakeFhir, gateway: GatewayUnderTest, kind: str) -> None:
    """``ifNoneExist`` answers (200 vs 201) whether Ana has an HIV viral load."""
    probe = {"resourceType": "Observation", "status": "final", "code": c.concept(c.LOINC, "20447-9", VL_DISPLAY),
             "subject": {"reference": c.PAT_ANA}}
    bundle = batch(("POST", "Observation", probe), kind=kind)
    bundle["entry"][0]["request"]["ifNoneExist"] = f"patient={c.PAT_ANA}&code=20447-9"
    status, _, body = await call(gateway, "POST", "/", body=bundle)
    assert status in (200, 403), body
    if status == 200:
        assert slots(body)[0]["response"]["status"].startswith("403")
    assert entry_requests(world) == []


async def test_batch_meta_of_a_hidden_note_is_refused(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    status, headers, body = await call(gateway, "POST", "/", body=batch(
        ("GET", f"DocumentReference/{c.PSYCHOTHERAPY_NOTE['id']}/$meta"),
        ("GET", f"Observation?_id={VIRAL_LOAD['id']}&_contained=true")))
    assert status == 200, body
    for slot in slots(body):
        assert "resource" not in slot and slot["response"]["status"].startswith("403"), slot
    assert leaks(body, headers) == []


HEAD_ENTRY_REASON = ("LEAK: a batch entry HEAD <hidden> is sent as HEAD; the upstream's bodiless '200 OK' slot is passed on, "
                     "telling a hidden record from a missing one (the same HEAD alone is sent as GET and decided)")


async def test_head_entry_of_a_hidden_record_is_withheld(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    alone = await call(gateway, "HEAD", f"/{HIV_REF}")
    assert alone[0] == 403
    status, _, body = await call(gateway, "POST", "/", body=batch(("HEAD", HIV_REF)))
    assert status == 200, body
    assert slots(body)[0]["response"]["status"].startswith("403")


async def test_has_in_a_search_form_body_is_refused(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("POST", "/Patient/_search"): lambda r: c.bundle([c.ANA], world.base_url)})
    for ctype in (FORM, "application/x-www-form-urlencoded; charset=UTF-8", "Application/X-WWW-Form-Urlencoded"):
        status, headers, body = await call(gateway, "POST", "/Patient/_search",
                                           body=b"_has:Observation:subject:code=20447-9", **{"Content-Type": ctype})
        is_outcome(status, headers, body, 403)
    assert not any(r.method == "POST" for r in world.requests)


async def test_everything_with_elements_in_a_batch_entry_is_filtered(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("GET", f"/Patient/{ANA_ID}/$everything"): _everything(world)})
    status, headers, body = await call(gateway, "POST", "/", body=batch(
        ("GET", f"Patient/{ANA_ID}/$everything?_elements=id,subject,valueQuantity")))
    assert status == 200, body
    assert leaks(body, headers) == []
    [slot] = slots(body)
    kept = {e["resource"]["id"] for e in slot["resource"]["entry"] if "id" in e.get("resource", {})}
    assert c.ANA_CBC["id"] in kept and VIRAL_LOAD["id"] not in kept
    assert not any("_elements" in s for s in sent_upstream(world))


async def test_consent_patch_of_the_whole_document_is_refused(guarded: FakeFhir, gateway: GatewayUnderTest) -> None:
    hijack = {**granting("consent-optin", subject=c.PAT_BEN)}
    status, _, body = await call(gateway, "PATCH", "/Consent/consent-optin", actor=c.PAT_ANA,
                                 body=[{"op": "replace", "path": "", "value": hijack}],
                                 **{"Content-Type": "application/json-patch+json"})
    assert status == 403, body
    assert [r for r in guarded.requests if r.method == "PATCH"] == []


async def test_consent_patch_moving_the_patient_away_is_refused(guarded: FakeFhir, gateway: GatewayUnderTest) -> None:
    status, _, body = await call(gateway, "PATCH", "/Consent/consent-optin", actor=c.PAT_ANA,
                                 body=[{"op": "move", "from": "/patient", "path": "/extension"}],
                                 **{"Content-Type": "application/json-patch+json"})
    assert status == 403, body
    assert [r for r in guarded.requests if r.method == "PATCH"] == []


async def test_method_override_header_is_not_a_way_around_the_write_checks(guarded: FakeFhir, gateway: GatewayUnderTest) -> None:
    for name in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"):
        await call(gateway, "POST", "/Consent/consent-notdoc", body=b"", **{name: "DELETE"})
    forwarded = [r for r in guarded.requests if r.method == "POST" and "/Consent/consent-notdoc" in r.path_qs]
    assert forwarded == [] or not any(
        k.lower() in ("x-http-method-override", "x-http-method", "x-method-override") for r in forwarded for k in r.headers)


@pytest.mark.parametrize("path", ["/Consent;jsessionid=1/consent-notdoc", "/Consent%3Bx/consent-notdoc"])
async def test_consent_delete_with_a_path_parameter_is_refused(guarded: FakeFhir, gateway: GatewayUnderTest, path: str) -> None:
    """Servlet containers drop ``;params`` from path segments: ``Consent;x`` is Consent to them."""
    status, _, body = await call(gateway, "DELETE", path)
    status_b, _, body_b = await call(gateway, "POST", "/", body=batch(("DELETE", path.lstrip("/"))))
    assert [r for r in guarded.requests if r.method == "DELETE"] == [], (status, body, status_b, body_b)


async def test_404_mode_head_entry_of_hidden_equals_missing(world: FakeFhir, gw404: GatewayUnderTest) -> None:
    """A HEAD entry answers with a status only: the gateway has nothing to decide on."""
    status, _, body = await call(gw404, "POST", "/", body=batch(
        ("HEAD", HIV_REF), ("HEAD", "Condition/cond-nothing-here-000")))
    assert status == 200, body
    hidden, missing = slots(body)
    assert hidden == missing


@pytest.mark.parametrize("target", ["/_search", "/Patient/_search"])
async def test_system_search_form_body_with_has_is_refused(world: FakeFhir, gateway: GatewayUnderTest, target: str) -> None:
    world.override = routes({("POST", target): lambda r: c.bundle([c.ANA], world.base_url)})
    status, headers, body = await call(gateway, "POST", target,
                                       body=b"_type=Patient&_has:Observation:subject:code=20447-9", **{"Content-Type": FORM})
    is_outcome(status, headers, body, 403)
    assert leaks(body, headers, ("pat-ana-5581", "Reyes")) == []


GRAPHQL_ANSWER = {"data": {"CommunicationList": [{"about": [{"resource": {
    "id": c.HIV_CONDITION["id"], "code": {"text": "HIV disease", "coding": [{"code": "B20"}]},
    "subject": {"reference": c.PAT_ANA}}}]}]}}


async def test_self_access_graphql_cannot_reach_another_patients_record(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.add(c.opt_out(c.PAT_ANA))
    world.override = routes({("GET", f"/Patient/{BEN_ID}/$graphql"): lambda r: GRAPHQL_ANSWER})
    query = "{CommunicationList(_reference:subject){about{resource{...on Condition{id code{text coding{code}} subject{reference}}}}}}"
    status, headers, body = await call(gateway, "GET", f"/Patient/{BEN_ID}/$graphql?query={query}", actor=c.PAT_BEN)
    assert leaks(body, headers) == [], status


DIFF_ANSWER = {"resourceType": "Parameters", "parameter": [
    {"name": "operation", "part": [
        {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Condition.code.coding[0].code"},
        {"name": "previousValue", "valueString": "B20"}, {"name": "value", "valueString": "I10"}]},
    {"name": "operation", "part": [
        {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Condition.code.coding[0].display"},
        {"name": "previousValue", "valueString": "Human immunodeficiency virus [HIV] disease"},
        {"name": "value", "valueString": "Essential (primary) hypertension"}]},
]}


async def test_server_level_diff_of_a_hidden_record_is_refused(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("GET", "/$diff"): lambda r: DIFF_ANSWER})
    status, headers, body = await call(gateway, "GET", f"/$diff?from={HIV_REF}&to=Condition/{c.ANA_HYPERTENSION['id']}")
    assert leaks(body, headers) == [], status


async def test_instance_diff_of_a_hidden_record_is_refused(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("GET", f"/{HIV_REF}/$diff"): lambda r: DIFF_ANSWER})
    status, headers, body = await call(gateway, "GET", f"/{HIV_REF}/$diff?fromVersion=1")
    assert status == 403, body
    assert leaks(body, headers) == []


def _ips(request: web.Request) -> Any:
    """An International Patient Summary as a server generates it: narrative per section."""
    composition = {
        "resourceType": "Composition", "id": "ips-ana-0001", "status": "final",
        "type": c.concept(c.LOINC, "60591-5", "Patient summary Document"),
        "subject": {"reference": c.PAT_ANA}, "date": "2024-07-01T10:00:00Z",
        "author": [{"reference": c.DOCTOR}], "title": "Patient Summary",
        "section": [{
            "title": "Active Problems", "code": c.concept(c.LOINC, "11450-4", "Problem list - Reported"),
            "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml"><ul>'
                     "<li>Essential (primary) hypertension</li><li>Human immunodeficiency virus [HIV] disease</li>"
                     "<li>Opioid dependence, uncomplicated</li></ul></div>"},
            "entry": [{"reference": f"Condition/{c.ANA_HYPERTENSION['id']}"}, {"reference": HIV_REF},
                      {"reference": f"Condition/{c.OUD_CONDITION['id']}"}],
        }],
    }
    return {"resourceType": "Bundle", "type": "document", "entry": [
        {"fullUrl": f"urn:uuid:{r['id']}", "resource": r}
        for r in (composition, c.ANA, c.ANA_HYPERTENSION, c.HIV_CONDITION, c.OUD_CONDITION)]}


async def test_patient_summary_narrative_does_not_name_withheld_entries(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("GET", f"/Patient/{ANA_ID}/$summary"): _ips})
    status, headers, body = await call(gateway, "GET", f"/Patient/{ANA_ID}/$summary")
    assert status in (200, 403), body
    assert leaks(body, headers) == []


async def test_binary_attached_to_a_hidden_document_without_security_context_is_withheld(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.add({"resourceType": "Binary", "id": "bin-r-61f", "contentType": "application/pdf",
               "data": base64.b64encode(b"%PDF-1.4 Admission after assault").decode()})
    status, headers, body = await call(gateway, "GET", "/Binary/bin-r-61f")
    assert status == 403, body


async def test_side_doors_leave_nothing_in_logs_or_metrics(
    world: FakeFhir, gateway: GatewayUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    """The same side doors, checked where an operator looks: the gateway's logs and /metrics."""
    caplog.set_level(logging.DEBUG, logger="gateway")
    world.add(c.not_this_doctor(c.PAT_ANA, c.BANNED_DOCTOR))
    world.override = _honour_elements(world)
    await call(gateway, "POST", "/", body=batch(
        ("GET", f"{VL_REF}?_elements=id,subject,valueQuantity"), ("GET", f"Binary/{HIDDEN_BINARY['id']}"),
        ("GET", "Patient?_has:Observation:subject:code=20447-9"), ("DELETE", "Consent/consent-notdoc")))
    await call(gateway, "GET", f"/Binary?_id={HIDDEN_BINARY['id']}")
    await call(gateway, "PUT", "/Consent/consent-forged-em", body=BOM + orjson.dumps(forged_emergency("consent-forged-em")))
    async with aiohttp.ClientSession() as admin:
        async with admin.get(gateway.admin_url + "/metrics") as resp:
            metrics = await resp.text()
    records = [r for r in caplog.records if r.name.startswith("gateway")]
    assert records, "nothing was logged: the check would be vacuous"
    formatter = JsonLogFormatter()
    logs = "\n".join(formatter.format(r) + repr(r.__dict__) for r in records)
    secrets = tuple(s for s in ALL_SECRETS if s not in ("Patient/pat-ana-5581",))
    assert hidden_in(logs, secrets) == [], "logs"
    assert hidden_in(metrics, (*secrets, "pat-ana-5581", "dr-gomez", "consent-notdoc")) == [], "metrics"


def _everything_or_404(world: FakeFhir) -> Override:
    def everything(request: web.Request) -> Any:
        pid = request.path.split("/")[-2]
        if f"Patient/{pid}" not in world.resources:
            return web.Response(status=404, body=b'{"resourceType":"OperationOutcome","issue":[{"severity":"error",'
                                b'"code":"processing","diagnostics":"HAPI-2001: Resource Patient/' + pid.encode()
                                + b' is not known"}]}', content_type=FHIR_JSON)
        return c.bundle([r for r in world.resources.values() if r.get("id") == pid
                         or (r.get("subject") or {}).get("reference") == f"Patient/{pid}"], world.base_url)

    return hapi_404({("GET", f"/Patient/{BEN_ID}/$everything"): everything,
                     ("GET", "/Patient/pat-nothing-here-000/$everything"): everything})


@pytest.mark.parametrize("hidden,missing", [
    pytest.param(f"Patient/{BEN_ID}/$everything", "Patient/pat-nothing-here-000/$everything", id="everything"),
    pytest.param(f"{HIV_REF}/_history", "Condition/cond-nothing-here-000/_history", id="history"),
    pytest.param(f"Binary/{HIDDEN_BINARY['id']}/_history", "Binary/bin-nothing-here-000/_history", id="binary-history"),
    pytest.param(f"{HIV_REF}/_history/1", "Condition/cond-nothing-here-000/_history/1", id="vread"),
])
async def test_404_mode_more_batch_slots_equal_missing_ones(world: FakeFhir, gw404: GatewayUnderTest, hidden: str, missing: str) -> None:
    world.override = _everything_or_404(world)
    status, _, body = await call(gw404, "POST", "/", body=batch(("GET", hidden), ("GET", missing)))
    assert status == 200, body
    a, b = slots(body)
    assert a == b
    assert leaks(body, None, (*ALL_SECRETS, "Okafor", c.BEN_CBC["id"])) == []


@pytest.mark.parametrize("rtype,hidden", [("Condition", c.HIV_CONDITION["id"]), ("Binary", HIDDEN_BINARY["id"])])
async def test_404_mode_search_by_id_of_hidden_equals_missing(world: FakeFhir, gw404: GatewayUnderTest, rtype: str, hidden: str) -> None:
    a = await call(gw404, "GET", f"/{rtype}?_id={hidden}")
    b = await call(gw404, "GET", f"/{rtype}?_id=nothing-here-000")
    assert a[0] == b[0] == 200
    assert entries(a[2]) == entries(b[2])


def _resolve_conditional_references(fake: FakeFhir) -> Callable[[web.Request], Awaitable[Any]]:
    """A transaction as HAPI runs it: a conditional reference ``Patient?<search>`` is resolved by
    running the search (here: the reverse chain finds Ana); none or several matches is a 412."""

    async def answer(request: web.Request) -> Any:
        bundle = orjson.loads(await request.read())
        out = []
        for entry in bundle["entry"]:
            resource = entry["resource"]
            ref = resource["subject"]["reference"]
            if "?" in ref:
                if "_has" not in ref:
                    return fhir({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing"}]}, 412)
                resource = {**resource, "subject": {"reference": c.PAT_ANA}}
            resource = {**resource, "id": "obs-created-0001"}
            fake.add(resource)
            out.append({"resource": resource, "response": {"status": "201 Created",
                        "location": f"{fake.base_url}/Observation/obs-created-0001/_history/1"}})
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": out}

    return answer


@pytest.mark.parametrize("kind", ["transaction", "batch", "create"])
async def test_conditional_reference_cannot_run_a_refused_search(world: FakeFhir, gateway: GatewayUnderTest, kind: str) -> None:
    """``subject: Patient?_has:...`` makes the server run the reverse chain: 201 vs 412 (and the
    resolved subject in the answer) says who has an HIV viral load."""
    resolve = _resolve_conditional_references(world)

    async def create(request: web.Request) -> Any:
        resource = orjson.loads(await request.read())
        request_bundle = batch(("POST", "Observation", resource), kind="transaction")

        class _Replay:
            async def read(self) -> bytes:
                return orjson.dumps(request_bundle)

        answered = await resolve(_Replay())  # type: ignore[arg-type]
        return answered if isinstance(answered, web.Response) else fhir(answered["entry"][0]["resource"], 201)

    world.override = routes({("POST", "/"): resolve, ("POST", "/Observation"): create})
    probe = {"resourceType": "Observation", "status": "final",
             "code": c.concept(c.LOINC, "8867-4", "Heart rate"), "valueQuantity": {"value": 72, "unit": "/min"},
             "subject": {"reference": "Patient?_id=pat-ana-5581&_has:Observation:subject:code=20447-9"}}
    if kind == "create":
        status, headers, body = await call(gateway, "POST", "/Observation", body=probe)
    else:
        status, headers, body = await call(gateway, "POST", "/", body=batch(("POST", "Observation", probe), kind=kind))
    assert not any(b"_has" in r.body for r in world.requests), "the server ran a reverse chain for the requester"
    assert status in (200, 400, 403), body


def _json_patch(fake: FakeFhir) -> Callable[[web.Request], Awaitable[Any]]:
    """PATCH as a server applies it (``replace`` of a nested path), answering the patched resource."""

    async def patch(request: web.Request) -> Any:
        key = request.path.removeprefix("/fhir/")
        resource = orjson.loads(orjson.dumps(fake.resources[key]))
        for op in orjson.loads(await request.read()):
            *parents, last = op["path"].strip("/").split("/")
            node = resource
            for name in parents:
                node = node[int(name)] if isinstance(node, list) else node[name]
            node[last] = op["value"]
        fake.add(resource)
        return resource

    return patch


async def test_patch_cannot_relabel_a_hidden_binary(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("PATCH", f"/Binary/{HIDDEN_BINARY['id']}"): _json_patch(world)})
    status, headers, body = await call(gateway, "PATCH", f"/Binary/{HIDDEN_BINARY['id']}", body=[
        {"op": "replace", "path": "/securityContext/reference", "value": f"Observation/{c.ANA_CBC['id']}"}],
        **{"Content-Type": "application/json-patch+json"})
    assert leaks(body, headers, (HIDDEN_BINARY["data"],)) == [], status
    status, headers, body = await call(gateway, "GET", f"/Binary/{HIDDEN_BINARY['id']}")
    assert leaks(body, headers, (HIDDEN_BINARY["data"],)) == [], status


async def test_self_access_everything_in_a_batch_has_no_total_counting_a_joint_record(
    world: FakeFhir, gateway: GatewayUnderTest
) -> None:
    world.add(c.opt_out(c.PAT_BEN, "consent-ben-in"), JOINT, SOLO)
    everything = [c.ANA, c.ANA_CBC, SOLO, JOINT]
    world.override = routes({("GET", f"/Patient/{ANA_ID}/$everything"): lambda r: _page(world, everything, r)})
    status, headers, body = await call(gateway, "POST", "/", actor=c.PAT_ANA,
                                       body=batch(("GET", f"Patient/{ANA_ID}/$everything?_count=1")))
    assert status == 200, body
    [slot] = slots(body)
    assert slot["resource"].get("total", 0) <= 3
    assert leaks(body, headers, (JOINT["id"], "Couples counselling")) == []


@pytest.mark.parametrize("method,path,actor", [
    ("DELETE", "/Consent/consent-notdoc/_history/1", c.DOCTOR),
    ("PUT", "/Consent/consent-ben-out/_history/1", c.PAT_ANA),
    ("PUT", "/Consent/consent-notdoc/_history/1", c.DOCTOR),
    ("PATCH", "/Consent/consent-notdoc/_history/1", c.DOCTOR),
    ("POST", "/Consent/consent-notdoc/_history", c.DOCTOR),
], ids=["delete-version", "put-version-other-patient", "put-version", "patch-version", "post-history"])
async def test_consent_write_to_a_version_url_is_checked(
    guarded: FakeFhir, gateway: GatewayUnderTest, method: str, path: str, actor: str
) -> None:
    body: Any = None
    headers: dict[str, str] = {}
    if method == "PUT":
        body = {**c.opt_in(c.PAT_ANA, cid=path.split("/")[2])}
    elif method == "PATCH":
        body, headers = [{"op": "replace", "path": "/status", "value": "inactive"}], {"Content-Type": "application/json-patch+json"}
    elif method == "POST":
        body = granting("consent-notdoc")
    status, _, raw_body = await call(gateway, method, path, actor=actor, body=body, **headers)
    assert status in (400, 403, 405), raw_body
    assert writes_sent(guarded) == []


async def test_operation_entry_with_elements_in_its_parameters_is_filtered(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("POST", f"/Patient/{ANA_ID}/$everything"): _everything(world)})
    params = {"resourceType": "Parameters", "parameter": [{"name": "_elements", "valueString": "id,subject,valueQuantity"}]}
    status, headers, body = await call(gateway, "POST", "/", body=batch(("POST", f"Patient/{ANA_ID}/$everything", params)))
    assert status == 200, body
    assert leaks(body, headers) == []
    assert not any("_elements" in s for s in sent_upstream(world)), sent_upstream(world)
