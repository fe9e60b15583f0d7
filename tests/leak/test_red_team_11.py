"""Red team 11: read-side doors and encodings.

Scenario: a clinician (``c.DOCTOR``) holds Ana's general opt-in, which does not open her HIV
viral load (``VIRAL_LOAD``). Each test goes through the real request path (HTTP to the
gateway, the fake FHIR server on a real socket, answering as the server named does) and
searches the RAW response bytes and headers for the hidden id, codes and texts. The leak
conftest runs each test on both paths (answers parsed whole, and decided on views).

Holes found and closed here:

1. ``_fields``: Medplum's search parser (``@medplum/core``, the engine under
   ``tests/upstream``) reads ``_fields`` exactly as ``_elements``, and Medplum's server answers
   the named elements only. The gateway took only ``_elements``/``_summary`` off the upstream
   query, so ``Observation/<hidden>?_fields=id,subject,valueQuantity`` came back without its
   code, earned no label, and was released: "12000 copies/mL" of an HIV viral load, at every
   door (read, search, form ``_search``, batch entry). ``_fields`` is now a projection like
   ``_elements``: stripped, and applied by the gateway after deciding.
2. Narratives that render a record the answer does not release: a lab report read alone (its
   results are never in that answer) or beside its withheld result said "HIV-1 RNA (viral
   load) 12000 copies/mL"; so did a panel (``hasMember``) and the records about a record
   (``Provenance.target``, ``AuditEvent.entity``, ``Task.focus``, ``DetectedIssue.implicated``,
   ``Communication.payload``, ``ClinicalImpression.finding``, ``Linkage.item``). Red team 8 had
   closed this for the records a Composition's sections or a List's items list (a summary's
   ``event.detail`` naming the hidden result still narrated it). The narrative of any released resource now goes
   when it refers, beyond the patients it belongs to and its encounter, to patient data not
   released in the same answer (also against the real engine: ``test_red_team_11_engine.py``).
3. AuditEvents (an audit trail the FHIR server keeps, IHE BALP): an entity whose ``what`` is the
   hidden record said what it is in ``name``/``description``/``detail``, and an entity's
   ``securityLabel`` (``HIV``) was not a label of the event, which was released to a general
   permit. The event now carries its entities' labels, and an entity naming unreleased patient
   data loses what it says of it.
4. Names in another case: ``_HAS:``, ``$STATS``, ``_History`` and ``_ELEMENTS`` were compared
   as FHIR spells them; a server that reads names in any case ran a reverse chain, a statistic or
   a type history, or projected the codes away. Refusals and projection parameters are now read
   in any case.

Tried and held (no test added beyond the earlier passes' unless said):
- Encodings of the upstream's answer: gzip and deflate (decoded, the header dropped, decided);
  an encoding the gateway cannot decode (``br``) is a 502; a compressed or non-JSON
  ``/metadata`` that is no CapabilityStatement is a 502; pretty-printed answers (``_pretty``)
  have their displays removed like compact ones.
- Path shapes: ``/observation/<id>``, ``/OBSERVATION?...`` (answered by a case-folding server:
  decided by the answer's own resourceType), ``//Observation//<id>``, a trailing ``/`` or ``?``
  (same decision as the plain path), ``Observation%2F<id>``, ``%2e%2e`` and ``;`` path
  parameters (400).
- Parameters: ``_id`` lists mixing hidden and visible ids, a repeated ``_id``, ``_summary=text``,
  ``_summary=data`` and ``_elements=text`` over a scrubbed narrative (applied after it),
  ``$lastn`` (decided entry by entry), ``$GRAPHQL`` at system level (403), ``_revinclude=
  AuditEvent:entity`` brought only by a withheld result (removed with it), a Group one of
  whose members has no consent (403), HEAD of a search (decided, no body), OPTIONS (the
  server's error, bare).
- What earlier passes hold: ``_has`` in forms and batches, chains, ``_filter``/``_query``/
  ``_text``/``_content``/``_list``, ``_contained``, ``_summary=count``, ``_count=0``,
  ``_total``, type history, ``_since``/``_at``, vread of a version carrying the code, paging
  links and headers, 404-mode equality.

Found and not closed (each needs a decision beyond a fix):
- Labels come from codes: a fact written only as text (a Flag whose ``code`` is the text
  "HIV-1 positive", a CodeableConcept without coding, a note, a narrative that refers to
  nothing) earns no label and is released.
- An AuditEvent entity without ``what`` (a search's ``query``, base64 of
  ``Observation?code=...|20447-9``) can name a sensitive code; the query is not decoded.
- References keep the ids of hidden records (CONTRACT §6), and their ``identifier``: a search by
  reference (``Provenance?target=Observation/<id>``, ``List?item=``) returns the referring
  records for a hidden id and none for a missing one, so in 404 mode a guessed id can be told
  hidden from missing where a released record refers to it (a dangling reference proves
  nothing, as red team 9 noted).
- Write side, found here and closed on merging: SMART's check that ``$meta-add``/``$meta-delete``
  is an update (``web.identity.META_WRITES``), and the refusal of ``$meta-delete`` on a drug or
  role, compared operation names exactly (``$META-ADD`` at a case-folding server ran under a
  read-only token); both now compare in any case (tests in test_red_team_2 and _10).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_side_doors import (
    FORM, VIRAL_LOAD, VL_REF, VL_SECRETS, Override, batch, call, entries, fhir, ids_in, leaks, sent_upstream, slots,
    world,
)

__all__ = ["world"]  # fixtures

CBC_REF = f"Observation/{c.ANA_CBC['id']}"
SECRETS = (*VL_SECRETS, "HIV-1", "viral load")


# ---------------------------------------------------------------- 1. Medplum's _fields


def _projected(resource: dict[str, Any], fields: str | None) -> dict[str, Any]:
    """What the server answers for a projection: the named elements only (codes gone)."""
    if not fields:
        return resource
    keep = {n.strip() for n in fields.split(",")} | {"resourceType", "id", "meta"}
    return {k: v for k, v in resource.items() if k in keep}


def _fields_of(pairs: list[tuple[str, str]]) -> str | None:
    # Medplum's search parser (@medplum/core) reads ``_fields`` exactly as ``_elements``.
    return next((v for k, v in pairs if k.split(":")[0] in ("_fields", "_elements")), None)


def _medplum_projection(fake: FakeFhir) -> Override:
    """Reads, searches and ``_search`` answered with ``_fields``/``_elements`` applied, as
    Medplum's server does."""

    async def override(request: web.Request) -> web.StreamResponse | None:
        parts = [p for p in request.path.removeprefix("/fhir").split("/") if p]
        pairs = list(request.query.items())
        if request.method == "POST" and parts[-1:] == ["_search"]:
            pairs += parse_qsl((await request.read()).decode(), keep_blank_values=True)
            parts = parts[:-1]
        fields = _fields_of(pairs)
        if request.method == "GET" and len(parts) == 2 and "/".join(parts) in fake.resources:
            return fhir(_projected(fake.resources["/".join(parts)], fields))
        if len(parts) == 1 and parts[0] == "Observation":
            found = [r for k, r in fake.resources.items() if k.startswith("Observation/")
                     and r.get("subject", {}).get("reference") == c.PAT_ANA]
            return fhir(c.bundle([_projected(r, fields) for r in found], fake.base_url))
        return None

    return override


