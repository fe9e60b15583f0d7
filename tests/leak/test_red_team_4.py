"""Red team, fourth pass: the fixes of the third (escaped meta and display keys, unknown
resource types, escaped upstream URLs), decisions shared across requests under consent
versions, the label memo, and single resources spliced back after DS4P labelling.

Every test goes through the real request path (HTTP to the gateway, the fake FHIR server on a
real socket answering raw bytes) and searches the RAW response bytes and headers. The leak
conftest runs each test twice: answers parsed whole, and decided on views
(``upstream.views_above_bytes: 0``). Every door here held or was closed: upstream URLs
spelled with \\u escapes, displays of references that are not ``Type/id``, codes and labels in
shapes FHIR does not allow, Binaries with an unreadable securityContext, lookups begun before an
invalidation, resource types that are not strings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from gateway.core.fhir import R4_RESOURCE_TYPES
from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir, _refers
from tests.fixtures import clinical as c
from tests.leak.test_red_team_3 import (
    HIV_DISPLAY, HIV_SECRETS, answer, consent, hiv_condition, observation, search, searchset, serve,
    sleep_past, soon,
)
from tests.sources.conftest import clinikapi, vendor_key  # noqa: F401 (fixtures)
from tests.workers.test_workers import launch  # noqa: F401 (fixture)
from tests.leak.test_side_doors import call, entries, fhir, forged_emergency, ids_in, leaks

MakeGateway = Callable[..., Awaitable[GatewayUnderTest]]
HIV_ID = c.HIV_CONDITION["id"]
CONDITIONS = f"/Condition?patient={c.PAT_ANA}"


@pytest.fixture
def ben_opens_hiv(fake_fhir: FakeFhir) -> FakeFhir:
    """Ben's consent opens his HIV records (so they are released, DS4P-labelled); Ana's does not."""
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), c.opt_in(c.PAT_BEN, "consent-ben-in", labels=("HIV",)))
    return fake_fhir


def serving(fake: FakeFhir, path: str) -> list[bytes]:
    """``GET path`` answered with whatever bytes the returned one-slot list holds at the time."""
    slot = [b""]
    serve(fake, {("GET", path): lambda r: answer(slot[0])})
    return slot


async def kept(gw: GatewayUnderTest, path: str = CONDITIONS, actor: str = c.DOCTOR, **headers: str) -> set[str]:
    status, _, body = await search(gw, path, actor=actor, **headers)
    assert status in (200, 403), body
    return ids_in(body) if status == 200 else set()


# ================================================================ 1. upstream URLs spelled with \u escapes


def _u_escaped(url: str) -> bytes:
    """``url`` with every slash written ``\\u002f`` (the same JSON string)."""
    return url.replace("/", "\\u002f").encode()


async def test_upstream_urls_written_with_unicode_escapes_are_rewritten(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """A next link the client follows must lead back to the gateway, whatever escapes the upstream
    used: ``\\u002f`` is ``/`` to every JSON reader."""
    bundle = searchset([c.ANA_CBC], world.base_url)
    bundle["link"].append({"relation": "next", "url": f"{world.base_url}/Observation?patient={c.PAT_ANA}&page=2"})
    raw = orjson.dumps(bundle).replace(world.base_url.encode(), _u_escaped(world.base_url))
    assert world.base_url.encode() not in raw
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 200, body
    parsed = orjson.loads(body)
    upstream_host = world.base_url.split("//", 1)[1].split("/", 1)[0]
    urls = [link["url"] for link in parsed["link"]] + [e["fullUrl"] for e in parsed["entry"]]
    assert all(url.startswith(gw.url) for url in urls), urls
    assert upstream_host not in repr(parsed)


async def test_upstream_urls_with_unicode_escapes_in_a_filtered_answer(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """The same ``\\u002f`` spelling in an answer something is withheld from: kept entries are
    spliced from the upstream's bytes on both paths."""
    raw = orjson.dumps(searchset([c.ANA_CBC, c.HIV_CONDITION], world.base_url))
    raw = raw.replace(b'"fullUrl":"' + world.base_url.encode(), b'"fullUrl":"' + _u_escaped(world.base_url))
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 200 and ids_in(body) == {c.ANA_CBC["id"]}, body
    assert [e["fullUrl"] for e in entries(body) if "fullUrl" in e or e.get("search", {}).get("mode") != "outcome"] == [f"{gw.url}/Observation/{c.ANA_CBC['id']}"]


# ================================================================ 2. displays of references the scrubber cannot place


