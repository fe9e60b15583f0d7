"""Which operations the gateway lets through, where (core.operations): an allow-list.

Each row is a request path below the base (its parts) and what ``refusals.unfilterable``
answers: None (sent, its answer decided per resource) or the stable reason it is refused."""

from __future__ import annotations

import pytest

from gateway.core.operations import ALLOWED, COMPUTING, UNFILTERABLE, configured, level_of
from gateway.core.refusals import unfilterable

LET_THROUGH = [
    # records, decided per resource (or their target decided first)
    "Patient/$everything", "Patient/p1/$everything", "Encounter/e1/$everything", "Patient/p1/$EVERYTHING",
    "Composition/c1/$document", "Patient/p1/$summary", "DocumentReference/$docref", "Observation/$lastn",
    "Patient/$match", "Condition/$validate", "Condition/c1/$validate", "Condition/c1/$meta",
    "Condition/c1/$meta-add", "Condition/c1/$Meta-Delete", "Condition/c1/$expunge",
    "DocumentReference/d1/$binary-access-read", "Binary/b1/$binary-access-write", "$diff", "Condition/$diff", "Group/g1/$everything",
    # terminology and conformance: no patient data
    "ValueSet/$expand", "ValueSet/vs1/$expand", "ValueSet/$validate-code", "CodeSystem/$validate-code",
    "CodeSystem/$lookup", "CodeSystem/$SUBSUMES", "CodeSystem/$find-matches", "ConceptMap/$translate",
    "ConceptMap/cm1/$translate", "$closure", "$versions", "CapabilityStatement/$conforms",
    "CapabilityStatement/$implements", "CapabilityStatement/cs1/$subset", "StructureDefinition/$snapshot",
    "StructureDefinition/$questionnaire",
]

REFUSED = [
    # computing or unfilterable, at any level and in any case
    ("Observation/$stats", "operation:$stats"), ("Observation/$STATS", "operation:$stats"),
    ("$graphql", "operation:$graphql"), ("Patient/p1/$graphql", "operation:$graphql"),
    ("Measure/m1/$evaluate-measure", "operation:$evaluate-measure"), ("$get-resource-counts", "operation:$get-resource-counts"),
    ("$reindex", "operation:$reindex"), ("Patient/p1/$reindex", "operation:$reindex"),
    ("$mark-all-resources-for-reindexing", "operation:$mark-all-resources-for-reindexing"),
    ("Subscription/s1/$trigger-subscription", "operation:$trigger-subscription"),
    ("Patient/$count", "operation:$count"), ("$export-poll-status", "operation:$export-poll-status"),
    ("Bot/b1/$execute", "operation:$execute"), ("$import", "operation:$import"),
    # nobody listed them: unknown
    ("Observation/$summary-stats", "operation:unknown"), ("Observation/$lastn-values", "operation:unknown"),
    ("Patient/p1/$ccda-export", "operation:unknown"), ("Library/l1/$cql-eval", "operation:unknown"),
    ("$custom-report", "operation:unknown"), ("Patient/p1/$summary-rt", "operation:unknown"),
    ("Patient/p1/$csv", "operation:unknown"),
    # known, at a level or on a type where they answer over records not decided
    ("Condition/$meta", "operation:level"), ("$meta", "operation:level"), ("Condition/$expunge", "operation:level"),
    ("$expunge", "operation:level"), ("Condition/c1/$diff", "operation:level"), ("Patient/$summary", "operation:level"),
    ("Composition/$document", "operation:level"), ("$everything", "operation:level"),
    ("Group/$everything", "operation:level"), ("Encounter/$everything", "operation:level"),
    ("Observation/$expand", "operation:level"), ("Observation/o1/$lookup", "operation:level"),
    ("Condition/$lastn", "operation:level"), ("Condition/$meta-add", "operation:level"),
    # a path the table does not know: after a version, in a compartment, parts after it, a lower-case type
    ("Condition/c1/_history/2/$meta", "operation:level"), ("Patient/p1/Observation/$lastn", "operation:level"),
    ("Patient/p1/$everything/x", "operation:level"), ("patient/p1/$everything", "operation:level"),
    ("metadata/$versions", "operation:level"),
]