FIELDS = "_fields=id,subject,valueQuantity,effectiveDateTime"


@pytest.mark.parametrize("door", ["read", "search", "form-search", "batch-read", "modifier"])
async def test_medplums_fields_projection_never_hides_the_code_that_decides(
    world: FakeFhir, gateway: GatewayUnderTest, door: str,
) -> None:
    world.override = _medplum_projection(world)
    if door == "read":
        status, headers, body = await call(gateway, "GET", f"/{VL_REF}?{FIELDS}")
        assert status == 403, body
    elif door == "search":
        status, headers, body = await call(gateway, "GET", f"/Observation?patient={c.PAT_ANA}&{FIELDS}")
        assert status == 200, body
        assert c.ANA_CBC["id"] in ids_in(body) and VIRAL_LOAD["id"] not in ids_in(body)
    elif door == "form-search":
        status, headers, body = await call(gateway, "POST", "/Observation/_search",
                                           body=f"patient={c.PAT_ANA}&{FIELDS}".encode(), **{"Content-Type": FORM})
        assert status == 200, body
        assert c.ANA_CBC["id"] in ids_in(body)
    elif door == "batch-read":
        status, headers, body = await call(gateway, "POST", "/", body=batch(
            ("GET", f"{VL_REF}?{FIELDS}"), ("GET", f"{CBC_REF}?{FIELDS}")))
        assert status == 200, body
        hidden, cbc = slots(body)
        assert hidden["response"]["status"].startswith("403") and "resource" not in hidden
        assert cbc["resource"]["id"] == c.ANA_CBC["id"]
    else:
        status, headers, body = await call(gateway, "GET", f"/{VL_REF}?_fields:x=id,subject,valueQuantity")
        assert status == 403, body
    assert leaks(body, headers, SECRETS) == []
    assert not any("_fields" in s for s in sent_upstream(world)), sent_upstream(world)


