"""Explain how each consent was read for one decision (``decide --json``); never on the hot path.

The decision engine answers with reasons (which consent, which provision, which rule); this
module adds what an integrator needs to see why a consent meant what it did: which reading
of the root applied, which role rule each actor followed, which confidentiality high-water
mark a provision set against the resource's level, and how each ``related`` data target was
resolved. It reads the compiled consents and the resource; it never changes a decision.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from gateway.core.compartment import UNKNOWN_AUTHOR, authors_of
from gateway.core.consent import AMBIGUOUS, BASE, FOREIGN, CompiledConsent, Provision
from gateway.core.decision import UNTYPED_SCOPE, Policy
from gateway.core.fhir import NO_BASES, Bases, JSON, resource_reference
from gateway.core.model import CONFIDENTIALITY_RANK, DEFAULT_CONFIDENTIALITY_RANK, Label

_RANK_CODE = {rank: code for code, rank in CONFIDENTIALITY_RANK.items()}
# How a reference to another FHIR server's resource (``consent.FOREIGN``) is shown: it is
# unknown here (it matches on a deny provision, never on a permit one).
FOREIGN_SHOWN = "another server's resource"
ROOT_READINGS = {
    "typed": "typed root: applies to the whole consent when its conditions match (IHE PCF)",
    "base": "untyped root without conditions: the base policy (policyRule) decides",
    "exception": "untyped root with conditions: an exception to the base policy (R4 text)",
    "scope": "untyped root with conditions: applies to the whole consent (consent.untyped_root: scope)",
}


def root_reading(consent: CompiledConsent, policy: Policy) -> str:
    """``typed``, ``base``, ``exception`` or ``scope``."""
    if consent.reading == AMBIGUOUS:
        return "scope" if policy.untyped_root == UNTYPED_SCOPE else "exception"
    return "base" if consent.reading == BASE else "typed"


def _nodes(root: Provision) -> Iterator[Provision]:
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


def _roles(node: Provision, requester: frozenset[str], authors: frozenset[str]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for ref in sorted(node.actors or ()):
        found.append({"provision": node.path, "actor": _shown(ref), "role_rule": "recipient",
                      "matches": "unknown" if ref == FOREIGN else ref in requester})
    for ref in sorted(node.authors or ()):
        # An author that could not be learnt (a PractitionerRole not read) leaves it unknown.
        matches: bool | str = ref in authors or ("unknown" if UNKNOWN_AUTHOR in authors or ref == FOREIGN else False)
        found.append({"provision": node.path, "actor": _shown(ref), "role_rule": "author", "matches": matches})
    for ref in sorted(node.custodians):
        found.append({"provision": node.path, "actor": _shown(ref), "role_rule": "custodian-no-condition",
                      "matches": True})
    return found


def _shown(ref: str) -> str:
    return FOREIGN_SHOWN if ref == FOREIGN else ref


def _resource_rank(labels: frozenset[Label]) -> int:
    ranks = [r for r in (lb.confidentiality_rank for lb in labels) if r is not None]
    return max(ranks, default=DEFAULT_CONFIDENTIALITY_RANK)


def _high_water(node: Provision, rank: int, labelled: bool) -> dict[str, Any] | None:
    if node.confidentiality < 0:
        return None
    return {
        "provision": node.path,
        "names": _RANK_CODE[node.confidentiality],
        "resource": _RANK_CODE[rank] + ("" if labelled else " (no confidentiality label)"),
        "covers": rank <= node.confidentiality,
    }


def _related(
    node: Provision, consent: CompiledConsent, own: str | None, known: Mapping[str, frozenset[str]]
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for item in node.data or ():
        if item.meaning != "related":
            continue
        if item.reference == FOREIGN:
            found.append({"provision": node.path, "target": FOREIGN_SHOWN, "resolved": "unknown",
                          "covers_resource": None})
            continue
        refs = known.get(item.reference)
        source = "in the answer"
        if refs is None:
            refs = consent.related.get(item.reference)
            source = "read from the FHIR server"
        if refs is None:
            found.append({"provision": node.path, "target": item.reference, "resolved": "unknown",
                          "covers_resource": None})
            continue
        covers = own == item.reference or (own is not None and own in refs)
        found.append({"provision": node.path, "target": item.reference, "resolved": source,
                      "covers_resource": covers})
    return found


def explain_consents(
    consents: Sequence[CompiledConsent],
    resource: JSON,
    labels: frozenset[Label],
    requester: frozenset[str],
    policy: Policy,
    known_refs: Mapping[str, frozenset[str]],
    ours: Bases = NO_BASES,
) -> list[dict[str, Any]]:
    """Per consent: root reading, actor role rules, high-water marks, related targets.
    ``ours``: the bases under which absolute references name this server's resources."""
    authors = authors_of(resource, ours=ours)
    rank = _resource_rank(labels)
    labelled = any(lb.confidentiality_rank is not None for lb in labels)
    own = resource_reference(resource)
    out: list[dict[str, Any]] = []
    for consent in consents:
        reading = root_reading(consent, policy)
        root = consent.scope_root if reading == "scope" and consent.scope_root else consent.root
        roles: list[dict[str, Any]] = []
        marks: list[dict[str, Any]] = []
        related: list[dict[str, Any]] = []
        for node in _nodes(root):
            roles += _roles(node, requester, authors)
            mark = _high_water(node, rank, labelled)
            if mark is not None:
                marks.append(mark)
            related += _related(node, consent, own, known_refs)
        out.append({
            "consent": consent.id,
            "root_reading": reading,
            "root_reading_means": ROOT_READINGS[reading],
            "ambiguous": consent.ambiguous,
            "base": consent.base or "default",
            "actors": roles,
            "high_water_marks": marks,
            "related": related,
        })
    return out
