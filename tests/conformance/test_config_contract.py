"""CONTRACT §2-§3 as an outsider reads them: the YAML block's defaults, and every key as
``GATEWAY_<SECTION>__<KEY>`` (nested ones too), with lists, booleans and values that look
like numbers or dates but are text."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, Settings, load_settings
from tests.unit._util import clean_env, gateway_command

# The configuration block of CONTRACT §3, verbatim (comments dropped).
CONTRACT_YAML = """
upstream:
  url: http://fhir:8080/fhir
  timeout_s: 30
  max_connections: 100
  max_response_bytes: 67108864
  ca_file: null
  client_cert_file: null
  client_key_file: null
  auth:
    kind: none
    token_env: null
    token_file: null
    token_url: null
    client_id: null
    private_key_file: null
    scope: "system/*.rs"
public_base_url: null
listen: {host: 0.0.0.0, port: 8080}
admin:  {host: 127.0.0.1, port: 9090}
auth:
  mode: headers
  default_purpose: TREAT
  jwt:
    issuer: null
    audience: null
    jwks_url: null
    algorithms: [RS256, RS384, ES256, ES384]
    leeway_s: 30
    actor_claim: fhirUser
    organization_claim: null
    purpose_claim: null
consent:
  source_kind: fhir
  source_url: null
  source_api_key_env: null
  cache_ttl_s: 60
  cache_max_patients: 100000
  default_decision: deny
  combining: deny-overrides
  patient_self_access: true
  writer_roles: []
  change_poll_s: 5
  untyped_root: exception
sensitivity:
  rules_dir: null
  explicit_consent_required: all
enforcement:
  mode: enforce
  denied_read_status: 403
break_glass:
  enabled: true
  reasons: ["Patient Unresponsive.", "Medical emergency", "Imminent threat to life"]
  duration_h: 4
  record_consent: true
audit:
  path: audit.jsonl
  fhir_url: null
  stdout: false
  disclosures: sensitive
