"""Every leak test runs twice: answers parsed whole, and answers decided on views of their
deciding elements (core.view; in production only for answers of ``upstream.views_above_bytes``
or more). The same doors must hold on both paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.fakes import FakeFhir
from tests.fixtures import clinical as c


@pytest.fixture(params=["whole", "views"])
def make_gateway(request: pytest.FixtureRequest, make_gateway: Callable[..., Any]) -> Callable[..., Any]:
    if request.param == "whole":
        return make_gateway

    async def factory(upstream_url: str, **sections: Any) -> Any:
        upstream = dict(sections.get("upstream") or {})
        upstream.setdefault("views_above_bytes", 0)
        sections["upstream"] = upstream
        return await make_gateway(upstream_url, **sections)

    return factory


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    """Ana's and Ben's records; both hold a general opt-in (sensitive data stays closed). A
    module may define its own ``world``."""
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), c.opt_in(c.PAT_BEN, "consent-ben-in"))
    return fake_fhir
