"""Choose the consent source ``consent.source_kind`` names and give it what it needs."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.config import ConfigError, ConsentSettings, Settings
from gateway.core.fhir import NO_BASES, Bases
from gateway.core.labels import LabelIndex
from gateway.core.model import Label
from gateway.rules import load_rules
from gateway.sources.fhir import FhirConsentSource
from gateway.sources.store import ConsentSource
from gateway.sources.vendors import (
    ClinikApiSource,
    HealtheIntentSource,
    HealthExSource,
    PatientIds,
)
from gateway.upstream import Upstream


def build_source(
    settings: Settings,
    upstream: Upstream,
    consent_server: Upstream | None,
    environ: Mapping[str, str],
    labels: LabelIndex | None = None,
    ours: Bases = NO_BASES,
) -> ConsentSource:
    """The ConsentSource for ``settings.consent.source_kind``.

    ``upstream`` is the FHIR server (patients' identifiers and Group/CareTeam memberships
    are read there); ``consent_server`` the session to ``consent.source_url`` when that is
    another server. The vendor credential is read from ``environ`` under the name
    ``consent.source_api_key_env``; ``labels`` (loaded from the rules when not given) map
    HealthEx sensitivity scopes to labels. Raises ConfigError (one line naming the key)
    when the credential is not set or HealtheIntent emergency consents cannot be stored.
    ``ours``: the bases under which an absolute reference names this FHIR server's resources.
    """
    consent = settings.consent
    server = consent_server or upstream
    if consent.source_kind == "fhir":
        return FhirConsentSource(server, ours=ours)
    secret = _credential(consent, environ)
    patients = PatientIds(upstream, consent.patient_identifier_system, consent.cache_max_patients)
    fhir_groups = FhirConsentSource(upstream).memberships
    if consent.source_kind == "clinikapi":
        return ClinikApiSource(server, patients, {"x-api-key": secret}, memberships=fhir_groups)
    if consent.source_kind == "healthex":
        return HealthExSource(
            server, patients, {"Authorization": secret},
            sensitivity_labels=_sensitivity_labels(labels or load_rules(settings.sensitivity.rules_dir)),
            consent_types=consent.healthex_consent_types,
            patient_field=consent.healthex_patient_field,
            study_id=consent.healthex_study_id,
        )
    if settings.break_glass.enabled and settings.break_glass.record_consent:
        for key in ("emergency_organization_id", "emergency_organization_group_id"):
            if getattr(consent, key) is None:
                raise ConfigError(
                    f"consent.{key}: required for source_kind healtheintent while "
                    "break_glass.record_consent is true"
                )
    assert consent.population_id is not None  # the settings refuse healtheintent without it
    return HealtheIntentSource(
        server, patients, {"Authorization": secret},
        population_id=consent.population_id,
        memberships=fhir_groups,
        emergency_organization_id=consent.emergency_organization_id,
        emergency_organization_group_id=consent.emergency_organization_group_id,
        consent_duration_h=consent.healtheintent_consent_duration_h,
        emergency_duration_h=settings.break_glass.duration_h,
    )


def _credential(consent: ConsentSettings, environ: Mapping[str, str]) -> str:
    name = consent.source_api_key_env
    value = environ.get(name or "", "")
    if not value.strip():
        # SECURITY: names the variable, never its value.
        raise ConfigError(f"consent.source_api_key_env: environment variable {name} is not set")
    return value.strip()


def _sensitivity_labels(index: LabelIndex) -> dict[str, tuple[Label, ...]]:
    return {scope: index.sensitivity_scope_labels(scope) for scope in index.sensitivity_scope_names}
