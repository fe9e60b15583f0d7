"""DS4P on released data: sensitive labels in ``meta.security``, the 42 CFR Part 2 refrain.

Semantics: a released resource that carries a sensitive label (computed by the rules or its
own) gets every such label in ``meta.security`` (once each; labels already there stay). A
resource with a 42 CFR Part 2 (substance use disorder) label also gets the v3-ActCode refrain
``NORDSLCD``; a Bundle holding one carries the redisclosure-prohibition notice as an extension
of ``Bundle.meta`` (R4's Bundle has no ``extension`` of its own). A resource with no sensitive
label is not touched, so its bytes stay as the FHIR server wrote them.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.core.fhir import JSON
from gateway.core.model import V3_ACT_CODE, Label

NORDSLCD = "NORDSLCD"
# Labels the rules give substance use disorder records (rules/substance-use.yaml, scopes.yaml).
PART2_LABELS = frozenset({"42CFRPart2", "ETH", "SUD", "ETHUD", "OPIOIDUD", "ALCUD"})
NOTICE_EXTENSION = "urn:consent-gateway:redisclosure-notice"
# 42 CFR § 2.32(a)(2): the abbreviated notice the regulation allows.
REDISCLOSURE_NOTICE = (
    "42 CFR part 2 prohibits unauthorized disclosure of these records. This information has been "
    "disclosed to you from records protected by federal confidentiality rules (42 CFR part 2); "
    "any further disclosure requires the written consent of the patient or as otherwise "
    "permitted by 42 CFR part 2. A general authorization for the release of medical or other "
    "information is not sufficient for this purpose."
)


def sensitive_of(labels: Iterable[Label], sensitive: frozenset[str]) -> list[Label]:
    """The labels of ``labels`` that are sensitive, in a stable order."""
    hits = [label for label in labels if label.code in sensitive]
    if len(hits) < 2:
        return hits
    return sorted(set(hits), key=lambda l: (l.system, l.code))


def is_part2(labels: Iterable[Label]) -> bool:
    return any(label.code in PART2_LABELS for label in labels)


def mark(resource: JSON, labels: list[Label]) -> bool:
    """Add ``labels`` (and NORDSLCD for Part 2 data) to ``meta.security``; True when changed."""
    if not labels:
        return False
    wanted = [(label.system, label.code) for label in labels]
    if is_part2(labels):
        wanted.append((V3_ACT_CODE, NORDSLCD))
    meta = resource.get("meta")
    if not isinstance(meta, dict):
        meta = resource["meta"] = {}
    security = meta.get("security")
    if not isinstance(security, list):
        security = meta["security"] = []
    present = {(c.get("system", ""), c.get("code")) for c in security if isinstance(c, dict)}
    codes = {code for _, code in present}
    changed = False
    for system, code in wanted:
        if (system, code) in present or (not system and code in codes):
            continue
        security.append({"system": system, "code": code} if system else {"code": code})
        present.add((system, code))
        changed = True
    return changed


def add_notice(bundle: JSON) -> bool:
    """Put the redisclosure notice on a Bundle (once); True when changed."""
    meta = bundle.get("meta")
    if not isinstance(meta, dict):
        meta = bundle["meta"] = {}
    extensions = meta.get("extension")
    if not isinstance(extensions, list):
        extensions = meta["extension"] = []
    if any(isinstance(e, dict) and e.get("url") == NOTICE_EXTENSION for e in extensions):
        return False
    extensions.append({"url": NOTICE_EXTENSION, "valueString": REDISCLOSURE_NOTICE})
    return True
