"""What the gateway lets a ``$diff`` answer say (HAPI's ``Parameters`` of ``operation`` parts).

``$diff`` compares two records the requester may read (both decided before it runs), and
answers the differences as values: each changed element's ``path`` and its ``value`` /
``previousValue`` as primitives or complex values. Those values are the records as the server
holds them, before what the gateway removes on release: a ``Reference.display`` naming a record
not released (CONTRACT §6; "HIV-1 viral load 12000 copies/mL"), a narrative rendering such
records, an AuditEvent entity's description. So a difference in those elements goes whole, and
every ``display`` inside a value goes, whatever it names: the gateway cannot tell from a value
which record its display described. The references themselves stay, as in a read.

Pure; on a shape it does not know (no ``parameter`` list) it leaves the answer as it is (the
Parameters walk decides any resource in it).
"""

from __future__ import annotations

import re

from gateway.core.fhir import JSON

# The segments of an element path (``Condition.evidence[0].detail[0].display``), indices aside.
_SEGMENT = re.compile(r"\[[^\]]*\]")
# AuditEvent elements a release scrubs when its entity names a record not released.
_AUDIT_ENTITY = "AuditEvent.entity"


def _withheld_path(path: str) -> bool:
    """Whether a difference at ``path`` is in an element a release may remove: a display, a
    narrative (the resource's, a Composition section's), an AuditEvent entity."""
    segments = [s for s in _SEGMENT.sub("", path).split(".") if s]
    if not segments or path.startswith(_AUDIT_ENTITY):
        return bool(segments)
    if "display" in segments or "div" in segments:
        return True
    return any(seg == "text" and (i == 1 or segments[i - 1] == "section") for i, seg in enumerate(segments))


def _without_displays(value: object) -> bool:
    """Remove every ``display`` key inside ``value``, in place; True when one went."""
    changed = False
    if isinstance(value, dict):
        if "display" in value:
            del value["display"]
            changed = True
        for item in value.values():
            changed |= _without_displays(item)
    elif isinstance(value, list):
        for item in value:
            changed |= _without_displays(item)
    return changed


def scrub_differences(answer: JSON) -> bool:
    """Drop the differences a release would not show and every display inside a value, in
    place (module docstring); True when anything went."""
    params = answer.get("parameter")
    if answer.get("resourceType") != "Parameters" or not isinstance(params, list):
        return False
    kept: list[object] = []
    for param in params:
        parts = param.get("part") if isinstance(param, dict) else None
        path = next((p.get("valueString") for p in parts if isinstance(p, dict) and p.get("name") == "path"),
                    None) if isinstance(parts, list) else None
        if isinstance(path, str) and _withheld_path(path):
            continue
        kept.append(param)
    changed = len(kept) != len(params)
    for param in kept:
        if isinstance(param, dict):
            changed |= _without_displays({k: v for k, v in param.items() if k not in ("name", "resource")})
    if changed:
        answer["parameter"] = kept
    return changed
