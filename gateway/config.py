"""Settings: the YAML file first, then ``GATEWAY_<SECTION>__<KEY>`` environment overrides.

Every key has a default except ``upstream.url``. Invalid settings raise ``ConfigError`` whose
message is one line naming the key and the problem; ``cli`` prints it and exits 2.
"""

from __future__ import annotations

import ipaddress
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from gateway.core.answer_headers import check_passed_name
from gateway.core.operations import configured
from gateway.core.purpose import PURPOSE_CODES
from pydantic import (
    AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
    model_validator,
)

ENV_PREFIX = "GATEWAY_"
# Variables of the prefix that are no settings: GATEWAY_NATIVE=0 turns the native answer reader
# off (read by gateway.core.native when it is imported).
NOT_SETTINGS = frozenset({"GATEWAY_NATIVE"})


class ConfigError(Exception):
    """A configuration problem, as one line naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL with a host, got {value!r}")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise ValueError(f"has an invalid port: {value!r}") from exc
    return value.rstrip("/")


class UpstreamAuthSettings(_Section):
    """How the gateway's own calls to the FHIR server authenticate (CONTRACT §3).

    ``bearer`` takes the token from the env var ``token_env`` or the file ``token_file``
    (re-read when it changes); ``smart-backend`` asks ``token_url`` for a token with a
    ``private_key_jwt`` client assertion signed by ``private_key_file`` (RS384 for an RSA
    key, ES384 for a P-384 key), ``key_id`` naming the key (default: its JWK thumbprint).
    """

    kind: Literal["none", "bearer", "smart-backend"] = "none"
    token_env: str | None = Field(None, min_length=1)
    token_file: Path | None = None
    token_url: str | None = None
    client_id: str | None = Field(None, min_length=1)
    private_key_file: Path | None = None
    key_id: str | None = Field(None, min_length=1)
    scope: str = Field("system/*.rs", min_length=1)

    @field_validator("token_url")
    @classmethod
    def _token_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_http_url(value)

    @model_validator(mode="after")
    def _complete(self) -> UpstreamAuthSettings:
        if self.kind == "bearer" and (self.token_env is None) == (self.token_file is None):
            raise ValueError("token_env: kind bearer needs exactly one of token_env or token_file")
        if self.kind == "smart-backend":
            for key in ("token_url", "client_id", "private_key_file"):
                if getattr(self, key) is None:
                    raise ValueError(f"{key}: required for kind smart-backend")
        return self


class UpstreamSettings(_Section):
    url: str
    timeout_s: float = Field(30.0, gt=0)
    max_connections: int = Field(100, ge=1)
    health_interval_s: float = Field(10.0, gt=0)
    # A bigger answer is a 502: it is read with this cap, never buffered beyond it.
    max_response_bytes: int = Field(64 * 1024 * 1024, ge=1)
    # Answers at least this large are decided on views of their deciding elements (core.view):
    # memory stays near the answer's size; smaller ones are parsed whole, which is faster.
    views_above_bytes: int = Field(1024 * 1024, ge=0)
    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    auth: UpstreamAuthSettings = UpstreamAuthSettings()
    # Other bases under which the FHIR server writes references to its own resources (its
    # external name, when the gateway reaches it by an internal one): absolute references
    # under them are this server's; under any base not listed, another server's (unknown).
    reference_bases: tuple[str, ...] = ()
    # Response headers of the FHIR server passed on every answer beyond the gateway's allow-list
    # (core.answer_headers): a deployment's own that say nothing of records (rate limits, ...).
    passed_response_headers: tuple[str, ...] = ()

    _url = field_validator("url")(_check_http_url)

    @field_validator("passed_response_headers")
    @classmethod
    def _passed_response_headers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            check_passed_name(name)  # raises ValueError naming the header
        return value

    @field_validator("reference_bases")
    @classmethod
    def _reference_bases(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_http_url(base) for base in value)

    @model_validator(mode="after")
    def _client_pair(self) -> UpstreamSettings:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            missing = "client_key_file" if self.client_key_file is None else "client_cert_file"
            raise ValueError(f"{missing}: required with {'client_cert_file' if missing == 'client_key_file' else 'client_key_file'}")
        return self


class ListenSettings(_Section):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1)
    shutdown_timeout_s: float = Field(10.0, ge=0)
    # A connection that has not delivered a whole request head this many seconds after it
    # opened (or after its previous answer) is closed: slow clients cannot hold connections.
    # It is also the keep-alive idle limit, so keep it above the ingress's (nginx: 60 s).
    header_timeout_s: float = Field(75.0, gt=0)
    # Worker processes sharing the proxy port (SO_REUSEPORT); README "Several worker processes".
    workers: int = Field(1, ge=1)

    @field_validator("workers")
    @classmethod
    def _shared_port(cls, value: int, info: ValidationInfo) -> int:
        if value > 1 and info.data.get("port") == 0:
            raise ValueError("more than 1 worker needs a fixed listen.port (port 0 gives each worker its own)")
        return value


class AdminSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(9090, ge=0, le=65535)
    # The peers (IP networks) the privacy officer's pages (/admin/...) answer: they list who
    # saw which sensitive records. Any peer by default, as the rest of the admin port (bound to
    # loopback unless configured, CONTRACT §2, §10); a site that opens the admin port to
    # monitoring narrows this (the Helm chart: loopback, reached by kubectl port-forward), and
    # /metrics and /readyz still answer monitoring.
    officer_from: tuple[str, ...] = ("0.0.0.0/0", "::/0")

    @field_validator("officer_from")
    @classmethod
    def _officer_from(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP network such as 10.0.0.0/8") from None
        return value


PURPOSE_CODE_PATTERN = r"^[A-Z][A-Z0-9]*$"


class JwtSettings(_Section):
    """SMART on FHIR access tokens (CONTRACT §4); ``role_claim`` optionally names the role."""

    issuer: str | None = None
    audience: str | None = Field(None, min_length=1)
    jwks_url: str | None = None
    algorithms: tuple[Literal["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"], ...] = Field(
        ("RS256", "RS384", "ES256", "ES384"), min_length=1
    )
    leeway_s: float = Field(30.0, ge=0)
    actor_claim: str = Field("fhirUser", min_length=1)
    organization_claim: str | None = Field(None, min_length=1)
    purpose_claim: str | None = Field(None, min_length=1)
    role_claim: str | None = Field(None, min_length=1)

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str | None) -> str | None:
        # Kept as written: a token's ``iss`` must equal it exactly, trailing slash included
        # (some issuers end theirs with one).
        if value is not None:
            _check_http_url(value)
        return value

    @field_validator("jwks_url")
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        return None if value is None else _check_http_url(value)

    @property
    def jwks(self) -> str:
        return self.jwks_url or f"{(self.issuer or '').rstrip('/')}/.well-known/jwks.json"


class AuthSettings(_Section):
    mode: Literal["headers", "jwt"] = "headers"
    default_purpose: str = Field("TREAT", pattern=PURPOSE_CODE_PATTERN)
    jwt: JwtSettings = JwtSettings()

    @field_validator("default_purpose")
    @classmethod
    def _known_purpose(cls, value: str) -> str:
        # A request without X-Purpose-Of-Use is decided for this code: an unknown one would
        # refuse every such request (400) instead of stopping start-up.
        if value not in PURPOSE_CODES:
            raise ValueError(f"{value!r} is not a v3 PurposeOfUse code")
        return value

    @model_validator(mode="after")
    def _jwt_complete(self) -> AuthSettings:
        if self.mode == "jwt":
            for key in ("issuer", "audience"):
                if getattr(self.jwt, key) is None:
                    raise ValueError(f"jwt.{key}: required in mode jwt")
        return self


HealthExConsentType = Literal["DATA_AUTHORIZATION", "PATIENT_DIRECTED_DATA_EXCHANGE", "FUTURE_DATA_USE"]
HEALTHEX_CONSENT_TYPES: tuple[HealthExConsentType, ...] = (
    "DATA_AUTHORIZATION", "PATIENT_DIRECTED_DATA_EXCHANGE", "FUTURE_DATA_USE",
)


class ConsentSettings(_Section):
    """Where consents come from and how they combine.

    A vendor ``source_kind`` needs ``source_url`` and ``source_api_key_env``;
    ``healtheintent`` also needs ``population_id``. ``patient_identifier_system`` picks the
    vendor's patient id: the FHIR Patient id when null, else the value of the Patient's
    identifier in that system. ``healthex_patient_field`` is the getPatientConsents field
    that id goes in; ``healthex_consent_types`` the consent types asked for.
    ``emergency_organization_id``/``emergency_organization_group_id`` are the HealtheIntent
    care unit and group recorded on the emergency consents the gateway stores there.
    ``writer_roles`` limits who may write Consents through the gateway.
    """

    source_kind: Literal["fhir", "clinikapi", "healthex", "healtheintent"] = "fhir"
    source_url: str | None = Field(None, validate_default=True)
    source_api_key_env: str | None = Field(None, validate_default=True)
    cache_ttl_s: float = Field(60.0, ge=0)
    cache_max_patients: int = Field(100_000, ge=1)
    default_decision: Literal["deny", "permit"] = "deny"
    combining: Literal["deny-overrides", "latest-wins"] = "deny-overrides"
    patient_self_access: bool = True
    # How a root provision without ``type`` but with conditions reads (CONTRACT §5):
    # exception (R4's text: the opposite of the base policy) or scope ("applies to").
    untyped_root: Literal["exception", "scope"] = "exception"
    patient_identifier_system: str | None = Field(None, min_length=1)
    healthex_patient_field: Literal["patientId", "patientMRN", "externalId"] = "patientId"
    healthex_consent_types: tuple[HealthExConsentType, ...] = Field(HEALTHEX_CONSENT_TYPES, min_length=1)
    # The HealthEx study this site's research (HRESCH) requests are for; research consents
    # recorded for any other study decide nothing here.
    healthex_study_id: str | None = Field(None, min_length=1)
    population_id: str | None = Field(None, min_length=1, validate_default=True)
    emergency_organization_id: str | None = Field(None, min_length=1)
    emergency_organization_group_id: str | None = Field(None, min_length=1)
    # HealtheIntent ConsentConfiguration ``consentDuration`` (hours): how long a consent record
    # without an end is valid; null leaves such records open-ended.
    healtheintent_consent_duration_h: float | None = Field(
        None, gt=0, validation_alias=AliasChoices("healtheintent_consent_duration_h", "consentDuration"),
    )
    # Who may write Consents through the gateway besides the patient the consent is about:
    # requesters whose X-Actor-Role is listed (default: nobody else).
    writer_roles: tuple[str, ...] = ()
    # How often each replica asks the consent source what changed (CONTRACT §9); 0 = never.
    change_poll_s: float = Field(5.0, ge=0)

    @field_validator("source_url")
    @classmethod
    def _source_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            _require_for_vendor(info, "source_url")
            return None
        return _check_http_url(value)

    @field_validator("source_api_key_env")
    @classmethod
    def _api_key_env(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            _require_for_vendor(info, "source_api_key_env")
        return value

    @field_validator("population_id")
    @classmethod
    def _population(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("source_kind") == "healtheintent":
            raise ValueError("required for source_kind healtheintent")
        return value


def _require_for_vendor(info: ValidationInfo, key: str) -> None:
    kind = info.data.get("source_kind")
    # An invalid source_kind is reported on its own; fhir needs neither key.
    if kind not in (None, "fhir"):
        raise ValueError(f"required for source_kind {kind}")


class SensitivitySettings(_Section):
    rules_dir: Path | None = None
    explicit_consent_required: Literal["all", "none"] | tuple[str, ...] = "all"


class EnforcementSettings(_Section):
    # shadow: every answer is decided as in enforce mode but passed unfiltered (CONTRACT §10).
    mode: Literal["enforce", "shadow"] = "enforce"
    denied_read_status: Literal[403, 404] = 403
    # A Binary without securityContext that no DocumentReference attaches (a report's
    # presentedForm, a Media's content): no FHIR search finds its holder, so nothing ties it to
    # a patient. release: it passes as no one's data (CONTRACT §5, §6); withhold: it is refused
    # to everyone, as a Binary whose context cannot be read.
    unattached_binaries: Literal["release", "withhold"] = "release"
    # 404 mode: a search page that lost matches to withholding is filled from the upstream's
    # further pages, reading at most this many of them (0: never; CONTRACT §6).
    refill_max_pages: int = Field(10, ge=0, le=100)
    # Operations a deployment runs beyond those the gateway knows (core.operations), let through
    # with their answers decided per resource like a search's: ``$op`` (system level),
    # ``Type/$op`` (type level), ``Type/[id]/$op`` (instance level, the instance decided first).
    allowed_operations: tuple[str, ...] = ()
    # The secret that seals the gateway's paging links (gateway.sealing): a file every replica
    # mounts; none: a random one made at start, shared by this gateway's worker processes.
    paging_key_file: Path | None = None

    @field_validator("allowed_operations")
    @classmethod
    def _operations(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        configured(value)  # raises ValueError naming the entry
        return value


class BreakGlassSettings(_Section):
    """Break-glass; also accepts the HealtheIntent consent-configuration names for its keys."""

    enabled: bool = True
    reasons: tuple[str, ...] = Field(
        ("Patient Unresponsive.", "Medical emergency", "Imminent threat to life"),
        min_length=1,
        validation_alias=AliasChoices("reasons", "emergencyConsentReasons"),
    )
    duration_h: float = Field(4.0, gt=0, validation_alias=AliasChoices("duration_h", "emergencyConsentDuration"))
    record_consent: bool = True

    @field_validator("reasons", mode="before")
    @classmethod
    def _one_reason(cls, value: object) -> object:
        # HealtheIntent documents emergencyConsentReasons as a single string.
        return [value] if isinstance(value, str) else value

    @field_validator("reasons")
    @classmethod
    def _sendable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # A reason is matched against the X-Break-Glass value: one that no header can carry
        # (a comma makes it a list, refused; edge spaces are trimmed) could never be used.
        for reason in value:
            if not reason or reason != reason.strip() or "," in reason or not reason.isprintable():
                raise ValueError(f"{reason!r} cannot be sent in X-Break-Glass (no commas, no edge spaces, printable text)")
        return value


class AuditSettings(_Section):
    path: Path = Path("audit.jsonl")
    fhir_url: str | None = None
    stdout: bool = False  # also print each AuditEvent as one JSON line (for a SIEM)
    # Accounting of disclosures (CONTRACT §10): which releases are recorded as AuditEvents.
    disclosures: Literal["sensitive", "all", "none"] = "sensitive"

    @field_validator("fhir_url")
    @classmethod
    def _fhir_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_http_url(value)


class Settings(_Section):
    upstream: UpstreamSettings
    public_base_url: str | None = None
    listen: ListenSettings = ListenSettings()
    admin: AdminSettings = AdminSettings()
    auth: AuthSettings = AuthSettings()
    consent: ConsentSettings = ConsentSettings()
    sensitivity: SensitivitySettings = SensitivitySettings()
    enforcement: EnforcementSettings = EnforcementSettings()
    break_glass: BreakGlassSettings = BreakGlassSettings()
    audit: AuditSettings = AuditSettings()

    @field_validator("public_base_url")
    @classmethod
    def _public_base(cls, value: str | None) -> str | None:
        return None if value is None else _check_http_url(value)

    @model_validator(mode="after")
    def _two_ports(self) -> Settings:
        listen, admin = self.listen, self.admin
        wildcard = {"", "0.0.0.0", "::"}
        overlap = listen.host == admin.host or listen.host in wildcard or admin.host in wildcard
        if listen.port == admin.port != 0 and overlap:
            raise ValueError(f"admin.port: must differ from listen.port ({listen.port}): the admin port is a port of its own")
        return self

    @property
    def consent_source_url(self) -> str:
        return self.consent.source_url or self.upstream.url


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse a YAML config file into a mapping (an empty file is an empty mapping)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise ConfigError(f"config file {path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    return data


_NULLS = frozenset({"", "null", "Null", "NULL", "~"})


def _field_kind(path: list[str]) -> str | None:
    """How an environment value for the key at ``path`` reads: ``text`` (str or Path: kept as
    written, so ``4711`` or ``2026`` stay text), ``list`` (of str), ``labels`` (all | none |
    a list), or None (parsed as YAML: numbers, booleans, choices; unknown keys too)."""
    annotation: Any = Settings
    for part in path:
        fields = annotation.model_fields if isinstance(annotation, type) and issubclass(annotation, BaseModel) else {}
        if part not in fields:
            return None
        annotation = fields[part].annotation
    origin = typing.get_origin(annotation)
    branches = [a for a in typing.get_args(annotation) if a is not type(None)] if origin in (typing.Union, types.UnionType) else [annotation]
    if any(b in (str, Path) for b in branches):
        return "text"
    if any(typing.get_origin(b) is tuple for b in branches):
        return "labels" if any(typing.get_origin(b) is Literal for b in branches) else "list"
    return None


def _env_value(name: str, raw: str, path: list[str]) -> Any:
    """An environment value as its key reads it: YAML for numbers, booleans and ``[a, b]``
    lists; text keys keep the text as written; a list may also be one value or ``a,b`` (no list
    item can hold a comma: codes, and break-glass reasons, which travel in a header)."""
    kind = _field_kind(path)
    value = raw.strip()
    if value in _NULLS:
        return None
    try:
        if kind == "text":
            return yaml.safe_load(value) if value[0] in "\"'" else value
        if kind in ("list", "labels"):
            if value[0] in "[{":
                return yaml.load(value, Loader=yaml.BaseLoader)  # noqa: S506 - BaseLoader makes only str, list, dict
            if kind == "labels" and value in ("all", "none"):
                return value
            return [item.strip() for item in value.split(",") if item.strip()]
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"{name}: cannot parse value {raw!r}") from None


def apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``GATEWAY_<SECTION>__<KEY>`` (and ``GATEWAY_<KEY>`` for top-level keys)."""
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        value = _env_value(name, raw, path)
        if len(path) == 1:
            merged[path[0]] = value
        elif len(path) <= 3:
            # Nested sections (upstream.auth, auth.jwt): GATEWAY_UPSTREAM__AUTH__KIND.
            section: Any = merged
            for depth, part in enumerate(path[:-1]):
                child = section.get(part)
                child = dict(child) if isinstance(child, dict) else ({} if child is None else child)
                if not isinstance(child, dict):
                    raise ConfigError(f"{name}: section {'.'.join(path[:depth + 1])!r} is not a mapping")
                section[part] = child
                section = child
            section[path[-1]] = value
        else:
            raise ConfigError(f"{name}: expected GATEWAY_<SECTION>__<KEY>")
    return merged


