"""CONTRACT §5 ("Deciding") through the running gateway in front of the real FHIR engine.

Each scenario gives one patient of its own consents and records, written straight to the
engine as another system would; a requester then reads through the gateway with fhirpy and
gets the record (200) or a refusal (403), or a search that keeps or drops it. The official
R4 examples are written to the engine as published, only their id and patient changed so that
each scenario has a patient of its own.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fhirpy.base.exceptions import ForbiddenError

from tests.conftest import GatewayUnderTest
from tests.integration.engine import Engine
from tests.integration.test_side_doors_engine import engine_put, fhir_client

pytestmark = pytest.mark.integration
JSON = dict[str, Any]
HL7 = Path(__file__).resolve().parents[1] / "data" / "hl7-consent-examples"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
ROLE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
RT = "http://hl7.org/fhir/resource-types"
LOINC = "http://loinc.org"


def consent(patient: str, cid: str, provision: JSON | None, rule: str = "OPTIN", **more: Any) -> JSON:
    """A Consent the engine accepts (R4 ppc-1 wants a policy or policyRule; a typed root
    decides over it)."""
    found: JSON = {
        "resourceType": "Consent", "id": cid, "status": "active",
        "scope": {"coding": [{"system": SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"reference": patient}, "dateTime": "2024-01-15T10:00:00Z",
    }
    found["policyRule"] = {"coding": [{"system": ACT, "code": rule}]}
    if provision is not None:
        found["provision"] = provision
    found.update(more)
    return {k: v for k, v in found.items() if v is not None}


def glucose(patient: str, rid: str, **more: Any) -> JSON:
    return {
        "resourceType": "Observation", "id": rid, "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "2345-7", "display": "Glucose"}]},
        "subject": {"reference": patient}, "effectiveDateTime": "2024-03-01", **more,
    }


def actor(ref: str, role: str | None = None) -> JSON:
    found: JSON = {"reference": {"reference": ref}}
    if role:
        found["role"] = {"coding": [{"system": ROLE, "code": role}]}
    return found


def hl7(name: str, patient: str) -> JSON:
    """An official R4 example as published, under its own id and ``patient``."""
    data: JSON = json.loads((HL7 / f"Consent-consent-example-{name}.json").read_text())
    found = copy.deepcopy(data)
    found["id"] = f"s5-hl7-{name}"
    found["patient"] = {"reference": patient}
    return found


@dataclass
class Scenario:
    name: str
    resources: list[JSON]
    # (headers, "Type/id", expected status)
    reads: list[tuple[dict[str, str], str, int]]
    settings: dict[str, Any] = field(default_factory=dict)


def _p(name: str) -> str:
    return f"Patient/s5-{name}"


def _obs(name: str) -> str:
    return f"Observation/s5-{name}-obs"


def _plain(name: str, *consents: JSON) -> list[JSON]:
    """The scenario's patient, a glucose result and ``consents``."""
    return [
        {"resourceType": "Patient", "id": f"s5-{name}", "name": [{"family": name.title()}]},
        glucose(_p(name), f"s5-{name}-obs"),
        *consents,
    ]


def dr(ref: str = "Practitioner/s5-dr", **more: str) -> dict[str, str]:
    return {"X-Actor": ref, **more}


PERMIT_DEFAULT = {"consent": {"default_decision": "permit"}}
LATEST_WINS = {"consent": {"combining": "latest-wins"}}

