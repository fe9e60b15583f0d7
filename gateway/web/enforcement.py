"""Joins the consent store, the labeler and the decision engine for one request."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import ParamSpec, TypeVar
from datetime import datetime, timezone

from gateway.core.breakglass import EmergencyWindow
from gateway.core.consent import CompiledConsent
from gateway.core.decision import WHOLE_RESOURCE_READS, Policy, preflight, summary_reads
from gateway.core.enforce import Enforced, Enforcer, Judge, apply, owners_index, patients_in
from gateway.core.judge import (
    ConsentJudge, DecisionCache, Emergency, Labeler, binaries_as_contexts, labeler, labelling, overriding,
    unknown_denies,
)
from gateway.core.fhir import NO_BASES, Bases, JSON, normal_base
from gateway.core.purpose import lineage
from gateway.core.scopes import scoped
from gateway.core.labels import LabelIndex
from gateway.core.errors import ConsentUnavailable, GatewayError
from gateway.core.model import Actor, Label, RequestContext, Verdict, covered_codes
from gateway.core.compartment import patients_of
from gateway.core.view import ViewsInsufficient
from gateway.core.references import NOTHING_RESOLVED, Resolved
from gateway.sources.store import ConsentStore, PatientConsents
from gateway.web.middleware import log_line

decision_log = logging.getLogger("gateway.decision")


P = ParamSpec("P")
R = TypeVar("R")


def _fails_closed(deciding: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """SECURITY: an error while deciding (indexing the answer's patients, looking up consents,
    reading the roles that decide, labelling, judging, applying) sends nothing and is a 503
    (fail closed), like consents that cannot be read: never the answer as it stands, never half
    applied. Logged by its type only: a message or traceback may quote the record."""

    @functools.wraps(deciding)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await deciding(*args, **kwargs)
        except (GatewayError, ViewsInsufficient):
            raise
        except Exception as exc:
            decision_log.error("deciding failed: %s", type(exc).__name__)
            raise ConsentUnavailable("The consent decision could not be made.") from None

    return guarded
# Reads the PractitionerRoles an answer names as authors into what resolves it (web.resolve).
RoleResolver = Callable[[JSON, Resolved], Awaitable[Resolved]]


def policy_from(settings_consent: object, settings_sensitivity: object, labels: LabelIndex) -> Policy:
    """The decision Policy from the ``consent`` and ``sensitivity`` config sections."""
    required = getattr(settings_sensitivity, "explicit_consent_required")
    explicit: frozenset[str] | None
    if required == "all":
        explicit = None
    elif required == "none":
        explicit = frozenset()
    else:
        # A site that names ETH or SUD means their narrower labels (OPIOIDUD, ...) too.
        explicit = covered_codes(frozenset(required))
    return Policy(
        default_decision=getattr(settings_consent, "default_decision"),
        combining=getattr(settings_consent, "combining"),
        patient_self_access=getattr(settings_consent, "patient_self_access"),
        untyped_root=getattr(settings_consent, "untyped_root", "exception"),
        explicit_consent_required=explicit,
        sensitive=labels.sensitive,
        consent_writers=frozenset(getattr(settings_consent, "writer_roles", ())),
    )


@dataclass(frozen=True, slots=True)
class Looked:
    """One request's consents, looked up once, and its request context."""

    ctx: RequestContext
    consents: Mapping[str, tuple[CompiledConsent, ...]]
    windows: Mapping[str, EmergencyWindow] = field(default_factory=dict)  # open for this actor
    # labels the consent source gives records by Type/id (ClinikAPI documents' confidentiality)
    labels: Mapping[str, frozenset[Label]] = field(default_factory=dict)
    # each patient's consent-set version (one per cache fill) with the very consents it names:
    # decisions are shared under it (core.judge.ConsentJudge)
    versions: Mapping[str, tuple[Hashable, tuple[CompiledConsent, ...]]] | None = None


@dataclass
class Observed:
    """What one enforcement saw, for the privacy officer's records: each judged resource's
    labels (by object identity) and the consents looked up."""

    labels: dict[int, frozenset[Label]] = field(default_factory=dict)
    consents: Mapping[str, tuple[CompiledConsent, ...]] = field(default_factory=dict)
    owners: Mapping[int, frozenset[str]] = field(default_factory=dict)  # patients, by object identity


