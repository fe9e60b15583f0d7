"""Deciding one resource: its facts record, the consent judge over it, and the wrappers around it.

``decision.Facts`` is what decides a resource beyond the request and its patients' consents:
type, patients, labels, resource scopes, profiles, and, only when a consent reads them, its
clinical date, codes, ``Type/id``, references and authors (``facts_of``). ``ConsentJudge``
decides from the record alone (``decision.decide_facts``); two resources whose records agree
get one decision, remembered for the request and, through a ``DecisionCache``, across
requests with the same consents, requester and purpose until the next period boundary of
those consents (a record naming its own instance, for ``data`` conditions, is not shared).
Consents with defects decide each resource whole.

Around the judge: break-glass and emergency windows (``overriding``), a Binary decided as
what it stands for (``binaries_as_contexts``), consents that could not be read
(``unknown_denies``). Everything here is pure: time is an argument.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from gateway.core.breakglass import EmergencyWindow
from gateway.core.compartment import NO_ROLES, UNKNOWN_PATIENT, authors_of, clinical_date, profiles_of, references_of
from gateway.core.consent import CompiledConsent
from gateway.core.decision import (
    NOT_READ, WHOLE_RESOURCE_READS, Facts, Policy, codes_of, consent_reader, decide_facts, decide_resource, next_boundary,
    summary_key, summary_reads, version_of,
)
from gateway.core.enforce import Judge, judge_resource
from gateway.core.fhir import NO_BASES, Bases, JSON, resource_reference
from gateway.core.model import Decision, Label, Reason, RequestContext, Verdict
from gateway.core.labels import LabelIndex, may_stray
from gateway.core.references import Resolved

NO_SCOPES: frozenset[str] = frozenset()
# A resource whose deciding reference could not be read: unknown, so it closes (CONTRACT §5).
UNRESOLVED = Decision(Verdict.DENY, (Reason("", "", "unresolved-reference"),))
CONSENT_UNAVAILABLE = Decision(Verdict.DENY, (Reason("", "", "consent-unavailable"),), errors=("consent-unavailable",))
BREAK_GLASS = Decision(Verdict.PERMIT, (Reason("", "", "break-glass"),), combining="break-glass")

Labeler = Callable[[JSON], frozenset[Label]]


_NO_PROFILES: frozenset[str] = frozenset()


def labeler(
    index: LabelIndex, resolved: Resolved, source_labels: Mapping[str, frozenset[Label]] | None = None,
    seen: dict[int, frozenset[Label]] | None = None, keys: Mapping[int, Hashable] | None = None,
    strays: bool = True,
) -> Labeler:
    """Labels of a resource: its own (``index``), those of the Medication it names by reference
    (with the ingredients that one names by reference), those of a Medication's own ingredients
    named by reference, and those the consent source gives it (``source_labels``, by
    ``Type/id``); kept in ``seen`` by object identity when given. ``keys``: by object identity,
    the label keys of viewed resources or the content keys of resources parsed whole
    (core.view), under which equal texts are labelled once. ``strays``: whether the answer may
    hold extensions off the field plans (``labels.may_extend``); then a resource whose text may
    (``labels.may_stray``) also gets the labels of those (``LabelIndex.stray_labels``)."""
    own, keyed, stray = index.labels_remembered, index.labels_keyed, index.stray_labels
    # Nothing resolved: no ingredient is named by reference outside its Medication (a
    # contained one labels it as its own).
    follows = bool(resolved.targets)

    def labels_for(resource: JSON) -> frozenset[Label]:
        key = keys.get(id(resource)) if keys else None
        found = own(resource) if key is None else keyed(key, resource)
        if strays and may_stray(key):
            # SECURITY: an extension on a note or a body site codes the record as surely.
            strayed = stray(resource)
            if strayed:
                found = found | strayed
        if source_labels:
            extra = source_labels.get(resource_reference(resource) or "")
            if extra:
                found = found | extra
        if "medicationReference" in resource:
            for medication in resolved.medications_of(resource) or ():
                found = found | own(medication)
        elif follows and "ingredient" in resource and resource.get("resourceType") == "Medication":
            for ingredient in resolved.ingredients_of(resource) or ():
                found = found | own(ingredient)
        if seen is not None:
            seen[id(resource)] = found
        return found

    return labels_for




def facts_of(
    resource: JSON, owners: frozenset[str], labels: frozenset[Label], scopes: frozenset[str], reads: frozenset[str],
    medications: Sequence[JSON] = (), roles: Mapping[str, JSON | None] = NO_ROLES, ours: Bases = NO_BASES,
) -> Facts:
    """The facts record of ``resource`` with what ``reads`` (decision.summary_reads) needs; the
    facts not read hold ``NOT_READ``. ``medications``: the Medication an order names by
    reference and its ingredients named by reference, whose codes are the order's
    (``decision.codes_of``). ``roles``: the PractitionerRoles read, whose practitioner and
    organization are authors of what the role wrote (``compartment.authors_of``); ``ours``: this
    server's bases (``fhir.local_reference``)."""
    rtype = resource.get("resourceType")
    meta = resource.get("meta")
    whole = not reads.isdisjoint(WHOLE_RESOURCE_READS)
    data = whole and "data" in reads
    # tuple.__new__: a NamedTuple's own constructor is a Python call, paid per resource.
    return _new_facts(Facts, (
        rtype if type(rtype) is str else "",
        owners,
        labels,
        scopes if "scopes" in reads else NO_SCOPES,
        profiles_of(resource) if type(meta) is dict and "profile" in meta else _NO_PROFILES,
        clinical_date(resource) if "date" in reads else NOT_READ,
        resource_reference(resource) if data else NOT_READ,
        codes_of(resource, medications) if whole and "codes" in reads else NOT_READ,
        references_of(resource, ours) if data else NOT_READ,
        authors_of(resource, roles, ours) if whole and (data or "authors" in reads) else NOT_READ,
        version_of(resource) if data else NOT_READ,
    ))


