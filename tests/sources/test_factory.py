"""``build_source``: the configured kind, its credential, and config errors as one line."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ConfigError, Settings
from gateway.core.errors import ConsentUnavailable
from gateway.sources.factory import build_source
from gateway.sources.fhir import FhirConsentSource
from gateway.sources.vendors import ClinikApiSource, HealtheIntentSource, HealthExSource, PatientIds
from gateway.upstream import Upstream
from tests.conftest import LABELS, gateway_settings
from tests.sources.vendor_fakes import SECRET

FHIR = "http://fhir.hospital.example/fhir"
VENDOR = "https://api.vendor.example/v1"
ENV = {"VENDOR_KEY": SECRET}


def settings(kind: str, **consent: Any) -> Settings:
    values: dict[str, Any] = {"source_kind": kind}
    if kind != "fhir":
        values |= {"source_url": VENDOR, "source_api_key_env": "VENDOR_KEY"}
    if kind == "healtheintent":
        values |= {"population_id": "pop-1", "emergency_organization_id": "cu-1",
                   "emergency_organization_group_id": "grp-1"}
    return gateway_settings(FHIR, consent=values | consent)


def servers() -> tuple[Upstream, Upstream]:
    return Upstream(FHIR, timeout_s=5, max_connections=1), Upstream(VENDOR, timeout_s=5, max_connections=1)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("fhir", FhirConsentSource), ("clinikapi", ClinikApiSource), ("healthex", HealthExSource),
     ("healtheintent", HealtheIntentSource)],
)
def test_the_source_kind_picks_the_source(kind: str, expected: type) -> None:
    upstream, vendor = servers()
    source = build_source(settings(kind), upstream, vendor, ENV, LABELS)
    assert type(source) is expected


def test_a_fhir_source_reads_the_consent_server() -> None:
    upstream, consent_server = servers()
    source = build_source(settings("fhir"), upstream, consent_server, {}, LABELS)
    assert isinstance(source, FhirConsentSource) and source.server is consent_server


def test_an_unset_credential_names_the_variable_not_a_value() -> None:
    upstream, vendor = servers()
    with pytest.raises(ConfigError) as raised:
        build_source(settings("clinikapi"), upstream, vendor, {"OTHER": SECRET}, LABELS)
    assert str(raised.value) == "consent.source_api_key_env: environment variable VENDOR_KEY is not set"


def test_healtheintent_needs_a_care_unit_only_when_it_stores_emergency_consents() -> None:
    upstream, vendor = servers()
    bare = settings("healtheintent", emergency_organization_id=None)
    with pytest.raises(ConfigError, match=r"^consent\.emergency_organization_id: required"):
        build_source(bare, upstream, vendor, ENV, LABELS)
    no_record = bare.model_copy(update={"break_glass": bare.break_glass.model_copy(update={"record_consent": False})})
    assert isinstance(build_source(no_record, upstream, vendor, ENV, LABELS), HealtheIntentSource)


@pytest.mark.parametrize(
    ("consent", "message"),
    [
        ({"source_kind": "clinikapi"}, "consent.source_url: required for source_kind clinikapi"),
        ({"source_kind": "healthex", "source_url": VENDOR},
         "consent.source_api_key_env: required for source_kind healthex"),
        ({"source_kind": "healtheintent", "source_url": VENDOR, "source_api_key_env": "K"},
         "consent.population_id: required for source_kind healtheintent"),
        ({"healthex_patient_field": "email"}, "consent.healthex_patient_field:"),
    ],
)
def test_a_vendor_missing_a_required_key_fails_validation_in_one_line(consent: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        gateway_settings(FHIR, consent=consent)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


@pytest.mark.parametrize("kind", ["clinikapi", "healthex"])
async def test_vendors_without_a_consent_write_refuse_emergency_consents(kind: str) -> None:
    upstream, vendor = servers()
    source = build_source(settings(kind), upstream, vendor, ENV, LABELS)
    with pytest.raises(ConsentUnavailable, match="cannot store emergency consents"):
        await source.store_consent({"resourceType": "Consent", "status": "active"})


async def test_healthex_has_no_groups() -> None:
    upstream, vendor = servers()
    source = build_source(settings("healthex"), upstream, vendor, ENV, LABELS)
    assert await source.memberships("Practitioner/dr-ada") == frozenset()


@pytest.mark.parametrize("patient", ["Practitioner/1", "Patient/", "Patient/a/b", "pat-1"])
async def test_only_patient_references_map_to_a_vendor_id(patient: str) -> None:
    with pytest.raises(ConsentUnavailable):
        await PatientIds(servers()[0], None).vendor_id(patient)
