"""An in-process fake FHIR upstream for fast tests: real sockets, recorded requests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

FHIR_JSON = "application/fhir+json"


@dataclass
class Recorded:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeFhir:
    """Resources by ``Type/id``; searches by type with optional ``patient``/``subject``.

    ``override`` lets a test answer a path its own way; ``delay_s`` slows every answer.
    """

    base_path: str = "/fhir"
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    override: Callable[[web.Request], Awaitable[web.StreamResponse | None]] | None = None
    delay_s: float = 0.0
    base_url: str = ""
    unrecorded: frozenset[str] = frozenset({"/fhir/Consent?_count=1&_elements=id"})

    def add(self, *resources: dict[str, Any]) -> None:
        for res in resources:
            self.resources[f"{res['resourceType']}/{res['id']}"] = res

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def bundle(self, resources: list[dict[str, Any]], self_url: str) -> dict[str, Any]:
        return {
            "resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "link": [{"relation": "self", "url": self_url}],
            "entry": [
                {"fullUrl": f"{self.base_url}/{r['resourceType']}/{r['id']}", "resource": r,
                 "search": {"mode": "match"}}
                for r in resources
            ],
        }

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        # The readiness probe of the consent source comes at its own pace; tests count the rest.
        if request.path_qs not in self.unrecorded:
            self.requests.append(Recorded(request.method, request.path_qs, dict(request.headers), body))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.override is not None:
            answer = await self.override(request)
            if answer is not None:
                return answer
        path = request.path
        if path.startswith(self.base_path):
            path = path[len(self.base_path):]
        parts = [p for p in path.split("/") if p]
        if parts == ["metadata"]:
            return _json({"resourceType": "CapabilityStatement", "status": "active", "fhirVersion": "4.0.1"})
        if request.method == "GET" and len(parts) == 2:
            res = self.resources.get("/".join(parts))
            if res is None:
                return _json(_outcome("not-found"), 404)
            return _json(res)
        if request.method == "GET" and len(parts) == 1:
            patient = request.query.get("patient") or request.query.get("subject")
            status = request.query.get("status")
            found = [
                r for key, r in self.resources.items()
                if key.startswith(parts[0] + "/")
                and (patient is None or any(_refers(r, p) for p in patient.split(",")))
                and (status is None or r.get("status") == status)
            ]
            return _json(self.bundle(found, f"{self.base_url}/{parts[0]}?{request.query_string}"))
        if request.method in ("POST", "PUT") and parts:
            res = orjson.loads(body)
            res.setdefault("id", f"new{len(self.resources)}")
            self.add(res)
            loc = f"{self.base_url}/{res['resourceType']}/{res['id']}/_history/1"
            return _json(res, 201 if request.method == "POST" else 200, {"Location": loc})
        return _json(_outcome("not-supported"), 400)


def _refers(resource: dict[str, Any], patient: str) -> bool:
    target = patient if "/" in patient else f"Patient/{patient}"
    for key in ("patient", "subject", "beneficiary"):
        ref = resource.get(key)
        if isinstance(ref, dict) and ref.get("reference") == target:
            return True
    return False


def _outcome(code: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code}]}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=FHIR_JSON, headers=headers)
