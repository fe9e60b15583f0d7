"""What a Subscription or a recorded search is about: the searches named, the patients and codes in them.

A Subscription tells that someone watches what its criteria select (``Observation?patient=
Patient/ana&code=http://loinc.org|75622-1``: Ana's HIV results) as surely as the records do. It
is decided as the data of the patients its criteria name (``compartment.patients_of``), labelled
by the codes they name (``labels.LabelIndex``). Criteria are read in three shapes: R4's
``criteria`` search URL (R4B alike), the R4B/R4 backport's topic URL in ``criteria`` with its
filters in ``backport-filter-criteria`` extensions of ``_criteria``, and R5's ``filterBy``.

An AuditEvent that records a search (IHE BALP's query entity: ``entity.query``, base64 of the
search) tells what was searched for as surely: its searches are read the same way
(``audit_searches``), and the event is decided as the data of the patients they name and
labelled by their codes, besides its own patients (``agent.who``, ``entity.what``).

SECURITY: criteria (or a recorded query) the gateway cannot read (a filter of an unknown shape, a patient named by
identifier or through a chain, a type it cannot tell) name ``UNKNOWN_PATIENT``: no consent
opens the Subscription (fail closed). Pure: stdlib only at import (compartment and refusals,
which this module's callers import, are read when called).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any
from urllib.parse import parse_qsl

from gateway.core.fhir import TYPE_NAME

BACKPORT_FILTER = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria"
# The top-level elements criteria are read from (a view of a Subscription holds them).
CRITERIA_ELEMENTS = ("criteria", "_criteria", "filterBy")

Search = tuple[str, list[tuple[str, str]]]
_PATIENT = re.compile(r"(?:^|/)Patient/[A-Za-z0-9\-.]{1,64}$")
# Search modifiers that select by text or by a value set's content: what they watch is not
# read from the codes the criteria write (``code:text=HIV``).
_UNLABELLED_MODIFIERS = frozenset({"text", "in", "not-in", "above"})
# Search parameters that select by content the labels cannot read.
_UNLABELLED_PARAMS = frozenset({"_text", "_content", "_filter", "_query", "_list"})


def _search(text: str) -> Search | None:
    rtype, mark, query = text.partition("?")
    if not mark or not TYPE_NAME.fullmatch(rtype):
        return None
    return rtype, parse_qsl(query, keep_blank_values=True)


def criteria_searches(resource: Any) -> list[Search] | None:
    """The searches a Subscription's criteria name (empty: none, a topic watched whole), or
    None when its criteria cannot be read."""
    if not isinstance(resource, dict):
        return None
    found: list[Search] = []
    criteria = resource.get("criteria")
    if criteria is not None:
        if not isinstance(criteria, str):
            return None
        if "?" in criteria:
            one = _search(criteria)
            if one is None:
                return None
            found.append(one)
    extra = resource.get("_criteria")
    if extra is not None:
        if not isinstance(extra, dict):
            return None
        extensions = extra.get("extension") or []
        if not isinstance(extensions, list) or set(extra) - {"id", "extension"}:
            return None
        for extension in extensions:
            value = extension.get("valueString") if isinstance(extension, dict) else None
            if not isinstance(extension, dict) or extension.get("url") != BACKPORT_FILTER or not isinstance(value, str):
                return None
            one = _search(value)
            if one is None:
                return None  # a filter without its type: what its parameters select is unknown
            found.append(one)
    filters = resource.get("filterBy")
    if filters is not None:
        if not isinstance(filters, list):
            return None
        by_type: dict[str, list[tuple[str, str]]] = {}
        for item in filters:
            if not isinstance(item, dict):
                return None
            rtype, name, value = item.get("resourceType"), item.get("filterParameter"), item.get("value")
            modifier = item.get("modifier")
            if not (isinstance(rtype, str) and TYPE_NAME.fullmatch(rtype) and isinstance(name, str)
                    and isinstance(value, str) and (modifier is None or isinstance(modifier, str))):
                return None
            key = f"{name}:{modifier}" if modifier else name
            by_type.setdefault(rtype, []).append((key, value))
        found.extend(by_type.items())
    return found


def subscription_patients(resource: Any) -> frozenset[str]:
    """The patients a Subscription's criteria name (``Patient/<id>``); ``UNKNOWN_PATIENT``
    among them when the criteria name one the gateway cannot read, or name one and select by
    what its labels cannot read (``code:text=HIV``)."""
    return searches_patients(criteria_searches(resource))


def searches_patients(searches: list[Search] | None) -> frozenset[str]:
    """The patients ``searches`` name (None: searches that cannot be read, ``UNKNOWN_PATIENT``),
    as for ``subscription_patients``."""
    from gateway.core.compartment import UNKNOWN_PATIENT
    from gateway.core.refusals import confining, named_patients, unfilterable

    if searches is None:
        return frozenset({UNKNOWN_PATIENT})
    found: set[str] = set()
    for rtype, query in searches:
        if unfilterable((rtype,), None, query) is not None:
            return frozenset({UNKNOWN_PATIENT})  # a chain, _has, _filter: selects by what is unread
        links = confining(rtype)
        # R4 defines ``patient`` as ``subject`` restricted to a Patient wherever both exist; a
        # server answers ``Condition?subject=<id>`` though the compartment lists ``patient``.
        subject = "patient" in links and "subject" not in links
        confined = False
        unlabelled = False
        named_query: list[tuple[str, str]] = []
        for name, value in query:
            base, _, modifier = name.partition(":")
            if subject and base == "subject":
                base, name = "patient", "patient" + name[len("subject"):]
            if base in links:
                if modifier not in ("", "Patient"):
                    return frozenset({UNKNOWN_PATIENT})  # by identifier: whom is unknown
                confined = True
                named_query.append((name, value))
                continue
            if modifier in _UNLABELLED_MODIFIERS or base in _UNLABELLED_PARAMS:
                unlabelled = True
            # Any other reference to a patient (``performer=Patient/1``) names her too.
            for item in value.split(","):
                if "Patient/" in item:
                    match = _PATIENT.search(item.strip())
                    if match is None:
                        return frozenset({UNKNOWN_PATIENT})
                    confined = True
                    named_query.append(("patient" if rtype != "Patient" else "_id", match.group(0)))
        if not confined:
            continue
        named = named_patients((rtype,), named_query)
        if named is None:
            return frozenset({UNKNOWN_PATIENT})  # another server's patient, a malformed id
        found |= named
        if unlabelled:
            found.add(UNKNOWN_PATIENT)
    return frozenset(found)


def criteria_codes(resource: Any) -> list[tuple[str, str]]:
    """Every token a Subscription's criteria write, as (system, code); system "" when the token
    names none (``code=B20``, ``code=|B20``): such a code is any system's."""
    return searches_codes(criteria_searches(resource))


