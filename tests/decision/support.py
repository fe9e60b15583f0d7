"""Builders shared by the decision tests: cases from YAML into engine inputs."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.core.consent import CompiledConsent, compile_consent
from gateway.core.decision import Policy
from gateway.core.model import Actor, Label, RequestContext

REPO = Path(__file__).resolve().parents[2]
HL7_EXAMPLES = REPO / "tests" / "data" / "hl7-consent-examples"
SEED_EXAMPLES = REPO / "tests" / "data" / "seeds"
SENSITIVE = frozenset({"PSY", "HIV", "SUD", "ETH", "SEX", "STD", "OPIOIDUD", "ETHUD", "BH", "COGN", "SCA", "SICKLE"})
SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"


def consent_json(spec: Any, index: int) -> Any:
    """A Consent with test defaults; keys given as null are removed (for malformed cases)."""
    if not isinstance(spec, dict):
        return spec
    consent: dict[str, Any] = {
        "resourceType": "Consent",
        "id": f"c{index}",
        "status": "active",
        "scope": {"coding": [{"system": SCOPE_SYSTEM, "code": "patient-privacy"}]},
        "patient": {"reference": "Patient/p1"},
        "dateTime": "2024-01-01",
    }
    if "scope" in spec and isinstance(spec["scope"], str):
        spec = {**spec, "scope": {"coding": [{"system": SCOPE_SYSTEM, "code": spec["scope"]}]}}
    consent.update(spec)
    return {k: v for k, v in consent.items() if v is not None}


def hl7_example(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (HL7_EXAMPLES / f"Consent-consent-example-{name}.json").read_text()
    )
    return data


def seed_example(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SEED_EXAMPLES / f"{name}.json").read_text())
    return data


def compiled(case: dict[str, Any]) -> list[CompiledConsent]:
    raw = [consent_json(spec, i) for i, spec in enumerate(case.get("consents", []), 1)]
    raw += [hl7_example(name) for name in case.get("hl7", [])]
    raw += [seed_example(name) for name in case.get("seed", [])]
    found = [compile_consent(c, bases_of(case)) for c in raw]
    related = case.get("related")
    if related is not None:
        # What the consent cache read from the FHIR server for each related target.
        refs = {k: frozenset(v) for k, v in related.items()}
        found = [replace(c, related=refs) for c in found]
    return found


def bases_of(case: dict[str, Any]) -> frozenset[str]:
    """The case's ``bases``: under them an absolute reference names this server's resources."""
    return frozenset(case.get("bases", ()))


def policy_of(spec: dict[str, Any] | None) -> Policy:
    spec = dict(spec or {})
    required = spec.pop("explicit_consent_required", None)
    if required == "none":
        required = []
    return Policy(
        untyped_root=spec.pop("untyped_root", "exception"),
        default_decision=spec.pop("default_decision", "deny"),
        combining=spec.pop("combining", "deny-overrides"),
        patient_self_access=spec.pop("patient_self_access", True),
        explicit_consent_required=None if required is None else frozenset(required),
        sensitive=frozenset(spec.pop("sensitive", SENSITIVE)),
        consent_writers=frozenset(spec.pop("consent_writers", [])),
    )


def context_of(spec: dict[str, Any] | None) -> RequestContext:
    spec = spec or {}
    return RequestContext(
        actor=Actor(
            reference=spec.get("actor", "Practitioner/pr1"),
            organization=spec.get("organization"),
            groups=frozenset(spec.get("groups", [])),
            role=spec.get("role"),
        ),
        purpose=spec.get("purpose", "TREAT"),
        now=datetime.fromisoformat(spec.get("at", "2024-06-01T12:00:00+00:00")),
        action=spec.get("action", "access"),
    )


def labels_of(items: list[Any]) -> frozenset[Label]:
    return frozenset(
        Label(i.get("system", ""), i["code"]) if isinstance(i, dict) else Label("", i)
        for i in items
    )


DEFAULT_RESOURCE = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
    "subject": {"reference": "Patient/p1"},
    "effectiveDateTime": "2024-03-01",
}
