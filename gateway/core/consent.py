"""Compile a FHIR R4 Consent into a provision tree the decision engine evaluates.

``compile_consent`` runs once per consent when it enters the cache; deciding a resource
then reads frozen sets and tuples, never the consent's JSON.

Compiling never raises. Whatever cannot be read (a missing status, a provision of the
wrong shape, an unparseable date, an unknown code) is recorded in ``defects``; the
condition it belonged to is left out and the decision engine decides what a defective
consent means (skipped only when it could never deny, else deny naming the defect).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.core.compartment import DateRange, parse_date_range, parse_period
from gateway.core.fhir import JSON, iter_codings, relative_reference
from gateway.core.model import (
    RESOURCE_SCOPE_SYSTEM,
    RESOURCE_TYPES_SYSTEM,
    V3_ACT_CODE,
    Label,
)

PERMIT = "permit"
DENY = "deny"

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
_POLICY_RULE_REASON = {PERMIT: "opt-in", DENY: "opt-out"}


@dataclass(frozen=True, slots=True)
class DataRef:
    """One ``provision.data`` entry: how (``meaning``) the consent covers ``reference``."""

    meaning: str
    reference: str


# eq=False: identity hashing, so the engine can memoise per provision cheaply.
@dataclass(frozen=True, slots=True, eq=False)
class Provision:
    """One compiled provision; a condition of None is absent and matches everything.

    ``type`` is the effective type: declared here, else inherited from the parent, else
    (at the root) the policyRule's; "" means the policy's default decision decides.
    ``rule`` names where that type came from (``permit``, ``deny``, ``opt-in``,
    ``opt-out``, or "" for the default).
    """

    path: str
    type: str
    rule: str
    period: DateRange | None = None
    actors: frozenset[str] | None = None
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
    data_period: DateRange | None = None
    data: tuple[DataRef, ...] | None = None
    children: tuple[Provision, ...] = ()

    @property
    def content_free(self) -> bool:
        """No condition here reads the resource (only actor, purpose, action, period)."""
        return not (
            self.has_class
            or self.codes is not None
            or self.labels is not None
            or self.data_period is not None
            or self.data is not None
        )

    def names_label(self, label: Label) -> bool:
        """This provision's securityLabel condition names ``label``."""
        return self.labels is not None and any(own.matches(label) for own in self.labels)


@dataclass(frozen=True, slots=True, eq=False)
class CompiledConsent:
    """A Consent ready to decide with; ``defects`` lists what could not be read."""

    id: str
    patient: str | None
    status: str | None
    scopes: frozenset[str]
    date_time: datetime | None
    policy_rule: str
    root: Provision
    defects: tuple[str, ...] = ()
    types: frozenset[str] = frozenset()  # every effective type in the tree
    root_sound: bool = True  # the root's own conditions compiled without a defect
    version: str | None = None  # meta.versionId, for the decision log

    @property
    def period(self) -> DateRange | None:
        """The root ``provision.period``: the consent applies only within it."""
        return self.root.period


class _Compiler:
    """Walks one consent once, collecting defects instead of raising."""

    def __init__(self) -> None:
        self.defects: list[str] = []
        self.types: set[str] = set()
        self.root_sound = True

    def defect(self, text: str) -> None:
        self.defects.append(text)

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
        fields["actors"] = self.actors(node, path)
        fields["purposes"] = self.purposes(node, path)
        fields["actions"] = self.actions(node, path)
        fields.update(self.classes(node, path))
        fields["codes"] = self.codes(node, path)
        fields["labels"] = self.labels(node, path)
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
        return Provision(path=path, type=ptype, rule=rule, children=kids, **fields)

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

    def actors(self, node: JSON, path: str) -> frozenset[str] | None:
        entries = self.entries(node, "actor", path)
        if entries is None:
            return None
        refs = set()
        for i, entry in enumerate(entries):
            ref = entry.get("reference")
            target = ref.get("reference") if isinstance(ref, dict) else None
            if isinstance(target, str) and target:
                refs.add(relative_reference(target))
            else:
                self.defect(f"bad-actor:{path}.actor[{i}]")
        return frozenset(refs)

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
            "class_types": frozenset(types),
            "class_profiles": frozenset(profiles),
            "class_scopes": frozenset(scopes),
            "class_bare": frozenset(bare),
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
        return frozenset(codes)

    def labels(self, node: JSON, path: str) -> tuple[Label, ...] | None:
        entries = self.entries(node, "securityLabel", path)
        if entries is None:
            return None
        labels = []
        for entry in entries:
            code, system = entry.get("code"), entry.get("system")
            if isinstance(code, str):
                labels.append(Label(system if isinstance(system, str) else "", code))
            else:
                self.defect(f"bad-code:{path}.securityLabel")
        return tuple(labels)

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
            elif not isinstance(target, str) or not target:
                self.defect(f"bad-reference:{path}.data[{i}]")
            else:
                refs.append(DataRef(meaning, relative_reference(target)))
        return tuple(refs)


def _policy_rule(consent: JSON) -> str:
    """The v3 ActCode policyRule code (OPTIN, OPTOUT, ...), or "" when there is none."""
    codings = list(iter_codings(consent.get("policyRule")))
    for coding in codings:
        if coding.get("system") in (V3_ACT_CODE, None) and isinstance(coding.get("code"), str):
            return str(coding["code"])
    return ""


def _scopes(consent: JSON) -> frozenset[str]:
    return frozenset(
        str(c["code"]) for c in iter_codings(consent.get("scope")) if isinstance(c.get("code"), str)
    )


def compile_consent(consent: JSON) -> CompiledConsent:
    """Compile one Consent resource; never raises, records every defect found.

    The root type is ``provision.type``, else the policyRule's (OPTIN/OPTINR permit,
    OPTOUT/OPTOUTE deny), else "" (the policy's default decision). Nested provisions
    without a type inherit their parent's.
    """
    compiler = _Compiler()
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
    date_time = None
    if "dateTime" in consent:
        stamp = parse_date_range(consent["dateTime"])
        if stamp is None:
            compiler.defect("bad-date:dateTime")
        else:
            date_time = stamp.start
    policy_rule = _policy_rule(consent)
    base = POLICY_RULE_TYPES.get(policy_rule, "")
    raw_root = consent.get("provision")
    if raw_root is None:
        raw_root = {}
    root = compiler.provision(raw_root, "provision", base, _POLICY_RULE_REASON.get(base, ""))
    patient = consent.get("patient")
    patient_ref = patient.get("reference") if isinstance(patient, dict) else None
    return CompiledConsent(
        id=cid,
        patient=relative_reference(patient_ref) if isinstance(patient_ref, str) else None,
        status=status if isinstance(status, str) else None,
        scopes=scopes,
        date_time=date_time,
        policy_rule=policy_rule,
        root=root,
        defects=tuple(compiler.defects),
        types=frozenset(compiler.types),
        root_sound=compiler.root_sound,
        version=_version_of(consent),
    )


def _version_of(consent: JSON) -> str | None:
    meta = consent.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return version if isinstance(version, str) else None
