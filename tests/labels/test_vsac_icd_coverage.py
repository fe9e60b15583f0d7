"""The ICD-10-CM structure rules cover what public VSAC value sets list, code by code.

tests/data/vsac-icd10cm/ holds the ICD-10-CM members of VSAC expansions (OID and version in
each header). The rules name categories and blocks, not these codes: every listed code must
earn a label of its family, except the ones the policy leaves out on purpose (F17 nicotine,
F06 mental disorders due to a physiological condition).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.labels import ICD10CM, LabelIndex

DATA = Path(__file__).resolve().parents[1] / "data" / "vsac-icd10cm"
SUD = {"SUD", "ETHUD", "OPIOIDUD"}
REPRODUCTIVE = {"PREGNANT", "SEX"}
# OID -> (labels any of which each code must earn, code prefixes left out on purpose)
EXPECTED: dict[str, tuple[set[str], tuple[str, ...]]] = {
    "2.16.840.1.113883.3.464.1003.106.12.1001": (SUD, ()),  # Alcohol and Drug Dependence
    "2.16.840.1.113762.1.4.1029.320": (SUD, ("F17",)),  # Substance Abuse
    "2.16.840.1.113883.3.526.3.1491": ({"PSY"}, ()),  # Major Depressive Disorder Active
    "2.16.840.1.113762.1.4.1248.169": ({"PSY"}, ()),  # Depression
    "2.16.840.1.113762.1.4.1029.314": ({"PSY"}, ("F06",)),  # Mental Health Disorder
    "2.16.840.1.113762.1.4.1248.130": ({"PSY"}, ()),  # Suicide Attempt
    "2.16.840.1.113883.3.464.1003.120.12.1003": ({"HIV"}, ()),  # HIV
    "2.16.840.1.113762.1.4.1029.272": ({"HIV"}, ()),  # HIV in Pregnancy Childbirth and Puerperium
    "2.16.840.1.113762.1.4.1029.241": ({"SCA"}, ()),  # Sickle Cell Disease with Crisis
    # Pregnancy: the O chapter and the pregnancy Z codes earn PREGNANT (abortive outcomes O00-O08: SEX)
    "2.16.840.1.113883.3.117.1.7.1.263": (REPRODUCTIVE, ()),  # Obstetrical or Pregnancy Related Conditions
    "2.16.840.1.113762.1.4.1110.67": (REPRODUCTIVE, ()),  # 20 to 42 Plus Weeks Gestation
    "2.16.840.1.113762.1.4.1029.299": (REPRODUCTIVE, ()),  # Preterm Birth
    "2.16.840.1.113762.1.4.1045.99": (REPRODUCTIVE, ()),  # Delivery of Singleton
}


def _codes(oid: str) -> list[str]:
    lines = (DATA / f"{oid}.tsv").read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[1] for line in lines if line and not line.startswith(("#", "system"))]


@pytest.mark.parametrize("oid", list(EXPECTED))
def test_vsac_icd10cm_codes_earn_their_family_label(index: LabelIndex, oid: str) -> None:
    family, left_out = EXPECTED[oid]
    codes = _codes(oid)
    assert codes
    wrong = []
    for code in codes:
        labels = {x.code for x in index.labels_for({"resourceType": "Condition", "code": {"coding": [{"system": ICD10CM, "code": code}]}})}
        expected_none = code.startswith(left_out)
        if (not labels) != expected_none or (labels and not labels & family):
            wrong.append((code, sorted(labels)))
    assert wrong == []