def parts_of(path: str) -> tuple[tuple[str, ...], str | None]:
    parts = tuple(path.split("/"))
    return parts, next((p for p in parts if p.startswith("$")), None)


@pytest.mark.parametrize("path", LET_THROUGH)
def test_known_operations_are_let_through_where_their_answers_are_decided(path: str) -> None:
    assert unfilterable(*parts_of(path), []) is None


@pytest.mark.parametrize("path,why", REFUSED)
def test_every_other_operation_is_refused(path: str, why: str) -> None:
    assert unfilterable(*parts_of(path), []) == why


def test_a_version_named_in_an_operations_parameters_is_refused() -> None:
    """$diff of two records decides their current versions; an old version's content is not it."""
    parts, op = parts_of("$diff")
    assert unfilterable(parts, op, [("from", "Condition/c1"), ("to", "Condition/c2")]) is None
    for value in ("Condition/c1/_history/1", "http://fhir.example/fhir/Condition/c1/_history/1"):
        assert unfilterable(parts, op, [("from", value), ("to", "Condition/c2")]) == "operation:version"


def test_the_lists_do_not_overlap_and_name_operations_in_lower_case() -> None:
    names = [*ALLOWED, *UNFILTERABLE, *COMPUTING]
    assert len(names) == len(set(names))
    assert all(n.startswith("$") and n == n.lower() for n in names)


def test_levels() -> None:
    assert [level_of(*parts_of(p)) for p in ("$x", "Patient/$x", "Patient/1/$x", "Patient/1/_history/1/$x")] == [  # type: ignore[arg-type]
        "system", "type", "instance", None]


def test_an_operator_allows_more_at_the_level_named() -> None:
    extra = configured(("Patient/[id]/$care-summary", "Observation/$recent", "$site-ping"))
    assert unfilterable(*parts_of("Patient/p1/$care-summary"), [], extra) is None
    assert unfilterable(*parts_of("Patient/p1/$CARE-SUMMARY"), [], extra) is None
    assert unfilterable(*parts_of("Observation/$recent"), [], extra) is None
    assert unfilterable(*parts_of("$site-ping"), [], extra) is None
    assert unfilterable(*parts_of("Patient/$care-summary"), [], extra) == "operation:unknown"
    assert unfilterable(*parts_of("Condition/$recent"), [], extra) == "operation:unknown"
    assert unfilterable(*parts_of("Observation/o1/$recent"), [], extra) == "operation:unknown"


@pytest.mark.parametrize("entry", ["care-summary", "Patient/$", "patient/$x", "Patient/123/$x", "$graphql",
                                   "Observation/$STATS", "Patient/[id]/$everything/x", "$a b"])
def test_an_operator_cannot_allow_what_is_refused_by_design_or_unreadable(entry: str) -> None:
    with pytest.raises(ValueError, match="names an operation|must read"):
        configured((entry,))


def test_an_operators_list_is_read_from_the_environment_and_checked() -> None:
    from gateway.config import ConfigError, load_settings

    base = {"GATEWAY_UPSTREAM__URL": "http://fhir.example.org/fhir"}
    settings = load_settings(None, {**base, "GATEWAY_ENFORCEMENT__ALLOWED_OPERATIONS": "Patient/[id]/$care-summary,$ping"})
    assert settings.enforcement.allowed_operations == ("Patient/[id]/$care-summary", "$ping")
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {**base, "GATEWAY_ENFORCEMENT__ALLOWED_OPERATIONS": "$ping,$graphql"})
    assert str(caught.value).startswith("enforcement.allowed_operations: '$graphql' names an operation")
    assert "\n" not in str(caught.value)
