"""``_elements`` (or ``_fields``) and ``_summary``, applied by the gateway after deciding.

The upstream is always asked for full resources, so a projection can never hide the codes
that carry sensitivity labels; the requester still gets the projection it asked for.
"""

from __future__ import annotations

from gateway.core.fhir import JSON

# ``_fields``: Medplum's name for ``_elements`` (its search parser reads both alike). A projection
# parameter left on the upstream query would hide the codes that decide (SECURITY).
ELEMENT_PARAMS = frozenset({"_elements", "_fields"})
PROJECTION_PARAMS = ELEMENT_PARAMS | {"_summary"}
_ALWAYS = frozenset({"resourceType", "id", "meta"})
_SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
# Elements never part of a summary (narrative, contained resources, bulky content).
_NOT_SUMMARY = frozenset({"text", "contained", "extension", "modifierExtension", "content", "data", "section"})


class Projection:
    """A parsed ``_elements`` / ``_summary`` request; ``apply`` trims one resource in place."""

    __slots__ = ("elements", "summary")

    def __init__(self, elements: frozenset[str] | None, summary: str | None) -> None:
        self.elements = elements
        self.summary = summary

    @classmethod
    def from_query(cls, elements: list[str], summary: list[str]) -> Projection | None:
        names = frozenset(n.strip() for v in elements for n in v.split(",") if n.strip())
        mode = summary[-1].strip() if summary else None
        if mode == "false":
            mode = None
        if not names and mode is None:
            return None
        return cls(names or None, mode)

    def apply(self, resource: JSON) -> None:
        """Trim one resource and mark it SUBSETTED (``_summary=count`` is handled elsewhere)."""
        keep: frozenset[str] | None = None
        drop: frozenset[str] = frozenset()
        if self.elements is not None:
            keep = self.elements | _ALWAYS
        elif self.summary == "text":
            keep = frozenset({"text"}) | _ALWAYS
        elif self.summary == "data":
            drop = frozenset({"text"})
        elif self.summary == "true":
            drop = _NOT_SUMMARY
        for name in list(resource):
            if (keep is not None and name not in keep) or name in drop:
                del resource[name]
        meta = resource.setdefault("meta", {})
        if isinstance(meta, dict):
            tags = meta.setdefault("tag", [])
            if isinstance(tags, list) and _SUBSETTED not in tags:
                tags.append(dict(_SUBSETTED))

    def bundle(self, bundle: JSON) -> None:
        """Apply to each match entry of a search Bundle (outcomes and includes stay whole)."""
        for entry in bundle.get("entry") or ():
            if not isinstance(entry, dict):
                continue
            resource, search = entry.get("resource"), entry.get("search")
            mode = search.get("mode") if isinstance(search, dict) else "match"
            if isinstance(resource, dict) and mode == "match":
                self.apply(resource)
