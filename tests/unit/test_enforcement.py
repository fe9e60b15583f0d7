"""Enforcement through the real request path: HTTP to the gateway, fake upstream on real sockets.

Covers CONTRACT §6 and issue 6: reads, searches, includes, ``$everything``, history, batch
responses, nested Bundles, contained resources, Parameters, projection, refusals, the
decision header and the enforcement metrics. Consent lookup and caching are in
``test_consent_store.py``; what a denied requester can see is in ``tests/leak/``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.hidden import hidden_in

MakeGateway = Callable[..., Awaitable[GatewayUnderTest]]
Override = Callable[[web.Request], Awaitable[web.StreamResponse | None]]
FHIR_JSON = "application/fhir+json"


def fhir(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=FHIR_JSON)


def routes(table: dict[tuple[str, str], Callable[[web.Request], Any]]) -> Override:
    """An override answering ``(method, path below /fhir)`` with the JSON a function returns."""

    async def override(request: web.Request) -> web.StreamResponse | None:
        key = (request.method, request.path.removeprefix("/fhir") or "/")
        if key in table:
            return fhir(table[key](request))
        return None

    return override


async def call(
    gw: GatewayUnderTest, method: str, path: str, actor: str = c.DOCTOR, body: Any = None,
    **headers: str,
) -> tuple[int, dict[str, str], bytes]:
    hdrs = {"X-Actor": actor, **headers}
    data: bytes | None = None
    if body is not None:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        hdrs.setdefault("Content-Type", FHIR_JSON)
    async with gw.session.request(method, gw.url + path, headers=hdrs, data=data) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def get_json(gw: GatewayUnderTest, path: str, actor: str = c.DOCTOR, status: int = 200) -> tuple[dict[str, str], Any]:
    code, headers, body = await call(gw, "GET", path, actor)
    assert code == status, body
    return headers, orjson.loads(body)


def ids(bundle: dict[str, Any]) -> list[str]:
    """Ids of the entries that are not the suppressed-outcome entry."""
    return [
        e["resource"]["id"] for e in bundle.get("entry", [])
        if e.get("resource", {}).get("resourceType") != "OperationOutcome"
    ]


def outcome_entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in bundle.get("entry", []) if e.get("resource", {}).get("resourceType") == "OperationOutcome"]


def assert_suppressed_once(bundle: dict[str, Any]) -> None:
    """Exactly one outcome entry, search.mode outcome, issue code suppressed; no total."""
    outcomes = outcome_entries(bundle)
    assert len(outcomes) == 1, outcomes
    assert outcomes[0]["search"]["mode"] == "outcome"
    assert [i["code"] for i in outcomes[0]["resource"]["issue"]] == ["suppressed"]
    assert "total" not in bundle


def assert_no_secrets(raw: bytes, secrets: tuple[str, ...] = c.SECRETS) -> None:
    found = hidden_in(raw, secrets)
    assert not found, f"hidden data in the answer: {found}"


def upstream_data_requests(fake: FakeFhir) -> list[str]:
    """Requests the upstream got other than consent lookups."""
    return [
        r.path_qs for r in fake.requests
        if not r.path_qs.startswith(("/fhir/Consent", "/fhir/metadata"))
    ]


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    """The fake upstream holding Ana's and Ben's records; Ana has a general opt-in."""
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA))
    return fake_fhir


# ---------------------------------------------------------------- reads


async def test_permitted_read_passes_with_permit_header(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    headers, body = await get_json(gateway, "/Observation/obs-cbc-58410-ana")
    assert body["code"]["coding"][0]["code"] == "58410-2"
    assert headers["X-Consent-Decision"] == "permit"


async def test_denied_read_is_403_outcome_saying_nothing(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    status, headers, raw = await call(gateway, "GET", "/Condition/cond-hiv-b20-91a")
    assert status == 403
    assert headers["Content-Type"].startswith(FHIR_JSON)
    assert headers["X-Consent-Decision"] == "deny"
    outcome = orjson.loads(raw)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "forbidden"
    assert_no_secrets(raw, (*c.SECRETS, "HIV", "consent-optin", "Consent/", "label", "sensitiv"))


async def test_denied_read_status_404_when_configured(world: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(world.base_url, enforcement={"denied_read_status": 404})
    status, headers, raw = await call(gw, "GET", "/Observation/obs-hiv-75622-44c")
    assert status == 404
    assert orjson.loads(raw)["issue"][0]["code"] == "not-found"
    assert_no_secrets(raw, (*c.SECRETS, "HIV", "consent-optin", "forbidden", "denied"))


@pytest.mark.parametrize(
    ("consent", "actor", "path", "expected"),
    [
        pytest.param(c.opt_out(c.PAT_ANA), c.DOCTOR, "/Observation/obs-cbc-58410-ana", 403, id="opt-out-denies-ordinary"),
        pytest.param(c.not_this_doctor(c.PAT_ANA, c.BANNED_DOCTOR), c.BANNED_DOCTOR, "/Observation/obs-cbc-58410-ana", 403, id="not-this-doctor-denied"),
        pytest.param(c.not_this_doctor(c.PAT_ANA, c.BANNED_DOCTOR), c.DOCTOR, "/Observation/obs-cbc-58410-ana", 200, id="not-this-doctor-other-doctor"),
        pytest.param(c.no_mental_health_except(c.PAT_ANA, c.PSYCHIATRIST), c.DOCTOR, "/Condition/cond-dep-f329-0c1", 403, id="no-mh-doctor-denied-depression"),
        pytest.param(c.no_mental_health_except(c.PAT_ANA, c.PSYCHIATRIST), c.PSYCHIATRIST, "/Condition/cond-dep-f329-0c1", 200, id="no-mh-psychiatrist-sees-depression"),
        pytest.param(c.no_mental_health_except(c.PAT_ANA, c.PSYCHIATRIST), c.PSYCHIATRIST, "/DocumentReference/docref-psynote-8d3", 200, id="no-mh-psychiatrist-sees-note"),
        pytest.param(c.no_mental_health_except(c.PAT_ANA, c.PSYCHIATRIST), c.PSYCHIATRIST, "/Condition/cond-hiv-b20-91a", 403, id="no-mh-psychiatrist-not-hiv"),
        pytest.param(c.opt_in(c.PAT_ANA, labels=("HIV",)), c.DOCTOR, "/Condition/cond-hiv-b20-91a", 200, id="permit-naming-hiv-opens-hiv"),
        pytest.param(c.opt_in(c.PAT_ANA, labels=("HIV",)), c.DOCTOR, "/Condition/cond-oud-f1120-3be", 403, id="permit-naming-hiv-not-sud"),
        pytest.param(c.opt_in(c.PAT_ANA, labels=("R",)), c.DOCTOR, "/DocumentReference/docref-restricted-r-61f", 200, id="permit-naming-r-opens-r"),
        pytest.param(c.opt_in(c.PAT_ANA, labels=("R",)), c.DOCTOR, "/DocumentReference/docref-vrestricted-v-9a0", 403, id="permit-naming-r-not-v"),
        pytest.param(c.opt_in(c.PAT_ANA), c.DOCTOR, "/MedicationRequest/medrx-bupnal-1010600-e7d", 403, id="general-permit-not-part2"),
        pytest.param(c.opt_out(c.PAT_ANA), c.PAT_ANA, "/Condition/cond-hiv-b20-91a", 200, id="self-access-despite-opt-out"),
    ],
)
async def test_consent_decides_reads(
    fake_fhir: FakeFhir, gateway: GatewayUnderTest, consent: dict[str, Any], actor: str, path: str, expected: int
) -> None:
    c.seed_all(fake_fhir)
    fake_fhir.add(consent)
    status, headers, _ = await call(gateway, "GET", path, actor)
    assert status == expected
    assert headers["X-Consent-Decision"] == ("permit" if expected == 200 else "deny")


async def test_buprenorphine_naloxone_code_alone_is_part2(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.add(c.BUPRENORPHINE_CODE_ONLY)
    status, _, _ = await call(gateway, "GET", "/MedicationRequest/medrx-bupnal-only-5f2")
    assert status == 403


async def test_decision_header_on_gateway_errors_and_capabilities(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    async with gateway.session.get(gateway.url + "/Observation/obs-cbc-58410-ana") as resp:
        assert resp.status == 401
        assert resp.headers["X-Consent-Decision"] == "deny"
    headers, _ = await get_json(gateway, "/metadata")
    assert headers["X-Consent-Decision"] == "permit"


# ---------------------------------------------------------------- searches and bundles


async def test_search_removes_sensitive_entries(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    headers, bundle = await get_json(gateway, f"/Condition?patient={c.PAT_ANA}")
    assert ids(bundle) == ["cond-htn-i10-ana"]
    assert_suppressed_once(bundle)
    assert headers["X-Consent-Decision"] == "filtered"


async def test_search_with_nothing_hidden_says_permit_but_drops_total(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.add(c.opt_in(c.PAT_BEN, "consent-ben"))
    headers, bundle = await get_json(gateway, f"/Observation?patient={c.PAT_BEN}")
    assert ids(bundle) == ["obs-cbc-58410-ben"]
    assert outcome_entries(bundle) == []
    assert headers["X-Consent-Decision"] == "permit"
    # A general permit does not open sensitive data, so the count could have hidden some.
    assert "total" not in bundle


async def test_self_search_keeps_total(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    headers, bundle = await get_json(gateway, f"/Condition?patient={c.PAT_ANA}", actor=c.PAT_ANA)
    assert sorted(ids(bundle)) == sorted(["cond-hiv-b20-91a", "cond-oud-f1120-3be", "cond-dep-f329-0c1", "cond-htn-i10-ana"])
    assert bundle["total"] == 4
    assert headers["X-Consent-Decision"] == "permit"


async def test_search_across_patients_filters_each_by_its_own_consents(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.add(c.opt_out(c.PAT_BEN, "consent-ben-out"))
    _, bundle = await get_json(gateway, "/Observation?status=final")
    assert ids(bundle) == ["obs-cbc-58410-ana"]
    assert_suppressed_once(bundle)


async def test_count_zero_search_drops_total(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    async def count_only(request: web.Request) -> web.StreamResponse | None:
        if request.path == "/fhir/Observation":
            return fhir({"resourceType": "Bundle", "type": "searchset", "total": 3})
        return None

    world.override = count_only
    _, bundle = await get_json(gateway, f"/Observation?patient={c.PAT_ANA}&_count=0")
    assert "total" not in bundle


@pytest.mark.parametrize("param", ["_revinclude=Condition:subject", "_revinclude:iterate=Condition:subject"])
async def test_revinclude_entries_are_decided(world: FakeFhir, gateway: GatewayUnderTest, param: str) -> None:
    conditions = (c.HIV_CONDITION, c.OUD_CONDITION, c.DEPRESSION, c.ANA_HYPERTENSION)
    world.override = routes({("GET", "/Patient"): lambda r: c.bundle([c.ANA], world.base_url, include=conditions)})
    headers, bundle = await get_json(gateway, f"/Patient?_id=pat-ana-5581&{param}")
    assert ids(bundle) == ["pat-ana-5581", "cond-htn-i10-ana"]
    assert_suppressed_once(bundle)
    assert headers["X-Consent-Decision"] == "filtered"


async def test_include_entries_are_decided(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("GET", "/MedicationRequest"): lambda r: c.bundle(
        [c.BUPRENORPHINE], world.base_url, include=(c.PRACTITIONER, c.OUD_CONDITION, c.ANA)
    )})
    _, bundle = await get_json(gateway, f"/MedicationRequest?patient={c.PAT_ANA}&_include=*")
    # The prescriber and the patient came only with the withheld order: showing them would tell
    # who wrote it, and that there is one (a search of orders by drug would name its patients).
    assert ids(bundle) == []
    assert_suppressed_once(bundle)


async def test_everything_is_decided_entry_by_entry(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    everything = [c.ANA, *c.ANA_SENSITIVE, *c.ANA_ORDINARY, c.PRACTITIONER]
    world.override = routes({("GET", "/Patient/pat-ana-5581/$everything"): lambda r: c.bundle(everything, world.base_url)})
    headers, bundle = await get_json(gateway, "/Patient/pat-ana-5581/$everything")
    assert sorted(ids(bundle)) == sorted(["pat-ana-5581", "obs-cbc-58410-ana", "cond-htn-i10-ana", "dr-gomez"])
    assert_suppressed_once(bundle)
    assert headers["X-Consent-Decision"] == "filtered"


async def test_instance_history_decides_each_version(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    corrected = {**c.ANA_HYPERTENSION, "meta": {"versionId": "2"}}
    first = {**c.DEPRESSION, "id": "cond-htn-i10-ana", "meta": {"versionId": "1"}}
    world.override = routes({
        ("GET", "/Condition/cond-htn-i10-ana/_history"): lambda r: c.history_bundle([corrected, first], world.base_url),
    })
    code, headers, raw = await call(gateway, "GET", "/Condition/cond-htn-i10-ana/_history")
    assert code == 200
    bundle = orjson.loads(raw)
    assert [e["resource"]["meta"]["versionId"] for e in bundle["entry"] if "meta" in e.get("resource", {})] == ["2"]
    assert "total" not in bundle
    assert headers["X-Consent-Decision"] == "filtered"
    assert_no_secrets(raw, ("F32.9", "35489007", "Depressive disorder"))


async def test_batch_response_entries_are_decided(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation/obs-cbc-58410-ana"}},
        {"request": {"method": "GET", "url": "Observation/obs-hiv-75622-44c"}},
    ]}
    world.override = routes({("POST", "/"): lambda r: {
        "resourceType": "Bundle", "type": "batch-response", "entry": [
            {"resource": c.ANA_CBC, "response": {"status": "200 OK"}},
            {"resource": c.HIV_TEST, "response": {"status": "200 OK"}},
        ],
    }})
    code, headers, raw = await call(gateway, "POST", "/", body=batch)
    assert code == 200
    assert_no_secrets(raw)
    bundle = orjson.loads(raw)
    assert len(bundle["entry"]) == 2  # the withheld slot keeps its place
    assert bundle["entry"][1]["response"]["status"].startswith("403")
    assert headers["X-Consent-Decision"] == "filtered"


async def test_nested_bundle_entries_are_decided(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    inner = {"resourceType": "Bundle", "id": "collection-1", "type": "collection",
             "entry": [{"resource": c.ANA_CBC}, {"resource": c.HIV_TEST}]}
    world.override = routes({("GET", "/Bundle"): lambda r: c.bundle([inner], world.base_url)})
    code, _, raw = await call(gateway, "GET", "/Bundle?type=collection")
    assert code == 200
    assert_no_secrets(raw)
    nested = orjson.loads(raw)["entry"][0]["resource"]
    assert ids(nested) == ["obs-cbc-58410-ana"]


async def test_contained_sensitive_resource_takes_its_container_out(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    report = c.cbc_report_with_contained_hiv()
    world.add(report)
    status, _, raw = await call(gateway, "GET", "/DiagnosticReport/dr-cbc-contained-77e")
    assert status == 403
    _, bundle = await get_json(gateway, f"/DiagnosticReport?patient={c.PAT_ANA}")
    assert ids(bundle) == []
    assert_suppressed_once(bundle)


async def test_parameters_resources_are_decided(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("GET", "/Observation/$lastn"): lambda r: {
        "resourceType": "Parameters", "parameter": [
            {"name": "statistic", "resource": c.ANA_CBC},
            {"name": "source", "resource": c.HIV_TEST},
            {"name": "nested", "part": [{"name": "source", "resource": c.HIV_CONDITION}]},
        ],
    }})
    code, headers, raw = await call(gateway, "GET", f"/Observation/$lastn?patient={c.PAT_ANA}&code=http://loinc.org|58410-2")
    assert code == 200
    assert_no_secrets(raw)
    params = orjson.loads(raw)["parameter"]
    assert [p["resource"]["id"] for p in params if "resource" in p] == ["obs-cbc-58410-ana"]
    assert headers["X-Consent-Decision"] == "filtered"


# ---------------------------------------------------------------- projection


@pytest.mark.parametrize(
    ("query", "kept", "gone"),
    [
        ("_elements=id", {"resourceType", "id", "meta"}, "code"),
        ("_elements=status", {"resourceType", "id", "meta", "status"}, "code"),
        ("_summary=true", {"resourceType", "id", "meta", "status", "code", "subject"}, "text"),
    ],
)
async def test_projection_is_applied_after_deciding(
    world: FakeFhir, gateway: GatewayUnderTest, query: str, kept: set[str], gone: str
) -> None:
    code, _, raw = await call(gateway, "GET", f"/Observation?patient={c.PAT_ANA}&{query}")
    assert code == 200
    data_requests = upstream_data_requests(world)
    assert data_requests and all("_elements" not in q and "_summary" not in q for q in data_requests)
    assert_no_secrets(raw)
    bundle = orjson.loads(raw)
    assert ids(bundle) == ["obs-cbc-58410-ana"]
    assert_suppressed_once(bundle)
    cbc = bundle["entry"][0]["resource"]
    assert kept <= set(cbc)
    assert gone not in cbc
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"} in cbc["meta"]["tag"]


def _honours_elements(world: FakeFhir) -> Override:
    """An upstream that applies ``_elements`` from the query or a form body, as servers do."""

    async def override(request: web.Request) -> web.StreamResponse | None:
        if request.path != "/fhir/Observation/_search":
            return None
        form = dict(request.query) | dict(await request.post())
        found = [c.HIV_TEST, c.ANA_CBC]
        if "_elements" in form:
            keep = {"resourceType", "id", *str(form["_elements"]).split(",")}
            found = [{k: v for k, v in r.items() if k in keep} for r in found]
        return fhir(c.bundle(found, world.base_url))

    return override


async def test_post_search_is_decided(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = _honours_elements(world)
    code, _, raw = await call(
        gateway, "POST", "/Observation/_search", body=f"patient={c.PAT_ANA}".encode(),
        **{"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert code == 200
    assert ids(orjson.loads(raw)) == ["obs-cbc-58410-ana"]


async def test_post_search_elements_in_body_cannot_hide_labels(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = _honours_elements(world)
    code, _, raw = await call(
        gateway, "POST", "/Observation/_search", body=f"patient={c.PAT_ANA}&code=http://loinc.org|75622-1&_elements=subject,status".encode(),
        **{"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert code == 200
    assert_no_secrets(raw)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "path",
    [
        "/Patient?_has:Condition:subject:code=B20",
        f"/Patient?_id=pat-ana-5581&_has:Observation:patient:code=75622-1",
        "/$graphql?query={PatientList{id}}",
        "/Observation/_history",
        "/_history",
        f"/Observation?patient={c.PAT_ANA}&_summary=count",
        "/Observation?subject.name=Reyes",
        f"/Observation?patient={c.PAT_ANA}&performer.name=Gomez",
    ],
)
async def test_unfilterable_requests_are_refused(world: FakeFhir, gateway: GatewayUnderTest, path: str) -> None:
    status, headers, raw = await call(gateway, "GET", path)
    assert status == 403, raw
    outcome = orjson.loads(raw)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "forbidden"
    assert headers["X-Consent-Decision"] == "deny"
    assert upstream_data_requests(world) == []


@pytest.mark.parametrize(
    "path",
    [
        f"/Observation?patient={c.PAT_ANA}&_summary=count",
        "/Observation?patient=pat-ana-5581&_summary=count",
        f"/Observation?subject={c.PAT_ANA}&_has:Provenance:target:agent={c.DOCTOR}",
        f"/Observation?patient={c.PAT_ANA}&performer.name=Gomez",
    ],
)
async def test_self_access_is_not_refused(world: FakeFhir, gateway: GatewayUnderTest, path: str) -> None:
    world.override = routes({("GET", "/Patient/pat-ana-5581/$graphql"): lambda r: {"data": {"id": "pat-ana-5581"}}})
    status, _, raw = await call(gateway, "GET", path, actor=c.PAT_ANA)
    assert status == 200, raw
    assert upstream_data_requests(world)


async def test_another_patient_is_refused_where_self_is_not(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    status, _, _ = await call(gateway, "GET", f"/Observation?patient={c.PAT_ANA}&_summary=count", actor=c.PAT_BEN)
    assert status == 403


async def test_has_in_post_search_body_is_refused(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("POST", "/Patient/_search"): lambda r: c.bundle([c.ANA], world.base_url)})
    status, _, _ = await call(
        gateway, "POST", "/Patient/_search", body=b"_has:Condition:subject:code=B20",
        **{"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 403


async def test_self_exemption_cannot_be_borrowed_by_an_ignored_parameter(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    # A lenient server (the FHIR default) ignores `patient` on a Patient search and answers _has.
    world.override = routes({("GET", "/Patient"): lambda r: c.bundle([c.ANA], world.base_url)})
    status, _, raw = await call(
        gateway, "GET", f"/Patient?patient={c.PAT_BEN}&_has:Condition:subject:code=B20", actor=c.PAT_BEN
    )
    assert status in (200, 403)
    assert b"pat-ana-5581" not in raw


async def test_type_history_of_patients_refused_under_permit_default(fake_fhir: FakeFhir, make_gateway: MakeGateway) -> None:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_out(c.PAT_BEN, "consent-ben-out"))
    fake_fhir.override = routes({("GET", "/Patient/_history"): lambda r: c.history_bundle([c.BEN], fake_fhir.base_url)})
    gw = await make_gateway(
        fake_fhir.base_url, consent={"default_decision": "permit"}, sensitivity={"explicit_consent_required": "none"}
    )
    status, _, raw = await call(gw, "GET", "/Patient/_history")
    assert status == 403
    assert b"Okafor" not in raw


# ---------------------------------------------------------------- metrics


async def test_decision_and_filter_metrics(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.add(c.opt_out(c.PAT_BEN, "consent-ben-out"))
    await get_json(gateway, "/Observation/obs-cbc-58410-ana")
    await get_json(gateway, "/Observation?status=final")
    await call(gateway, "GET", "/Condition/cond-hiv-b20-91a")
    decisions = "consent_gateway_decisions_total"
    assert [gateway.metric(decisions, {"decision": d}) for d in ("permit", "filtered", "deny")] == [1, 1, 1]
    filtered = "consent_gateway_resources_filtered_total"
    assert gateway.metric(filtered, {"resource_type": "Observation", "reason": "sensitivity"}) == 1
    assert gateway.metric(filtered, {"resource_type": "Observation", "reason": "consent"}) == 1
    assert gateway.metric("consent_gateway_consent_cache_entries") == 2


async def test_filter_metric_labels_are_bounded(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    await get_json(gateway, f"/Condition?patient={c.PAT_ANA}")
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.admin_url + "/metrics") as resp:
            text = await resp.text()
    lines = [line for line in text.splitlines() if line.startswith("consent_gateway_resources_filtered_total{")]
    assert lines == ['consent_gateway_resources_filtered_total{reason="sensitivity",resource_type="Condition"} 3.0']
