"""Decide whether a requester may see a resource, from the patients' compiled Consents.

Semantics (CONTRACT §5):
- A consent is in force when it is active, its scope fits (``patient-privacy``; ``research``
  only for research purposes) and its root period contains ``ctx.now``.
- The root reads by its kind (``CompiledConsent.reading``): a typed root (IHE PCF) applies
  to the whole consent: when its conditions all match its type decides, otherwise the
  consent does not apply. An untyped root without conditions leaves the base policy
  (policyRule, else the default decision). An untyped root with conditions is, under
  ``Policy.untyped_root = exception`` (R4's text), an exception: when its conditions match
  its decision is the opposite of the base, otherwise the base decides; under ``scope`` it
  reads like a typed root whose type is the base.
- Then every nested provision whose conditions all match overrides its parent with its own
  type; the deepest match wins; matching siblings that disagree give deny.
- Actors: recipient roles match the requester (or its organization, groups, care teams);
  custodian actors are no condition; AUT/INF/ENT actors match the resource's author.
  ``code`` matches any coding anywhere in the resource. Confidentiality labels are a
  high-water mark: naming R covers U..R; a resource without one counts as N.
- Across consents ``deny-overrides`` (any deny wins) or ``latest-wins`` (latest
  ``dateTime``; ties fall back to deny-overrides; a deny counts at the last instant its
  ``dateTime`` covers, a permit at the first, undated ones last and first). No applicable
  consent: the default.
- A label in ``Policy.required_labels`` is opened only by a permit whose matched provision
  path names it in ``securityLabel``; a general permit or a default permit does not.
- A ``related`` target is looked up in the response (``known_refs``), else in what the
  consent cache read from the FHIR server (``CompiledConsent.related``).
- A condition that cannot be evaluated (no clinical date for ``dataPeriod``, a ``related``
  target found in neither, a class system we cannot read) matches on a deny
  provision and does not match on a permit provision, so missing data never opens data.
- A reference to another FHIR server's resource in a consent (``consent.FOREIGN``: an actor,
  an author or ``data`` under a base not this server's) is unknown: it matches on a deny
  provision and never on a permit one.
- A malformed consent is skipped only when it is certain not to apply or could only
  permit; otherwise the decision is deny, naming the defect. Nothing here raises.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, NamedTuple

from gateway.core.compartment import (
    NO_ROLES,
    FOREIGN_MARK,
    UNKNOWN_AUTHOR,
    UNKNOWN_PATIENT,
    DateRange,
    all_codes,
    as_utc,
    authors_of,
    clinical_date,
    is_patient_data,
    patients_of,
    profiles_of,
    references_of,
)
from gateway.core.consent import (
    AMBIGUOUS,
    CONSENT_STATUSES,
    DENY,
    FOREIGN,
    NO_RELATED,
    NOT_DEFAULT,
    PERMIT,
    POLICY_RULE_REASONS,
    CompiledConsent,
    Provision,
)
from gateway.core.fhir import NO_BASES, R4_RESOURCE_TYPES, Bases, JSON, provisions, resource_reference
from gateway.core.model import (
    DEFAULT_CONFIDENTIALITY_RANK,
    Decision,
    Label,
    Reason,
    RequestContext,
    Verdict,
)
from gateway.core.purpose import is_research, lineage

DENY_OVERRIDES = "deny-overrides"
LATEST_WINS = "latest-wins"
# consent.untyped_root: how an untyped root provision with conditions reads.
UNTYPED_EXCEPTION = "exception"
UNTYPED_SCOPE = "scope"
# Reason.provision of a decision the base policy (policyRule) made.
BASE_POLICY = "policyRule"
# A read or search is any of these consent actions.
READ_ACTIONS = frozenset({"access", "use", "disclose"})
NO_REFS: Mapping[str, frozenset[str]] = MappingProxyType({})
_EARLIEST = datetime.min.replace(tzinfo=timezone.utc)
_LATEST = datetime.max.replace(tzinfo=timezone.utc)
_INACTIVE = CONSENT_STATUSES - {"active"}
# Skip rules about the consent as a whole rather than its root provision.
_CONSENT_LEVEL = frozenset({"not-active", "scope-not-applicable"})


@dataclass(frozen=True, slots=True)
class Policy:
    """The operator's consent settings (``consent.*`` and ``sensitivity.*`` in the config).

    ``explicit_consent_required`` None means every label in ``sensitive``; an empty set
    means no label needs an explicit permit.
    """

    default_decision: str = DENY
    combining: str = DENY_OVERRIDES
    patient_self_access: bool = True
    explicit_consent_required: frozenset[str] | None = None
    sensitive: frozenset[str] = frozenset()
    untyped_root: str = UNTYPED_EXCEPTION
    # consent.writer_roles: who, besides its patient, reads a Consent that names records.
    consent_writers: frozenset[str] = frozenset()

    @property
    def required_labels(self) -> frozenset[str]:
        """Label codes that only an explicit permit naming them opens."""
        if self.explicit_consent_required is None:
            return self.sensitive
        return self.explicit_consent_required


class _Request:
    """What the request contributes to every condition (cached per request context)."""

    __slots__ = (
        "actors", "purposes", "action", "now", "research", "default", "_gates", "_mismatch", "_kids", "_reasons",
    )

    def __init__(self, ctx: RequestContext, default: str = DENY) -> None:
        self.actors = ctx.actor.references()
        self.default = default  # the policy's default decision (what an untyped provision gives)
        self.purposes = frozenset(lineage(ctx.purpose))
        self.action = ctx.action
        self.now = as_utc(ctx.now)
        self.research = is_research(ctx.purpose)
        # Request-side results are the same for every resource of a response: memoised.
        self._gates: dict[CompiledConsent, str | None] = {}
        self._mismatch: dict[Provision, str | None] = {}
        self._kids: dict[Provision, tuple[Provision, ...]] = {}
        self._reasons: dict[tuple[str, str, str], Reason] = {}

    def gate(self, consent: CompiledConsent) -> str | None:
        """Why a sound consent is not in force for this request, or None."""
        try:
            return self._gates[consent]
        except KeyError:
            found = self._gates[consent] = _request_gate(consent, self)
            return found

    def mismatch(self, node: Provision) -> str | None:
        """The first request-side condition of ``node`` that fails (memoised), or None."""
        try:
            return self._mismatch[node]
        except KeyError:
            found = self._mismatch[node] = _request_mismatch(node, self)
            return found

    def children(self, node: Provision) -> tuple[Provision, ...]:
        """The nested provisions whose request-side conditions match."""
        try:
            return self._kids[node]
        except KeyError:
            kids = tuple(c for c in node.children if _request_mismatch(c, self) is None)
            self._kids[node] = kids
            return kids

    def reason(self, consent: str, provision: str, rule: str) -> Reason:
        """A shared Reason value (resources of one response repeat the same few)."""
        key = (consent, provision, rule)
        found = self._reasons.get(key)
        if found is None:
            found = self._reasons[key] = Reason(consent, provision, rule)
        return found

    def action_matches(self, actions: frozenset[str]) -> bool:
        if self.action in READ_ACTIONS:
            return not actions.isdisjoint(READ_ACTIONS)
        return self.action in actions


_UNSET: Any = object()


class _NotRead:
    """The value of a fact the consents do not read (``Facts``): reading it is a defect."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_READ"