_new_facts = tuple.__new__
_UNSET: frozenset[str] = frozenset({"\0unset"})


class DecisionCache:
    """Decisions across requests, keyed by the consents' versions, the request (requester with
    groups, organization and role, purpose, action) and the facts summary; each kept until the
    next period boundary of the consents it was decided on. Bounded: cleared when full."""

    def __init__(self, max_entries: int = 65_536) -> None:
        self.max_entries = max_entries
        self._entries: dict[Hashable, tuple[Decision, datetime | None]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, now: datetime) -> Decision | None:
        found = self._entries.get(key)
        if found is None:
            self.misses += 1
            return None
        decision, until = found
        if until is not None and now >= until:
            del self._entries[key]
            self.misses += 1
            return None
        self.hits += 1
        return decision

    def put(self, key: Hashable, decision: Decision, until: datetime | None) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (decision, until)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class ConsentJudge:
    """Decides resources of one request against the looked-up consents (a ``Judge``)."""

    def __init__(
        self,
        consents: Mapping[str, tuple[CompiledConsent, ...]],
        ctx: RequestContext,
        policy: Policy,
        labels_for: Labeler,
        scopes_for: Callable[[JSON], frozenset[str]],
        resolved: Resolved,
        *,
        versions: Mapping[str, tuple[Hashable, tuple[CompiledConsent, ...]]] | None = None,
        cache: DecisionCache | None = None,
    ) -> None:
        self.consents, self.ctx, self.policy = consents, ctx, policy
        self.labels_for, self.scopes_for, self.resolved = labels_for, scopes_for, resolved
        self._reads = {p: summary_reads(c) for p, c in consents.items()}
        self._owners_reads: dict[frozenset[str], frozenset[str] | None] = {}
        self._memo: dict[Hashable, Decision] = {}
        # Across requests only with versioned consents: a version names one cache fill.
        self._cache = cache if versions is not None else None
        self._versions = versions or {}
        self._request = (ctx.actor, ctx.purpose, ctx.action, ctx.break_glass)
        self._until: dict[frozenset[str], datetime | None] = {}

    def reads(self, owners: frozenset[str]) -> frozenset[str] | None:
        """What the owners' consents read beyond the summary; None when no summary decides."""
        try:
            return self._owners_reads[owners]
        except KeyError:
            pass
        extra: set[str] | None = set()
        for patient in owners:
            more = self._reads.get(patient)
            if more is None:
                extra = None
                break
            extra |= more  # type: ignore[operator]
        found = self._owners_reads[owners] = frozenset(extra) if extra is not None else None
        return found

    def __call__(self, resource: JSON, owners: frozenset[str]) -> Decision:
        medications: tuple[JSON, ...] = ()
        if "medicationReference" in resource:
            # Its drug and the drug's ingredients are the order's codes, as much as an inline
            # medicationCodeableConcept (CONTRACT §5 ``code``; the labels follow them the same way).
            named = self.resolved.medications_of(resource)
            if named is None:
                return UNRESOLVED
            medications = named
        labels = self.labels_for(resource)
        if "provision" in resource or resource.get("resourceType") == "Subscription":
            # A Consent's (the only type with ``provision``) and a Subscription's readers
            withheld = consent_reader(resource, owners, self.ctx, self.policy)
            if withheld is not None:
                return withheld
        reads = self._owners_reads.get(owners, _UNSET)
        if reads is _UNSET:
            reads = self.reads(owners)
        if reads is None:
            return decide_resource(
                self.consents, resource, labels, self.scopes_for(resource), self.ctx, self.policy, patients=owners,
                medications=medications, roles=self.resolved.roles, ours=self.resolved.ours,
            )
        # Resource scopes matter only to consents whose class names one.
        scopes = self.scopes_for(resource) if "scopes" in reads else NO_SCOPES
        facts = facts_of(resource, owners, labels, scopes, reads, medications, self.resolved.roles, self.resolved.ours)
        key = summary_key(facts, reads)
        found = self._memo.get(key)
        if found is not None:
            return found
        # A record naming one instance ("data") decides that instance only: not shared.
        shared = self._shared_key(owners, key) if "data" not in reads else None
        if shared is not None and self._cache is not None:
            found = self._cache.get(shared, self.ctx.now)
        if found is None:
            found = decide_facts(self.consents, facts, self.ctx, self.policy)
            if shared is not None and self._cache is not None:
                self._cache.put(shared, found, self._boundary(owners))
        self._memo[key] = found
        return found

    def _shared_key(self, owners: frozenset[str], key: Hashable) -> Hashable | None:
        if self._cache is None:
            return None
        versions = []
        for patient in sorted(owners):
            found = self._versions.get(patient)
            # Shared only under the version of these very consents: not looked up (it fails
            # closed), unversioned, or replaced (a draft replayed by what-if) is never shared.
            if found is None or found[1] is not self.consents.get(patient):
                return None
            versions.append((patient, found[0]))
        return (tuple(versions), self._request, key)

    def _boundary(self, owners: frozenset[str]) -> datetime | None:
        try:
            return self._until[owners]
        except KeyError:
            pass
        bounds = [b for p in owners if (b := next_boundary(self.consents.get(p, ()), self.ctx.now)) is not None]
        found = self._until[owners] = min(bounds, default=None)
        return found


