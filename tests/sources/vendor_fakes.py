"""In-process fakes of the consent platforms' APIs, serving their documented shapes.

Each fake keeps vendor records per vendor patient id, checks the credential header,
pages as the API documents, records every request, and can be told to fail.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

SECRET = "clk_test_5f2c9a"  # the credential the tests put in the environment
HEALTHEINTENT_BASE = "/patient-consent/v1"


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class FakeVendor:
    """Records by vendor patient id; ``page_size`` forces paging; ``fail_status`` fails every call."""

    records: dict[str, list[Any]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    page_size: int = 2
    fail_status: int | None = None
    base_url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = orjson.loads(raw) if raw else None
        self.seen.append(Seen(request.method, request.path, dict(request.query), dict(request.headers), body))
        if self.fail_status is not None:
            return _json({"code": self.fail_status, "message": "failure"}, self.fail_status)
        if not self.authorized(request):
            return _json({"code": 401, "message": "Unauthorized"}, 401)
        return await self.handle(request, body)

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == SECRET

    async def handle(self, request: web.Request, body: Any) -> web.StreamResponse:
        raise NotImplementedError

    def requests_to(self, suffix: str) -> list[Seen]:
        return [s for s in self.seen if s.path.endswith(suffix)]


@dataclass
class FakeClinikApi(FakeVendor):
    """``GET /v1/consents?patientId=&status=&count=&cursor=`` -> ``{data, meta: {nextCursor}}``;
    ``GET /v1/documents?patientId=&count=&cursor=`` the same way from ``documents``."""

    documents: dict[str, list[Any]] = field(default_factory=dict)

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("x-api-key") == SECRET

    async def handle(self, request: web.Request, body: Any) -> web.StreamResponse:
        if request.method != "GET" or request.path not in ("/v1/consents", "/v1/documents"):
            return _json({"error": "not found"}, 404)
        stored = self.records if request.path == "/v1/consents" else self.documents
        records = [
            r for r in stored.get(request.query.get("patientId", ""), [])
            if "status" not in request.query or r.get("status") == request.query["status"]
        ]
        start = int(request.query.get("cursor", "0").removeprefix("cur_") or 0)
        size = min(int(request.query.get("count", "20")), self.page_size)
        meta: dict[str, Any] = {"requestId": str(uuid.uuid4()), "status": 200}
        if start + size < len(records):
            meta["nextCursor"] = f"cur_{start + size}"
        return _json({"data": records[start:start + size], "meta": meta})


class FakeHealthEx(FakeVendor):
    """``POST /getPatientConsents`` -> ``[{patientId, consents}]`` for the one identifier given."""

    async def handle(self, request: web.Request, body: Any) -> web.StreamResponse:
        if request.method != "POST" or not isinstance(body, dict) or not body.get("consentTypes"):
            return _json({"message": "consentTypes is required"}, 400)
        key = next((body[k] for k in ("patientId", "patientMRN", "externalId") if k in body), None)
        groups = self.records.get(key or "", [])
        wanted = set(body["consentTypes"])
        consented = set(body.get("hasConsented", [True]))
        return _json([
            {**group, "consents": [
                c for c in group["consents"]
                if c["consentType"] in wanted and c["hasPatientConsented"] in consented
            ]}
            for group in groups
        ])


class FakeHealtheIntent(FakeVendor):
    """``/populations/{p}/patients/{id}/patient-consents``: paged GET, and POST to create."""

    population: str = "f66b0897-48fa-4965-8525-46d6ab5d05b4"
    stuck_next_link: bool = False

    async def handle(self, request: web.Request, body: Any) -> web.StreamResponse:
        parts = request.path.removeprefix(HEALTHEINTENT_BASE).strip("/").split("/")
        if len(parts) != 5 or parts[0] != "populations" or parts[4] != "patient-consents" \
                or parts[1] != self.population:
            return _json({"code": 404, "message": "Not Found"}, 404)
        patient = parts[3]
        if request.method == "POST":
            return self._create(patient, body)
        items = self.records.get(patient, [])
        limit = int(request.query.get("page[limit]", "20"))
        if not 1 <= limit <= 100:
            return _json({"code": 400, "message": "page[limit] must be 1-100"}, 400)
        cursor = request.query.get("page[nextLink]", "")
        start = next((i for i, r in enumerate(items) if _next_link(r) == cursor), 0) if cursor else 0
        page = items[start:start + min(limit, self.page_size)]
        rest = items[start + len(page):]
        next_link = _next_link(rest[0]) if rest else ""
        if self.stuck_next_link and items:
            next_link = _next_link(items[0])
        return _json({"items": page, "nextLink": next_link})

    def _create(self, patient: str, body: Any) -> web.Response:
        required = ("createdBy", "category", "effectivePeriod", "provisionScope")
        if not isinstance(body, dict) or any(k not in body for k in required):
            return _json({"code": 400, "message": "Bad Request"}, 400)
        scope = body["provisionScope"]
        if not scope.get("organization") or not scope.get("organizationGroup"):
            return _json({"code": 400, "message": "provisionScope needs organization and group"}, 400)
        record = {
            **body,
            "category": {"concept": body["category"]},
            "consentId": str(uuid.uuid4()),
            "recordedDateTime": body["effectivePeriod"]["start"],
        }
        self.records.setdefault(patient, []).append(record)
        return _json(record, 201)


def _next_link(record: dict[str, Any]) -> str:
    return f"{record['consentId']}_{record['recordedDateTime']}"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")
