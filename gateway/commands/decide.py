"""``consent-gateway decide``: decide one resource against Consent files and explain why.

With ``--from VENDOR`` the consent files hold that vendor's consent records, converted
first exactly as the gateway's vendor source converts them (HealtheIntent records do not
name their patient: they are taken to be about the resource's one patient).

``--json`` also explains how each consent was read: the root reading (typed, base,
exception, scope), the role rule of each actor, each confidentiality high-water mark against
the resource's level, and how each ``related`` target was resolved (``--related`` files are
the other resources of the same answer). Consents whose root has conditions but no type
are named under ``ambiguous_consents``.

Exit status: 0 permit, 1 deny, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gateway.core.compartment import UNKNOWN_PATIENT, patients_of, references_of
from gateway.core.consent import CompiledConsent, compile_consent
from gateway.core.decision import UNTYPED_EXCEPTION, UNTYPED_SCOPE, Policy, decide_with, explain_json
from gateway.core.explain import explain_consents
from gateway.core.fhir import Bases, JSON, iter_bundle_resources, iter_codings, normal_base
from gateway.core.model import Actor, Decision, Label, RequestContext, Verdict
from gateway.core.purpose import PURPOSE_CODES
from gateway.core.vendors import CONVERTERS, ConvertOptions, VendorError

Labeler = Callable[[JSON], tuple[frozenset[Label], frozenset[str]]]


class BadInput(Exception):
    """Input the command cannot use; the message is the one line printed."""


def add_parser(subparsers: Any) -> None:
    """Register ``decide`` on the top-level parser's subparsers."""
    parser = subparsers.add_parser(
        "decide", help="decide one resource against Consent files and explain why"
    )
    # extend: "--consent a.json --consent b.json" decides with both, as "--consent a.json b.json".
    parser.add_argument("--consent", nargs="+", action="extend", required=True, metavar="FILE",
                        help="Consent JSON files (a Bundle of Consents also works); repeatable")
    parser.add_argument("--from", dest="vendor", choices=sorted(CONVERTERS),
                        help="the --consent files are this vendor's consent records")
    parser.add_argument("--resource", required=True, metavar="FILE", help="the resource (JSON)")
    parser.add_argument("--actor", required=True, metavar="REF", help="e.g. Practitioner/1")
    parser.add_argument("--purpose", default="TREAT", metavar="CODE", help="v3 PurposeOfUse")
    parser.add_argument("--org", metavar="REF", help="Organization/<id> the actor acts for")
    parser.add_argument("--group", action="append", default=[], metavar="REF",
                        help="Group/CareTeam the actor belongs to (repeatable)")
    parser.add_argument("--at", metavar="DATETIME", help="decide as of this instant (default now)")
    parser.add_argument("--default-decision", choices=("deny", "permit"), default="deny")
    parser.add_argument("--combining", choices=("deny-overrides", "latest-wins"),
                        default="deny-overrides")
    parser.add_argument("--untyped-root", choices=(UNTYPED_EXCEPTION, UNTYPED_SCOPE),
                        default=UNTYPED_EXCEPTION,
                        help="how a root provision with conditions but no type reads "
                             "(consent.untyped_root)")
    parser.add_argument("--related", nargs="+", action="extend", default=[], metavar="FILE",
                        help="other resources of the same answer (for data.meaning related)")
    parser.add_argument("--base", action="append", default=[], metavar="URL",
                        help="a base under which absolute references name this FHIR server's resources, "
                             "as the gateway's upstream.url, public_base_url and upstream.reference_bases "
                             "(repeatable); an absolute reference under any other base is another "
                             "server's: unknown, as the gateway reads it")
    parser.add_argument("--json", action="store_true", help="print the decision as JSON")