SCENARIOS: list[Scenario] = [
    # in force: scope research only for research purposes
    Scenario("research", _plain("research", consent(
        _p("research"), "s5-research-c", {"type": "permit"}, "OPTIN",
        scope={"coding": [{"system": SCOPE, "code": "research"}]})), [
        (dr(**{"X-Purpose-Of-Use": "HRESCH"}), _obs("research"), 200),
        (dr(**{"X-Purpose-Of-Use": "CLINTRCH"}), _obs("research"), 200),
        (dr(**{"X-Purpose-Of-Use": "TREAT"}), _obs("research"), 403),
    ]),
    # in force: the root period is the validity
    Scenario("future", _plain("future", consent(
        _p("future"), "s5-future-c", {"type": "permit", "period": {"start": "2999-01-01"}})), [
        (dr(), _obs("future"), 403),
    ]),
    Scenario("openended", _plain("openended", consent(
        _p("openended"), "s5-openended-c", {"type": "permit", "period": {"start": "2020-01-01"}})), [
        (dr(), _obs("openended"), 200),
    ]),
    Scenario("ended-optout", _plain("ended-optout", consent(
        _p("ended-optout"), "s5-ended-optout-c", {"period": {"start": "2020-01-01", "end": "2021-01-01"}},
        "OPTOUT")), [
        (dr(), _obs("ended-optout"), 200),
    ], PERMIT_DEFAULT),
    # actors: organization, CareTeam membership, CST
    Scenario("org", _plain("org", consent(
        _p("org"), "s5-org-c", {"type": "deny", "actor": [actor("Organization/s5-org", "IRCP")]}, "OPTIN")), [
        (dr(**{"X-Actor-Organization": "Organization/s5-org"}), _obs("org"), 403),
        (dr(**{"X-Actor-Organization": "Organization/s5-elsewhere"}), _obs("org"), 200),
        (dr(), _obs("org"), 200),
    ], PERMIT_DEFAULT),
    Scenario("careteam", [
        *_plain("careteam", consent(
            _p("careteam"), "s5-careteam-c", {"type": "permit", "actor": [actor("CareTeam/s5-ct", "PRCP")]}, "OPTIN")),
        {"resourceType": "CareTeam", "id": "s5-ct", "status": "active", "subject": {"reference": _p("careteam")},
         "participant": [{"member": {"reference": "Practitioner/s5-nurse"}}]},
    ], [
        (dr("Practitioner/s5-nurse"), _obs("careteam"), 200),
        (dr("Practitioner/s5-dr"), _obs("careteam"), 403),
    ]),
    Scenario("custodian", _plain("custodian", consent(
        _p("custodian"), "s5-custodian-c", {"type": "permit", "actor": [actor("Organization/s5-hospital", "CST")]}, "OPTIN")), [
        (dr("Practitioner/s5-anyone", **{"X-Actor-Organization": "Organization/s5-clinic"}), _obs("custodian"), 200),
    ]),
    # purpose: ETREAT counts as TREAT, not the other way round
    Scenario("purpose", _plain("purpose", consent(
        _p("purpose"), "s5-purpose-c", {"type": "permit", "purpose": [{"system": ACT, "code": "TREAT"}]}, "OPTIN"),
        consent(_p("purpose"), "s5-purpose-e", {"type": "deny", "purpose": [{"system": ACT, "code": "ETREAT"}]},
                "OPTIN", status="inactive")), [
        (dr(**{"X-Purpose-Of-Use": "ETREAT"}), _obs("purpose"), 200),
        (dr(**{"X-Purpose-Of-Use": "HPAYMT"}), _obs("purpose"), 403),
    ]),
    # a policyRule's OPTOUT counts wherever it stands among its codings (here after a local
    # code written without a system)
    Scenario("rule-order", _plain("rule-order", consent(
        _p("rule-order"), "s5-rule-order-c", {}, "OPTIN",
        policyRule={"coding": [{"code": "HOSP-7", "display": "hospital policy 7"}, {"system": ACT, "code": "OPTOUT"}]})), [
        (dr(), _obs("rule-order"), 403),
    ], PERMIT_DEFAULT),
    # latest-wins: an undated deny is not outranked by a dated permit
    Scenario("undated", _plain("undated",
        consent(_p("undated"), "s5-undated-deny", {"type": "deny"}, "OPTIN", dateTime=None),
        consent(_p("undated"), "s5-undated-permit", {"type": "permit"}, "OPTIN", dateTime="2024-05-01")), [
        (dr(), _obs("undated"), 403),
    ], LATEST_WINS),
    Scenario("dated", _plain("dated",
        consent(_p("dated"), "s5-dated-deny", {"type": "deny"}, "OPTIN", dateTime="2023-05-01"),
        consent(_p("dated"), "s5-dated-permit", {"type": "permit"}, "OPTIN", dateTime="2024-05-01")), [
        (dr(), _obs("dated"), 200),
    ], LATEST_WINS),
    # confidentiality on meta.security: R is sensitive (rules/), opened only by a permit whose
    # path names R or a higher mark (V); naming N does not reach it
    Scenario("restricted", [
        *_plain("restricted", consent(_p("restricted"), "s5-restricted-c", {
            "type": "permit",
            "provision": [
                {"type": "permit", "actor": [actor("Practitioner/s5-psych", "PRCP")],
                 "securityLabel": [{"system": CONF, "code": "R"}]},
                {"type": "permit", "actor": [actor("Practitioner/s5-chief", "PRCP")],
                 "securityLabel": [{"system": CONF, "code": "V"}]},
                {"type": "permit", "actor": [actor("Practitioner/s5-gp", "PRCP")],
                 "securityLabel": [{"system": CONF, "code": "N"}]},
            ]}, "OPTIN")),
        glucose(_p("restricted"), "s5-restricted-r", meta={"security": [{"system": CONF, "code": "R"}]}),
    ], [
        (dr(), _obs("restricted"), 200),
        (dr(), "Observation/s5-restricted-r", 403),
        (dr("Practitioner/s5-psych"), "Observation/s5-restricted-r", 200),
        (dr("Practitioner/s5-chief"), "Observation/s5-restricted-r", 200),
        (dr("Practitioner/s5-gp"), "Observation/s5-restricted-r", 403),
        (dr("Practitioner/s5-gp"), _obs("restricted"), 200),
    ]),
    # self access; a record of two patients needs both
    Scenario("self", _plain("self", consent(_p("self"), "s5-self-c", {"type": "deny"}, "OPTOUT")), [
        (dr(_p("self")), _obs("self"), 200),
        (dr(), _obs("self"), 403),
    ]),
    Scenario("pair", [
        *_plain("pair-a", consent(_p("pair-a"), "s5-pair-a-c", {"type": "permit"})),
        *_plain("pair-b", consent(_p("pair-b"), "s5-pair-b-c", {
            "type": "permit", "provision": [{"type": "deny", "actor": [actor("Practitioner/s5-dr", "PRCP")]}]})),
        glucose(_p("pair-a"), "s5-pair-both", performer=[{"reference": _p("pair-b")}]),
    ], [
        (dr("Practitioner/s5-other"), "Observation/s5-pair-both", 200),
        (dr(), "Observation/s5-pair-both", 403),
        (dr(), _obs("pair-a"), 200),
    ]),
    # data in no patient compartment passes without a consent check (default deny here)
    Scenario("nonpatient", [
        {"resourceType": "Organization", "id": "s5-hospital", "name": "Good Health"},
        {"resourceType": "Location", "id": "s5-ward", "name": "Ward 3"},
    ], [
        (dr(), "Organization/s5-hospital", 200),
        (dr("Practitioner/s5-anyone"), "Location/s5-ward", 200),
    ]),
    # the official R4 examples
    Scenario("notthem", _plain("notthem", hl7("notThem", _p("notthem"))), [
        (dr("Practitioner/f204"), _obs("notthem"), 403),
        (dr("Practitioner/f205"), _obs("notthem"), 200),
    ]),
    Scenario("grantor", _plain("grantor", hl7("grantor", _p("grantor"))), [
        (dr("Patient/example"), _obs("grantor"), 200),
        (dr("Practitioner/f204"), _obs("grantor"), 403),
    ], PERMIT_DEFAULT),
    Scenario("out", _plain("out", hl7("Out", _p("out"))), [
        (dr("Practitioner/f204", **{"X-Actor-Organization": "Organization/f001"}), _obs("out"), 403),
        (dr("Practitioner/s5-dr"), _obs("out"), 403),
    ], PERMIT_DEFAULT),
    Scenario("notorg", _plain("notorg", hl7("notOrg", _p("notorg"))), [
        (dr("Practitioner/s5-dr", **{"X-Actor-Organization": "Organization/f001"}), _obs("notorg"), 403),
        (dr("Practitioner/s5-dr", **{"X-Actor-Organization": "Organization/f002"}), _obs("notorg"), 200),
    ], PERMIT_DEFAULT),
    Scenario("notthis", [
        *_plain("notthis", {**hl7("notThis", _p("notthis")),
                            "provision": {"data": [{"meaning": "related", "reference": {"reference": "Task/s5-task"}}]}}),
        {"resourceType": "Task", "id": "s5-task", "status": "requested", "intent": "order",
         "for": {"reference": _p("notthis")}, "focus": {"reference": "ServiceRequest/s5-sr"}},
        {"resourceType": "ServiceRequest", "id": "s5-sr", "status": "active", "intent": "order",
         "subject": {"reference": _p("notthis")}, "code": {"coding": [{"system": LOINC, "code": "2345-7"}]}},
    ], [
        (dr(), "Task/s5-task", 403),
        (dr(), "ServiceRequest/s5-sr", 403),
        (dr(), _obs("notthis"), 200),
    ]),
    # expired: under a permit default the consent's own exception no longer closes anything,
    # under the deny default its opt-in no longer opens anything
    *[
        Scenario(f"expired-{name}-{mode}", _plain(f"exp-{name}-{mode}", hl7(name, _p(f"exp-{name}-{mode}"))), [
            (dr(who), _obs(f"exp-{name}-{mode}"), 200 if mode == "permit" else 403),
        ], PERMIT_DEFAULT if mode == "permit" else {})
        for name, who in (("basic", "Practitioner/s5-dr"), ("signature", "Practitioner/13"),
                          ("smartonfhir", "Practitioner/s5-dr"), ("notTime", "Practitioner/s5-dr"))
        for mode in ("permit", "deny")
    ],
]