def searches_codes(searches: list[Search] | None) -> list[tuple[str, str]]:
    """Every token ``searches`` write, as for ``criteria_codes``."""
    from gateway.core.refusals import confining

    found: list[tuple[str, str]] = []
    for rtype, query in searches or ():
        # What names a patient (``subject=b20x``, an id) is no code.
        links = confining(rtype) | {"subject"}
        for name, value in query:
            if name.startswith("_") or name.partition(":")[0] in links:
                continue
            for item in value.split(","):
                if "/" in item and "|" not in item:
                    continue  # a reference
                system, bar, code = item.strip().rpartition("|")
                if not bar:
                    system, code = "", item.strip()
                if code:
                    found.append((system, code))
    return found


_METHODS = frozenset({"GET", "POST"})


def audit_searches(event: Any) -> list[Search] | None:
    """The searches an AuditEvent's entities record (``entity.query``, base64 of the search as
    sent: ``Observation?patient=Patient/ana&code=..``, a compartment search ``Patient/ana/
    Observation?..``, with or without the server's base or the method), or None when one cannot
    be read: base64 that does not decode, a text that is no search of a known shape (fail closed:
    it names an unknown patient)."""
    entities = event.get("entity") if isinstance(event, dict) else None
    if not isinstance(entities, list):
        return [] if entities is None else None
    found: list[Search] = []
    for entity in entities:
        if not isinstance(entity, dict) or "query" not in entity:
            continue
        query = entity["query"]
        if not isinstance(query, str):
            return None
        try:
            text = base64.b64decode("".join(query.split()), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return None
        one = _recorded_search(text)
        if one is None:
            return None
        found.append(one)
    return found


def _recorded_search(text: str) -> Search | None:
    method, space, rest = text.strip().partition(" ")
    if space and method.upper() in _METHODS:
        text = rest.strip()
    path, _, query = text.partition("?")
    if "://" in path:
        path = path.split("://", 1)[1].partition("/")[2]
    segments = [s for s in path.split("/") if s]
    if segments[-1:] == ["_search"]:
        segments.pop()
    if not segments or not TYPE_NAME.fullmatch(segments[-1]):
        return None  # a read, an operation, a system-wide search: what it selects is unknown
    pairs = parse_qsl(query, keep_blank_values=True)
    if len(segments) >= 3 and segments[-3] == "Patient":
        pairs.append(("patient", f"Patient/{segments[-2]}"))  # a compartment search names her
    return segments[-1], pairs
