"""``consent-gateway convert --from VENDOR FILE``: print the FHIR Consents vendor records mean.

The output is a FHIR Bundle (type ``collection``) of Consent resources, indented JSON.
Bad input (unreadable file, not JSON, a record the converter cannot understand, rules
that cannot be loaded) exits 2 with one line on stderr naming the record and the field.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.core.fhir import JSON
from gateway.core.model import Label
from gateway.core.vendors import CONVERTERS, ConvertOptions, VendorError
from gateway.rules import RulesError, load_rules

PROG = "consent-gateway convert"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="print the FHIR R4 Consents a vendor's consent records mean",
        description=(
            "Read a vendor consent file (ClinikAPI consent records, a HealthEx getPatientConsents "
            "response, HealtheIntent consent records or a Consents page) and print the FHIR "
            "Consent Bundle the gateway enforces."
        ),
    )
    parser.add_argument("--from", dest="vendor", required=True, choices=sorted(CONVERTERS))
    parser.add_argument(
        "--patient",
        help="FHIR patient the records are about (Patient/<id> or <id>); "
        "HealtheIntent records do not name their patient",
    )
    parser.add_argument(
        "--rules-dir", type=Path, help="sensitivity rules for HealthEx scopes (default: bundled rules/)"
    )
    parser.add_argument("file", type=Path, help="vendor JSON file")


def run(args: argparse.Namespace) -> int:
    try:
        payload = _read_json(args.file)
        options = ConvertOptions(
            sensitivity_labels=_sensitivity_labels(args.rules_dir) if args.vendor == "healthex" else {},
            patient_ref=_patient_ref(args.patient),
        )
        consents = CONVERTERS[args.vendor](payload, options)
    except (_InputError, RulesError, VendorError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(consent_bundle(consents), indent=2))
    return 0


# fullUrl is absolute in R4: a name-based UUID of ``Consent/<id>``, the same on every run.
_FULL_URL_NAMESPACE = uuid.UUID("5f0c6a52-6a0e-4d52-9c53-2a7d9b1f3e41")


def full_url(consent: JSON) -> str:
    return f"urn:uuid:{uuid.uuid5(_FULL_URL_NAMESPACE, 'Consent/' + str(consent['id']))}"


def consent_bundle(consents: list[JSON]) -> JSON:
    """A collection Bundle of ``consents``."""
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": full_url(c), "resource": c} for c in consents],
    }


class _InputError(Exception):
    """The file or an argument cannot be used; the message is one line."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise _InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "encoding"
        raise _InputError(f"{path}: not JSON ({where})") from None


def _patient_ref(value: str | None) -> str | None:
    if value is None:
        return None
    ref = value if value.startswith("Patient/") else f"Patient/{value}"
    if ref.count("/") != 1 or ref == "Patient/":
        raise _InputError(f"--patient: expected Patient/<id> or <id>, got {value!r}")
    return ref


def _sensitivity_labels(rules_dir: Path | None) -> Mapping[str, tuple[Label, ...]]:
    """Each vendor sensitivity scope the rules define, with the labels it names."""
    index = load_rules(rules_dir)
    return {scope: index.sensitivity_scope_labels(scope) for scope in index.sensitivity_scope_names}
