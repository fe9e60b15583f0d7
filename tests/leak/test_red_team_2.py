"""Red team, second pass: SMART jwt mode and scopes, upstream credentials, discovery, the
consent change feed, limits, and the label rules generated from public value sets, alone
and combined with the side doors of the first pass (``test_side_doors.py``).

Every test goes through the real request path (HTTP to the gateway, the fake FHIR server on
a real socket) and searches the RAW response bytes, headers, upstream requests, logs or
``/metrics``. A test the gateway does not pass is ``xfail(strict=True)`` with the leak in
its reason.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import aiohttp
import jwt as pyjwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.demo.issuer import LocalIssuer
from gateway.web.middleware import JsonLogFormatter
from tests.conftest import GatewayUnderTest
from tests.fakes import BATCH_ENTRY_HEADER, FakeFhir
from tests.fixtures import clinical as c
from tests.hidden import hidden_in
from tests.leak.test_side_doors import (
    FHIR_JSON, batch, call, entries, fhir, ids_in, is_outcome, leaks, raw, routes, slots,
)

MakeGateway = Callable[..., Awaitable[GatewayUnderTest]]
AUDIENCE = "https://gateway.example.org/fhir"
ANA_ID = c.PAT_ANA.split("/", 1)[1]
BEN_ID = c.PAT_BEN.split("/", 1)[1]
ICD = c.ICD10CM
V3 = c.V3_ACT_CODE

HTN_SECRETS = (c.ANA_HYPERTENSION["id"], "I10", "Essential")
BEN_SECRETS = (c.BEN_CBC["id"], c.BEN_HYPERTENSION["id"], "Okafor")


# ---------------------------------------------------------------- fixtures and helpers


def jwt_config(issuer: LocalIssuer, **extra: Any) -> dict[str, Any]:
    return {"auth": {"mode": "jwt", "jwt": {"issuer": issuer.base_url, "audience": AUDIENCE}}, **extra}


@pytest.fixture
async def jgw(world: FakeFhir, issuer: LocalIssuer, make_gateway: MakeGateway) -> GatewayUnderTest:
    return await make_gateway(world.base_url, **jwt_config(issuer))


@pytest.fixture
async def jgw404(world: FakeFhir, issuer: LocalIssuer, make_gateway: MakeGateway) -> GatewayUnderTest:
    return await make_gateway(world.base_url, **jwt_config(issuer), enforcement={"denied_read_status": 404})


def bearer(issuer: LocalIssuer, scope: str, user: str = c.DOCTOR, **claims: Any) -> str:
    return "Bearer " + issuer.mint({"fhirUser": user, "scope": scope, **claims}, audience=AUDIENCE)


async def jcall(gw: GatewayUnderTest, method: str, path: str, token: str | None, body: Any = None,
                **headers: str) -> tuple[int, dict[str, str], bytes]:
    if token is not None:
        headers["Authorization"] = token
    return await call(gw, method, path, actor=None, body=body, **headers)


def resource_types(body: bytes) -> set[str]:
    return {e["resource"]["resourceType"] for e in entries(body) if "resource" in e}


def slot_status(slot: dict[str, Any]) -> str:
    return str(slot.get("response", {}).get("status", ""))


# ================================================================ 1. SMART scopes at the side doors


async def test_batch_read_entries_obey_scopes(world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer) -> None:
    token = bearer(issuer, "user/Observation.rs")
    status, headers, body = await jcall(jgw, "POST", "/", token, batch(
        ("GET", f"Condition/{c.ANA_HYPERTENSION['id']}"),
        ("GET", f"Observation/{c.ANA_CBC['id']}"),
        ("GET", f"Condition?patient={c.PAT_ANA}"),
        ("GET", f"Patient/{ANA_ID}"),
    ))
    assert status == 200, body
    htn, cbc, search, patient = slots(body)
    assert slot_status(htn).startswith("403") and "resource" not in htn
    assert cbc["resource"]["id"] == c.ANA_CBC["id"]
    inner = orjson.dumps(search.get("resource", {}))
    assert c.ANA_HYPERTENSION["id"].encode() not in inner and b'"total"' not in inner
    assert slot_status(patient).startswith("403") and "resource" not in patient
    assert leaks(body, headers, (*HTN_SECRETS, "Reyes")) == []


async def test_transaction_read_entries_obey_scopes(world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer) -> None:
    token = bearer(issuer, "user/Observation.rs")
    status, headers, body = await jcall(jgw, "POST", "/", token, batch(
        ("GET", f"Condition/{c.ANA_HYPERTENSION['id']}"), ("GET", f"Observation/{c.ANA_CBC['id']}"), kind="transaction"))
    assert status in (200, 403), body
    assert leaks(body, headers, HTN_SECRETS) == []


@pytest.mark.parametrize("path", [
    f"/Observation?patient={c.PAT_ANA}&_include=Observation:subject",
    f"/Observation?patient={c.PAT_ANA}&_include=*",
    f"/Patient?_id={ANA_ID}&_revinclude=Condition:subject",
])
async def test_include_of_a_type_not_granted_is_removed(world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer, path: str) -> None:
    world.override = routes({
        ("GET", "/Observation"): lambda r: c.bundle([c.ANA_CBC], world.base_url, include=(c.ANA, c.ANA_HYPERTENSION)),
        ("GET", "/Patient"): lambda r: c.bundle([c.ANA], world.base_url, include=(c.ANA_HYPERTENSION,)),
    })
    scope = "user/Patient.rs" if path.startswith("/Patient") else "user/Observation.rs"
    status, headers, body = await jcall(jgw, "GET", path, bearer(issuer, scope))
    assert status == 200, body
    granted = scope.split("/")[1].split(".")[0]
    assert resource_types(body) <= {granted, "OperationOutcome"}, resource_types(body)
    assert granted in resource_types(body)
    assert b'"total"' not in body
    assert leaks(body, headers, HTN_SECRETS + (("Reyes",) if granted != "Patient" else ())) == []


async def test_include_in_a_batch_entry_obeys_scopes(world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer) -> None:
    world.override = routes({
        ("GET", "/Observation"): lambda r: c.bundle([c.ANA_CBC], world.base_url, include=(c.ANA_HYPERTENSION, c.HIV_CONDITION)),
    })
    status, headers, body = await jcall(jgw, "POST", "/", bearer(issuer, "user/Observation.rs"), batch(
        ("GET", f"Observation?patient={c.PAT_ANA}&_include=*")))
    assert status == 200, body
    assert leaks(body, headers, (*HTN_SECRETS, *c.SECRETS)) == []


GRANTED_BINARY = {
    "resourceType": "Binary", "id": "bin-htn-ana-2c4", "contentType": "text/plain",
    "securityContext": {"reference": f"Condition/{c.ANA_HYPERTENSION['id']}"},
    "data": base64.b64encode(b"Hypertension follow-up letter, BP 150/95").decode(),
}


async def test_binary_of_a_type_not_granted_is_withheld(world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer) -> None:
    world.add(GRANTED_BINARY)
    status, headers, body = await jcall(jgw, "GET", f"/Binary/{GRANTED_BINARY['id']}", bearer(issuer, "user/Binary.rs"))
    assert status == 403, body
    assert leaks(body, headers, (GRANTED_BINARY["data"],)) == []


BINARY_CONFINED_LEAK = (
    "LEAK: jwt fhirUser Patient/pat-ana-5581, scope 'patient/*.rs', patient=pat-ana-5581; {door} of Binary "
    "bin-ben-cbc-5e1 whose securityContext is Observation/obs-cbc-58410-ben (Ben's record) -> 200 with the "
    "Binary's data: Binary is outside every compartment, so Grants.releases() lets it through the patient "
    "confinement although the gateway binds it to Ben (gateway/core/scopes.py releases + is_patient_data)")


@pytest.mark.parametrize("door", [
    pytest.param("read"),
    pytest.param("search"),
    pytest.param("batch"),
])
async def test_binary_of_another_patient_is_withheld_from_a_confined_token(
    world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer, door: str
) -> None:
    ben_binary = {**GRANTED_BINARY, "id": "bin-ben-cbc-5e1",
                  "securityContext": {"reference": f"Observation/{c.BEN_CBC['id']}"}}
    world.add(ben_binary)
    token = bearer(issuer, "patient/*.rs", user=c.PAT_ANA, patient=ANA_ID)
    method, path, body_sent = {
        "read": ("GET", f"/Binary/{ben_binary['id']}", None),
        "search": ("GET", f"/Binary?_id={ben_binary['id']}", None),
        "batch": ("POST", "/", batch(("GET", f"Binary/{ben_binary['id']}"))),
    }[door]
    status, headers, body = await jcall(jgw, method, path, token, body_sent)
    assert status in (200, 403), body
    assert leaks(body, headers, (ben_binary["data"],)) == [], path


# ---------------------------------------------------------------- patient-confined tokens


def _everything_of(world: FakeFhir) -> Callable[[web.Request], Any]:
    def answer(request: web.Request) -> Any:
        pid = request.path.split("/")[-2]
        found = [r for r in world.resources.values() if r.get("id") == pid
                 or (r.get("subject") or {}).get("reference") == f"Patient/{pid}"]
        return c.bundle(found, world.base_url)

    return answer


JOINT = {
    # Ben took part in Ana's observation (Observation.performer is in the patient compartment).
    **c.observation("obs-joint-ana-ben-71d", c.PAT_ANA, c.concept(c.LOINC, "58410-2", "CBC panel - Blood by Automated count"),
                    {"valueString": "Joint sample drawn at Okafor residence"}, "2023-06-01T08:00:00Z"),
    "performer": [{"reference": c.PAT_BEN}],
}


@pytest.mark.parametrize("door", ["everything", "everything-batch", "group", "joint-read", "joint-search", "has"])
async def test_confined_token_does_not_reach_another_patient(
    world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer, door: str
) -> None:
    world.resources.pop("Consent/consent-ben-in")
    world.add(c.opt_out(c.PAT_BEN, "consent-ben-out"), JOINT, {
        "resourceType": "Group", "id": "grp-ward-3", "type": "person", "actual": True,
        "member": [{"entity": {"reference": c.PAT_ANA}}, {"entity": {"reference": c.PAT_BEN, "display": "Ben Okafor"}}],
    })
    world.override = routes({
        ("GET", f"/Patient/{BEN_ID}/$everything"): _everything_of(world),
        ("GET", "/Patient"): lambda r: c.bundle([c.ANA, c.BEN], world.base_url),
    })
    token = bearer(issuer, "launch/patient patient/*.rs", user=c.PAT_ANA, patient=ANA_ID)
    requests = {
        "everything": ("GET", f"/Patient/{BEN_ID}/$everything", None),
        "everything-batch": ("POST", "/", batch(("GET", f"Patient/{BEN_ID}/$everything"))),
        "group": ("GET", "/Group/grp-ward-3", None),
        "joint-read": ("GET", f"/Observation/{JOINT['id']}", None),
        "joint-search": ("GET", f"/Observation?patient={c.PAT_ANA}", None),
        "has": ("GET", f"/Patient?_has:Observation:performer:_id={JOINT['id']}", None),
    }
    method, path, sent = requests[door]
    status, headers, body = await jcall(jgw, method, path, token, sent)
    assert status in (200, 403, 404), body
    assert leaks(body, headers, (*BEN_SECRETS, JOINT["id"] if door != "joint-search" else "Okafor residence",
                                 "Okafor residence")) == []
    if door == "joint-search":
        assert c.ANA_CBC["id"] in ids_in(body)
    if door == "has":
        assert status == 403, body


async def test_confined_token_cannot_write_for_another_patient_in_a_batch(
    world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer
) -> None:
    token = bearer(issuer, "patient/Observation.crus", user=c.PAT_ANA, patient=ANA_ID)
    forged = {**c.BEN_CBC, "id": "obs-forged-ben-000"}
    before = len(world.requests)
    status, _, body = await jcall(jgw, "POST", "/", token, batch(
        ("POST", "Observation", {k: v for k, v in forged.items() if k != "id"}),
        ("PUT", f"Observation/{c.BEN_CBC['id']}", c.BEN_CBC),
        ("PATCH", f"Observation/{c.ANA_CBC['id']}", {"resourceType": "Parameters"}),
    ))
    assert status == 200, body
    assert all(slot_status(s).startswith("403") for s in slots(body)), body
    assert not any(r.method in ("POST", "PUT", "PATCH") and BATCH_ENTRY_HEADER in r.headers for r in world.requests[before:])


@pytest.mark.parametrize("operation", ["$meta-delete", "$meta-add", "$META-DELETE", "$Meta-Add"])
async def test_read_only_token_cannot_change_meta_through_an_operation(
    world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer, operation: str,
) -> None:
    """``$meta-add`` / ``$meta-delete`` change the stored resource: a write needing ``u``, however
    the name is written (a server may fold its case)."""
    world.override = routes({("POST", f"/Observation/{c.ANA_CBC['id']}/{operation}"): lambda r: {
        "resourceType": "Parameters", "parameter": [{"name": "return", "valueMeta": {}}]}})
    params = {"resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": {
        "security": [{"system": c.V3_CONFIDENTIALITY, "code": "R"}]}}]}
    status, headers, body = await jcall(jgw, "POST", f"/Observation/{c.ANA_CBC['id']}/{operation}",
                                        bearer(issuer, "user/*.rs"), params)
    sent = [r for r in world.requests if operation in r.path_qs]
    assert status == 403 and not sent, (status, body)


@pytest.mark.parametrize("door", ["operation-parameters", "stored-document-bundle", "batch-nested-bundle"])
async def test_neutral_containers_do_not_carry_types_not_granted(
    world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer, door: str
) -> None:
    """Bundle and Parameters pass the scope check as containers; what they carry must not."""
    document = {"resourceType": "Bundle", "id": "doc-summary-ana-4e2", "type": "document", "entry": [
        {"fullUrl": f"{world.base_url}/Observation/{c.ANA_CBC['id']}", "resource": c.ANA_CBC},
        {"fullUrl": f"{world.base_url}/Condition/{c.ANA_HYPERTENSION['id']}", "resource": c.ANA_HYPERTENSION}]}
    world.add(document)
    world.override = routes({("GET", f"/Patient/{ANA_ID}/$summary-rt"): lambda r: {
        "resourceType": "Parameters", "parameter": [
            {"name": "observation", "resource": c.ANA_CBC}, {"name": "problem", "resource": c.ANA_HYPERTENSION},
            {"name": "nested", "part": [{"name": "problem", "resource": c.ANA_HYPERTENSION}]}]}})
    token = bearer(issuer, "user/Observation.rs user/Bundle.rs user/Patient.rs")
    method, path, sent = {
        "operation-parameters": ("GET", f"/Patient/{ANA_ID}/$summary-rt", None),
        "stored-document-bundle": ("GET", f"/Bundle/{document['id']}", None),
        "batch-nested-bundle": ("POST", "/", batch(("GET", f"Bundle/{document['id']}"))),
    }[door]
    status, headers, body = await jcall(jgw, method, path, token, sent)
    assert status in (200, 403), body
    assert leaks(body, headers, HTN_SECRETS) == []


async def test_break_glass_does_not_lift_patient_confinement(world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer) -> None:
    world.override = routes({("GET", f"/Patient/{BEN_ID}/$everything"): _everything_of(world)})
    token = bearer(issuer, "patient/*.rs", user=c.DOCTOR, patient=ANA_ID)
    for method, path, sent in (("GET", f"/Observation/{c.BEN_CBC['id']}", None),
                               ("GET", f"/Patient/{BEN_ID}/$everything", None),
                               ("POST", "/", batch(("GET", f"Condition/{c.BEN_HYPERTENSION['id']}")))):
        status, headers, body = await jcall(jgw, method, path, token, sent, **{"X-Break-Glass": "Medical emergency"})
        assert leaks(body, headers, BEN_SECRETS) == [], path


# ---------------------------------------------------------------- break-glass with a token


async def test_break_glass_does_not_override_scopes_in_a_batch(world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer) -> None:
    status, headers, body = await jcall(jgw, "POST", "/", bearer(issuer, "user/Observation.rs"), batch(
        ("GET", f"Condition/{c.HIV_CONDITION['id']}"), ("GET", f"Condition?patient={c.PAT_ANA}"),
        ("GET", f"MedicationRequest/{c.BUPRENORPHINE['id']}")), **{"X-Break-Glass": "Medical emergency"})
    assert status == 200, body
    assert leaks(body, headers, (*c.SECRETS, *HTN_SECRETS)) == []


async def test_break_glass_with_a_token_opens_consent_but_is_audited(
    world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer
) -> None:
    token = bearer(issuer, "user/*.rs")
    status, _, _ = await jcall(jgw, "GET", f"/Condition/{c.HIV_CONDITION['id']}", token)
    assert status == 403
    status, headers, body = await jcall(jgw, "GET", f"/Condition/{c.HIV_CONDITION['id']}", token,
                                        **{"X-Break-Glass": "Medical emergency"})
    assert status == 200 and "X-Break-Glass-Audit-Id" in headers, body
    audit = jgw.state.settings.audit.path
    lines = [json.loads(line) for line in open(audit, encoding="utf-8") if line.strip()]
    assert any(headers["X-Break-Glass-Audit-Id"] == e.get("id") for e in lines)
    assert any(c.DOCTOR in json.dumps(e) for e in lines), "the AuditEvent names the token's fhirUser"


@pytest.mark.parametrize("header", ["X-Actor", "X-Actor-Organization", "X-Actor-Role", "X-Purpose-Of-Use", "x-actor"])
async def test_identity_headers_beside_a_token_are_refused(world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer, header: str) -> None:
    value = {"X-Actor-Organization": "Organization/org-1", "X-Actor-Role": "PRCP", "X-Purpose-Of-Use": "ETREAT"}.get(header, c.PAT_ANA)
    status, headers, body = await jcall(jgw, "GET", f"/Condition/{c.HIV_CONDITION['id']}", bearer(issuer, "user/*.rs"), **{header: value})
    is_outcome(status, headers, body, 400)
    assert leaks(body, headers) == []


# ---------------------------------------------------------------- tokens: algorithms and fhirUser


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(issuer: LocalIssuer, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": issuer.base_url, "aud": AUDIENCE, "iat": now, "exp": now + 600, "fhirUser": c.PAT_ANA,
            "scope": "user/*.rs", **extra}


def _forged_tokens(issuer: LocalIssuer) -> dict[str, str]:
    import hashlib
    import hmac

    key = issuer.key("rsa-1")
    public_pem = key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = _claims(issuer)
    out: dict[str, str] = {}
    for name, secret in (("hs256-public-pem", public_pem), ("hs256-jwk-n", json.dumps(key.jwk()).encode())):
        head = _b64(orjson.dumps({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}))
        payload = _b64(orjson.dumps(claims))
        sig = _b64(hmac.new(secret, f"{head}.{payload}".encode(), hashlib.sha256).digest())
        out[name] = f"{head}.{payload}.{sig}"
    out["none"] = _b64(orjson.dumps({"alg": "none", "kid": "rsa-1"})) + "." + _b64(orjson.dumps(claims)) + "."
    out["None-case"] = _b64(orjson.dumps({"alg": "None", "kid": "rsa-1"})) + "." + _b64(orjson.dumps(claims)) + "."
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = attacker.public_key().public_numbers()
    jwk = {"kty": "RSA", "kid": "rsa-1", "n": _b64(pub.n.to_bytes(256, "big")), "e": _b64(pub.e.to_bytes(3, "big"))}
    out["embedded-jwk"] = pyjwt.encode(claims, attacker, algorithm="RS256", headers={"kid": "rsa-1", "jwk": jwk})
    out["jku"] = pyjwt.encode(claims, attacker, algorithm="RS256",
                              headers={"kid": "attacker", "jku": "http://127.0.0.1:1/jwks.json"})
    out["ec-kid-rs-alg"] = pyjwt.encode(claims, attacker, algorithm="RS256", headers={"kid": "ec-1"})
    out["ps256-on-rs-key"] = pyjwt.encode(claims, key.private, algorithm="PS256", headers={"kid": "rsa-1"})
    good = issuer.mint({"fhirUser": c.PAT_ANA, "scope": "user/*.rs"}, audience=AUDIENCE)
    h, p, s = good.split(".")
    out["payload-swapped"] = f"{h}.{_b64(orjson.dumps({**claims, 'fhirUser': c.PAT_ANA, 'x': 1}))}.{s}"
    out["aud-list-other"] = issuer.mint({"fhirUser": c.PAT_ANA, "scope": "user/*.rs", "aud": ["https://other.example/fhir"]})
    out["no-exp"] = pyjwt.encode({k: v for k, v in claims.items() if k != "exp"}, key.private, algorithm="RS256",
                                 headers={"kid": "rsa-1"})
    out["iss-trailing-slash"] = pyjwt.encode({**claims, "iss": issuer.base_url + "/"}, key.private, algorithm="RS256",
                                             headers={"kid": "rsa-1"})
    return out


async def test_forged_tokens_are_refused(world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer) -> None:
    for name, token in _forged_tokens(issuer).items():
        status, headers, body = await jcall(jgw, "GET", f"/Condition/{c.HIV_CONDITION['id']}", f"Bearer {token}")
        assert status == 401, (name, status, body)
        assert headers.get("WWW-Authenticate", "").startswith("Bearer"), name
        assert leaks(body, headers) == [], name


@pytest.mark.parametrize("fhir_user", [
    f"https://ehr.example/fhir/{c.DOCTOR}#/{c.PAT_ANA}",
    f"https://ehr.example/fhir/{c.DOCTOR}?as=/{c.PAT_ANA}",
    f"https://ehr.example/fhir/{c.DOCTOR}?_=x#{c.PAT_ANA}",
    f"https://ehr.example/fhir/{c.PAT_ANA}/_history/1",
    f"{c.PAT_ANA}/_history/1",
    f"https://ehr.example/fhir/{c.PAT_ANA}/",
    f"https://ehr.example/fhir/{c.PAT_ANA}%2F..%2F..%2F{c.DOCTOR}",
    pytest.param(f"https://ehr.example/fhir/{c.DOCTOR}/..%2F..%2F{c.PAT_ANA}"),
    f"Patient/{ANA_ID}%00",
    f"Patient/{ANA_ID}\n",
])
async def test_fhir_user_tricks_never_become_ana(world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer, fhir_user: str) -> None:
    """Only a fhirUser that names Ana (reference or absolute URL of one) gets her self access."""
    token = bearer(issuer, "user/*.rs", user=fhir_user)
    status, headers, body = await jcall(jgw, "GET", f"/Condition/{c.HIV_CONDITION['id']}", token)
    path = fhir_user.split("://", 1)[-1].split("?")[0].split("#")[0]
    names_ana = path.rstrip("/").endswith(c.PAT_ANA) and "%" not in path and "\n" not in path and "_history" not in path
    if not names_ana:
        assert status in (401, 403), (fhir_user, status)
        assert leaks(body, headers) == []


# ---------------------------------------------------------------- 404 mode: scopes look like missing


async def test_404_mode_scope_denials_equal_missing_everywhere(
    world: FakeFhir, jgw404: GatewayUnderTest, issuer: LocalIssuer
) -> None:
    world.add(GRANTED_BINARY)
    token = bearer(issuer, "user/Observation.rs")
    pairs = [
        (f"/Condition/{c.ANA_HYPERTENSION['id']}", "/Condition/cond-nothing-here-000"),
        (f"/Condition/{c.ANA_HYPERTENSION['id']}/_history/1", "/Condition/cond-nothing-here-000/_history/1"),
        (f"/Condition/{c.ANA_HYPERTENSION['id']}/$meta", "/Condition/cond-nothing-here-000/$meta"),
    ]
    for hidden, missing in pairs:
        a = await jcall(jgw404, "GET", hidden, token)
        b = await jcall(jgw404, "GET", missing, token)
        assert a[0] == b[0] == 404, (hidden, a, b)
        assert a[2] == b[2], hidden
        assert {k for k in a[1] if k.lower() not in ("date", "x-request-id", "content-length")} == \
            {k for k in b[1] if k.lower() not in ("date", "x-request-id", "content-length")}
    status, _, body = await jcall(jgw404, "POST", "/", token, batch(
        ("GET", f"Condition/{c.ANA_HYPERTENSION['id']}"), ("GET", "Condition/cond-nothing-here-000")))
    assert status == 200, body
    x, y = slots(body)
    assert x == y
    assert leaks(body, None, HTN_SECRETS) == []


async def test_404_mode_confined_everything_of_another_patient_equals_missing(
    world: FakeFhir, jgw404: GatewayUnderTest, issuer: LocalIssuer
) -> None:
    def everything(request: web.Request) -> Any:
        pid = request.path.split("/")[-2]
        if f"Patient/{pid}" not in world.resources:
            return fhir({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]}, 404)
        return _everything_of(world)(request)

    world.override = routes({("GET", f"/Patient/{BEN_ID}/$everything"): everything,
                             ("GET", "/Patient/pat-nothing-here-000/$everything"): everything})
    token = bearer(issuer, "patient/*.rs", user=c.PAT_ANA, patient=ANA_ID)
    a = await jcall(jgw404, "GET", f"/Patient/{BEN_ID}/$everything", token)
    b = await jcall(jgw404, "GET", "/Patient/pat-nothing-here-000/$everything", token)
    assert leaks(a[2], a[1], BEN_SECRETS) == []
    assert (a[0], a[2]) == (b[0], b[2])


# ---------------------------------------------------------------- totals and unfilterables with scopes


@pytest.mark.parametrize("path", [
    f"/Observation?patient={c.PAT_ANA}&_summary=count",
    f"/Patient?_has:Observation:subject:code=20447-9&_id={ANA_ID}",
    f"/Patient/{ANA_ID}/$graphql?query={{ConditionList{{code{{text}}}}}}",
])
async def test_restricted_token_never_opens_unfilterables_even_for_self(
    world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer, path: str
) -> None:
    token = bearer(issuer, "patient/Observation.rs", user=c.PAT_ANA, patient=ANA_ID)
    status, headers, body = await jcall(jgw, "GET", path, token)
    is_outcome(status, headers, body, 403)


async def test_restricted_token_search_has_no_total(world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer) -> None:
    token = bearer(issuer, "patient/Observation.rs", user=c.PAT_ANA, patient=ANA_ID)
    status, _, body = await jcall(jgw, "GET", f"/Condition?patient={c.PAT_ANA}", token)
    assert status == 200 and b'"total"' not in body, body
    assert ids_in(body) == set()


# ================================================================ 2. upstream credentials


async def test_client_authorization_never_reaches_upstream_through_any_door(
    world: FakeFhir, issuer: LocalIssuer, make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RT2_FHIR_TOKEN", "gw-own-secret-7c1")
    world.add(GRANTED_BINARY, {"resourceType": "Medication", "id": "med-lisinopril-10-2a4",
                               "code": c.concept(c.RXNORM, "314076", "lisinopril 10 MG Oral Tablet")},
              {"resourceType": "MedicationRequest", "id": "medrx-lis-77a", "status": "active", "intent": "order",
               "medicationReference": {"reference": "Medication/med-lisinopril-10-2a4"}, "subject": {"reference": c.PAT_ANA}})
    world.override = routes({("GET", f"/Patient/{ANA_ID}/$everything"): _everything_of(world)})
    gw = await make_gateway(world.base_url, **jwt_config(issuer),
                            upstream={"auth": {"kind": "bearer", "token_env": "RT2_FHIR_TOKEN"}})
    token = bearer(issuer, "user/*.cruds")
    doors = [
        ("GET", f"/Observation/{c.ANA_CBC['id']}", None),
        ("GET", f"/Observation?patient={c.PAT_ANA}", None),
        ("GET", f"/Patient/{ANA_ID}/$everything", None),
        ("GET", f"/Binary/{GRANTED_BINARY['id']}", None),
        ("GET", "/MedicationRequest/medrx-lis-77a", None),
        ("GET", f"/Observation/{c.ANA_CBC['id']}/$meta", None),
        ("POST", "/", batch(("GET", f"Observation/{c.ANA_CBC['id']}"), ("GET", f"Binary/{GRANTED_BINARY['id']}"))),
        ("POST", "/Observation", {**c.ANA_CBC, "id": None}),
        ("GET", "/metadata", None),
    ]
    for method, path, sent in doors:
        await jcall(gw, method, path, token, sent)
        await jcall(gw, method, path, token, sent, **{"X-Break-Glass": "Medical emergency"})
    await jcall(gw, "GET", f"/Observation/{c.ANA_CBC['id']}", token.replace("Bearer", "bearer"))
    gateway_calls = [r for r in world.requests if BATCH_ENTRY_HEADER not in r.headers]
    assert len(gateway_calls) > 10
    seen = {r.headers.get("Authorization") for r in gateway_calls}
    assert seen == {"Bearer gw-own-secret-7c1"}, seen
    client_jwt = token.split(" ", 1)[1]
    assert not any(client_jwt in repr(r.headers) or client_jwt.encode() in r.body for r in world.requests)


async def test_upstream_token_is_never_echoed_in_a_body(
    world: FakeFhir, issuer: LocalIssuer, make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FHIR server that echoes the request's Authorization in its diagnostics texts."""
    monkeypatch.setenv("RT2_FHIR_TOKEN", "gw-own-secret-7c1")

    async def echo(request: web.Request) -> web.StreamResponse | None:
        auth = request.headers.get("Authorization", "")
        if request.path.endswith("/Observation/obs-echo-000"):
            return fhir({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing",
                         "diagnostics": f"bad token {auth}"}]}, 500)
        if request.path.endswith("/metadata"):
            return fhir({"resourceType": "CapabilityStatement", "status": "active", "fhirVersion": "4.0.1",
                         "implementation": {"description": "internal FHIR", "url": world.base_url}})
        return None

    world.override = echo
    gw = await make_gateway(world.base_url, **jwt_config(issuer),
                            upstream={"auth": {"kind": "bearer", "token_env": "RT2_FHIR_TOKEN"}})
    token = bearer(issuer, "user/*.rs")
    for method, path, sent in (("GET", "/Observation/obs-echo-000", None), ("POST", "/", batch(("GET", "Observation/obs-echo-000")))):
        status, headers, body = await jcall(gw, method, path, token, sent)
        assert b"gw-own-secret-7c1" not in body, (path, body)
    status, headers, body = await jcall(gw, "GET", "/metadata", None)
    assert status == 200 and world.base_url.encode() not in body, body


