"""Reading the audit files back: disclosures for a patient, break-glass accesses and reviews.

The files are JSON lines of AuditEvents (``audit.AuditLog``); a line that does not parse (cut
short by a crash) is skipped.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import orjson

from gateway.core.fhir import JSON
from gateway.core.officer import DISCLOSURE_TAG, REVIEW_TAG, entity_references, is_break_glass, tags_of


def read_events(path: Path) -> Iterator[JSON]:
    """Every AuditEvent in ``path``, oldest first (none when the file does not exist)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    for line in data.splitlines():
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("resourceType") == "AuditEvent":
            yield event


def recorded_at(event: JSON) -> datetime | None:
    try:
        return datetime.fromisoformat(str(event.get("recorded", "")).replace("Z", "+00:00"))
    except ValueError:
        return None


def patients_of_event(event: JSON) -> list[str]:
    return [
        str(e["what"]["reference"]) for e in event.get("entity") or ()
        if isinstance(e, dict) and isinstance(e.get("what"), dict)
        and isinstance(e.get("role"), dict) and e["role"].get("code") == "1"
        and isinstance(e["what"].get("reference"), str)
    ]


def _since_ok(event: JSON, since: datetime | None) -> bool:
    if since is None:
        return True
    when = recorded_at(event)
    return when is not None and when >= since


def disclosures_bundle(path: Path, patient: str | None, since: datetime | None) -> JSON:
    """A searchset Bundle of the disclosure AuditEvents about ``patient`` since ``since``."""
    found = [
        e for e in read_events(path)
        if DISCLOSURE_TAG in tags_of(e) and (patient is None or patient in patients_of_event(e)) and _since_ok(e, since)
    ]
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(found),
        "entry": [
            {"fullUrl": _full_url(e), "resource": e, "search": {"mode": "match"}} for e in found
        ],
    }


def _full_url(event: JSON) -> str:
    """An absolute URL for the event (R4 ``Bundle.entry.fullUrl``): its id is a UUID the
    gateway made, so ``urn:uuid:<id>``; any other id as the relative ``AuditEvent/<id>``."""
    event_id = str(event.get("id"))
    try:
        is_uuid = str(uuid.UUID(event_id)) == event_id
    except ValueError:
        is_uuid = False
    return f"urn:uuid:{event_id}" if is_uuid else f"AuditEvent/{event_id}"


@dataclass(frozen=True)
class EmergencyAccess:
    """One break-glass AuditEvent as the review page shows it."""

    event_id: str
    recorded: str
    actor: str
    patients: tuple[str, ...]
    reason: str
    opened: tuple[str, ...]           # resources returned that consent would have denied
    returned: int
    reviewed_by: str | None


def _actor(event: JSON) -> str:
    for agent in event.get("agent") or ():
        if isinstance(agent, dict) and agent.get("requestor") and isinstance(agent.get("who"), dict):
            return str(agent["who"].get("reference") or agent["who"].get("display") or "")
    return ""


def _reason(event: JSON) -> str:
    for purpose in event.get("purposeOfEvent") or ():
        if isinstance(purpose, dict) and purpose.get("text"):
            return str(purpose["text"])
    return ""


def _opened(event: JSON) -> tuple[tuple[str, ...], int]:
    opened: list[str] = []
    returned = 0
    for entity in event.get("entity") or ():
        if not isinstance(entity, dict) or not isinstance(entity.get("what"), dict):
            continue
        details = entity.get("detail") or ()
        if not details:
            continue
        returned += 1
        if any(isinstance(d, dict) and d.get("valueString") == "true" for d in details):
            opened.append(str(entity["what"].get("reference")))
    return tuple(opened), returned


def emergency_accesses(path: Path) -> list[EmergencyAccess]:
    """Every break-glass access in the audit file, newest first, with its review if any."""
    events = list(read_events(path))
    reviews: dict[str, str] = {}
    for event in events:
        if REVIEW_TAG in tags_of(event):
            for ref in entity_references(event):
                reviews.setdefault(ref.removeprefix("AuditEvent/"), _actor(event))
    accesses = []
    for event in events:
        if not is_break_glass(event):
            continue
        event_id = str(event.get("id"))
        opened, returned = _opened(event)
        accesses.append(EmergencyAccess(
            event_id=event_id, recorded=str(event.get("recorded", "")), actor=_actor(event),
            patients=tuple(patients_of_event(event)), reason=_reason(event), opened=opened,
            returned=returned, reviewed_by=reviews.get(event_id),
        ))
    accesses.reverse()
    return accesses


async def in_thread_bundle(path: Path, patient: str | None, since: datetime | None) -> JSON:
    return await asyncio.to_thread(disclosures_bundle, path, patient, since)


async def in_thread_accesses(path: Path) -> list[EmergencyAccess]:
    return await asyncio.to_thread(emergency_accesses, path)
