"""Compile a FHIR R4 Consent into a provision tree the decision engine evaluates.

``compile_consent`` runs once per consent when it enters the cache; deciding a resource
then reads frozen sets and tuples, never the consent's JSON.

How the root reads (CONTRACT §5): a root with ``type`` applies to the whole consent (IHE
PCF); a root without ``type`` and without conditions (besides ``period`` and custodian
actors) leaves the base policy (``policyRule``); a root without ``type`` WITH conditions is
ambiguous: R4's text makes it an exception to the base policy (``root``, type the opposite of
the base), sites whose producers mean "applies to" read it as a scope (``scope_root``, type
the base). Both trees are compiled; the engine picks one by ``Policy.untyped_root``.

Actor roles: recipient roles (none, PRCP, IRCP, DELEGATEE, GRANTEE, any other) name the
requester; ``CST`` (custodian) names who holds the data and is no condition; ``AUT``,
``INF``, ``ENT`` name the resource's author (``authors``).

References (``patient``, actors, ``data``) name this FHIR server's resources when relative or
under one of its bases (``ours``, ``fhir.local_reference``); one under any other base names
another server's resource and compiles to ``FOREIGN``: it is no patient of this server (the
consent is about no one here), and as an actor or ``data`` it is unknown: it matches on a deny
provision and never on a permit one (CONTRACT §5: missing data never opens data).

Compiling never raises. Whatever cannot be read (a missing status, a provision of the
wrong shape, an unparseable date, an unknown code) is recorded in ``defects``; the
condition it belonged to is left out and the decision engine decides what a defective
consent means (skipped only when it could never deny, else deny naming the defect).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

from gateway.core.compartment import DateRange, parse_date_range, parse_period
from gateway.core.fhir import NO_BASES, Bases, JSON, iter_codings, local_reference, reference_version, relative_reference
from gateway.core.labels import code_spellings
from gateway.core.model import (
    RESOURCE_SCOPE_SYSTEM,
    RESOURCE_TYPES_SYSTEM,
    V3_ACT_CODE,
    Label,
)

PERMIT = "permit"
DENY = "deny"
# The type of an exception to a base policy that is itself the operator's default decision.
NOT_DEFAULT = "not-default"

CONSENT_STATUSES = frozenset(
    {"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"}
)
CONSENT_ACTIONS = frozenset({"collect", "access", "use", "disclose", "correct"})
DATA_MEANINGS = frozenset({"instance", "related", "dependents", "authoredby"})
# policyRule codes (v3 ActCode) that fix the base decision when the root has no type.
POLICY_RULE_TYPES: dict[str, str] = {
    "OPTIN": PERMIT,
    "OPTINR": PERMIT,
    "OPTOUT": DENY,
    "OPTOUTE": DENY,
}
# Consent.policy / policyRule URIs that mean the same as the ActCode.
POLICY_URIS: dict[str, str] = {
    "http://hl7.org/fhir/ConsentPolicy/opt-in": "OPTIN",
    "http://hl7.org/fhir/ConsentPolicy/opt-out": "OPTOUT",
}
POLICY_RULE_REASONS = {PERMIT: "opt-in", DENY: "opt-out"}
# Rule name of an untyped root read as an exception to the base policy (R4's text).
ROOT_EXCEPTION = "root-exception"
CUSTODIAN_ROLES = frozenset({"CST"})
AUTHOR_ROLES = frozenset({"AUT", "INF", "ENT"})
# How a root provision reads (CompiledConsent.reading).
TYPED = "typed"          # root has a type: it applies to the whole consent (IHE PCF)
BASE = "base"            # untyped, no conditions: the base policy decides, nested rules refine
AMBIGUOUS = "ambiguous"  # untyped with conditions: exception (R4) or scope, per the operator
NO_RELATED: Mapping[str, frozenset[str]] = MappingProxyType({})
# One shared empty set: every compiled provision keeps its absent references for free.
NO_REFS: frozenset[str] = frozenset()
# Provision modifierExtension: every recipient actor must match the requester (the requester
# is that person, acting for that organization, in that group), not any one of them. Vendor
# scopes such as HealtheIntent's provisionScope (unit AND group AND person) need it.
ACTORS_ALL_OF = "urn:consent-gateway:extension:actors-all-of"
KNOWN_MODIFIERS = frozenset({ACTORS_ALL_OF})
# What a reference to another FHIR server's resource (an absolute reference whose base is not
# this server's) compiles to: no patient, requester, author or record of this server, so the
# condition naming it is unknown. No reference is spelled this way.
FOREIGN = "\0foreign-reference"
# The smallest step between two instants (a DateRange's end is exclusive).
_INSTANT = timedelta(microseconds=1)


def opposite(ptype: str) -> str:
    """The other decision; the opposite of the default decision ("") is NOT_DEFAULT."""
    return {PERMIT: DENY, DENY: PERMIT, "": NOT_DEFAULT, NOT_DEFAULT: ""}[ptype]


@dataclass(frozen=True, slots=True)
class DataRef:
    """One ``provision.data`` entry: how (``meaning``) the consent covers ``reference``."""

    meaning: str
    reference: str
    # The version a reference names (``Type/id/_history/N``): a permit of that instance opens
    # that version only; a deny closes every version.
    version: str | None = None


# eq=False: identity hashing, so the engine can memoise per provision cheaply.
@dataclass(frozen=True, slots=True, eq=False)
class Provision:
    """One compiled provision; a condition of None is absent and matches everything.

    ``type`` is the effective type: declared here, else inherited from the
    parent, else (at the root) from the reading of the root; "" means the policy's default
    decision and NOT_DEFAULT its opposite. ``rule`` names where that type came from
    (``permit``, ``deny``, ``opt-in``, ``opt-out``, ``root-exception``, or "" for the
    default). ``actors`` are recipient actors (the requester); ``authors`` the AUT/INF/ENT
    actors (the resource's author). Confidentiality codes in ``labels`` are a high-water
    mark: ``confidentiality`` is the highest rank named (-1: none).
    """

    path: str
    type: str
    rule: str
    period: DateRange | None = None
    actors: frozenset[str] | None = None
    authors: frozenset[str] | None = None
    custodians: frozenset[str] = NO_REFS  # CST actors: named, never a condition
    actors_all: bool = False  # every recipient actor must match (ACTORS_ALL_OF), not any
    purposes: frozenset[str] | None = None
    actions: frozenset[str] | None = None
    class_types: frozenset[str] = frozenset()
    class_profiles: frozenset[str] = frozenset()
    class_scopes: frozenset[str] = frozenset()
    class_bare: frozenset[str] = frozenset()  # codes without a system: any of the three
    class_other: bool = False  # class codings from systems we cannot evaluate
    has_class: bool = False
    codes: frozenset[tuple[str, str]] | None = None
    labels: tuple[Label, ...] | None = None
    confidentiality: int = -1
    other_labels: tuple[Label, ...] = ()
    data_period: DateRange | None = None
    data: tuple[DataRef, ...] | None = None
    children: tuple[Provision, ...] = ()

    @property
    def content_free(self) -> bool:
        """No condition here reads the resource (only actor, purpose, action, period)."""
        return not (
            self.has_class
            or self.authors is not None
            or self.codes is not None
            or self.labels is not None
            or self.data_period is not None
            or self.data is not None
        )

    @property
    def has_conditions(self) -> bool:
        """Some condition besides ``period`` (custodian actors are none)."""
        return not self.content_free or any(
            c is not None for c in (self.actors, self.purposes, self.actions)
        )

    def names_label(self, label: Label) -> bool:
        """This provision's securityLabel condition names ``label`` (confidentiality: at or
        below the high-water mark it names)."""
        if self.labels is None:
            return False
        rank = label.confidentiality_rank
        if rank is not None and self.confidentiality >= 0:
            return rank <= self.confidentiality
        return any(own.matches(label) for own in self.other_labels)


@dataclass(frozen=True, slots=True, eq=False)
class CompiledConsent:
    """A Consent ready to decide with; ``defects`` lists what could not be read."""

    id: str
    patient: str | None
    status: str | None
    scopes: frozenset[str]
    date_time: datetime | None  # the first instant ``dateTime`` covers
    policy_rule: str
    root: Provision
    defects: tuple[str, ...] = ()
    types: frozenset[str] = frozenset()  # every effective type either tree can give
    root_sound: bool = True  # the root's own conditions compiled without a defect
    scope_root: Provision | None = None  # the AMBIGUOUS root read as a scope
    # references each ``related`` data target makes, read from the FHIR server once per
    # consent version; a target missing here is unknown (unless in the same answer)
    related: Mapping[str, frozenset[str]] = field(default_factory=lambda: NO_RELATED)
    version: str | None = None  # meta.versionId, for the decision log
    # the last instant ``dateTime`` covers at its precision ("2024-05-01": the whole day)
    date_time_last: datetime | None = None

    @property
    def period(self) -> DateRange | None:
        """The root ``provision.period``: the consent is in force only within it."""
        return self.root.period

    @property
    def base(self) -> str:
        """The base policy's type: PERMIT, DENY or "" (the default decision)."""
        return POLICY_RULE_TYPES.get(self.policy_rule, "")

    @property
    def reading(self) -> str:
        """TYPED, BASE or AMBIGUOUS (see the module docstring)."""
        if self.scope_root is not None:
            return AMBIGUOUS
        return TYPED if self.root.rule in (PERMIT, DENY) else BASE

    @property
    def ambiguous(self) -> bool:
        """An untyped root with conditions: producers should add ``provision.type``."""
        return self.reading == AMBIGUOUS

    @property
    def related_targets(self) -> frozenset[str]:
        """Every ``data.meaning = related`` reference in the tree."""
        found: set[str] = set()
        stack = [self.root]
        while stack:
            node = stack.pop()
            found.update(d.reference for d in node.data or () if d.meaning == "related" and d.reference != FOREIGN)
            stack.extend(node.children)
        return frozenset(found)