async def test_upstream_challenge_about_the_gateway_credentials_is_not_passed_on(
    world: FakeFhir, issuer: LocalIssuer, make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RT2_FHIR_TOKEN", "gw-expired-token")
    challenge = 'Bearer realm="fhir-internal", authorization_uri="https://login.internal-idp.corp/tenant-4471", error="invalid_token"'

    async def refuse(request: web.Request) -> web.StreamResponse | None:
        if request.path.endswith(f"/Observation/{c.ANA_CBC['id']}"):
            return fhir({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login"}]}, 401,
                        headers={"WWW-Authenticate": challenge})
        return None

    world.override = refuse
    gw = await make_gateway(world.base_url, **jwt_config(issuer),
                            upstream={"auth": {"kind": "bearer", "token_env": "RT2_FHIR_TOKEN"}})
    status, headers, body = await jcall(gw, "GET", f"/Observation/{c.ANA_CBC['id']}", bearer(issuer, "user/*.rs"))
    assert status in (401, 502, 503), body
    assert leaks(body, headers, ("internal-idp.corp", "tenant-4471", "fhir-internal")) == [], headers


async def test_upstream_urls_in_link_headers_are_rewritten(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    async def link(request: web.Request) -> web.StreamResponse | None:
        if request.path.endswith(f"/Observation/{c.ANA_CBC['id']}"):
            return fhir(c.ANA_CBC, headers={"Link": f'<{world.base_url}/Observation/{c.ANA_CBC["id"]}>; rel="canonical"'})
        return None

    world.override = link
    status, headers, body = await call(gateway, "GET", f"/Observation/{c.ANA_CBC['id']}")
    assert status == 200, body
    assert leaks(body, headers, (world.base_url.split("//", 1)[1].split("/")[0],)) == [], headers


# ================================================================ 3. doors without identity


@pytest.mark.parametrize("target", [
    f"/metadata/../Condition/{c.HIV_CONDITION['id']}",
    f"/metadata/%2e%2e/Condition/{c.HIV_CONDITION['id']}",
    f"/metadata%2F..%2FCondition%2F{c.HIV_CONDITION['id']}",
    f"/.well-known/smart-configuration/../../Condition/{c.HIV_CONDITION['id']}",
    f"/fhir/metadata/../Condition/{c.HIV_CONDITION['id']}",
    f"/metadata;/../Condition/{c.HIV_CONDITION['id']}",
    f"/metadata?_=/../Condition/{c.HIV_CONDITION['id']}",
    f"//metadata/../Condition/{c.HIV_CONDITION['id']}",
    "/metadata/$everything",
    f"/Condition/{c.HIV_CONDITION['id']}#/metadata",
])
async def test_identity_free_paths_do_not_reach_patient_data(world: FakeFhir, jgw: GatewayUnderTest, target: str) -> None:
    request = (f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/fhir+json\r\n"
               "Connection: close\r\n\r\n").encode()
    status, headers, body = await raw(jgw, request)
    assert leaks(body, headers) == [], (target, status)
    assert not any(c.HIV_CONDITION["id"] in r.path_qs.split("?")[0] and BATCH_ENTRY_HEADER not in r.headers
                   and r.method == "GET" for r in world.requests), target


async def test_batch_entry_for_metadata_does_not_skip_identity(world: FakeFhir, jgw: GatewayUnderTest) -> None:
    """Without a token the batch itself is refused; the metadata entry is not a key."""
    status, headers, body = await jcall(jgw, "POST", "/", None, batch(
        ("GET", "metadata"), ("GET", f"Condition/{c.HIV_CONDITION['id']}")))
    is_outcome(status, headers, body, 401)
    status, headers, body = await jcall(jgw, "POST", "/metadata", None, batch(
        ("GET", f"Condition/{c.HIV_CONDITION['id']}")))
    assert status in (401, 404, 405), body
    assert leaks(body, headers) == []


async def test_discovery_documents_name_no_upstream_or_secret(
    world: FakeFhir, issuer: LocalIssuer, make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RT2_FHIR_TOKEN", "gw-own-secret-7c1")
    world.override = routes({("GET", "/metadata"): lambda r: {
        "resourceType": "CapabilityStatement", "status": "active", "fhirVersion": "4.0.1", "kind": "instance",
        "implementation": {"description": "internal FHIR", "url": world.base_url},
        "rest": [{"mode": "server", "security": {"service": [{"text": "internal-oauth"}], "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [{"url": "token", "valueUri": "https://internal-idp.corp/token"}]}]},
            "resource": [{"type": "Observation"}]}]}})
    gw = await make_gateway(world.base_url, **jwt_config(issuer),
                            upstream={"auth": {"kind": "bearer", "token_env": "RT2_FHIR_TOKEN"}})
    secrets = ("gw-own-secret-7c1", world.base_url, "internal-idp.corp")
    for path in ("/metadata", "/fhir/metadata", "/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"):
        status, headers, body = await jcall(gw, "GET", path, None)
        assert status == 200, (path, body)
        assert leaks(body, headers, secrets) == [], path
    status, _, body = await jcall(gw, "GET", "/metadata", None)
    assert issuer.base_url.encode() in body, "the SMART endpoints of the real issuer are named"


# ================================================================ 4. labels: codes in odd places


def _cc(system: str, code: str, display: str) -> dict[str, Any]:
    return c.concept(system, code, display)


SUBJ = {"subject": {"reference": c.PAT_ANA}}
ODD_PLACES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "icd-lowercase-dot": ({"resourceType": "Condition", "id": "cond-oud-lc-1a1", **SUBJ,
                           "code": _cc(ICD, "f11.20", "Opioid dependence, uncomplicated")}, ("f11.20", "Opioid dependence")),
    "icd-lowercase-nodot": ({"resourceType": "Condition", "id": "cond-oud-lc-2b2", **SUBJ,
                             "code": _cc(ICD, "f1120", "Opioid dependence, uncomplicated")}, ("f1120", "Opioid dependence")),
    "icd-nodot-upper": ({"resourceType": "Condition", "id": "cond-oud-nd-3c3", **SUBJ,
                         "code": _cc(ICD, "F1120", "Opioid dependence, uncomplicated")}, ("F1120", "Opioid dependence")),
    "icd-who-system": ({"resourceType": "Condition", "id": "cond-hiv-who-4d4", **SUBJ,
                        "code": _cc("http://hl7.org/fhir/sid/icd-10", "B20", "HIV disease")}, ("B20", "HIV disease")),
    "icd-oid-system": ({"resourceType": "Condition", "id": "cond-hiv-oid-5e5", **SUBJ,
                        "code": _cc("urn:oid:2.16.840.1.113883.6.90", "B20", "HIV disease")}, ("B20", "HIV disease")),
    "icd-self-harm-6th-char": ({"resourceType": "Condition", "id": "cond-t40-sh-6f6", **SUBJ,
                                "code": _cc(ICD, "T40.2X2A", "Poisoning by other opioids, intentional self-harm, initial encounter")},
                               ("T40.2X2A", "self-harm")),
    "obs-component-code": ({"resourceType": "Observation", "id": "obs-panel-comp-7a7", "status": "final", **SUBJ,
                            "code": _cc(c.LOINC, "11502-2", "Laboratory report"),
                            "component": [{"code": _cc(c.LOINC, "20447-9", "HIV 1 RNA [#/volume] (viral load) in Serum or Plasma"),
                                           "valueQuantity": {"value": 12000}}]}, ("20447-9", "HIV 1 RNA")),
    "obs-value-concept": ({"resourceType": "Observation", "id": "obs-problem-val-8b8", "status": "final", **SUBJ,
                           "code": _cc(c.LOINC, "11450-4", "Problem list - Reported"),
                           "valueCodeableConcept": _cc(c.SNOMED, "86406008", "Human immunodeficiency virus infection")},
                          ("86406008", "immunodeficiency")),
    "contained-medication": ({"resourceType": "MedicationRequest", "id": "medrx-cont-9c9", "status": "active", "intent": "order", **SUBJ,
                              "contained": [{"resourceType": "Medication", "id": "m",
                                             "code": _cc(c.RXNORM, "1010604", "buprenorphine 8 MG / naloxone 2 MG Sublingual Film")}],
                              "medicationReference": {"reference": "#m"}}, ("1010604", "buprenorphine")),
    "dispense-sbd": ({"resourceType": "MedicationDispense", "id": "meddisp-bik-0d0", "status": "completed", **SUBJ,
                      "medicationCodeableConcept": _cc(c.RXNORM, "1999673",
                                                       "bictegravir 50 MG / emtricitabine 200 MG / tenofovir alafenamide 25 MG Oral Tablet [Biktarvy]")},
                     ("1999673", "Biktarvy")),
    "administration-reason": ({"resourceType": "MedicationAdministration", "id": "medadm-rsn-1e1", "status": "completed", **SUBJ,
                               "medicationCodeableConcept": _cc(c.RXNORM, "197361", "amlodipine 5 MG Oral Tablet"),
                               "effectiveDateTime": "2023-01-01",
                               "reasonCode": [_cc(ICD, "F11.20", "Opioid dependence, uncomplicated")]}, ("F11.20", "Opioid dependence")),
    "condition-evidence": ({"resourceType": "Condition", "id": "cond-evid-2f2", **SUBJ,
                            "code": _cc(c.SNOMED, "55822004", "Hyperlipidemia"),
                            "evidence": [{"code": [_cc(ICD, "B20", "HIV disease")]}]}, ("B20", "HIV disease")),
    "encounter-reason": ({"resourceType": "Encounter", "id": "enc-rsn-3a3", "status": "finished", **SUBJ,
                          "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                          "reasonCode": [_cc(ICD, "F10.20", "Alcohol dependence, uncomplicated")]}, ("F10.20", "Alcohol dependence")),
    "claim-diagnosis": ({"resourceType": "Claim", "id": "claim-dx-4b4", "status": "active", "use": "claim",
                         "patient": {"reference": c.PAT_ANA},
                         "diagnosis": [{"sequence": 1, "diagnosisCodeableConcept": _cc(ICD, "B20", "HIV disease")}]},
                        ("B20", "HIV disease")),
    "composition-contained": ({"resourceType": "Composition", "id": "comp-cont-5c5", "status": "final", **SUBJ,
                               "type": _cc(c.LOINC, "34133-9", "Summary of episode note"), "date": "2023-01-01", "title": "Summary",
                               "contained": [{"resourceType": "Condition", "id": "x", "code": _cc(ICD, "B20", "HIV disease"), **SUBJ}],
                               "section": [{"title": "Problems", "entry": [{"reference": "#x"}]}]}, ("B20", "HIV disease")),
    "questionnaire-answer": ({"resourceType": "QuestionnaireResponse", "id": "qr-ans-6d6", "status": "completed", **SUBJ,
                              "item": [{"linkId": "1", "item": [{"linkId": "1.1", "answer": [{"valueCoding": {
                                  "system": ICD, "code": "F11.20", "display": "Opioid dependence, uncomplicated"}}]}]}]},
                             ("F11.20", "Opioid dependence")),
    "phq9-bh": ({"resourceType": "Observation", "id": "obs-phq9-7e7", "status": "final", **SUBJ,
                 "code": _cc(c.LOINC, "89204-2", "Patient Health Questionnaire-9: Depression"), "valueInteger": 19},
                ("89204-2", "Patient Health Questionnaire")),
    "rxnorm-suboxone-branded": ({"resourceType": "MedicationStatement", "id": "medst-subx-b1c", "status": "active", **SUBJ,
                                 "medicationCodeableConcept": _cc(c.RXNORM, "1010601", "Buprenorphine 2 MG / Naloxone 0.5 MG [Suboxone]")},
                                ("1010601", "Suboxone")),
    "rxnorm-sublocade-branded": ({"resourceType": "MedicationAdministration", "id": "medadm-sublo-c2d", "status": "completed", **SUBJ,
                                  "effectiveDateTime": "2023-02-01",
                                  "medicationCodeableConcept": _cc(c.RXNORM, "1996186", "Buprenorphine 200 MG/ML [Sublocade]")},
                                 ("1996186", "Sublocade")),
    "rxnorm-suboxone-sbd": ({"resourceType": "MedicationStatement", "id": "medst-subx-sbd-b5c", "status": "active", **SUBJ,
                             "medicationCodeableConcept": _cc(c.RXNORM, "1010603", "buprenorphine 2 MG / naloxone 0.5 MG Sublingual Film [Suboxone]")},
                            ("1010603", "Suboxone")),
    "rxnorm-sublocade-sbd": ({"resourceType": "MedicationAdministration", "id": "medadm-sublo-sbd-c6d", "status": "completed", **SUBJ,
                              "effectiveDateTime": "2023-02-01",
                              "medicationCodeableConcept": _cc(c.RXNORM, "1996189", "0.5 ML buprenorphine 200 MG/ML Prefilled Syringe [Sublocade]")},
                             ("1996189", "Sublocade")),
    "dispense-ndc-suboxone": ({"resourceType": "MedicationDispense", "id": "meddisp-ndc-subx-d3e", "status": "completed", **SUBJ,
                              "medicationCodeableConcept": _cc("http://hl7.org/fhir/sid/ndc", "12496-1208",
                                                               "Buprenorphine and Naloxone Sublingual Film (Suboxone)")},
                             ("12496-1208", "Naloxone Sublingual")),
    "carin-pharmacy-eob-ndc": ({"resourceType": "ExplanationOfBenefit", "id": "eob-rx-ndc-e4f", "status": "active", "use": "claim",
                                "outcome": "complete", "patient": {"reference": c.PAT_ANA},
                                "item": [{"sequence": 1, "productOrService": _cc("http://hl7.org/fhir/sid/ndc", "12496-1208",
                                                                                  "Buprenorphine and Naloxone Sublingual Film (Suboxone)")}]},
                               ("12496-1208", "Naloxone Sublingual")),
    "condition-dueTo-extension": ({"resourceType": "Condition", "id": "cond-pcp-dueto-8f8", **SUBJ,
                                   "code": _cc(ICD, "B59", "Pneumocystosis"),
                                   "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/condition-dueTo",
                                                  "valueCodeableConcept": _cc(ICD, "B20", "HIV disease")}]},
                                  ("B20", "HIV disease")),
    "code-element-extension": ({"resourceType": "Condition", "id": "cond-codeext-9a9", **SUBJ,
                                "code": {**_cc(c.SNOMED, "233604007", "Pneumonia"), "extension": [{
                                    "url": "http://example.org/fhir/StructureDefinition/original-code",
                                    "valueCoding": {"system": ICD, "code": "F11.20", "display": "Opioid dependence, uncomplicated"}}]}},
                               ("F11.20", "Opioid dependence")),
    "component-modifier-extension": ({"resourceType": "Observation", "id": "obs-compext-0b0", "status": "final", **SUBJ,
                                      "code": _cc(c.LOINC, "11502-2", "Laboratory report"),
                                      "component": [{"code": _cc(c.LOINC, "718-7", "Hemoglobin [Mass/volume] in Blood"),
                                                     "modifierExtension": [{"url": "http://example.org/fhir/StructureDefinition/context",
                                                                            "extension": [{"url": "reason", "valueCodeableConcept":
                                                                                           _cc(ICD, "B20", "HIV disease")}]}]}]},
                                     ("B20", "HIV disease")),
    "dispense-ndc-hyphenated-4-4-2": ({"resourceType": "MedicationDispense", "id": "meddisp-ndc442-1c1", "status": "completed", **SUBJ,
                                       "medicationCodeableConcept": _cc("urn:oid:2.16.840.1.113883.6.69", "0054-0176-13",
                                                                        "Buprenorphine HCl 2 mg sublingual tablet")},
                                      ("0054-0176-13", "Buprenorphine HCl")),
    # Extensions on elements off the code paths code the record as surely.
    "note-extension": ({"resourceType": "Condition", "id": "cond-noteext-4f4", **SUBJ,
                        "code": _cc(c.SNOMED, "233604007", "Pneumonia"),
                        "note": [{"text": "Reviewed with the patient", "extension": [{
                            "url": "http://example.org/fhir/StructureDefinition/note-finding",
                            "valueCodeableConcept": _cc(ICD, "F11.20", "Opioid dependence, uncomplicated")}]}]},
                       ("F11.20", "Opioid dependence")),
    "body-site-extension": ({"resourceType": "Procedure", "id": "proc-siteext-5a5", "status": "completed", **SUBJ,
                             "code": _cc(c.SNOMED, "71388002", "Procedure"),
                             "bodySite": [{**_cc(c.SNOMED, "368209003", "Right arm"), "extension": [{
                                 "url": "http://example.org/fhir/StructureDefinition/site-reason",
                                 "valueCoding": {"system": ICD, "code": "B20", "display": "HIV disease"}}]}]},
                            ("B20", "HIV disease")),
    "dosage-value-code": ({"resourceType": "MedicationStatement", "id": "medst-dosext-6b6", "status": "active", **SUBJ,
                           "medicationCodeableConcept": _cc(c.RXNORM, "314076", "lisinopril 10 MG Oral Tablet"),
                           "dosage": [{"text": "daily", "extension": [{
                               "url": "http://example.org/fhir/StructureDefinition/indication", "valueCode": "F11.20"}]}]},
                          ("F11.20", "medst-dosext-6b6")),
    # An extension's valueCode carries no system (its definition gives it): a dotted ICD-10-CM
    # spelling there is read as in a Coding without one.
    "extension-value-code-icd": ({"resourceType": "Condition", "id": "cond-valcode-f11-3e3", **SUBJ,
                                  "code": _cc(c.SNOMED, "233604007", "Pneumonia"),
                                  "extension": [{"url": "http://example.org/fhir/StructureDefinition/admission-diagnosis",
                                                 "valueCode": "F11.20"}]},
                                 ("F11.20", "cond-valcode-f11-3e3")),
    "dispense-ndc-no-system": ({"resourceType": "MedicationDispense", "id": "meddisp-ndcnosys-2d2", "status": "completed", **SUBJ,
                                "medicationCodeableConcept": {"coding": [{"code": "12496-1208-3"}],
                                                              "text": "Suboxone 8 mg-2 mg sublingual film"}},
                               ("12496-1208-3", "Suboxone")),
}


@pytest.mark.parametrize("name", list(ODD_PLACES))
async def test_sensitive_code_in_an_odd_place_is_hidden(world: FakeFhir, gateway: GatewayUnderTest, name: str) -> None:
    resource, secrets = ODD_PLACES[name]
    world.add(resource)
    rid = resource["id"]
    status, headers, body = await call(gateway, "GET", f"/{resource['resourceType']}/{rid}")
    assert status == 403, body
    assert leaks(body, headers, (*secrets, rid)) == []
    status, headers, body = await call(gateway, "POST", "/", body=batch(("GET", f"{resource['resourceType']}/{rid}")))
    assert status == 200 and leaks(body, headers, (*secrets, rid)) == [], body
    world.override = routes({("GET", f"/{resource['resourceType']}"): lambda r: c.bundle([resource, c.ANA_CBC], world.base_url)})
    status, headers, body = await call(gateway, "GET", f"/{resource['resourceType']}?patient={c.PAT_ANA}")
    assert status == 200 and leaks(body, headers, (*secrets, rid)) == [], body


NEAR_MISSES = {
    "nicotine-F17-excluded": {"resourceType": "Condition", "id": "cond-nic-f17-a1", **SUBJ,
                              "code": _cc(ICD, "F17.210", "Nicotine dependence, cigarettes, uncomplicated")},
    "viral-contact-Z20.828": {"resourceType": "Condition", "id": "cond-z20828-b2", **SUBJ,
                              "code": _cc(ICD, "Z20.828", "Contact with and (suspected) exposure to other viral communicable diseases")},
    "hypertension-I10": {"resourceType": "Condition", "id": "cond-i10-c3", **SUBJ, "code": _cc(ICD, "I10", "Essential hypertension")},
    "loinc-hemoglobin": {"resourceType": "Observation", "id": "obs-hgb-d4", "status": "final", **SUBJ,
                         "code": _cc(c.LOINC, "718-7", "Hemoglobin [Mass/volume] in Blood")},
    "rxnorm-lisinopril": {"resourceType": "MedicationRequest", "id": "medrx-lis-e5", "status": "active", "intent": "order", **SUBJ,
                          "medicationCodeableConcept": _cc(c.RXNORM, "314076", "lisinopril 10 MG Oral Tablet")},
    # An extension holding an ordinary code labels nothing.
    "dueTo-hypertension-extension": {"resourceType": "Condition", "id": "cond-dueto-i10-f6", **SUBJ,
                                     "code": _cc(ICD, "I12.9", "Hypertensive chronic kidney disease"),
                                     "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/condition-dueTo",
                                                    "valueCodeableConcept": _cc(ICD, "I10", "Essential hypertension")}]},
    # An extension off the code paths holding an ordinary code labels nothing.
    "note-extension-ordinary": {"resourceType": "Condition", "id": "cond-noteext-ord-i9", **SUBJ,
                                "code": _cc(ICD, "I10", "Essential hypertension"),
                                "note": [{"text": "x", "extension": [{"url": "http://example.org/n", "valueCodeableConcept":
                                                                       _cc(c.SNOMED, "38341003", "Hypertensive disorder")}]}]},
    # Ordinary valueCodes (a US Core birth sex, a language) label nothing.
    "extension-value-codes-ordinary": {"resourceType": "Condition", "id": "cond-valcode-ord-h8", **SUBJ,
                                       "code": _cc(ICD, "I10", "Essential hypertension"),
                                       "extension": [{"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex",
                                                      "valueCode": "F"},
                                                     {"url": "http://hl7.org/fhir/StructureDefinition/language", "valueCode": "en-US"}]},
    # Gabapentin 300 mg (Opioid Data Lab gabapentin NDC list): an NDC the rules do not name.
    "dispense-ndc-gabapentin": {"resourceType": "MedicationDispense", "id": "meddisp-gaba-g7", "status": "completed", **SUBJ,
                                "medicationCodeableConcept": _cc("http://hl7.org/fhir/sid/ndc", "00182271901", "Gabarone 300 mg")},
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
async def test_near_miss_is_released(world: FakeFhir, gateway: GatewayUnderTest, name: str) -> None:
    resource = NEAR_MISSES[name]
    world.add(resource)
    status, headers, body = await call(gateway, "GET", f"/{resource['resourceType']}/{resource['id']}")
    assert status == 200, (name, body)
    assert headers["X-Consent-Decision"] == "permit"


async def test_reason_reference_display_of_a_hidden_condition_is_removed(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    order = {"resourceType": "MedicationRequest", "id": "medrx-rsnref-71b", "status": "active", "intent": "order", **SUBJ,
             "medicationCodeableConcept": _cc(c.RXNORM, "314076", "lisinopril 10 MG Oral Tablet"),
             "reasonReference": [{"reference": f"Condition/{c.HIV_CONDITION['id']}", "display": "HIV disease (B20)"}]}
    world.add(order)
    status, headers, body = await call(gateway, "GET", f"/MedicationRequest/{order['id']}")
    assert status == 200, body
    assert leaks(body, headers, ("HIV disease", "B20")) == []


# ---------------------------------------------------------------- labels: the code hierarchy


OUD = c.OUD_CONDITION  # F11.20: OPIOIDUD + 42CFRPart2
AUD = {"resourceType": "Condition", "id": "cond-aud-f1020-9a1", **SUBJ, "code": _cc(ICD, "F10.20", "Alcohol dependence, uncomplicated")}
CUD = {"resourceType": "Condition", "id": "cond-cud-f1220-9b2", **SUBJ, "code": _cc(ICD, "F12.20", "Cannabis dependence, uncomplicated")}
DEMENTIA = {"resourceType": "Condition", "id": "cond-dem-f0390-9c3", **SUBJ, "code": _cc(ICD, "F03.90", "Unspecified dementia")}
PHQ9 = ODD_PLACES["phq9-bh"][0]
DEPRESSION = c.DEPRESSION  # F32.9: PSY

HIERARCHY = [
    # (labels the consent names, resources it must open, resources it must keep closed)
    (("SUD", "42CFRPart2"), (OUD, AUD, CUD), (DEMENTIA, DEPRESSION, PHQ9)),
    (("ETH", "42CFRPart2"), (OUD, AUD, CUD), (DEMENTIA,)),
    (("OPIOIDUD", "42CFRPart2"), (OUD,), (AUD, CUD)),
    (("ETHUD", "42CFRPart2"), (AUD,), (OUD, CUD)),
    (("SUD",), (), (OUD, AUD, CUD)),                    # 42 CFR Part 2 needs its own naming
    (("BH",), (DEMENTIA, PHQ9), (DEPRESSION, OUD)),
    (("COGN",), (DEMENTIA,), (PHQ9, DEPRESSION)),
    (("PSY",), (DEPRESSION,), (DEMENTIA, PHQ9, OUD)),
    (("SPI", "42CFRPart2"), (DEMENTIA, PHQ9, DEPRESSION, OUD, AUD), (c.HIV_CONDITION,)),
]


@pytest.mark.parametrize(("labels", "opened", "closed"), HIERARCHY, ids=["+".join(h[0]) for h in HIERARCHY])
async def test_consent_label_opens_narrower_never_broader(
    fake_fhir: FakeFhir, gateway: GatewayUnderTest, labels: tuple[str, ...],
    opened: tuple[dict[str, Any], ...], closed: tuple[dict[str, Any], ...]
) -> None:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA, "consent-labels", labels=labels), *opened, *closed)
    for resource in opened:
        status, _, body = await call(gateway, "GET", f"/Condition/{resource['id']}" if resource["resourceType"] == "Condition"
                                     else f"/{resource['resourceType']}/{resource['id']}")
        assert status == 200, (labels, resource["id"], body)
    for resource in closed:
        status, headers, body = await call(gateway, "GET", f"/{resource['resourceType']}/{resource['id']}")
        assert status == 403, (labels, resource["id"], body)
        assert leaks(body, headers, (resource["id"],)) == []


# ================================================================ 5. errors, logs and metrics


async def test_scope_and_label_denials_leave_nothing_in_logs_or_metrics(
    world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    odd = [r for r, _ in ODD_PLACES.values()]
    world.add(*odd, GRANTED_BINARY)
    obs_only = bearer(issuer, "user/Observation.rs")
    everyone = bearer(issuer, "user/*.rs")
    confined = bearer(issuer, "patient/*.rs", user=c.PAT_BEN, patient=BEN_ID)
    for token in (obs_only, everyone, confined):
        for r in odd:
            await jcall(jgw, "GET", f"/{r['resourceType']}/{r['id']}", token)
        await jcall(jgw, "POST", "/", token, batch(*[("GET", f"{r['resourceType']}/{r['id']}") for r in odd[:6]],
                                                   ("GET", f"Condition/{c.HIV_CONDITION['id']}/$meta")))
        await jcall(jgw, "GET", f"/Condition?patient={c.PAT_ANA}", token)
        await jcall(jgw, "GET", f"/Observation?patient={c.PAT_ANA}&_summary=count", token)
    await jcall(jgw, "GET", f"/Condition/{c.HIV_CONDITION['id']}", "Bearer not.a.token")
    expired = issuer.mint({"fhirUser": c.DOCTOR, "scope": "user/*.rs"}, audience=AUDIENCE, now=time.time() - 7200)
    await jcall(jgw, "GET", f"/Condition/{c.HIV_CONDITION['id']}", f"Bearer {expired}")
    async with aiohttp.ClientSession() as admin:
        async with admin.get(jgw.admin_url + "/metrics") as resp:
            metrics = await resp.text()
    records = [r for r in caplog.records if r.name.startswith("gateway")]
    assert records
    formatter = JsonLogFormatter()
    logs = "\n".join(formatter.format(r) + repr(r.__dict__) for r in records)
    secrets = (*c.SECRET_CODES, *c.SECRET_TEXTS, c.HIV_CONDITION["id"], *[r["id"] for r in odd],
               *[s for _, ss in ODD_PLACES.values() for s in ss if s not in ("buprenorphine",)],
               GRANTED_BINARY["id"], "I10")
    assert hidden_in(logs, secrets) == [], "logs"
    tokens = [t.split(" ", 1)[1] for t in (obs_only, everyone, confined)] + [expired]
    assert not any(t in logs or t.split(".")[2] in logs for t in tokens), "a bearer token was logged"
    assert hidden_in(metrics, (*secrets, ANA_ID, BEN_ID, "dr-gomez")) == [], "metrics"
    assert 'reason="scope"' in metrics


# ================================================================ 6. limits and malformed answers in a batch


async def test_oversized_batch_answer_is_502_and_names_nothing(world: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(world.base_url, upstream={"max_response_bytes": 64 * 1024})
    big = {**c.HIV_CONDITION, "note": [{"text": "x" * 100_000}]}
    world.override = routes({("POST", "/"): lambda r: {"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"resource": c.ANA_CBC, "response": {"status": "200 OK"}}, {"resource": big, "response": {"status": "200 OK"}}]}})
    status, headers, body = await call(gw, "POST", "/", body=batch(
        ("GET", f"Observation/{c.ANA_CBC['id']}"), ("GET", f"Condition/{c.HIV_CONDITION['id']}")))
    is_outcome(status, headers, body, 502)
    assert leaks(body, headers) == []


async def test_oversized_security_context_closes_the_binary(world: FakeFhir, make_gateway: MakeGateway) -> None:
    """The gateway's own read of a Binary's securityContext, over the cap: never a permit."""
    gw = await make_gateway(world.base_url, upstream={"max_response_bytes": 64 * 1024})
    world.add(GRANTED_BINARY)
    hidden = {**GRANTED_BINARY, "id": "bin-hiv-big-3d1", "securityContext": {"reference": f"Condition/{c.HIV_CONDITION['id']}"},
              "data": base64.b64encode(b"HIV care plan letter").decode()}
    world.add(hidden)
    big_hiv = {**c.HIV_CONDITION, "note": [{"text": "y" * 100_000}]}
    world.override = routes({("GET", f"/Condition/{c.HIV_CONDITION['id']}"): lambda r: big_hiv})
    for method, path, sent in (("GET", f"/Binary/{hidden['id']}", None),
                               ("POST", "/", batch(("GET", f"Binary/{hidden['id']}"), ("GET", f"Binary/{GRANTED_BINARY['id']}")))):
        status, headers, body = await call(gw, method, path, body=sent)
        assert status in (200, 403, 502, 503), body
        assert leaks(body, headers, (hidden["data"], "HIV care plan")) == [], path


@pytest.mark.parametrize("where", ["slot-resource", "slot-outcome", "nested-bundle", "second-key-later"])
async def test_duplicate_keys_in_a_batch_slot_are_refused(world: FakeFhir, gateway: GatewayUnderTest, where: str) -> None:
    hiv_code = orjson.dumps(c.HIV_CONDITION["code"]).decode()
    ok_code = orjson.dumps(c.ANA_HYPERTENSION["code"]).decode()
    cond = (f'{{"resourceType":"Condition","id":"cond-dup-77","subject":{{"reference":"{c.PAT_ANA}"}},'
            f'"code":{ok_code},"code":{hiv_code}}}')
    cond_rev = (f'{{"resourceType":"Condition","id":"cond-dup-77","code":{hiv_code},'
                f'"subject":{{"reference":"{c.PAT_ANA}"}},"code":{ok_code}}}')
    if where == "slot-resource":
        text = f'{{"resourceType":"Bundle","type":"batch-response","entry":[{{"resource":{cond},"response":{{"status":"200 OK"}}}}]}}'
    elif where == "slot-outcome":
        text = ('{"resourceType":"Bundle","type":"batch-response","entry":[{"response":{"status":"404 Not Found",'
                f'"outcome":{{"resourceType":"OperationOutcome","issue":[{{"severity":"error","code":"not-found"}}]}},'
                f'"outcome":{{"resourceType":"Condition","id":"cond-dup-77","code":{hiv_code},'
                f'"subject":{{"reference":"{c.PAT_ANA}"}}}}}}}}]}}')
    elif where == "nested-bundle":
        text = ('{"resourceType":"Bundle","type":"batch-response","entry":[{"resource":{"resourceType":"Bundle",'
                f'"type":"searchset","entry":[{{"resource":{cond}}}]}},"response":{{"status":"200 OK"}}}}]}}')
    else:
        text = f'{{"resourceType":"Bundle","type":"batch-response","entry":[{{"resource":{cond_rev},"response":{{"status":"200 OK"}}}}]}}'
    world.override = routes({("POST", "/"): lambda r: web.Response(body=text.encode(), content_type=FHIR_JSON)})
    status, headers, body = await call(gateway, "POST", "/", body=batch(("GET", "Condition/cond-dup-77")))
    assert status in (403, 502) or all(slot_status(s).startswith(("403", "404", "502")) for s in slots(body)), body
    assert leaks(body, headers, ("B20", "HIV disease", "Human immunodeficiency")) == []


# ================================================================ 7. the consent change feed


def _feed(world: FakeFhir) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """Stamp every Consent write with the server's clock; list changes and deletions."""
    deleted: list[tuple[str, str]] = []
    clock = [datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc).timestamp()]

    def stamp() -> str:
        clock[0] = max(clock[0] + 1, time.time())
        return datetime.fromtimestamp(clock[0], timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    for key, res in world.resources.items():
        if key.startswith("Consent/"):
            res.setdefault("meta", {})["lastUpdated"] = stamp()

    async def override(request: web.Request) -> web.StreamResponse | None:
        path = request.path.removeprefix("/fhir")
        if request.method == "DELETE" and path.startswith("/Consent/"):
            deleted.append((path.lstrip("/"), stamp()))
            return None
        if request.method == "GET" and path == "/Consent/_history":
            return fhir({"resourceType": "Bundle", "type": "history", "entry": [
                {"request": {"method": "DELETE", "url": ref}, "response": {"status": "204", "lastModified": when}}
                for ref, when in deleted]})
        if request.method == "GET" and path == "/Consent" and ("_lastUpdated" in request.query or "_sort" in request.query):
            found = [r for k, r in world.resources.items() if k.startswith("Consent/")]
            return fhir(c.bundle(found, world.base_url, self_url=str(request.url)))
        return None

    return override


async def test_consent_deleted_in_a_batch_is_evicted_on_every_replica(world: FakeFhir, make_gateway: MakeGateway) -> None:
    """Ana (herself) deletes her opt-in through replica A inside a batch; replica B must follow."""
    world.override = _feed(world)
    a = await make_gateway(world.base_url)
    b = await make_gateway(world.base_url, consent={"change_poll_s": 0.2, "cache_ttl_s": 600})
    cbc = f"/Observation/{c.ANA_CBC['id']}"
    assert (await call(a, "GET", cbc))[0] == 200
    assert (await call(b, "GET", cbc))[0] == 200
    await asyncio.sleep(0.6)  # B's feed has started
    status, _, body = await call(a, "POST", "/", actor=c.PAT_ANA, body=batch(("DELETE", "Consent/consent-optin")))
    assert status == 200 and slot_status(slots(body)[0]).startswith(("200", "204")), body
    assert "Consent/consent-optin" not in world.resources
    assert (await call(a, "GET", cbc))[0] == 403, "replica A evicts at once"
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        status, headers, body = await call(b, "GET", cbc)
        if status == 403:
            break
        await asyncio.sleep(0.1)
    assert status == 403, "replica B kept serving under a deleted consent"


async def test_consent_deleted_in_a_transaction_is_evicted_here(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    cbc = f"/Observation/{c.ANA_CBC['id']}"
    assert (await call(gateway, "GET", cbc))[0] == 200
    status, _, body = await call(gateway, "POST", "/", actor=c.PAT_ANA, body=batch(
        ("GET", f"Observation/{c.ANA_CBC['id']}"), ("DELETE", "Consent/consent-optin"), kind="transaction"))
    assert status == 200, body
    assert (await call(gateway, "GET", cbc))[0] == 403


async def test_consent_revoked_by_update_in_a_batch_is_evicted_here(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    cbc = f"/Observation/{c.ANA_CBC['id']}"
    assert (await call(gateway, "GET", cbc))[0] == 200
    revoked = {**c.opt_in(c.PAT_ANA), "status": "inactive"}
    status, _, body = await call(gateway, "POST", "/", actor=c.PAT_ANA, body=batch(
        ("PUT", "Consent/consent-optin", revoked)))
    assert status == 200 and slot_status(slots(body)[0]).startswith("200"), body
    assert (await call(gateway, "GET", cbc))[0] == 403


# ================================================================ 8. break-glass windows and the label hierarchy


CANNABIS = CUD  # F12.20: SUD + 42CFRPart2, the broad substance-use label
WINDOW_WIDER = (
    "LEAK (emergency window wider than what was opened; audited): X-Break-Glass read of GET /Condition/cond-cud-f1220-9b2 "
    "(F12.20 cannabis dependence, labels SUD+42CFRPart2) stores an emergency Consent naming SUD; a later GET "
    "/Condition/{later} WITHOUT the header -> 200 with {code} (permit, X-Break-Glass-Audit-Id set): the window's SUD "
    "label covers the narrower OPIOIDUD/ETHUD through the v3 hierarchy, so records break-glass never opened are released")


@pytest.mark.parametrize(("opened", "later"), [
    pytest.param(c.HIV_CONDITION, c.OUD_CONDITION, id="hiv-window-vs-oud"),
    pytest.param(CANNABIS, c.OUD_CONDITION, id="sud-window-vs-opioid"),
    pytest.param(CANNABIS, AUD, id="sud-window-vs-alcohol"),
])
async def test_emergency_window_opens_only_what_break_glass_opened(
    world: FakeFhir, gateway: GatewayUnderTest, opened: dict[str, Any], later: dict[str, Any]
) -> None:
    world.add(CANNABIS, AUD)
    status, headers, _ = await call(gateway, "GET", f"/Condition/{opened['id']}", **{"X-Break-Glass": "Medical emergency"})
    assert status == 200 and "X-Break-Glass-Audit-Id" in headers
    status, headers, body = await call(gateway, "GET", f"/Condition/{later['id']}")
    assert status == 403, (later["id"], body)
    assert leaks(body, headers, (later["id"], later["code"]["coding"][0]["code"])) == []


# ================================================================ 9. audit reopen, readiness, bounded metrics


@pytest.mark.parametrize("how", ["rotated", "deleted"])
async def test_break_glass_after_the_audit_file_is_rotated_or_deleted_is_recorded(
    world: FakeFhir, gateway: GatewayUnderTest, how: str
) -> None:
    import os

    path = gateway.state.settings.audit.path
    first = await call(gateway, "GET", f"/Condition/{c.HIV_CONDITION['id']}", **{"X-Break-Glass": "Medical emergency"})
    assert first[0] == 200
    if how == "rotated":
        os.rename(path, f"{path}.1")
    else:
        os.remove(path)
    status, headers, _ = await call(gateway, "GET", f"/Condition/{c.OUD_CONDITION['id']}", actor=c.PSYCHIATRIST,
                                    **{"X-Break-Glass": "Imminent threat to life"})
    assert status == 200
    audit_id = headers["X-Break-Glass-Audit-Id"]
    with open(path, encoding="utf-8") as fh:
        assert audit_id in fh.read(), "the second emergency access is not in the audit file at audit.path"


async def test_readyz_names_no_host_or_secret(
    world: FakeFhir, make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RT2_FHIR_TOKEN", "gw-own-secret-7c1")

    async def down(request: web.Request) -> web.StreamResponse | None:
        return fhir({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception",
                     "diagnostics": f"db at 10.2.3.4 refused {request.headers.get('Authorization')}"}]}, 500)

    world.override = down
    gw = await make_gateway(world.base_url, upstream={"health_interval_s": 0.1,
                                                      "auth": {"kind": "bearer", "token_env": "RT2_FHIR_TOKEN"}})
    await asyncio.sleep(0.4)
    async with aiohttp.ClientSession() as admin:
        async with admin.get(gw.admin_url + "/readyz") as resp:
            status, text = resp.status, await resp.text()
    assert status == 503, text
    port = world.base_url.rsplit(":", 1)[1].split("/")[0]
    assert [s for s in ("gw-own-secret", "10.2.3.4", "127.0.0.1", port, "RT2_FHIR_TOKEN") if s in text] == [], text


async def test_metrics_labels_stay_bounded_under_hostile_requests(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    marker = "zq9pat-ana-5581"
    for method, path in (
        ("GET", f"/Observation/{c.ANA_CBC['id']}/${marker}"),
        ("GET", f"/{marker}/{marker}"),
        ("GET", f"/Observation?code={marker}&_has:{marker}=1"),
        ("POST", f"/${marker}"),
        ("PROPFIND", f"/Observation/{marker}"),
        ("GET", f"/Observation/{marker}/_history/{marker}"),
    ):
        await call(gateway, method, path)
    await call(gateway, "POST", "/", body=batch(("GET", f"Observation/{c.ANA_CBC['id']}/${marker}"),
                                                 ("ZAP", f"{marker}/1"), ("GET", f"{marker}?x=1")))
    async with aiohttp.ClientSession() as admin:
        async with admin.get(gateway.admin_url + "/metrics") as resp:
            metrics = await resp.text()
    assert "consent_gateway_requests_total" in metrics
    assert [s for s in (marker, "zq9", "PROPFIND", "ZAP", ANA_ID) if s in metrics] == []


@pytest.mark.parametrize("entry", [
    b'{"request":{"method":"GET","url":"Observation/obs-cbc-58410-ana","url":"Patient?_has:Observation:subject:code=20447-9"}}',
    b'{"request":{"method":"GET","method":"DELETE","url":"Condition/cond-htn-i10-ana"}}',
    b'{"request":{"method":"GET","url":"Observation/obs-cbc-58410-ana"},"request":{"method":"GET","url":"_history"}}',
])
async def test_duplicate_keys_in_a_request_batch_entry_are_refused(world: FakeFhir, gateway: GatewayUnderTest, entry: bytes) -> None:
    body = b'{"resourceType":"Bundle","type":"batch","entry":[' + entry + b"]}"
    before = len(world.requests)
    status, headers, answer = await call(gateway, "POST", "/", body=body)
    is_outcome(status, headers, answer, 400)
    assert not any(r.method in ("POST", "DELETE") or "_has" in r.path_qs or "_history" in r.path_qs
                   for r in world.requests[before:])


# ================================================================ 10. the label hierarchy on deny provisions and config lists


def _deny_labels(subject: str, labels: tuple[str, ...]) -> dict[str, Any]:
    consent = c.opt_in(subject, "consent-deny-labels")
    consent["provision"]["provision"] = [{"type": "deny", "securityLabel": [{"system": V3, "code": code} for code in labels]}]
    return consent


@pytest.mark.parametrize(("labels", "closed", "opened"), [
    (("SUD",), (c.OUD_CONDITION, AUD, CUD), (DEMENTIA, c.ANA_CBC)),
    (("ETH",), (c.OUD_CONDITION, AUD), (DEMENTIA,)),
    (("BH",), (DEMENTIA, PHQ9), (c.OUD_CONDITION,)),
    (("SPI",), (DEMENTIA, c.DEPRESSION, c.OUD_CONDITION, PHQ9), (c.HIV_CONDITION, c.ANA_CBC)),
    (("OPIOIDUD",), (c.OUD_CONDITION,), (AUD, CUD)),
], ids=["SUD", "ETH", "BH", "SPI", "OPIOIDUD"])
async def test_deny_naming_a_broader_label_closes_narrower_data(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, labels: tuple[str, ...],
    closed: tuple[dict[str, Any], ...], opened: tuple[dict[str, Any], ...]
) -> None:
    """With ``explicit_consent_required: none`` a general permit opens sensitive data; a deny
    provision naming a broad label must then close everything below it."""
    gw = await make_gateway(fake_fhir.base_url, sensitivity={"explicit_consent_required": "none"})
    c.seed_all(fake_fhir)
    fake_fhir.add(_deny_labels(c.PAT_ANA, labels), AUD, CUD, DEMENTIA, PHQ9)
    for resource in closed:
        status, headers, body = await call(gw, "GET", f"/{resource['resourceType']}/{resource['id']}")
        assert status == 403, (labels, resource["id"])
        assert leaks(body, headers, (resource["id"],)) == []
    for resource in opened:
        status, _, body = await call(gw, "GET", f"/{resource['resourceType']}/{resource['id']}")
        assert status == 200, (labels, resource["id"], body)


@pytest.mark.parametrize(("required", "closed", "opened"), [
    (["SUD"], (c.OUD_CONDITION, AUD, CUD), (c.HIV_CONDITION,)),
    (["ETH"], (c.OUD_CONDITION, AUD), (DEMENTIA,)),
    (["BH"], (DEMENTIA, PHQ9), (c.OUD_CONDITION,)),
], ids=["SUD", "ETH", "BH"])
async def test_explicit_consent_list_covers_narrower_labels(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, required: list[str],
    closed: tuple[dict[str, Any], ...], opened: tuple[dict[str, Any], ...]
) -> None:
    gw = await make_gateway(fake_fhir.base_url, sensitivity={"explicit_consent_required": required})
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), AUD, CUD, DEMENTIA, PHQ9)
    for resource in closed:
        status, _, _ = await call(gw, "GET", f"/{resource['resourceType']}/{resource['id']}")
        assert status == 403, (required, resource["id"])
    for resource in opened:
        status, _, body = await call(gw, "GET", f"/{resource['resourceType']}/{resource['id']}")
        assert status == 200, (required, resource["id"], body)


@pytest.mark.parametrize("label", [
    {"system": V3, "code": "hiv"},
    {"system": V3, "code": "HIV "},
    {"system": c.V3_CONFIDENTIALITY, "code": "R"},
    {"system": c.V3_CONFIDENTIALITY, "code": "V"},
    {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "HIV"},
    {"system": V3, "code": "STD"},
    {"system": V3, "code": "OPIOIDUD"},
], ids=["lowercase", "trailing-space", "conf-R", "conf-V", "other-system", "STD-sibling", "unrelated"])
async def test_near_miss_consent_label_does_not_open_hiv(world: FakeFhir, gateway: GatewayUnderTest, label: dict[str, str]) -> None:
    consent = c.opt_in(c.PAT_ANA, "consent-near-miss")
    consent["provision"]["provision"] = [{"type": "permit", "securityLabel": [label]}]
    world.resources.pop("Consent/consent-optin")
    world.add(consent)
    status, headers, body = await call(gateway, "GET", f"/Condition/{c.HIV_CONDITION['id']}")
    assert status == 403, (label, body)
    assert leaks(body, headers) == []


# ================================================================ 11. patient data outside the R4 patient compartment


ANA_DEVICE = {
    "resourceType": "Device", "id": "dev-ana-pump-6c2", "status": "active",
    "type": {"text": "Implanted infusion pump (buprenorphine maintenance)"},
    "patient": {"reference": c.PAT_ANA}, "note": [{"text": "Implanted 2022-06-12 after overdose admission"}],
}
ANA_GUIDANCE = {
    "resourceType": "GuidanceResponse", "id": "guid-ana-prep-7d3", "status": "success",
    "moduleUri": "http://example.org/cds/hiv-prep-eligibility",
    "subject": {"reference": c.PAT_ANA}, "occurrenceDateTime": "2023-04-01",
    "reasonCode": [{"text": "HIV PrEP eligibility"}],
}
OUTSIDE = {"device": ANA_DEVICE, "guidance-response": ANA_GUIDANCE}
OUTSIDE_LEAK = (
    "LEAK: Ana opted out (Consent OPTOUT); GET /{path} by Practitioner/dr-gomez -> 200 with Ana's {what}: {rtype} is not in the "
    "R4 patient compartment, so gateway/core/compartment.py treats it as non-patient data (no consent check, also released "
    "to a token confined to another patient), although its {element} names Patient/pat-ana-5581 (Task.for got the same "
    "treatment in EXTRA_PATIENT_LINKS, {rtype}.{element} did not)")


@pytest.mark.parametrize("name", [
    pytest.param("device"),
    pytest.param("guidance-response"),
])
async def test_patient_data_outside_the_r4_compartment_is_decided(fake_fhir: FakeFhir, gateway: GatewayUnderTest, name: str) -> None:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_out(c.PAT_ANA))
    resource = OUTSIDE[name]
    fake_fhir.add(resource)
    status, headers, body = await call(gateway, "GET", f"/{resource['resourceType']}/{resource['id']}")
    assert status == 403, body
    assert leaks(body, headers, (resource["id"], "overdose", "PrEP")) == []


# ================================================================ 12. references written as absolute URLs in consents


@pytest.mark.parametrize("form", ["server-base", "other-base", "with-history"])
async def test_not_this_doctor_written_with_an_absolute_url_still_excludes_him(
    fake_fhir: FakeFhir, gateway: GatewayUnderTest, form: str
) -> None:
    c.seed_all(fake_fhir)
    banned = {"server-base": f"{fake_fhir.base_url}/{c.BANNED_DOCTOR}",
              "other-base": f"https://ehr.example.org/fhir/{c.BANNED_DOCTOR}",
              "with-history": f"{c.BANNED_DOCTOR}/_history/2"}[form]
    fake_fhir.add(c.not_this_doctor(c.PAT_ANA, banned))
    status, headers, body = await call(gateway, "GET", f"/Observation/{c.ANA_CBC['id']}", actor=c.BANNED_DOCTOR)
    assert status in (403, 503), (form, body)
    assert leaks(body, headers, (c.ANA_CBC["id"], "58410-2")) == []
    assert (await call(gateway, "GET", f"/Observation/{c.ANA_CBC['id']}"))[0] == 200 or form != "server-base"


async def test_opt_out_whose_patient_is_an_absolute_url_applies(fake_fhir: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(fake_fhir.base_url, consent={"default_decision": "permit", "change_poll_s": 0})
    c.seed_all(fake_fhir)
    out = c.opt_out(c.PAT_ANA)
    out["patient"] = {"reference": f"{fake_fhir.base_url}/{c.PAT_ANA}"}
    fake_fhir.add(out)

    def consents(request: web.Request) -> Any:
        wanted = request.query.get("patient", "")
        found = [r for k, r in fake_fhir.resources.items() if k.startswith("Consent/")
                 and any(r["patient"]["reference"].endswith(p if "/" in p else f"Patient/{p}") for p in wanted.split(","))]
        return c.bundle(found, fake_fhir.base_url, self_url=str(request.url))

    fake_fhir.override = routes({("GET", "/Consent"): consents})
    status, headers, body = await call(gw, "GET", f"/Observation/{c.ANA_CBC['id']}")
    assert status in (403, 503), body
    assert leaks(body, headers, (c.ANA_CBC["id"],)) == []


# ================================================================ 13. security labels written with other system URIs


@pytest.mark.parametrize(("system", "code"), [
    ("urn:oid:2.16.840.1.113883.5.4", "HIV"),               # v3 ActCode by OID (CDA-derived data)
    ("http://hl7.org/fhir/v3/ActCode", "PSY"),               # STU3-era URI of v3 ActCode
    ("urn:oid:2.16.840.1.113883.5.25", "V"),                # v3 Confidentiality by OID
    ("http://hl7.org/fhir/v3/Confidentiality", "R"),         # STU3-era URI of v3 Confidentiality
    (V3, "ETH"),                                            # the retired substance-use code
    (V3, "SICKLE"),
])
async def test_meta_security_in_another_system_form_still_closes(
    world: FakeFhir, gateway: GatewayUnderTest, system: str, code: str
) -> None:
    labelled = {**c.ANA_CBC, "id": "obs-labelled-meta-5a5", "meta": {"security": [{"system": system, "code": code}]},
                "valueString": "Result withheld from general view"}
    world.add(labelled)
    status, headers, body = await call(gateway, "GET", f"/Observation/{labelled['id']}")
    assert status == 403, (system, code, body)
    assert leaks(body, headers, (labelled["id"], "withheld from general")) == []


async def test_oversized_consent_lookup_fails_closed(world: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(world.base_url, upstream={"max_response_bytes": 64 * 1024},
                            consent={"default_decision": "permit", "change_poll_s": 0})
    world.resources.pop("Consent/consent-optin")
    out = {**c.opt_out(c.PAT_ANA), "text": {"status": "generated", "div": "<div>" + "z" * 100_000 + "</div>"}}
    world.add(out)
    status, headers, body = await call(gw, "GET", f"/Observation/{c.ANA_CBC['id']}")
    assert status in (403, 502, 503), body
    assert leaks(body, headers, (c.ANA_CBC["id"], "58410-2")) == []


async def test_oversized_medication_read_closes_the_order(world: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(world.base_url, upstream={"max_response_bytes": 64 * 1024})
    med = {"resourceType": "Medication", "id": "med-bupnal-big-1f1",
           "code": c.concept(c.RXNORM, "1010600", c.BUPRENORPHINE_DISPLAY), "text": {"status": "generated", "div": "<div>" + "m" * 100_000 + "</div>"}}
    order = {"resourceType": "MedicationRequest", "id": "medrx-bigmed-2f2", "status": "active", "intent": "order", **SUBJ,
             "medicationReference": {"reference": f"Medication/{med['id']}"}, "dosageInstruction": [{"text": "one film daily"}]}
    world.add(med, order)
    for method, path, sent in (("GET", f"/MedicationRequest/{order['id']}", None),
                               ("POST", "/", batch(("GET", f"MedicationRequest/{order['id']}")))):
        status, headers, body = await call(gw, method, path, body=sent)
        assert leaks(body, headers, (order["id"], "one film daily")) == [], (path, status, body)


# ================================================================ 14. who may break the glass with a token


BG_BY_NON_CLINICIAN = (
    "LEAK (audited): jwt mode, token fhirUser {user} with scope 'user/*.rs' sends X-Break-Glass: Medical emergency on "
    "GET /Condition/cond-hiv-b20-91a (Ana's HIV, closed by her general opt-in) -> 200 with B20, and an emergency Consent "
    "window for {user} over Ana's HIV data is stored for 4 h: in jwt mode the header comes from the client itself and "
    "any requester type may break the glass (emergency treatment, ETREAT, is a clinician's act; CONTRACT §7)")


@pytest.mark.parametrize("user", [
    pytest.param(c.PAT_BEN),
    pytest.param("RelatedPerson/rp-ana-sister-1"),
])
async def test_only_clinicians_break_the_glass_with_a_token(world: FakeFhir, jgw: GatewayUnderTest, issuer: LocalIssuer, user: str) -> None:
    status, headers, body = await jcall(jgw, "GET", f"/Condition/{c.HIV_CONDITION['id']}", bearer(issuer, "user/*.rs", user=user),
                                        **{"X-Break-Glass": "Medical emergency"})
    assert status == 403, body
    assert leaks(body, headers) == []
