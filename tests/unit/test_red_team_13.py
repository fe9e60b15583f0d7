"""Red team 13, the pure parts: what a paging link may name of withheld entries (core.paging), and what a $diff answer may say (core.differences)."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote

import msgspec
import orjson
import pytest

from gateway.core.paging import names_any, outcomes_last, withheld_marks

HIDDEN = {"resourceType": "Condition", "id": "cond-hiv-b20-91a", "meta": {"lastUpdated": "2024-07-15T12:34:56.789Z"}}
KEPT = {"resourceType": "Condition", "id": "cond-htn-1", "meta": {"lastUpdated": "2024-08-01T00:00:00Z"}}
PAGE = orjson.dumps({"resourceType": "Bundle", "type": "searchset",
                     "entry": [{"resource": KEPT}, {"resource": HIDDEN}]})
SENT = [msgspec.Raw(orjson.dumps({"resource": KEPT}))]


def test_the_marks_are_the_withheld_entrys_id_and_times() -> None:
    marks = withheld_marks(PAGE, SENT)
    assert marks == {"cond-hiv-b20-91a", "2024-07-15T12:34:56.789Z", "1721046896", "1721046896789"}


def _b64(text: str, url: bool = False) -> str:
    encode = base64.urlsafe_b64encode if url else base64.b64encode
    return encode(text.encode()).decode()


@pytest.mark.parametrize("query", [
    "_id:above=cond-hiv-b20-91a",
    "_cursor=" + quote(_b64("Condition/cond-hiv-b20-91a|2024-07-15T12:34:56.789Z")),
    "_cursor=" + _b64("Condition/cond-hiv-b20-91a", url=True).rstrip("="),
    "ct=" + quote(_b64(json.dumps({"token": "+RID:~x", "id": "cond-hiv-b20-91a"}))),
    "_lastUpdated=gt" + quote("2024-07-15T12:34:56.789Z"),
    "after=1721046896789",
    "_page_token=" + _b64("1721046896|x", url=True),
])
def test_a_link_naming_a_withheld_entry_is_found_in_every_reading(query: str) -> None:
    assert names_any(f"http://fhir/Condition?patient=Patient/ana&{query}", withheld_marks(PAGE, SENT))


@pytest.mark.parametrize("query", ["_offset=2", "_getpages=4f1c&_getpagesoffset=2",
                                   "_cursor=" + _b64("Condition/cond-htn-1|2024-08-01T00:00:00Z")])
def test_a_link_naming_only_kept_entries_is_not(query: str) -> None:
    assert not names_any(f"http://fhir/Condition?patient=Patient/ana&{query}", withheld_marks(PAGE, SENT))


def test_outcome_entries_go_last() -> None:
    match = msgspec.Raw(b'{"resource":{"resourceType":"Condition","id":"a"},"search":{"mode":"match"}}')
    outcome = msgspec.Raw(b'{"resource":{"resourceType":"OperationOutcome"},"search":{"mode":"outcome"}}')
    later = msgspec.Raw(b'{"resource":{"resourceType":"Condition","id":"b"}}')
    assert outcomes_last([match, outcome, later]) == [match, later, outcome]


# ---------------------------------------------------------------- core.differences ($diff answers)

from gateway.core.differences import scrub_differences  # noqa: E402


def _op(path: str, value: object) -> dict[str, object]:
    return {"name": "operation", "part": [{"name": "type", "valueCode": "replace"},
                                          {"name": "path", "valueString": path}, {"name": "value", **value}]}


@pytest.mark.parametrize("path", ["Condition.evidence[0].detail[0].display", "Condition.text.div", "Condition.text",
                                  "Composition.section[1].text.div", "AuditEvent.entity[0].description"])
def test_a_difference_a_release_may_remove_goes(path: str) -> None:
    answer = {"resourceType": "Parameters", "parameter": [_op(path, {"valueString": "HIV-1 RNA 12000"}),
                                                          _op("Condition.onsetDateTime", {"valueDateTime": "2020"})]}
    assert scrub_differences(answer)
    assert [p["part"][1]["valueString"] for p in answer["parameter"]] == ["Condition.onsetDateTime"]


def test_displays_inside_values_go_and_references_stay() -> None:
    answer = {"resourceType": "Parameters", "parameter": [
        _op("Condition.evidence[0].detail[0]", {"valueReference": {"reference": "Condition/h", "display": "HIV"}})]}
    assert scrub_differences(answer)
    assert answer["parameter"][0]["part"][2] == {"name": "value", "valueReference": {"reference": "Condition/h"}}


def test_other_differences_stay_as_written() -> None:
    answer = {"resourceType": "Parameters", "parameter": [_op("Patient.name[0].family", {"valueString": "Okafor"}),
                                                          _op("Condition.code.text", {"valueString": "Hypertension"})]}
    assert not scrub_differences(answer)