NOT_READ: Any = _NotRead()
# Facts read anywhere in a resource: no view of some of its elements holds them.
WHOLE_RESOURCE_READS = frozenset({"codes", "authors", "data"})


class FactNotRead(LookupError):
    """A condition read a fact the record was built without (``Facts``, ``summary_reads``)."""


class Facts(NamedTuple):
    """What decides one resource besides the request and its patients' consents: its frozen
    facts record. Built with only what the consents read (``core.judge.facts_of`` with
    ``summary_reads``; the others hold ``NOT_READ``), it is itself the memo key
    (``summary_key``) and all ``decide_facts`` reads."""

    rtype: str
    owners: frozenset[str]          # the patients it belongs to
    labels: frozenset[Label]
    scopes: frozenset[str]          # resource scopes; empty when no consent reads them
    profiles: frozenset[str]
    date: DateRange | None          # "date"
    ref: str | None = NOT_READ       # its ``Type/id``: "data"
    codes: frozenset[tuple[str, str]] = NOT_READ  # every coding anywhere in it: "codes"
    references: frozenset[str] = NOT_READ          # every reference it makes: "data"
    authors: frozenset[str] = NOT_READ             # its authors: "authors", "data"
    version: str | None = NOT_READ                 # its meta.versionId: "data"


class _Facts:
    """The resource as the conditions see it; each fact is read at most once, on demand."""

    __slots__ = (
        "resource", "rtype", "labels", "scopes", "known_refs", "related", "roles", "ours",
        "_ref", "_profiles", "_codes", "_date", "_refs", "_authors", "_rank", "_version",
    )

    def __init__(
        self,
        resource: JSON,
        labels: frozenset[Label],
        scopes: frozenset[str],
        known_refs: Mapping[str, frozenset[str]],
    ) -> None:
        self.resource = resource
        rtype = resource.get("resourceType")
        self.rtype = rtype if isinstance(rtype, str) else ""
        self.labels = labels
        self.scopes = scopes
        self.known_refs = known_refs
        # the deciding consent's server-read related targets (set per consent)
        self.related: Mapping[str, frozenset[str]] = NO_RELATED
        self.roles: Mapping[str, JSON | None] = NO_ROLES  # PractitionerRoles read (authors_of)
        self.ours: Bases = NO_BASES  # this server's bases (authors_of)
        self._ref = self._profiles = self._codes = self._date = _UNSET
        self._refs = self._authors = self._rank = self._version = _UNSET

    @property
    def ref(self) -> str | None:
        if self._ref is _UNSET:
            self._ref = resource_reference(self.resource)
        found: str | None = self._ref
        return found

    @property
    def profiles(self) -> frozenset[str]:
        if self._profiles is _UNSET:
            self._profiles = profiles_of(self.resource)
        found: frozenset[str] = self._profiles
        return found

    @property
    def codes(self) -> frozenset[tuple[str, str]]:
        """Every coding anywhere in the resource (R4: "found in an instance")."""
        if self._codes is _UNSET:
            self._codes = all_codes(self.resource)
        found: frozenset[tuple[str, str]] = self._codes
        return found

    @property
    def confidentiality(self) -> int:
        """The highest confidentiality rank among the labels; none counts as N."""
        if self._rank is _UNSET:
            ranks = [r for r in (lb.confidentiality_rank for lb in self.labels) if r is not None]
            self._rank = max(ranks, default=DEFAULT_CONFIDENTIALITY_RANK)
        found: int = self._rank
        return found

    @property
    def date(self) -> DateRange | None:
        if self._date is _UNSET:
            self._date = clinical_date(self.resource)
        found: DateRange | None = self._date
        return found

    @property
    def references(self) -> frozenset[str]:
        if self._refs is _UNSET:
            self._refs = references_of(self.resource, self.ours)
        found: frozenset[str] = self._refs
        return found

    @property
    def authors(self) -> frozenset[str]:
        if self._authors is _UNSET:
            self._authors = authors_of(self.resource, self.roles, self.ours)
        found: frozenset[str] = self._authors
        return found

    @property
    def version(self) -> str | None:
        if self._version is _UNSET:
            self._version = version_of(self.resource)
        found: str | None = self._version
        return found


