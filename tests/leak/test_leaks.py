"""Leak tests: what a requester who may not see Ana's sensitive records (nor any of Ben's) gets.

The whole app runs against a fake upstream serving the sensitive fixtures. For every kind of
response and every error path, no hidden id, code, display text, reference or count may
appear in the raw response bytes, the response headers, the ``gateway.*`` logs or /metrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.unit.test_enforcement import MakeGateway, fhir
from gateway.web.middleware import JsonLogFormatter
from tests.hidden import hidden_in

Answer = Callable[[web.Request, str], Any]  # (request, upstream base) -> JSON or a Response

# Ben opted out: nothing of his may show, unless the requester named him.
BEN_SECRETS = ("obs-cbc-58410-ben", "cond-htn-i10-ben", "Okafor", "1959-12-02")
# Reasons never reach a client: no consent id, no label.
BODY_SECRETS = ("consent-optin", "consent-ben-out", "HIV", "PSY", "ETH", "OPIOIDUD", "42CFRPart2", "sensitiv")


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    status: tuple[int, ...]
    method: str = "GET"
    body: bytes | None = None
    answers: dict[str, Answer] = field(default_factory=dict)  # upstream path below /fhir -> answer
    config: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def _everything(req: web.Request, base: str) -> Any:
    return c.bundle([c.ANA, *c.ANA_SENSITIVE, *c.ANA_ORDINARY, c.cbc_report_with_contained_hiv()], base)


def _revinclude(req: web.Request, base: str) -> Any:
    return c.bundle([c.ANA], base, include=(*c.ANA_SENSITIVE, c.ANA_HYPERTENSION))


def _include(req: web.Request, base: str) -> Any:
    return c.bundle([c.BUPRENORPHINE, c.HIV_TEST, c.ANA_CBC], base, include=(c.OUD_CONDITION, c.HIV_CONDITION, c.ANA, c.PRACTITIONER))


def _history(req: web.Request, base: str) -> Any:
    return c.history_bundle([
        {**c.ANA_HYPERTENSION, "meta": {"versionId": "3"}},
        {**c.DEPRESSION, "id": "cond-htn-i10-ana", "meta": {"versionId": "2"}},
        {**c.HIV_CONDITION, "id": "cond-htn-i10-ana", "meta": {"versionId": "1"}},
    ], base)


def _nested(req: web.Request, base: str) -> Any:
    inner = {"resourceType": "Bundle", "id": "collection-1", "type": "collection",
             "entry": [{"resource": r} for r in (c.ANA_CBC, *c.ANA_SENSITIVE)]}
    return c.bundle([inner], base)


def _contained(req: web.Request, base: str) -> Any:
    return c.bundle([c.cbc_report_with_contained_hiv()], base)


def _parameters(req: web.Request, base: str) -> Any:
    return {"resourceType": "Parameters", "parameter": [
        {"name": "statistic", "resource": c.ANA_CBC},
        *({"name": "source", "resource": r} for r in c.ANA_SENSITIVE),
        {"name": "nested", "part": [{"name": "source", "resource": c.HIV_TEST}]},
    ]}


def _count_only(req: web.Request, base: str) -> Any:
    return {"resourceType": "Bundle", "type": "searchset", "total": 9}


def _batch_response(req: web.Request, base: str) -> Any:
    return {"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"resource": r, "response": {"status": "200 OK", "location": f"{base}/{r['resourceType']}/{r['id']}/_history/1"}}
        for r in (c.ANA_CBC, *c.ANA_SENSITIVE)
    ]}


def _html(req: web.Request, base: str) -> Any:
    return web.Response(text="<html><body>Condition B20 Human immunodeficiency virus [HIV] disease</body></html>",
                        content_type="text/html")


def _truncated(req: web.Request, base: str) -> Any:
    return web.Response(body=orjson.dumps(c.HIV_CONDITION)[:-40], content_type="application/fhir+json")


async def _too_slow(req: web.Request, base: str) -> Any:
    await asyncio.sleep(1.0)
    return c.HIV_CONDITION


def _consent_500(req: web.Request, base: str) -> Any:
    return web.Response(status=500, body=b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception","diagnostics":"index on Consent.patient broken"}]}',
                        content_type="application/fhir+json")


def _consent_garbage(req: web.Request, base: str) -> Any:
    return web.Response(body=b"\x00\xffnot json", content_type="application/fhir+json")


def _consent_other_patient(req: web.Request, base: str) -> Any:
    return c.bundle([c.opt_in(c.PAT_ANA), c.opt_in(c.PAT_BEN, "consent-ben-out")], base)


def _upstream_error_naming_hidden(req: web.Request, base: str) -> Any:
    body = {"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "processing",
        "diagnostics": "HAPI-1100: Failed to load _include target Condition/cond-hiv-b20-91a (B20 Human immunodeficiency virus [HIV] disease)",
    }]}
    return web.Response(status=500, body=orjson.dumps(body), content_type="application/fhir+json")


ANA = c.PAT_ANA
CASES = [
    Case("read-hiv", "/Condition/cond-hiv-b20-91a", (403,)),
    Case("read-hiv-404-mode", "/Observation/obs-hiv-75622-44c", (404,), config={"enforcement": {"denied_read_status": 404}}),
    Case("vread-hiv", "/Condition/cond-hiv-b20-91a/_history/1", (403,),
         answers={"/Condition/cond-hiv-b20-91a/_history/1": lambda r, b: c.HIV_CONDITION}),
    Case("read-opted-out-patient", "/Observation/obs-cbc-58410-ben", (403,)),
    Case("read-contained", "/DiagnosticReport/dr-cbc-contained-77e", (403,),
         answers={"/DiagnosticReport/dr-cbc-contained-77e": lambda r, b: c.cbc_report_with_contained_hiv()}),
    Case("search-patient", f"/Condition?patient={ANA}", (200,)),
    Case("search-documents", f"/DocumentReference?patient={ANA}", (200,)),
    Case("search-medications", f"/MedicationRequest?patient={ANA}", (200,)),
    Case("search-all-patients", "/Observation?status=final", (200,)),
    Case("search-post", "/Condition/_search", (200,), method="POST", body=f"patient={ANA}".encode(),
         headers={"Content-Type": "application/x-www-form-urlencoded"},
         answers={"/Condition/_search": lambda r, b: c.bundle([c.HIV_CONDITION, c.OUD_CONDITION, c.DEPRESSION, c.ANA_HYPERTENSION], b)}),
    Case("revinclude", "/Patient?_id=pat-ana-5581&_revinclude=Condition:subject", (200,), answers={"/Patient": _revinclude}),
    Case("include-iterate", f"/MedicationRequest?patient={ANA}&_include=*&_include:iterate=Condition:subject", (200,),
         answers={"/MedicationRequest": _include}),
    Case("everything", "/Patient/pat-ana-5581/$everything", (200,), answers={"/Patient/pat-ana-5581/$everything": _everything}),
    Case("instance-history", "/Condition/cond-htn-i10-ana/_history", (200,),
         answers={"/Condition/cond-htn-i10-ana/_history": _history}),
    Case("nested-bundle", "/Bundle?type=collection", (200,), answers={"/Bundle": _nested}),
    Case("contained-in-search", f"/DiagnosticReport?patient={ANA}", (200,), answers={"/DiagnosticReport": _contained}),
    Case("parameters", f"/Observation/$lastn?patient={ANA}", (200,), answers={"/Observation/$lastn": _parameters}),
    Case("stats", f"/Observation/$stats?patient={ANA}", (403,), answers={"/Observation/$stats": _parameters}),
    Case("elements-id", f"/Observation?patient={ANA}&_elements=id", (200,)),
    Case("summary-true", f"/Condition?patient={ANA}&_summary=true", (200,)),
    Case("count-zero", f"/Observation?patient={ANA}&_count=0", (200,), answers={"/Observation": _count_only}),
    Case("summary-count", f"/Observation?patient={ANA}&_summary=count", (403,), answers={"/Observation": _count_only}),
    Case("has", "/Patient?_has:Condition:subject:code=B20", (403,), answers={"/Patient": lambda r, b: c.bundle([c.ANA], b)}),
    Case("chain", "/Observation?subject.name=Reyes&code=75622-1", (403,)),
    Case("type-history", "/Condition/_history", (403,), answers={"/Condition/_history": lambda r, b: c.history_bundle(list(c.ANA_SENSITIVE), b)}),
    Case("system-history", "/_history", (403,), answers={"/_history": lambda r, b: c.history_bundle(list(c.ANA_SENSITIVE), b)}),
    Case("graphql", "/$graphql?query={ConditionList(patient:\"pat-ana-5581\"){code{text}}}", (403,),
         answers={"/$graphql": lambda r, b: {"data": {"ConditionList": [{"code": {"text": "HIV disease"}}]}}}),
    Case("upstream-not-json", "/Condition/cond-hiv-b20-91a", (502,), answers={"/Condition/cond-hiv-b20-91a": _html}),
    Case("upstream-malformed-json", "/Condition/cond-hiv-b20-91a", (502,), answers={"/Condition/cond-hiv-b20-91a": _truncated}),
    Case("upstream-timeout", "/Condition/cond-hiv-b20-91a", (504,), answers={"/Condition/cond-hiv-b20-91a": _too_slow},
         config={"upstream": {"timeout_s": 0.4}}),
    Case("consent-500", f"/Condition?patient={ANA}", (503,), answers={"/Consent": _consent_500}),
    Case("consent-garbage", f"/Condition?patient={ANA}", (503,), answers={"/Consent": _consent_garbage}),
    Case("consent-other-patient", f"/Condition?patient={ANA}", (503,), answers={"/Consent": _consent_other_patient}),
    Case("consent-slow", f"/Condition?patient={ANA}", (503,), answers={"/Consent": _too_slow},
         config={"upstream": {"timeout_s": 0.4}}),
    Case("xml-asked", f"/Condition?patient={ANA}", (406,), headers={"Accept": "application/fhir+xml"}),
    Case("unknown-purpose", "/Condition/cond-hiv-b20-91a", (400,), headers={"X-Purpose-Of-Use": "B20"}),
    Case("unknown-break-glass-reason", "/Condition/cond-hiv-b20-91a", (400, 403), headers={"X-Break-Glass": "curious"}),
]
KNOWN_LEAKS: dict[str, str] = {}  # case name -> "BUG: ..." while a leak is known and being fixed
CASES += [
    Case("batch-response", "/", (200,), method="POST",
         body=orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": [
             {"request": {"method": "GET", "url": f"{r['resourceType']}/{r['id']}"}} for r in (c.ANA_CBC, *c.ANA_SENSITIVE)]}),
         headers={"Content-Type": "application/fhir+json"}, answers={"/": _batch_response}),
    Case("upstream-error-outcome", f"/MedicationRequest?patient={ANA}&_include=*", (500,),
         answers={"/MedicationRequest": _upstream_error_naming_hidden}),
]


# What each answered case must still show, so no case passes by showing nothing.
SHOWS = {
    "search-patient": "cond-htn-i10-ana", "search-documents": "suppressed", "search-medications": "suppressed",
    "search-all-patients": "obs-cbc-58410-ana", "search-post": "cond-htn-i10-ana", "revinclude": "cond-htn-i10-ana",
    "include-iterate": "obs-cbc-58410-ana", "everything": "obs-cbc-58410-ana", "instance-history": "I10",
    "nested-bundle": "obs-cbc-58410-ana", "contained-in-search": "suppressed", "parameters": "obs-cbc-58410-ana",
    "elements-id": "obs-cbc-58410-ana", "summary-true": "cond-htn-i10-ana", "count-zero": "searchset",
    "batch-response": "obs-cbc-58410-ana",
}


def _params() -> list[Any]:
    out = []
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_LEAKS[case.name])] if case.name in KNOWN_LEAKS else []
        out.append(pytest.param(case, id=case.name, marks=marks))
    return out


def _override(fake: FakeFhir, answers: dict[str, Answer]) -> Any:
    async def override(request: web.Request) -> web.StreamResponse | None:
        answer = answers.get(request.path.removeprefix(fake.base_path) or "/")
        if answer is None:
            return None
        result = answer(request, fake.base_url)
        if asyncio.iscoroutine(result):
            result = await result
        return result if isinstance(result, web.StreamResponse) else fhir(result)

    return override


def find_secrets(text: str, secrets: tuple[str, ...]) -> list[str]:
    return hidden_in(text, secrets)


def _bundles(node: Any) -> list[dict[str, Any]]:
    """Every Bundle in a body, nested ones included."""
    found = []
    if isinstance(node, dict):
        if node.get("resourceType") == "Bundle":
            found.append(node)
        for value in node.values():
            found += _bundles(value)
    elif isinstance(node, list):
        for value in node:
            found += _bundles(value)
    return found


@pytest.mark.parametrize("case", _params())
async def test_denied_requester_learns_nothing(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture, case: Case
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), c.opt_out(c.PAT_BEN, "consent-ben-out"))
    fake_fhir.override = _override(fake_fhir, case.answers)
    gw = await make_gateway(fake_fhir.base_url, **case.config)
    headers = {"X-Actor": c.DOCTOR, **case.headers}
    async with gw.session.request(case.method, gw.url + case.path, headers=headers, data=case.body) as resp:
        raw = await resp.read()
        status, answer_headers = resp.status, list(resp.headers.items())
    async with aiohttp.ClientSession() as admin:
        async with admin.get(gw.admin_url + "/metrics") as metrics_resp:
            metrics = await metrics_resp.text()

    assert status in case.status, raw
    if status == 200:
        assert SHOWS[case.name] in raw.decode(), "the permitted part of the answer is missing"
    secrets = (*c.SECRETS, *BEN_SECRETS)
    text = raw.decode("utf-8", "replace")
    assert find_secrets(text, (*secrets, *BODY_SECRETS)) == [], "response body"
    assert find_secrets(repr(answer_headers), (*secrets, *BODY_SECRETS)) == [], "response headers"
    if status == 200 and text.startswith("{"):
        for bundle in _bundles(orjson.loads(raw)):
            assert "total" not in bundle, "Bundle.total would count hidden records"
    formatter = JsonLogFormatter()
    records = [r for r in caplog.records if r.name.startswith("gateway")]
    assert records, "the gateway logged nothing: the log check would be vacuous"
    logs = "\n".join(formatter.format(r) + repr(r.__dict__) for r in records)
    assert find_secrets(logs, secrets) == [], "logs"
    assert find_secrets(metrics, (*secrets, *BODY_SECRETS[:2], "pat-ana-5581", "dr-gomez")) == [], "metrics"


async def test_leak_check_sees_a_leak(fake_fhir: FakeFhir, make_gateway: MakeGateway) -> None:
    """The self-access requester gets everything: the same checks must find the secrets."""
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_out(c.PAT_ANA))
    gw = await make_gateway(fake_fhir.base_url)
    async with gw.session.get(gw.url + f"/Condition?patient={c.PAT_ANA}", headers={"X-Actor": c.PAT_ANA}) as resp:
        text = await resp.text()
    assert set(find_secrets(text, c.SECRETS)) >= {"B20", "F11.20", "F32.9", "cond-hiv-b20-91a"}


async def test_upstream_down_reveals_nothing(
    make_gateway: MakeGateway, dead_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    gw = await make_gateway(dead_url)
    async with gw.session.get(gw.url + "/Condition/cond-hiv-b20-91a", headers={"X-Actor": c.DOCTOR}) as resp:
        raw = await resp.read()
        assert resp.status == 502
    assert orjson.loads(raw)["resourceType"] == "OperationOutcome"
    assert find_secrets(raw.decode(), ("127.0.0.1", "Traceback", "cond-hiv-b20-91a")) == []
