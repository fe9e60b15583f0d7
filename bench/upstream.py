"""A fixture FHIR upstream serving pre-serialized answers: ``python -m bench.upstream --port N``.

Every answer is serialized once at start-up, so the upstream costs the same for every
target that sits in front of it. What it serves (base path ``/fhir``):

- W1 ``Observation/obs-1``: a haemoglobin result of patient ``p1`` (permitted).
- W2 ``Observation?patient=Patient/p1&_count=100``: 100 entries, 40 of them sensitive
  (HIV tests LOINC 75622-1 and 5221-7, B20, F11.20, F10.20, A54.9, F32.9, F20.9). The
  consent of ``p1`` opens mental-health (PSY) data only, so the other 30 are withheld.
- W3 ``Patient/p1/$everything``: 1,000 resources shaped like a patient's record.
- W4 ``Observation?patient=Patient/<id>`` for cold-cache patients ``c<set>x<nnnn>``: five
  laboratory results each; one set of distinct patients per round, so each set is cold.
- W5 ``Observation/obs-bg``: like W1, for patient ``p5`` (asked with break-glass).
- W6 ``Observation?patient=Patient/optout&_count=100``: W2's entries for a patient who
  opted out (policyRule OPTOUT).
- ``Consent?patient=P1,P2&status=active``: two Consents per patient (a treatment permit
  that opens PSY, and a deny for a payer); a posted Consent (the break-glass record) is
  kept for its patient and returned with them.
- ``/_bench/consent-queries``: how many Consent queries named each patient since the last
  ``POST /_bench/reset``.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import web

from bench.label import realistic_mix
from gateway.app import until_signalled

JSON = dict[str, Any]
FHIR_JSON = "application/fhir+json"
BASE_PATH = "/fhir"
ACTOR = "Practitioner/doc-1"
LOINC = "http://loinc.org"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V3_PURPOSE = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

# Workload requests, as paths below the gateway's (and the upstream's) FHIR base.
W1_PATH = f"{BASE_PATH}/Observation/obs-1"
W2_PATH = f"{BASE_PATH}/Observation?patient=Patient/p1&_count=100"
W3_PATH = f"{BASE_PATH}/Patient/p1/$everything"
W5_PATH = f"{BASE_PATH}/Observation/obs-bg"
W6_PATH = f"{BASE_PATH}/Observation?patient=Patient/optout&_count=100"
W4_RESOURCES_PER_PATIENT = 5

# (system, code, display) of the W2 search, in the order they repeat; None marks a
# non-sensitive laboratory result. Two in five are sensitive.
_SENSITIVE = [
    ("Observation", LOINC, "75622-1", "HIV 1 and 2 tests - Meaningful Use set"),
    ("Condition", ICD, "F32.9", "Major depressive disorder, single episode, unspecified"),
    ("Condition", ICD, "F11.20", "Opioid dependence, uncomplicated"),
    ("Observation", LOINC, "5221-7", "HIV 1 Ab [Presence] in Serum or Plasma by Immunoblot"),
    ("Condition", ICD, "B20", "Human immunodeficiency virus [HIV] disease"),
    ("Condition", ICD, "F10.20", "Alcohol dependence, uncomplicated"),
    ("Condition", ICD, "F32.9", "Major depressive disorder, single episode, unspecified"),
    ("Condition", ICD, "A54.9", "Gonococcal infection, unspecified"),
    ("Observation", LOINC, "75622-1", "HIV 1 and 2 tests - Meaningful Use set"),
    ("Condition", ICD, "F20.9", "Schizophrenia, unspecified"),
]
_LABS = [
    ("718-7", "Hemoglobin [Mass/volume] in Blood"),
    ("2345-7", "Glucose [Mass/volume] in Serum or Plasma"),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma"),
    ("789-8", "Erythrocytes [#/volume] in Blood by Automated count"),
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count"),
    ("777-3", "Platelets [#/volume] in Blood by Automated count"),
    ("8480-6", "Systolic blood pressure"),
    ("8462-4", "Diastolic blood pressure"),
    ("8867-4", "Heart rate"),
    ("29463-7", "Body weight"),
]


def _concept(system: str, code: str, display: str = "") -> JSON:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def lab(rid: str, patient: str, n: int) -> JSON:
    """A final laboratory (or vital-sign) Observation with a quantity."""
    code, display = _LABS[n % len(_LABS)]
    return {
        "resourceType": "Observation", "id": rid,
        "meta": {"versionId": "1", "lastUpdated": "2024-05-01T10:00:00Z"},
        "status": "final",
        "category": [_concept(OBS_CATEGORY, "laboratory", "Laboratory")],
        "code": _concept(LOINC, code, display),
        "subject": {"reference": patient},
        "effectiveDateTime": "2024-05-01T09:30:00Z",
        "valueQuantity": {"value": 13.2 + n % 7, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"},
    }


def _sensitive(rid: str, patient: str, n: int) -> JSON:
    rtype, system, code, display = _SENSITIVE[n % len(_SENSITIVE)]
    if rtype == "Observation":
        return {
            "resourceType": "Observation", "id": rid, "status": "final",
            "category": [_concept(OBS_CATEGORY, "laboratory", "Laboratory")],
            "code": _concept(system, code, display), "subject": {"reference": patient},
            "effectiveDateTime": "2024-04-11T08:00:00Z",
            "valueCodeableConcept": _concept("http://snomed.info/sct", "260385009", "Negative"),
        }
    return {
        "resourceType": "Condition", "id": rid,
        "clinicalStatus": _concept("http://terminology.hl7.org/CodeSystem/condition-clinical", "active"),
        "category": [_concept("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item")],
        "code": _concept(system, code, display), "subject": {"reference": patient},
        "onsetDateTime": "2023-11-02",
    }


def search_entries(patient: str, count: int = 100) -> list[JSON]:
    """W2's resources: two in every five sensitive, interleaved with laboratory results."""
    out: list[JSON] = []
    for n in range(count):
        rid = f"{patient.split('/')[1]}-{n}"
        out.append(_sensitive(rid, patient, n // 5 * 2 + n % 5 // 3) if n % 5 in (1, 3) else lab(rid, patient, n))
    return out


def everything(count: int = 1000) -> list[JSON]:
    """W3's ``$everything`` of ``p1``: the patient, then a realistic record mix repeated."""
    mix = realistic_mix()
    patient, rest = mix[0], mix[1:]
    out = [patient]
    copy = 0
    while len(out) < count:
        for resource in rest:
            if len(out) == count:
                break
            clone = orjson.loads(orjson.dumps(resource))
            clone["id"] = f"{clone['id']}-{copy}"
            out.append(clone)
        copy += 1
    return out


def consents_for(patient: str, n: int) -> list[JSON]:
    """Two active Consents: a treatment permit that also opens PSY, and a payer deny."""
    pid = patient.split("/")[1]
    common = {
        "resourceType": "Consent", "status": "active",
        "scope": _concept("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy"),
        "category": [_concept(LOINC, "59284-0", "Patient Consent")],
        "patient": {"reference": patient},
        "dateTime": "2024-01-15T09:00:00Z",
    }
    treat = dict(common, id=f"{pid}-treat", policyRule=_concept(V3_ACT_CODE, "OPTIN"), provision={
        "type": "permit",
        "period": {"start": "2024-01-15"},
        "purpose": [{"system": V3_PURPOSE, "code": "TREAT"}],
        "provision": [{"type": "permit", "securityLabel": [{"system": V3_ACT_CODE, "code": "PSY"}]}],
    })
    payer = dict(common, id=f"{pid}-payer", provision={
        "type": "deny",
        "actor": [{
            "role": _concept("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "IRCP"),
            "reference": {"reference": f"Organization/payer-{n % 7}"},
        }],
        "purpose": [{"system": V3_PURPOSE, "code": "HPAYMT"}],
    })
    return [treat, payer]


def opt_out(patient: str) -> JSON:
    """A Consent whose policyRule is OPTOUT: nothing of this patient is shared."""
    return {
        "resourceType": "Consent", "id": "optout-1", "status": "active",
        "scope": _concept("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy"),
        "category": [_concept(LOINC, "59284-0", "Patient Consent")],
        "patient": {"reference": patient}, "dateTime": "2023-06-01T12:00:00Z",
        "policyRule": _concept(V3_ACT_CODE, "OPTOUT"),
    }


def cold_patient(cold_set: str, n: int) -> str:
    """The ``n``th W4 patient of one cold set (one set per round)."""
    return f"Patient/c{cold_set}x{n:04d}"


def cold_path(patient: str) -> str:
    return f"{BASE_PATH}/Observation?patient={patient}"


class Fixture:
    """The canned answers, keyed by raw path and query, and the Consent query counter."""

    def __init__(self, base_url: str, cold_sets: list[str], cold_patients: int) -> None:
        self.base_url = base_url
        self.answers: dict[str, bytes] = {}
        self.consents: dict[str, list[bytes]] = {}
        self.recorded: dict[str, bytes] = {}
        self.queries: Counter[str] = Counter()
        self._build(cold_sets, cold_patients)

    def bundle(self, resources: list[JSON], self_url: str) -> bytes:
        return orjson.dumps({
            "resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "link": [{"relation": "self", "url": self_url}],
            "entry": [
                {"fullUrl": f"{self.base_url}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                for r in resources
            ],
        })

    def _add_search(self, path: str, resources: list[JSON]) -> None:
        self.answers[path] = self.bundle(resources, self.base_url + path[len(BASE_PATH):])

    def _build(self, cold_sets: list[str], cold_patients: int) -> None:
        self.answers[f"{BASE_PATH}/metadata"] = orjson.dumps(
            {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance", "fhirVersion": "4.0.1"}
        )
        self.answers[W1_PATH] = orjson.dumps(lab("obs-1", "Patient/p1", 0))
        self.answers[W5_PATH] = orjson.dumps(lab("obs-bg", "Patient/p5", 0))
        self._add_search(W2_PATH, search_entries("Patient/p1"))
        self._add_search(W6_PATH, search_entries("Patient/optout"))
        self._add_search(W3_PATH, everything())
        for n, patient in enumerate(["Patient/p1", "Patient/p5"]):
            self.consents[patient] = [orjson.dumps({"resource": c}) for c in consents_for(patient, n)]
        self.consents["Patient/optout"] = [orjson.dumps({"resource": opt_out("Patient/optout")})]
        for cold_set in cold_sets:
            for n in range(cold_patients):
                patient = cold_patient(cold_set, n)
                pid = patient.split("/")[1]
                labs = [lab(f"{pid}-{k}", patient, k) for k in range(W4_RESOURCES_PER_PATIENT)]
                self._add_search(cold_path(patient), labs)
                self.consents[patient] = [orjson.dumps({"resource": c}) for c in consents_for(patient, n)]

    def consent_bundle(self, patients: list[str]) -> bytes:
        """One searchset with every asked patient's Consents (unknown patients have none)."""
        entries: list[bytes] = []
        for patient in patients:
            self.queries[patient] += 1
            entries.extend(self.consents.get(patient, ()))
            if patient in self.recorded:
                entries.append(self.recorded[patient])
        return b'{"resourceType":"Bundle","type":"searchset","entry":[' + b",".join(entries) + b"]}"

    def record(self, body: bytes) -> bytes:
        """Keep a posted Consent (the latest per patient) and echo it with an id."""
        consent = orjson.loads(body)
        consent.setdefault("id", f"posted-{len(self.recorded)}")
        patient = (consent.get("patient") or {}).get("reference", "")
        self.recorded[patient] = orjson.dumps({"resource": consent})
        return orjson.dumps(consent)


def _answer(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, content_type=FHIR_JSON, headers=headers)


def _not_found() -> web.Response:
    body = orjson.dumps({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]})
    return _answer(body, 404)


def build_app(fixture: Fixture) -> web.Application:
    """The aiohttp application serving ``fixture``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            canned = fixture.answers.get(request.raw_path)
            if canned is not None:
                return _answer(canned)
            if request.path == f"{BASE_PATH}/Consent":
                return _answer(fixture.consent_bundle(request.query.get("patient", "").split(",")))
            if request.path in (f"{BASE_PATH}/Group", f"{BASE_PATH}/CareTeam"):
                return _answer(b'{"resourceType":"Bundle","type":"searchset","entry":[]}')
            if request.path == "/_bench/consent-queries":
                return web.json_response(dict(fixture.queries))
            return _not_found()
        if request.method == "POST" and request.path == f"{BASE_PATH}/Consent":
            body = fixture.record(await request.read())
            location = f"{fixture.base_url}/Consent/{orjson.loads(body)['id']}/_history/1"
            return _answer(body, 201, {"Location": location})
        if request.method == "POST" and request.path == "/_bench/reset":
            fixture.queries.clear()
            return web.json_response({})
        return _not_found()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def cold_set_names(rounds: int) -> Iterator[str]:
    """One cold set for the warm-up, then one per round."""
    yield "w"
    yield from (str(r) for r in range(rounds))


async def serve(port: int, cold_sets: list[str], cold_patients: int) -> None:
    fixture = Fixture(f"http://127.0.0.1:{port}{BASE_PATH}", cold_sets, cold_patients)
    runner = web.AppRunner(build_app(fixture), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await until_signalled()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=5, help="cold patient sets beyond the warm-up set")
    parser.add_argument("--cold-patients", type=int, default=1000, help="distinct patients per cold set")
    args = parser.parse_args()
    asyncio.run(serve(args.port, list(cold_set_names(args.rounds)), args.cold_patients))


if __name__ == "__main__":
    main()
