"""Helpers for the deployment tests: a Dockerfile parser and lookups over rendered manifests."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "consent-gateway"
DOCKERFILE = REPO / "Dockerfile"
DASHBOARD = CHART_DIR / "dashboards" / "consent-gateway.json"

Manifest = dict[str, Any]


def require_tool(what: str, hint: str) -> None:
    """Skip locally, fail in CI: a deploy check that silently never runs proves nothing."""
    message = f"{what} is not installed ({hint})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction with its continuation lines joined."""

    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON-array (exec) form of the arguments after any ``--flag``s and ``CMD``."""
        words = self.args.split(" ")
        while words and words[0].startswith("--"):
            words.pop(0)
        if words and words[0] == "CMD":
            words.pop(0)
        try:
            value = json.loads(" ".join(words))
        except json.JSONDecodeError:
            return None
        return [str(v) for v in value] if isinstance(value, list) else None


@dataclass
class Stage:
    """A build stage: its FROM image, optional name and instructions."""

    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        """Every instruction of this stage with the given keyword."""
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        """The last instruction with that keyword (Docker keeps only the last USER, CMD, ...)."""
        found = self.all(keyword)
        assert found, f"no {keyword} in stage {self.name or self.image}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages (comments dropped, ``\\`` continuations joined)."""
    stages: list[Stage] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        keyword, _, args = " ".join([*pending, line]).partition(" ")
        pending = []
        instruction = Instruction(keyword.upper(), " ".join(args.split()), start)
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"line {start}: {keyword} before FROM"
            stages[-1].instructions.append(instruction)
    assert not pending, "Dockerfile ends inside a continued line"
    return stages


def image_default_config(stage: Stage) -> dict[str, Any]:
    """The gateway.yaml the image writes with ``printf '%s\\n' LINE... > FILE``."""
    for run in stage.all("RUN"):
        words = shlex.split(run.args)
        if words[:2] == ["printf", "%s\\n"] and "/etc/consent-gateway/gateway.yaml" in words:
            loaded = yaml.safe_load("\n".join(words[2 : words.index(">")]))
            assert isinstance(loaded, dict)
            return loaded
    raise AssertionError("the image writes no default /etc/consent-gateway/gateway.yaml")


def load_values(name: str) -> dict[str, Any]:
    """A value set from the chart's ci/ folder."""
    loaded = yaml.safe_load((CHART_DIR / "ci" / f"{name}-values.yaml").read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def find(manifests: list[Manifest], kind: str) -> Manifest:
    """The one manifest of a kind."""
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def find_named(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    """The manifest of a kind with that name."""
    for manifest in manifests:
        if manifest["kind"] == kind and manifest["metadata"]["name"] == name:
            return manifest
    raise AssertionError(f"no {kind} named {name}")


def kinds_and_names(manifests: list[Manifest]) -> set[tuple[str, str]]:
    """(kind, name) of every manifest."""
    return {(m["kind"], m["metadata"]["name"]) for m in manifests}
