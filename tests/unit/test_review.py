"""Review findings: leaks, fail-open paths and deviations found by reading the code.

Each test asserts what the contract (or the leak rules of STYLE.md) asks for. One still
open is ``xfail(strict=True)``: when its fix lands, the strict marker fails and comes off.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.unit._util import raw_http, split_http
from tests.hidden import hidden_in

MakeGateway = Callable[..., Awaitable[GatewayUnderTest]]
Override = Callable[[web.Request], Awaitable[web.StreamResponse | None]]
FHIR_JSON = "application/fhir+json"
ER_DOCTOR = "Practitioner/dr-er-okonkwo"
HIV_REF = "Condition/cond-hiv-b20-91a"
ANA_ID = c.PAT_ANA.split("/", 1)[1]


def fhir(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=FHIR_JSON, headers=headers)


def answer(method: str, path: str, make: Callable[[web.Request], web.StreamResponse]) -> Override:
    """An override answering one (method, decoded path below /fhir) and nothing else."""

    async def override(request: web.Request) -> web.StreamResponse | None:
        if request.method == method and request.path.removeprefix("/fhir") == path:
            return make(request)
        return None

    return override


async def call(
    gw: GatewayUnderTest, method: str, path: str, actor: str = c.DOCTOR, body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    hdrs = {"X-Actor": actor, **(headers or {})}
    async with gw.session.request(method, gw.url + path, headers=hdrs, data=body) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def raw_get(gw: GatewayUnderTest, target: str, actor: str = c.DOCTOR) -> tuple[int, dict[str, str], bytes]:
    """A GET sent byte for byte, so percent-encoding in the path reaches the gateway as written."""
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Actor: {actor}\r\nConnection: close\r\n\r\n"
    return split_http(await raw_http(gw.running.proxy_port, request.encode()))


def secrets_in(raw: bytes, secrets: tuple[str, ...] = c.SECRETS) -> list[str]:
    return hidden_in(raw, secrets)


def data_requests(fake: FakeFhir) -> list[str]:
    return [r.path_qs for r in fake.requests if not r.path_qs.startswith(("/fhir/Consent", "/fhir/metadata"))]


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    """Ana's and Ben's records; Ana has a general opt-in (her sensitive records stay closed)."""
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA))
    return fake_fhir


# ---------------------------------------------------------------- refusals bypassed


async def test_encoded_graphql_operation_is_refused(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    graphql = {"data": {"ConditionList": [
        {"id": "cond-hiv-b20-91a", "code": {"text": "HIV disease", "coding": [{"code": "B20"}]}},
    ]}}
    world.override = answer("GET", f"/Patient/{ANA_ID}/$graphql", lambda r: web.json_response(graphql))
    status, _, raw = await raw_get(gateway, f"/Patient/{ANA_ID}/%24graphql?query=%7BConditionList%7Bid%7D%7D")
    assert status == 403
    assert secrets_in(raw) == []


async def test_encoded_type_history_is_refused(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    history = {"resourceType": "Bundle", "type": "history", "entry": [
        {"fullUrl": f"{world.base_url}/{HIV_REF}", "request": {"method": "DELETE", "url": HIV_REF},
         "response": {"status": "410 Gone"}},
    ]}
    world.override = answer("GET", "/Condition/_history", lambda r: fhir(history))
    status, _, raw = await raw_get(gateway, "/Condition/%5Fhistory")
    assert status == 403
    assert secrets_in(raw) == []


async def test_chain_with_type_modifier_is_refused(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    status, _, _ = await call(gateway, "GET", f"/DiagnosticReport?patient={c.PAT_ANA}&result:Observation.code=75622-1")
    assert status == 403
    assert data_requests(world) == []


async def test_elements_exclude_cannot_hide_labelled_codes(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    def trimmed(request: web.Request) -> web.Response:
        resource = dict(c.HIV_CONDITION)
        for name in request.query.get("_elements:exclude", "").split(","):
            resource.pop(name, None)
        return fhir(resource)

    world.override = answer("GET", f"/{HIV_REF}", trimmed)
    status, _, raw = await call(gateway, "GET", f"/{HIV_REF}?_elements:exclude=code")
    assert status == 403, raw


async def test_percent_encoded_projection_name_does_not_reach_the_upstream(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    await raw_get(gateway, f"/{HIV_REF}?_%65lements%3Aexclude=code")
    sent = [r.path_qs for r in world.requests if r.path_qs.startswith(f"/fhir/{HIV_REF}")]
    assert sent and all("lements" not in q for q in sent), sent


# ---------------------------------------------------------------- answers that skip the decision


async def test_head_of_hidden_record_is_denied_like_get(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = answer("HEAD", f"/{HIV_REF}", lambda r: web.Response(status=200, headers={"ETag": 'W/"3"'}))
    status, headers, _ = await call(gateway, "HEAD", f"/{HIV_REF}")
    assert status == 403
    assert headers["X-Consent-Decision"] == "deny"
    assert "ETag" not in headers


async def test_conditional_read_of_hidden_record_is_denied(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    def conditional(request: web.Request) -> web.Response:
        if request.headers.get("If-None-Match") == 'W/"1"':
            return web.Response(status=304, headers={"ETag": 'W/"1"'})
        return fhir(c.HIV_CONDITION, headers={"ETag": 'W/"1"'})

    world.override = answer("GET", f"/{HIV_REF}", conditional)
    status, headers, _ = await call(gateway, "GET", f"/{HIV_REF}", headers={"If-None-Match": 'W/"1"'})
    assert status == 403
    assert headers["X-Consent-Decision"] == "deny"


async def test_meta_operation_on_hidden_record_reveals_nothing(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    meta = {"resourceType": "Parameters", "parameter": [{"name": "return", "valueMeta": c.PSYCHOTHERAPY_NOTE["meta"]}]}
    world.override = answer("GET", "/DocumentReference/docref-psynote-8d3/$meta", lambda r: fhir(meta))
    status, _, raw = await call(gateway, "GET", "/DocumentReference/docref-psynote-8d3/$meta")
    assert status == 403
    assert secrets_in(raw) == []


async def test_validate_of_hidden_record_reveals_nothing(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [{
        "severity": "warning", "code": "code-invalid",
        "diagnostics": "Coding http://hl7.org/fhir/sid/icd-10-cm#B20 'Human immunodeficiency virus [HIV] disease' "
                       "is not in value set for Condition.code",
    }]}
    world.override = answer("GET", f"/{HIV_REF}/$validate", lambda r: fhir(outcome))
    _, _, raw = await call(gateway, "GET", f"/{HIV_REF}/$validate")
    assert secrets_in(raw) == []


# ---------------------------------------------------------------- writes


async def test_write_error_text_is_scrubbed(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "processing",
        "diagnostics": f"Unable to delete {c.PAT_ANA} because at least one resource has a reference to this "
                       f"resource. First reference found was resource {HIV_REF} in path Condition.subject",
    }]}
    world.override = answer("DELETE", f"/Patient/{ANA_ID}", lambda r: fhir(outcome, 409))
    status, _, raw = await call(gateway, "DELETE", f"/Patient/{ANA_ID}")
    assert status == 409
    assert secrets_in(raw) == []


async def test_batch_entry_error_text_is_scrubbed(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    response = {"resourceType": "Bundle", "type": "batch-response", "entry": [{"response": {
        "status": "409 Conflict",
        "outcome": {"resourceType": "OperationOutcome", "issue": [{
            "severity": "error", "code": "processing",
            "diagnostics": f"First reference found was resource {HIV_REF} in path Condition.subject",
        }]},
    }}]}
    world.override = answer("POST", "", lambda r: fhir(response))
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "DELETE", "url": c.PAT_ANA}}]}
    status, _, raw = await call(gateway, "POST", "/", body=orjson.dumps(batch), headers={"Content-Type": FHIR_JSON})
    assert status == 200
    assert secrets_in(raw) == []


async def test_patch_does_not_return_a_hidden_record(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = answer("PATCH", f"/{HIV_REF}", lambda r: fhir(c.HIV_CONDITION))
    _, _, raw = await call(gateway, "PATCH", f"/{HIV_REF}", body=b"[]", headers={"Content-Type": "application/json-patch+json"})
    assert secrets_in(raw, c.SECRET_CODES + c.SECRET_TEXTS) == []


async def test_conditional_create_does_not_return_a_hidden_record(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = answer(
        "POST", "/Condition",
        lambda r: fhir(c.HIV_CONDITION, headers={"Location": f"{world.base_url}/{HIV_REF}/_history/1"}),
    )
    probe = {"resourceType": "Condition", "subject": {"reference": c.PAT_ANA}}
    _, headers, raw = await call(
        gateway, "POST", "/Condition", body=orjson.dumps(probe),
        headers={"Content-Type": FHIR_JSON, "If-None-Exist": f"patient={c.PAT_ANA}&code=B20"},
    )
    assert secrets_in(raw + headers.get("Location", "").encode()) == []


async def test_requester_cannot_grant_itself_access_by_writing_a_consent(
    world: FakeFhir, make_gateway: Callable[..., Any]
) -> None:
    # Writes pass through by default (CONTRACT §6); consent.writer_roles closes Consent writes.
    gw: GatewayUnderTest = await make_gateway(world.base_url, consent={"writer_roles": ["HIM"]})
    assert (await call(gw, "GET", f"/{HIV_REF}"))[0] == 403
    forged = c.opt_in(c.PAT_ANA, cid="consent-forged", labels=("HIV",))
    status, _, _ = await call(gw, "PUT", "/Consent/consent-forged", body=orjson.dumps(forged), headers={"Content-Type": FHIR_JSON})
    assert status == 403
    assert "Consent/consent-forged" not in world.resources
    status, _, _ = await call(gw, "GET", f"/{HIV_REF}")
    assert status == 403
    # The patient may write their own consent; so may a listed role.
    own = c.opt_in(c.PAT_ANA, cid="consent-own")
    status, _, _ = await call(gw, "PUT", "/Consent/consent-own", body=orjson.dumps(own), headers={"Content-Type": FHIR_JSON}, actor=c.PAT_ANA)
    assert status in (200, 201)


async def test_nobody_forges_an_emergency_window(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    forged = c.opt_in(c.PAT_ANA, cid="consent-forged-emergency", labels=("HIV",))
    forged["category"] = [{"coding": [{"system": "urn:consent-gateway:code", "code": "emergency"}]}]
    status, _, _ = await call(gateway, "PUT", "/Consent/consent-forged-emergency", body=orjson.dumps(forged), headers={"Content-Type": FHIR_JSON})
    assert status == 403
    assert "Consent/consent-forged-emergency" not in world.resources


# ---------------------------------------------------------------- the gateway's own records


async def _break_glass_on_ana(gw: GatewayUnderTest) -> None:
    status, _, _ = await call(gw, "GET", f"/Condition?patient={c.PAT_ANA}", actor=ER_DOCTOR, headers={"X-Break-Glass": "Medical emergency"})
    assert status == 200


async def test_emergency_consent_does_not_reveal_what_was_opened(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    await _break_glass_on_ana(gateway)
    assert any(b"emergency" in orjson.dumps(r) for k, r in world.resources.items() if k.startswith("Consent/"))
    # A Consent naming sensitive labels is as sensitive as they are: a general permit opens none.
    status, _, raw = await call(gateway, "GET", f"/Consent?patient={c.PAT_ANA}", actor=c.PSYCHIATRIST)
    assert status == 200
    assert b'"code":"HIV"' not in raw and b'"code":"PSY"' not in raw


async def test_delivered_audit_event_does_not_name_hidden_records(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    await _break_glass_on_ana(gateway)
    [line] = gateway.state.settings.audit.path.read_bytes().splitlines()
    event = orjson.loads(line)
    world.add(event)  # what AuditDelivery PUTs when audit.fhir_url is the upstream
    status, _, raw = await call(gateway, "GET", f"/AuditEvent/{event['id']}")
    assert secrets_in(raw) == [], status


# ---------------------------------------------------------------- content the decision does not see


TASK = {
    "resourceType": "Task", "id": "task-hiv-vl-2c4", "status": "requested", "intent": "order",
    "for": {"reference": c.PAT_ANA},
    "code": c.concept(c.LOINC, "25836-8", "HIV 1 RNA [#/volume] (viral load) in Serum or Plasma by NAA with probe detection"),
    "reasonCode": [c.concept(c.ICD10CM, "B20", "Human immunodeficiency virus [HIV] disease")],
    "description": "Repeat HIV viral load in 3 months",
}
BINARY = {
    "resourceType": "Binary", "id": "bin-v-9a0", "contentType": "text/plain",
    "securityContext": {"reference": "DocumentReference/docref-vrestricted-v-9a0"},
    "data": base64.b64encode(b"Forensic examination record").decode(),
}


@pytest.mark.parametrize("resource", [TASK, BINARY], ids=["task-for-patient-with-hiv-code", "binary-of-restricted-document"])
async def test_patient_data_outside_the_compartment_is_decided(world: FakeFhir, gateway: GatewayUnderTest, resource: dict[str, Any]) -> None:
    world.add(resource)
    status, _, raw = await call(gateway, "GET", f"/{resource['resourceType']}/{resource['id']}")
    assert status == 403
    assert secrets_in(raw) == []


async def test_reference_display_to_hidden_record_is_not_shown(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.add({
        "resourceType": "Encounter", "id": "enc-clinic-3f1", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": c.PAT_ANA},
        "reasonReference": [{"reference": HIV_REF, "display": "HIV disease"}],
    })
    status, _, raw = await call(gateway, "GET", "/Encounter/enc-clinic-3f1")
    assert status == 200
    # The reference stays (it is the released record's own data); what it says of the target goes.
    assert orjson.loads(raw)["reasonReference"] == [{"reference": HIV_REF}]
    assert secrets_in(raw, c.SECRET_CODES + c.SECRET_TEXTS + ("HIV disease",)) == []


# ---------------------------------------------------------------- fail-open on odd answers


async def test_non_json_answer_to_system_search_is_not_passed(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    turtle = b'@prefix fhir: <http://hl7.org/fhir/> .\n<Condition/cond-hiv-b20-91a> fhir:code "B20" .\n'
    world.override = answer("GET", "", lambda r: web.Response(body=turtle, content_type="text/turtle"))
    status, _, raw = await call(gateway, "GET", f"/?_type=Condition&patient={c.PAT_ANA}&_format=ttl")
    assert status in (406, 502)
    assert secrets_in(raw) == []


@pytest.mark.parametrize("shape", ["no-resource-type", "entry-not-a-list"])
async def test_malformed_json_answer_fails_closed(world: FakeFhir, gateway: GatewayUnderTest, shape: str) -> None:
    if shape == "no-resource-type":
        body: dict[str, Any] = {k: v for k, v in c.HIV_CONDITION.items() if k != "resourceType"}
        path = f"/{HIV_REF}"
    else:
        body = {"resourceType": "Bundle", "type": "searchset",
                "entry": {"fullUrl": f"{world.base_url}/{HIV_REF}", "resource": c.HIV_CONDITION}}
        path = "/Condition"
    world.override = answer("GET", path, lambda r: fhir(body))
    status, _, raw = await call(gateway, "GET", path + ("" if shape == "no-resource-type" else f"?patient={c.PAT_ANA}"))
    assert secrets_in(raw) == [], status


# ---------------------------------------------------------------- 404 mode


async def test_batch_slot_of_hidden_record_looks_missing_in_404_mode(world: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(world.base_url, enforcement={"denied_read_status": 404})
    response = {"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"resource": c.HIV_CONDITION, "response": {"status": "200 OK"}},
        {"response": {"status": "404 Not Found"}},
    ]}
    world.override = answer("POST", "", lambda r: fhir(response))
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": HIV_REF}},
        {"request": {"method": "GET", "url": "Condition/does-not-exist"}},
    ]}
    _, _, raw = await call(gw, "POST", "/", body=orjson.dumps(batch), headers={"Content-Type": FHIR_JSON})
    hidden, missing = (e["response"]["status"] for e in orjson.loads(raw)["entry"])
    assert hidden.split()[0] == missing.split()[0] == "404"


async def test_history_of_hidden_record_looks_missing_in_404_mode(world: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(world.base_url, enforcement={"denied_read_status": 404})
    world.override = answer("GET", f"/{HIV_REF}/_history", lambda r: fhir(c.history_bundle([c.HIV_CONDITION], world.base_url)))
    status, _, _ = await call(gw, "GET", f"/{HIV_REF}/_history")
    assert status == 404


# ---------------------------------------------------------------- correctness


async def test_decimals_pass_unchanged(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.add(c.opt_in(c.PAT_BEN, "consent-ben"))
    raw = (
        b'{"resourceType":"Observation","id":"obs-k-ben","status":"final",'
        b'"code":{"coding":[{"system":"http://loinc.org","code":"2823-3","display":"Potassium [Moles/volume] in Serum or Plasma"}]},'
        b'"subject":{"reference":"Patient/pat-ben-7702"},'
        b'"valueQuantity":{"value":4.10,"unit":"mmol/L"},"note":[{"text":"x"}],'
        b'"extension":[{"url":"urn:example:precise","valueDecimal":0.12345678901234567891}]}'
    )
    world.override = answer("GET", "/Observation/obs-k-ben", lambda r: web.Response(body=raw, content_type=FHIR_JSON))
    status, _, body = await call(gateway, "GET", "/Observation/obs-k-ben")
    assert status == 200
    assert b'"value":4.10' in body and b"0.12345678901234567891" in body


async def test_self_access_does_not_open_has_over_linked_patients(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    linked_ben = {**c.BEN, "link": [{"other": {"reference": c.PAT_ANA}, "type": "seealso"}]}
    world.add(c.opt_in(c.PAT_BEN, "consent-ben"))
    # The upstream answers the reverse chain truthfully: Ben (linked to Ana) has an HIV condition.
    world.override = answer("GET", "/Patient", lambda r: fhir(c.bundle([linked_ben], world.base_url)))
    status, _, _ = await call(gateway, "GET", f"/Patient?link={c.PAT_ANA}&_has:Condition:patient:code=B20", actor=c.PAT_ANA)
    assert status == 403