def codes_of(resource: JSON, medications: Sequence[JSON] = ()) -> frozenset[tuple[str, str]]:
    """Every coding a ``code`` condition reads of ``resource``: anywhere in it, and in the
    Medication an order names by reference with the ingredients that one names by reference
    (``references.Resolved.medications_of``): its drug as much as an inline one."""
    found = all_codes(resource)
    for medication in medications:
        found = found | all_codes(medication)
    return found


def version_of(resource: JSON) -> str | None:
    """A resource's ``meta.versionId``, or None."""
    meta = resource.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return version if isinstance(version, str) else None


def _read(value: Any, name: str) -> Any:
    if value is NOT_READ:
        raise FactNotRead(name)
    return value


class _RecordFacts(_Facts):
    """A facts record as the conditions see it: every fact comes from the record, none from
    a resource; a fact the record was built without raises ``FactNotRead``."""

    __slots__ = ()

    def __init__(self, facts: Facts, known_refs: Mapping[str, frozenset[str]] = NO_REFS) -> None:
        self.resource = None  # type: ignore[assignment]
        self.rtype = facts.rtype
        self.labels = facts.labels
        self.scopes = facts.scopes
        self.known_refs = known_refs
        self.related = NO_RELATED
        self.roles = NO_ROLES
        self.ours = NO_BASES
        self._ref, self._profiles, self._codes = facts.ref, facts.profiles, facts.codes
        self._date, self._refs, self._authors = facts.date, facts.references, facts.authors
        self._version, self._rank = facts.version, _UNSET

    @property
    def ref(self) -> str | None:
        found: str | None = _read(self._ref, "ref")
        return found

    @property
    def codes(self) -> frozenset[tuple[str, str]]:
        found: frozenset[tuple[str, str]] = _read(self._codes, "codes")
        return found

    @property
    def date(self) -> DateRange | None:
        found: DateRange | None = _read(self._date, "date")
        return found

    @property
    def references(self) -> frozenset[str]:
        found: frozenset[str] = _read(self._refs, "references")
        return found

    @property
    def authors(self) -> frozenset[str]:
        found: frozenset[str] = _read(self._authors, "authors")
        return found

    @property
    def version(self) -> str | None:
        found: str | None = _read(self._version, "version")
        return found


@lru_cache(maxsize=1024)
def _request_of(ctx: RequestContext, default: str = DENY) -> _Request:
    """The request's side of every condition under the policy's default decision ``default``;
    one response's resources share it."""
    return _Request(ctx, default)


def _request_mismatch(node: Provision, req: _Request) -> str | None:
    """The first request-side condition (period, actor, purpose, action) that fails."""
    if node.period is not None and not node.period.contains_instant(req.now):
        return "period-not-current"
    actors = node.actors
    if actors is not None and (
        not actors <= req.actors if node.actors_all else actors.isdisjoint(req.actors)
    ) and not (FOREIGN in actors and _foreign_actor_matches(node, actors, req)):
        return "actor-mismatch"
    if node.purposes is not None and node.purposes.isdisjoint(req.purposes):
        return "purpose-mismatch"
    if node.actions is not None and not req.action_matches(node.actions):
        return "action-mismatch"
    return None


def _foreign_actor_matches(node: Provision, actors: frozenset[str], req: _Request) -> bool:
    """SECURITY: an actor on another FHIR server is unknown (it may be this requester under a
    base not configured as this server's): it matches on a deny provision (the other actors of
    an all-of still must), never on a permit one."""
    ptype = node.type
    denies = ptype == DENY if ptype in (PERMIT, DENY) else (ptype == "") == (req.default == DENY)
    return denies and (not node.actors_all or actors - {FOREIGN} <= req.actors)


def _request_gate(consent: CompiledConsent, req: _Request) -> str | None:
    """Why the consent is not in force: status, scope, or the root period (its validity)."""
    if consent.status != "active":
        return "not-active"
    if not _scope_applies(consent, req):
        return "scope-not-applicable"
    period = consent.root.period
    if period is not None and not period.contains_instant(req.now):
        return "period-not-current"
    if consent.scope_root is None:
        # One reading only (typed or base root): its request-side mismatch is a gate too.
        return _request_mismatch(consent.root, req)
    return None


def _tree(consent: CompiledConsent, policy: Policy) -> tuple[Provision, bool]:
    """The root to evaluate, and whether it reads as an exception to the base policy."""
    if consent.scope_root is None:
        return consent.root, False
    if policy.untyped_root == UNTYPED_SCOPE:
        return consent.scope_root, False
    return consent.root, consent.reading == AMBIGUOUS


def _class_matches(node: Provision, facts: _Facts, deny: bool) -> bool:
    if facts.rtype in node.class_types or not facts.scopes.isdisjoint(node.class_scopes):
        return True
    if node.class_profiles and not facts.profiles.isdisjoint(node.class_profiles):
        return True
    bare = node.class_bare
    if bare and (
        facts.rtype in bare
        or not facts.scopes.isdisjoint(bare)
        or not facts.profiles.isdisjoint(bare)
    ):
        return True
    return deny and node.class_other


def _code_matches(wanted: frozenset[tuple[str, str]], facts: _Facts) -> bool:
    for system, code in facts.codes:
        if (system, code) in wanted or ("", code) in wanted:
            return True
        if not system and any(c == code for _, c in wanted):
            return True
    return False