class _Compiler:
    """Walks one consent once, collecting defects instead of raising."""

    def __init__(self, ours: Bases = NO_BASES) -> None:
        self.ours = ours
        self.defects: list[str] = []
        self.types: set[str] = set()
        self.root_sound = True

    def defect(self, text: str) -> None:
        self.defects.append(text)

    def reference(self, ref: str) -> str:
        """``Type/id`` of a reference to this server's resource; FOREIGN for another server's."""
        # SECURITY: another server's Practitioner/pr1 or Observation/o1 is not this server's.
        return local_reference(ref, self.ours) or FOREIGN

    def entries(self, node: JSON, key: str, path: str) -> list[JSON] | None:
        """A list-of-objects element; absent or empty gives None, a bad shape a defect."""
        value = node.get(key)
        if value is None or value == []:
            return None
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.defect(f"bad-shape:{path}.{key}")
            return None
        return value

    def provision(self, node: Any, path: str, inherited: str, rule: str) -> Provision:
        if not isinstance(node, dict):
            self.defect(f"bad-shape:{path}")
            self.root_sound = self.root_sound and path != "provision"
            self.types.add(DENY)
            return Provision(path=path, type=DENY, rule=DENY)
        ptype, rule = self.provision_type(node, path, inherited, rule)
        self.types.add(ptype)
        before = len(self.defects)
        fields: dict[str, Any] = {}
        if "period" in node:
            fields["period"] = self.period(node["period"], f"{path}.period")
        fields["actors"], fields["authors"], fields["custodians"] = self.actors(node, path)
        fields["actors_all"] = self.modifiers(node, path)
        fields["purposes"] = self.purposes(node, path)
        fields["actions"] = self.actions(node, path)
        fields.update(self.classes(node, path))
        fields["codes"] = self.codes(node, path)
        fields.update(self.labels(node, path))
        if "dataPeriod" in node:
            fields["data_period"] = self.period(node["dataPeriod"], f"{path}.dataPeriod")
        fields["data"] = self.data(node, path)
        if path == "provision" and len(self.defects) > before:
            self.root_sound = False
        children = node.get("provision")
        kids: tuple[Provision, ...] = ()
        if children is not None:
            if isinstance(children, list):
                kids = tuple(
                    self.provision(child, f"{path}.provision[{i}]", ptype, rule)
                    for i, child in enumerate(children)
                )
            else:
                # SECURITY: unreadable nested provisions might have been denials.
                self.defect(f"bad-shape:{path}.provision")
                self.types.add(DENY)
        return Provision(
            path=path, type=ptype, rule=rule, children=kids, **fields
        )

    def provision_type(self, node: JSON, path: str, inherited: str, rule: str) -> tuple[str, str]:
        declared = node.get("type")
        if declared is None:
            return inherited, rule
        if declared in (PERMIT, DENY):
            return declared, declared
        # SECURITY: an unreadable type might have meant deny; treat it as one.
        self.defect(f"unknown-type:{path}.type")
        return DENY, DENY

    def period(self, value: Any, path: str) -> DateRange | None:
        found = parse_period(value)
        if found is None:
            self.defect(f"bad-date:{path}")
        return found

    def actors(
        self, node: JSON, path: str
    ) -> tuple[frozenset[str] | None, frozenset[str] | None, frozenset[str]]:
        """(recipient actors, author actors, custodians); custodians are no condition."""
        entries = self.entries(node, "actor", path)
        if entries is None:
            return None, None, NO_REFS
        recipients: set[str] = set()
        authors: set[str] = set()
        custodians: set[str] = set()
        seen_recipient = seen_author = False
        for i, entry in enumerate(entries):
            ref = entry.get("reference")
            target = ref.get("reference") if isinstance(ref, dict) else None
            if not (isinstance(target, str) and target):
                self.defect(f"bad-actor:{path}.actor[{i}]")
                seen_recipient = True  # SECURITY: an unreadable actor still restricts
                continue
            roles = {c.get("code") for c in iter_codings(entry.get("role"))}
            if roles & CUSTODIAN_ROLES:
                custodians.add(self.reference(target))
                continue
            if roles & AUTHOR_ROLES:
                seen_author = True
                authors.add(self.reference(target))
            else:
                seen_recipient = True
                recipients.add(self.reference(target))
        return (
            frozenset(recipients) if seen_recipient else None,
            frozenset(authors) if seen_author else None,
            _frozen(custodians),
        )

    def modifiers(self, node: JSON, path: str) -> bool:
        """True when the actors-all-of modifier is set; an unknown modifier is a defect."""
        entries = self.entries(node, "modifierExtension", path)
        all_of = False
        for entry in entries or ():
            url = entry.get("url")
            if url not in KNOWN_MODIFIERS:
                # SECURITY: a modifier changes the meaning; one we do not know cannot be ignored.
                self.defect(f"unknown-modifier:{path}.modifierExtension")
            elif entry.get("valueBoolean") is True:
                all_of = True
        return all_of

    def purposes(self, node: JSON, path: str) -> frozenset[str] | None:
        entries = self.entries(node, "purpose", path)
        if entries is None:
            return None
        codes = {e["code"] for e in entries if isinstance(e.get("code"), str)}
        if len(codes) < len(entries):
            self.defect(f"bad-code:{path}.purpose")
        return frozenset(codes)

    def actions(self, node: JSON, path: str) -> frozenset[str] | None:
        entries = self.entries(node, "action", path)
        if entries is None:
            return None
        codes = set()
        for coding in iter_codings(entries):
            code = coding.get("code")
            if code in CONSENT_ACTIONS:
                codes.add(code)
            else:
                self.defect(f"unknown-action:{path}.action:{code}")
        return frozenset(codes)

    def classes(self, node: JSON, path: str) -> dict[str, Any]:
        entries = self.entries(node, "class", path)
        if entries is None:
            return {}
        types, profiles, scopes, bare = set(), set(), set(), set()
        other = False
        for entry in entries:
            system, code = entry.get("system"), entry.get("code")
            if not isinstance(code, str):
                self.defect(f"bad-code:{path}.class")
            elif system == RESOURCE_TYPES_SYSTEM:
                types.add(code)
            elif system == RESOURCE_SCOPE_SYSTEM:
                scopes.add(code)
            elif system is None:
                bare.add(code)
            elif code.startswith(("http://", "https://", "urn:")):
                profiles.add(code)
            else:
                other = True
        # Profiles are canonical URLs; a coding may carry one under any system.
        return {
            "class_types": _frozen(types),
            "class_profiles": _frozen(profiles),
            "class_scopes": _frozen(scopes),
            "class_bare": _frozen(bare),
            "class_other": other,
            "has_class": True,
        }

    def codes(self, node: JSON, path: str) -> frozenset[tuple[str, str]] | None:
        entries = self.entries(node, "code", path)
        if entries is None:
            return None
        codes = set()
        for coding in iter_codings(entries):
            code, system = coding.get("code"), coding.get("system")
            if isinstance(code, str):
                codes.add((system if isinstance(system, str) else "", code))
        if not codes:
            self.defect(f"bad-code:{path}.code")
        # The code as the resource's codes are read too, whichever URI or spelling each uses.
        return code_spellings(frozenset(codes))

    def labels(self, node: JSON, path: str) -> dict[str, Any]:
        entries = self.entries(node, "securityLabel", path)
        if entries is None:
            return {}
        labels = []
        for entry in entries:
            code, system = entry.get("code"), entry.get("system")
            if isinstance(code, str):
                labels.append(Label(system if isinstance(system, str) else "", code))
            else:
                self.defect(f"bad-code:{path}.securityLabel")
        ranks = [r for r in (label.confidentiality_rank for label in labels) if r is not None]
        labels_tuple = tuple(labels)
        return {
            "labels": labels_tuple,
            "confidentiality": max(ranks, default=-1),
            "other_labels": labels_tuple if not ranks else tuple(
                lb for lb in labels if lb.confidentiality_rank is None
            ),
        }

    def data(self, node: JSON, path: str) -> tuple[DataRef, ...] | None:
        entries = self.entries(node, "data", path)
        if entries is None:
            return None
        refs = []
        for i, entry in enumerate(entries):
            meaning = entry.get("meaning")
            ref = entry.get("reference")
            target = ref.get("reference") if isinstance(ref, dict) else None
            if meaning not in DATA_MEANINGS:
                self.defect(f"unknown-data-meaning:{path}.data[{i}]")
            elif not isinstance(target, str) or "/" not in relative_reference(target):
                # SECURITY: a reference naming no ``Type/id`` (a fragment into the Consent, a
                # bundle-local urn, a bare type) would match no record and release what it hides.
                self.defect(f"bad-reference:{path}.data[{i}]")
            else:
                local = self.reference(target)
                refs.append(DataRef(meaning, local, reference_version(target) if local != FOREIGN else None))
        return tuple(refs)