class ConsentEnforcement:
    """Per-request consent work: look up once, decide per resource, filter."""

    def __init__(
        self, store: ConsentStore, labels: LabelIndex, policy: Policy, decisions: DecisionCache | None = None,
        roles: RoleResolver | None = None, ours: Bases = NO_BASES,
    ) -> None:
        self.store = store
        self.labels = labels
        self.policy = policy
        # Decisions shared across requests (core.judge.DecisionCache); None: per request only.
        self.decisions = decisions if decisions is not None else DecisionCache()
        # None: PractitionerRoles are never read, so an author given as one is unknown.
        self.roles = roles
        # The bases under which an absolute reference names this FHIR server's resources (the
        # configured upstream and public bases, ``own_bases``): another server's are unknown.
        self.ours = ours

    def reads_roles(self, consents: Iterable[tuple[CompiledConsent, ...]]) -> bool:
        """Whether answers decided by ``consents`` need the PractitionerRoles they name as
        authors: when one reads authors (an actor AUT/INF/ENT, ``data``). Reading roles for
        every answer would cost each a round trip to the FHIR server."""
        return self.roles is not None and any(_reads_authors(summary_reads(c)) for c in consents)

    async def with_roles(self, body: JSON, resolved: Resolved) -> Resolved:
        """``resolved`` with the PractitionerRoles ``body`` names as authors (``reads_roles``)."""
        return await self.roles(body, resolved) if self.roles is not None else resolved

    async def look_up(self, patients: frozenset[str], actor: Actor, purpose: str, now: datetime | None = None) -> Looked:
        """Fetch every patient's consents in one go; add the actor's groups when consents name groups."""
        found: dict[str, PatientConsents] = await self.store.get(sorted(patients)) if patients else {}
        if any(pc.names_groups for pc in found.values()):
            actor = replace(actor, groups=await self.store.memberships(actor.reference))
        ctx = RequestContext(actor=actor, purpose=purpose, now=now or datetime.now(timezone.utc))
        # An emergency window is a grant for treatment: other purposes do not open it.
        windows = {
            p: w for p, pc in found.items() for w in pc.emergency
            if w.covers(actor) and w.open_at(ctx.now)
        } if "TREAT" in lineage(purpose) else {}
        source_labels = {ref: lb for pc in found.values() for ref, lb in pc.labels.items()}
        versions = {p: (pc.version, pc.consents) for p, pc in found.items()}
        return Looked(ctx, {p: pc.consents for p, pc in found.items()}, windows, source_labels, versions)

    def labeler(
        self, resolved: Resolved, source_labels: Mapping[str, frozenset[Label]] | None = None,
        seen: dict[int, frozenset[Label]] | None = None, keys: Mapping[int, Hashable] | None = None,
        strays: bool = True,
    ) -> Labeler:
        """The labels of a resource as this gateway's rules give them (``core.judge.labeler``)."""
        return labeler(self.labels, resolved, source_labels, seen, keys, strays)

    def judge(
        self, looked: Looked, resolved: Resolved = NOTHING_RESOLVED, seen: dict[int, frozenset[Label]] | None = None,
        keys: Mapping[int, Hashable] | None = None, strays: bool = True,
    ) -> ConsentJudge:
        """A per-resource decision function over the looked-up consents."""
        return ConsentJudge(
            looked.consents, looked.ctx, self.policy, self.labeler(resolved, looked.labels, seen, keys, strays),
            self.labels.scopes_for, resolved, versions=looked.versions, cache=self.decisions,
        )

    def unconditional(self, looked: Looked, patients: frozenset[str]) -> bool:
        """True when every patient named permits this requester whatever the content.

        A token whose scopes restrict anything never counts as unconditional: its answers are
        filtered by type and compartment, so totals and unfilterable requests stay closed.
        """
        grants = looked.ctx.actor.grants
        if grants is not None and not grants.unrestricted:
            return False
        return bool(patients) and all(
            preflight(looked.consents.get(p, ()), looked.ctx, self.policy, patient=p).verdict is Verdict.PERMIT
            for p in patients
        )

    def totals_kept(self, body: JSON, slot_confined: Mapping[int, frozenset[str]], looked: Looked) -> frozenset[int]:
        """The search pages in a batch answer's slots whose total stays as it would for the same
        search sent alone: the patients it named all permit this requester everything (by
        identity; whether the total counts only that page is judged in core.enforce)."""
        entries = body.get("entry")
        if body.get("resourceType") != "Bundle" or not isinstance(entries, list):
            return frozenset()
        kept = set()
        for index, patients in slot_confined.items():
            entry = entries[index] if index < len(entries) else None
            page = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(page, dict) and page.get("resourceType") == "Bundle" and self.unconditional(looked, patients):
                kept.add(id(page))
        return frozenset(kept)

    def overriding(
        self, judge: Judge, emergency: Emergency, resolved: Resolved = NOTHING_RESOLVED,
        source_labels: Mapping[str, frozenset[Label]] | None = None, strays: bool = True,
    ) -> Judge:
        """Wrap ``judge`` so break-glass (or an open emergency window) overrides denials."""
        return overriding(judge, emergency, self.labeler(resolved, source_labels, strays=strays), self.labels.sensitive)

    @_fails_closed
    async def enforce(
        self,
        body: JSON,
        actor: Actor,
        purpose: str,
        *,
        confined: frozenset[str] | None,
        break_glass: str | None = None,
        withheld_status: str = "403 Forbidden",
        resolved: Resolved = NOTHING_RESOLVED,
        observed: Observed | None = None,
        views: bool = False,
        label_keys: Mapping[int, Hashable] | None = None,
        content_keys: Mapping[int, Hashable] | None = None,
        strays: bool = True,
        slot_confined: Mapping[int, frozenset[str]] | None = None,
    ) -> tuple[Enforced, Emergency]:
        """Decide and filter a parsed body in place; an error while deciding is a 503
        (``_fails_closed``). ``strays``: whether the answer may hold extensions off the field
        plans (``core.labels.may_extend`` of its text; True when unknown).

        ``confined`` are the patients the request named; Bundle.total survives only when the
        requester may see everything of each of them; ``slot_confined`` are, by slot index of
        a batch answer, the patients each entry's search named, which decide the total of the
        page in that slot alike. With ``break_glass`` nothing is removed,
        but what consent would have denied is recorded for the audit.
        """
        binaries: list[JSON] = []
        index = owners_index(body, binaries, content_keys, self.ours)
        if resolved.targets:
            bind_contexts(binaries, index, resolved)
        patients = patients_in(index) | (confined or frozenset()).union(*(slot_confined or {}).values())
        unknown = False
        try:
            looked = await self.look_up(patients, actor, purpose)
        except ConsentUnavailable:
            if break_glass is None:
                raise
            # An emergency gets through even when consents cannot be read; every resource is
            # then audited as one consent would have denied (CONTRACT §7).
            looked = Looked(RequestContext(actor=actor, purpose=purpose, now=datetime.now(timezone.utc)), {})
            unknown = True
        if views and any(_reads_whole(summary_reads(c)) for c in looked.consents.values()):
            raise ViewsInsufficient("the consents read codes or references anywhere in a resource")
        if self.reads_roles(looked.consents.values()):
            resolved = await self.with_roles(body, resolved)
        # Bundle.total stays only where nothing could be hidden from it: every named patient permits
        # everything, and it counts only this page's entries (core.enforce.total_is_visible).
        # SECURITY: in 404 mode never: a patient's own search keeps a total of 0 when nothing
        # matches, and loses it when a record she shares with a patient who does not permit her
        # matched, which would tell a hidden record from a missing one.
        drop_total = withheld_status.startswith("404") or not (confined and self.unconditional(looked, confined))
        kept_totals = (frozenset() if withheld_status.startswith("404") or not slot_confined
                       else self.totals_kept(body, slot_confined, looked))
        emergency = Emergency(break_glass, looked.windows, consents_unknown=unknown)
        if observed is not None:
            observed.consents, observed.owners = looked.consents, index
        seen = observed.labels if observed is not None else None
        keys = label_keys or content_keys
        # Consents that could not be read decide nothing, but what is released under break-glass
        # is still labelled (DS4P) and accounted, so every resource is labelled on the way.
        judge: Judge = (labelling(unknown_denies, self.labeler(resolved, looked.labels, seen, keys, strays)) if unknown
                        else self.judge(looked, resolved, seen, keys, strays))
        if break_glass is not None or looked.windows:
            judge = self.overriding(judge, emergency, resolved, looked.labels, strays)
        if actor.grants is not None:
            # SECURITY: scopes decide first and break-glass never overrides them.
            judge = scoped(judge, actor.grants)
        if resolved.targets or resolved.attached or binaries:
            judge = binaries_as_contexts(judge, resolved)
        result = Enforcer(
            judge, drop_total=drop_total, index=index, withheld_status=withheld_status, ours=self.ours,
            kept_totals=kept_totals,
        ).decide(body)
        # The verdicts per entry, applied to the parsed answer (whose kept entries go out as the
        # upstream's bytes, core.view).
        apply(body, result)
        log_decisions(result)
        return result, emergency


