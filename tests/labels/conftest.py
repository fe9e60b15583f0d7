"""The bundled rules, compiled once for the whole label test package."""

from __future__ import annotations

import pytest

from gateway.core.labels import LabelIndex
from gateway.rules import load_rules


@pytest.fixture(scope="session")
def index() -> LabelIndex:
    return load_rules()
