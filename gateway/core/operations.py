"""The FHIR operations the gateway knows, and which of them it lets through: an allow-list.

An operation is sent to the FHIR server only when this table (or the operator's
``enforcement.allowed_operations``) names it at the level it is called (system ``$op``, type
``Type/$op``, instance ``Type/<id>/$op``) and on that resource type. Everything else is refused
(403, ``refusals.unfilterable``): an operation the gateway does not know may answer what it
computed from records (a count, a statistic, a value in a ``Parameters``, a narrative, a page),
which says what hidden records hold though it holds none of them to withhold.

Classes of what is allowed:

- ``records``: the answer is made of resources (a Bundle, a Parameters of resources, one
  resource), each decided on its own like a search's entries; the instance an operation names
  (in its path or its parameters) is decided before it is sent (``web.exchange``), so the
  operation runs only on what the requester may read (404 mode: as on a missing record).
- ``terminology``: code systems, value sets, concept maps: answers computed from terminology,
  not from any patient's record (resources in no patient compartment, CONTRACT §5). Allowed
  only on the types the operation is defined on, so a server's custom ``Observation/$expand``
  is not taken for one.
- ``conformance``: the server's own definitions (capabilities, profiles).

Names are compared in any case (``$STATS`` is ``$stats``): the gateway cannot know that the
FHIR server reads them only as FHIR writes them. Pure: a table and a lookup, O(1) per request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.core.fhir import TYPE_NAME

SYSTEM, TYPE, INSTANCE = "system", "type", "instance"
_ALL_LEVELS = frozenset({SYSTEM, TYPE, INSTANCE})


@dataclass(frozen=True, slots=True)
class Allowed:
    """Where an operation is let through: its levels, and the types it runs on (None: any)."""

    kind: str                       # "records" | "terminology" | "conformance" | "configured"
    levels: frozenset[str]
    types: frozenset[str] | None = None

    def admits(self, level: str, rtype: str | None) -> bool:
        return level in self.levels and (self.types is None or rtype in self.types)


def _at(kind: str, *levels: str, types: tuple[str, ...] | None = None) -> Allowed:
    return Allowed(kind, frozenset(levels), None if types is None else frozenset(types))


_TERMINOLOGY = "terminology"
_RECORDS = "records"
_CONFORMANCE = "conformance"

# Operations let through, where. Sources: FHIR R4 operation list
# (http://hl7.org/fhir/R4/operationslist.html), IPS (http://hl7.org/fhir/uv/ips/OperationDefinition-summary.html),
# US Core (http://hl7.org/fhir/us/core/OperationDefinition-docref.html), HAPI FHIR's JPA server
# operations (https://hapifhir.io/hapi-fhir/docs/server_jpa/).
ALLOWED: dict[str, Allowed | tuple[Allowed, ...]] = {
    # R4 Patient/Encounter $everything: a Bundle of the patient's records, each decided; the
    # patient's own record decides Patient/<id>/$everything (404 mode: web.batch.subject_hidden);
    # an Encounter's is decided before it is sent.
    # (R4 group-operations: a Group's $everything, its members' records, each decided; the Group
    # is patient data, decided before it runs.)
    "$everything": (_at(_RECORDS, TYPE, INSTANCE, types=("Patient",)), _at(_RECORDS, INSTANCE, types=("Encounter", "Group"))),
    # R4 Composition/<id>/$document: a document Bundle of the Composition and what it names, each
    # decided, narratives of withheld entries scrubbed (core.references). Instance only: at type
    # level the Composition is named by an ``id`` parameter, not decided before it runs. With
    # ``persist`` the server stores the Bundle: a read of it is decided entry by entry.
    "$document": _at(_RECORDS, INSTANCE, types=("Composition",)),
    # IPS Patient/<id>/$summary: a document Bundle (Composition and entries) as $document. Instance
    # only: at type level (``identifier``) the patient is not decided before it runs.
    "$summary": _at(_RECORDS, INSTANCE, types=("Patient",)),
    # US Core DocumentReference/$docref: a searchset Bundle of DocumentReferences, each decided.
    "$docref": _at(_RECORDS, TYPE, types=("DocumentReference",)),
    # R4 Observation/$lastn: a searchset of Observations, each decided, like a search.
    "$lastn": _at(_RECORDS, TYPE, types=("Observation",)),
    # R4 Patient/$match (MPI): a searchset of Patients, each decided, like Patient?identifier=.
    "$match": _at(_RECORDS, TYPE, types=("Patient",)),
    # R4 Resource $validate: an OperationOutcome on the resource sent (or the instance, decided
    # first). Nothing stored is read at type level but what the body names.
    "$validate": _at(_RECORDS, TYPE, INSTANCE),
    # R4 Resource $meta/$meta-add/$meta-delete, HAPI $expunge: on one instance, decided first (a
    # deciding type's $meta-delete is refused: web.exchange.check_deciding_write). Above the
    # instance they answer over every record of the type ($meta: the labels of hidden records;
    # $expunge: how many it removed): refused there. $meta-add/$meta-delete/$expunge write; a
    # write passes like any other (CONTRACT §6) once its target is readable.
    "$meta": _at(_RECORDS, INSTANCE),
    "$meta-add": _at(_RECORDS, INSTANCE),
    "$meta-delete": _at(_RECORDS, INSTANCE),
    "$expunge": _at(_RECORDS, INSTANCE),
    # HAPI $binary-access-read/-write: one attachment of one instance (decided first); an answer
    # that is not JSON is refused anyway (web.proxy.parse_body: 502).
    "$binary-access-read": _at(_RECORDS, INSTANCE),
    "$binary-access-write": _at(_RECORDS, INSTANCE),
    # HAPI $diff?from=A&to=B (system and type level; https://hapifhir.io/hapi-fhir/docs/server_jpa/diff.html):
    # the differences of two records as a Parameters of values, both records decided first (a
    # versioned reference, ``from=Patient/1/_history/2``, is refused: an old version is not the
    # record decided). The instance form compares versions of one record, none decided: refused.
    "$diff": _at(_RECORDS, SYSTEM, TYPE),
    # R4 terminology: ValueSet, CodeSystem, ConceptMap; no patient data.
    "$expand": _at(_TERMINOLOGY, TYPE, INSTANCE, types=("ValueSet",)),
    "$validate-code": _at(_TERMINOLOGY, TYPE, INSTANCE, types=("ValueSet", "CodeSystem")),
    "$lookup": _at(_TERMINOLOGY, TYPE, INSTANCE, types=("CodeSystem",)),
    "$subsumes": _at(_TERMINOLOGY, TYPE, INSTANCE, types=("CodeSystem",)),
    "$find-matches": _at(_TERMINOLOGY, TYPE, INSTANCE, types=("CodeSystem",)),
    "$translate": _at(_TERMINOLOGY, TYPE, INSTANCE, types=("ConceptMap",)),
    "$closure": _at(_TERMINOLOGY, SYSTEM),
    # R4 conformance: the server's capabilities and profiles.
    "$versions": _at(_CONFORMANCE, SYSTEM),
    "$conforms": _at(_CONFORMANCE, TYPE, types=("CapabilityStatement",)),
    "$implements": _at(_CONFORMANCE, TYPE, INSTANCE, types=("CapabilityStatement",)),
    "$subset": _at(_CONFORMANCE, INSTANCE, types=("CapabilityStatement",)),
    "$snapshot": _at(_CONFORMANCE, TYPE, types=("StructureDefinition",)),
    "$questionnaire": _at(_CONFORMANCE, TYPE, INSTANCE, types=("StructureDefinition",)),
}

# Operations refused because their answers cannot be decided per resource (known, named here so
# a reader sees they were weighed; an unknown one is refused all the same).
# - ``$graphql`` (R4): a query over references, answered as JSON that is no resource.
# - ``$export``, ``$export-poll-status``, ``$import`` (SMART Bulk Data; Da Vinci
#   ``$davinci-data-export``): files written and read around the gateway.
# - ``$process-message`` (R4): a message Bundle the server acts on and answers.
# - ``$merge``, ``$hapi.fhir.replace-references`` (HAPI): move records between compartments;
#   the preview counts them.
# - ``$get-ws-binding-token``, ``$events``, ``$status`` (R4B Subscriptions backport),
#   ``$trigger-subscription`` (HAPI), ``$resend`` (Medplum): notifications sent around the gateway,
#   numbered and counted over hidden records.
UNFILTERABLE: frozenset[str] = frozenset({
    "$graphql", "$export", "$export-poll-status", "$import", "$davinci-data-export", "$process-message",
    "$merge", "$hapi.fhir.replace-references", "$get-ws-binding-token", "$events", "$status",
    "$trigger-subscription", "$resend",
})
# Operations whose answer is computed from records, not made of them: it holds no hidden record
# to withhold, yet says what hidden ones are.
# - ``$evaluate-measure``, ``$collect-data``, ``$care-gaps`` (R4 Measure, Da Vinci DEQM), ``$evaluate``, ``$cql`` (CQL), ``$apply`` (R4 PlanDefinition,
#   ActivityDefinition), ``$stats`` (R4 Observation): counts, statistics, computed results.
# - ``$populate``, ``$populatehtml``, ``$populatelink`` (R4 Questionnaire, SDC), ``$prepopulate``
#   (cqf-ruler), ``$questionnaire-package``, ``$next-question`` (Da Vinci DTR, SDC): forms filled
#   from records. ``$member-match`` (Da Vinci HRex): a matched member's identifier.
# - ``$get-resource-counts`` (HAPI), ``$totals`` (Blaze), ``$count``: _summary=count of every type.
# - ``$reindex``, ``$reindex-dryrun``, ``$mark-all-resources-for-reindexing``,
#   ``$perform-reindexing-pass`` (HAPI, Medplum): server administration over every record,
#   answered with counts and jobs. ``$execute`` (Medplum Bot): code run with the server's access.
COMPUTING: frozenset[str] = frozenset({
    "$evaluate-measure", "$collect-data", "$care-gaps", "$evaluate", "$cql", "$apply",
    "$stats", "$populate", "$populatehtml", "$populatelink", "$prepopulate", "$questionnaire-package",
    "$next-question", "$member-match", "$get-resource-counts", "$totals", "$count", "$reindex",
    "$reindex-dryrun", "$mark-all-resources-for-reindexing", "$perform-reindexing-pass", "$execute",
})

# An operator's entry (``enforcement.allowed_operations``): ``$op`` (system), ``Type/$op``
# (type) or ``Type/[id]/$op`` (instance).
CONFIGURED_ENTRY = re.compile(r"^(?:([A-Z][A-Za-z]{1,63})/(\[id\]/)?)?(\$[A-Za-z][A-Za-z0-9_.\-]{0,63})$")

Configured = frozenset[tuple[str, str, str | None]]  # (name in lower case, level, type)
NONE_CONFIGURED: Configured = frozenset()


def configured(entries: tuple[str, ...]) -> Configured:
    """The operator's entries as (name, level, type); a name the gateway refuses by design, or an
    entry it cannot read, raises ValueError naming it (the config check reports it)."""
    found: set[tuple[str, str, str | None]] = set()
    for entry in entries:
        match = CONFIGURED_ENTRY.match(entry)
        if match is None:
            raise ValueError(f"{entry!r} must read $op, Type/$op or Type/[id]/$op")
        rtype, instance, name = match.group(1), match.group(2), match.group(3).lower()
        if name in UNFILTERABLE or name in COMPUTING:
            raise ValueError(f"{entry!r} names an operation whose answer cannot be decided per resource")
        level = SYSTEM if rtype is None else (INSTANCE if instance else TYPE)
        found.add((name, level, rtype))
    return frozenset(found)


def level_of(parts: tuple[str, ...], operation: str) -> str | None:
    """The level an operation is called at; None for any other path (after a version, inside a
    compartment, with parts after it)."""
    index = parts.index(operation)
    if index != len(parts) - 1 or index > 2 or (index > 0 and not TYPE_NAME.match(parts[0])):
        return None
    return (SYSTEM, TYPE, INSTANCE)[index]


def refusal(parts: tuple[str, ...], operation: str, extra: Configured = NONE_CONFIGURED) -> str | None:
    """Why an operation is refused (a stable code: ``operation:<name>`` for a known one,
    ``operation:unknown``, ``operation:level``), or None when it is let through.

    SECURITY: an allow-list: an operation named nowhere is refused, at any level, in any case."""
    name = operation.lower()
    if name in UNFILTERABLE or name in COMPUTING:
        return f"operation:{name}"
    level = level_of(parts, operation)
    if level is None:
        return "operation:level"
    rtype = parts[0] if level != SYSTEM else None
    allowed = ALLOWED.get(name)
    places = (allowed,) if isinstance(allowed, Allowed) else allowed or ()
    if any(place.admits(level, rtype) for place in places) or (name, level, rtype) in extra:
        return None
    return "operation:level" if allowed is not None else "operation:unknown"


def names_version(value: str) -> bool:
    """A parameter naming one version of a record (``Condition/1/_history/2``): the gateway
    decides a record's current version, not an old one's content."""
    return "/_history/" in value or value.endswith("/_history")
