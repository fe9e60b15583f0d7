"""Every leak test runs twice: answers parsed whole, and answers decided on views of their
deciding elements (core.view; in production only for answers of ``upstream.views_above_bytes``
or more). The same doors must hold on both paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


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