def _frozen(items: set[str]) -> frozenset[str]:
    """``items`` frozen; empty ones share NO_REFS (an empty frozenset costs 216 bytes)."""
    return frozenset(items) if items else NO_REFS


def _policy_rule(consent: JSON) -> tuple[str, bool]:
    """(the v3 ActCode policyRule code: OPTIN, OPTOUT, ..., or "" when there is none; whether
    the consent names both a permitting and a denying base).

    The policy URIs ``http://hl7.org/fhir/ConsentPolicy/opt-in`` / ``opt-out`` (as a
    policyRule coding or a ``policy.uri``) count as OPTIN / OPTOUT. A known code counts
    wherever it stands among the policyRule's codings (a local code may come first); only
    when none is known does the first v3 (or system-less) code name the rule (its base is the
    default decision).
    """
    codings = list(iter_codings(consent.get("policyRule")))
    known: list[str] = []
    fallback = ""
    for coding in codings:
        code = coding.get("code")
        if not isinstance(code, str):
            continue
        if code in POLICY_URIS:
            known.append(POLICY_URIS[code])
        elif coding.get("system") in (V3_ACT_CODE, None):
            if code in POLICY_RULE_TYPES:
                known.append(code)
            elif not fallback:
                fallback = code
    policies = consent.get("policy")
    for policy in policies if isinstance(policies, list) else ():
        uri = policy.get("uri") if isinstance(policy, dict) else None
        if isinstance(uri, str) and uri in POLICY_URIS:
            known.append(POLICY_URIS[uri])
    bases = {POLICY_RULE_TYPES[code] for code in known}
    if len(bases) > 1:
        # SECURITY: opt-in and opt-out at once cannot be read either way; the consent is
        # defective (a deny wherever it could deny), its base read as the deny.
        return next(code for code in known if POLICY_RULE_TYPES[code] == DENY), True
    return (known[0] if known else fallback), False


