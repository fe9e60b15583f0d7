"""Consents kept as FHIR R4 ``Consent`` resources on a FHIR server (default: the upstream)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from urllib.parse import quote

import orjson
from yarl import URL

from gateway.core.compartment import references_of
from gateway.core.errors import ConsentUnavailable
from gateway.core.fhir import NO_BASES, Bases, JSON, local_reference, normal_base, reference_of, relative_reference
from gateway.sources.store import ConsentChange
from gateway.upstream import Upstream, UpstreamResponse

log = logging.getLogger("gateway.changes")

MAX_PAGES = 200
# A change listing longer than this many pages evicts every cached patient instead.
MAX_CHANGE_PAGES = 50
_HEADERS = {"Accept": "application/fhir+json"}
# A server answering a search parameter it does not support (MedicaSoft-style servers know only
# ``patient`` and ``category`` for Consent) with one of these is asked again without it.
_REJECTED = frozenset({400, 422})


class _SearchRejected(ConsentUnavailable):
    """The server refused the search as asked (a parameter it does not support)."""

    def __init__(self) -> None:
        super().__init__("Consent information is unavailable.")


class _TooManyPages(ConsentUnavailable):
    def __init__(self, partial: list[JSON]) -> None:
        super().__init__("Consent information is unavailable.")
        self.partial = partial


class FhirConsentSource:
    """``Consent?patient=P1,P2&status=active``, following ``next`` pages on the same server.

    A server that rejects ``status`` is asked without it (and then ``_count``), from then on,
    and only the active Consents of its answer are kept.
    """

    def __init__(self, server: Upstream, page_size: int = 100, ours: Bases = NO_BASES) -> None:
        self.server = server
        # The bases under which a Consent's absolute patient reference names a patient of this
        # FHIR system: the gateway's (``own_bases``) and the consent server's own.
        self.ours = ours | {normal_base(server.base_url)}
        self.page_size = page_size
        self._filters: tuple[str, ...] = ("status=active", f"_count={page_size}")
        self.history = True  # the server lists deletions in Consent/_history

    async def _pages(self, first: URL, max_pages: int = MAX_PAGES) -> list[JSON]:
        resources: list[JSON] = []
        url: URL | None = first
        for page in range(max_pages):
            if url is None:
                return resources
            bundle = await self._get_bundle(url, first_page=page == 0)
            resources.extend(_matches(bundle))
            url = self._next(bundle)
        if url is None:
            return resources
        raise _TooManyPages(resources)

    async def _get_bundle(self, url: URL, *, first_page: bool = False) -> JSON:
        resp = await self.server.request("GET", url, headers=_HEADERS)
        if first_page and resp.status in _REJECTED:
            raise _SearchRejected()
        return self._bundle_of(resp)

    def _bundle_of(self, resp: UpstreamResponse) -> JSON:
        return bundle_of(resp, ConsentUnavailable("Consent information is unavailable."))

    def _next(self, bundle: JSON) -> URL | None:
        return next_page(bundle, self.server, ConsentUnavailable("Consent information is unavailable."))

    async def _consents(self, patients: Sequence[str]) -> list[JSON]:
        """The patients' Consents, dropping filters the server rejects (status, then _count)."""
        base = f"patient={','.join(quote(p, safe='/') for p in patients)}"
        while True:
            query = "&".join((base, *self._filters))
            try:
                found = await self._pages(self.server.url_for("Consent", query))
            except _SearchRejected:
                if not self._filters:
                    raise ConsentUnavailable("Consent information is unavailable.") from None
                self._filters = self._filters[1:]
                continue
            if "status=active" in self._filters:
                return found
            # SECURITY: the server did not filter by status; only active Consents are in force.
            return [c for c in found if c.get("status") == "active"]

    async def fetch(self, patients: Sequence[str]) -> dict[str, list[JSON]]:
        wanted = {p: [] for p in patients}  # type: dict[str, list[JSON]]
        for consent in await self._consents(patients):
            patient = reference_of(consent.get("patient"))
            owner = local_reference(patient, self.ours) if patient else None
            # SECURITY: a consent for someone else (or no one, or another server's patient of
            # the same id) means the answer cannot be trusted.
            if owner not in wanted:
                raise ConsentUnavailable("Consent information is unavailable.")
            wanted[owner].append(consent)
        return wanted

    async def references(self, target: str) -> frozenset[str] | None:
        """What ``target`` (``Type/id``) refers to, read with the gateway's own credentials.

        None when the read fails (the condition it serves is then unknown); an empty set when
        the server says the instance does not exist (it refers to nothing).
        """
        rtype, _, rid = target.partition("/")
        if not rtype.isalpha() or not rid or "/" in rid:
            return None
        try:
            resp = await self.server.request("GET", self.server.url_for(f"{rtype}/{quote(rid, safe='')}"), headers=_HEADERS)
        except Exception:
            return None
        if resp.status in (404, 410):
            return frozenset()
        if resp.status != 200:
            return None
        try:
            resource = orjson.loads(resp.body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(resource, dict) or resource.get("resourceType") != rtype:
            return None
        return references_of(resource, self.ours)

    async def memberships(self, actor: str) -> frozenset[str]:
        refs: set[str] = set()
        for rtype, param in (("Group", "member"), ("CareTeam", "participant")):
            query = f"{param}={quote(actor, safe='/')}&_elements=id&_count={self.page_size}"
            try:
                found = await self._pages(self.server.url_for(rtype, query))
            except _SearchRejected:
                raise ConsentUnavailable("Consent information is unavailable.") from None
            for res in found:
                if res.get("resourceType") == rtype and isinstance(res.get("id"), str):
                    refs.add(f"{rtype}/{res['id']}")
        return frozenset(refs)

    async def latest_change(self) -> datetime | None:
        """The server's newest ``Consent.meta.lastUpdated`` (its own clock), None when it has none."""
        query = "_sort=-_lastUpdated&_count=1"
        page = await self._get_bundle(self.server.url_for("Consent", query))
        return max((u for u in map(_updated, _matches(page)) if u is not None), default=None)

    async def changes(self, since: datetime) -> list[ConsentChange]:
        """Consents of any status changed after ``since`` (``Consent?_lastUpdated=gt``), paged.

        A listing too long to read in one poll yields one change with no patient: evict all.
        """
        query = f"_lastUpdated=gt{instant_text(since)}&_sort=_lastUpdated&_count={self.page_size}"
        try:
            found = await self._pages(self.server.url_for("Consent", query), MAX_CHANGE_PAGES)
        except _TooManyPages as exc:
            found = exc.partial
            newest = max((u for u in map(_updated, found) if u is not None), default=None)
            return [ConsentChange("*", None, newest)]
        listed = [_change(c) for c in found if c.get("resourceType") == "Consent"]
        return listed + await self._deletions(since)

    async def _deletions(self, since: datetime) -> list[ConsentChange]:
        """Consents deleted after ``since``: the search cannot list them, the type history can.

        A server without type-level history (4xx) is asked no more; deletions then reach
        other replicas within ``cache_ttl_s`` (those through this gateway evict at once).
        """
        if not self.history:
            return []
        url: URL | None = self.server.url_for("Consent/_history", f"_since={instant_text(since)}&_count={self.page_size}")
        deleted: list[ConsentChange] = []
        for _ in range(MAX_CHANGE_PAGES):
            if url is None:
                return deleted
            resp = await self.server.request("GET", url, headers=_HEADERS)
            if 400 <= resp.status < 500:
                self.history = False
                log.warning("the consent source has no Consent/_history; deletions are not polled")
                return deleted
            bundle = self._bundle_of(resp)
            deleted.extend(_deletions_in(bundle))
            url = self._next(bundle)
        return [ConsentChange("*", None, None)]

    async def probe(self) -> bool:
        """One cheap search through the gateway's own credentials: does the source answer?"""
        _matches(await self._get_bundle(self.server.url_for("Consent", "_count=1&_elements=id")))
        return True

    async def store_consent(self, consent: JSON) -> str:
        resp = await self.server.request(
            "POST", self.server.url_for("Consent"), body=orjson.dumps(consent),
            headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
        )
        if not 200 <= resp.status < 300:
            raise ConsentUnavailable("The emergency consent could not be stored.")
        try:
            stored = orjson.loads(resp.body) if resp.body else {}
        except orjson.JSONDecodeError:
            stored = {}
        cid = stored.get("id") if isinstance(stored, dict) else None
        if not isinstance(cid, str):
            location = resp.headers.get("Location", "")
            cid = relative_reference(location).split("/")[-1] if location else ""
        return f"Consent/{cid}"


def bundle_of(resp: UpstreamResponse, failure: Exception) -> JSON:
    """The Bundle of a 200 answer; raises ``failure`` for anything else."""
    if resp.status != 200:
        raise failure
    try:
        bundle = orjson.loads(resp.body)
    except orjson.JSONDecodeError:
        raise failure from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise failure
    return bundle


def next_page(bundle: JSON, server: Upstream, failure: Exception) -> URL | None:
    """The Bundle's ``next`` link; raises ``failure`` when it leads off ``server``."""
    for link in bundle.get("link") or ():
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            url = URL(link["url"], encoded=True)
            # SECURITY: never follow a paging link off the server.
            if url.origin() != server.base.origin():
                raise failure
            return url
    return None


def _matches(bundle: JSON) -> list[JSON]:
    """Search matches of a page; an error outcome in the page fails the lookup."""
    out: list[JSON] = []
    for entry in bundle.get("entry") or ():
        if not isinstance(entry, dict):
            raise ConsentUnavailable("Consent information is unavailable.")
        resource = entry.get("resource")
        mode = (entry.get("search") or {}).get("mode", "match") if isinstance(entry.get("search"), dict) else "match"
        if not isinstance(resource, dict):
            raise ConsentUnavailable("Consent information is unavailable.")
        rtype = resource.get("resourceType")
        if rtype == "OperationOutcome":
            if any(i.get("severity") in ("error", "fatal") for i in resource.get("issue") or () if isinstance(i, dict)):
                raise ConsentUnavailable("Consent information is unavailable.")
            continue
        if mode == "match" or rtype in ("Consent", "Group", "CareTeam"):
            out.append(resource)
    return out


def _updated(resource: JSON) -> datetime | None:
    meta = resource.get("meta")
    return parse_instant(meta.get("lastUpdated") if isinstance(meta, dict) else None)


def parse_instant(raw: object) -> datetime | None:
    """A FHIR instant (the server's clock); None when absent or unreadable."""
    if not isinstance(raw, str):
        return None
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def instant_text(when: datetime) -> str:
    """``when`` as a FHIR instant in UTC, to the millisecond."""
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _change(consent: JSON) -> ConsentChange:
    """Which patient a changed Consent concerns; one that names none evicts everyone."""
    meta = consent.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    updated = _updated(consent)
    key = f"Consent/{consent.get('id')}|{version or (updated.isoformat() if updated else '')}"
    patient = reference_of(consent.get("patient"))
    return ConsentChange(key, relative_reference(patient) if patient else None, updated)


def _deletions_in(bundle: JSON) -> list[ConsentChange]:
    """The DELETE entries of a history page, as changes naming the deleted Consent."""
    found: list[ConsentChange] = []
    for entry in bundle.get("entry") or ():
        request = entry.get("request") if isinstance(entry, dict) else None
        if not isinstance(request, dict) or request.get("method") != "DELETE":
            continue
        target = request.get("url")
        if not isinstance(target, str) or not target.startswith("Consent/"):
            continue
        ref = "/".join(target.split("?")[0].split("/")[:2])
        response = entry.get("response") if isinstance(entry.get("response"), dict) else {}
        when = _updated({"meta": {"lastUpdated": response.get("lastModified")}})
        found.append(ConsentChange(f"{ref}|deleted|{response.get('lastModified')}", None, when, consent=ref))
    return found