async def test_fields_still_projects_what_is_released(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    """The client asked for a projection: the gateway applies it after deciding, as for ``_elements``."""
    world.override = _medplum_projection(world)
    status, _, body = await call(gateway, "GET", f"/{CBC_REF}?_fields=id,subject")
    assert status == 200, body
    cbc = orjson.loads(body)
    assert cbc["id"] == c.ANA_CBC["id"] and "subject" in cbc and "code" not in cbc and "valueQuantity" not in cbc
    assert any(t.get("code") == "SUBSETTED" for t in cbc["meta"].get("tag", []))


# ---------------------------------------------------------------- 2. narratives naming hidden records


VL_NARRATIVE = "HIV-1 RNA (viral load) 12000 copies/mL"
# What a narrative may say of the hidden result; its id stays in the reference (CONTRACT §6).
NARRATED = ("20447-9", "HIV 1 RNA", "HIV-1", "12000", "copies/mL", "viral load")


def _narrative(text: str) -> dict[str, str]:
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{text}</div>'}


LAB_REPORT = {
    "resourceType": "DiagnosticReport", "id": "rep-lab-ana-0302", "status": "final",
    "code": c.concept(c.LOINC, "11502-2", "Laboratory report"),
    "subject": {"reference": c.PAT_ANA}, "effectiveDateTime": "2023-03-02T08:30:00Z",
    "result": [{"reference": CBC_REF}, {"reference": VL_REF}],
    "text": _narrative(f"Hemoglobin 13.2 g/dL; {VL_NARRATIVE}"),
}
CBC_REPORT = {
    **LAB_REPORT, "id": "rep-cbc-ana-0302", "result": [{"reference": CBC_REF}],
    "text": _narrative("Hemoglobin 13.2 g/dL"),
}
# Records about a record: each names the hidden result and says in its narrative what it is.
ABOUT_HIDDEN = {
    "Provenance": {"target": [{"reference": VL_REF}, {"reference": c.PAT_ANA}],
                   "recorded": "2023-03-02T09:00:00Z", "agent": [{"who": {"reference": c.DOCTOR}}]},
    "DetectedIssue": {"status": "final", "patient": {"reference": c.PAT_ANA}, "implicated": [{"reference": VL_REF}]},
    "Task": {"status": "requested", "intent": "order", "for": {"reference": c.PAT_ANA}, "focus": {"reference": VL_REF}},
    "Communication": {"status": "completed", "subject": {"reference": c.PAT_ANA},
                      "payload": [{"contentReference": {"reference": VL_REF}}]},
    "ClinicalImpression": {"status": "completed", "subject": {"reference": c.PAT_ANA},
                           "finding": [{"itemReference": {"reference": VL_REF}}]},
    "AuditEvent": {"type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110"},
                   "recorded": "2023-03-02T09:00:00Z", "agent": [{"who": {"reference": c.DOCTOR}, "requestor": True}],
                   "source": {"observer": {"reference": c.DOCTOR}},
                   "entity": [{"what": {"reference": c.PAT_ANA}}, {"what": {"reference": VL_REF}}]},
    "Linkage": {"item": [{"type": "source", "resource": {"reference": VL_REF}},
                         {"type": "alternate", "resource": {"reference": CBC_REF}}]},
    "Observation": {"status": "final", "code": c.concept(c.LOINC, "11502-2", "Laboratory report"),
                    "subject": {"reference": c.PAT_ANA}, "hasMember": [{"reference": VL_REF}]},
}


