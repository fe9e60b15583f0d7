"""Integration tests run against the real FHIR engine: one seeded engine per test session.

Every test under this directory is marked ``integration``. When the engine is not installed
(``tests/upstream/node_modules`` missing) the tests that need it are skipped, reported as one
line.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.integration.engine import Engine, engine_installed, start_engine

_HERE = Path(__file__).resolve().parent
NOT_INSTALLED = "FHIR engine not installed (tests/upstream/node_modules missing): run bash tests/upstream/install.sh"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test collected from this directory as ``integration``."""
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport() -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Report the not-installed skips at one place, so ``-rs`` folds them into one line."""
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and report.longrepr[2].endswith(NOT_INSTALLED):
        report.longrepr = (__file__, 1, report.longrepr[2])
    return report


@pytest.fixture(scope="session")
def fhir_engine() -> Iterator[Engine]:
    """The engine on a free 127.0.0.1 port, seeded with tests/upstream/seed.json and the demo data set."""
    if not engine_installed():
        pytest.skip(NOT_INSTALLED)
    with start_engine() as engine:
        yield engine
