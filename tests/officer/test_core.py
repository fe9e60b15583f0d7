"""The pure parts: what the decision log keeps of a request, DS4P marking, the AuditEvents."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from gateway.config import ConfigError, build_settings

from gateway.core.ds4p import NORDSLCD, add_notice, mark
from gateway.core.model import V3_ACT_CODE, Actor, Label
from gateway.core.officer import disclosure_event, is_break_glass, loggable_path, loggable_query, review_event, tags_of


def test_loggable_query_keeps_only_values_that_name_no_code_or_record() -> None:
    assert loggable_query("patient=pat-1&_count=10&_include=Observation:subject") == (
        "patient=pat-1&_count=10&_include=Observation:subject", True)
    assert loggable_query("patient=p&code=http://loinc.org|75622-1") == ("patient=p&code=*", False)
    assert loggable_query("_has:Condition:subject:code=B20") == ("_has:Condition:subject:code=*", False)
    assert loggable_query("_id=cond-hiv") == ("_id=*", False)
    assert loggable_query("subject.name=Reyes") == ("subject.name=*", False)
    assert loggable_query("") == ("", True)


def test_loggable_path_hides_the_id_of_a_denied_read_only() -> None:
    assert loggable_path(("Condition", "cond-hiv"), denied=True) == ("/Condition/*", False)
    assert loggable_path(("Condition", "cond-hiv"), denied=False) == ("/Condition/cond-hiv", True)
    assert loggable_path(("Condition", "_search"), denied=True) == ("/Condition/_search", True)
    assert loggable_path(("Condition",), denied=True) == ("/Condition", True)


def test_mark_adds_each_label_once_and_the_part2_refrain() -> None:
    resource = {"resourceType": "Condition", "meta": {"security": [{"system": V3_ACT_CODE, "code": "ETH"}]}}
    labels = [Label(V3_ACT_CODE, "42CFRPart2"), Label(V3_ACT_CODE, "ETH")]
    assert mark(resource, labels) is True
    codes = [c["code"] for c in resource["meta"]["security"]]
    assert sorted(codes) == sorted(["ETH", "42CFRPart2", NORDSLCD])
    assert mark(resource, labels) is False
    hiv = {"resourceType": "Observation"}
    assert mark(hiv, [Label(V3_ACT_CODE, "HIV")]) is True
    assert [c["code"] for c in hiv["meta"]["security"]] == ["HIV"]
    assert mark({"resourceType": "Observation"}, []) is False


def test_notice_goes_on_bundle_meta_once() -> None:
    bundle = {"resourceType": "Bundle", "type": "searchset"}
    assert add_notice(bundle) is True and add_notice(bundle) is False
    assert len(bundle["meta"]["extension"]) == 1 and "extension" not in {k for k in bundle if k != "meta"}


def test_audit_events_are_told_apart() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    disclosure = disclosure_event(event_id="d1", actor=Actor("Practitioner/1", organization="Organization/9"),
                                  purpose="TREAT", patient="Patient/p", now=now,
                                  resources=[("Condition/c", [Label(V3_ACT_CODE, "HIV")])], interaction="read")
    assert tags_of(disclosure) == {"disclosure"} and not is_break_glass(disclosure)
    assert disclosure["agent"][1]["who"]["reference"] == "Organization/9"
    assert disclosure["entity"][1]["securityLabel"] == [{"system": V3_ACT_CODE, "code": "HIV"}]
    review = review_event(event_id="r1", reviewed="bg1", reviewer="Kim", now=now, note="")
    assert tags_of(review) == {"break-glass-review"} and review["entity"][0]["what"]["reference"] == "AuditEvent/bg1"


def test_config_names_the_key_of_a_bad_mode() -> None:
    base = {"upstream": {"url": "http://fhir:8080/fhir"}}
    assert build_settings(base).audit.disclosures == "sensitive"
    with pytest.raises(ConfigError, match=r"^enforcement\.mode: "):
        build_settings({**base, "enforcement": {"mode": "report"}})
    with pytest.raises(ConfigError, match=r"^audit\.disclosures: "):
        build_settings({**base, "audit": {"disclosures": "some"}})