def labelling(judge: Judge, labels_for: Labeler) -> Judge:
    """``judge``, with every resource it decides labelled first by ``labels_for`` (which records
    them): for a judge that decides without labels."""
    return _Labelling(judge, labels_for)


class _Labelling:
    __slots__ = ("judge", "labels_for")

    def __init__(self, judge: Judge, labels_for: Labeler) -> None:
        self.judge, self.labels_for = judge, labels_for

    def __call__(self, resource: JSON, owners: frozenset[str]) -> Decision:
        self.labels_for(resource)
        return self.judge(resource, owners)


def unknown_denies(resource: JSON, owners: frozenset[str]) -> Decision:
    """Consents that could not be read decide nothing: count each resource as denied."""
    return CONSENT_UNAVAILABLE


@dataclass
class Emergency:
    """What an emergency override did in one request: the audit's raw material.

    ``reason`` is the break-glass reason when the request carried the header; without it,
    only the actor's open emergency windows can override a denial.
    """

    reason: str | None
    windows: Mapping[str, EmergencyWindow] = field(default_factory=dict)
    returned: list[tuple[str, bool]] = field(default_factory=list)  # (reference, consent would deny)
    patients: set[str] = field(default_factory=set)
    opened: dict[str, set[Label]] = field(default_factory=dict)  # patient -> sensitive labels opened
    used: set[str] = field(default_factory=set)  # emergency consents that granted access
    consents_unknown: bool = False  # break-glass served while the consents could not be read

    @property
    def audited(self) -> bool:
        return self.reason is not None or bool(self.used)


def overriding(judge: Judge, emergency: Emergency, labels_for: Labeler, sensitive: frozenset[str]) -> Judge:
    """Wrap ``judge`` so break-glass (or an open emergency window) overrides denials; never
    remembered across requests (the audit records every resource it returns)."""

    def wrapped(resource: JSON, owners: frozenset[str]) -> Decision:
        decision = judge(resource, owners)
        windowed = [emergency.windows[p] for p in owners if p in emergency.windows]
        denied = decision.verdict is Verdict.DENY
        if denied:
            opened = {label for label in labels_for(resource) if label.code in sensitive}
            codes = {label.code for label in opened}
            covered = bool(owners) and len(windowed) == len(owners) and all(codes <= w.labels for w in windowed)
            if emergency.reason is None and not covered:
                return decision
            for patient in owners:
                if patient != UNKNOWN_PATIENT:  # another server's patient: no one to name
                    emergency.opened.setdefault(patient, set()).update(opened)
            decision = BREAK_GLASS
        if emergency.reason is None:
            emergency.used.update(w.consent for w in windowed)
        if emergency.reason is not None or windowed:
            ref = resource_reference(resource)
            if ref:
                emergency.returned.append((ref, denied))
            emergency.patients.update(p for p in owners if p != UNKNOWN_PATIENT)
        return decision

    return wrapped


def binaries_as_contexts(judge: Judge, resolved: Resolved) -> Judge:
    """A Binary is decided as the patient data its securityContext names (or, without one, as
    the documents that attach it), by the whole judge: scopes, consent and break-glass."""
    return _BinariesAsContexts(judge, resolved)


class _BinariesAsContexts:
    """``binaries_as_contexts``. A class, not a closure calling itself: a self-referencing
    closure keeps the judge, and with it every resource of the answer, in a reference cycle
    that only the cyclic collector frees (measured: the whole answer, every request)."""

    __slots__ = ("judge", "resolved")

    def __init__(self, judge: Judge, resolved: Resolved) -> None:
        self.judge, self.resolved = judge, resolved

    def __call__(self, resource: JSON, owners: frozenset[str]) -> Decision:
        if resource.get("resourceType") != "Binary":
            return self.judge(resource, owners)
        contexts = self.resolved.contexts_of(resource)
        if contexts is None:
            return UNRESOLVED
        decision = self.judge(resource, owners)
        for context in contexts:
            if decision.verdict is Verdict.DENY:
                break
            decision = judge_resource(context, self, ours=self.resolved.ours)
        return decision
