"""The change feed of what decides besides Consents (gateway.sources.deciding), against a
small FHIR server that keeps a type history the way R4 gives it (newest first, deletions as
``request.method = DELETE``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics
from gateway.sources.deciding import MAX_PAGES, DecidingFeed
from gateway.upstream import Upstream
from tests.conftest import serving


class History:
    """``<Type>/_history`` of a few types; ``status`` answers a type otherwise."""

    def __init__(self) -> None:
        self.entries: dict[str, list[dict[str, Any]]] = {}
        self.status: dict[str, int] = {}
        self.next_url: str | None = None  # a next link on every page
        self.asked: list[str] = []
        self.base = ""

    def change(self, rtype: str, rid: str, version: int, when: str, deleted: bool = False) -> None:
        if deleted:
            entry = {"request": {"method": "DELETE", "url": f"{rtype}/{rid}"},
                     "response": {"status": "204", "lastModified": when}}
        else:
            entry = {"resource": {"resourceType": rtype, "id": rid, "meta": {"versionId": str(version), "lastUpdated": when}},
                     "request": {"method": "PUT", "url": f"{rtype}/{rid}"}}
        self.entries.setdefault(rtype, []).insert(0, entry)

    async def handle(self, request: web.Request) -> web.Response:
        rtype = request.match_info["rtype"]
        self.asked.append(request.path_qs)
        if rtype in self.status:
            return web.Response(status=self.status[rtype], body=b"{}", content_type="application/fhir+json")
        entries = self.entries.get(rtype, [])
        since = request.query.get("_since")
        if since is not None:
            entries = [e for e in entries if _when(e) > since]
        entries = entries[: int(request.query.get("_count", "100"))]
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history", "entry": entries, "link": []}
        if self.next_url is not None:
            bundle["link"].append({"relation": "next", "url": self.next_url})
        return web.Response(body=orjson.dumps(bundle), content_type="application/fhir+json")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/fhir/{rtype}/_history", self.handle)
        return app


def _when(entry: dict[str, Any]) -> str:
    resource = entry.get("resource")
    return str(resource["meta"]["lastUpdated"] if resource else entry["response"]["lastModified"])


@pytest.fixture
async def history() -> AsyncIterator[tuple[History, Upstream]]:
    server = History()
    async with serving(server.app()) as root:
        server.base = root + "/fhir"
        upstream = Upstream(server.base, timeout_s=5, max_connections=4)
        await upstream.open()
        yield server, upstream
        await upstream.close()


def feed(upstream: Upstream, *types: str) -> tuple[DecidingFeed, list[tuple[str, str | None]]]:
    forgotten: list[tuple[str, str | None]] = []
    watched = {t: (lambda changed, t=t: forgotten.append((t, changed))) for t in types}
    return DecidingFeed(upstream, watched, Metrics(CollectorRegistry()), 1.0), forgotten


async def test_changes_after_the_first_poll_forget_what_they_name_once(history: tuple[History, Upstream]) -> None:
    server, upstream = history
    server.change("CareTeam", "old", 1, "2026-11-01T00:00:00.000Z")
    deciding, forgotten = feed(upstream, "CareTeam", "Medication")
    assert await deciding.poll_once() == 0, "the first poll only learns where each listing ends"
    assert forgotten == []
    server.change("CareTeam", "t1", 2, "2026-11-01T00:00:05.000Z")
    server.change("Medication", "m1", 1, "2026-11-01T00:00:06.000Z")
    server.change("Medication", "m2", 3, "2026-11-01T00:00:07.000Z", deleted=True)
    assert await deciding.poll_once() == 3
    assert sorted(forgotten) == [("CareTeam", "CareTeam/t1"), ("Medication", "Medication/m1"), ("Medication", "Medication/m2")]
    forgotten.clear()
    assert await deciding.poll_once() == 0, "versions read within the overlap are not acted on twice"
    assert forgotten == []
    server.change("Medication", "m1", 2, "2026-11-01T00:00:08.000Z")
    assert await deciding.poll_once() == 1
    assert forgotten == [("Medication", "Medication/m1")]
    assert all("_since=2026-11-01T00:00:" in q or "_count=1" in q for q in server.asked)


async def test_a_listing_too_long_to_read_forgets_every_copy_of_its_type(history: tuple[History, Upstream]) -> None:
    server, upstream = history
    deciding, forgotten = feed(upstream, "Group")
    await deciding.poll_once()
    server.change("Group", "g1", 1, "2026-11-01T00:00:05.000Z")
    server.next_url = f"{server.base}/Group/_history?_count=100&page=2"
    assert await deciding.poll_once() == 1
    assert forgotten == [("Group", None)]
    assert sum("/Group/_history?_since" in q or "page=2" in q for q in server.asked) == MAX_PAGES


async def test_an_entry_that_names_nothing_forgets_every_copy(history: tuple[History, Upstream]) -> None:
    server, upstream = history
    deciding, forgotten = feed(upstream, "Group")
    await deciding.poll_once()
    server.entries["Group"] = [{"response": {"status": "200", "lastModified": "2026-11-01T00:00:05.000Z"}}]
    await deciding.poll_once()
    assert forgotten == [("Group", None)]


async def test_a_type_without_history_is_asked_no_more(history: tuple[History, Upstream]) -> None:
    server, upstream = history
    server.status["Substance"] = 404
    deciding, forgotten = feed(upstream, "Substance", "Group")
    await deciding.poll_once()
    await deciding.poll_once()
    assert [q for q in server.asked if "Substance" in q] == ["/fhir/Substance/_history?_count=1"]
    assert list(deciding.histories) == ["Group"]


@pytest.mark.parametrize("trouble", ["server error", "not a bundle", "next link elsewhere"])
async def test_a_failed_poll_raises_and_resumes_from_the_same_instant(
    history: tuple[History, Upstream], trouble: str,
) -> None:
    server, upstream = history
    deciding, forgotten = feed(upstream, "Group")
    await deciding.poll_once()
    since = dict(deciding.since)
    server.change("Group", "g1", 1, "2026-11-01T00:00:05.000Z")
    if trouble == "server error":
        server.status["Group"] = 500
    elif trouble == "not a bundle":
        server.entries["Group"] = "nonsense"  # type: ignore[assignment]
    else:
        server.next_url = "http://elsewhere.invalid/fhir/Group/_history?page=2"
    with pytest.raises(Exception):
        await deciding.poll_once()
    assert deciding.since == since and forgotten == []
