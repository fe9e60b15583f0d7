"""``consent-gateway label FILE``: the sensitivity labels the rules give each resource."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from gateway.core.fhir import JSON, iter_bundle_resources
from gateway.core.labels import LabelIndex
from gateway.rules import RulesError, load_rules


class InputError(Exception):
    """The input file cannot be read as a resource, a Bundle or NDJSON."""


def add_parser(subparsers: Any) -> None:
    """Register ``label`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "label",
        help="print the sensitivity labels of a resource, a Bundle or an NDJSON file",
        description=(
            "Print one line per resource: 'Type/id  LABEL,LABEL  rule; rule'. "
            "A Bundle is labeled entry by entry; an NDJSON file line by line."
        ),
    )
    parser.add_argument(
        "file", type=Path, nargs="?", help="FHIR JSON resource, Bundle, or NDJSON file ('-' for stdin)"
    )
    parser.add_argument("--rules-dir", type=Path, default=None, help="rules directory (default: the bundled rules/)")
    parser.add_argument(
        "--coverage",
        action="store_true",
        help="print, per category and code system, how many codes the rules hold and their sources",
    )


def run(args: argparse.Namespace) -> int:
    """Print the labels; exit 2 with one line on stderr when the rules or the input are bad."""
    if (args.file is None) == (not args.coverage):
        print("consent-gateway label: give a FILE, or --coverage", file=sys.stderr)
        return 2
    try:
        index = load_rules(args.rules_dir)
        resources = [] if args.coverage else read_resources(args.file)
    except (RulesError, InputError) as exc:
        print(f"consent-gateway label: {exc}", file=sys.stderr)
        return 2
    if args.coverage:
        print("\n".join(coverage_report(index)))
        return 0
    for number, resource in enumerate(resources, 1):
        print(describe(index, resource, number))
    return 0


def describe(index: LabelIndex, resource: JSON, number: int) -> str:
    """``Type/id  LABEL,LABEL  rule; rule`` (``-`` when the resource has no label)."""
    rtype = resource.get("resourceType", "?")
    rid = resource.get("id")
    name = f"{rtype}/{rid}" if isinstance(rid, str) else f"{rtype}#{number}"
    reasons = index.explain(resource)
    if not reasons:
        return f"{name}  -"
    labels = ",".join(sorted({label.code for label, _ in reasons}))
    rules = "; ".join(dict.fromkeys(rule for _, rule in reasons))
    return f"{name}  {labels}  {rules}"


def coverage_report(index: LabelIndex) -> list[str]:
    """Per category and code system: codes held (ranges and ICD-10-CM categories as listed, and
    expanded), the labels they give, then every source the codes come from."""
    totals: dict[tuple[str, str], list[int]] = {}
    labels: dict[tuple[str, str], set[str]] = {}
    sources: dict[tuple[str, str], dict[str, int]] = {}
    for entry in index.coverage:
        key = (entry.category, entry.system)
        count = totals.setdefault(key, [0, 0])
        count[0] += entry.entries
        count[1] += entry.codes
        labels.setdefault(key, set()).update(entry.labels)
        by_source = sources.setdefault(key, {})
        by_source[entry.source] = by_source.get(entry.source, 0) + entry.codes
    lines = [f"{'category':<22}{'system':<12}{'entries':>8}{'codes':>8}  labels"]
    for (category, system), (entries, codes) in sorted(totals.items()):
        lines.append(f"{category:<22}{system:<12}{entries:>8}{codes:>8}  {','.join(sorted(labels[(category, system)]))}")
    lines.append("")
    lines.append("ICD-10-CM entries cover every code below them; CPT/HCPCS ranges count each code.")
    lines.append("")
    lines.append("sources:")
    for (category, system), by_source in sorted(sources.items()):
        for source, codes in by_source.items():
            lines.append(f"  {category} / {system}: {codes:>4}  {source}")
    return lines


def read_resources(path: Path) -> list[JSON]:
    """A resource, each entry of a Bundle, or each line of an NDJSON file."""
    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _ndjson(path, data)
    if not isinstance(document, dict) or not isinstance(document.get("resourceType"), str):
        raise InputError(f"{path}: not a FHIR resource (no resourceType)")
    if document["resourceType"] == "Bundle":
        return list(iter_bundle_resources(document))
    return [document]


def _ndjson(path: Path, data: bytes) -> list[JSON]:
    resources: list[JSON] = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise InputError(f"{path}: line {number}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("resourceType"), str):
            raise InputError(f"{path}: line {number}: not a FHIR resource (no resourceType)")
        resources.append(item)
    if not resources:
        raise InputError(f"{path}: empty")
    return resources