def _reads_whole(reads: frozenset[str] | None) -> bool:
    """Whether consents reading ``reads`` read facts no view holds (codes, authors, references
    anywhere in a resource; None: the resource as it is)."""
    return reads is None or not reads.isdisjoint(WHOLE_RESOURCE_READS)


def _reads_authors(reads: frozenset[str] | None) -> bool:
    """Whether consents reading ``reads`` read authors (None: the resource as it is)."""
    return reads is None or "authors" in reads or "data" in reads


def bind_contexts(binaries: list[JSON], index: dict[int, frozenset[str]], resolved: Resolved) -> None:
    """A Binary belongs to the patients of the resource its securityContext names."""
    for resource in binaries:
        contexts = resolved.contexts_of(resource)
        if contexts:
            index[id(resource)] = frozenset().union(*(patients_of(c, resolved.ours) for c in contexts))


def own_bases(upstream_url: str, public_base_url: str | None, reference_bases: Iterable[str] = ()) -> Bases:
    """The bases under which an absolute reference names this FHIR server's resources: the
    configured upstream base, the configured public base and ``upstream.reference_bases``
    (never one derived from a request's Host header, which the client chooses)."""
    return frozenset(normal_base(u) for u in (upstream_url, public_base_url, *reference_bases) if u)


def log_decisions(result: Enforced) -> None:
    """Which consents and provisions hid something; never codes, labels or record ids."""
    if not (result.denied or result.removed):
        return
    reasons = result.deciding + [r for _, d in result.removed for r in d.reasons]
    log_line(decision_log, "withheld", {
        "decision": result.header,
        "reasons": sorted({f"{r.consent} {r.provision} {r.rule.split(':', 1)[0]}".strip() for r in reasons}),
    })


__all__ = ["ConsentEnforcement", "Emergency", "Looked", "Observed", "policy_from"]