def about_hidden(rtype: str) -> dict[str, Any]:
    return {"resourceType": rtype, "id": f"about-{rtype.lower()}-vl", **ABOUT_HIDDEN[rtype],
            "text": _narrative(f"About: {VL_NARRATIVE}")}


@pytest.mark.parametrize("door", ["read", "search", "include", "batch"])
async def test_a_report_does_not_narrate_a_result_it_does_not_release(
    world: FakeFhir, gateway: GatewayUnderTest, door: str,
) -> None:
    """A lab report's narrative renders its results; read without them (alone, or with the hidden
    one withheld) it would say what the withheld one is."""
    world.add(LAB_REPORT)
    report_ref = f"DiagnosticReport/{LAB_REPORT['id']}"
    if door == "include":
        world.override = lambda r: _answer(r, "/DiagnosticReport", c.bundle(
            [LAB_REPORT], world.base_url, include=(c.ANA_CBC, VIRAL_LOAD)))
    path = {"read": f"/{report_ref}", "search": f"/DiagnosticReport?patient={c.PAT_ANA}",
            "include": f"/DiagnosticReport?patient={c.PAT_ANA}&_include=DiagnosticReport:result", "batch": "/"}[door]
    method = "POST" if door == "batch" else "GET"
    status, headers, body = await call(gateway, method, path, body=batch(("GET", report_ref)) if door == "batch" else None)
    assert status == 200, body
    assert leaks(body, headers, NARRATED) == []
    assert LAB_REPORT["id"] in body.decode()  # the report itself is released
    assert VL_REF in body.decode()  # its reference stays


async def _answer(request: web.Request, path: str, data: dict[str, Any]) -> web.StreamResponse | None:
    return fhir(data) if request.method == "GET" and request.path.removeprefix("/fhir") == path else None


