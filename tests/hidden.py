"""Searching the raw text of an answer, a log or /metrics for what was hidden."""

from __future__ import annotations

import re

# Identifiers the gateway makes up itself (request ids, AuditEvent ids, trace and span ids):
# random lowercase hex, in which a short secret such as a code can turn up by chance; and the
# tokens of sealed paging links (gateway.web.pages: ciphertext in the symbols -._~, which spell no secret, stripped all the same).
_MINTED = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|(?<![0-9A-Za-z])[0-9a-f]{16,}(?![0-9A-Za-z])"
                     r"|(?<=gateway-page=)[-._~]+")


def hidden_in(text: str | bytes, secrets: tuple[str, ...] | list[str]) -> list[str]:
    """The secrets found in the text, apart from chance matches inside the gateway's own random ids."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = _MINTED.sub("~", text)
    return [s for s in secrets if s in text]