"""
UPSTREAM = "http://fhir:8080/fhir"


def _leaves(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found: list[tuple[tuple[str, ...], Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            found += _leaves(value, (*prefix, key))
        else:
            found.append(((*prefix, key), value))
    return found


def _setting(settings: Settings, path: tuple[str, ...]) -> Any:
    value: Any = settings
    for part in path:
        value = getattr(value, part)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


CONTRACT_KEYS = _leaves(yaml.safe_load(CONTRACT_YAML))


@pytest.mark.parametrize(("path", "default"), CONTRACT_KEYS, ids=[".".join(p) for p, _ in CONTRACT_KEYS])
def test_every_contract_key_has_the_default_the_contract_gives(path: tuple[str, ...], default: Any) -> None:
    settings = load_settings(None, {"GATEWAY_UPSTREAM__URL": UPSTREAM})
    assert _plain(_setting(settings, path)) == default


def test_the_contract_block_itself_is_a_valid_config(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(CONTRACT_YAML, encoding="utf-8")
    assert load_settings(config, {}) == load_settings(None, {"GATEWAY_UPSTREAM__URL": UPSTREAM})


# A value other than the default for every key, as an operator would write it in the
# environment, and what the setting then holds. Extra variables make the value valid.
ENV_CASES: dict[str, tuple[str, Any, dict[str, str]]] = {
    "upstream.url": ("https://ehr.example.org:8443/R4", "https://ehr.example.org:8443/R4", {}),
    "upstream.timeout_s": ("7.5", 7.5, {}),
    "upstream.max_connections": ("12", 12, {}),
    "upstream.max_response_bytes": ("1048576", 1048576, {}),
    "upstream.ca_file": ("/etc/ssl/fhir-ca.pem", "/etc/ssl/fhir-ca.pem", {}),
    "upstream.client_cert_file": ("/etc/gw/tls.crt", "/etc/gw/tls.crt", {"GATEWAY_UPSTREAM__CLIENT_KEY_FILE": "/etc/gw/tls.key"}),
    "upstream.client_key_file": ("/etc/gw/tls.key", "/etc/gw/tls.key", {"GATEWAY_UPSTREAM__CLIENT_CERT_FILE": "/etc/gw/tls.crt"}),
    "upstream.auth.kind": ("bearer", "bearer", {"GATEWAY_UPSTREAM__AUTH__TOKEN_ENV": "FHIR_TOKEN"}),
    "upstream.auth.token_env": ("FHIR_TOKEN", "FHIR_TOKEN", {}),
    "upstream.auth.token_file": ("/var/run/secrets/fhir/token", "/var/run/secrets/fhir/token", {}),
    "upstream.auth.token_url": ("https://login.example.org/token", "https://login.example.org/token", {}),
    "upstream.auth.client_id": ("consent-gateway", "consent-gateway", {}),
    "upstream.auth.private_key_file": ("/etc/gw/client.pem", "/etc/gw/client.pem", {}),
    "upstream.auth.scope": ("system/Consent.rs system/AuditEvent.c", "system/Consent.rs system/AuditEvent.c", {}),
    "public_base_url": ("https://gw.example.org/fhir", "https://gw.example.org/fhir", {}),
    "listen.host": ("127.0.0.1", "127.0.0.1", {}),
    "listen.port": ("18080", 18080, {}),
    "admin.host": ("0.0.0.0", "0.0.0.0", {}),
    "admin.port": ("19090", 19090, {}),
    "auth.mode": ("jwt", "jwt", {"GATEWAY_AUTH__JWT__ISSUER": "https://login.example.org",
                                 "GATEWAY_AUTH__JWT__AUDIENCE": "https://gw.example.org/fhir"}),
    "auth.default_purpose": ("HPAYMT", "HPAYMT", {}),
    "auth.jwt.issuer": ("https://login.example.org", "https://login.example.org", {}),
    "auth.jwt.audience": ("https://gw.example.org/fhir", "https://gw.example.org/fhir", {}),
    "auth.jwt.jwks_url": ("https://login.example.org/keys", "https://login.example.org/keys", {}),
    "auth.jwt.algorithms": ("[ES384]", ["ES384"], {}),
    "auth.jwt.leeway_s": ("5", 5, {}),
    "auth.jwt.actor_claim": ("sub", "sub", {}),
    "auth.jwt.organization_claim": ("org", "org", {}),
    "auth.jwt.purpose_claim": ("purpose_of_use", "purpose_of_use", {}),
    "consent.source_kind": ("clinikapi", "clinikapi", {"GATEWAY_CONSENT__SOURCE_URL": "https://api.example.org",
                                                        "GATEWAY_CONSENT__SOURCE_API_KEY_ENV": "CLINIKAPI_KEY"}),
    "consent.source_url": ("https://consents.example.org/fhir", "https://consents.example.org/fhir", {}),
    "consent.source_api_key_env": ("VENDOR_KEY", "VENDOR_KEY", {}),
    "consent.cache_ttl_s": ("15", 15, {}),
    "consent.cache_max_patients": ("500", 500, {}),
    "consent.default_decision": ("permit", "permit", {}),
    "consent.combining": ("latest-wins", "latest-wins", {}),
    "consent.patient_self_access": ("false", False, {}),
    "consent.writer_roles": ("[CONSENTADMIN, PRCP]", ["CONSENTADMIN", "PRCP"], {}),
    "consent.change_poll_s": ("0", 0, {}),
    "consent.untyped_root": ("scope", "scope", {}),
    "sensitivity.rules_dir": ("/etc/gw/rules", "/etc/gw/rules", {}),
    "sensitivity.explicit_consent_required": ("[HIV, PSY]", ["HIV", "PSY"], {}),
    "enforcement.mode": ("shadow", "shadow", {}),
    "enforcement.denied_read_status": ("404", 404, {}),
    "break_glass.enabled": ("false", False, {}),
    "break_glass.reasons": ("[Code blue, Medical emergency]", ["Code blue", "Medical emergency"], {}),
    "break_glass.duration_h": ("1.5", 1.5, {}),
    "break_glass.record_consent": ("false", False, {}),
    "audit.path": ("/var/lib/gw/audit.jsonl", "/var/lib/gw/audit.jsonl", {}),
    "audit.fhir_url": ("https://audit.example.org/fhir", "https://audit.example.org/fhir", {}),
    "audit.stdout": ("true", True, {}),
    "audit.disclosures": ("all", "all", {}),
}


def _env_name(key: str) -> str:
    return "GATEWAY_" + "__".join(part.upper() for part in key.split("."))


def test_every_contract_key_has_an_environment_case() -> None:
    assert sorted(ENV_CASES) == sorted(".".join(p) for p, _ in CONTRACT_KEYS)


@pytest.mark.parametrize("key", list(ENV_CASES))
def test_every_key_is_set_by_its_environment_variable(key: str) -> None:
    raw, expected, extra = ENV_CASES[key]
    env = {"GATEWAY_UPSTREAM__URL": UPSTREAM, **extra, _env_name(key): raw}
    settings = load_settings(None, env)
    assert _plain(_setting(settings, tuple(key.split(".")))) == expected


@pytest.mark.parametrize("key", ["upstream.max_connections", "auth.default_purpose", "consent.cache_ttl_s"])
def test_the_environment_wins_over_the_file(key: str, tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(CONTRACT_YAML, encoding="utf-8")
    raw, expected, extra = ENV_CASES[key]
    settings = load_settings(config, {**extra, _env_name(key): raw})
    assert _plain(_setting(settings, tuple(key.split(".")))) == expected


# Text settings whose values look like numbers, dates or YAML words: an identifier is text.
TEXT_VALUES = [
    ("upstream.auth.client_id", "4711"),
    ("upstream.auth.client_id", "0042"),
    ("upstream.auth.token_env", "TOKEN_2024"),
    ("auth.jwt.audience", "12345"),
    ("auth.jwt.actor_claim", "on"),
    ("consent.source_api_key_env", "KEY"),
    ("audit.path", "2026-01-01.jsonl"),
    ("audit.path", "2026"),
    ("sensitivity.rules_dir", "1"),
    ("listen.host", "::1"),
]


@pytest.mark.parametrize(("key", "raw"), TEXT_VALUES, ids=[f"{k}={v}" for k, v in TEXT_VALUES])
def test_text_settings_keep_the_text_of_the_environment(key: str, raw: str) -> None:
    settings = load_settings(None, {"GATEWAY_UPSTREAM__URL": UPSTREAM, _env_name(key): raw})
    assert _plain(_setting(settings, tuple(key.split(".")))) == raw


LIST_VALUES = [
    ("consent.writer_roles", "CONSENTADMIN", ["CONSENTADMIN"]),
    ("consent.writer_roles", "CONSENTADMIN,PRCP", ["CONSENTADMIN", "PRCP"]),
    ("consent.writer_roles", '["CONSENTADMIN", "PRCP"]', ["CONSENTADMIN", "PRCP"]),
    ("consent.writer_roles", "[]", []),
    ("auth.jwt.algorithms", "RS256", ["RS256"]),
    ("auth.jwt.algorithms", "RS256, ES384", ["RS256", "ES384"]),
    ("sensitivity.explicit_consent_required", "HIV", ["HIV"]),
    ("sensitivity.explicit_consent_required", "HIV,PSY", ["HIV", "PSY"]),
    ("sensitivity.explicit_consent_required", "none", "none"),
    ("sensitivity.explicit_consent_required", "all", "all"),
    ("break_glass.reasons", "Code blue", ["Code blue"]),
    ("break_glass.reasons", "Cardiac arrest: no pulse", ["Cardiac arrest: no pulse"]),
    ("break_glass.reasons", "Code blue,Medical emergency", ["Code blue", "Medical emergency"]),
    ("break_glass.reasons", "[Code blue, 'Trauma: level 1']", ["Code blue", "Trauma: level 1"]),
]


@pytest.mark.parametrize(("key", "raw", "expected"), LIST_VALUES, ids=[f"{k}={v}" for k, v, _ in LIST_VALUES])
def test_list_settings_from_the_environment(key: str, raw: str, expected: Any) -> None:
    settings = load_settings(None, {"GATEWAY_UPSTREAM__URL": UPSTREAM, _env_name(key): raw})
    assert _plain(_setting(settings, tuple(key.split(".")))) == expected


@pytest.mark.parametrize("raw", ["null", "~", ""])
def test_null_from_the_environment_is_the_default_null(raw: str) -> None:
    settings = load_settings(None, {"GATEWAY_UPSTREAM__URL": UPSTREAM, "GATEWAY_AUDIT__FHIR_URL": raw})
    assert settings.audit.fhir_url is None


@pytest.mark.parametrize(("key", "raw"), [
    ("listen.port", "http"),
    ("break_glass.enabled", "sometimes"),
    ("enforcement.denied_read_status", "500"),
    ("auth.jwt.algorithms", "[HS256]"),
    ("consent.writer_roles", "{a: b}"),
    ("break_glass.reasons", "['Unresponsive, no pulse']"),
    ("break_glass.reasons", "['Medical emergency ']"),
])
def test_a_bad_environment_value_is_one_line_naming_the_key(key: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"GATEWAY_UPSTREAM__URL": UPSTREAM, _env_name(key): raw})
    message = str(caught.value)
    assert "\n" not in message and message.startswith(key), message


# Start-up checks beyond the file's syntax (CONTRACT §3): one line naming the key, exit 2.
START_UP = {
    "unknown-explicit-label": ("sensitivity: {explicit_consent_required: [HVI, PSY]}\n", ("sensitivity.explicit_consent_required", "HVI")),
    "unknown-explicit-label-env": ("", ("sensitivity.explicit_consent_required", "PSYCH")),
    "same-proxy-and-admin-port": (
        "listen: {host: 127.0.0.1, port: 18555}\nadmin: {host: 127.0.0.1, port: 18555}\n", ("admin.port", "listen.port"),
    ),
    "audit-path-is-a-directory": ("audit: {path: '{tmp}'}\n", ("audit.path",)),
    "audit-directory-is-a-file": ("audit: {path: '{tmp}/afile/audit.jsonl'}\n", ("audit.path",)),
    "rules-dir-is-a-file": ("sensitivity: {rules_dir: '{tmp}/afile'}\n", ("sensitivity.rules_dir", "not a directory")),
    "ca-file-unreadable": ("upstream: {url: 'https://127.0.0.1:9/fhir', ca_file: '{tmp}/nope.pem'}\n", ("upstream.ca_file",)),
    "token-file-unreadable": (
        "upstream: {url: 'http://127.0.0.1:9/fhir', auth: {kind: bearer, token_file: '{tmp}/nope'}}\n", ("upstream.auth.token_file",),
    ),
    "private-key-unreadable": (
        "upstream: {url: 'http://127.0.0.1:9/fhir', auth: {kind: smart-backend, token_url: 'http://127.0.0.1:9/t', "
        "client_id: gw, private_key_file: '{tmp}/nope.pem'}}\n", ("upstream.auth.private_key_file",),
    ),
}


@pytest.mark.parametrize("name", list(START_UP))
def test_start_up_problems_stop_with_one_line_naming_the_key(name: str, tmp_path: Path) -> None:
    text, expected = START_UP[name]
    (tmp_path / "afile").write_text("x")
    config = tmp_path / "gateway.yaml"
    config.write_text("upstream: {url: 'http://127.0.0.1:9/fhir'}\n" + text.replace("{tmp}", str(tmp_path)), encoding="utf-8")
    env: dict[str, str] = {}
    if "port" not in name:  # a config that starts after all must not hold a real port
        env |= {"GATEWAY_LISTEN__HOST": "127.0.0.1", "GATEWAY_LISTEN__PORT": "0", "GATEWAY_ADMIN__PORT": "0"}
    if "audit" not in name:
        env["GATEWAY_AUDIT__PATH"] = str(tmp_path / "audit.jsonl")
    if name.endswith("-env"):
        env["GATEWAY_SENSITIVITY__EXPLICIT_CONSENT_REQUIRED"] = "HIV,PSYCH"
    try:
        done = subprocess.run(
            [*gateway_command(), "serve", "--config", str(config)], capture_output=True, text=True,
            env=clean_env(tuple(env.items())), cwd=tmp_path, timeout=30, check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the gateway started")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("consent-gateway: config error: "), lines[0]
    for word in expected:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("which", ["admin-port-taken", "listen-host-unknown"])
def test_an_address_that_cannot_be_bound_stops_start_up_naming_its_keys(which: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen, admin, expected = {
            "admin-port-taken": ("{host: 127.0.0.1, port: 0}", f"{{host: 127.0.0.1, port: {port}}}", ("admin.port", str(port))),
            "listen-host-unknown": ("{host: gateway.invalid, port: 0}", "{host: 127.0.0.1, port: 0}", ("listen.host", "gateway.invalid")),
        }[which]
        config = tmp_path / "gateway.yaml"
        config.write_text(f"upstream: {{url: 'http://127.0.0.1:9/fhir'}}\nlisten: {listen}\nadmin: {admin}\n"
                          f"audit: {{path: '{tmp_path / 'audit.jsonl'}'}}\n", encoding="utf-8")
        try:
            done = subprocess.run([*gateway_command(), "serve", "--config", str(config)], capture_output=True, text=True,
                                  env=clean_env(), cwd=tmp_path, timeout=30, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail("the gateway started")
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("consent-gateway: cannot listen: "), line
    for word in expected:
        assert word in line, line


# Keys required only together with another (CONTRACT §3: "one clear line naming the key"):
# the line names the missing key in full, as the YAML block spells it.
REQUIRED_TOGETHER = {
    "jwt-issuer": ({"GATEWAY_AUTH__MODE": "jwt"}, "auth.jwt.issuer"),
    "jwt-audience": ({"GATEWAY_AUTH__MODE": "jwt", "GATEWAY_AUTH__JWT__ISSUER": "https://login.example.org"}, "auth.jwt.audience"),
    "bearer-token": ({"GATEWAY_UPSTREAM__AUTH__KIND": "bearer"}, "upstream.auth.token_env"),
    "smart-backend-token-url": ({"GATEWAY_UPSTREAM__AUTH__KIND": "smart-backend"}, "upstream.auth.token_url"),
    "smart-backend-client-id": ({"GATEWAY_UPSTREAM__AUTH__KIND": "smart-backend",
                                 "GATEWAY_UPSTREAM__AUTH__TOKEN_URL": "https://login.example.org/token"}, "upstream.auth.client_id"),
    "client-key": ({"GATEWAY_UPSTREAM__CLIENT_CERT_FILE": "/etc/gw/tls.crt"}, "upstream.client_key_file"),
    "client-cert": ({"GATEWAY_UPSTREAM__CLIENT_KEY_FILE": "/etc/gw/tls.key"}, "upstream.client_cert_file"),
    "vendor-source-url": ({"GATEWAY_CONSENT__SOURCE_KIND": "healthex"}, "consent.source_url"),
    # A purpose every request without X-Purpose-Of-Use would be refused for (400) is a config error.
    "unknown-default-purpose": ({"GATEWAY_AUTH__DEFAULT_PURPOSE": "TREATMENT"}, "auth.default_purpose"),
}


@pytest.mark.parametrize("name", list(REQUIRED_TOGETHER))
def test_a_key_required_with_another_is_named_in_full(name: str) -> None:
    env, key = REQUIRED_TOGETHER[name]
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"GATEWAY_UPSTREAM__URL": UPSTREAM, **env})
    message = str(caught.value)
    assert "\n" not in message and message.startswith(key + ": "), message


@pytest.mark.parametrize("name", ["jwt-audience", "unknown-default-purpose"])
def test_serve_stops_with_exit_2_and_the_full_key(name: str, tmp_path: Path) -> None:
    env, key = REQUIRED_TOGETHER[name]
    done = subprocess.run(
        [*gateway_command(), "serve", "--upstream", "http://127.0.0.1:9/fhir"], capture_output=True, text=True,
        env=clean_env(tuple({**env, "GATEWAY_LISTEN__PORT": "0", "GATEWAY_ADMIN__PORT": "0",
                             "GATEWAY_AUDIT__PATH": str(tmp_path / "audit.jsonl")}.items())),
        cwd=tmp_path, timeout=30, check=False,
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"consent-gateway: config error: {key}: "), line


@pytest.mark.parametrize("purpose", ["TREAT", "ETREAT", "HPAYMT", "HOPERAT", "HRESCH", "PUBHLTH"])
def test_every_purpose_the_contract_names_is_a_valid_default(purpose: str) -> None:
    settings = load_settings(None, {"GATEWAY_UPSTREAM__URL": UPSTREAM, "GATEWAY_AUTH__DEFAULT_PURPOSE": purpose})
    assert settings.auth.default_purpose == purpose
