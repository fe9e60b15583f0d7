"""Reading the gateway's sealed paging links in tests (gateway.web.pages): a test asserts on
the link a token seals, as the gateway reads it when the link is followed."""

from __future__ import annotations

import re
from typing import Any

# The gateway's page parameter (gateway.web.pages.PAGE_PARAM); gateway modules are imported
# when a link is opened, so that these tests also run (and fail) against code without sealing.
PAGE_PARAM = "gateway-page"
SEALED_LINK = re.compile(rf"(https?://[^\s\"<>?]*)\?{PAGE_PARAM}=([-._~]+)")


def _seal(gateway: object) -> Any:
    from gateway.sealing import PageSeal

    seal = gateway if isinstance(gateway, PageSeal) else getattr(getattr(gateway, "state"), "pages")
    assert isinstance(seal, PageSeal)
    return seal


def inner(gateway: object, url: str) -> str:
    """The gateway's link a sealed ``url`` stands for (the public base and the sealed path and
    query); a URL that is no sealed link is returned as it is."""
    found = SEALED_LINK.fullmatch(url)
    if found is None:
        return url
    relative = _seal(gateway).open(found.group(2), found.group(1).rstrip("/"))
    assert relative is not None, f"a sealed link that does not open: {url}"
    return found.group(1).rstrip("/") + relative


def unsealed(gateway: object, text: bytes | str) -> bytes:
    """``text`` (a body, a header) with each sealed link replaced by the link it stands for."""
    raw = text.decode() if isinstance(text, bytes) else text
    return SEALED_LINK.sub(lambda m: inner(gateway, m.group(0)), raw).encode()


def is_sealed(url: str) -> bool:
    return SEALED_LINK.fullmatch(url) is not None


def opaque(text: bytes | str) -> bytes:
    """``text`` as a client that cannot open tokens compares it: each token replaced by as many
    ``~`` (a token's length is all it shows; its bytes differ on every answer)."""
    raw = text.decode() if isinstance(text, bytes) else text
    return SEALED_LINK.sub(lambda m: f"{m.group(1)}?{PAGE_PARAM}=" + "~" * len(m.group(2)), raw).encode()
