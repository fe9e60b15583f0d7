"""The privacy officer's pages on the admin port (CONTRACT §10).

``GET /admin/disclosures?patient=&since=``: the accounting of disclosures as a FHIR Bundle.
``GET /admin/break-glass``: the emergency accesses from the audit file, server-rendered HTML
with filters (patient, actor, reason, since, open only). ``POST /admin/break-glass/review``
marks one reviewed; the mark is itself an AuditEvent in the audit file.
"""

from __future__ import annotations

import functools
import html
import ipaddress
import re
from datetime import datetime, timezone
from urllib.parse import urlencode

import orjson
from aiohttp import web

from gateway.audit import disclosures_path
from gateway.core.errors import BadRequest, OfficerOnly
from gateway.core.officer import review_event
from gateway.disclosures import EmergencyAccess, in_thread_accesses, in_thread_bundle, recorded_at
from gateway.web.middleware import Handler, fresh_uuid
from gateway.web.state import STATE

_PATIENT = re.compile(r"^Patient/[A-Za-z0-9\-.]{1,64}$")
_EVENT_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_FILTERS = ("patient", "actor", "reason", "since")


# "+01:00" written into a URL as-is arrives as " 01:00" ("+" is a space in a query string).
_UNENCODED_OFFSET = re.compile(r"(T[0-9:.]+) ([0-9]{2}:?[0-9]{2})$")


def _since(value: str | None) -> datetime | None:
    if not value:
        return None
    value = _UNENCODED_OFFSET.sub(r"\1+\2", value)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest("'since' must be an ISO 8601 date or date-time.") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


async def disclosures(request: web.Request) -> web.Response:
    """The disclosure AuditEvents of one patient (or all) since an instant, as a Bundle."""
    state = request.app[STATE]
    patient = request.query.get("patient")
    if patient is not None and not _PATIENT.match(patient):
        raise BadRequest("'patient' must be a reference such as Patient/123.")
    since = _since(request.query.get("since"))
    path = disclosures_path(state.settings.audit.path)
    bundle = await in_thread_bundle(path, patient, since)
    return web.Response(body=orjson.dumps(bundle), content_type="application/fhir+json")


