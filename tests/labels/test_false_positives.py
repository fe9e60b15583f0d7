"""A routine, Synthea-like record earns no sensitivity label (bench.label reports the same rate)."""

from __future__ import annotations

from bench.label import ROUTINE_CODES, false_positives, routine_mix


def test_routine_record_has_no_false_positive() -> None:
    labeled, total, which = false_positives()
    assert total == len(ROUTINE_CODES) == len(routine_mix())
    assert (labeled, which) == (0, [])