@pytest.mark.parametrize("reference", [
    "Condition?identifier=http://hospital.example/conditions|cond-hiv-b20-91a",
    "condition/cond-hiv-b20-91a",
])
async def test_display_of_a_reference_that_is_not_type_and_id_is_scrubbed(
    world: FakeFhir, make_gateway: MakeGateway, reference: str,
) -> None:
    """A kept result names the withheld HIV condition in a form the scrubber does not resolve."""
    naming = observation("obs-cbc-names-hiv-2", hasMember=[{"reference": reference, "display": HIV_DISPLAY}])
    raw = orjson.dumps(searchset([c.HIV_CONDITION, naming, c.ANA_CBC], world.base_url))
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 200, body
    assert ids_in(body) == {c.ANA_CBC["id"], "obs-cbc-names-hiv-2"}
    assert leaks(body, headers, (HIV_DISPLAY, "immunodeficiency")) == []


async def test_display_naming_a_hidden_record_in_a_single_resource_read_is_scrubbed(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """A read (not a Bundle) of a kept result whose member reference names the hidden HIV
    condition, spelled with a \\u escape in the reference and a plain display key."""
    naming = observation("obs-cbc-names-hiv-3", hasMember=[{"reference": "REF", "display": HIV_DISPLAY}])
    raw = orjson.dumps(naming).replace(b'"REF"', b'"Condition\\u002fcond-hiv-b20-91a"')
    serve(world, {("GET", "/Observation/obs-cbc-names-hiv-3"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, "/Observation/obs-cbc-names-hiv-3")
    assert status == 200, body
    assert leaks(body, headers, (HIV_DISPLAY,)) == []
    assert orjson.loads(body)["hasMember"] == [{"reference": "Condition/cond-hiv-b20-91a"}]


# ================================================================ 3. resource types: unknown, missing, odd


@pytest.mark.parametrize("rtype", ["R4", "missing"])
async def test_a_read_answered_without_a_known_type_is_not_passed(
    world: FakeFhir, make_gateway: MakeGateway, rtype: str,
) -> None:
    """A read answered with Ana's HIV condition under no type, or a type no R4 table knows."""
    hidden = dict(c.HIV_CONDITION)
    if rtype == "missing":
        del hidden["resourceType"]
    else:
        hidden["resourceType"] = "ConditionR5"
    serve(world, {("GET", f"/Condition/{HIV_ID}"): lambda r: answer(orjson.dumps(hidden))})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, f"/Condition/{HIV_ID}")
    assert status in (403, 404, 502), body
    assert leaks(body, headers, HIV_SECRETS) == []


ODD_TYPES = ("condition", "Condition ", "", None, 7, "Condition/x")


async def test_everything_with_odd_types_withholds_them_and_keeps_the_rest(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """``$everything`` whose entries carry Ana's HIV condition under odd types: each withheld,
    her ordinary records and the (non-patient) practitioner kept."""
    odd = []
    for i, rtype in enumerate(ODD_TYPES):
        record = {**c.HIV_CONDITION, "id": f"cond-odd-{i}", "resourceType": rtype}
        odd.append({"fullUrl": f"{world.base_url}/Condition/cond-odd-{i}", "resource": record,
                    "search": {"mode": "match"}})
    odd.append({"fullUrl": "x", "resource": {k: v for k, v in c.HIV_CONDITION.items() if k != "resourceType"},
                "search": {"mode": "match"}})
    bundle = searchset([c.ANA_CBC, c.ANA_HYPERTENSION, c.PRACTITIONER], world.base_url)
    bundle["entry"] = odd + bundle["entry"]
    raw = orjson.dumps(bundle)
    serve(world, {("GET", f"/Patient/{c.PAT_ANA.split('/')[1]}/$everything"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, f"/{c.PAT_ANA}/$everything")
    assert status in (200, 502), body
    if status == 200:
        assert ids_in(body) == {c.ANA_CBC["id"], c.ANA_HYPERTENSION["id"], c.PRACTITIONER["id"]}
    assert leaks(body, headers, HIV_SECRETS) == [], body[:400]


async def test_break_glass_returning_an_unknown_type_audits_it(
    world: FakeFhir, make_gateway: MakeGateway, tmp_path: Any,
) -> None:
    """Break-glass opens what consent denies, unknown types included; each such resource is
    returned only with an audit id, and the audit names it."""
    unknown = {**c.HIV_CONDITION, "id": "cond-r5-bg-1", "resourceType": "ConditionR5"}
    raw = orjson.dumps(searchset([c.ANA_HYPERTENSION, unknown], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url, break_glass={"record_consent": False})
    status, headers, body = await search(gw, CONDITIONS, **{"X-Break-Glass": "Medical emergency"})
    assert status == 200 and "cond-r5-bg-1" in ids_in(body), body[:300]
    assert headers.get("X-Break-Glass-Audit-Id"), headers
    audit = (tmp_path / "audit.jsonl").read_bytes()
    assert b"cond-r5-bg-1" in audit, audit[-600:]
    # and without the header it stays closed
    status, headers, body = await search(gw, CONDITIONS)
    assert "cond-r5-bg-1" not in ids_in(body) and "X-Break-Glass-Audit-Id" not in headers


async def test_parameters_answer_holding_a_hidden_record_is_decided(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """An operation answering Parameters whose parts carry Ana's HIV condition (typed, and
    untyped) beside her ordinary record: the hidden ones do not reach the client."""
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "result", "resource": c.ANA_HYPERTENSION},
        {"name": "result", "part": [{"name": "item", "resource": c.HIV_CONDITION}]},
        {"name": "result", "resource": {k: v for k, v in c.HIV_CONDITION.items() if k != "resourceType"}},
    ]}
    serve(world, {("GET", "/Condition/$summarize"): lambda r: fhir(params)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, f"/Condition/$summarize?patient={c.PAT_ANA}")
    assert status in (200, 403, 502), body
    assert leaks(body, headers, HIV_SECRETS) == [], body[:400]


@pytest.mark.parametrize("where", ["entry-list", "entry-object", "contained-list"])
async def test_a_resource_type_that_is_not_a_string_is_a_502(
    world: FakeFhir, make_gateway: MakeGateway, where: str,
) -> None:
    if where == "contained-list":
        odd = {**c.ANA_CBC, "id": "obs-odd-contained", "contained": [{**c.HIV_CONDITION, "resourceType": ["Condition"]}]}
    else:
        odd = {**c.HIV_CONDITION, "resourceType": ["Condition"] if where == "entry-list" else {"name": "Condition"}}
    raw = orjson.dumps(searchset([c.ANA_HYPERTENSION, odd], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, CONDITIONS)
    assert leaks(body, headers, HIV_SECRETS) == []
    assert status == 502, body


# Elements written in a shape FHIR does not allow (a coding that is an object, not an array; a
# code that is a list; contained resources as one object; a security label as a bare string):
# whatever reads them as FHIR cannot decide them, so they must not pass as undecided.
MALFORMED: dict[str, dict[str, Any]] = {
    "coding-object": {"code": {"coding": {"system": c.ICD10CM, "code": "B20"}}},
    "code-list": {"code": {"coding": [{"system": c.ICD10CM, "code": ["B20"]}]}},
    "category-object": {"category": {"coding": [{"system": c.ICD10CM, "code": "B20"}]}},
    "value-coding-object": {"valueCodeableConcept": {"coding": {"system": c.ICD10CM, "code": "B20"}}},
    "contained-object": {"contained": {**c.HIV_CONDITION, "id": "hiv-inside"}},
    "security-string": {"meta": {"security": "R"}},
}


@pytest.mark.parametrize("shape", list(MALFORMED))
async def test_sensitive_codes_in_malformed_shapes_do_not_pass_undecided(
    world: FakeFhir, make_gateway: MakeGateway, shape: str,
) -> None:
    record = {**c.ANA_CBC, "id": "obs-malformed-1", "note": [{"text": "Restricted: HIV confirmed"}], **MALFORMED[shape]}
    raw = orjson.dumps(searchset([c.ANA_HYPERTENSION, record], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw),
                  ("GET", "/Observation/obs-malformed-1"): lambda r: answer(orjson.dumps(record))})
    gw = await make_gateway(world.base_url)
    for path in (CONDITIONS, "/Observation/obs-malformed-1"):
        status, headers, body = await search(gw, path)
        assert status in (200, 403, 502), body
        assert leaks(body, headers, ("B20", "HIV confirmed", "obs-malformed-1")) == [], (path, body[:300])


@pytest.mark.parametrize("context", ["null", "empty", "list", "string", "reference-list"])
async def test_a_binary_with_a_malformed_security_context_is_not_released(
    world: FakeFhir, make_gateway: MakeGateway, context: str,
) -> None:
    from tests.leak.test_side_doors import HIDDEN_BINARY
    proper: Any = HIDDEN_BINARY["securityContext"]
    shaped: Any = {"null": None, "empty": {}, "list": [proper], "string": proper["reference"],
                   "reference-list": {"reference": [proper["reference"]]}}[context]
    binary = {**HIDDEN_BINARY, "securityContext": shaped}
    world.add(binary)
    raw = orjson.dumps(searchset([binary], world.base_url))
    serve(world, {("GET", "/Binary"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    for path in (f"/Binary/{binary['id']}", f"/Binary?_id={binary['id']}"):
        status, headers, body = await search(gw, path)
        assert leaks(body, headers, (str(HIDDEN_BINARY["data"]),)) == [], (path, status)


def test_the_r4_type_table_knows_every_r4_resource_type() -> None:
    """Unknown types close: a real R4 type missing from the table would close legitimate data.
    The 146 resource types of FHIR R4 (4.0.1), from hl7.org/fhir/R4/resourcelist.html."""
    r4 = {
        "Account", "ActivityDefinition", "AdverseEvent", "AllergyIntolerance", "Appointment", "AppointmentResponse",
        "AuditEvent", "Basic", "Binary", "BiologicallyDerivedProduct", "BodyStructure", "Bundle",
        "CapabilityStatement", "CarePlan", "CareTeam", "CatalogEntry", "ChargeItem", "ChargeItemDefinition", "Claim",
        "ClaimResponse", "ClinicalImpression", "CodeSystem", "Communication", "CommunicationRequest",
        "CompartmentDefinition", "Composition", "ConceptMap", "Condition", "Consent", "Contract", "Coverage",
        "CoverageEligibilityRequest", "CoverageEligibilityResponse", "DetectedIssue", "Device", "DeviceDefinition",
        "DeviceMetric", "DeviceRequest", "DeviceUseStatement", "DiagnosticReport", "DocumentManifest",
        "DocumentReference", "EffectEvidenceSynthesis", "Encounter", "Endpoint", "EnrollmentRequest",
        "EnrollmentResponse", "EpisodeOfCare", "EventDefinition", "Evidence", "EvidenceVariable",
        "ExampleScenario", "ExplanationOfBenefit", "FamilyMemberHistory", "Flag", "Goal", "GraphDefinition",
        "Group", "GuidanceResponse", "HealthcareService", "ImagingStudy", "Immunization", "ImmunizationEvaluation",
        "ImmunizationRecommendation", "ImplementationGuide", "InsurancePlan", "Invoice", "Library", "Linkage",
        "List", "Location", "Measure", "MeasureReport", "Media", "Medication", "MedicationAdministration",
        "MedicationDispense", "MedicationKnowledge", "MedicationRequest", "MedicationStatement",
        "MedicinalProduct", "MedicinalProductAuthorization", "MedicinalProductContraindication",
        "MedicinalProductIndication", "MedicinalProductIngredient", "MedicinalProductInteraction",
        "MedicinalProductManufactured", "MedicinalProductPackaged", "MedicinalProductPharmaceutical",
        "MedicinalProductUndesirableEffect", "MessageDefinition", "MessageHeader", "MolecularSequence",
        "NamingSystem", "NutritionOrder", "Observation", "ObservationDefinition", "OperationDefinition",
        "OperationOutcome", "Organization", "OrganizationAffiliation", "Parameters", "Patient", "PaymentNotice",
        "PaymentReconciliation", "Person", "PlanDefinition", "Practitioner", "PractitionerRole", "Procedure",
        "Provenance", "Questionnaire", "QuestionnaireResponse", "RelatedPerson", "RequestGroup", "ResearchDefinition",
        "ResearchElementDefinition", "ResearchStudy", "ResearchSubject", "RiskAssessment", "RiskEvidenceSynthesis",
        "Schedule", "SearchParameter", "ServiceRequest", "Slot", "Specimen", "SpecimenDefinition",
        "StructureDefinition", "StructureMap", "Subscription", "Substance", "SubstanceNucleicAcid",
        "SubstancePolymer", "SubstanceProtein", "SubstanceReferenceInformation", "SubstanceSourceMaterial",
        "SubstanceSpecification", "SupplyDelivery", "SupplyRequest", "Task", "TerminologyCapabilities",
        "TestReport", "TestScript", "ValueSet", "VerificationResult", "VisionPrescription",
    }
    assert sorted(r4 - R4_RESOURCE_TYPES) == []


# ================================================================ 4. decisions shared across requests


def _snapshot_then_wait(fake: FakeFhir, seconds: float) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Consent searches answered from the consents as they are when asked, ``seconds`` later
    (a slow consent server: what it read is already old when it answers)."""

    async def consents(request: web.Request) -> web.Response:
        wanted = (request.query.get("patient") or "").split(",")
        found = [r for key, r in list(fake.resources.items())
                 if key.startswith("Consent/") and any(_refers(r, p) for p in wanted if p)]
        snapshot = orjson.dumps(fake.bundle(found, f"{fake.base_url}/Consent?{request.query_string}"))
        await asyncio.sleep(seconds)
        return web.Response(body=snapshot, content_type="application/fhir+json")

    return consents


async def test_a_request_after_an_invalidation_is_not_decided_on_a_lookup_begun_before_it(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Ana opts out while her consents are being looked up for another request: the invalidation
    is acknowledged, then a new request must not be decided on what was read before it."""
    serve(world, {("GET", "/Consent"): _snapshot_then_wait(world, 0.8)})
    gw = await make_gateway(world.base_url)
    path = f"/Observation?patient={c.PAT_ANA}"
    first = asyncio.create_task(search(gw, path))
    await asyncio.sleep(0.3)  # the lookup has read Ana's opt-in and is on its way back
    world.add(c.opt_out(c.PAT_ANA, "consent-optin"))
    async with gw.session.post(gw.admin_url + "/cache/invalidate", json={"patient": c.PAT_ANA}) as resp:
        assert resp.status == 200
    status, headers, body = await search(gw, path)
    await first
    assert status in (200, 403), body
    if status == 200:
        assert ids_in(body) == set()
    assert leaks(body, headers, (c.ANA_CBC["id"], "58410-2")) == []


async def test_a_consent_written_through_the_gateway_during_a_lookup_is_not_undone_by_it(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """The same race through the front door: Ana's opt-out is written through the gateway while
    her consents are being looked up for another request; the next request sees the opt-out."""
    serve(world, {("GET", "/Consent"): _snapshot_then_wait(world, 0.8)})
    gw = await make_gateway(world.base_url)
    path = f"/Observation?patient={c.PAT_ANA}"
    first = asyncio.create_task(search(gw, path))
    await asyncio.sleep(0.3)
    status, _, body = await call(gw, "PUT", "/Consent/consent-optin", actor=c.PAT_ANA,
                                 body=c.opt_out(c.PAT_ANA, "consent-optin"))
    assert status in (200, 201), body
    status, headers, body = await search(gw, path)
    await first
    assert leaks(body, headers, (c.ANA_CBC["id"], "58410-2")) == []


async def test_a_care_team_membership_that_ends_is_not_served_from_a_shared_decision(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Ana permits only her care team; the doctor leaves it. Once memberships refresh
    (``cache_ttl_s``), decisions made while he was a member are not reused."""
    c.seed_all(fake_fhir)
    fake_fhir.add(consent("consent-careteam", c.PAT_ANA, {"type": "permit", "actor": [{
        "role": c.concept("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "PRCP", "recipient"),
        "reference": {"reference": "CareTeam/ct-ana-1"}}]}))
    team = {"resourceType": "CareTeam", "id": "ct-ana-1", "status": "active", "subject": {"reference": c.PAT_ANA},
            "participant": [{"member": {"reference": c.DOCTOR}}]}
    fake_fhir.add(team)

    def care_teams(request: web.Request) -> Any:  # CareTeam?participant=<actor>, as a server reads it
        who = request.query.get("participant")
        found = [r for k, r in list(fake_fhir.resources.items()) if k.startswith("CareTeam/")
                 and any((p.get("member") or {}).get("reference") == who for p in r.get("participant", []))]
        return fake_fhir.bundle(found, f"{fake_fhir.base_url}/CareTeam")

    serve(fake_fhir, {("GET", "/CareTeam"): care_teams})
    gw = await make_gateway(fake_fhir.base_url, consent={"cache_ttl_s": 0.5})
    path = f"/Observation?patient={c.PAT_ANA}"
    assert await kept(gw, path) == {c.ANA_CBC["id"]}
    assert await kept(gw, path) == {c.ANA_CBC["id"]}
    assert await kept(gw, path, actor=c.PSYCHIATRIST) == set()  # not a member
    del fake_fhir.resources["CareTeam/ct-ana-1"]
    await asyncio.sleep(0.8)
    assert await kept(gw, path) == set()
    # and a member again: open again
    fake_fhir.add(team)
    await asyncio.sleep(0.8)
    assert await kept(gw, path) == {c.ANA_CBC["id"]}


async def test_an_emergency_window_that_closes_is_not_served_from_a_shared_decision(
    world: FakeFhir, make_gateway: MakeGateway, tmp_path: Any,
) -> None:
    """An open emergency window lets the doctor read Ana's HIV condition (audited, each time);
    once its period ends, the shared base decision (deny) stands again: withheld, no audit."""
    end, end_text = soon(1.5)
    window = forged_emergency("consent-emergency-window-1")
    window["provision"]["period"] = {"start": "2020-01-01T00:00:00Z", "end": end_text}
    world.add(window)
    gw = await make_gateway(world.base_url)
    for _ in range(2):
        status, headers, body = await search(gw, CONDITIONS)
        assert status == 200 and HIV_ID in ids_in(body), body[:300]
        assert headers.get("X-Break-Glass-Audit-Id"), headers
    await sleep_past(end)
    status, headers, body = await search(gw, CONDITIONS)
    assert status == 200, body
    assert ids_in(body) == {c.ANA_HYPERTENSION["id"]}
    assert "X-Break-Glass-Audit-Id" not in headers
    assert leaks(body, headers, HIV_SECRETS) == []


async def test_a_shared_decision_does_not_outlive_a_window_opened_later(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """A deny decided and shared before a window opens; the window opens (consent written
    upstream, cache invalidated): the record is returned only with an audit id."""
    gw = await make_gateway(world.base_url)
    assert await kept(gw) == {c.ANA_HYPERTENSION["id"]}
    world.add(forged_emergency("consent-emergency-window-2"))
    async with gw.session.post(gw.admin_url + "/cache/invalidate", json={"patient": c.PAT_ANA}) as resp:
        assert resp.status == 200
    for _ in range(2):
        status, headers, body = await search(gw, CONDITIONS)
        assert status == 200 and HIV_ID in ids_in(body), body[:300]
        assert headers.get("X-Break-Glass-Audit-Id"), headers
    # another purpose does not open the window, and its decision is its own
    status, headers, body = await search(gw, CONDITIONS, **{"X-Purpose-Of-Use": "HPAYMT"})
    assert leaks(body, headers, HIV_SECRETS) == [] and "X-Break-Glass-Audit-Id" not in headers


async def test_an_emergency_window_opened_through_one_worker_is_audited_by_every_worker(
    world: FakeFhir, launch: Any,
) -> None:
    """``listen.workers: 2``, real processes, each with its own decision cache: both decide Ana's
    conditions (HIV withheld) and remember it; the doctor breaks the glass through one of them
    (the emergency consent is written upstream and the eviction fans out). From then on every
    answer either worker gives without the header that holds the HIV condition carries an audit
    id, and none holds it for another clinician."""
    import aiohttp

    gw = await launch(world.base_url)
    url = gw.url + CONDITIONS

    async def fresh(headers: dict[str, str], times: int = 16) -> list[tuple[int, dict[str, str], bytes]]:
        found = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for _ in range(times):
                async with session.get(url, headers=headers) as resp:
                    found.append((resp.status, dict(resp.headers), await resp.read()))
        return found

    before = await fresh({"X-Actor": c.DOCTOR})
    assert all(status == 200 and HIV_ID not in ids_in(body) for status, _, body in before)
    assert sorted(gw.answered_by()) == [0, 1]  # both workers hold the shared deny
    (status, headers, body), = await fresh({"X-Actor": c.DOCTOR, "X-Break-Glass": "Medical emergency"}, 1)
    assert status == 200 and HIV_ID in ids_in(body) and headers.get("X-Break-Glass-Audit-Id"), headers
    await asyncio.sleep(0.3)
    seen = gw.answered_by()
    after = await fresh({"X-Actor": c.DOCTOR})
    assert all(gw.answered_by()[w] > seen[w] for w in (0, 1))
    for status, headers, body in after:
        assert status == 200, body
        if HIV_ID in ids_in(body):
            assert headers.get("X-Break-Glass-Audit-Id"), headers
    assert any(HIV_ID in ids_in(body) for _, _, body in after)  # the window is open somewhere
    for status, headers, body in await fresh({"X-Actor": c.PSYCHIATRIST}, 8):
        assert leaks(body, headers, HIV_SECRETS) == [] and "X-Break-Glass-Audit-Id" not in headers


def _dated(rid: str, onset: str | None, recorded: str | None = None) -> dict[str, Any]:
    record = {**c.ANA_HYPERTENSION, "id": rid}
    record.pop("onsetDateTime", None)
    if onset:
        record["onsetDateTime"] = onset
    if recorded:
        record["recordedDate"] = recorded
    return record


async def test_records_differing_only_by_clinical_date_get_their_own_decisions(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """A consent denying what was recorded in 2023: three hypertension records alike but for
    their dates (onset, or only a recorded date); only the 2023 ones are withheld, in this
    answer and the next (the decision shared across requests keys on the date)."""
    c.seed_all(fake_fhir)
    fake_fhir.add(consent("consent-no-2023", c.PAT_ANA, {"type": "permit", "provision": [{
        "type": "deny", "dataPeriod": {"start": "2023-01-01", "end": "2023-12-31"}}]}))
    records = [_dated("cond-htn-2023-onset", "2023-06-01"), _dated("cond-htn-2024-onset", "2024-06-01"),
               _dated("cond-htn-2023-recorded", None, "2023-06-02"), _dated("cond-htn-2022-recorded", None, "2022-06-02")]
    raw = orjson.dumps(searchset(records, fake_fhir.base_url))
    serve(fake_fhir, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(fake_fhir.base_url)
    for _ in range(2):
        assert await kept(gw) == {"cond-htn-2024-onset", "cond-htn-2022-recorded"}


async def test_twins_differing_only_by_their_own_label_get_their_own_decisions(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Two records byte-identical but for their id, one restricted by its own meta.security:
    the restricted one withheld, the other kept, whichever is decided first, across requests."""
    plain = observation("obs-twin-plain")
    sealed = observation("obs-twin-sealed", meta={"security": [{"system": c.V3_CONFIDENTIALITY, "code": "R"}]})
    served = serving(world, "/Observation")
    gw = await make_gateway(world.base_url)
    for order in ([plain, sealed], [sealed, plain], [plain, sealed]):
        served[0] = orjson.dumps(searchset(order, world.base_url))
        assert await kept(gw, f"/Observation?patient={c.PAT_ANA}") == {"obs-twin-plain"}


CK_PATIENT = "Patient/pat-100"


def _ck_document(rid: str, confidentiality: str) -> dict[str, Any]:
    return {"id": rid, "status": "final", "type": "discharge-summary", "patientId": "pat-100",
            "practitionerId": "dr-ada", "title": "Discharge summary", "confidentiality": confidentiality,
            "sections": [{"title": "Course", "code": "8648-8", "text": "Uneventful."}]}


def _composition(rid: str) -> dict[str, Any]:
    """The FHIR server's copy of a ClinikAPI document: no confidentiality of its own."""
    return {"resourceType": "Composition", "id": rid, "status": "final", "type": {"text": "discharge-summary"},
            "subject": {"reference": CK_PATIENT}, "date": "2024-03-01",
            "author": [{"reference": "Practitioner/dr-ada"}], "title": "Discharge summary"}


async def test_clinikapi_document_labels_are_part_of_the_shared_decision(
    fake_fhir: FakeFhir, clinikapi: Any, vendor_key: None, make_gateway: MakeGateway,
) -> None:
    """Two Compositions byte-identical but for their id; ClinikAPI says one is R (restricted):
    that one withheld, its twin kept, in either order and across requests. When ClinikAPI
    restricts the twin too (and the cache is invalidated), the permit decided for it before is
    not reused."""
    from tests.sources.test_vendor_sources import vendor_settings
    clinikapi.records["pat-100"] = [{
        "id": "ck-general", "patientId": "pat-100", "scope": "patient-privacy", "category": "59284-0",
        "status": "active", "policyRule": "OPTIN",
        "provision": {"type": "permit", "actor": [{"role": "PRCP", "reference": "Practitioner/dr-ada"}]},
    }]
    clinikapi.documents["pat-100"] = [_ck_document("ck-doc-r", "R"), _ck_document("ck-doc-n", "N")]
    fake_fhir.add(_composition("ck-doc-r"), _composition("ck-doc-n"))
    gw = await make_gateway(fake_fhir.base_url, consent=vendor_settings("clinikapi", clinikapi.base_url))
    path = f"/Composition?patient={CK_PATIENT}"
    served = serving(fake_fhir, "/Composition")
    for order in (("ck-doc-n", "ck-doc-r"), ("ck-doc-r", "ck-doc-n"), ("ck-doc-n", "ck-doc-r")):
        served[0] = orjson.dumps(searchset([_composition(rid) for rid in order], fake_fhir.base_url))
        assert await kept(gw, path, actor="Practitioner/dr-ada") == {"ck-doc-n"}, order
    clinikapi.documents["pat-100"] = [_ck_document("ck-doc-r", "R"), _ck_document("ck-doc-n", "R")]
    async with gw.session.post(gw.admin_url + "/cache/invalidate", json={"patient": CK_PATIENT}) as resp:
        assert resp.status == 200
    assert await kept(gw, path, actor="Practitioner/dr-ada") == set()
    status, headers, body = await search(gw, "/Composition/ck-doc-n", actor="Practitioner/dr-ada")
    assert status == 403, body


# ================================================================ 5. the label memo


async def test_identical_code_texts_of_two_types_are_labelled_per_type(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """An Observation and a Procedure whose ``code`` texts are byte-identical (the HIV-1 RNA viral
    load) and a Basic whose ``code`` is too: each type labelled by its own field plan, across requests."""
    code = {"coding": [{"system": c.LOINC, "code": "20447-9",
                        "display": "HIV 1 RNA [#/volume] (viral load) in Serum or Plasma by NAA with probe detection"}]}
    obs = observation("obs-vl-memo-1", code=code)
    proc = {"resourceType": "Procedure", "id": "proc-vl-memo-1", "status": "completed", "code": code,
            "subject": {"reference": c.PAT_ANA}, "performedDateTime": "2023-04-18"}
    raw = orjson.dumps(searchset([c.ANA_CBC, obs, proc], world.base_url))
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    for _ in range(2):
        status, headers, body = await search(gw)
        assert status == 200, body
        assert ids_in(body) == {c.ANA_CBC["id"]}
        assert leaks(body, headers, ("20447-9", "HIV 1 RNA", "memo-1")) == []


async def test_consent_resources_in_an_answer_are_not_labelled_from_a_memo_of_their_twin(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Two Consents of Ana identical but for their provision (one opens the HIV label, which
    labels it HIV): Ana sees both, only that one DS4P-labelled; the doctor (no HIV permit for
    him) gets the general one only; the same on the next request (labels remembered by text)."""
    opens = c.opt_in(c.PAT_ANA, "consent-opens-hiv", labels=("HIV",))
    general = c.opt_in(c.PAT_ANA, "consent-general")
    raw = orjson.dumps(searchset([opens, general], world.base_url))
    # the client's search; the gateway's own consent lookups (status=active) read the world
    serve(world, {("GET", "/Consent"): lambda r: answer(raw) if "status=" not in r.query_string else None})
    gw = await make_gateway(world.base_url)
    path = f"/Consent?patient={c.PAT_ANA}"
    for _ in range(2):
        status, headers, body = await search(gw, path, actor=c.PAT_ANA)
        assert status == 200, body
        found = {e["resource"]["id"]: e["resource"] for e in entries(body) if "id" in e.get("resource", {})}
        assert set(found) == {"consent-opens-hiv", "consent-general"}
        assert "HIV" in {s["code"] for s in found["consent-opens-hiv"]["meta"]["security"]}
        assert "meta" not in found["consent-general"]
        assert await kept(gw, path) == {"consent-general"}


# ================================================================ 6. single resources spliced back after labelling


def _ben_hiv(rid: str, **extra: Any) -> dict[str, Any]:
    return {**hiv_condition(rid, c.PAT_BEN), **extra}


@pytest.mark.parametrize("meta", [
    None,
    {"versionId": "7", "lastUpdated": "2024-01-01T00:00:00Z"},
    {"versionId": "7", "tag": [{"system": "urn:x", "code": "t"}], "profile": ["http://example.org/p"]},
    {"security": [{"system": c.V3_CONFIDENTIALITY, "code": "N"}], "source": "urn:lab"},
])
@pytest.mark.parametrize("how", ["read", "vread"])
async def test_a_labelled_single_read_keeps_its_meta_and_gains_the_label(
    ben_opens_hiv: FakeFhir, make_gateway: MakeGateway, meta: dict[str, Any] | None, how: str,
) -> None:
    """Ben's released HIV condition read alone: DS4P puts HIV in meta.security (the view lacked
    meta, or held it); every meta element the server wrote stays; nothing else changes."""
    record = _ben_hiv("cond-hiv-ben-read", **({"meta": meta} if meta is not None else {}))
    raw = orjson.dumps(record)
    path = "/Condition/cond-hiv-ben-read" + ("/_history/7" if how == "vread" else "")
    serve(ben_opens_hiv, {("GET", path): lambda r: answer(raw)})
    gw = await make_gateway(ben_opens_hiv.base_url)
    status, headers, body = await search(gw, path)
    assert status == 200, body
    got = orjson.loads(body)
    codes = {s.get("code") for s in got["meta"]["security"]}
    assert "HIV" in codes
    for key, value in (meta or {}).items():
        if key != "security":
            assert got["meta"][key] == value, key
    if meta and "security" in meta:
        assert "N" in codes
    assert {k: v for k, v in got.items() if k != "meta"} == {k: v for k, v in record.items() if k != "meta"}


async def test_a_labelled_record_in_everything_is_labelled_and_its_neighbours_untouched(
    ben_opens_hiv: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """``$everything`` for Ben: his HIV condition labelled, his hypertension as the server wrote
    it (a decimal 58.10 stays), Ana's HIV condition (an upstream mistake) withheld."""
    hypertension = {**c.BEN_HYPERTENSION, "onsetAge": {"value": 58.10, "unit": "a"}}
    raw = orjson.dumps(searchset([_ben_hiv("cond-hiv-ben-ev", meta={"versionId": "2"}), hypertension,
                                  c.HIV_CONDITION], ben_opens_hiv.base_url))
    raw = raw.replace(b'"value":58.1,', b'"value":58.10,')
    path = f"/{c.PAT_BEN}/$everything"
    serve(ben_opens_hiv, {("GET", path): lambda r: answer(raw)})
    gw = await make_gateway(ben_opens_hiv.base_url)
    status, headers, body = await search(gw, path)
    assert status == 200, body
    assert ids_in(body) == {"cond-hiv-ben-ev", c.BEN_HYPERTENSION["id"]}
    assert b'"value":58.10,' in body
    resources = {e["resource"]["id"]: e["resource"] for e in entries(body) if "id" in e.get("resource", {})}
    assert resources["cond-hiv-ben-ev"]["meta"]["versionId"] == "2"
    assert "HIV" in {s["code"] for s in resources["cond-hiv-ben-ev"]["meta"]["security"]}
    assert leaks(body, headers, (HIV_ID,)) == []


async def test_a_single_read_with_an_escaped_meta_key_is_labelled_once(
    ben_opens_hiv: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """The ``meta`` key itself spelled ``"\\u006deta"``: the client gets one meta, labelled,
    with the server's versionId; never two meta keys."""
    record = _ben_hiv("cond-hiv-ben-esc", meta={"versionId": "4"})
    raw = orjson.dumps(record).replace(b'"meta":', b'"\\u006deta":')
    serve(ben_opens_hiv, {("GET", "/Condition/cond-hiv-ben-esc"): lambda r: answer(raw)})
    gw = await make_gateway(ben_opens_hiv.base_url)
    status, headers, body = await search(gw, "/Condition/cond-hiv-ben-esc")
    assert status == 200, body
    assert body.count(b"eta\"") + body.count(b"\\u006deta") == 1, body
    got = orjson.loads(body)
    assert got["meta"]["versionId"] == "4"
    assert "HIV" in {s["code"] for s in got["meta"]["security"]}


async def test_a_denied_single_read_is_withheld_whatever_its_meta(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Ana's HIV condition read alone, meta without security (left out of the view): 403."""
    record = {**c.HIV_CONDITION, "meta": {"versionId": "9", "lastUpdated": "2024-01-01T00:00:00Z"}}
    serve(world, {("GET", f"/Condition/{HIV_ID}"): lambda r: answer(orjson.dumps(record))})
    gw = await make_gateway(world.base_url)
    for _ in range(2):
        status, headers, body = await search(gw, f"/Condition/{HIV_ID}")
        assert status == 403, body
        assert leaks(body, headers, HIV_SECRETS) == []

