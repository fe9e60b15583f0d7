"""Writes gateway/demo/seed.json: the demo data set (a transaction Bundle of PUT entries).

Run: python tools/make_demo_seed.py. Real codes throughout: ICD-10-CM, SNOMED CT, LOINC, RxNorm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ICD = "http://hl7.org/fhir/sid/icd-10-cm"
SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
POU = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"

out: list[dict[str, Any]] = []


def add(resource: dict[str, Any]) -> None:
    out.append(resource)


def cc(*codings: tuple[str, str, str]) -> dict[str, Any]:
    return {"coding": [{"system": s, "code": c, "display": d} for s, c, d in codings], "text": codings[0][2]}


def patient(pid: str, given: str, family: str, gender: str, birth: str) -> None:
    add({"resourceType": "Patient", "id": pid, "active": True, "name": [{"family": family, "given": [given]}],
         "gender": gender, "birthDate": birth,
         "identifier": [{"system": "urn:demo:mrn", "value": f"MRN-{pid}"}]})


def practitioner(pid: str, given: str, family: str, specialty: str) -> None:
    add({"resourceType": "Practitioner", "id": pid, "name": [{"family": family, "given": [given], "prefix": ["Dr."]}],
         "qualification": [{"code": {"text": specialty}}]})


def condition(cid: str, pat: str, code: dict[str, Any], onset: str) -> None:
    add({"resourceType": "Condition", "id": cid, "subject": {"reference": f"Patient/{pat}"},
         "clinicalStatus": cc(("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active")),
         "code": code, "onsetDateTime": onset, "recorder": {"reference": "Practitioner/dr-gp"}})


def observation(oid: str, pat: str, category: str, code: dict[str, Any], when: str, value: dict[str, Any]) -> None:
    add({"resourceType": "Observation", "id": oid, "status": "final", "subject": {"reference": f"Patient/{pat}"},
         "category": [cc((OBS_CAT, category, category.replace("-", " ").title()))],
         "code": code, "effectiveDateTime": when, **value})


def medication(mid: str, pat: str, rxcui: str, name: str, when: str) -> None:
    add({"resourceType": "MedicationRequest", "id": mid, "status": "active", "intent": "order",
         "subject": {"reference": f"Patient/{pat}"}, "medicationCodeableConcept": cc((RXNORM, rxcui, name)),
         "authoredOn": when, "requester": {"reference": "Practitioner/dr-gp"}})


def consent(cid: str, pat: str, rule: str, provision: dict[str, Any] | None = None, scope: str = "patient-privacy",
            when: str = "2026-01-15T10:00:00Z") -> None:
    res: dict[str, Any] = {
        "resourceType": "Consent", "id": cid, "status": "active",
        "scope": {"coding": [{"system": SCOPE, "code": scope}]},
        "category": [cc((LOINC, "59284-0", "Patient Consent"))],
        "patient": {"reference": f"Patient/{pat}"}, "dateTime": when,
        "policyRule": {"coding": [{"system": ACT, "code": rule}]},
    }
    if provision is not None:
        res["provision"] = provision
    add(res)


def actor(ref: str, role: str = "PRCP") -> dict[str, Any]:
    return {"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": role}]},
            "reference": {"reference": ref}}


add({"resourceType": "Organization", "id": "org-hospital", "name": "General Hospital"})
add({"resourceType": "Organization", "id": "org-research", "name": "University Research Institute"})
practitioner("dr-gp", "Gail", "Park", "Family medicine")
practitioner("dr-psych", "Sam", "Okafor", "Psychiatry")
practitioner("dr-jones", "Riley", "Jones", "Internal medicine")
practitioner("dr-er", "Morgan", "Diaz", "Emergency medicine")

# Alice: opted in; no mental health to anyone but her psychiatrist.
patient("pat-alice", "Alice", "Rivera", "female", "1984-03-12")
condition("alice-htn", "pat-alice", cc((ICD, "I10", "Essential (primary) hypertension"), (SCT, "38341003", "Hypertensive disorder")), "2021-06-01")
observation("alice-cbc", "pat-alice", "laboratory", cc((LOINC, "58410-2", "CBC panel - Blood by Automated count")), "2026-02-03T09:00:00Z", {})
observation("alice-bp", "pat-alice", "vital-signs", cc((LOINC, "85354-9", "Blood pressure panel")), "2026-02-03T09:05:00Z",
            {"component": [{"code": cc((LOINC, "8480-6", "Systolic blood pressure")), "valueQuantity": {"value": 142, "unit": "mm[Hg]"}}]})
medication("alice-lisinopril", "pat-alice", "314076", "lisinopril 10 MG Oral Tablet", "2021-06-01")
condition("alice-depression", "pat-alice", cc((ICD, "F32.9", "Major depressive disorder, single episode, unspecified"), (SCT, "35489007", "Depressive disorder")), "2024-09-10")
medication("alice-sertraline", "pat-alice", "312940", "sertraline 50 MG Oral Tablet", "2024-09-10")
add({"resourceType": "DocumentReference", "id": "alice-therapy-note", "status": "current",
     "subject": {"reference": "Patient/pat-alice"}, "type": cc((LOINC, "11510-5", "Psychology Progress note")),
     "date": "2025-11-02T15:00:00Z", "author": [{"reference": "Practitioner/dr-psych"}],
     "meta": {"security": [{"system": ACT, "code": "PSYTHPN"}]},
     "content": [{"attachment": {"contentType": "text/plain", "title": "Session notes"}}]})
consent("consent-alice-optin", "pat-alice", "OPTIN", {
    "type": "permit",
    "provision": [{"type": "permit", "actor": [actor("Practitioner/dr-psych")],
                   "securityLabel": [{"system": ACT, "code": "PSY"}, {"system": ACT, "code": "PSYTHPN"}]}],
})

# Bob: HIV and opioid use disorder (42 CFR Part 2); opted in, but "not Dr. Jones".
patient("pat-bob", "Bob", "Chen", "male", "1979-07-30")
condition("bob-hiv", "pat-bob", cc((ICD, "B20", "Human immunodeficiency virus [HIV] disease")), "2019-04-22")
observation("bob-hiv-test", "pat-bob", "laboratory", cc((LOINC, "75622-1", "HIV 1 and 2 tests - Meaningful Use set")), "2019-04-20T08:00:00Z",
            {"valueCodeableConcept": cc((SCT, "10828004", "Positive"))})
condition("bob-oud", "pat-bob", cc((ICD, "F11.20", "Opioid dependence, uncomplicated")), "2023-01-05")
medication("bob-bupe", "pat-bob", "351267", "buprenorphine 8 MG / naloxone 2 MG Sublingual Tablet", "2023-01-05")
observation("bob-cbc", "pat-bob", "laboratory", cc((LOINC, "58410-2", "CBC panel - Blood by Automated count")), "2026-03-01T08:00:00Z", {})
consent("consent-bob-optin-not-jones", "pat-bob", "OPTIN", {
    "type": "permit",
    "provision": [{"type": "deny", "actor": [actor("Practitioner/dr-jones")]}],
})

# Carol: opted out of all sharing.
patient("pat-carol", "Carol", "Smith", "female", "1992-11-05")
condition("carol-pregnancy", "pat-carol", cc((ICD, "Z33.1", "Pregnant state, incidental"), (SCT, "77386006", "Pregnancy")), "2026-05-01")
observation("carol-cbc", "pat-carol", "laboratory", cc((LOINC, "58410-2", "CBC panel - Blood by Automated count")), "2026-05-02T08:00:00Z", {})
consent("consent-carol-optout", "pat-carol", "OPTOUT")

# Dana: shares with General Hospital; research yes; genetic testing; restricted documents.
patient("pat-dana", "Dana", "Lee", "female", "1968-01-19")
observation("dana-brca", "pat-dana", "laboratory", cc((LOINC, "21636-6", "BRCA1 gene mutations tested for in Blood or Tissue by Molecular genetics method")),
            "2025-08-14T10:00:00Z", {"valueCodeableConcept": cc((SCT, "260385009", "Negative"))})
observation("dana-cbc", "pat-dana", "laboratory", cc((LOINC, "58410-2", "CBC panel - Blood by Automated count")), "2026-04-01T08:00:00Z", {})
for did, level, title in (("dana-doc-restricted", "R", "Restricted discharge summary"), ("dana-doc-very-restricted", "V", "Very restricted clinical note")):
    add({"resourceType": "DocumentReference", "id": did, "status": "current", "subject": {"reference": "Patient/pat-dana"},
         "type": cc((LOINC, "18842-5", "Discharge summary")), "date": "2026-04-02T12:00:00Z",
         "securityLabel": [{"coding": [{"system": CONF, "code": level}]}],
         "content": [{"attachment": {"contentType": "text/plain", "title": title}}]})
consent("consent-dana-hospital", "pat-dana", "OPTIN", {"type": "permit", "actor": [actor("Organization/org-hospital")]})
consent("consent-dana-research", "pat-dana", "OPTIN", {
    "type": "permit", "actor": [actor("Organization/org-research")],
    "purpose": [{"system": POU, "code": "HRESCH"}], "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}],
}, scope="research")
consent("consent-dana-er-window", "pat-dana", "OPTIN", {
    "type": "permit", "period": {"start": "2025-03-01T00:00:00Z", "end": "2025-03-01T08:00:00Z"},
    "actor": [actor("Practitioner/dr-er")], "purpose": [{"system": POU, "code": "ETREAT"}],
})
add({"resourceType": "CareTeam", "id": "careteam-alice", "status": "active", "subject": {"reference": "Patient/pat-alice"},
     "participant": [{"member": {"reference": "Practitioner/dr-gp"}}, {"member": {"reference": "Practitioner/dr-psych"}}]})

bundle = {
    "resourceType": "Bundle", "type": "transaction",
    "entry": [{"fullUrl": f"urn:uuid:{r['resourceType'].lower()}-{r['id']}", "resource": r,
               "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in out],
}
target = Path(__file__).resolve().parent.parent / "gateway" / "demo" / "seed.json"
target.write_text(json.dumps(bundle, indent=1) + "\n")
print(f"wrote {target} ({len(out)} resources)")
