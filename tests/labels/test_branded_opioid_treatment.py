"""Branded buprenorphine and methadone drugs (CDC opioid CDS value sets) earn the labels their
clinical drugs earn; the buprenorphine pain products the policy leaves out stay unlabeled."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from gateway.core.labels import RXNORM, LabelIndex

OUD = {"OPIOIDUD", "42CFRPart2"}
SOURCES = Path(__file__).resolve().parents[2] / "tools" / "sources" / "cdc-opioid-cds"
BRAND = re.compile(r" \[[^\]]+\]$")


def medication(resource_type: str, element: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding: dict[str, str] = {"system": RXNORM, "code": code}
    if display:
        coding["display"] = display
    return {"resourceType": resource_type, "status": "active", element: {"coding": [coding]}}


def labels(index: LabelIndex, resource: dict[str, Any]) -> set[str]:
    return {label.code for label in index.labels_for(resource)}


def extract(name: str) -> list[tuple[str, str]]:
    rows = [line.split("\t") for line in (SOURCES / name).read_text(encoding="utf-8").splitlines()]
    return [(row[1], row[2]) for row in rows if row[0] == "rxnorm"]


BRANDED = [
    ("suboxone-film-1010603", "MedicationStatement", "1010603", "buprenorphine 2 MG / naloxone 0.5 MG Sublingual Film [Suboxone]"),
    ("zubsolv-tablet-1431083", "MedicationRequest", "1431083", "buprenorphine 1.4 MG / naloxone 0.36 MG Sublingual Tablet [Zubsolv]"),
    ("sublocade-syringe-1996189", "MedicationAdministration", "1996189", "0.5 ML buprenorphine 200 MG/ML Prefilled Syringe [Sublocade]"),
    ("brixadi-syringe-2639027", "MedicationAdministration", "2639027", "0.16 ML buprenorphine 50 MG/ML Prefilled Syringe [Brixadi]"),
    ("bunavail-buccal-1542396", "MedicationDispense", "1542396", "buprenorphine 2.1 MG / naloxone 0.3 MG Buccal Film [Bunavail]"),
    ("probuphine-implant-1797655", "MedicationRequest", "1797655", "buprenorphine 74.2 MG Drug Implant [Probuphine]"),
    ("methadose-solution-991149", "MedicationDispense", "991149", "methadone hydrochloride 10 MG/ML Oral Solution [Methadose]"),
    ("dolophine-tablet-864708", "MedicationStatement", "864708", "methadone hydrochloride 10 MG Oral Tablet [Dolophine]"),
]

# The policy's exclusions: buprenorphine patches and buprenorphine-only buccal films treat pain.
PAIN_ONLY = [
    ("butrans-patch-1432971", "1432971"),
    ("butrans-patch-904874", "904874"),
    ("buprenorphine-patch-scd-904870", "904870"),
    ("belbuca-film-1716063", "1716063"),
    ("belbuca-film-1716090", "1716090"),
    ("buprenorphine-buccal-film-scd-1716057", "1716057"),
]


@pytest.mark.parametrize(("resource_type", "code", "display"), [b[1:] for b in BRANDED], ids=[b[0] for b in BRANDED])
def test_branded_opioid_treatment_is_part2(index: LabelIndex, resource_type: str, code: str, display: str) -> None:
    element = "medicationCodeableConcept"
    assert labels(index, medication(resource_type, element, code, display)) == OUD
    assert labels(index, medication(resource_type, element, code)) == OUD


def test_branded_code_on_a_medication_resource_is_part2(index: LabelIndex) -> None:
    assert labels(index, medication("Medication", "code", "1010603")) == OUD


@pytest.mark.parametrize("code", [p[1] for p in PAIN_ONLY], ids=[p[0] for p in PAIN_ONLY])
def test_buprenorphine_pain_products_stay_unlabeled(index: LabelIndex, code: str) -> None:
    assert labels(index, medication("MedicationRequest", "medicationCodeableConcept", code)) == set()


@pytest.mark.parametrize("name", ["buprenorphine-medications.tsv", "methadone-medications.tsv"])
def test_every_brand_earns_what_its_clinical_drug_earns(index: LabelIndex, name: str) -> None:
    rows = extract(name)
    generic = {display: code for code, display in rows if not BRAND.search(display)}
    brands = [(code, display) for code, display in rows if BRAND.search(display)]
    assert len(brands) >= 7
    for code, display in brands:
        clinical = generic[BRAND.sub("", display)]
        brand_labels = labels(index, medication("MedicationRequest", "medicationCodeableConcept", code))
        clinical_labels = labels(index, medication("MedicationRequest", "medicationCodeableConcept", clinical))
        assert brand_labels == clinical_labels, (code, display, clinical)
        pain = "Transdermal" in display or re.match(r"buprenorphine [0-9.]+ MG Buccal Film", display)
        assert brand_labels == (set() if pain else OUD), (code, display)


def test_the_same_code_in_another_system_stays_unlabeled(index: LabelIndex) -> None:
    resource = {"resourceType": "MedicationRequest",
                "medicationCodeableConcept": {"coding": [{"system": "http://hl7.org/fhir/sid/ndc", "code": "1010603"}]}}
    assert labels(index, resource) == set()