def _cases() -> list[Any]:
    return [
        pytest.param(s, headers, ref, status, id=f"{s.name}-{i}")
        for s in SCENARIOS for i, (headers, ref, status) in enumerate(s.reads)
    ]


@pytest.mark.parametrize(("scenario", "headers", "ref", "status"), _cases())
async def test_read_through_the_gateway(
    fhir_engine: Engine, make_gateway: Callable[..., Any],
    scenario: Scenario, headers: dict[str, str], ref: str, status: int,
) -> None:
    for resource in scenario.resources:
        await engine_put(fhir_engine, resource)
    gw: GatewayUnderTest = await make_gateway(fhir_engine.base_url, **scenario.settings)
    rtype, rid = ref.split("/")
    fhir = fhir_client(gw, headers)
    if status == 200:
        found = await fhir.reference(rtype, rid).to_resource()
        assert found["id"] == rid
    else:
        assert status == 403
        with pytest.raises(ForbiddenError) as refused:
            await fhir.reference(rtype, rid).to_resource()
        assert rid not in str(refused.value)
    # The same record in a search of its patient's data: kept or removed alike.
    owner = next(r for r in scenario.resources if f"{r['resourceType']}/{r['id']}" == ref)
    subject = (owner.get("subject") or owner.get("for") or {}).get("reference")
    if subject:
        found_ids = [r.get("id") async for r in fhir.resources(rtype).search(subject=subject)]
        assert (rid in found_ids) == (status == 200), found_ids


