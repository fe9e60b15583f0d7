"""The processes of a benchmark run: start pinned, wait until they answer, read their CPU, stop."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Cores:
    """Which CPUs the process under test gets, and which the load and the upstream share."""

    under_test: set[int] | None
    load: set[int] | None

    @classmethod
    def split(cls) -> Cores:
        """The first allowed CPU for the process under test, the rest for everything else."""
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2:
            return cls(None, None)
        return cls({allowed[0]}, set(allowed[1:]))

    def describe(self) -> str:
        if self.under_test is None:
            return "not pinned (one CPU)"
        return f"process under test on CPU {sorted(self.under_test)}, load and upstream on CPU {sorted(self.load or ())}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


@dataclass
class Service:
    """A started process that answers HTTP on ``port``."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _clean_env() -> dict[str, str]:
    """The environment without gateway overrides, so only the bench config applies."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}


def start(
    name: str, command: list[str], port: int, cpus: set[int] | None, log: Path, ready_path: str = "/",
    *, timeout_s: float = 30, env: dict[str, str] | None = None,
) -> Service:
    """Start ``command`` pinned to ``cpus`` and wait until ``ready_path`` answers (any status)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**_clean_env(), **(env or {})})
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    service = Service(name, proc, port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at start-up: {log.read_text()[-500:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=1).close()
            return service
        except urllib.error.HTTPError:
            return service
        except OSError:
            time.sleep(0.05)
    service.stop()
    raise RuntimeError(f"{name} did not answer within {timeout_s:.0f} s: {log.read_text()[-500:]}")


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def nginx_config(workdir: Path, port: int, upstream_port: int) -> Path:
    """A single-process nginx passing everything through to the upstream over keep-alive."""
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    fastcgi_temp_path {workdir}/nginx-fastcgi;
    uwsgi_temp_path {workdir}/nginx-uwsgi;
    scgi_temp_path {workdir}/nginx-scgi;
    upstream fhir {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fhir;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffer_size 16k;
            proxy_buffers 256 16k;
            proxy_busy_buffers_size 64k;
        }}
    }}
}}
""")
    return conf


def start_nginx(workdir: Path, port: int, upstream_port: int, cpus: set[int] | None) -> Service | None:
    """nginx as a pass-through baseline, or None when nginx is not installed."""
    if NGINX is None:
        return None
    conf = nginx_config(workdir, port, upstream_port)
    return start("nginx", [NGINX, "-c", str(conf), "-p", str(workdir)], port, cpus, workdir / "nginx.log")
