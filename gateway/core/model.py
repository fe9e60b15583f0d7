"""Frozen value types shared by the whole gateway.

Everything here is pure data: the request context the decision engine reads, the
labels the labeler computes and the decisions (with reasons) the engine returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.core.scopes import Grants

from gateway.core.sensitivity_codes import BROADER

V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V3_CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
V3_PURPOSE_OF_USE = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
RESOURCE_TYPES_SYSTEM = "http://hl7.org/fhir/resource-types"
CONSENT_ACTION_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentaction"
# Resource-scope codes (the vendor data scopes: LABS, MEDICATIONS, ...) defined in rules/.
RESOURCE_SCOPE_SYSTEM = "urn:consent-gateway:resource-scope"
# Emergency consents recorded by break-glass carry this policy/category.
GATEWAY_CODE_SYSTEM = "urn:consent-gateway:code"

# v3 Confidentiality codes in order: a high-water mark (R4 Consent.provision.securityLabel).
CONFIDENTIALITY_RANK: dict[str, int] = {"U": 0, "L": 1, "M": 2, "N": 3, "R": 4, "V": 5}
# A resource that carries no confidentiality label counts as normal (N).
DEFAULT_CONFIDENTIALITY_RANK = CONFIDENTIALITY_RANK["N"]

ACTOR_TYPES = frozenset(
    {"Practitioner", "PractitionerRole", "Patient", "Organization", "Device", "RelatedPerson"}
)


def covered_codes(codes: frozenset[str]) -> frozenset[str]:
    """The label codes ``codes`` cover: themselves and every narrower or equivalent code."""
    return codes | frozenset(code for code, broader in BROADER.items() if broader & codes)


class Verdict(Enum):
    """Outcome of a decision.

    PERMIT: pass without looking at content; FILTER: allowed, but every resource must be
    decided on its own; DENY: refused.
    """

    PERMIT = "permit"
    FILTER = "filter"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Label:
    """A security label (system may be empty when a consent names only the code)."""

    system: str
    code: str

    def matches(self, other: Label) -> bool:
        """This label (a consent's) covers ``other`` (a resource's): systems equal where both are
        given, and codes equal or, for v3-ActCode labels, this code broader than the other
        (``SUD`` covers ``OPIOIDUD``; the table is generated from the published code system).
        """
        if self.system and other.system and self.system != other.system:
            return False
        if self.code == other.code:
            return True
        if (self.system or V3_ACT_CODE) != V3_ACT_CODE or (other.system or V3_ACT_CODE) != V3_ACT_CODE:
            return False
        broader = BROADER.get(other.code)
        return broader is not None and self.code in broader

    def __str__(self) -> str:
        return self.code

    @property
    def confidentiality_rank(self) -> int | None:
        """The rank of a v3 Confidentiality code (a code without a system counts), else None."""
        if self.system and self.system != V3_CONFIDENTIALITY:
            return None
        return CONFIDENTIALITY_RANK.get(self.code)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is asking: a FHIR reference such as ``Practitioner/1``."""

    reference: str
    organization: str | None = None
    role: str | None = None
    groups: frozenset[str] = frozenset()  # Group/CareTeam references the actor belongs to
    grants: Grants | None = None  # SMART scopes of a verified token (None: headers mode)

    @property
    def resource_type(self) -> str:
        return self.reference.split("/", 1)[0]

    def references(self) -> frozenset[str]:
        """Every reference a consent actor may name to match this requester."""
        refs = {self.reference, *self.groups}
        if self.organization:
            refs.add(self.organization)
        return frozenset(refs)


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What the decision engine knows about the request. ``now`` is an input, never read."""

    actor: Actor
    purpose: str
    now: datetime
    action: str = "access"
    break_glass: str | None = None


@dataclass(frozen=True, slots=True)
class Reason:
    """Why: which consent, which provision path, which rule (never sent to a client)."""

    consent: str
    provision: str
    rule: str

    def __str__(self) -> str:
        where = f"{self.consent} {self.provision}".strip()
        return f"{self.rule} ({where})" if where else self.rule


@dataclass(frozen=True, slots=True)
class Decision:
    """A verdict with the reasons that produced it.

    ``labels`` are the labels that mattered; ``combining`` names the step that chose among
    consents (``deny-overrides``, ``latest-wins``, ``default``, ``self-access``, ...).
    """

    verdict: Verdict
    reasons: tuple[Reason, ...] = ()
    labels: tuple[str, ...] = ()
    combining: str = ""
    errors: tuple[str, ...] = field(default=())

    @property
    def permitted(self) -> bool:
        return self.verdict is not Verdict.DENY
