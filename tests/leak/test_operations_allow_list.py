"""Operations: an allow-list. The attacker is Dr Gomez, whom Ana's general opt-in lets read her
ordinary records and not her HIV diagnosis; he calls an operation the FHIR server runs.

Holes found and closed here (each refusal test below fails on the code before this pass):

1. An operation nobody listed was sent and its answer decided resource by resource, so what the
   server computed over records passed: a vendor's ``Condition/$summary-stats`` answering a
   ``Parameters`` with Ana's HIV count, code and onset; a custom ``Patient/<id>/$care-summary``
   answering a (non-patient) ``Library`` whose narrative names her diagnosis; a system-level
   ``$count``. Only the operations ``core.operations`` names (or the operator's
   ``enforcement.allowed_operations``), at the levels and on the types it names, are sent now;
   every other is refused (403), through every door: the path, in any case, percent-encoded,
   with a trailing slash, a form or Parameters POST, a batch or transaction entry.
2. A path segment percent-encoded twice (``%2524count``) was not an operation to the gateway
   (it read a search of an id it could not parse) and was sent; a server that decodes twice runs
   ``$count``. A ``%`` left after decoding is in no FHIR path: 400, not sent.
3. Known operations where they answer over records not decided: ``Patient/$summary``
   (``identifier``: the patient not decided first), ``Composition/$document`` (``id``),
   ``Condition/<id>/$diff`` (versions compared, none decided), ``$diff`` naming a version.

Kept working (tests below): ``$everything``, IPS ``$summary``, terminology ``$expand``/``$lookup``,
instance ``$validate``, and an operator's own operation, each answer decided per resource.

Each test searches the RAW response bytes and headers for the hidden ids, codes and texts.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_side_doors import MakeGateway, batch, call, fhir, is_outcome, leaks, raw, routes, slots

ANA_ID = c.PAT_ANA.split("/", 1)[1]
HIV_ID = c.HIV_CONDITION["id"]
HTN_ID = c.ANA_HYPERTENSION["id"]
HIV_SECRETS = (HIV_ID, "B20", "86406008", "Human immunodeficiency", "HIV disease", "2021-03-04")
FORM = "application/x-www-form-urlencoded"

# What a server computes over Ana's records: no resource the gateway could withhold.
COUNTS = {"resourceType": "Parameters", "parameter": [
    {"name": "total", "valueInteger": 1},
    {"name": "code", "valueCoding": {"system": c.ICD10CM, "code": "B20",
                                     "display": "Human immunodeficiency virus [HIV] disease"}},
    {"name": "first", "valueDateTime": "2021-03-04"},
    {"name": "record", "valueString": f"Condition/{HIV_ID}"},
]}
NARRATIVE = {"resourceType": "Library", "id": "lib-care-summary-ana", "status": "active",
             "type": c.concept("http://terminology.hl7.org/CodeSystem/library-type", "asset-collection", "Asset Collection"),
             "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">Ana Reyes: HIV disease '
                      "(B20) since 2021-03-04</div>"}}

# (operation name, path below the base without its query, query, the server's answer)
OPERATIONS = {
    "stats": ("$summary-stats", "Condition/$summary-stats", f"patient={c.PAT_ANA}&code=B20", COUNTS),
    "narrative": ("$care-summary", f"Patient/{ANA_ID}/$care-summary", "", NARRATIVE),
    "system": ("$count", "$count", "_type=Condition&code=B20", COUNTS),
}


def computing(fake: FakeFhir, name: str, answer: dict[str, Any]) -> None:
    """A server that runs ``name`` wherever it is called, and decodes a path twice."""
    async def override(request: web.Request) -> web.StreamResponse | None:
        if name in unquote(unquote(request.path)).lower():
            return fhir(answer)
        return None
    fake.override = override


def ran(fake: FakeFhir, name: str) -> list[str]:
    return [r.path_qs for r in fake.requests
            if name in unquote(unquote(r.path_qs)).lower() or name.encode() in r.body.lower()]


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    """Ana's and Ben's records; both hold a general opt-in (sensitive data stays closed)."""
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), c.opt_in(c.PAT_BEN, "consent-ben-in"))
    return fake_fhir


def _raw_get(path: str) -> bytes:
    return (f"GET /{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Actor: {c.DOCTOR}\r\n"
            "Accept: application/fhir+json\r\nConnection: close\r\n\r\n").encode()


DOORS = ["get", "upper-case", "mixed-case", "percent", "twice-percent", "trailing-slash", "form-post",
         "parameters-post", "batch", "batch-percent", "transaction"]


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("which", sorted(OPERATIONS))
async def test_an_operation_nobody_listed_is_refused_through_every_door(
    world: FakeFhir, gateway: GatewayUnderTest, which: str, door: str,
) -> None:
    name, path, query, answer = OPERATIONS[which]
    computing(world, name, answer)
    url = path + (f"?{query}" if query else "")
    expected = 403
    if door == "get":
        status, headers, body = await call(gateway, "GET", f"/{url}")
    elif door in ("upper-case", "mixed-case"):
        spelt = name.upper() if door == "upper-case" else name[:2].upper() + name[2:]
        status, headers, body = await call(gateway, "GET", "/" + url.replace(name, spelt))
    elif door == "percent":
        status, headers, body = await raw(gateway, _raw_get(url.replace("$", "%24")))
    elif door == "twice-percent":
        status, headers, body = await raw(gateway, _raw_get(url.replace("$", "%2524")))
        expected = 400
    elif door == "trailing-slash":
        status, headers, body = await call(gateway, "GET", f"/{path}/" + (f"?{query}" if query else ""))
    elif door == "form-post":
        status, headers, body = await call(gateway, "POST", f"/{path}", body=query.encode(), **{"Content-Type": FORM})
    elif door == "parameters-post":
        params = {"resourceType": "Parameters", "parameter": [
            {"name": k, "valueString": v} for k, v in (item.split("=", 1) for item in query.split("&") if item)]}
        status, headers, body = await call(gateway, "POST", f"/{path}", body=params)
    elif door == "transaction":
        status, headers, body = await call(gateway, "POST", "/", body=batch(("GET", url), kind="transaction"))
    else:
        entry = url.replace("$", "%24") if door == "batch-percent" else url
        status, headers, body = await call(gateway, "POST", "/", body=batch(("GET", entry), ("GET", f"Condition/{HTN_ID}")))
        assert status == 200, body
        refused_slot, kept = slots(body)
        assert refused_slot["response"]["status"].startswith("403"), refused_slot
        assert kept["resource"]["id"] == HTN_ID  # the batch's other entry is answered
        expected = 0
    if expected:
        is_outcome(status, headers, body, expected)
    assert leaks(body, headers, HIV_SECRETS) == []
    assert ran(world, name) == []


@pytest.mark.parametrize("url", [
    f"Patient/$summary?identifier=http://hospital.example.org/mrn|{ANA_ID}",
    "Composition/$document?id=ips-ana-0001",
    f"Condition/{HTN_ID}/$diff?fromVersion=1",
    f"$diff?from=Condition/{HTN_ID}/_history/1&to=Condition/{HTN_ID}",
])
async def test_a_known_operation_where_its_target_is_not_decided_first_is_refused(
    world: FakeFhir, gateway: GatewayUnderTest, url: str,
) -> None:
    """The patient (or Composition) named by a parameter the gateway does not read as a
    reference, or an old version of a record (HIV, since corrected to hypertension): the answer
    would be made of, or computed from, what was not decided."""
    name = url.split("?", 1)[0].rsplit("/", 1)[-1]
    computing(world, name, COUNTS)
    status, headers, body = await call(gateway, "GET", f"/{url}")
    is_outcome(status, headers, body, 403)
    assert leaks(body, headers, HIV_SECRETS) == []
    assert ran(world, name) == []


async def test_a_refused_operation_answers_alike_for_a_hidden_and_a_missing_record_in_404_mode(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(world.base_url, enforcement={"denied_read_status": 404})
    computing(world, "$care-summary", NARRATIVE)
    hidden = await call(gateway, "GET", f"/Condition/{HIV_ID}/$care-summary")
    missing = await call(gateway, "GET", "/Condition/cond-nothing-here-ops/$care-summary")
    assert hidden[0] == missing[0] == 403 and hidden[2] == missing[2]
    assert ran(world, "$care-summary") == []


# ---------------------------------------------------------------- what is let through still works


def _everything(fake: FakeFhir) -> Any:
    def answer(request: web.Request) -> Any:
        found = [r for r in fake.resources.values() if r.get("subject", {}).get("reference") == c.PAT_ANA]
        return fake.bundle([c.ANA, *found], f"{fake.base_url}/Patient/{ANA_ID}/$everything")
    return answer


def _ips(request: web.Request) -> Any:
    """An International Patient Summary: a document Bundle, a narrative per section."""
    composition = {
        "resourceType": "Composition", "id": "ips-ana-0001", "status": "final",
        "type": c.concept(c.LOINC, "60591-5", "Patient summary Document"),
        "subject": {"reference": c.PAT_ANA}, "date": "2024-07-01T10:00:00Z",
        "author": [{"reference": c.DOCTOR}], "title": "Patient Summary",
        "section": [{
            "title": "Active Problems", "code": c.concept(c.LOINC, "11450-4", "Problem list - Reported"),
            "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml"><ul>'
                     "<li>Essential (primary) hypertension</li><li>Human immunodeficiency virus [HIV] disease</li>"
                     "</ul></div>"},
            "entry": [{"reference": f"Condition/{HTN_ID}"}, {"reference": f"Condition/{HIV_ID}"}],
        }],
    }
    return {"resourceType": "Bundle", "type": "document", "entry": [
        {"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in (composition, c.ANA, c.ANA_HYPERTENSION, c.HIV_CONDITION)]}


GENDER = {"resourceType": "ValueSet", "id": "administrative-gender", "status": "active",
          "url": "http://hl7.org/fhir/ValueSet/administrative-gender",
          "expansion": {"timestamp": "2024-07-01T00:00:00Z", "contains": [
              {"system": "http://hl7.org/fhir/administrative-gender", "code": "female", "display": "Female"},
              {"system": "http://hl7.org/fhir/administrative-gender", "code": "male", "display": "Male"}]}}
LOOKUP = {"resourceType": "Parameters", "parameter": [
    {"name": "name", "valueString": "LOINC"}, {"name": "display", "valueString": "CBC panel - Blood by Automated count"}]}
VALID = {"resourceType": "OperationOutcome", "issue": [{"severity": "information", "code": "informational",
                                                        "diagnostics": "No issues detected during validation"}]}


@pytest.fixture
def served(world: FakeFhir) -> FakeFhir:
    world.override = routes({
        ("GET", f"/Patient/{ANA_ID}/$everything"): _everything(world),
        ("GET", f"/Patient/{ANA_ID}/$summary"): _ips,
        ("GET", "/ValueSet/$expand"): lambda r: GENDER,
        ("GET", "/ValueSet/administrative-gender/$expand"): lambda r: GENDER,
        ("GET", "/CodeSystem/$lookup"): lambda r: LOOKUP,
        ("POST", f"/Condition/{HTN_ID}/$validate"): lambda r: VALID,
    })
    return world


async def test_records_operations_answer_what_may_be_read(served: FakeFhir, gateway: GatewayUnderTest) -> None:
    """$everything and the IPS $summary: made of records, each decided; a section's narrative
    that names the withheld one does not go out."""
    for path in (f"/Patient/{ANA_ID}/$everything", f"/Patient/{ANA_ID}/$summary"):
        status, headers, body = await call(gateway, "GET", path)
        assert status == 200, body
        assert HTN_ID.encode() in body and b"pat-ana-5581" in body, path
        assert leaks(body, headers, HIV_SECRETS) == [], path


async def test_terminology_and_validation_still_answer(served: FakeFhir, gateway: GatewayUnderTest) -> None:
    """Terminology holds no patient data: its answers pass as the server wrote them; an
    instance $validate runs on a record the requester may read."""
    for path, expected in (
        ("/ValueSet/$expand?url=http://hl7.org/fhir/ValueSet/administrative-gender", b'"female"'),
        ("/ValueSet/administrative-gender/$expand", b'"female"'),
        ("/CodeSystem/$lookup?system=http://loinc.org&code=58410-2", b"CBC panel"),
    ):
        status, _, body = await call(gateway, "GET", path)
        assert status == 200 and expected in body, (path, body)
    params = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": c.ANA_HYPERTENSION}]}
    status, _, body = await call(gateway, "POST", f"/Condition/{HTN_ID}/$validate", body=params)
    assert status == 200 and orjson.loads(body)["resourceType"] == "OperationOutcome", body
    status, headers, body = await call(gateway, "POST", f"/Condition/{HIV_ID}/$validate", body=params)
    is_outcome(status, headers, body, 403)  # a hidden record's target is decided first


async def test_an_operators_own_operation_is_let_through_and_decided(world: FakeFhir, make_gateway: MakeGateway) -> None:
    """``enforcement.allowed_operations`` names a deployment's own operation, answering records:
    it is sent, and what it answers is decided resource by resource; elsewhere it stays refused."""
    gateway = await make_gateway(world.base_url, enforcement={"allowed_operations": ["Patient/[id]/$care-summary"]})
    world.override = routes({("GET", f"/Patient/{ANA_ID}/$care-summary"): lambda r: world.bundle(
        [c.ANA_HYPERTENSION, c.HIV_CONDITION], f"{world.base_url}/Patient/{ANA_ID}/$care-summary")})
    status, headers, body = await call(gateway, "GET", f"/Patient/{ANA_ID}/$care-summary")
    assert status == 200, body
    assert HTN_ID.encode() in body
    assert leaks(body, headers, HIV_SECRETS) == []
    status, headers, body = await call(gateway, "GET", "/Patient/$care-summary")
    is_outcome(status, headers, body, 403)
