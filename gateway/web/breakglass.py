"""Break-glass at the edge: the header, the audit before the answer, the emergency consent."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from aiohttp import web

from gateway.config import Settings
from gateway.core.breakglass import audit_event, emergency_consent, window_not_recorded_event
from gateway.core.errors import BadRequest, BreakGlassDisabled, GatewayError
from gateway.core.model import Actor
from gateway.web.enforcement import Emergency
from gateway.web.middleware import fresh_uuid
from gateway.web.state import GatewayState

log = logging.getLogger("gateway.breakglass")


def read_break_glass(request: web.Request, settings: Settings) -> str | None:
    """The configured reason in X-Break-Glass, None without the header; 400/403 otherwise."""
    raw = request.headers.get("X-Break-Glass")
    if raw is None:
        return None
    if not settings.break_glass.enabled:
        raise BreakGlassDisabled("Break-glass access is disabled on this gateway.")
    reason = raw.strip()
    if reason not in settings.break_glass.reasons:
        allowed = "; ".join(repr(r) for r in settings.break_glass.reasons)
        raise BadRequest(f"Unknown X-Break-Glass reason. Allowed reasons: {allowed}.")
    return reason


async def audit(
    state: GatewayState, emergency: Emergency, actor: Actor, interaction: str, status: int,
    extra_patients: frozenset[str] = frozenset(),
) -> str:
    """Write the AuditEvent (durably) and count it; returns the event id for the response header."""
    event_id = fresh_uuid()
    reason = emergency.reason
    if reason is None:
        windows = [w for w in emergency.windows.values() if w.consent in emergency.used]
        reason = next((w.reason for w in windows if w.reason), "Emergency access window")
    event = audit_event(
        event_id=event_id,
        actor=actor,
        interaction=interaction,
        status=status,
        reason=reason,
        now=datetime.now(timezone.utc),
        patients=sorted(emergency.patients | extra_patients),
        resources=emergency.returned,
        consents=sorted(emergency.used),
        consents_unknown=emergency.consents_unknown,
    )
    await state.audit.append(event)
    if emergency.reason is not None:
        state.metrics.count_break_glass(emergency.reason)
    return event_id


async def record_emergency_consents(
    state: GatewayState, emergency: Emergency, actor: Actor, audit_id: str = ""
) -> None:
    """Persist the access window for each patient whose denials were overridden.

    A window of this actor that is open and already covers the opened labels is not
    duplicated. A failure (the consents or the store cannot be reached) never fails the
    emergency access: it is logged and audited as "no window recorded" after the access's
    own AuditEvent (``audit_id``), so the audit trail says truthfully what happened.
    """
    if emergency.reason is None or not state.settings.break_glass.record_consent:
        return
    failed: list[str] = []
    for patient, labels in sorted(emergency.opened.items()):
        # One window per actor and patient, even when a chart fires its queries at once.
        async with state.window_lock(actor.reference, patient):
            now = datetime.now(timezone.utc)
            codes = {label.code for label in labels}
            try:
                current = (await state.store.get([patient]))[patient].emergency
                if any(w.actor == actor.reference and w.open_at(now) and codes <= w.labels for w in current):
                    continue
                consent = emergency_consent(actor, patient, labels, emergency.reason, now, state.settings.break_glass.duration_h)
                stored = await state.store.source.store_consent(consent)
            except GatewayError as exc:
                log.error("emergency consent could not be stored: %s", exc.code, extra={"actor": actor.reference})
                failed.append(patient)
                continue
            state.store.invalidate(patient)
            log.info("emergency consent stored", extra={"actor": actor.reference, "reasons": [stored]})
    if failed:
        await _audit_no_window(state, emergency.reason, actor, failed, audit_id)


async def _audit_no_window(state: GatewayState, reason: str, actor: Actor, patients: list[str], audit_id: str) -> None:
    event = window_not_recorded_event(
        event_id=fresh_uuid(), access_event_id=audit_id, actor=actor, reason=reason,
        now=datetime.now(timezone.utc), patients=patients,
    )
    try:
        await state.audit.append(event)
    except GatewayError:
        # The access itself is audited already; this line only says no window exists.
        log.error("audit of the missing emergency window failed", extra={"actor": actor.reference})