def _retyped(node: Provision, ptype: str, rule: str, inherited: str) -> Provision:
    """``node`` (and its untyped descendants) with the type it inherits set to ``ptype``.

    Under an untyped root, a provision without its own type carries the root's rule
    ``inherited`` (a policyRule reason); a declared one carries ``permit`` or ``deny``.
    """
    kids = tuple(
        _retyped(c, ptype, rule, inherited) if c.rule == inherited else c for c in node.children
    )
    return replace(node, type=ptype, rule=rule, children=kids)


def _readings(
    root: Provision, raw_root: Any, base: str
) -> tuple[Provision, Provision | None, frozenset[str]]:
    """(root, scope_root, types the readings add): an ambiguous root gets both readings."""
    if (isinstance(raw_root, dict) and "type" in raw_root) or not root.has_conditions:
        return root, None, frozenset()
    exception = _retyped(root, opposite(base), ROOT_EXCEPTION, root.rule)
    # The base decides whenever the exception does not match.
    return exception, root, frozenset({opposite(base), base})


def _scopes(consent: JSON) -> frozenset[str]:
    return _scope_set(tuple(sorted({
        str(c["code"]) for c in iter_codings(consent.get("scope")) if isinstance(c.get("code"), str)
    })))


@lru_cache(maxsize=256)
def _scope_set(codes: tuple[str, ...]) -> frozenset[str]:
    """One frozenset per set of scope codes, shared by every consent naming it (nearly all name
    ``patient-privacy``; a frozenset costs 216 bytes in each of 100,000 cached patients)."""
    return frozenset(codes)


