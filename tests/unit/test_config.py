"""Configuration: CONTRACT §3 defaults, YAML then GATEWAY_<SECTION>__<KEY> env, one-line errors.

The exit code and stderr of ``consent-gateway serve`` on a bad config are in test_cli_serve.py;
here the same problems are checked in-process, where every message can be read cheaply.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import settings_from_args
from gateway.config import ConfigError, build_settings, load_settings

UPSTREAM = "http://fhir:8080/fhir"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_every_contract_key_has_its_default() -> None:
    s = build_settings({"upstream": {"url": UPSTREAM}})
    assert s.upstream.url == UPSTREAM
    assert (s.upstream.timeout_s, s.upstream.max_connections) == (30, 100)
    assert s.public_base_url is None
    assert (s.listen.host, s.listen.port) == ("0.0.0.0", 8080)
    assert (s.admin.host, s.admin.port) == ("127.0.0.1", 9090)
    assert (s.auth.mode, s.auth.default_purpose) == ("headers", "TREAT")
    c = s.consent
    assert (c.source_kind, c.source_url, c.source_api_key_env) == ("fhir", None, None)
    assert (c.cache_ttl_s, c.cache_max_patients) == (60, 100000)
    assert (c.default_decision, c.combining, c.patient_self_access) == ("deny", "deny-overrides", True)
    assert s.consent_source_url == UPSTREAM  # source_url defaults to upstream.url
    assert s.sensitivity.rules_dir is None
    assert s.sensitivity.explicit_consent_required == "all"
    assert s.enforcement.denied_read_status == 403
    assert s.enforcement.refill_max_pages == 10
    bg = s.break_glass
    assert bg.enabled is True
    assert list(bg.reasons) == ["Patient Unresponsive.", "Medical emergency", "Imminent threat to life"]
    assert (bg.duration_h, bg.record_consent) == (4, True)
    assert str(s.audit.path) == "audit.jsonl"
    assert s.audit.fhir_url is None
    assert s.listen.max_body_bytes == 16 * 1024 * 1024


def test_contract_example_file_is_accepted(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
upstream: {url: http://fhir:8080/fhir, timeout_s: 30, max_connections: 100}
public_base_url: null
listen: {host: 0.0.0.0, port: 8080}
admin:  {host: 127.0.0.1, port: 9090}
auth:
  mode: headers
  default_purpose: TREAT
consent:
  source_kind: fhir
  source_url: null
  source_api_key_env: null
  cache_ttl_s: 60
  cache_max_patients: 100000
  default_decision: deny
  combining: deny-overrides
  patient_self_access: true
sensitivity:
  rules_dir: null
  explicit_consent_required: [PSY, ETH]
enforcement:
  denied_read_status: 404
break_glass:
  enabled: true
  reasons: ["Patient Unresponsive.", "Medical emergency", "Imminent threat to life"]
  duration_h: 4
  record_consent: true
audit:
  path: audit.jsonl
  fhir_url: null
""",
    )
    s = load_settings(path, {})
    assert tuple(s.sensitivity.explicit_consent_required) == ("PSY", "ETH")
    assert s.enforcement.denied_read_status == 404


def test_yaml_file_then_environment_and_env_wins(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "upstream: {url: http://file-host/fhir, timeout_s: 7}\n"
        "listen: {port: 8081}\n"
        "auth: {default_purpose: HPAYMT}\n",
    )
    env = {
        "GATEWAY_UPSTREAM__URL": "https://env-host:8443/R4",
        "GATEWAY_LISTEN__PORT": "8082",
        "GATEWAY_BREAK_GLASS__REASONS": "[Cardiac arrest, Medical emergency]",
        "GATEWAY_CONSENT__PATIENT_SELF_ACCESS": "false",
        "GATEWAY_CONSENT__COMBINING": "latest-wins",
        "GATEWAY_PUBLIC_BASE_URL": "https://gw.example.org/fhir",
        "GATEWAY_SENSITIVITY__EXPLICIT_CONSENT_REQUIRED": "[PSY, HIV]",
        "PATH": "/usr/bin",
        "GATEWAYX_LISTEN__PORT": "1",
    }
    s = load_settings(path, env)
    assert s.upstream.url == "https://env-host:8443/R4"
    assert s.upstream.timeout_s == 7  # from the file, not overridden
    assert s.listen.port == 8082
    assert s.auth.default_purpose == "HPAYMT"
    assert list(s.break_glass.reasons) == ["Cardiac arrest", "Medical emergency"]
    assert s.consent.patient_self_access is False
    assert s.consent.combining == "latest-wins"
    assert s.public_base_url == "https://gw.example.org/fhir"
    assert tuple(s.sensitivity.explicit_consent_required) == ("PSY", "HIV")


def test_environment_alone_is_enough() -> None:
    s = load_settings(None, {"GATEWAY_UPSTREAM__URL": UPSTREAM, "GATEWAY_ADMIN__HOST": "0.0.0.0"})
    assert s.upstream.url == UPSTREAM
    assert s.admin.host == "0.0.0.0"


