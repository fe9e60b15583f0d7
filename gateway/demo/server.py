"""A small in-memory FHIR R4 server for the demo (not a production store).

Reads, searches by type (``patient``/``subject``, ``status``, ``_id``, ``code``,
``_lastUpdated=gt``) with ``_count`` paging, ``Patient/<id>/$everything``, creates, updates
and deletes, type histories (``<Type>/_history?_since=``, which the gateway's change feeds
read), and ``/metadata``. Compartment membership comes from the gateway's own R4 Patient
CompartmentDefinition table.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from gateway.core.compartment import patients_of
from gateway.core.fhir import JSON, iter_codings
from gateway.sources.fhir import instant_text

SEED = Path(__file__).with_name("seed.json")
FHIR_JSON = "application/fhir+json"


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=FHIR_JSON, headers=headers)


def _outcome(code: str, text: str, status: int) -> web.Response:
    return _json({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}, status)


class DemoFhirServer:
    """Resources by ``Type/id``, served under ``base_path``."""

    def __init__(self, base_path: str = "/fhir") -> None:
        self.base_path = base_path
        self.resources: dict[str, JSON] = {}
        self.base_url = ""
        self._ids = itertools.count(1)
        self.history: list[JSON] = []  # every write, oldest first, as type-history entries

    def load(self, bundle: JSON) -> None:
        """Load a transaction/collection Bundle's resources (ids kept)."""
        for entry in bundle.get("entry") or ():
            resource = entry.get("resource")
            if isinstance(resource, dict) and resource.get("id"):
                self.put(resource)

    def put(self, resource: JSON) -> JSON:
        key = f"{resource['resourceType']}/{resource['id']}"
        meta = resource.setdefault("meta", {})
        previous = self.resources.get(key)
        meta["versionId"] = str(int((previous or {}).get("meta", {}).get("versionId", meta.get("versionId", "0"))) + 1)
        meta["lastUpdated"] = _now()
        self.resources[key] = resource
        self.history.append({"resource": resource, "request": {"method": "PUT", "url": key}})
        return resource

    def delete(self, key: str) -> None:
        if self.resources.pop(key, None) is not None:
            self.history.append({"request": {"method": "DELETE", "url": key},
                                 "response": {"status": "204", "lastModified": _now()}})

    def _history(self, rtype: str, query: Any) -> web.Response:
        since = query.get("_since", "")
        count = max(1, min(int(query.get("_count", "100")), 500))
        found = [e for e in reversed(self.history)
                 if e["request"]["url"].startswith(rtype + "/") and _stamp(e) > since][:count]
        return _json({"resourceType": "Bundle", "type": "history", "entry": found})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", self.base_path + "/{tail:.*}", self.handle)
        return app

    def _matches(self, resource: JSON, query: Any) -> bool:
        for name, value in query.items():
            base = name.split(":", 1)[0]
            if base in ("patient", "subject"):
                wanted = {v if "/" in v else f"Patient/{v}" for v in value.split(",")}
                if not (patients_of(resource) & wanted):
                    return False
            elif base == "status" and resource.get("status") not in value.split(","):
                return False
            elif base == "_id" and resource.get("id") not in value.split(","):
                return False
            elif base == "_lastUpdated" and value.startswith("gt") and not resource["meta"]["lastUpdated"] > value[2:]:
                return False
            elif base == "code":
                codes = {(c.get("system"), c.get("code")) for c in iter_codings(resource.get("code"))}
                tokens = [t.split("|", 1) for t in value.split(",")]
                if not any((t[0], t[1]) in codes if len(t) == 2 else t[0] in {c for _, c in codes} for t in tokens):
                    return False
        return True

    def _page(self, request: web.Request, found: list[JSON], path: str) -> web.Response:
        count = max(1, min(int(request.query.get("_count", "50")), 500))
        offset = max(0, int(request.query.get("_offset", "0")))
        query = [(k, v) for k, v in request.query.items() if k not in ("_count", "_offset")]
        base_q = "&".join(f"{k}={v}" for k, v in query)
        def link(rel: str, off: int) -> JSON:
            q = f"{base_q}&" if base_q else ""
            return {"relation": rel, "url": f"{self.base_url}/{path}?{q}_count={count}&_offset={off}"}
        links = [link("self", offset)]
        if offset + count < len(found):
            links.append(link("next", offset + count))
        page = found[offset : offset + count]
        return _json({
            "resourceType": "Bundle", "type": "searchset", "total": len(found), "link": links,
            "entry": [
                {"fullUrl": f"{self.base_url}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                for r in page
            ],
        })

    async def handle(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.match_info["tail"].split("/") if p]
        if not self.base_url:
            self.base_url = f"{request.scheme}://{request.host}{self.base_path}"
        method = request.method
        if parts == ["metadata"]:
            return _json({"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
                          "fhirVersion": "4.0.1", "format": ["json"]})
        if method == "GET" and len(parts) == 3 and parts[0] == "Patient" and parts[2] == "$everything":
            wanted = {f"Patient/{parts[1]}"}
            found = [r for r in self.resources.values() if r["resourceType"] != "Consent" and patients_of(r) & wanted]
            return self._page(request, found, "/".join(parts))
        if method == "GET" and len(parts) == 2 and parts[1] == "_history":
            return self._history(parts[0], request.query)
        if method == "GET" and len(parts) == 1:
            found = [r for k, r in self.resources.items() if k.startswith(parts[0] + "/") and self._matches(r, request.query)]
            return self._page(request, found, parts[0])
        if method == "GET" and len(parts) in (2, 3, 4):
            resource = self.resources.get("/".join(parts[:2]))
            if resource is None:
                return _outcome("not-found", "Resource not found", 404)
            return _json(resource)
        if method == "POST" and len(parts) == 1:
            return self._write(await request.read(), parts[0], None, 201)
        if method == "PUT" and len(parts) == 2:
            return self._write(await request.read(), parts[0], parts[1], 200)
        if method == "DELETE" and len(parts) == 2:
            self.delete("/".join(parts))
            return web.Response(status=204)
        return _outcome("not-supported", "Not supported by the demo server", 400)

    def _write(self, body: bytes, rtype: str, rid: str | None, status: int) -> web.Response:
        try:
            resource = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _outcome("invalid", "Body is not JSON", 400)
        if not isinstance(resource, dict) or resource.get("resourceType") != rtype:
            return _outcome("invalid", "resourceType does not match the URL", 400)
        resource["id"] = rid or f"demo-{next(self._ids)}"
        stored = self.put(resource)
        location = f"{self.base_url}/{rtype}/{stored['id']}/_history/{stored['meta']['versionId']}"
        return _json(stored, status, {"Location": location, "ETag": f'W/"{stored["meta"]["versionId"]}"'})


def _now() -> str:
    return instant_text(datetime.now(timezone.utc))


def _stamp(entry: JSON) -> str:
    resource = entry.get("resource")
    return str(resource["meta"]["lastUpdated"] if resource else entry["response"]["lastModified"])


def demo_server() -> DemoFhirServer:
    """The demo server loaded with the bundled demo data set."""
    server = DemoFhirServer()
    server.load(orjson.loads(SEED.read_bytes()))
    return server