def _matches(access: EmergencyAccess, query: dict[str, str], since: datetime | None) -> bool:
    if query.get("patient") and query["patient"] not in access.patients:
        return False
    if query.get("actor") and query["actor"] != access.actor:
        return False
    if query.get("reason") and query["reason"].lower() not in access.reason.lower():
        return False
    if query.get("open") and access.reviewed_by is not None:
        return False
    if since is not None:
        when = recorded_at({"recorded": access.recorded})
        if when is None or when < since:
            return False
    return True


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#1b1b1b;background:#fff}
h1{font-size:1.5em}table{border-collapse:collapse;width:100%;margin-top:1em}
th,td{border:1px solid #999;padding:.4em .6em;text-align:left;vertical-align:top}
th{background:#dde4ee}tr.open td{background:#fff3cd}tr.reviewed td{background:#e7f4e4}
form.filters label{margin-right:1em}input{font:inherit}
"""


def _row(access: EmergencyAccess) -> str:
    e = html.escape
    opened = "<br>".join(e(ref) for ref in access.opened) or "nothing consent would have denied"
    if access.reviewed_by is not None:
        review = f"reviewed by {e(access.reviewed_by)}"
    else:
        review = (
            '<form method="post" action="/admin/break-glass/review">'
            f'<input type="hidden" name="event" value="{e(access.event_id)}">'
            '<input name="reviewer" placeholder="reviewer" required maxlength="100"> '
            '<input name="note" placeholder="note" maxlength="500"> '
            '<button type="submit">Mark reviewed</button></form>'
        )
    state = "reviewed" if access.reviewed_by is not None else "open"
    return (
        f'<tr class="{state}" id="event-{e(access.event_id)}"><td>{e(access.recorded)}</td><td>{e(access.actor)}</td>'
        f"<td>{e(', '.join(access.patients))}</td><td>{e(access.reason)}</td>"
        f"<td>{opened}<br><small>{access.returned} resource(s) returned</small></td><td>{review}</td></tr>"
    )


def render_page(accesses: list[EmergencyAccess], query: dict[str, str]) -> str:
    """The review page: a filter form and one row per emergency access."""
    e = html.escape
    inputs = "".join(
        f'<label>{name} <input name="{name}" value="{e(query.get(name, ""))}"></label>' for name in _FILTERS
    )
    checked = " checked" if query.get("open") else ""
    rows = "".join(_row(a) for a in accesses) or '<tr><td colspan="6">No emergency accesses match.</td></tr>'
    open_count = sum(1 for a in accesses if a.reviewed_by is None)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<title>Break-glass review</title>"
        f"<style>{_STYLE}</style></head><body>"
        "<h1>Emergency (break-glass) accesses</h1>"
        f"<p>{len(accesses)} shown, {open_count} not yet reviewed.</p>"
        f'<form class="filters" method="get" action="/admin/break-glass">{inputs}'
        f'<label><input type="checkbox" name="open" value="1"{checked}> open only</label>'
        '<button type="submit">Filter</button></form>'
        '<table id="accesses"><thead><tr><th>When</th><th>Who</th><th>Patient</th><th>Reason</th>'
        "<th>What was opened</th><th>Review</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></body></html>"
    )


async def break_glass_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    query = {k: v for k, v in request.query.items() if k in (*_FILTERS, "open") and v}
    since = _since(query.get("since"))
    accesses = [a for a in await in_thread_accesses(state.audit.path) if _matches(a, query, since)]
    return web.Response(
        text=render_page(accesses, query), content_type="text/html", charset="utf-8",
        headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
                 "Cache-Control": "no-store"},
    )


async def mark_reviewed(request: web.Request) -> web.Response:
    """Mark one emergency access reviewed: an AuditEvent, durable before the page answers."""
    state = request.app[STATE]
    origin = request.headers.get("Origin")
    # SECURITY: a page on another origin must not mark reviews through the officer's browser.
    if origin is not None and origin not in ("null", f"{request.scheme}://{request.host}"):
        raise BadRequest("The review must be sent from the review page.")
    if request.content_type != "application/x-www-form-urlencoded":
        raise BadRequest("The review must be a form post.")
    form = await request.post()
    event, reviewer, note = (str(form.get(k, "")).strip() for k in ("event", "reviewer", "note"))
    if not _EVENT_ID.match(event):
        raise BadRequest("'event' must be the id of a break-glass AuditEvent.")
    if not reviewer or len(reviewer) > 100 or len(note) > 500:
        raise BadRequest("'reviewer' is required (at most 100 characters; a note at most 500).")
    accesses = await in_thread_accesses(state.audit.path)
    if not any(a.event_id == event for a in accesses):
        raise BadRequest("'event' must be the id of a break-glass AuditEvent.")
    await state.audit.append(review_event(
        event_id=fresh_uuid(), reviewed=event, reviewer=reviewer, now=datetime.now(timezone.utc), note=note,
    ))
    back = {k: v for k, v in request.query.items() if k in (*_FILTERS, "open")}
    raise web.HTTPSeeOther("/admin/break-glass" + (f"?{urlencode(back)}" if back else "") + f"#event-{event}")


@functools.lru_cache(maxsize=8)
def _networks(spelled: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in spelled)


def is_officer_peer(remote: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether the peer address ``remote`` is in one of the ``allowed`` networks (an IPv4
    peer written as IPv6, ``::ffff:10.0.0.1``, as its IPv4 self); no address is no peer."""
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in _networks(allowed) if network.version == address.version)


@web.middleware
async def officer_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The officer's pages answer only peers in ``admin.officer_from``.

    SECURITY: they list who saw which sensitive records of which patient, and an admin port
    is opened to monitoring (the chart binds it to the pod IP). The peer is the socket's, never
    a forwarded header."""
    if request.path.startswith("/admin/") and not is_officer_peer(
        request.remote, request.app[STATE].settings.admin.officer_from
    ):
        raise OfficerOnly("The privacy officer's pages answer only from admin.officer_from.")
    return await handler(request)


def add_routes(app: web.Application) -> None:
    app.middlewares.append(officer_only)
    app.router.add_get("/admin/disclosures", disclosures)
    app.router.add_get("/admin/break-glass", break_glass_page)
    app.router.add_post("/admin/break-glass/review", mark_reviewed)
