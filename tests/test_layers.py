"""The core is pure: importing any gateway/core module pulls in no adapter package."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "gateway" / "core"
FORBIDDEN = ("aiohttp", "pydantic", "cachetools", "prometheus_client", "yaml")
MODULES = sorted(
    ".".join(p.relative_to(CORE.parents[1]).with_suffix("").parts).removesuffix(".__init__")
    for p in CORE.rglob("*.py")
)
# Clock reads, file I/O and logging have no place in the pure core.
BANNED_SOURCE = re.compile(r"^\s*(import logging|from logging )|time\.time\(|datetime\.now\(|\bopen\(", re.M)


@pytest.mark.parametrize("module", MODULES)
def test_core_module_imports_no_adapter_package(module: str) -> None:
    probe = (
        f"import sys, {module}\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=CORE.parents[1], check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"{module} imports {result.stdout.strip()}"


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: p.name)
def test_core_source_has_no_logging_clock_or_io(path: Path) -> None:
    found = BANNED_SOURCE.findall(path.read_text())
    assert not found, f"{path.name}: {found}"
