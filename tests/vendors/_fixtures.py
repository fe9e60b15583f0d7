"""Vendor fixtures written from the documented schemas (shared/seeds), loaded fresh per call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> Any:
    """A fresh copy of ``fixtures/<name>``, so a test can change it without affecting others."""
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))
