"""Fixtures for the deployment tests: the parsed Dockerfile and the chart rendered by real Helm.

The chart is rendered by Helm's own Go engine through ``helm-python-sdk`` (module
``helm_python``: a ctypes binding whose wheel ships libhelm), so what passes here is what
``helm template`` and ``helm lint`` produce. When the SDK is missing, the tests that need it
skip on a workstation and fail under CI (``CI=true``).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import yaml

from .support import (
    CHART_DIR,
    DOCKERFILE,
    Manifest,
    Stage,
    parse_dockerfile,
    require_tool,
)

Render = Callable[..., list[Manifest]]


@pytest.fixture(scope="session")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def final_stage(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="session")
def helm() -> ModuleType:
    try:
        import helm_python
    except ImportError:
        require_tool("helm-python-sdk (Helm's engine)", "pip install helm-python-sdk==0.2.2")
    return helm_python


@pytest.fixture(scope="session")
def render(helm: ModuleType) -> Render:
    """Render like ``helm template NAME helm/consent-gateway -n NAMESPACE``; NOTES dropped."""

    def run(values: dict[str, Any] | None = None, *, name: str = "ehr", namespace: str = "fhir") -> list[Manifest]:
        with helm.Chart.load(str(CHART_DIR)) as chart:
            rendered: dict[str, str] = chart.render(values or {}, name=name, namespace=namespace)
        return [
            doc
            for path, text in sorted(rendered.items())
            if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text)
            if doc
        ]

    return run
