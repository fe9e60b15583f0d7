"""The demo FHIR server on a real socket, as the upstream of the contract tests."""

from __future__ import annotations

from tests.officer.conftest import demo_fhir

__all__ = ["demo_fhir"]
