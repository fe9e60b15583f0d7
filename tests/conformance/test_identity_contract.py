"""CONTRACT §4 as an outsider checks it: each who-is-asking header given twice or
comma-joined is a 400 that reaches nothing upstream; the purpose defaults to
``auth.default_purpose``; in jwt mode every refusal is a 401 with ``WWW-Authenticate: Bearer``,
also for an algorithm outside ``auth.jwt.algorithms``, and ``fhirUser`` may name each of
Practitioner, Patient, RelatedPerson and Person."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from gateway.demo.issuer import LocalIssuer
from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.identity.conftest import AUDIENCE, clinical, jwt_sections, observation

__all__ = ["clinical"]

HEADERS = {
    "X-Actor": ("Practitioner/doc-1", "Practitioner/doc-2"),
    "X-Actor-Organization": ("Organization/o1", "Organization/o2"),
    "X-Actor-Role": ("PRCP", "IRCP"),
    "X-Purpose-Of-Use": ("TREAT", "HPAYMT"),
    "X-Break-Glass": ("Medical emergency", "Imminent threat to life"),
}


def _request_headers(name: str, values: list[str]) -> list[tuple[str, str]]:
    headers = [] if name == "X-Actor" else [("X-Actor", "Practitioner/doc-1")]
    return headers + [(name, value) for value in values]


def _forwarded(fake: FakeFhir) -> list[str]:
    """What reached the FHIR server besides the readiness probe."""
    return [r.path_qs for r in fake.requests if not r.path_qs.endswith("/metadata")]


def _assert_400(status: int, ctype: str, body: bytes) -> None:
    assert status == 400, body
    assert ctype == "application/fhir+json"
    outcome = orjson.loads(body)
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "invalid"


FORMS = {
    "twice": lambda a, b: [a, b],
    "twice-the-same": lambda a, b: [a, a],
    "comma-joined": lambda a, b: [f"{a}, {b}"],
    "comma-joined-no-space": lambda a, b: [f"{a},{b}"],
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", list(HEADERS))
async def test_each_identity_header_twice_or_comma_joined_is_400(
    name: str, form: str, gateway: GatewayUnderTest, fake_fhir: FakeFhir,
) -> None:
    fake_fhir.add(observation("o1", "p1"))
    values = FORMS[form](*HEADERS[name])
    async with gateway.session.get(gateway.url + "/Observation/o1", headers=_request_headers(name, values)) as resp:
        _assert_400(resp.status, resp.content_type, await resp.read())
    assert _forwarded(fake_fhir) == []


@pytest.mark.parametrize("name", list(HEADERS))
async def test_each_identity_header_once_is_accepted(name: str, gateway: GatewayUnderTest, fake_fhir: FakeFhir) -> None:
    fake_fhir.add(observation("o1", "p1"))
    async with gateway.session.get(gateway.url + "/Observation/o1", headers=_request_headers(name, [HEADERS[name][0]])) as resp:
        await resp.read()
        # Default deny without a consent; break-glass opens it.
        assert resp.status == (200 if name == "X-Break-Glass" else 403)


def _research_consent(patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Consent", "id": "research", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": patient},
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": {"type": "permit", "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]},
    }


async def test_without_x_purpose_of_use_the_configured_default_purpose_decides(
    fake_fhir: FakeFhir, make_gateway: Callable[..., Any],
) -> None:
    fake_fhir.add(observation("o1", "p1"), _research_consent("Patient/p1"))
    treating: GatewayUnderTest = await make_gateway(fake_fhir.base_url)
    researching: GatewayUnderTest = await make_gateway(fake_fhir.base_url, auth={"default_purpose": "HRESCH"})
    for gw, expected in ((treating, 403), (researching, 200)):
        async with gw.session.get(gw.url + "/Observation/o1", headers={"X-Actor": "Practitioner/doc-1"}) as resp:
            assert resp.status == expected
    async with treating.session.get(
        treating.url + "/Observation/o1", headers={"X-Actor": "Practitioner/doc-1", "X-Purpose-Of-Use": "HRESCH"},
    ) as resp:
        assert resp.status == 200


DOCTOR = {"fhirUser": "Practitioner/dr-1", "scope": "user/*.rs"}


async def _jwt_get(gw: GatewayUnderTest, token: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with gw.session.get(gw.url + "/Observation/o1", headers={"Authorization": f"Bearer {token}", **headers}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def _assert_401_bearer(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 401, body
    assert headers["WWW-Authenticate"].split(" ", 1)[0] == "Bearer"
    assert headers["Content-Type"] == "application/fhir+json"
    assert orjson.loads(body)["resourceType"] == "OperationOutcome"


async def test_an_algorithm_outside_the_configured_list_is_401(
    issuer: LocalIssuer, clinical: FakeFhir, make_gateway: Callable[..., Any],
) -> None:
    gw: GatewayUnderTest = await make_gateway(clinical.base_url, **jwt_sections(issuer, algorithms=["ES256"]))
    status, headers, body = await _jwt_get(gw, issuer.mint(DOCTOR, kid="rsa-1", audience=AUDIENCE))
    _assert_401_bearer(status, headers, body)
    assert _forwarded(clinical) == []
    status, _, body = await _jwt_get(gw, issuer.mint(DOCTOR, kid="ec-1", audience=AUDIENCE))
    assert status == 200, body


@pytest.mark.parametrize("token", ["", "not-a-jwt", "a.b.c", "Bearer"])
async def test_a_malformed_token_is_401_with_a_bearer_challenge(
    token: str, issuer: LocalIssuer, clinical: FakeFhir, make_gateway: Callable[..., Any],
) -> None:
    gw: GatewayUnderTest = await make_gateway(clinical.base_url, **jwt_sections(issuer))
    _assert_401_bearer(*await _jwt_get(gw, token))
    assert _forwarded(clinical) == []


@pytest.mark.parametrize("fhir_user", [
    "Practitioner/dr-1", "Patient/p1", "RelatedPerson/rp-1", "Person/pe-1",
    "https://ehr.example.org/fhir/Patient/p1", "https://ehr.example.org/fhir/Person/pe-1",
])
async def test_fhir_user_may_name_each_kind_of_requester(
    fhir_user: str, issuer: LocalIssuer, clinical: FakeFhir, make_gateway: Callable[..., Any],
) -> None:
    gw: GatewayUnderTest = await make_gateway(clinical.base_url, **jwt_sections(issuer))
    status, _, body = await _jwt_get(gw, issuer.mint({"fhirUser": fhir_user, "scope": "user/*.rs"}, audience=AUDIENCE))
    assert status == 200, body


@pytest.mark.parametrize("fhir_user", ["Organization/o1", "Observation/o1", "dr-1", "https://ehr.example.org/fhir/Device/d1"])
async def test_fhir_user_naming_no_requester_is_401(
    fhir_user: str, issuer: LocalIssuer, clinical: FakeFhir, make_gateway: Callable[..., Any],
) -> None:
    gw: GatewayUnderTest = await make_gateway(clinical.base_url, **jwt_sections(issuer))
    _assert_401_bearer(*await _jwt_get(gw, issuer.mint({"fhirUser": fhir_user, "scope": "user/*.rs"}, audience=AUDIENCE)))


async def test_break_glass_twice_is_400_in_jwt_mode(issuer: LocalIssuer, clinical: FakeFhir, make_gateway: Callable[..., Any]) -> None:
    gw: GatewayUnderTest = await make_gateway(clinical.base_url, **jwt_sections(issuer))
    token = issuer.mint(DOCTOR, audience=AUDIENCE)
    async with gw.session.get(gw.url + "/Observation/o1", headers=[
        ("Authorization", f"Bearer {token}"), ("X-Break-Glass", "Medical emergency"), ("X-Break-Glass", "Medical emergency"),
    ]) as resp:
        _assert_400(resp.status, resp.content_type, await resp.read())


# SMART scopes, v1 and v2, as a token's "scope" claim: (scope, patient claim) -> what each read gives.
SCOPE_TABLE = [
    ("patient/Observation.read", "p1", {"/Observation/o1": 200, "/Observation/o2": 403, "/Condition/c1": 403}),
    ("patient/*.read", "p1", {"/Observation/o1": 200, "/Observation/o2": 403, "/Condition/c1": 200}),
    ("patient/*.rs", None, {"/Observation/o1": 403, "/Condition/c1": 403}),
    ("user/Observation.read", None, {"/Observation/o1": 200, "/Observation/o2": 200, "/Condition/c1": 403}),
    ("user/*.read", None, {"/Observation/o1": 200, "/Condition/c1": 200}),
    ("user/Observation.rs", None, {"/Observation/o1": 200, "/Condition/c1": 403}),
    ("user/Observation.cruds", None, {"/Observation/o1": 200, "/Condition/c1": 403}),
    ("user/Observation.cud", None, {"/Observation/o1": 403}),
    # A type granted "s" alone is released to reads too (README: withheld when neither r nor s):
    # its search would return the same records.
    ("user/Condition.rs user/Observation.s", None, {"/Observation/o1": 200, "/Condition/c1": 200, "/Patient/p1": 403}),
    ("patient/Condition.cruds", "p1", {"/Condition/c1": 200, "/Observation/o1": 403}),
]


@pytest.mark.parametrize(("scope", "patient", "reads"), SCOPE_TABLE, ids=[f"{s}|{p}" for s, p, _ in SCOPE_TABLE])
async def test_smart_scopes_decide_reads_before_consent(
    scope: str, patient: str | None, reads: dict[str, int], issuer: LocalIssuer, clinical: FakeFhir,
    make_gateway: Callable[..., Any],
) -> None:
    gw: GatewayUnderTest = await make_gateway(clinical.base_url, **jwt_sections(issuer))
    claims: dict[str, Any] = {"fhirUser": "Practitioner/dr-1", "scope": scope}
    if patient:
        claims["patient"] = patient
    token = issuer.mint(claims, audience=AUDIENCE)
    for path, expected in reads.items():
        async with gw.session.get(gw.url + path, headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == expected, path
            assert resp.headers["X-Consent-Decision"] == ("permit" if expected == 200 else "deny")


async def test_a_search_loses_what_the_scopes_do_not_grant(issuer: LocalIssuer, clinical: FakeFhir, make_gateway: Callable[..., Any]) -> None:
    gw: GatewayUnderTest = await make_gateway(clinical.base_url, **jwt_sections(issuer))
    token = issuer.mint({"fhirUser": "Practitioner/dr-1", "scope": "patient/Observation.rs", "patient": "p1"}, audience=AUDIENCE)
    async with gw.session.get(gw.url + "/Observation", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200 and resp.headers["X-Consent-Decision"] == "filtered"
        bundle = orjson.loads(await resp.read())
    kept = [e["resource"] for e in bundle["entry"]]
    assert [r["id"] for r in kept if r["resourceType"] == "Observation"] == ["o1"]
    [outcome] = [r for r in kept if r["resourceType"] == "OperationOutcome"]
    assert outcome["issue"][0]["code"] == "suppressed"
    assert "total" not in bundle


async def test_an_issuer_written_with_a_trailing_slash_is_matched_exactly(
    issuer: LocalIssuer, clinical: FakeFhir, make_gateway: Callable[..., Any],
) -> None:
    # Some issuers' "iss" ends with "/" (e.g. https://<tenant>.auth0.com/): auth.jwt.issuer is
    # written the same way, the token's iss must equal it, and the keys are still found at
    # <issuer>/.well-known/jwks.json (one slash).
    sections = jwt_sections(issuer)
    sections["auth"]["jwt"]["issuer"] = issuer.base_url + "/"
    gw: GatewayUnderTest = await make_gateway(clinical.base_url, **sections)
    slashed = issuer.mint({**DOCTOR, "iss": issuer.base_url + "/"}, audience=AUDIENCE)
    status, _, body = await _jwt_get(gw, slashed)
    assert status == 200, body
    # iss is compared exactly: the same issuer without the slash is another issuer.
    _assert_401_bearer(*await _jwt_get(gw, issuer.mint(DOCTOR, audience=AUDIENCE)))
    async with gw.session.get(gw.url + "/.well-known/smart-configuration") as resp:
        assert resp.status == 200
        assert (await resp.json(content_type=None))["issuer"] == issuer.base_url + "/"


async def test_actor_claim_names_the_claim_that_says_who_asks(
    issuer: LocalIssuer, clinical: FakeFhir, make_gateway: Callable[..., Any],
) -> None:
    gw: GatewayUnderTest = await make_gateway(clinical.base_url, **jwt_sections(issuer, actor_claim="sub"))
    status, _, body = await _jwt_get(gw, issuer.mint({"sub": "Practitioner/dr-1", "scope": "user/*.rs"}, audience=AUDIENCE))
    assert status == 200, body
    # fhirUser alone no longer names the requester.
    _assert_401_bearer(*await _jwt_get(gw, issuer.mint({"fhirUser": "Practitioner/dr-1", "scope": "user/*.rs"}, audience=AUDIENCE)))


async def test_leeway_s_is_the_clock_skew_allowed_on_exp_and_nbf(
    issuer: LocalIssuer, clinical: FakeFhir, make_gateway: Callable[..., Any],
) -> None:
    lenient: GatewayUnderTest = await make_gateway(clinical.base_url, **jwt_sections(issuer, leeway_s=60))
    strict: GatewayUnderTest = await make_gateway(clinical.base_url, **jwt_sections(issuer, leeway_s=0))
    expired_20s_ago = issuer.mint(DOCTOR, audience=AUDIENCE, now=time.time() - 3620, lifetime_s=3600)
    valid_in_20s = issuer.mint({**DOCTOR, "nbf": int(time.time()) + 20}, audience=AUDIENCE)
    for token in (expired_20s_ago, valid_in_20s):
        status, _, body = await _jwt_get(lenient, token)
        assert status == 200, body
        _assert_401_bearer(*await _jwt_get(strict, token))
