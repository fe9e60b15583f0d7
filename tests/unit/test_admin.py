"""The admin port (/healthz, /readyz, /metrics) and the request metrics of CONTRACT §8."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayUnderTest
from tests.contract import CONTRACT_METRICS
from tests.fakes import FakeFhir
from tests.unit._util import FHIR_JSON, MakeGateway, assert_outcome, free_port

DOC = {"X-Actor": "Practitioner/doc-1"}
OSLER = {"resourceType": "Practitioner", "id": "pr-osler", "name": [{"family": "Osler", "given": ["William"]}]}



async def admin_get(gut: GatewayUnderTest, path: str) -> tuple[int, str, bytes]:
    async with gut.session.get(gut.admin_url + path) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


async def wait_for_readyz(gut: GatewayUnderTest, status: int, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    last = None
    while time.monotonic() < deadline:
        last = (await admin_get(gut, "/readyz"))[0]
        if last == status:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"/readyz stayed {last}, expected {status}")


# --- liveness and readiness ---------------------------------------------------------------


async def test_healthz_is_200(gateway: GatewayUnderTest) -> None:
    status, _, body = await admin_get(gateway, "/healthz")
    assert status == 200
    assert orjson.loads(body)["status"] == "ok"


async def test_readyz_is_200_once_the_upstream_answered_metadata(gateway: GatewayUnderTest, fake_fhir: FakeFhir) -> None:
    await wait_for_readyz(gateway, 200)
    assert any(r.method == "GET" and r.path_qs == "/fhir/metadata" for r in fake_fhir.requests)


async def test_readyz_is_503_when_the_upstream_is_down(make_gateway: MakeGateway, dead_url: str) -> None:
    gut = await make_gateway(dead_url, upstream={"health_interval_s": 0.05})
    await asyncio.sleep(0.3)  # several pings have failed by now
    for _ in range(3):
        status, _, _ = await admin_get(gut, "/readyz")
        assert status == 503
        await asyncio.sleep(0.05)
    status, _, _ = await admin_get(gut, "/healthz")
    assert status == 200  # alive, just not ready


async def test_readyz_follows_the_upstream_down_and_back(fake_fhir: FakeFhir, make_gateway: MakeGateway) -> None:
    gut = await make_gateway(fake_fhir.base_url, upstream={"url": fake_fhir.base_url, "health_interval_s": 0.05})
    await wait_for_readyz(gut, 200)

    async def metadata_fails(request: web.Request) -> web.StreamResponse | None:
        if request.path.endswith("/metadata"):
            return web.Response(status=500, body=b"{}", content_type=FHIR_JSON)
        return None

    fake_fhir.override = metadata_fails
    await wait_for_readyz(gut, 503)
    fake_fhir.override = None
    await wait_for_readyz(gut, 200)


async def readyz_body(gut: GatewayUnderTest) -> dict[str, Any]:
    status, _, body = await admin_get(gut, "/readyz")
    found: dict[str, Any] = orjson.loads(body)
    found["code"] = status
    return found


async def test_readyz_names_the_consent_source_when_it_fails_and_recovers(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, tmp_path: Path
) -> None:
    gut = await make_gateway(fake_fhir.base_url, upstream={"health_interval_s": 0.05})
    await wait_for_readyz(gut, 200)

    async def consent_source_down(request: web.Request) -> web.StreamResponse | None:
        if request.path.endswith("/Consent"):
            return web.json_response({"resourceType": "OperationOutcome", "issue": []}, status=503)
        return None

    fake_fhir.override = consent_source_down
    await wait_for_readyz(gut, 503)
    body = await readyz_body(gut)
    assert body == {"status": "not ready", "failing": ["consent_source"], "code": 503}
    fake_fhir.override = None
    await wait_for_readyz(gut, 200)


async def test_one_patients_unreadable_consents_do_not_take_the_replica_out_of_service(
    fake_fhir: FakeFhir, make_gateway: MakeGateway
) -> None:
    # Probed once at start-up, not again during the test.
    gut = await make_gateway(fake_fhir.base_url, upstream={"health_interval_s": 5})
    await wait_for_readyz(gut, 200)

    async def one_patient_malformed(request: web.Request) -> web.StreamResponse | None:
        if request.path.endswith("/Consent") and "pat-broken" in request.query.get("patient", ""):
            return web.Response(body=b"{not json", content_type="application/fhir+json")
        return None

    fake_fhir.override = one_patient_malformed
    resp = await gut.get("/Observation?patient=Patient/pat-broken")
    assert resp.status == 503  # that patient's data stays closed
    assert (await readyz_body(gut))["code"] == 200  # everyone else's is still served here


async def test_readyz_names_the_audit_file_when_its_directory_goes(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, tmp_path: Path
) -> None:
    folder = tmp_path / "audit"
    folder.mkdir()
    gut = await make_gateway(fake_fhir.base_url, audit={"path": str(folder / "audit.jsonl")})
    await wait_for_readyz(gut, 200)
    shutil.rmtree(folder)
    body = await readyz_body(gut)
    assert body == {"status": "not ready", "failing": ["audit"], "code": 503}
    # SECURITY: the reason names no host, path or secret.
    assert str(tmp_path) not in str(body) and "127.0.0.1" not in str(body)
    folder.mkdir()
    assert (await readyz_body(gut))["code"] == 200


async def test_readyz_names_the_fhir_server_without_its_host(make_gateway: MakeGateway) -> None:
    port = free_port()
    gut = await make_gateway(f"http://127.0.0.1:{port}/fhir", upstream={"health_interval_s": 0.05})
    await asyncio.sleep(0.3)
    body = await readyz_body(gut)
    assert body["code"] == 503 and "fhir_server" in body["failing"]
    assert str(port) not in orjson.dumps(body).decode()


# --- the admin port serves only admin paths, the proxy port only FHIR ---------------------


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
async def test_admin_paths_are_not_served_on_the_proxy_port(
    gateway: GatewayUnderTest, fake_fhir: FakeFhir, path: str
) -> None:
    async with gateway.session.get(gateway.url + path, headers=DOC) as resp:
        body = await resp.read()
    assert b"consent_gateway_" not in body and b'"status"' not in body
    assert [r.path_qs for r in fake_fhir.requests if r.path_qs == "/fhir" + path] == ["/fhir" + path]
    async with gateway.session.get(gateway.url + path) as resp:
        assert resp.status == 401  # without X-Actor it is a FHIR request like any other


async def test_fhir_is_not_served_on_the_admin_port(gateway: GatewayUnderTest, fake_fhir: FakeFhir) -> None:
    async with gateway.session.get(gateway.admin_url + "/Practitioner/pr-osler", headers=DOC) as resp:
        assert_outcome(resp.status, resp.content_type, await resp.read(), 404, issue_code="not-found")
    assert not [r for r in fake_fhir.requests if "Practitioner" in r.path_qs]


async def test_admin_405_is_an_outcome_with_allow(gateway: GatewayUnderTest) -> None:
    async with gateway.session.post(gateway.admin_url + "/metrics", data=b"{}") as resp:
        assert_outcome(resp.status, resp.content_type, await resp.read(), 405, issue_code="not-supported")
        assert "GET" in resp.headers["Allow"]


async def test_admin_404_is_never_text_plain(gateway: GatewayUnderTest) -> None:
    async with gateway.session.get(gateway.admin_url + "/metrics/../../etc/passwd") as resp:
        assert resp.content_type != "text/plain"
        assert_outcome(resp.status, resp.content_type, await resp.read(), 404)


# --- /metrics -----------------------------------------------------------------------------


async def test_metrics_expose_every_contract_metric(gateway: GatewayUnderTest) -> None:
    async with gateway.session.get(gateway.url + "/metadata", headers=DOC) as resp:
        assert resp.status == 200
    status, ctype, body = await admin_get(gateway, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    text = body.decode()
    for name, kind in CONTRACT_METRICS.items():
        base = name.removesuffix("_total")
        assert f"# TYPE {base} {kind}" in text or f"# TYPE {name} {kind}" in text, name
    assert 'consent_gateway_requests_total{code="200",interaction="capabilities",method="GET"} 1.0' in text
    assert "consent_gateway_request_duration_seconds_bucket{" in text
    assert "consent_gateway_upstream_duration_seconds_count 1.0" in text


INTERACTIONS = [
    ("GET", "/Practitioner/pr-osler", "read"),
    ("GET", "/Practitioner/pr-osler/_history/2", "vread"),
    ("GET", "/Practitioner?family=Osler", "search"),
    ("POST", "/fhir/Practitioner/_search", "search"),
    ("GET", "/Practitioner/pr-osler/_history", "history"),
    ("POST", "/Practitioner", "create"),
    ("PUT", "/Practitioner/pr-osler", "update"),
    ("PATCH", "/Practitioner/pr-osler", "patch"),
    ("DELETE", "/fhir/Practitioner/pr-osler", "delete"),
    ("POST", "/", "batch"),
    ("GET", "/CodeSystem/$lookup?system=http://loinc.org&code=2345-7", "operation"),
    ("GET", "/metadata", "capabilities"),
    ("PROPFIND", "/Practitioner/pr-osler", "other"),
]


BODIES = {
    ("POST", "_search"): (b"family=Osler", "application/x-www-form-urlencoded"),
    ("POST", "Practitioner"): (orjson.dumps(OSLER), FHIR_JSON),
    ("PUT", "pr-osler"): (orjson.dumps(OSLER), FHIR_JSON),
    ("PATCH", "pr-osler"): (b'[{"op":"replace","path":"/active","value":false}]', "application/json-patch+json"),
    ("POST", ""): (b'{"resourceType":"Bundle","type":"batch","entry":[]}', FHIR_JSON),
}


@pytest.fixture
def answer_everything(fake_fhir: FakeFhir) -> FakeFhir:
    """The upstream answers every request 200 with an informational OperationOutcome."""

    async def ok(request: web.Request) -> web.StreamResponse | None:
        outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "information", "code": "informational"}]}
        return web.Response(body=orjson.dumps(outcome), content_type=FHIR_JSON)

    fake_fhir.override = ok
    return fake_fhir


async def test_requests_are_counted_per_interaction(gateway: GatewayUnderTest, answer_everything: FakeFhir) -> None:
    for method, path, _ in INTERACTIONS:
        body, ctype = BODIES.get((method, path.rsplit("/", 1)[-1]), (None, FHIR_JSON))
        headers = {**DOC, "Content-Type": ctype}
        async with gateway.session.request(method, gateway.url + path, headers=headers, data=body) as resp:
            assert resp.status == 200, (method, path, await resp.text())
    for method, path, interaction in INTERACTIONS:
        method_label = method if method != "PROPFIND" else "other"
        value = gateway.metric(
            "consent_gateway_requests_total", {"method": method_label, "interaction": interaction, "code": "200"}
        )
        assert value == 1, (method, path, interaction)
    for interaction in {i for _, _, i in INTERACTIONS}:
        expected = sum(1 for _, _, i in INTERACTIONS if i == interaction)
        labels = {"interaction": interaction}
        assert gateway.metric("consent_gateway_request_duration_seconds_count", labels) == expected, interaction
        assert gateway.metric("consent_gateway_request_duration_seconds_sum", labels) > 0
    # The empty batch is answered without asking the upstream (nothing in it to send).
    assert gateway.metric("consent_gateway_upstream_duration_seconds_count") == len(INTERACTIONS) - 1


async def test_errors_are_counted_with_their_status(gateway: GatewayUnderTest) -> None:
    async with gateway.session.get(gateway.url + "/Practitioner/pr-osler") as resp:
        assert resp.status == 401
    async with gateway.session.get(gateway.url + "/Practitioner/pr-osler", headers={**DOC, "Accept": "application/fhir+xml"}) as resp:
        assert resp.status == 406
    labels = {"method": "GET", "interaction": "read"}
    assert gateway.metric("consent_gateway_requests_total", {**labels, "code": "401"}) == 1
    assert gateway.metric("consent_gateway_requests_total", {**labels, "code": "406"}) == 1
    assert gateway.metric("consent_gateway_upstream_duration_seconds_count") == 0


async def test_metric_labels_never_carry_ids_or_free_text(gateway: GatewayUnderTest, fake_fhir: FakeFhir) -> None:
    fake_fhir.add(OSLER)
    secrets = ["pr-osler", "Osler", "doc-1", "req-4f1c9e", "LOCK", "2345-7", "zz-unknown-type"]
    requests = [
        ("GET", "/Practitioner/pr-osler?family=Osler", DOC),
        ("GET", "/Practitioner/pr-osler", {**DOC, "X-Request-Id": "req-4f1c9e"}),
        ("LOCK", "/Practitioner/pr-osler", DOC),
        ("GET", "/CodeSystem/$lookup?code=2345-7", DOC),
        ("GET", "/zz-unknown-type/1", DOC),
        ("GET", "/Practitioner/pr-osler", {"X-Actor": "Observation/obs-1"}),
    ]
    for method, path, headers in requests:
        async with gateway.session.request(method, gateway.url + path, headers=headers) as resp:
            await resp.read()
    _, _, body = await admin_get(gateway, "/metrics")
    text = body.decode()
    for secret in secrets:
        assert secret not in text, secret
    methods = {line.split('method="', 1)[1].split('"', 1)[0] for line in text.splitlines()
               if line.startswith("consent_gateway_requests_total{")}
    assert methods <= {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other"}
    assert "other" in methods