def test_env_lower_case_section_names_are_not_required() -> None:
    s = load_settings(None, {"GATEWAY_UPSTREAM__URL": UPSTREAM, "GATEWAY_Enforcement__Denied_Read_Status": "404"})
    assert s.enforcement.denied_read_status == 404


def test_upstream_flag_wins_over_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "upstream: {url: http://file-host/fhir}\n")
    monkeypatch.setenv("GATEWAY_UPSTREAM__URL", "http://env-host/fhir")
    s = settings_from_args(argparse.Namespace(config=path, upstream="http://flag-host/baseR4"))
    assert s.upstream.url == "http://flag-host/baseR4"


def test_empty_file_still_needs_upstream_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^upstream\.url: "):
        load_settings(_write(tmp_path, ""), {})


BAD_CONFIGS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown-top-level-key", {"upstream": {"url": UPSTREAM}, "upstreams": {}}, "upstreams: unknown key"),
    ("unknown-section-key", {"upstream": {"url": UPSTREAM}, "listen": {"prot": 8080}}, "listen.prot: unknown key"),
    ("wrong-type-port", {"upstream": {"url": UPSTREAM}, "listen": {"port": "eighty"}}, "listen.port:"),
    ("wrong-type-timeout", {"upstream": {"url": UPSTREAM, "timeout_s": "soon"}}, "upstream.timeout_s:"),
    ("wrong-type-bool", {"upstream": {"url": UPSTREAM}, "consent": {"patient_self_access": "maybe"}},
     "consent.patient_self_access:"),
    ("wrong-type-list", {"upstream": {"url": UPSTREAM}, "break_glass": {"reasons": {"text": "Medical emergency"}}},
     "break_glass.reasons"),
    ("wrong-type-list-item", {"upstream": {"url": UPSTREAM}, "break_glass": {"reasons": [["Medical emergency"]]}},
     "break_glass.reasons"),
    ("wrong-type-section", {"upstream": {"url": UPSTREAM}, "listen": 8080}, "listen:"),
    ("bad-enum", {"upstream": {"url": UPSTREAM}, "enforcement": {"denied_read_status": 500}},
     "enforcement.denied_read_status:"),
    ("refill-pages-negative", {"upstream": {"url": UPSTREAM}, "enforcement": {"refill_max_pages": -1}},
     "enforcement.refill_max_pages:"),
    ("refill-pages-too-many", {"upstream": {"url": UPSTREAM}, "enforcement": {"refill_max_pages": 101}},
     "enforcement.refill_max_pages:"),
    ("operation-not-an-operation", {"upstream": {"url": UPSTREAM}, "enforcement": {"allowed_operations": ["care-summary"]}},
     "enforcement.allowed_operations: 'care-summary' must read $op, Type/$op or Type/[id]/$op"),
    ("operation-refused-by-design", {"upstream": {"url": UPSTREAM}, "enforcement": {"allowed_operations": ["Observation/$STATS"]}},
     "enforcement.allowed_operations: 'Observation/$STATS' names an operation"),
    ("operation-not-a-list", {"upstream": {"url": UPSTREAM}, "enforcement": {"allowed_operations": {"$x": 1}}},
     "enforcement.allowed_operations:"),
    ("refill-pages-not-a-number", {"upstream": {"url": UPSTREAM}, "enforcement": {"refill_max_pages": "many"}},
     "enforcement.refill_max_pages:"),
    ("bad-purpose", {"upstream": {"url": UPSTREAM}, "auth": {"default_purpose": "treat"}}, "auth.default_purpose:"),
    ("bad-untyped-root", {"upstream": {"url": UPSTREAM}, "consent": {"untyped_root": "applies-to"}},
     "consent.untyped_root:"),
    ("bad-label-choice", {"upstream": {"url": UPSTREAM}, "sensitivity": {"explicit_consent_required": 5}},
     "sensitivity.explicit_consent_required"),
    ("missing-upstream-section", {}, "upstream.url: required key is missing"),
    ("missing-upstream-url", {"upstream": {"timeout_s": 5}}, "upstream.url: required key is missing"),
    ("bad-url-no-scheme", {"upstream": {"url": "fhir:8080/fhir"}}, "upstream.url:"),
    ("bad-url-ftp", {"upstream": {"url": "ftp://fhir/fhir"}}, "upstream.url:"),
    ("bad-url-no-host", {"upstream": {"url": "http:///fhir"}}, "upstream.url:"),
    ("bad-url-port", {"upstream": {"url": "http://fhir:99999/fhir"}}, "upstream.url:"),
    ("bad-url-wrong-type", {"upstream": {"url": 8080}}, "upstream.url:"),
    ("bad-public-base", {"upstream": {"url": UPSTREAM}, "public_base_url": "gateway.example.org"}, "public_base_url:"),
    ("bad-audit-url", {"upstream": {"url": UPSTREAM}, "audit": {"fhir_url": "file:///tmp/x"}}, "audit.fhir_url:"),
    ("port-too-high", {"upstream": {"url": UPSTREAM}, "listen": {"port": 70000}},
     "listen.port: Input should be less than or equal to 65535"),
    ("port-negative", {"upstream": {"url": UPSTREAM}, "admin": {"port": -1}}, "admin.port:"),
    ("timeout-zero", {"upstream": {"url": UPSTREAM, "timeout_s": 0}}, "upstream.timeout_s:"),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_key(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_settings(data)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(expected), message


def test_gateway_native_is_no_setting() -> None:
    # GATEWAY_NATIVE=0 turns the native answer reader off (gateway.core.native); serve starts.
    settings = load_settings(None, {"GATEWAY_UPSTREAM__URL": UPSTREAM, "GATEWAY_NATIVE": "0"})
    assert str(settings.upstream.url).startswith(UPSTREAM.rstrip("/"))


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"GATEWAY_LISTEN__PORT": "99999"}, "listen.port:"),
        ({"GATEWAY_LISTEN__PORT": "http"}, "listen.port:"),
        ({"GATEWAY_UPSTREAM__URLL": "http://x/fhir"}, "upstream.urll: unknown key"),
        ({"GATEWAY_BREAK_GLASS__REASONS": "[unclosed"}, "GATEWAY_BREAK_GLASS__REASONS:"),
        ({"GATEWAY_LISTEN__TLS__CERT": "x"}, "listen.tls: unknown key"),
        ({"GATEWAY_UPSTREAM__AUTH__KIND__X": "x"}, "GATEWAY_UPSTREAM__AUTH__KIND__X:"),
    ],
    ids=["port-range", "port-type", "unknown-key", "bad-yaml-value", "unknown-nested", "too-deep"],
)
def test_bad_environment_is_one_line_naming_the_key(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"GATEWAY_UPSTREAM__URL": UPSTREAM, **env})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(expected), message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("upstream: {url: http://fhir/fhir\nlisten: [", "invalid YAML at line"),
        ("upstream:\n  url: http://fhir/fhir\n    port: 1\n", "invalid YAML at line"),
        ("- upstream\n- listen\n", "top level must be a mapping"),
    ],
    ids=["unclosed-flow", "bad-indent", "not-a-mapping"],
)
def test_bad_yaml_file_is_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message and expected in message, message


