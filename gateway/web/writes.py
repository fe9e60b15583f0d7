"""Consent writes passing through the gateway evict the affected patients' cached consents."""

from __future__ import annotations

from collections.abc import Iterator

import orjson

from gateway.core.fhir import JSON, reference_of, relative_reference

# Interactions whose answers pass unchecked: the client's own write echoed back.
WRITE_INTERACTIONS = frozenset({"create", "update", "patch", "delete"})


def _consent_patient(resource: object) -> str | None:
    if isinstance(resource, dict) and resource.get("resourceType") == "Consent":
        ref = reference_of(resource.get("patient"))
        return relative_reference(ref) if ref else None
    return None


def _entries(bundle: JSON) -> Iterator[JSON]:
    for entry in bundle.get("entry") or ():
        if isinstance(entry, dict):
            yield entry


def touched_consent_patients(
    method: str, resource_type: str | None, request_body: bytes | None, response_body: bytes
) -> set[str | None] | None:
    """Patients whose consents a write may have changed (None in the set: unknown, evict all).

    Returns None when the write touched no Consent.
    """
    touched: set[str | None] = set()
    bodies = [b for b in (request_body, response_body) if b]
    parsed: list[object] = []
    for raw in bodies:
        try:
            parsed.append(orjson.loads(raw))
        except orjson.JSONDecodeError:
            parsed.append(None)
    if resource_type == "Consent":
        touched.update(_consent_patient(p) for p in parsed)
        touched.discard(None)
        if not touched or method in ("DELETE", "PATCH"):
            touched.add(None)
        return touched
    if resource_type is None and method == "POST":
        for body in parsed:
            if isinstance(body, dict) and body.get("resourceType") == "Bundle":
                for entry in _entries(body):
                    url = str((entry.get("request") or {}).get("url", "")) if isinstance(entry.get("request"), dict) else ""
                    resource = entry.get("resource")
                    if url.startswith("Consent") or _consent_patient(resource) is not None:
                        touched.add(_consent_patient(resource))
                        if not url.startswith("Consent?") and (entry.get("request") or {}).get("method") in ("DELETE", "PATCH"):
                            touched.add(None)
    return touched or None