def _labels_match(node: Provision, facts: _Facts) -> bool:
    # Confidentiality is a high-water mark: naming R covers every rank up to R.
    if node.confidentiality >= 0 and facts.confidentiality <= node.confidentiality:
        return True
    return any(own.matches(label) for own in node.other_labels for label in facts.labels)


def _date_matches(period: DateRange, facts: _Facts, deny: bool) -> bool:
    found = facts.date
    if found is None:
        return deny
    # A deny covers any record touching the period; a permit only records wholly inside it.
    return period.overlaps(found) if deny else period.contains(found)


def _data_matches(node: Provision, facts: _Facts, deny: bool) -> bool:
    unknown = False
    own = facts.ref
    for item in node.data or ():
        target = item.reference
        if own == target:
            # A permit naming one version opens that version only (a deny closes them all).
            if deny or item.version is None or facts.version == item.version:
                return True
            continue
        if target == FOREIGN:
            unknown = True  # another server's record: what it is, or refers to, is unknown here
            continue
        if item.meaning == "related":
            refs = facts.known_refs.get(target)
            if refs is None:
                refs = facts.related.get(target)
            if refs is None:
                unknown = True
            elif own is not None and (own in refs or (deny and FOREIGN_MARK + own in refs)):
                # SECURITY: another server's record of this ``Type/id`` may be this one under a
                # base not configured: it may close, never open.
                return True
        elif item.meaning == "dependents":
            references = facts.references
            if target in references or (deny and FOREIGN_MARK + target in references):
                return True
        elif item.meaning == "authoredby":
            authors = facts.authors
            if target in authors:
                return True
            unknown = unknown or UNKNOWN_AUTHOR in authors
    return deny and unknown


def _content_mismatch(node: Provision, facts: _Facts, deny: bool) -> str | None:
    """The first resource-side condition (class, code, label, dataPeriod, data) that fails."""
    if node.authors is not None and node.authors.isdisjoint(facts.authors):
        # An author that could not be learnt, or one the consent names on another server, matches
        # a deny and never a permit (CONTRACT §5).
        if not (deny and (UNKNOWN_AUTHOR in facts.authors or FOREIGN in node.authors)):
            return "author-mismatch"
    if node.has_class and not _class_matches(node, facts, deny):
        return "class-mismatch"
    if node.codes is not None and not _code_matches(node.codes, facts):
        return "code-mismatch"
    if node.labels is not None and not _labels_match(node, facts):
        return "label-mismatch"
    if node.data_period is not None and not _date_matches(node.data_period, facts, deny):
        return "data-period-mismatch"
    if node.data is not None and not _data_matches(node, facts, deny):
        return "data-mismatch"
    return None


def _resolve_type(ptype: str, policy: Policy) -> str:
    if ptype == PERMIT or ptype == DENY:
        return ptype
    default = policy.default_decision
    if ptype == NOT_DEFAULT:
        return PERMIT if default == DENY else DENY
    return default


def _resolve(node: Provision, policy: Policy) -> str:
    ptype = node.type
    if ptype == PERMIT or ptype == DENY:
        return ptype
    return _resolve_type(ptype, policy)


def _is_deny(node: Provision, policy: Policy) -> bool:
    ptype = node.type
    if ptype == DENY:
        return True
    return ptype != PERMIT and _resolve_type(ptype, policy) == DENY


class _Outcome(NamedTuple):
    """One consent's answer for one resource: its type and the matched provision chain.

    ``path`` is the deciding provision's path (``policyRule`` when the base decided).
    """

    type: str
    chain: tuple[Provision, ...]
    rule: str
    path: str


def _base_outcome(consent: CompiledConsent, policy: Policy) -> _Outcome:
    """The base policy decides: an exception root that does not match."""
    ptype = _resolve_type(consent.base, policy)
    return _Outcome(ptype, (), POLICY_RULE_REASONS.get(consent.base) or f"default-{ptype}", BASE_POLICY)


def _descend(
    node: Provision, chain: tuple[Provision, ...], req: _Request, facts: _Facts, policy: Policy
) -> list[_Outcome]:
    """Deepest matching provisions below ``node`` (``node`` itself when no child matches)."""
    outcomes: list[_Outcome] = []
    for child in req.children(node):
        if _content_mismatch(child, facts, _is_deny(child, policy)) is None:
            outcomes.extend(_descend(child, (*chain, child), req, facts, policy))
    if outcomes:
        return outcomes
    ptype = _resolve(node, policy)
    return [_Outcome(ptype, chain, node.rule or f"default-{ptype}", node.path)]


def _evaluate_tree(
    root: Provision, req: _Request, facts: _Facts, policy: Policy
) -> _Outcome | list[_Outcome]:
    """The consent's outcome, or the agreeing permit outcomes (one per matched branch)."""
    if not root.children:
        ptype = _resolve(root, policy)
        return _Outcome(ptype, (root,), root.rule or f"default-{ptype}", root.path)
    outcomes = _descend(root, (root,), req, facts, policy)
    if len(outcomes) == 1:
        return outcomes[0]
    types = {o.type for o in outcomes}
    if types == {PERMIT}:
        return outcomes
    denied = next(o for o in outcomes if o.type == DENY)
    rule = "sibling-conflict" if len(types) > 1 else denied.rule
    return _Outcome(DENY, denied.chain, rule, denied.path)


def _can_deny(consent: CompiledConsent, policy: Policy) -> bool:
    types = consent.types
    if policy.default_decision == DENY:
        return DENY in types or "" in types
    return DENY in types or NOT_DEFAULT in types


def _scope_applies(consent: CompiledConsent, req: _Request) -> bool:
    scopes = consent.scopes
    return "patient-privacy" in scopes or ("research" in scopes and req.research)


