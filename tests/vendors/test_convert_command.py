"""``consent-gateway convert --from VENDOR FILE``."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from tests.vendors._fixtures import FIXTURES


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main(["convert", *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else out, err


def test_healthex_file_prints_a_consent_bundle_labelled_by_the_bundled_rules(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, bundle, err = run(capsys, "--from", "healthex", str(FIXTURES / "healthex-consents.json"))
    assert (code, err) == (0, "")
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "collection"
    consents = [e["resource"] for e in bundle["entry"]]
    assert all(c["resourceType"] == "Consent" for c in consents)
    # R4: fullUrl is absolute; a name-based UUID of the id, the same on every run
    urls = [e["fullUrl"] for e in bundle["entry"]]
    assert all(u.startswith("urn:uuid:") and uuid.UUID(u[9:]).version == 5 for u in urls)
    assert len(set(urls)) == len(consents)
    _, again, _ = run(capsys, "--from", "healthex", str(FIXTURES / "healthex-consents.json"))
    assert [e["fullUrl"] for e in again["entry"]] == urls
    labels = {
        label["code"]
        for c in consents if c["provision"].get("class") == [
            {"system": "urn:consent-gateway:resource-scope", "code": "LABS"}]
        for label in c["provision"].get("securityLabel", [])
    }
    assert labels == {"HIV", "STD"}  # rules/scopes.yaml: HIV_OR_STI -> HIV, STD


def test_clinikapi_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, bundle, _ = run(capsys, "--from", "clinikapi", str(FIXTURES / "clinikapi-consents.json"))
    assert code == 0
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["ck-consent-1", "ck-consent-2"]


def test_healtheintent_page_needs_the_patient(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(FIXTURES / "healtheintent-consents.json")
    code, bundle, _ = run(capsys, "--from", "healtheintent", "--patient", "he-1", path)
    assert code == 0
    assert {e["resource"]["patient"]["reference"] for e in bundle["entry"]} == {"Patient/he-1"}
    assert len(bundle["entry"]) == 3

    code, out, err = run(capsys, "--from", "healtheintent", path)
    assert (code, out) == (2, "")
    assert err == (
        "consent-gateway convert: healtheintent consent 47308251-5337-4221-a0c1-05b348d963ca: "
        "patientId: missing: the patient is not in the record, pass it in\n"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON (line 1)"),
        ('[{"patientId": "p", "consents": [{"consentType": "X", "hasPatientConsented": true}]}]',
         "healthex response[0].consents[0]: consentType: unknown value"),
        ('"a string"', "healthex: (payload): expected an object or a list"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    path = tmp_path / "in.json"
    path.write_text(content)
    code, out, err = run(capsys, "--from", "healthex", str(path))
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert message in err


def test_missing_file_and_bad_patient_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--from", "clinikapi", str(tmp_path / "absent.json"))
    assert code == 2
    assert "cannot read" in err and err.count("\n") == 1
    code, _, err = run(
        capsys, "--from", "healtheintent", "--patient", "Group/1",
        str(FIXTURES / "healtheintent-consents.json"),
    )
    assert code == 2
    assert "--patient: expected Patient/<id>" in err


def test_unloadable_rules_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "--from", "healthex", "--rules-dir", str(tmp_path), str(FIXTURES / "healthex-consents.json")
    )
    assert code == 2
    assert "no rules" in err and err.count("\n") == 1
