"""Vendor consents fetched from each platform's API and enforced end to end by the gateway.

The clinical data lives on a fake FHIR upstream; the consents on a fake of the vendor's
API serving the documented shapes (fixtures in tests/vendors/fixtures), paging included.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.sources.conftest import KEY_ENV
from tests.sources.vendor_fakes import SECRET, FakeClinikApi, FakeHealtheIntent, FakeHealthEx
from tests.vendors._fixtures import fixture

LOINC = "http://loinc.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.7418.1"
LOOKUP_ERRORS = "consent_gateway_consent_lookup_errors_total"

Factory = Callable[..., Any]
Setup = Callable[[Any], None]


def observation(rid: str, patient: str, loinc: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": rid, "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "laboratory"}]}],
        "code": {"coding": [{"system": LOINC, "code": loinc}]},
        "subject": {"reference": patient}, "effectiveDateTime": "2024-03-10T08:00:00Z",
    }


def condition(rid: str, patient: str, icd: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition", "id": rid,
        "code": {"coding": [{"system": ICD10CM, "code": icd}]},
        "subject": {"reference": patient}, "onsetDateTime": "2023-11-02",
    }


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def source_log() -> Iterator[Captured]:
    handler = Captured()
    logger = logging.getLogger("gateway")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


async def status_of(gw: GatewayUnderTest, path: str, actor: str, **headers: str) -> int:
    async with await gw.get(path, actor=actor, **headers) as resp:
        await resp.read()
        return resp.status


async def entry_ids(gw: GatewayUnderTest, path: str, actor: str, **headers: str) -> set[str]:
    async with await gw.get(path, actor=actor, **headers) as resp:
        assert resp.status == 200
        bundle = await resp.json(content_type=None)
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] != "OperationOutcome"}


def vendor_settings(kind: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"source_kind": kind, "source_url": url, "source_api_key_env": KEY_ENV, **extra}


# ---------------------------------------------------------------- ClinikAPI

CK_PATIENT = "Patient/pat-100"


@pytest.fixture
def ck_clinical(fake_fhir: FakeFhir) -> FakeFhir:
    fake_fhir.add(
        observation("obs-glu", CK_PATIENT, "2345-7"),   # glucose: the root permit
        observation("obs-hiv", CK_PATIENT, "7917-8"),   # HIV 1+2 antibodies: nested deny
        condition("cond-f32", CK_PATIENT, "F32.9"),     # depression: nested PSY permit
    )
    return fake_fhir


async def test_clinikapi_consents_are_paged_converted_and_enforced(
    ck_clinical: FakeFhir, clinikapi: FakeClinikApi, make_gateway: Factory
) -> None:
    clinikapi.records["pat-100"] = fixture("clinikapi-consents.json")
    clinikapi.page_size = 1
    gw = await make_gateway(ck_clinical.base_url, consent=vendor_settings("clinikapi", clinikapi.base_url))

    assert await status_of(gw, "/Observation/obs-glu", "Practitioner/dr-ada") == 200
    assert await status_of(gw, "/Observation/obs-hiv", "Practitioner/dr-ada") == 403
    assert await status_of(gw, "/Condition/cond-f32", "Practitioner/dr-ada") == 200
    assert await entry_ids(gw, f"/Observation?patient={CK_PATIENT}", "Practitioner/dr-ada") == {"obs-glu"}
    assert await status_of(gw, "/Observation/obs-glu", "Practitioner/dr-bo") == 403
    # The opt-out for the payer (second page) is enforced too.
    assert await status_of(gw, "/Condition/cond-f32", "Organization/org-payer") == 403

    calls = clinikapi.requests_to("/v1/consents")
    assert [c.query for c in calls] == [
        {"patientId": "pat-100", "status": "active", "count": "100"},
        {"patientId": "pat-100", "status": "active", "count": "100", "cursor": "cur_1"},
    ]  # both pages, once: the rest came from the cache
    assert all(c.headers["x-api-key"] == SECRET and "Authorization" not in c.headers for c in calls)


async def test_clinikapi_patient_id_comes_from_an_identifier_read_once(
    ck_clinical: FakeFhir, clinikapi: FakeClinikApi, make_gateway: Factory
) -> None:
    ck_clinical.add({
        "resourceType": "Patient", "id": "pat-100",
        "identifier": [{"system": "http://hospital.example/mrn", "value": "MRN-55"},
                       {"system": MRN_SYSTEM, "value": "pt_abc123"}],
    })
    records = fixture("clinikapi-consents.json")
    for record in records:
        record["patientId"] = "pt_abc123"
    clinikapi.records["pt_abc123"] = records
    gw = await make_gateway(ck_clinical.base_url, consent=vendor_settings(
        "clinikapi", clinikapi.base_url, patient_identifier_system=MRN_SYSTEM, cache_ttl_s=0))

    for _ in range(2):
        assert await status_of(gw, "/Observation/obs-glu", "Practitioner/dr-ada") == 200
    patient_reads = [r for r in ck_clinical.requests if r.path_qs == "/fhir/Patient/pat-100"]
    assert len(patient_reads) == 1
    assert {c.query["patientId"] for c in clinikapi.requests_to("/v1/consents")} == {"pt_abc123"}


async def test_a_patient_without_the_vendor_identifier_fails_closed(
    ck_clinical: FakeFhir, clinikapi: FakeClinikApi, make_gateway: Factory, source_log: Captured
) -> None:
    ck_clinical.add({"resourceType": "Patient", "id": "pat-100",
                     "identifier": [{"system": "http://hospital.example/mrn", "value": "MRN-55"}]})
    gw = await make_gateway(ck_clinical.base_url, consent=vendor_settings(
        "clinikapi", clinikapi.base_url, patient_identifier_system=MRN_SYSTEM, default_decision="permit"))

    assert await status_of(gw, "/Observation/obs-glu", "Practitioner/dr-ada") == 503
    assert gw.metric(LOOKUP_ERRORS) == 1
    assert clinikapi.seen == []
    assert any("no identifier in the configured system" in line for line in source_log.lines)
    assert not any("pat-100" in line or "MRN-55" in line for line in source_log.lines)


# ---------------------------------------------------------------- HealthEx

HX_PATIENT = "Patient/hx-pat-7"


@pytest.fixture
def hx_clinical(fake_fhir: FakeFhir) -> FakeFhir:
    fake_fhir.add(
        {"resourceType": "Patient", "id": "hx-pat-7",
         "identifier": [{"system": MRN_SYSTEM, "value": "MRN-7"}]},
        observation("o-glu", HX_PATIENT, "2345-7"),   # LABS, NORMAL
        observation("o-hiv", HX_PATIENT, "7917-8"),   # LABS, HIV_OR_STI
        condition("c-f32", HX_PATIENT, "F32.9"),      # DIAGNOSES, MENTAL_HEALTH
        condition("c-e11", HX_PATIENT, "E11.9"),      # DIAGNOSES, NORMAL: not consented
    )
    return fake_fhir


async def test_healthex_consents_are_converted_per_scope_and_enforced(
    hx_clinical: FakeFhir, healthex: FakeHealthEx, make_gateway: Factory
) -> None:
    healthex.records["hx-pat-7"] = fixture("healthex-consents.json")[:1]
    gw = await make_gateway(hx_clinical.base_url, consent=vendor_settings("healthex", healthex.base_url))

    doctor = "Practitioner/any-doc"
    assert await status_of(gw, "/Observation/o-glu", doctor) == 200
    assert await status_of(gw, "/Observation/o-hiv", doctor) == 200
    assert await entry_ids(gw, f"/Condition?patient={HX_PATIENT}", doctor) == {"c-f32"}
    assert await status_of(gw, "/Observation/o-glu", doctor, **{"X-Purpose-Of-Use": "HRESCH"}) == 403

    [call] = healthex.seen
    assert call.method == "POST" and call.headers["Authorization"] == SECRET
    assert call.body == {
        "consentTypes": ["DATA_AUTHORIZATION", "PATIENT_DIRECTED_DATA_EXCHANGE", "FUTURE_DATA_USE"],
        "hasConsented": [True, False],
        "includeReason": True,
        "patientId": "hx-pat-7",
    }


async def test_healthex_refusals_are_fetched_and_deny(
    hx_clinical: FakeFhir, healthex: FakeHealthEx, make_gateway: Factory
) -> None:
    """The declined data exchange only arrives because the gateway asks for refusals too."""
    healthex.records["MRN-7"] = fixture("healthex-consents.json")[:1]
    gw = await make_gateway(hx_clinical.base_url, consent=vendor_settings(
        "healthex", healthex.base_url, default_decision="permit",
        patient_identifier_system=MRN_SYSTEM, healthex_patient_field="patientMRN",
        healthex_consent_types=["PATIENT_DIRECTED_DATA_EXCHANGE"]))

    exchange = {"X-Purpose-Of-Use": "PATRQT"}
    assert await status_of(gw, "/Patient/hx-pat-7", "Organization/other-hie", **exchange) == 403
    assert await status_of(gw, "/Observation/o-glu", "Organization/other-hie", **exchange) == 200
    [call] = healthex.seen
    assert call.body["patientMRN"] == "MRN-7" and "patientId" not in call.body
    assert call.body["consentTypes"] == ["PATIENT_DIRECTED_DATA_EXCHANGE"]


# ---------------------------------------------------------------- HealtheIntent

HE_ID = "79b1cd0f-b14c-42ad-8eb7-53616235f5d2"
HE_PATIENT = f"Patient/{HE_ID}"
PERSONNEL = "Practitioner/f181b922-f5fd-401f-abaf-90475eb15f15"
DENIED_ORG = "Organization/0c6a1d55-2f0e-4d7b-8b8e-5d3f2a9e7b10"
CARE_UNIT = "5d8f2a10-7c3e-4b9a-a1d2-6e0f4c8b9a21"
CARE_GROUP = "c93e1f47-2b6a-4d0e-9f58-1a7d3e5c2b64"
PDL_UNIT = "Organization/7582d101-c0bd-45a8-829c-a63f1587ea05"
PDL_GROUP = "f2467686-1bc8-4bcf-a768-2cb3541e437e"


@pytest.fixture
def he_clinical(fake_fhir: FakeFhir) -> FakeFhir:
    fake_fhir.add(observation("o-glu", HE_PATIENT, "2345-7"))
    return fake_fhir


def he_settings(url: str, **extra: Any) -> dict[str, Any]:
    return vendor_settings(
        "healtheintent", url, population_id=FakeHealtheIntent.population,
        emergency_organization_id=CARE_UNIT, emergency_organization_group_id=CARE_GROUP, **extra)


async def test_healtheintent_pages_are_followed_and_enforced(
    he_clinical: FakeFhir, healtheintent: FakeHealtheIntent, make_gateway: Factory
) -> None:
    healtheintent.records[HE_ID] = fixture("healtheintent-consents.json")["items"]
    he_clinical.add({"resourceType": "Group", "id": PDL_GROUP, "type": "practitioner", "actual": True,
                     "member": [{"entity": {"reference": PERSONNEL}}]})
    gw = await make_gateway(he_clinical.base_url, consent=he_settings(healtheintent.base_url))

    # PDL: the person, acting for the care unit, in its group: all three, not any one.
    assert await status_of(gw, "/Observation/o-glu", PERSONNEL, **{"X-Actor-Organization": PDL_UNIT}) == 200
    assert await status_of(gw, "/Observation/o-glu", PERSONNEL, **{"X-Actor-Organization": "Organization/other"}) == 403
    assert await status_of(gw, "/Observation/o-glu", "Practitioner/colleague", **{"X-Actor-Organization": PDL_UNIT}) == 403
    assert await status_of(gw, "/Observation/o-glu", "Practitioner/p-3", **{"X-Actor-Organization": DENIED_ORG}) == 403
    assert await status_of(gw, "/Observation/o-glu", "Practitioner/elsewhere") == 403
    # The 2024 emergency grant (third record, second page) has expired.
    assert await status_of(gw, "/Observation/o-glu", "Practitioner/a0d3c5e7-1b2f-4c6d-8e9a-0f1b2c3d4e5f") == 403

    calls = healtheintent.requests_to("/patient-consents")
    assert calls[0].path == f"/patient-consent/v1/populations/{FakeHealtheIntent.population}/patients/{HE_ID}/patient-consents"
    assert [c.query for c in calls] == [
        {"page[limit]": "100"},
        {"page[limit]": "100", "page[nextLink]": "c1e5a7b2-8d3f-4f60-b9a4-2e6d8c0f1a77_2024-05-01T02:00:00Z"},
    ]
    assert all(c.headers["Authorization"] == SECRET for c in calls)


async def test_healtheintent_break_glass_is_stored_and_opens_for_that_person_only(
    he_clinical: FakeFhir, healtheintent: FakeHealtheIntent, make_gateway: Factory
) -> None:
    healtheintent.records[HE_ID] = fixture("healtheintent-consents.json")["items"][:1]
    gw = await make_gateway(he_clinical.base_url, consent=he_settings(healtheintent.base_url))
    er_doc = "Practitioner/er-doc-17"

    assert await status_of(gw, "/Observation/o-glu", er_doc) == 403
    assert await status_of(gw, "/Observation/o-glu", er_doc, **{"X-Break-Glass": "Patient Unresponsive."}) == 200

    [post] = [c for c in healtheintent.seen if c.method == "POST"]
    assert post.path.endswith(f"/patients/{HE_ID}/patient-consents")
    body = post.body
    assert (body["consentReasonType"], body["provisionType"], body["emergencyConsentReason"]) == (
        "EMERGENCY", "PERMIT", "Patient Unresponsive.")
    assert body["createdBy"] == "er-doc-17"
    assert body["provisionScope"] == {
        "organization": {"id": CARE_UNIT}, "organizationGroup": {"id": CARE_GROUP}, "personnel": {"id": "er-doc-17"},
    }
    assert body["effectivePeriod"]["start"] < body["effectivePeriod"]["end"]

    # The stored window opens later requests of that practitioner without the header ...
    assert await status_of(gw, "/Observation/o-glu", er_doc) == 200
    # ... but not of the care unit or group the record names as its provenance.
    assert await status_of(gw, "/Observation/o-glu", "Practitioner/nurse-4",
                           **{"X-Actor-Organization": f"Organization/{CARE_UNIT}"}) == 403


# ---------------------------------------------------------------- failing closed


def _ck_bad(fake: FakeClinikApi) -> None:
    record = fixture("clinikapi-consents.json")[0]
    record["provision"]["type"] = "allow"  # neither permit nor deny
    fake.records["pat-100"] = [record]


def _ck_other_patient(fake: FakeClinikApi) -> None:
    record = fixture("clinikapi-consents.json")[0]
    record["patientId"] = "pat-999"
    fake.records["pat-100"] = [record]


def _hx_bad(fake: FakeHealthEx) -> None:
    groups = fixture("healthex-consents.json")[:1]
    groups[0]["consents"][0]["consentDataScopes"][0]["sensitivityScope"] = "VIP"
    fake.records["hx-pat-7"] = groups


def _hx_other_patient(fake: FakeHealthEx) -> None:
    groups = fixture("healthex-consents.json")[1:]
    fake.records["hx-pat-7"] = groups  # the answer is about hx-pat-8


def _he_bad(fake: FakeHealtheIntent) -> None:
    items = fixture("healtheintent-consents.json")["items"]
    items[2]["provisionType"] = "MAYBE"
    fake.records[HE_ID] = items


def _he_loop(fake: FakeHealtheIntent) -> None:
    fake.records[HE_ID] = fixture("healtheintent-consents.json")["items"]
    fake.stuck_next_link = True


def _fail(status: int) -> Setup:
    def setup(fake: Any) -> None:
        fake.fail_status = status
    return setup


CASES: dict[str, tuple[str, str, Setup, str]] = {
    # id: (kind, patient, setup, expected log fragment)
    "clinikapi-unknown-provision-type": (
        "clinikapi", CK_PATIENT, _ck_bad, "clinikapi consent ck-consent-1, field provision.type"),
    "clinikapi-other-patient": ("clinikapi", CK_PATIENT, _ck_other_patient, "field patientId"),
    "clinikapi-http-500": ("clinikapi", CK_PATIENT, _fail(500), "clinikapi answered HTTP 500"),
    "healthex-unknown-sensitivity": ("healthex", HX_PATIENT, _hx_bad, "consentDataScopes[0].sensitivityScope"),
    "healthex-other-patient": ("healthex", HX_PATIENT, _hx_other_patient, "field patientId"),
    "healthex-http-401": ("healthex", HX_PATIENT, _fail(401), "healthex answered HTTP 401"),
    "healtheintent-unknown-provision-type": (
        "healtheintent", HE_PATIENT, _he_bad, "healtheintent consent c1e5a7b2-8d3f-4f60-b9a4-2e6d8c0f1a77, field provisionType"),
    "healtheintent-paging-loop": ("healtheintent", HE_PATIENT, _he_loop, "a paging cursor repeated"),
    "healtheintent-http-503": ("healtheintent", HE_PATIENT, _fail(503), "healtheintent answered HTTP 503"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
async def test_a_vendor_answer_the_gateway_cannot_trust_is_a_503_never_a_permit(
    case: str,
    fake_fhir: FakeFhir,
    clinikapi: FakeClinikApi,
    healthex: FakeHealthEx,
    healtheintent: FakeHealtheIntent,
    make_gateway: Factory,
    source_log: Captured,
) -> None:
    kind, patient, setup, logged = CASES[case]
    fake = {"clinikapi": clinikapi, "healthex": healthex, "healtheintent": healtheintent}[kind]
    setup(fake)
    fake_fhir.add(observation("o-glu", patient, "2345-7"))
    extra = {"population_id": FakeHealtheIntent.population, "emergency_organization_id": CARE_UNIT,
             "emergency_organization_group_id": CARE_GROUP} if kind == "healtheintent" else {}
    # With permit as the default, a dropped record would silently become a permit.
    gw = await make_gateway(fake_fhir.base_url, consent=vendor_settings(
        kind, fake.base_url, default_decision="permit", **extra))

    async with await gw.get("/Observation/o-glu", actor="Practitioner/dr-ada") as resp:
        body = await resp.json(content_type=None)
        assert resp.status == 503
        assert resp.headers["Content-Type"].startswith("application/fhir+json")
    assert body["resourceType"] == "OperationOutcome"
    assert gw.metric(LOOKUP_ERRORS) == 1
    assert any(logged in line for line in source_log.lines), source_log.lines
    # The log names records and fields, never values, patients or the credential.
    text = "\n".join(source_log.lines)
    for secret in (SECRET, "allow", "VIP", "MAYBE", patient.split("/")[1]):
        assert secret not in text


async def test_the_credential_never_reaches_the_logs_or_metrics(
    ck_clinical: FakeFhir, clinikapi: FakeClinikApi, make_gateway: Factory, source_log: Captured
) -> None:
    clinikapi.records["pat-100"] = fixture("clinikapi-consents.json")
    gw = await make_gateway(ck_clinical.base_url, consent=vendor_settings("clinikapi", clinikapi.base_url))
    assert await status_of(gw, "/Observation/obs-glu", "Practitioner/dr-ada") == 200
    async with gw.session.get(gw.admin_url + "/metrics") as resp:
        metrics = await resp.text()
    assert SECRET not in metrics and SECRET not in "\n".join(source_log.lines)
    assert all(r.headers.get("x-api-key") is None for r in ck_clinical.requests)  # not sent to the FHIR server


async def test_clinikapi_group_actors_match_the_fhir_servers_group_members(
    ck_clinical: FakeFhir, clinikapi: FakeClinikApi, make_gateway: Factory
) -> None:
    record = fixture("clinikapi-consents.json")[0]
    record["provision"]["actor"] = [{"role": "PRCP", "reference": "Group/cardiology-team"}]
    clinikapi.records["pat-100"] = [record]

    async def groups(request: web.Request) -> web.StreamResponse | None:
        if request.path != "/fhir/Group":
            return None
        members = [{"resourceType": "Group", "id": "cardiology-team", "type": "practitioner", "actual": True}]
        found = members if request.query.get("member") == "Practitioner/dr-lee" else []
        return web.json_response(ck_clinical.bundle(found, str(request.url)))

    ck_clinical.override = groups
    gw = await make_gateway(ck_clinical.base_url, consent=vendor_settings("clinikapi", clinikapi.base_url))
    assert await status_of(gw, "/Observation/obs-glu", "Practitioner/dr-lee") == 200
    assert await status_of(gw, "/Observation/obs-glu", "Practitioner/dr-ada") == 403


async def test_healtheintent_emergency_record_without_personnel_is_audited_for_the_unit(
    he_clinical: FakeFhir, healtheintent: FakeHealtheIntent, make_gateway: Factory
) -> None:
    now = datetime.now(timezone.utc)
    record = fixture("healtheintent-consents.json")["items"][2]
    record["provisionScope"]["personnel"] = {}
    record["effectivePeriod"] = {"start": (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                 "end": (now + timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ")}
    healtheintent.records[HE_ID] = [record]
    he_clinical.add({"resourceType": "Group", "id": PDL_GROUP, "type": "practitioner", "actual": True,
                     "member": [{"entity": {"reference": "Practitioner/nurse-4"}}]})
    gw = await make_gateway(he_clinical.base_url, consent=he_settings(healtheintent.base_url))

    assert await status_of(gw, "/Observation/o-glu", "Practitioner/nurse-4", **{"X-Actor-Organization": PDL_UNIT}) == 200
    # Emergency access through the unit's window is audited like a break-glass.
    lines = [json.loads(line) for line in Path(gw.state.settings.audit.path).read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["resourceType"] == "AuditEvent"
    # Outside the unit (or outside its group) the window does not open.
    assert await status_of(gw, "/Observation/o-glu", "Practitioner/nurse-4", **{"X-Actor-Organization": "Organization/x"}) == 403


async def test_clinikapi_document_confidentiality_labels_the_documents_served(
    ck_clinical: FakeFhir, clinikapi: FakeClinikApi, make_gateway: Factory
) -> None:
    # A general permit for dr-ada: restricted documents need a consent naming their label.
    clinikapi.records["pat-100"] = [{
        "id": "ck-general", "patientId": "pat-100", "scope": "patient-privacy", "category": "59284-0",
        "status": "active", "policyRule": "OPTIN",
        "provision": {"type": "permit", "actor": [{"role": "PRCP", "reference": "Practitioner/dr-ada"}]},
    }]
    documents = fixture("clinikapi-documents.json")
    clinikapi.documents["pat-100"] = documents
    # The FHIR server holds the documents as Compositions with no confidentiality of their own.
    for doc in documents:
        if doc.get("id"):
            ck_clinical.add({"resourceType": "Composition", "id": doc["id"], "status": "final",
                             "type": {"text": doc["type"]}, "subject": {"reference": CK_PATIENT},
                             "date": "2024-03-01", "author": [{"reference": "Practitioner/dr-ada"}],
                             "title": doc["title"]})
    ck_clinical.add({"resourceType": "Composition", "id": "ck-doc-plain", "status": "final",
                     "type": {"text": "care-plan"}, "subject": {"reference": CK_PATIENT},
                     "date": "2024-03-01", "author": [{"reference": "Practitioner/dr-ada"}], "title": "Plan"})
    gw = await make_gateway(ck_clinical.base_url, consent=vendor_settings("clinikapi", clinikapi.base_url))

    # ck-doc-1 is R at ClinikAPI: the general permit does not open it; a plain document opens.
    assert await status_of(gw, "/Composition/ck-doc-1", "Practitioner/dr-ada") == 403
    assert await status_of(gw, "/Composition/ck-doc-plain", "Practitioner/dr-ada") == 200
    assert clinikapi.requests_to("/v1/documents")[0].query == {"patientId": "pat-100", "count": "100"}


async def test_clinikapi_documents_that_cannot_be_read_fail_closed(
    ck_clinical: FakeFhir, clinikapi: FakeClinikApi, make_gateway: Factory
) -> None:
    clinikapi.records["pat-100"] = fixture("clinikapi-consents.json")
    clinikapi.documents["pat-100"] = [{"id": "bad", "patientId": "pat-100", "confidentiality": "X"}]
    gw = await make_gateway(ck_clinical.base_url, consent=vendor_settings("clinikapi", clinikapi.base_url))
    assert await status_of(gw, "/Observation/obs-glu", "Practitioner/dr-ada") == 503
