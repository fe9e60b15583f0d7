"""Time ``LabelIndex.labels_for`` over a realistic mix of resources: ``python -m bench.label``.

The mix follows what a patient's record returns from ``$everything``: mostly laboratory and
vital-sign Observations, then Conditions, medications, encounters and documents; about one
resource in twelve carries a sensitive code.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from gateway.rules import load_rules

LOINC = "http://loinc.org"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
SCT = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

JSON = dict[str, Any]


def _concept(system: str, code: str, display: str = "") -> JSON:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _obs(n: int, code: str, category: str, value: JSON | None = None) -> JSON:
    obs: JSON = {
        "resourceType": "Observation",
        "id": f"obs-{n}",
        "meta": {"versionId": "1", "lastUpdated": "2024-05-01T10:00:00Z"},
        "status": "final",
        "category": [_concept(OBS_CATEGORY, category)],
        "code": _concept(LOINC, code),
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2024-05-01T09:30:00Z",
    }
    if value is None:
        obs["valueQuantity"] = {"value": 13.2, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"}
    else:
        obs["valueCodeableConcept"] = value
    return obs


def _condition(n: int, system: str, code: str) -> JSON:
    return {
        "resourceType": "Condition",
        "id": f"cond-{n}",
        "clinicalStatus": _concept("http://terminology.hl7.org/CodeSystem/condition-clinical", "active"),
        "category": [_concept("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item")],
        "code": {"coding": [{"system": system, "code": code}, {"system": SCT, "code": "38341003"}]},
        "subject": {"reference": "Patient/p1"},
    }


def _med(n: int, rxnorm: str, contained: bool) -> JSON:
    med: JSON = {
        "resourceType": "MedicationRequest",
        "id": f"med-{n}",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "reasonCode": [_concept(SCT, "59621000")],
    }
    if contained:
        med["contained"] = [{"resourceType": "Medication", "id": "m", "code": _concept(RXNORM, rxnorm)}]
        med["medicationReference"] = {"reference": "#m"}
    else:
        med["medicationCodeableConcept"] = _concept(RXNORM, rxnorm)
    return med


def realistic_mix() -> list[JSON]:
    """About 100 resources shaped like a patient's record (codes are real)."""
    mix: list[JSON] = [{"resourceType": "Patient", "id": "p1", "name": [{"family": "Doe"}], "gender": "female"}]
    labs = ["718-7", "789-8", "786-4", "787-2", "6690-2", "777-3", "2345-7", "2160-0", "2951-2", "2823-3"]
    vitals = ["8480-6", "8462-4", "8867-4", "9279-1", "8310-5", "29463-7", "8302-2", "39156-5"]
    n = 0
    for _ in range(3):
        for code in labs:
            n += 1
            mix.append(_obs(n, code, "laboratory"))
        for code in vitals:
            n += 1
            mix.append(_obs(n, code, "vital-signs"))
    mix.append(_obs(900, "72166-2", "social-history", _concept(SCT, "8517006", "Ex-smoker")))
    mix.append(_obs(901, "56888-1", "laboratory", _concept(SCT, "260385009", "Negative")))
    mix.append(_obs(902, "44249-1", "survey"))
    for n, (system, code) in enumerate(
        [(ICD, "I10"), (ICD, "E11.9"), (ICD, "J45.909"), (ICD, "F17.210"), (ICD, "F11.20"), (ICD, "F32.9"),
         (SCT, "44054006"), (SCT, "195967001")]
    ):
        mix.append(_condition(n, system, code))
    for n, (code, contained) in enumerate(
        [("314076", False), ("860975", False), ("617314", True), ("1999667", False), ("352364", True), ("197361", False)]
    ):
        mix.append(_med(n, code, contained))
    for n in range(10):
        mix.append({
            "resourceType": "Encounter", "id": f"enc-{n}", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "type": [_concept(SCT, "185349003")], "reasonCode": [_concept(SCT, "59621000")],
            "subject": {"reference": "Patient/p1"},
        })
    for n in range(5):
        mix.append({
            "resourceType": "Procedure", "id": f"proc-{n}", "status": "completed",
            "code": _concept(SCT, "430193006"), "subject": {"reference": "Patient/p1"},
        })
        mix.append({
            "resourceType": "Immunization", "id": f"imm-{n}", "status": "completed",
            "vaccineCode": _concept("http://hl7.org/fhir/sid/cvx", "140"), "patient": {"reference": "Patient/p1"},
        })
    for n in range(4):
        mix.append({
            "resourceType": "DiagnosticReport", "id": f"dr-{n}", "status": "final",
            "category": [_concept("http://terminology.hl7.org/CodeSystem/v2-0074", "LAB")],
            "code": _concept(LOINC, "58410-2"), "subject": {"reference": "Patient/p1"},
            "result": [{"reference": f"Observation/obs-{i}"} for i in range(1, 11)],
        })
        mix.append({
            "resourceType": "DocumentReference", "id": f"doc-{n}", "status": "current",
            "type": _concept(LOINC, "11506-3"),
            "category": [_concept("http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category", "clinical-note")],
            "securityLabel": [_concept("http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "N")],
            "subject": {"reference": "Patient/p1"},
        })
    mix.append({
        "resourceType": "AllergyIntolerance", "id": "al-1", "code": _concept(RXNORM, "7980"),
        "patient": {"reference": "Patient/p1"},
    })
    return mix


# A Synthea-like record of routine care, none of it sensitive: (resource type, system, code).
# Codes are those Synthea's general-care modules write (wellness encounters, chronic disease,
# acute illness, labs, vitals, routine medications and immunizations).
ROUTINE_CODES: list[tuple[str, str, str]] = [
    *[("Observation", LOINC, c) for c in (
        "58410-2", "718-7", "789-8", "786-4", "787-2", "6690-2", "777-3", "2339-0", "2160-0", "4548-4",
        "2093-3", "18262-6", "2085-9", "2571-8", "57698-3", "33914-3", "6298-4", "2947-0", "1742-6", "1920-8",
        "8480-6", "8462-4", "8867-4", "9279-1", "8310-5", "29463-7", "8302-2", "39156-5", "72514-3", "55757-9",
        "72166-2", "59576-9", "8289-1", "5902-2", "6301-6",
    )],
    *[("Condition", SCT, c) for c in (
        "59621000", "15777000", "444814009", "10509002", "162864005", "271737000", "44465007", "55822004",
        "65363002", "195662009", "40055000", "233678006", "66383009", "399211009", "160903007", "314529007",
    )],
    *[("Condition", ICD, c) for c in ("I10", "E11.9", "J45.909", "E78.5", "J06.9", "M54.5", "K21.9", "E66.9")],
    *[("MedicationRequest", RXNORM, c) for c in (
        "314076", "860975", "314231", "310798", "308182", "313782", "310965", "197806", "5640", "895994",
        "1049630", "849574", "106892", "198405",
    )],
    *[("Immunization", "http://hl7.org/fhir/sid/cvx", c) for c in ("140", "133", "115", "208", "62", "21")],
    # 183460006 (obstetric emergency hospital admission) is not here: it says a pregnancy exists (PREGNANT).
    *[("Procedure", SCT, c) for c in ("430193006", "171207006", "710824005", "252160004")],
    *[("Encounter", SCT, c) for c in ("185349003", "162673000", "185345009", "410620009")],
]


def routine_mix() -> list[JSON]:
    """One resource per routine code, each in the element its type keeps it in."""
    mix: list[JSON] = []
    for n, (rtype, system, code) in enumerate(ROUTINE_CODES):
        if rtype == "Observation":
            mix.append(_obs(1000 + n, code, "laboratory"))
        elif rtype == "Condition":
            mix.append(_condition(1000 + n, system, code))
        elif rtype == "MedicationRequest":
            mix.append(_med(1000 + n, code, contained=n % 2 == 0))
        elif rtype == "Immunization":
            mix.append({"resourceType": rtype, "id": f"imm-{n}", "vaccineCode": _concept(system, code)})
        elif rtype == "Encounter":
            mix.append({"resourceType": rtype, "id": f"enc-{n}", "type": [_concept(system, code)]})
        else:
            mix.append({"resourceType": rtype, "id": f"proc-{n}", "code": _concept(system, code)})
    return mix


def false_positives() -> tuple[int, int, list[str]]:
    """(labeled, total, which) over the routine mix: every label there is a false positive."""
    index = load_rules()
    mix = routine_mix()
    labeled = [f"{r['resourceType']}/{r['id']}" for r in mix if index.labels_for(r)]
    return len(labeled), len(mix), labeled


def measure(rounds: int) -> tuple[int, float]:
    """Label the mix ``rounds`` times; return (resources labeled, microseconds per resource)."""
    index = load_rules()
    mix = realistic_mix()
    labels_for = index.labels_for
    for resource in mix:  # warm-up
        labels_for(resource)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            for resource in mix:
                labels_for(resource)
        best = min(best, time.perf_counter() - start)
    count = rounds * len(mix)
    return count, best / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.label", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="passes over the mix per timing run")
    args = parser.parse_args()
    count, micros = measure(args.rounds)
    print(f"labels_for: {micros:.2f} us per resource ({count} resources per run, best of 5; target < 10 us)")
    labeled, total, which = false_positives()
    print(f"false positives: {labeled} of {total} routine resources ({labeled / total:.1%}) {' '.join(which)}")


if __name__ == "__main__":
    main()