def _certainly_inapplicable(
    consent: CompiledConsent, req: _Request, facts: _Facts | None, policy: Policy
) -> str | None:
    """Why a defective consent cannot apply, judged only from the parts that compiled."""
    if consent.status in _INACTIVE:
        return "not-active"
    if consent.scopes and not _scope_applies(consent, req):
        return "scope-not-applicable"
    period = consent.root.period
    if period is not None and not period.contains_instant(req.now):
        return "period-not-current"
    root, exception = _tree(consent, policy)
    if exception or not consent.root_sound:
        # An exception root that does not match still leaves the base policy deciding.
        return None
    found = _request_mismatch(root, req)
    if found is None and facts is not None:
        found = _content_mismatch(root, facts, _resolve(root, policy) == DENY)
    return found


def _malformed(consent: CompiledConsent) -> str:
    return f"malformed-consent:{consent.defects[0]}"


class _Verdict(NamedTuple):
    """One consent's result: skipped (with why: provision path and rule), or an outcome."""

    consent: CompiledConsent
    skip: tuple[str, str] | None = None
    outcome: _Outcome | list[_Outcome] | None = None
    malformed: bool = False


def _decide_consent(
    consent: CompiledConsent, req: _Request, facts: _Facts, policy: Policy
) -> _Verdict:
    facts.related = consent.related  # this consent's server-read related targets
    if consent.defects:
        why = _certainly_inapplicable(consent, req, facts, policy)
        if why is not None:
            return _Verdict(consent, skip=("provision", why))
        rule = _malformed(consent)
        if _can_deny(consent, policy):
            outcome = _Outcome(DENY, (consent.root,), rule, consent.root.path)
            return _Verdict(consent, outcome=outcome, malformed=True)
        return _Verdict(consent, skip=("provision", rule), malformed=True)
    why = req.gate(consent)
    if why is not None:
        return _Verdict(consent, skip=("" if why in _CONSENT_LEVEL else "provision", why))
    if consent.scope_root is None:
        # Typed or base root (the gate checked its request side): the common, fast path.
        root = consent.root
        why = _content_mismatch(root, facts, _is_deny(root, policy))
        if why is not None:
            return _Verdict(consent, skip=("provision", why))
        return _Verdict(consent, outcome=_evaluate_tree(root, req, facts, policy))
    root, exception = _tree(consent, policy)
    why = req.mismatch(root) or _content_mismatch(root, facts, _is_deny(root, policy))
    if why is not None:
        if exception:
            return _Verdict(consent, outcome=_base_outcome(consent, policy))
        return _Verdict(consent, skip=("provision", why))
    return _Verdict(consent, outcome=_evaluate_tree(root, req, facts, policy))


def _chain_labels(chains: Sequence[tuple[Provision, ...]], labels: frozenset[Label]) -> list[str]:
    """Codes of the resource labels some provision on the chains names."""
    return sorted(
        {
            label.code
            for label in labels
            for chain in chains
            for node in chain
            if node.labels is not None and node.names_label(label)
        }
    )


def _deny_decision(verdict: _Verdict, req: _Request, facts: _Facts, combining: str) -> Decision:
    outcome = verdict.outcome
    assert isinstance(outcome, _Outcome)
    cid = verdict.consent.id
    errors = tuple(f"{cid}: {d}" for d in verdict.consent.defects)
    return Decision(
        Verdict.DENY,
        (req.reason(cid, outcome.path, outcome.rule),),
        labels=tuple(_chain_labels([outcome.chain], facts.labels)) if facts.labels else (),
        combining=combining,
        errors=errors,
    )


def _outcomes(verdict: _Verdict) -> list[_Outcome]:
    outcome = verdict.outcome
    if outcome is None:
        return []
    return outcome if isinstance(outcome, list) else [outcome]


def _permit_decision(
    permits: Sequence[_Verdict],
    req: _Request,
    facts: _Facts,
    policy: Policy,
    combining: str,
    notes: Sequence[Reason],
    errors: Sequence[str],
) -> Decision:
    """Permit, unless a required label is not named by any permitting provision chain."""
    chains = [o.chain for v in permits for o in _outcomes(v)]
    closed: list[str] = []
    if facts.labels:
        required = policy.required_labels
        closed = sorted(
            {
                label.code
                for label in facts.labels
                if label.code in required
                and not any(node.names_label(label) for chain in chains for node in chain)
            }
        )
    reasons = [req.reason(v.consent.id, o.path, o.rule) for v in permits for o in _outcomes(v)]
    if closed:
        where = reasons[0] if reasons else Reason("", "", "")
        denied = [
            Reason(where.consent, where.provision, f"label-not-permitted:{code}") for code in closed
        ]
        return Decision(Verdict.DENY, tuple(denied), tuple(closed), combining, tuple(errors))
    mattered = _chain_labels(chains, facts.labels) if facts.labels else []
    return Decision(
        Verdict.PERMIT, (*notes, *reasons), tuple(mattered), combining, tuple(errors)
    )


def _default_decision(
    req: _Request, facts: _Facts, policy: Policy, notes: Sequence[Reason], errors: Sequence[str]
) -> Decision:
    default = policy.default_decision
    reasons = (*notes, req.reason("", "", f"default-{default}"))
    if default == DENY:
        return Decision(Verdict.DENY, reasons, (), "default", tuple(errors))
    return _permit_decision([], req, facts, policy, "default", reasons, errors)


def _stamp(consent: CompiledConsent, denies: bool) -> datetime:
    """A consent's place in time for latest-wins.

    SECURITY: when the order of a deny and a permit cannot be told, the deny is taken as the
    later: a deny counts at the last instant its ``dateTime`` covers ("2024-05-01": the end of
    that day), a permit at the first; an undated deny counts as the latest of all, an undated
    permit as the earliest. Missing data never opens data."""
    if denies:
        return consent.date_time_last or (_LATEST if consent.date_time is None else consent.date_time)
    return consent.date_time or _EARLIEST


