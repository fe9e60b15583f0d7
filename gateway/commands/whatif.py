"""``consent-gateway whatif``: what a draft consent would change, replayed over logged reads.

Each replayable read of the decision log (CONTRACT §10) that concerns the draft's patient is
asked of the FHIR server again (with the gateway's own upstream session and settings), and
each resource of the answer is decided twice: with the patient's current consents, and with
the draft added (replacing the consent of the same id). The report counts, per requester and
resource type, what would be newly denied and newly released; it names no record.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from gateway.core.compartment import is_patient_data
from gateway.core.consent import CompiledConsent, compile_consent
from gateway.core.enforce import Judge, judge_resource, owners_index, patients_in
from gateway.core.errors import GatewayError
from gateway.core.fhir import NO_BASES, Bases, JSON, local_reference, reference_of, relative_reference
from gateway.core.model import Actor, Verdict
from gateway.web.enforcement import Looked
from gateway.core.officer import top_resources
from gateway.web.resolve import resolve_references
from gateway.web.state import GatewayState


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "whatif", help="replay logged reads to show what a draft consent would newly deny or release"
    )
    parser.add_argument("--consent", type=Path, required=True, help="the draft Consent (JSON)")
    parser.add_argument("--log", type=Path, required=True, help="the gateway's JSON-lines log (decision lines)")
    parser.add_argument("--patient", help="only this patient (Patient/<id>); must be the draft's patient")
    parser.add_argument("--config", type=Path, help="the gateway's YAML configuration (upstream, consent source)")
    parser.add_argument("--upstream", help="FHIR base URL of the upstream (upstream.url)")


class WhatIfError(Exception):
    """Bad input, reported as one line (exit 2)."""


@dataclass
class Report:
    """Changes per (requester, resource type), and what could not be replayed."""

    denied: Counter[tuple[str, str]] = field(default_factory=Counter)
    released: Counter[tuple[str, str]] = field(default_factory=Counter)
    replayed: int = 0
    skipped: int = 0       # masked in the log (a code, a hidden id), or not a read
    failed: int = 0        # the FHIR server or the consent source did not answer

    def render(self) -> str:
        keys = sorted(set(self.denied) | set(self.released))
        lines = [
            f"replayed {self.replayed} logged read(s); skipped {self.skipped} not replayable; {self.failed} failed",
        ]
        if not keys:
            lines.append("the draft changes nothing in these reads")
            return "\n".join(lines)
        width = max(len("requester"), *(len(k[0]) for k in keys))
        lines.append(f"{'requester':<{width}}  {'resource type':<24} newly denied  newly released")
        for key in keys:
            lines.append(f"{key[0]:<{width}}  {key[1]:<24} {self.denied[key]:>12}  {self.released[key]:>14}")
        return "\n".join(lines)


def read_draft(path: Path) -> JSON:
    try:
        draft = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise WhatIfError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(draft, dict) or draft.get("resourceType") != "Consent":
        raise WhatIfError(f"{path} is not a Consent resource")
    return draft


def draft_patient(draft: JSON, ours: Bases = NO_BASES) -> str:
    """The draft's ``Patient/<id>``; an absolute reference names one only under one of ``ours``
    (the gateway's bases): another server's patient of the same id is not this server's."""
    ref = reference_of(draft.get("patient"))
    if not ref or not relative_reference(ref).startswith("Patient/"):
        raise WhatIfError("the draft Consent has no patient reference")
    local = local_reference(ref, ours)
    if local is None:
        raise WhatIfError("the draft Consent is about another FHIR server's patient (its base is not this server's)")
    return local


def decision_lines(path: Path) -> list[JSON]:
    """The decision lines of a gateway log (other lines and text are ignored)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise WhatIfError(f"cannot read {path}: {exc.strerror or exc}") from None
    found = []
    for line in raw.splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("logger") == "gateway.decision" and entry.get("msg") == "decision":
            found.append(entry)
    return found


def concerns(entry: JSON, patient: str) -> bool:
    """The logged request involved the patient: their consents were read, or the query named them."""
    consents = entry.get("consents")
    if isinstance(consents, dict) and patient in consents:
        return True
    bare = patient.split("/", 1)[1]
    query = str(entry.get("query", ""))
    return any(f"={v}" in query for v in (patient, bare, patient.replace("/", "%2F"))) or (
        str(entry.get("path", "")).startswith(f"/{patient}/")
    )


def with_draft(consents: tuple[CompiledConsent, ...], draft: CompiledConsent) -> tuple[CompiledConsent, ...]:
    return (*(c for c in consents if c.id != draft.id), draft)


async def replay(state: GatewayState, entry: JSON, patient: str, draft: CompiledConsent, report: Report) -> None:
    """Ask the logged read again and decide its answer with and without the draft."""
    path, query = str(entry.get("path", "")), str(entry.get("query", ""))
    answer = await state.upstream.request(
        "GET", state.upstream.url_for(path.lstrip("/"), query), headers={"Accept": "application/fhir+json"}
    )
    if answer.status >= 400:
        report.failed += 1
        return
    body = orjson.loads(answer.body)
    if not isinstance(body, dict):
        report.failed += 1
        return
    actor = Actor(str(entry.get("actor")), organization=entry.get("organization"), role=entry.get("role"))
    purpose = str(entry.get("purpose") or state.settings.auth.default_purpose)
    index = owners_index(body, ours=state.enforcement.ours)
    looked = await state.enforcement.look_up(patients_in(index) | {patient}, actor, purpose)
    consents = dict(looked.consents)
    consents[patient] = with_draft(consents.get(patient, ()), draft)
    resolved = await resolve_references(state, body)
    if state.enforcement.reads_roles([*looked.consents.values(), consents[patient]]):
        resolved = await state.enforcement.with_roles(body, resolved)
    now: Judge = state.enforcement.judge(looked, resolved)
    # The draft is no cached consent set: its decisions are never shared (versions=None).
    then: Judge = state.enforcement.judge(replace(looked, consents=consents, versions=None), resolved)
    for resource in top_resources(body):
        if patient not in index.get(id(resource), frozenset()):
            continue
        rtype = str(resource.get("resourceType"))
        before = judge_resource(resource, now, index).verdict is not Verdict.DENY
        after = judge_resource(resource, then, index).verdict is not Verdict.DENY
        key = (actor.reference, rtype if is_patient_data(rtype) else "other")
        if before and not after:
            report.denied[key] += 1
        elif after and not before:
            report.released[key] += 1
    report.replayed += 1


async def what_if(state: GatewayState, entries: list[JSON], patient: str, draft: CompiledConsent) -> Report:
    report = Report()
    await state.upstream.open()
    if state.consent_server is not None:
        await state.consent_server.open()
    try:
        for entry in entries:
            if not concerns(entry, patient):
                continue
            if entry.get("method") not in ("GET", "HEAD") or entry.get("replayable") is not True or not entry.get("actor"):
                report.skipped += 1
                continue
            try:
                await replay(state, entry, patient, draft, report)
            except (GatewayError, orjson.JSONDecodeError):
                report.failed += 1
    finally:
        await state.upstream.close()
        if state.consent_server is not None:
            await state.consent_server.close()
    return report


def run(args: argparse.Namespace) -> int:
    from gateway.app import build_state
    from gateway.cli import settings_from_args

    try:
        draft = read_draft(args.consent)
        entries = decision_lines(args.log)
        state = build_state(settings_from_args(args))
        # The proxy's notion of this server's resources: absolute references under its bases.
        patient = draft_patient(draft, state.store.ours)
        if args.patient and args.patient != patient:
            raise WhatIfError(f"the draft is about {patient}, not {args.patient}")
    except WhatIfError as exc:
        print(f"consent-gateway whatif: {exc}", file=sys.stderr)
        return 2
    compiled = compile_consent(draft, state.store.ours)
    report = asyncio.run(what_if(state, entries, patient, compiled))
    print(f"draft {compiled.id} for {patient}")
    print(report.render())
    return 0
