"""Which patients a request names (core.refusals.named_patients): the confining parameters of
each Patient-compartment type, read from a table built once."""

from __future__ import annotations

import pytest

from gateway.core.compartment import PATIENT_COMPARTMENT
from gateway.core.refusals import named_patients


def confining_oracle(rtype: str, whole_type: bool) -> set[str]:
    """The parameters as named_patients first computed them, per call."""
    links = set(PATIENT_COMPARTMENT.get(rtype, {})) - {"link"}
    if "subject" in links or "patient" in links:
        links.add("patient")
    if rtype == "Patient" and whole_type:
        links.add("_id")
    return links


@pytest.mark.parametrize("rtype", [*sorted(PATIENT_COMPARTMENT), "Medication", "Practitioner"])
def test_each_types_confining_parameters_name_patients_and_no_other_does(rtype: str) -> None:
    candidates = {*PATIENT_COMPARTMENT.get(rtype, {}), "link", "patient", "subject", "_id", "code"}
    for parts in ((rtype,), (rtype, "x1")):
        confining = confining_oracle(rtype, len(parts) == 1)
        own = {"Patient/x1"} if rtype == "Patient" and len(parts) == 2 else set()
        for name in sorted(candidates):
            for modifier in ("", ":Patient"):
                got = named_patients(parts, [(name + modifier, "p1,Patient/p2")])
                expected = own | ({"Patient/p1", "Patient/p2"} if name in confining else set())
                assert got == (frozenset(expected) or None), (parts, name + modifier)