@pytest.mark.parametrize("kind", ["missing", "directory", "not-utf8"])
def test_unreadable_file_is_one_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "gateway.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "not-utf8":
        path.write_bytes(b"upstream: {url: http://fhir/fhir}\nlisten: {host: \xff\xfe}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message


def test_nested_sections_from_the_environment() -> None:
    settings = load_settings(None, {
        "GATEWAY_UPSTREAM__URL": UPSTREAM, "GATEWAY_UPSTREAM__AUTH__KIND": "bearer",
        "GATEWAY_UPSTREAM__AUTH__TOKEN_ENV": "FHIR_TOKEN", "GATEWAY_AUTH__MODE": "jwt",
        "GATEWAY_AUTH__JWT__ISSUER": "https://login.example.org", "GATEWAY_AUTH__JWT__AUDIENCE": "https://gw.example.org/fhir",
    })
    assert settings.upstream.auth.kind == "bearer" and settings.upstream.auth.token_env == "FHIR_TOKEN"
    assert settings.auth.jwt.jwks == "https://login.example.org/.well-known/jwks.json"


@pytest.mark.parametrize(("data", "expected"), [
    ({"upstream": {"url": UPSTREAM, "auth": {"kind": "bearer"}}}, "upstream.auth.token_env: kind bearer needs exactly one of token_env or token_file"),
    ({"upstream": {"url": UPSTREAM, "auth": {"kind": "smart-backend", "client_id": "gw"}}}, "upstream.auth.token_url: required"),
    ({"upstream": {"url": UPSTREAM, "auth": {"kind": "basic"}}}, "upstream.auth.kind:"),
    ({"upstream": {"url": UPSTREAM, "client_key_file": "k.pem"}}, "upstream.client_cert_file: required"),
    ({"upstream": {"url": UPSTREAM}, "auth": {"mode": "jwt", "jwt": {"issuer": "https://i.example.org"}}}, "auth.jwt.audience: required"),
    ({"upstream": {"url": UPSTREAM}, "auth": {"mode": "jwt", "jwt": {"issuer": "https://i", "audience": "a", "algorithms": ["none"]}}}, "auth.jwt.algorithms:"),
])
def test_identity_settings_are_checked(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_settings(data)
    assert str(caught.value).startswith(expected), caught.value


def test_reference_bases_read_as_a_list_of_urls_from_the_file_or_the_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, "upstream: {url: 'http://fhir:8080/fhir', reference_bases: ['https://fhir.example/r4/']}\n")
    assert load_settings(path, {}).upstream.reference_bases == ("https://fhir.example/r4",)
    env = {"GATEWAY_UPSTREAM__REFERENCE_BASES": "https://a.example/fhir, https://b.example/r4"}
    assert load_settings(path, env).upstream.reference_bases == ("https://a.example/fhir", "https://b.example/r4")
    with pytest.raises(ConfigError, match=r"^upstream\.reference_bases: must be an http\(s\) URL"):
        load_settings(path, {"GATEWAY_UPSTREAM__REFERENCE_BASES": "fhir.example/r4"})
