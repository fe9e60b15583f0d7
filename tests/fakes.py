"""An in-process fake FHIR upstream for fast tests: real sockets, recorded requests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
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
        if request.method in ("GET", "HEAD") and len(parts) == 2:
            res = self.resources.get("/".join(parts))
            if res is None:
                return _json(_outcome("not-found"), 404)
            return _json(res)
        if request.method == "GET" and len(parts) == 1:
            patient = request.query.get("patient") or request.query.get("subject")
            status = request.query.get("status")
            wanted = request.query.get("_id")
            found = [
                r for key, r in self.resources.items()
                if key.startswith(parts[0] + "/")
                and (wanted is None or r.get("id") in wanted.split(","))
                and (patient is None or any(_refers(r, p) for p in patient.split(",")))
                and (status is None or r.get("status") == status)
            ]
            return _json(self.bundle(found, f"{self.base_url}/{parts[0]}?{request.query_string}"))
        if request.method == "POST" and not parts and body:
            batch = await self._batch(body)
            if batch is not None:
                return batch
        if request.method == "DELETE" and len(parts) == 2:
            if self.resources.pop("/".join(parts), None) is None:
                return _json(_outcome("not-found"), 404)
            return _json(_outcome("informational", "information"))
        if request.method == "GET" and len(parts) == 3 and parts[2] == "_history":
            res = self.resources.get("/".join(parts[:2]))
            if res is None:
                return _json(_outcome("not-found"), 404)
            return _json(_history([res], self.base_url))
        if request.method == "GET" and len(parts) == 4 and parts[2] == "_history":
            res = self.resources.get("/".join(parts[:2]))
            if res is None:
                return _json(_outcome("not-found"), 404)
            return _json(res)
        if request.method == "GET" and len(parts) == 3 and parts[2] == "$meta":
            res = self.resources.get("/".join(parts[:2]))
            if res is None:
                return _json(_outcome("not-found"), 404)
            return _json({"resourceType": "Parameters",
                          "parameter": [{"name": "return", "valueMeta": res.get("meta", {})}]})
        if request.method in ("POST", "PUT") and parts:
            res = orjson.loads(body)
            res.setdefault("id", f"new{len(self.resources)}")
            self.add(res)
            loc = f"{self.base_url}/{res['resourceType']}/{res['id']}/_history/1"
            return _json(res, 201 if request.method == "POST" else 200, {"Location": loc})
        return _json(_outcome("not-supported"), 400)


    async def _batch(self, body: bytes) -> web.Response | None:
        """A batch/transaction: each entry sent to this same server as a request of its own
        (so overrides and recording see it), answered as a batch-/transaction-response."""
        try:
            bundle = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" \
                or bundle.get("type") not in ("batch", "transaction"):
            return None
        slots = []
        async with aiohttp.ClientSession() as session:
            for entry in bundle.get("entry") or ():
                request = entry.get("request") or {}
                url = str(request.get("url", ""))
                if "://" in url.split("?", 1)[0]:  # an absolute URL, not one in a query value
                    url = url.split("://", 1)[1].split("/", 1)[1] if "/" in url.split("://", 1)[1] else ""
                    url = url.removeprefix(self.base_path.strip("/")).lstrip("/")
                data = orjson.dumps(entry["resource"]) if entry.get("resource") is not None else None
                headers = {"Content-Type": FHIR_JSON, BATCH_ENTRY_HEADER: "1"} if data else {BATCH_ENTRY_HEADER: "1"}
                async with session.request(str(request.get("method", "GET")), f"{self.base_url}/{url.lstrip('/')}",
                                           data=data, headers=headers) as resp:
                    raw = await resp.read()
                    status = f"{resp.status} {resp.reason}"
                    location = resp.headers.get("Location")
                answer = orjson.loads(raw) if raw else None
                response: dict[str, Any] = {"status": status}
                if location:
                    response["location"] = location
                slot: dict[str, Any] = {"response": response}
                if isinstance(answer, dict) and answer.get("resourceType") == "OperationOutcome":
                    if resp.status >= 400:
                        response["outcome"] = answer
                elif answer is not None:
                    slot["resource"] = answer
                slots.append(slot)
        return _json({"resourceType": "Bundle", "type": f"{bundle['type']}-response", "entry": slots})


# A request the fake sent to itself for one entry of a batch/transaction.
BATCH_ENTRY_HEADER = "X-Fake-Batch-Entry"


def _history(versions: list[dict[str, Any]], base: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle", "type": "history", "total": len(versions),
        "entry": [{"fullUrl": f"{base}/{v['resourceType']}/{v['id']}", "resource": v,
                   "request": {"method": "PUT", "url": f"{v['resourceType']}/{v['id']}"},
                   "response": {"status": "200 OK"}} for v in versions],
    }


def _refers(resource: dict[str, Any], patient: str) -> bool:
    target = patient if "/" in patient else f"Patient/{patient}"
    for key in ("patient", "subject", "beneficiary"):
        ref = resource.get(key)
        if isinstance(ref, dict) and ref.get("reference") == target:
            return True
    return False


def _outcome(code: str, severity: str = "error") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": code}]}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=FHIR_JSON, headers=headers)
