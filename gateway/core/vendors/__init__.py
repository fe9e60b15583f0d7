"""Pure converters from vendor consent JSON to FHIR R4 Consent resources.

One module per vendor (``clinikapi``, ``healthex``, ``healtheintent``). ``CONVERTERS``
maps a ``consent.source_kind`` to a function ``(payload, ConvertOptions) -> [Consent]``.
Every converter raises ``VendorError`` (one line naming the record and the field) on a
record it cannot understand; callers must fail the lookup closed, never skip the record.
"""

from __future__ import annotations

from gateway.core.vendors import clinikapi, healtheintent, healthex
from gateway.core.vendors._common import Converter, ConvertOptions, VendorError

CONVERTERS: dict[str, Converter] = {
    "clinikapi": clinikapi.convert,
    "healthex": healthex.convert,
    "healtheintent": healtheintent.convert,
}

__all__ = ["CONVERTERS", "ConvertOptions", "Converter", "VendorError"]