async def test_a_narrative_naming_only_what_is_released_stays(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    """A report whose results are all in the answer, and records that refer to nothing but their
    patient (and practitioners), keep their narratives."""
    cbc = {**c.ANA_CBC, "text": _narrative("Hemoglobin 13.2 g/dL")}
    world.add(cbc)
    world.override = lambda r: _answer(r, "/DiagnosticReport", c.bundle([CBC_REPORT], world.base_url, include=(cbc,)))
    status, _, body = await call(gateway, "GET", f"/DiagnosticReport?patient={c.PAT_ANA}&_include=DiagnosticReport:result")
    assert status == 200, body
    assert body.decode().count("Hemoglobin 13.2 g/dL") == 2, body
    status, _, body = await call(gateway, "GET", f"/{CBC_REF}")
    assert status == 200 and b"Hemoglobin 13.2 g/dL" in body, body
    task = {"resourceType": "Task", "id": "task-call-ana", "status": "requested", "intent": "order",
            "for": {"reference": c.PAT_ANA}, "owner": {"reference": c.DOCTOR}, "text": _narrative("Call Ana back")}
    world.add(task)
    status, _, body = await call(gateway, "GET", "/Task/task-call-ana")
    assert status == 200 and b"Call Ana back" in body, body


@pytest.mark.parametrize("rtype", sorted(ABOUT_HIDDEN))
@pytest.mark.parametrize("door", ["read", "search"])
async def test_a_record_about_a_hidden_record_does_not_narrate_it(
    world: FakeFhir, gateway: GatewayUnderTest, rtype: str, door: str,
) -> None:
    record = about_hidden(rtype)
    world.add(record)
    path = f"/{rtype}/{record['id']}" if door == "read" else f"/{rtype}?_id={record['id']}"
    status, headers, body = await call(gateway, "GET", path)
    assert status == 200, body
    assert leaks(body, headers, NARRATED) == []
    assert record["id"] in body.decode()


# ---------------------------------------------------------------- 3. names in another case


def _case_folding(fake: FakeFhir) -> Override:
    """A server that reads parameter and operation names in any case: projections, reverse
    chains and computing operations named in capitals still run there."""

    async def override(request: web.Request) -> web.StreamResponse | None:
        path = request.path.removeprefix("/fhir")
        pairs = [(k.lower(), v) for k, v in request.query.items()]
        parts = [p for p in path.split("/") if p]
        if len(parts) == 2 and parts[1].lower() == "$stats":
            count = sum(1 for r in fake.resources.values() if r["resourceType"] == parts[0]
                        and any(v in orjson.dumps(r).decode() for k, v in pairs if k == "code"))
            return fhir({"resourceType": "Parameters", "parameter": [{"name": "count", "valueInteger": count}]})
        if parts and parts[-1].lower() == "_history" and len(parts) <= 2:
            return fhir(c.history_bundle([r for r in fake.resources.values() if r["resourceType"] == "Observation"],
                                         fake.base_url))
        if path == "/Patient" and any(k.startswith("_has:observation:") for k, _ in pairs):
            wanted = [v for k, v in pairs if k.startswith("_has:")]
            found = [p for p in (c.ANA, c.BEN) if any(
                r.get("subject", {}).get("reference") == f"Patient/{p['id']}" and any(w in orjson.dumps(r).decode() for w in wanted)
                for r in fake.resources.values() if r["resourceType"] == "Observation")]
            return fhir(c.bundle(found, fake.base_url))
        if request.method == "GET" and len(parts) == 2 and "/".join(parts) in fake.resources:
            return fhir(_projected(fake.resources["/".join(parts)], next((v for k, v in pairs if k == "_elements"), None)))
        return None

    return override


@pytest.mark.parametrize("path", [
    f"/{VL_REF}?_ELEMENTS=id,subject,valueQuantity",
    f"/{VL_REF}?_Elements:exclude=code",
    f"/{VL_REF}?_%45LEMENTS=id,subject,valueQuantity",
])
async def test_a_projection_named_in_capitals_is_the_gateways_too(
    world: FakeFhir, gateway: GatewayUnderTest, path: str,
) -> None:
    world.override = _case_folding(world)
    status, headers, body = await call(gateway, "GET", path)
    assert status == 403, body
    assert leaks(body, headers, SECRETS) == []
    assert not any("lements" in s.lower() for s in sent_upstream(world)), sent_upstream(world)


@pytest.mark.parametrize("path", [
    "/Patient?_HAS:Observation:patient:code=20447-9",
    "/Patient?_Has:Observation:subject:code=20447-9",
    f"/Observation/$STATS?patient={c.PAT_ANA}&code=20447-9",
    f"/Observation/$Stats?subject={c.PAT_ANA}&code=20447-9",
    "/Observation/_HISTORY",
    "/_History",
])
async def test_refusals_hold_in_any_case(world: FakeFhir, gateway: GatewayUnderTest, path: str) -> None:
    """Which patients have a hidden viral load, how many, or every version of every record: refused
    however the name is written."""
    world.override = _case_folding(world)
    status, headers, body = await call(gateway, "GET", path)
    assert status == 403, body
    assert orjson.loads(body)["issue"][0]["details"]["coding"][0]["code"] == "not-filterable"
    assert c.PAT_ANA.split("/")[1] not in body.decode() and b"valueInteger" not in body


# ---------------------------------------------------------------- 4. AuditEvents about a hidden record


def _audit(entity: dict[str, Any]) -> dict[str, Any]:
    """A read of Ana's record as a FHIR server's audit trail (IHE BALP) writes it."""
    return {
        "resourceType": "AuditEvent", "id": f"ae-read-{len(orjson.dumps(entity))}",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}],
        "action": "R", "recorded": "2023-03-02T09:00:00Z", "outcome": "0",
        "agent": [{"who": {"reference": c.DOCTOR}, "requestor": True}],
        "source": {"observer": {"reference": c.DOCTOR}},
        "entity": [{"what": {"reference": c.PAT_ANA}, "role": {"code": "1"}}, entity],
    }


DESCRIBED = _audit({"what": {"reference": VL_REF}, "name": "HIV-1 viral load result",
                    "description": VL_NARRATIVE, "detail": [{"type": "note", "valueString": VL_NARRATIVE}]})