def compile_consent(consent: JSON, ours: Bases = NO_BASES) -> CompiledConsent:
    """Compile one Consent resource; never raises, records every defect found.

    The base is the policyRule's type (OPTIN/OPTINR permit, OPTOUT/OPTOUTE deny), else ""
    (the policy's default decision). The root type is ``provision.type``; an untyped root
    takes the base, or (AMBIGUOUS, in ``root``) the opposite of the base. Nested provisions
    without a type inherit their parent's. ``ours``: the bases under which an absolute reference
    names this server's resources; another server's compile to FOREIGN (module docstring).
    """
    compiler = _Compiler(ours)
    if not isinstance(consent, dict):
        compiler.defect("bad-shape:consent")
        compiler.types.add(DENY)
        consent = {}
    rid = consent.get("id")
    cid = f"Consent/{rid}" if isinstance(rid, str) and rid else "Consent/?"
    status = consent.get("status")
    if status is None:
        compiler.defect("missing-status")
    elif status not in CONSENT_STATUSES:
        compiler.defect("unknown-status")
    scopes = _scopes(consent)
    if not scopes:
        compiler.defect("missing-scope")
    date_time = date_time_last = None
    if "dateTime" in consent:
        stamp = parse_date_range(consent["dateTime"])
        if stamp is None:
            compiler.defect("bad-date:dateTime")
        else:
            date_time = stamp.start
            date_time_last = stamp.end - _INSTANT if stamp.end is not None else None
    policy_rule, conflicting = _policy_rule(consent)
    if conflicting:
        compiler.defect("conflicting-policy-rule")
    base = POLICY_RULE_TYPES.get(policy_rule, "")
    raw_root = consent.get("provision")
    if raw_root is None:
        raw_root = {}
    root = compiler.provision(raw_root, "provision", base, POLICY_RULE_REASONS.get(base, ""))
    root, scope_root, more_types = _readings(root, raw_root, base)
    compiler.types.update(more_types)
    patient = consent.get("patient")
    patient_ref = patient.get("reference") if isinstance(patient, dict) else None
    return CompiledConsent(
        id=cid,
        patient=compiler.reference(patient_ref) if isinstance(patient_ref, str) else None,
        status=status if isinstance(status, str) else None,
        scopes=scopes,
        date_time=date_time,
        policy_rule=policy_rule,
        root=root,
        defects=tuple(compiler.defects),
        types=frozenset(compiler.types),
        root_sound=compiler.root_sound,
        scope_root=scope_root,
        version=_version_of(consent),
        date_time_last=date_time_last,
    )


def _version_of(consent: JSON) -> str | None:
    meta = consent.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return version if isinstance(version, str) else None