def _read_any_json(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise BadInput(f"{path} is not JSON: {exc}") from exc


def _read_json(path: str) -> JSON:
    data = _read_any_json(path)
    if not isinstance(data, dict):
        raise BadInput(f"{path} is not a FHIR resource (expected a JSON object)")
    return data


def _bases(values: list[str]) -> Bases:
    """The ``--base`` URLs as the gateway compares bases (``own_bases``)."""
    for value in values:
        scheme, sep, rest = value.partition("://")
        if not sep or scheme.lower() not in ("http", "https") or not rest.split("/", 1)[0]:
            raise BadInput(f"--base must be an http(s) URL such as https://fhir.example/r4, got {value!r}")
    return frozenset(normal_base(v) for v in values)


def _consents(paths: list[str], ours: Bases) -> list[CompiledConsent]:
    found = []
    for path in paths:
        data = _read_json(path)
        items = list(iter_bundle_resources(data)) if data.get("resourceType") == "Bundle" else [data]
        for item in items:
            if item.get("resourceType") != "Consent":
                raise BadInput(f"{path} holds a {item.get('resourceType')!r}, not a Consent")
            found.append(compile_consent(item, ours))
    return found


def _vendor_consents(paths: list[str], vendor: str, resource: JSON, ours: Bases) -> list[CompiledConsent]:
    """Convert each vendor file to FHIR Consents, then compile them."""
    patient: str | None = None
    if vendor == "healtheintent":
        owners = patients_of(resource, ours)
        if len(owners) != 1 or UNKNOWN_PATIENT in owners:
            raise BadInput("--from healtheintent needs a resource about exactly one patient")
        patient = next(iter(owners))
    options = ConvertOptions(
        sensitivity_labels=_sensitivity_labels() if vendor == "healthex" else {}, patient_ref=patient
    )
    found: list[CompiledConsent] = []
    for path in paths:
        try:
            converted = CONVERTERS[vendor](_read_any_json(path), options)
        except VendorError as exc:
            raise BadInput(f"{path}: {exc}") from exc
        found.extend(compile_consent(c, ours) for c in converted)
    return found


def _sensitivity_labels() -> dict[str, tuple[Label, ...]]:
    """Each vendor sensitivity scope of the bundled rules, with its labels."""
    from gateway.rules import load_rules

    try:
        index = load_rules(None)
    except Exception as exc:  # rule loading reports its own problem; show it on one line
        raise BadInput(f"cannot load rules: {exc}") from exc
    return {scope: index.sensitivity_scope_labels(scope) for scope in index.sensitivity_scope_names}


def _purpose(value: str) -> str:
    """A v3 PurposeOfUse code, as the gateway and ``POST /decision`` accept (else bad input)."""
    if value not in PURPOSE_CODES:
        raise BadInput(f"--purpose must be a v3 PurposeOfUse code such as TREAT, got {value!r}")
    return value


def _reference(value: str, option: str) -> str:
    kind, _, rid = value.partition("/")
    if not kind or not rid or "/" in rid:
        raise BadInput(f"{option} must be a reference like Practitioner/1, got {value!r}")
    return value


def _instant(value: str | None) -> datetime:
    if value is None:
        return datetime.now(timezone.utc)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadInput(f"--at must be an ISO date-time, got {value!r}") from exc
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _meta_security(resource: JSON) -> tuple[frozenset[Label], frozenset[str]]:
    meta = resource.get("meta")
    codings = iter_codings(meta.get("security") if isinstance(meta, dict) else None)
    labels = frozenset(
        Label(str(c.get("system") or ""), c["code"]) for c in codings if isinstance(c.get("code"), str)
    )
    return labels, frozenset()


def _labeler() -> tuple[Labeler, frozenset[str]]:
    """The rules' labeler and sensitive codes; ``meta.security`` only when rules are absent."""
    try:
        from gateway.rules import load_rules
    except ImportError:
        return _meta_security, frozenset()
    try:
        index = load_rules(None)
    except Exception as exc:  # rule loading reports its own problem; show it on one line
        raise BadInput(f"cannot load rules: {exc}") from exc

    def labels(resource: JSON) -> tuple[frozenset[Label], frozenset[str]]:
        return index.labels_for(resource), index.scopes_for(resource)

    return labels, frozenset(index.sensitive)


def evaluate(args: argparse.Namespace) -> Decision:
    """Read the files named in ``args`` and decide; raises BadInput on unusable input."""
    return _evaluated(args)[0]


def _known_refs(paths: list[str], ours: Bases) -> dict[str, frozenset[str]]:
    found: dict[str, frozenset[str]] = {}
    for path in paths:
        data = _read_json(path)
        items = list(iter_bundle_resources(data)) if data.get("resourceType") == "Bundle" else [data]
        for item in items:
            rtype, rid = item.get("resourceType"), item.get("id")
            if isinstance(rtype, str) and isinstance(rid, str):
                found[f"{rtype}/{rid}"] = references_of(item, ours)
    return found


def _evaluated(args: argparse.Namespace) -> tuple[Decision, dict[str, Any]]:
    """The decision and its explanation of how each consent was read."""
    vendor = getattr(args, "vendor", None)
    ours = _bases(getattr(args, "base", None) or [])
    consents = [] if vendor else _consents(args.consent, ours)
    resource = _read_json(args.resource)
    if not isinstance(resource.get("resourceType"), str):
        raise BadInput(f"{args.resource} has no resourceType")
    if vendor:
        # HealtheIntent records are about the resource's patient, so the resource comes first.
        consents = _vendor_consents(args.consent, vendor, resource, ours)
    ctx = RequestContext(
        actor=Actor(
            reference=_reference(args.actor, "--actor"),
            organization=_reference(args.org, "--org") if args.org else None,
            groups=frozenset(_reference(g, "--group") for g in args.group),
        ),
        purpose=_purpose(args.purpose),
        now=_instant(args.at),
    )
    labeler, sensitive = _labeler()
    labels, scopes = labeler(resource)
    policy = Policy(
        default_decision=args.default_decision, combining=args.combining, sensitive=sensitive,
        untyped_root=getattr(args, "untyped_root", UNTYPED_EXCEPTION),
    )
    known = _known_refs(getattr(args, "related", []), ours)
    decision = decide_with(consents, resource, labels, scopes, ctx, policy, known_refs=known, ours=ours)
    explained = {
        "consents": explain_consents(
            consents, resource, labels, ctx.actor.references(), policy, known, ours
        ),
        "ambiguous_consents": [c.id for c in consents if c.ambiguous],
    }
    return decision, explained


def _text(decision: Decision, explained: dict[str, Any]) -> str:
    lines = [f"decision: {decision.verdict.value}", f"combining: {decision.combining}"]
    if decision.labels:
        lines.append(f"labels: {', '.join(decision.labels)}")
    lines += [f"  {reason}" for reason in decision.reasons]
    lines += [f"  error: {error}" for error in decision.errors]
    lines += [
        f"  ambiguous: {cid} has a root provision with conditions but no type "
        "(ask its producer to add provision.type)"
        for cid in explained["ambiguous_consents"]
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the decision; 0 permit, 1 deny, 2 bad input."""
    try:
        decision, explained = _evaluated(args)
    except BadInput as exc:
        print(f"consent-gateway decide: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**explain_json(decision), **explained}, indent=2))
    else:
        print(_text(decision, explained))
    return 1 if decision.verdict is Verdict.DENY else 0