def _latest(applicable: Sequence[_Verdict]) -> list[_Verdict]:
    """The applicable consents with the latest ``dateTime`` (``_stamp``)."""
    def stamp(v: _Verdict) -> datetime:
        outcome = v.outcome
        return _stamp(v.consent, isinstance(outcome, _Outcome) and outcome.type == DENY)

    top = max(stamp(v) for v in applicable)
    return [v for v in applicable if stamp(v) == top]


SELF_ACCESS = Decision(Verdict.PERMIT, (Reason("", "", "self-access"),), combining="self-access")


def decide(
    consents: Sequence[CompiledConsent],
    resource: JSON,
    labels: frozenset[Label],
    scopes: frozenset[str],
    ctx: RequestContext,
    policy: Policy,
    *,
    known_refs: Mapping[str, frozenset[str]] = NO_REFS,
    patient: str | None = None,
) -> Decision:
    """Decide one resource against ONE patient's consents.

    ``patient`` (``Patient/<id>``), when given, enables self access. ``known_refs`` maps
    other resources of the same response to the references each makes (for ``related``).
    Deny-overrides stops at the first deny and reports only that reason.
    """
    if patient is not None and policy.patient_self_access and ctx.actor.reference == patient:
        return SELF_ACCESS
    req = _request_of(ctx, policy.default_decision)
    facts = _Facts(resource, labels, scopes, known_refs)
    return _combine(consents, req, facts, policy)


def _combine(
    consents: Sequence[CompiledConsent], req: _Request, facts: _Facts, policy: Policy
) -> Decision:
    skipped: list[_Verdict] = []
    errors: list[str] = []
    applicable: list[_Verdict] = []
    deny_overrides = policy.combining != LATEST_WINS
    for consent in consents:
        verdict = _decide_consent(consent, req, facts, policy)
        if verdict.malformed:
            errors.extend(f"{consent.id}: {d}" for d in consent.defects)
        if verdict.skip is not None:
            skipped.append(verdict)
            continue
        outcome = verdict.outcome
        if deny_overrides and isinstance(outcome, _Outcome) and outcome.type == DENY:
            return _deny_decision(verdict, req, facts, DENY_OVERRIDES)
        applicable.append(verdict)
    if not applicable:
        # Only a default decision explains itself by why each consent did not apply.
        notes = [req.reason(v.consent.id, *v.skip) for v in skipped if v.skip is not None]
        return _default_decision(req, facts, policy, notes, errors)
    if deny_overrides:
        return _permit_decision(applicable, req, facts, policy, DENY_OVERRIDES, (), errors)
    latest = _latest(applicable)
    for verdict in latest:
        outcome = verdict.outcome
        if isinstance(outcome, _Outcome) and outcome.type == DENY:
            return _deny_decision(verdict, req, facts, LATEST_WINS)
    return _permit_decision(latest, req, facts, policy, LATEST_WINS, (), errors)


# SECURITY: a resource of another server's patient (an absolute reference whose base is not this
# server's) is decided by no consent of this server's patient of the same id: its patient's
# consents cannot be read, so it closes (CONTRACT §5: missing data never opens data).
UNKNOWN_PATIENT_DENIES = Decision(Verdict.DENY, (Reason("", "", "unknown-patient"),), combining="fail-closed")
UNKNOWN_TYPE = Decision(Verdict.DENY, (Reason("", "", "unknown-resource-type"),), combining="fail-closed",
                        errors=("unknown-resource-type",))


# A Consent naming records withheld from a requester who is neither its patient nor a writer.
CONSENT_NAMES_RECORDS = Decision(Verdict.DENY, (Reason("", "", "consent-names-records"),), combining="consent-reader")
CONSENT_WRITER = Decision(Verdict.PERMIT, (Reason("", "", "consent-writer"),), combining="consent-writer")


def consent_reader(resource: JSON, patients: frozenset[str], ctx: RequestContext, policy: Policy) -> Decision | None:
    """Who reads a Consent beyond what consents decide; None when this rule does not decide
    ``resource``. ``consent.writer_roles``, who may rewrite any Consent, read every one (labels
    included: a consent naming HIV codes is labelled HIV). A Consent whose provisions name
    records (``provision.data``, at any depth) is read by no one else but its patient (with
    self-access).

    SECURITY: "withhold Condition/c1 from everyone" names the very record it hides and says why
    it is hidden; a requester the record is hidden from reads neither."""
    if resource.get("resourceType") != "Consent":
        return None
    if ctx.actor.role is not None and ctx.actor.role in policy.consent_writers:
        return CONSENT_WRITER
    if not any(provision.get("data") for provision in provisions(resource)):
        return None
    if policy.patient_self_access and ctx.actor.reference in patients:
        return None
    return CONSENT_NAMES_RECORDS


