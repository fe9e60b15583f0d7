"""Requests the gateway cannot filter safely, and the patients a request names.

A refused request is answered 403 unless every patient it names is unconditionally
permitted; a request that names no patient cannot be proven safe and stays refused.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl
from collections.abc import Iterable, Sequence

from gateway.core.compartment import PATIENT_COMPARTMENT, is_patient_data
from gateway.core.fhir import TYPE_NAME, Bases, local_reference
from gateway.core.operations import NONE_CONFIGURED, Configured, names_version, refusal

_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_RECORD = re.compile(r"^([A-Z][A-Za-z]{1,63})/[A-Za-z0-9\-.]{1,64}$")

# Search parameters that select by data the requester may not see.
UNFILTERABLE_PARAMS = frozenset({"_filter", "_query", "_text", "_content", "_list"})


def unfilterable(
    parts: tuple[str, ...], operation: str | None, query: Sequence[tuple[str, str]],
    operations: Configured = NONE_CONFIGURED,
) -> str | None:
    """Why this request cannot be filtered (a stable code), or None when it can.

    An operation is let through only where ``core.operations`` (or the operator's
    ``operations``) allows it; a version named in its parameters is refused.

    SECURITY: names are compared in any case (``$STATS``, ``_HAS:``, ``_Filter``): the gateway
    cannot know that the FHIR server reads them only as FHIR writes them."""
    if operation is not None:
        why = refusal(parts, operation, operations)
        if why is not None:
            return why
        if any(names_version(value) for _, value in query):
            return "operation:version"
    if parts and parts[-1].lower() == "_history" and len(parts) <= 2:
        return "history:type" if len(parts) == 2 else "history:system"
    for name, value in query:
        base = name.split(":", 1)[0].lower()
        if base.startswith("_has"):
            return "param:_has"
        if base == "_summary" and value.strip().lower() == "count":
            return "param:_summary=count"
        if base in UNFILTERABLE_PARAMS:
            return f"param:{base}"
        if base == "_contained" and value.strip() not in ("", "false"):
            return "param:_contained"
        if "." in name:
            # A chain selects by another resource's content, which may be hidden.
            return "param:chain"
    return None


def conditional_write(method: str, parts: tuple[str, ...], if_none_exist: str | None) -> str | None:
    """A conditional write selects records by a search whose answer may be hidden; an update,
    patch or delete of a type (``DELETE Condition?code=B20``) or of the base is one."""
    if if_none_exist:
        return "conditional:create"
    # SECURITY: without a query (``DELETE Condition``, or at the base) the search matches every
    # record: a server that runs it changes hidden ones and may count or name them.
    if method in ("PUT", "PATCH", "DELETE") and len(parts) <= 1:
        return f"conditional:{method.lower()}"
    return None


def conditional_search(method: str, parts: tuple[str, ...], if_none_exist: str | None, query: str) -> str | None:
    """The search a conditional write selects by (its ``If-None-Exist``, or the query of an update,
    patch or delete of a type), or None when the request is no conditional write of a type."""
    if len(parts) != 1:
        return None
    if method == "POST" and if_none_exist:
        return if_none_exist
    return query if method in ("PUT", "PATCH", "DELETE") else None


def visible_matches(page: object, rtype: str) -> list[str]:
    """The ids of the ``rtype`` matches a decided search set still holds (includes and the
    gateway's outcome entry aside)."""
    if not isinstance(page, dict):
        return []
    ids = []
    for entry in page.get("entry") or ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        mode = (entry.get("search") or {}).get("mode") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == rtype and mode in (None, "match") \
                and isinstance(resource.get("id"), str):
            ids.append(resource["id"])
    return ids


def narrowed(condition: str, visible: Sequence[str]) -> str:
    """A conditional write's search confined to the matches the requester may see: the server
    then finds what it would find were the hidden matches not there (``_id`` is ANDed with the
    rest of the search)."""
    return "&".join(filter(None, (condition, "_id=" + ",".join(visible))))


def subscription_write(method: str, resource_type: str | None) -> str | None:
    """A Subscription the FHIR server would act on: it pushes what its criteria select (new HIV
    results, say) to an endpoint or websocket of the subscriber's choosing, around the gateway,
    and goes on doing so after a consent is revoked. Deleting one stops a push; anything else
    (create, update, patch) starts or changes one."""
    if resource_type == "Subscription" and method in ("POST", "PUT", "PATCH"):
        return "subscription"
    return None


def subscription_criteria(resource: object) -> tuple[tuple[str, ...], list[tuple[str, str]]] | None:
    """The search a Subscription's ``criteria`` names (``Observation?patient=Patient/1``) as
    (type, query), or None when it names none the gateway can read: a topic's canonical URL, or
    filters the backport writes in extensions of ``_criteria``, select by what is not checked."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Subscription" or "_criteria" in resource:
        return None
    criteria = resource.get("criteria")
    if not isinstance(criteria, str) or "?" not in criteria:
        return None
    rtype, _, query = criteria.partition("?")
    if not TYPE_NAME.fullmatch(rtype):
        return None
    return (rtype,), parse_qsl(query, keep_blank_values=True)


def _confining(params: Iterable[str]) -> frozenset[str]:
    # Patient?link= finds other (linked) patients: it confines nothing.
    links = set(params) - {"link"}
    if "subject" in links or "patient" in links:
        links.add("patient")  # R4 defines ``patient`` (subject as a Patient) wherever ``subject`` is
    return frozenset(links)


# The search parameters that confine a search of each type to patients, built once.
_CONFINING = {rtype: _confining(params) for rtype, params in PATIENT_COMPARTMENT.items()}


def confining(rtype: str) -> frozenset[str]:
    """The search parameters that confine a search of ``rtype`` to patients (``_id`` on Patient)."""
    links = _CONFINING.get(rtype, frozenset())
    return links | {"_id"} if rtype == "Patient" else links


def named_patients(parts: tuple[str, ...], query: Iterable[tuple[str, str]]) -> frozenset[str] | None:
    """The patients a request is confined to, or None when it is not confined.

    Only parameters the resource type really has count (its Patient-compartment search
    parameters, or ``_id`` on Patient): a server ignores an unknown parameter, so accepting
    one would let a request borrow a confinement it does not have.
    """
    found: set[str] = set()
    rtype = parts[0] if parts else ""
    if len(parts) >= 2 and rtype == "Patient":
        if not _FHIR_ID.match(parts[1]):
            return None
        found.add(f"Patient/{parts[1]}")
    links = _CONFINING.get(rtype, frozenset())
    if rtype == "Patient" and len(parts) == 1:
        links = links | {"_id"}
    for name, value in query:
        base, _, modifier = name.partition(":")
        if base not in links or modifier not in ("", "Patient"):
            continue
        for item in value.split(","):
            item = item.strip()
            patient = item if item.startswith("Patient/") else (f"Patient/{item}" if "/" not in item else None)
            if patient is None or not _FHIR_ID.match(patient[len("Patient/"):]):
                return None
            found.add(patient)
    return frozenset(found) or None


def named_records(query: Iterable[tuple[str, str]], ours: Bases) -> frozenset[str]:
    """The records a search names by reference (``target=Observation/1``, its absolute URL under
    one of ``ours``, ``target:Observation=1``), as ``Type/id``: patient data other than a Patient,
    and Binaries. A search by a record finds what refers to it, so it tells that the record is
    there; whether the requester may see it is decided apart (404 mode, ``web.exchange``).

    Not here: ``_id`` and other ``_`` parameters (their matches are the records themselves,
    decided), chains (refused or decided elsewhere), Patients (a search naming one is confined to
    her, and her consents decide each match), references by identifier (unread)."""
    found: set[str] = set()
    for name, value in query:
        base, _, modifier = name.partition(":")
        if base.startswith("_") or "." in name:
            continue
        typed = modifier if TYPE_NAME.match(modifier) else None
        for item in value.split(","):
            item = item.strip()
            if "/" not in item:
                if typed is None:
                    continue
                item = f"{typed}/{item}"
            ref = local_reference(item, ours)
            match = _RECORD.match(ref) if ref is not None else None
            if ref is None or match is None:
                continue
            rtype = match.group(1)
            if rtype != "Patient" and (is_patient_data(rtype) or rtype == "Binary"):
                found.add(ref)
    return frozenset(found)
