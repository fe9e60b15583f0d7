"""Writes to records that decide other records: what of them decides.

The gateway reads a ``Medication`` (and the ``Substance`` or ``Medication`` its ingredients
name) to label the orders naming it, and a ``PractitionerRole`` to learn who wrote what
(``core.references``, ``core.compartment.authors_of``). A write that changes that part changes
the decision of every record naming it, records its writer may not see among them: a drug
rewritten as lisinopril releases the opioid-use orders naming it. Two versions whose
``deciding_part`` is equal decide every record alike.
"""

from __future__ import annotations

from gateway.core.compartment import ROLE_MEMBERS
from gateway.core.fhir import JSON

DECIDING_TYPES = frozenset({"Medication", "Substance", "PractitionerRole"})

# A drug's elements that hold no code and name nothing: they may change freely.
_FREE_DRUG_ELEMENTS = frozenset({
    "id", "meta", "text", "status", "manufacturer", "batch", "amount", "description", "instance", "identifier",
})


def deciding_part(resource: JSON) -> object:
    """The part of a Medication, Substance or PractitionerRole that decides the records naming it.

    A drug: everything but the elements listed as free (so its codes anywhere, its form, its
    ingredients and their references, its contained resources and extensions), with its
    ``meta.security``. A role: its practitioner and organization (what ``authors_of`` counts).
    """
    if resource.get("resourceType") == "PractitionerRole":
        return {key: resource.get(key) for key in ROLE_MEMBERS}
    part = {key: value for key, value in resource.items() if key not in _FREE_DRUG_ELEMENTS}
    meta = resource.get("meta")
    part["meta.security"] = meta.get("security") if isinstance(meta, dict) else meta
    return part


# Teams a consent may name as its actor: the requester is in when he is their member.
TEAM_TYPES = frozenset({"Group", "CareTeam"})
_MEMBERSHIP = {"Group": "member", "CareTeam": "participant"}


def members_of(team: object) -> frozenset[str]:
    """Every reference a Group's ``member`` or a CareTeam's ``participant`` holds (at any depth:
    a member, on whose behalf), as written. A consent naming the team opens to each of them
    (``sources``: ``Group?member=``, ``CareTeam?participant=``)."""
    if not isinstance(team, dict):
        return frozenset()
    found: set[str] = set()
    stack: list[object] = [team.get(_MEMBERSHIP.get(str(team.get("resourceType")), ""))]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("reference")
            if isinstance(ref, str):
                found.add(ref)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return frozenset(found)