_RELATIVE_KEY = re.compile(r"^[a-z_]+(\.[a-z_]+)*$")


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    names: list[str] = []
    for part in first["loc"]:
        # pydantic appends union branches ("literal['all','none']") and list indexes: cut there.
        if not isinstance(part, str) or not part.isidentifier():
            break
        names.append(part)
    if not names and first["type"] == "value_error":
        # A check across sections names its keys in its own message.
        return str(first["msg"]).removeprefix("Value error, ")
    key = ".".join(names) or "config"
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if first["type"] == "missing":
        # A missing upstream section means its one required key is missing.
        return f"{'upstream.url' if key == 'upstream' else key}: required key is missing"
    message = first["msg"].removeprefix("Value error, ")
    inner, sep, problem = message.partition(": ")
    if sep and _RELATIVE_KEY.match(inner):
        # A check across a section's keys names the key below the section: name it in full.
        return f"{key}.{inner}: {problem}"
    return f"{key}: {message}"


def build_settings(data: Mapping[str, Any]) -> Settings:
    """Validate a config mapping; raise ConfigError with one line on the first problem."""
    try:
        return Settings.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def load_settings(
    path: Path | None, environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None
) -> Settings:
    """File, then environment, then command-line overrides (``{"upstream": {"url": ...}}``)."""
    data = read_yaml(path) if path is not None else {}
    data = apply_env(data, environ)
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            target = data.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{section}: section is not a mapping")
            target.update(values)
        else:
            data[section] = values
    return build_settings(data)