LABELLED = _audit({"what": {"reference": f"Observation/{c.ANA_CBC['id']}"},
                   "securityLabel": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"}]})


@pytest.mark.parametrize("door", ["read", "search", "revinclude"])
async def test_an_audit_event_does_not_describe_the_hidden_record_it_names(
    world: FakeFhir, gateway: GatewayUnderTest, door: str,
) -> None:
    world.add(DESCRIBED)
    if door == "revinclude":
        world.override = lambda r: _answer(r, "/Observation", c.bundle(
            [c.ANA_CBC, VIRAL_LOAD], world.base_url, include=(DESCRIBED,)))
    path = {"read": f"/AuditEvent/{DESCRIBED['id']}", "search": f"/AuditEvent?_id={DESCRIBED['id']}",
            "revinclude": f"/Observation?patient={c.PAT_ANA}&_revinclude=AuditEvent:entity"}[door]
    status, headers, body = await call(gateway, "GET", path)
    assert status == 200, body
    assert leaks(body, headers, NARRATED) == []
    if door != "revinclude":  # there the event goes with the withheld result that brought it
        assert DESCRIBED["id"] in body.decode() and VL_REF in body.decode()


async def test_an_audit_event_carries_the_labels_of_what_it_records(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    """An AuditEvent whose entity is labelled HIV tells that Ana has HIV data: it is HIV data."""
    world.add(LABELLED)
    status, headers, body = await call(gateway, "GET", f"/AuditEvent/{LABELLED['id']}")
    assert status == 403, body
    status, headers, body = await call(gateway, "GET", f"/AuditEvent?_id={LABELLED['id']}")
    assert status == 200 and LABELLED["id"] not in ids_in(body), body
    assert leaks(body, headers, ("HIV", "v3-ActCode")) == []


async def test_a_summary_does_not_narrate_a_hidden_record_it_names_outside_its_sections(
    world: FakeFhir, gateway: GatewayUnderTest,
) -> None:
    """A Composition whose sections list only open records, but whose ``event`` names the hidden
    result, loses its own narrative (the sections keep theirs)."""
    summary = {
        "resourceType": "Composition", "id": "comp-ana-visit", "status": "final",
        "type": c.concept(c.LOINC, "11506-3", "Progress note"), "subject": {"reference": c.PAT_ANA},
        "date": "2023-03-02T10:00:00Z", "author": [{"reference": c.DOCTOR}], "title": "Visit note",
        "event": [{"detail": [{"reference": VL_REF}]}],
        "text": _narrative(f"Visit note. Reviewed {VL_NARRATIVE}."),
        "section": [{"title": "Labs", "entry": [{"reference": CBC_REF}], "text": _narrative("Hemoglobin 13.2 g/dL")}],
    }
    world.add(summary)
    world.override = lambda r: _answer(r, "/Composition", c.bundle([summary], world.base_url, include=(c.ANA_CBC,)))
    status, headers, body = await call(gateway, "GET", f"/Composition?patient={c.PAT_ANA}&_include=Composition:entry")
    assert status == 200, body
    assert leaks(body, headers, NARRATED) == []
    assert b"Hemoglobin 13.2 g/dL" in body


async def test_a_narrative_spelled_with_escapes_goes_too(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    """The gateway looks for a narrative by its ``<``: one written ``\\u003c`` is found as well."""
    text = orjson.dumps({**LAB_REPORT, "text": {"status": "generated", "div": "DIV"}}).replace(
        b'"DIV"', b'"\\u003cdiv xmlns=\\"http://www.w3.org/1999/xhtml\\"\\u003e' + VL_NARRATIVE.encode()
        + b'\\u003c/div\\u003e"')
    world.override = lambda r: _raw(r, text)
    status, headers, body = await call(gateway, "GET", f"/DiagnosticReport/{LAB_REPORT['id']}")
    assert status == 200, body
    assert leaks(body, headers, NARRATED) == []
    assert LAB_REPORT["id"] in body.decode()


async def _raw(request: web.Request, text: bytes) -> web.StreamResponse | None:
    if request.method == "GET" and request.path.removeprefix("/fhir") == f"/DiagnosticReport/{LAB_REPORT['id']}":
        return web.Response(body=text, content_type="application/fhir+json")
    return None
