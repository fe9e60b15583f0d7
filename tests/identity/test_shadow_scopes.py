"""Shadow mode reports consent without applying it, but a token's scopes still apply."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from gateway.demo.issuer import LocalIssuer
from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.identity.conftest import AUDIENCE, jwt_sections


async def test_shadow_mode_still_applies_scopes(issuer: LocalIssuer, clinical: FakeFhir, make_gateway: Callable[..., Any]) -> None:
    sections = jwt_sections(issuer)
    sections["consent"] = {"default_decision": "deny"}  # consent would withhold everything
    gw: GatewayUnderTest = await make_gateway(clinical.base_url, **sections, enforcement={"mode": "shadow"})
    token = issuer.mint({"fhirUser": "Practitioner/dr-1", "scope": "user/Observation.read"}, audience=AUDIENCE)
    headers = {"Authorization": f"Bearer {token}"}
    async with gw.session.get(gw.url + "/Observation/o1", headers=headers) as resp:
        assert resp.status == 200  # consent would deny: shadow mode passes it
        assert resp.headers["X-Consent-Decision-Shadow"] == "deny"
    async with gw.session.get(gw.url + "/Condition/c1", headers=headers) as resp:
        body = await resp.read()
        assert resp.status == 403  # not in the token's scopes: refused in any mode
        assert b"I10" not in body
    async with gw.session.get(gw.url + "/Condition?patient=p1", headers=headers) as resp:
        bundle = orjson.loads(await resp.read())
        assert resp.headers["X-Consent-Decision"] == "filtered"
        assert [e["resource"]["resourceType"] for e in bundle["entry"]] == ["OperationOutcome"]
