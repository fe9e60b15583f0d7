"""Against the real FHIR engine, through fhirpy: absolute references in displays and Consents.

Jon's consent opens his record to his GP, named under the engine's own base (this server's
GP). Ida's consent names a GP under another server's base (an exchange's Practitioner of our
GP's id): it opens nothing here. Jon's CBC report lists his CBC three ways: relatively (what
``_include`` follows), under the exchange's base with a display that speaks of HIV (the
exchange's Observation of our CBC's id: not ours, so its display goes although our CBC is
released beside it), and under the engine's own base naming his withheld HIV test (its display
goes, as the relative form's would).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fhirpy.base.exceptions import ForbiddenError

from tests.hidden import hidden_in
from tests.integration.engine import Engine
from tests.integration.test_role_authors_and_ingredients_engine import concept
from tests.integration.test_side_doors_engine import fhir_client, seeded_gateway

pytestmark = pytest.mark.integration
IDA, JON = "Patient/pat-fb-ida", "Patient/pat-fb-jon"
GP = "Practitioner/dr-fb-gp"
OTHER = "https://hie.elsewhere.example/fhir"
LOINC = "http://loinc.org"
FOREIGN_DISPLAY = "HIV-1 RNA 12000 copies/mL (exchange result)"
HIDDEN_DISPLAY = "HIV 1 and 2 tests positive"


def _consent(rid: str, patient: str, gp: str) -> dict[str, Any]:
    return {
        "resourceType": "Consent", "id": rid, "status": "active",
        "scope": concept("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy"),
        "category": [concept(LOINC, "59284-0")], "patient": {"reference": patient},
        "dateTime": "2024-01-15T10:00:00Z",
        "policyRule": concept("http://terminology.hl7.org/CodeSystem/v3-ActCode", "OPTIN"),
        "provision": {"type": "permit", "actor": [{
            "role": concept("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "PRCP"),
            "reference": {"reference": gp}}]},
    }


def _observation(rid: str, patient: str, code: str, display: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": rid, "status": "final", "subject": {"reference": patient},
            "code": concept(LOINC, code, display), "effectiveDateTime": "2024-02-01T08:00:00Z"}


def resources(engine: Engine) -> list[dict[str, Any]]:
    return [
        {"resourceType": "Patient", "id": "pat-fb-ida", "name": [{"family": "Lind", "given": ["Ida"]}]},
        {"resourceType": "Patient", "id": "pat-fb-jon", "name": [{"family": "Berg", "given": ["Jon"]}]},
        {"resourceType": "Practitioner", "id": "dr-fb-gp", "name": [{"family": "Ahmed"}]},
        _consent("consent-fb-ida", IDA, f"{OTHER}/{GP}"),
        _consent("consent-fb-jon", JON, f"{engine.base_url}/{GP}"),
        _observation("obs-fb-ida-cbc", IDA, "58410-2", "CBC panel - Blood by Automated count"),
        _observation("obs-fb-jon-cbc", JON, "58410-2", "CBC panel - Blood by Automated count"),
        _observation("obs-fb-jon-hiv", JON, "75622-1", "HIV 1 and 2 tests - Meaningful Use set"),
        {"resourceType": "DiagnosticReport", "id": "dr-fb-jon", "status": "final", "subject": {"reference": JON},
         "code": concept(LOINC, "58410-2", "CBC panel - Blood by Automated count"),
         "result": [
             {"reference": "Observation/obs-fb-jon-cbc"},
             {"reference": f"{OTHER}/Observation/obs-fb-jon-cbc", "display": FOREIGN_DISPLAY},
             {"reference": f"{engine.base_url}/Observation/obs-fb-jon-hiv", "display": HIDDEN_DISPLAY},
         ]},
    ]


async def test_consents_and_displays_read_absolute_references_by_their_base(
    fhir_engine: Engine, make_gateway: Callable[..., Any],
) -> None:
    gw = await seeded_gateway(fhir_engine, make_gateway, resources(fhir_engine))
    fhir = fhir_client(gw, {"X-Actor": GP})
    # The exchange's GP of our GP's id is not ours: Ida's permit opens nothing to him.
    with pytest.raises(ForbiddenError):
        await fhir.reference("Observation", "obs-fb-ida-cbc").to_resource()
    assert await fhir.resources("Observation").search(patient=IDA).fetch_all() == []
    # Under the engine's own base he is ours: Jon's permit opens his ordinary records.
    assert (await fhir.reference("Observation", "obs-fb-jon-cbc").to_resource())["id"] == "obs-fb-jon-cbc"
    answer = await fhir.resources("DiagnosticReport").search(patient=JON).include(
        "DiagnosticReport", "result").fetch_raw()
    kept = {e["resource"]["id"] for e in answer.get("entry") or () if e["resource"]["resourceType"] != "OperationOutcome"}
    assert {"dr-fb-jon", "obs-fb-jon-cbc"} <= kept and "obs-fb-jon-hiv" not in kept
    [report] = [e["resource"] for e in answer["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"]
    assert [r.get("display") for r in report["result"]] == [None, None, None]
    assert hidden_in(str(answer), (FOREIGN_DISPLAY, HIDDEN_DISPLAY)) == []
    # The report read alone: the same.
    read = await fhir.reference("DiagnosticReport", "dr-fb-jon").to_resource()
    assert hidden_in(str(read.serialize()), (FOREIGN_DISPLAY, HIDDEN_DISPLAY)) == []
