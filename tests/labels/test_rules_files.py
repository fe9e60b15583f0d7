"""The bundled rules/ files: known systems, each code once, a source for each set, real labels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.core.labels import ACT_CODE_LABELS, CODE_SYSTEMS
from gateway.rules import BUNDLED_RULES

FILES = sorted(BUNDLED_RULES.glob("*.yaml"))


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


CATEGORY_FILES = [p for p in FILES if _load(p).get("kind") == "category"]


def _sets() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, s) for p in CATEGORY_FILES for s in _load(p)["sets"]]


def test_one_file_per_category() -> None:
    names = {p.stem for p in CATEGORY_FILES}
    assert {"hiv-sti", "substance-use", "mental-health", "psychotherapy-notes", "genetic",
            "reproductive-health", "sickle-cell"} <= names
    assert {p.name for p in FILES} >= {"scopes.yaml", "confidentiality.yaml"}


@pytest.mark.parametrize(("file", "code_set"), _sets(), ids=[f"{f}:{s['name']}" for f, s in _sets()])
def test_set_has_known_system_source_and_real_labels(file: str, code_set: dict[str, Any]) -> None:
    assert code_set["system"] in CODE_SYSTEMS
    assert code_set["source"].strip()
    assert code_set["labels"] and set(code_set["labels"]) <= ACT_CODE_LABELS
    for item in code_set["codes"]:
        ((code, display),) = item.items()
        assert str(code).strip() and display.strip()


def test_each_code_appears_once_across_all_files() -> None:
    codes = Counter(
        (code_set["system"], str(code))
        for _, code_set in _sets()
        for item in [*code_set["codes"], *code_set.get("exclude", [])]
        for code in item
    )
    assert [key for key, count in codes.items() if count > 1] == []


def test_rules_cover_every_code_system() -> None:
    assert {code_set["system"] for _, code_set in _sets()} == set(CODE_SYSTEMS)


def test_substance_use_carries_part2_and_leaves_out_nicotine() -> None:
    (sud,) = [p for p in CATEGORY_FILES if p.stem == "substance-use"]
    for code_set in _load(sud)["sets"]:
        assert "42CFRPart2" in code_set["labels"]
    icd = [s for s in _load(sud)["sets"] if s["system"] == "icd-10-cm"]
    ranges = [s for s in icd if any("F12-F19" in item for item in s["codes"])]
    assert len(ranges) == 1
    assert [next(iter(item)) for item in ranges[0]["exclude"]] == ["F17"]
    assert not [item for s in icd for item in s["codes"] if str(next(iter(item))).startswith("F17")]