async def test_an_unknown_purpose_is_refused(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> None:
    scenario = SCENARIOS[0]
    for resource in scenario.resources:
        await engine_put(fhir_engine, resource)
    gw: GatewayUnderTest = await make_gateway(fhir_engine.base_url)
    async with gw.session.get(gw.url + "/" + _obs("research"),
                              headers=dr(**{"X-Purpose-Of-Use": "MADEUP"})) as resp:
        assert resp.status == 400
        body = await resp.json(content_type=None)
    assert body["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    ("scenario_name", "reading", "counted"),
    [
        ("notthem", "exception", 1),   # untyped root with conditions
        ("notthem", "scope", 1),       # counted whichever way the site reads it
        ("grantor", "exception", 1),   # custodian beside a recipient: still conditions
        ("out", "exception", 0),       # untyped root naming only the custodian: no condition
        ("expired-notTime-deny", "exception", 0),  # untyped root with only a period
        ("custodian", "exception", 0),  # typed root
    ],
)
async def test_ambiguous_consents_are_counted(
    fhir_engine: Engine, make_gateway: Callable[..., Any], scenario_name: str, reading: str, counted: int,
) -> None:
    scenario = next(s for s in SCENARIOS if s.name == scenario_name)
    for resource in scenario.resources:
        await engine_put(fhir_engine, resource)
    gw: GatewayUnderTest = await make_gateway(fhir_engine.base_url, consent={"untyped_root": reading})
    headers, ref, _ = scenario.reads[0]
    async with gw.session.get(f"{gw.url}/{ref}", headers=headers) as resp:
        assert resp.status in (200, 403)
    assert gw.metric("consent_gateway_ambiguous_consents_total") == counted