def decide_resource(
    consents_by_patient: Mapping[str, Sequence[CompiledConsent]],
    resource: JSON,
    labels: frozenset[Label],
    scopes: frozenset[str],
    ctx: RequestContext,
    policy: Policy,
    *,
    known_refs: Mapping[str, frozenset[str]] = NO_REFS,
    patients: frozenset[str] | None = None,
    medications: Sequence[JSON] = (),
    roles: Mapping[str, JSON | None] = NO_ROLES,
    ours: Bases = NO_BASES,
) -> Decision:
    """Decide one resource for every patient whose compartment it is in; each must permit.

    ``patients``, when given, are the patients the resource belongs to (the caller computed
    them, or a contained resource inherits its container's); else they are read from it.
    ``medications``: the Medication an order names by reference and its ingredients named by
    reference, whose codes are the order's. ``roles``: the PractitionerRoles read for the
    authors (``compartment.authors_of``). ``ours``: the bases under which absolute references
    name this server's resources (``fhir.local_reference``).

    Non-patient data (a type outside the Patient compartment) passes without a consent
    check. A compartment type naming no patient gets the default decision (with the
    sensitive-label rule). A patient whose consents are missing from the mapping was not
    looked up: deny (fail closed).
    """
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or rtype not in R4_RESOURCE_TYPES:
        # SECURITY: a type no table knows (or none) could be anyone's data: it closes.
        return UNKNOWN_TYPE
    if patients is None:
        patients = patients_of(resource, ours)
    if rtype == "Consent":
        withheld = consent_reader(resource, patients, ctx, policy)
        if withheld is not None:
            return withheld
    facts = _Facts(resource, labels, scopes, known_refs)
    facts.roles, facts.ours = roles, ours
    if medications:
        facts._codes = codes_of(resource, medications)
    return _decide_patients(consents_by_patient, facts, patients, ctx, policy)


def decide_facts(
    consents_by_patient: Mapping[str, Sequence[CompiledConsent]],
    facts: Facts,
    ctx: RequestContext,
    policy: Policy,
) -> Decision:
    """``decide_resource`` from a resource's facts record alone: the same decision whenever the
    record holds every fact the owners' consents read (``summary_reads``); a fact it was built
    without raises ``FactNotRead`` (a defect, never a guess)."""
    if facts.rtype not in R4_RESOURCE_TYPES:
        return UNKNOWN_TYPE
    return _decide_patients(consents_by_patient, _RecordFacts(facts), facts.owners, ctx, policy)


def _decide_patients(
    consents_by_patient: Mapping[str, Sequence[CompiledConsent]],
    facts: _Facts,
    patients: frozenset[str],
    ctx: RequestContext,
    policy: Policy,
) -> Decision:
    if not patients:
        if not is_patient_data(facts.rtype):
            return Decision(
                Verdict.PERMIT, (Reason("", "", "non-patient-data"),), combining="non-patient-data"
            )
        req = _request_of(ctx, policy.default_decision)
        return _default_decision(req, facts, policy, (req.reason("", "", "no-patient"),), ())
    decisions = []
    if UNKNOWN_PATIENT in patients:
        return UNKNOWN_PATIENT_DENIES
    for patient in sorted(patients):
        consents = consents_by_patient.get(patient)
        if consents is None:
            return Decision(
                Verdict.DENY,
                (Reason("", "", "consents-unavailable"),),
                combining="fail-closed",
                errors=(f"no consents looked up for {patient}",),
            )
        if policy.patient_self_access and ctx.actor.reference == patient:
            found = SELF_ACCESS
        else:
            found = _combine(consents, _request_of(ctx, policy.default_decision), facts, policy)
        if found.verdict is Verdict.DENY:
            return found
        decisions.append(found)
    if len(decisions) == 1:
        return decisions[0]
    return Decision(
        Verdict.PERMIT,
        tuple(r for d in decisions for r in d.reasons),
        tuple(sorted({label for d in decisions for label in d.labels})),
        "all-patients",
        tuple(e for d in decisions for e in d.errors),
    )


def _content_reads(node: Provision, found: set[str]) -> None:
    if node.class_scopes or node.class_bare:
        found.add("scopes")
    if node.codes is not None:
        found.add("codes")
    if node.authors is not None:
        found.add("authors")
    if node.data_period is not None:
        found.add("date")
    if node.data is not None:
        found.add("data")
    for child in node.children:
        _content_reads(child, found)


def summary_reads(consents: Sequence[CompiledConsent]) -> frozenset[str] | None:
    """What beyond type, patients, profiles and labels these consents read of a resource: a
    subset of {"scopes", "date", "codes", "authors", "data"} (``data``: its own ``Type/id``,
    the references it makes and its authors). A facts record holding these (``Facts``)
    decides like the resource itself (``decide_facts``), so resources whose records agree get
    one decision. None when no record decides: a consent has defects (the malformed-consent
    rules read the resource as it is).
    """
    found: set[str] = set()
    for consent in consents:
        if consent.defects:
            return None
        _content_reads(consent.root, found)
    return frozenset(found)


def summary_key(facts: Facts, reads: frozenset[str]) -> Hashable:
    """The memo key of a resource whose patients' consents read ``reads`` (``summary_reads``):
    two resources with equal keys get the same decision. ``facts`` is built for ``reads``
    (``core.judge.facts_of``: what is not read holds ``NOT_READ``), so it is the key itself."""
    key: Hashable = facts
    return key


def _boundaries(node: Provision | None, now: datetime, found: list[datetime]) -> None:
    if node is None:
        return
    period = node.period
    if period is not None:
        for edge in (period.start, period.end):
            if edge is not None and edge > now:
                found.append(edge)
    for child in node.children:
        _boundaries(child, now, found)


def next_boundary(consents: Sequence[CompiledConsent], now: datetime) -> datetime | None:
    """The first instant after ``now`` at which a period of these consents starts or ends:
    until then, every decision over them stands as it is now (None: none ever changes)."""
    found: list[datetime] = []
    moment = as_utc(now)
    for consent in consents:
        _boundaries(consent.root, moment, found)
        _boundaries(consent.scope_root, moment, found)
    return min(found, default=None)


def decide_with(
    consents: Sequence[CompiledConsent],
    resource: JSON,
    labels: frozenset[Label],
    scopes: frozenset[str],
    ctx: RequestContext,
    policy: Policy,
    *,
    known_refs: Mapping[str, frozenset[str]] = NO_REFS,
    ours: Bases = NO_BASES,
) -> Decision:
    """Decide a resource against a flat list of consents (``decide`` / ``POST /decision``).

    Each consent counts for the patient it names; consents of patients the resource does not
    belong to are ignored (a consent about another server's patient is about no patient here:
    compile it with the same ``ours``). ``known_refs``: as for ``decide``. ``ours``: as for
    ``decide_resource``, so that the answer is the proxy's.
    """
    by_patient: dict[str, list[CompiledConsent]] = {p: [] for p in patients_of(resource, ours)}
    for consent in consents:
        if consent.patient in by_patient:
            by_patient[consent.patient].append(consent)
    return decide_resource(by_patient, resource, labels, scopes, ctx, policy, known_refs=known_refs, ours=ours)


def _possible(node: Provision, req: _Request, policy: Policy) -> dict[str, Provision]:
    """Every type ``node``'s subtree can produce for this request, with a node giving it."""
    found: dict[str, Provision] = {}
    always = False
    for child in node.children:
        if _request_mismatch(child, req) is None:
            always = always or child.content_free
            for ptype, where in _possible(child, req, policy).items():
                found.setdefault(ptype, where)
    if not always:
        found.setdefault(_resolve(node, policy), node)
    return found


@dataclass(frozen=True, slots=True)
class _Pre:
    """One consent's pre-flight answer: skip, permit, deny, or maybe (content decides)."""

    consent: CompiledConsent
    kind: str
    reason: Reason


def _preflight_consent(consent: CompiledConsent, req: _Request, policy: Policy) -> _Pre:
    cid = consent.id
    if consent.defects:
        why = _certainly_inapplicable(consent, req, None, policy)
        if why is not None:
            return _Pre(consent, "skip", Reason(cid, "provision", why))
        rule = _malformed(consent)
        if not _can_deny(consent, policy):
            return _Pre(consent, "skip", Reason(cid, "provision", rule))
        kind = "maybe" if consent.root_sound and not consent.root.content_free else DENY
        return _Pre(consent, kind, Reason(cid, "provision", rule))
    why = req.gate(consent)
    if why is not None:
        return _Pre(consent, "skip", Reason(cid, "" if why in _CONSENT_LEVEL else "provision", why))
    root, exception = _tree(consent, policy)
    why = req.mismatch(root)
    if why is not None:
        if exception:
            base = _base_outcome(consent, policy)
            return _Pre(consent, base.type, Reason(cid, base.path, base.rule))
        return _Pre(consent, "skip", Reason(cid, "provision", why))
    if not root.content_free:
        return _Pre(consent, "maybe", Reason(cid, "provision", "depends-on-content"))
    found = _possible(root, req, policy)
    if len(found) > 1:
        return _Pre(consent, "maybe", Reason(cid, "provision", "depends-on-content"))
    ptype, where = next(iter(found.items()))
    return _Pre(consent, ptype, Reason(cid, where.path, where.rule or f"default-{ptype}"))


def _pre_stamp(answer: _Pre) -> datetime:
    """A pre-flight answer's place in time for latest-wins (``_stamp``): one that denies, or
    may deny, counts as a deny."""
    return _stamp(answer.consent, answer.kind != PERMIT)


def preflight(
    consents: Sequence[CompiledConsent],
    ctx: RequestContext,
    policy: Policy,
    *,
    patient: str | None = None,
) -> Decision:
    """Decide a request about one patient before any resource is seen.

    PERMIT only when no answer can depend on content (self access; or no label needs an
    explicit permit and the consents permit unconditionally). DENY when every resource
    would be denied (an applicable unconditional deny, or no applicable consent under a
    deny default). Otherwise FILTER. Every consent is evaluated, so the reasons are complete.
    """
    if patient is not None and policy.patient_self_access and ctx.actor.reference == patient:
        return Decision(Verdict.PERMIT, (Reason("", "", "self-access"),), combining="self-access")
    req = _request_of(ctx, policy.default_decision)
    answers = [_preflight_consent(c, req, policy) for c in consents]
    reasons = tuple(a.reason for a in answers)
    errors = tuple(f"{a.consent.id}: {d}" for a in answers for d in a.consent.defects)
    live = [a for a in answers if a.kind != "skip"]
    open_content = not policy.required_labels
    if not live:
        default = policy.default_decision
        every = (*reasons, Reason("", "", f"default-{default}"))
        if default == DENY:
            return Decision(Verdict.DENY, every, (), "default", errors)
        verdict = Verdict.PERMIT if open_content else Verdict.FILTER
        return Decision(verdict, every, (), "default", errors)
    combining = DENY_OVERRIDES
    if policy.combining == LATEST_WINS:
        combining = LATEST_WINS
        top = max(map(_pre_stamp, live))
        live = [a for a in live if _pre_stamp(a) == top]
    kinds = {a.kind for a in live}
    if DENY in kinds:
        verdict = Verdict.DENY
    elif "maybe" in kinds or not open_content:
        verdict = Verdict.FILTER
    else:
        verdict = Verdict.PERMIT
    return Decision(verdict, reasons, (), combining, errors)


def explain_json(decision: Decision) -> dict[str, Any]:
    """The decision as plain JSON for ``decide --json`` and the admin ``POST /decision``."""
    return {
        "decision": decision.verdict.value,
        "combining": decision.combining,
        "labels": list(decision.labels),
        "reasons": [
            {"consent": r.consent, "provision": r.provision, "rule": r.rule}
            for r in decision.reasons
        ],
        "errors": list(decision.errors),
    }
