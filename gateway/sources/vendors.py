"""Consents kept by consent platforms (ClinikAPI, HealthEx, HealtheIntent), read as FHIR.

Each source asks the vendor's API about one patient at a time, as the API documents,
follows every page, and converts the records with the pure converters in
``gateway.core.vendors``. Everything that goes wrong fails the lookup closed
(``ConsentUnavailable``): a transport error, a non-2xx answer, an answer of the wrong
shape, a page loop, a record about another patient, or a record the converter cannot
understand. The last is logged naming the record and the field, never a value.

The vendor's patient id comes from ``PatientIds``: the FHIR Patient id, or the value of
the Patient's identifier in a configured system (read once from the FHIR server).
The API credential is passed in as a value and only ever put in its request header.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

import orjson
from cachetools import LRUCache
from yarl import URL

from gateway.core.breakglass import REASON_EXTENSION
from gateway.core.errors import ConsentUnavailable
from gateway.core.fhir import JSON, iter_codings, reference_of
from gateway.core.model import GATEWAY_CODE_SYSTEM, Label
from gateway.core.vendors import CONVERTERS, ConvertOptions, VendorError
from gateway.core.vendors.clinikapi import labels_by_document
from gateway.core.vendors.healtheintent import EMERGENCY_CODE
from gateway.sources.store import ConsentChange
from gateway.upstream import Upstream, UpstreamResponse

log = logging.getLogger("gateway.sources")

MAX_PAGES = 200
PAGE_SIZE = 100  # the largest page ClinikAPI and HealtheIntent serve
UNAVAILABLE = "Consent information is unavailable."
_JSON_HEADERS = {"Accept": "application/json"}

Memberships = Callable[[str], Awaitable[frozenset[str]]]


async def no_groups(actor: str) -> frozenset[str]:
    """Memberships of a vendor whose consents never name a group: none."""
    return frozenset()


class PatientIds:
    """The vendor's id of a FHIR patient: its FHIR id, or its identifier in ``system``.

    With a ``system``, the Patient is read from the FHIR server once and the mapping kept
    (LRU, ``max_entries``). A Patient that cannot be read, has no identifier in the system,
    or has two different ones fails the lookup: the vendor cannot be asked about it safely.
    """

    def __init__(self, fhir: Upstream, system: str | None, max_entries: int = 100_000) -> None:
        self.fhir = fhir
        self.system = system
        self._known: LRUCache[str, str] = LRUCache(max_entries)

    async def vendor_id(self, patient: str) -> str:
        rtype, _, fhir_id = patient.partition("/")
        if rtype != "Patient" or not fhir_id or "/" in fhir_id:
            raise ConsentUnavailable(UNAVAILABLE)
        if self.system is None:
            return fhir_id
        known = self._known.get(patient)
        if known is None:
            known = await self._look_up(fhir_id)
            self._known[patient] = known
        return known

    async def _look_up(self, fhir_id: str) -> str:
        resp = await self.fhir.request(
            "GET", self.fhir.url_for(f"Patient/{quote(fhir_id, safe='')}"),
            headers={"Accept": "application/fhir+json"},
        )
        resource = _json_body(resp, "the FHIR server (Patient)")
        values = {
            ident.get("value")
            for ident in (resource.get("identifier") or () if isinstance(resource, dict) else ())
            if isinstance(ident, dict) and ident.get("system") == self.system
        }
        if len(values) != 1 or not isinstance(value := next(iter(values)), str) or not value:
            # Ids stay out of the log: it names the problem only.
            log.error("patient has %s identifier in the configured system",
                      "no" if not values else "more than one")
            raise ConsentUnavailable(UNAVAILABLE)
        return value


class _VendorSource(ABC):
    """What the three sources share: per-patient fetches, conversion, failing closed."""

    kind = ""

    def __init__(
        self,
        server: Upstream,
        patients: PatientIds,
        auth_headers: Mapping[str, str],
        *,
        memberships: Memberships = no_groups,
        sensitivity_labels: Mapping[str, tuple[Label, ...]] | None = None,
    ) -> None:
        self.server = server
        self.patients = patients
        self._auth = dict(auth_headers)
        self._memberships = memberships
        self._labels = dict(sensitivity_labels or {})

    async def fetch(self, patients: Sequence[str]) -> dict[str, list[JSON]]:
        """Each patient's consents, the vendor asked about all of them at once."""
        tasks = [asyncio.ensure_future(self._patient_consents(p)) for p in patients]
        try:
            found = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return dict(zip(patients, found))

    async def memberships(self, actor: str) -> frozenset[str]:
        """The actor's Groups and CareTeams, from wherever the vendor's group actors live."""
        return await self._memberships(actor)

    async def store_consent(self, consent: JSON) -> str:
        """Vendors without a way to record an emergency grant refuse it (the access still happens)."""
        raise ConsentUnavailable(f"The {self.kind} consent source cannot store emergency consents.")

    async def latest_change(self) -> datetime | None:
        return None

    async def changes(self, since: datetime) -> list[ConsentChange] | None:
        """None: none of the three vendor APIs lists changes, so cached patients are re-read."""
        return None

    async def probe(self) -> bool:
        """None of the vendor APIs documents a cheap question; readiness uses lookups instead."""
        return False

    async def _patient_consents(self, patient: str) -> list[JSON]:
        records = await self._records(await self.patients.vendor_id(patient))
        return self._convert(records, patient)

    @abstractmethod
    async def _records(self, vendor_id: str) -> object:
        """The vendor's answer about one patient, all pages joined, ready for the converter."""

    def _options(self, patient: str) -> ConvertOptions:
        return ConvertOptions(sensitivity_labels=self._labels, patient_ref=patient)

    def _convert(self, payload: object, patient: str) -> list[JSON]:
        options = self._options(patient)
        try:
            return CONVERTERS[self.kind](payload, options)
        except VendorError as exc:
            _log_unconvertible(exc)
            raise ConsentUnavailable(UNAVAILABLE) from None

    async def _call(self, method: str, url: URL, body: JSON | None = None) -> object:
        headers = {**_JSON_HEADERS, **self._auth}
        if body is not None:
            headers["Content-Type"] = "application/json"
        resp = await self.server.request(
            method, url, headers=headers, body=orjson.dumps(body) if body is not None else None
        )
        return _json_body(resp, self.kind)


class ClinikApiSource(_VendorSource):
    """ClinikAPI: ``GET {source_url}/consents?patientId=&status=active&count=&cursor=``.

    The consent search answers ``{"data": [consent...], "meta": {"nextCursor": ...}}``;
    the cursor is followed until it is absent. Every record must be about the patient
    asked for (``patientId`` as the bare id or ``Patient/<id>``). Credential: ``x-api-key``.
    The patient's documents (``GET {source_url}/documents?patientId=&count=&cursor=``, paged
    the same way) give the confidentiality R/V of the Compositions they became
    (``document_labels``), so the gateway labels those documents when it serves them.
    """

    kind = "clinikapi"

    async def document_labels(self, patients: Sequence[str]) -> dict[str, dict[str, frozenset[Label]]]:
        """Per patient, the labels of its ClinikAPI documents by ``Composition/<id>``."""
        found = await asyncio.gather(*(self._patient_document_labels(p) for p in patients))
        return dict(zip(patients, found))

    async def _patient_document_labels(self, patient: str) -> dict[str, frozenset[Label]]:
        documents = await self._records(await self.patients.vendor_id(patient), "documents")
        try:
            return {ref: frozenset(labels) for ref, labels in labels_by_document(documents).items()}
        except VendorError as exc:
            _log_unconvertible(exc)
            raise ConsentUnavailable(UNAVAILABLE) from None

    async def _records(self, vendor_id: str, collection: str = "consents") -> list[object]:
        records: list[object] = []
        cursor: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            query: dict[str, str | int] = {"patientId": vendor_id, "count": PAGE_SIZE}
            if collection == "consents":
                query = {"patientId": vendor_id, "status": "active", "count": PAGE_SIZE}
            if cursor is not None:
                query["cursor"] = cursor
            page = await self._call("GET", self.server.url_for(collection, urlencode(query)))
            data, cursor = _clinikapi_page(page)
            for index, record in enumerate(data, start=len(records)):
                _check_clinikapi_patient(record, index, vendor_id)
            records.extend(data)
            if cursor is None:
                return records
            _check_progress(cursor, seen, self.kind)
        raise _too_many_pages(self.kind)


class HealthExSource(_VendorSource):
    """HealthEx ``getPatientConsents``: one POST per patient to ``{source_url}`` itself.

    The documentation names the operation but not its path, so ``consent.source_url`` is
    the operation's URL. The body asks for the configured consent types, both consented
    and declined answers (the API's default returns consents given only, which would hide
    refusals), and the reasons (REVOKED/EXPIRED end a consent). The answer is not paged.
    With ``patient_field`` ``patientId`` the answer must be about that patient.
    Credential: ``Authorization`` (the variable holds the whole header value).
    """

    kind = "healthex"

    def __init__(
        self,
        server: Upstream,
        patients: PatientIds,
        auth_headers: Mapping[str, str],
        *,
        sensitivity_labels: Mapping[str, tuple[Label, ...]],
        consent_types: Sequence[str],
        patient_field: str = "patientId",
        study_id: str | None = None,
    ) -> None:
        super().__init__(server, patients, auth_headers, sensitivity_labels=sensitivity_labels)
        self.consent_types = list(consent_types)
        self.patient_field = patient_field
        self.study_id = study_id

    def _options(self, patient: str) -> ConvertOptions:
        return ConvertOptions(sensitivity_labels=self._labels, patient_ref=patient, study_id=self.study_id)

    async def _records(self, vendor_id: str) -> object:
        body: JSON = {
            "consentTypes": self.consent_types,
            "hasConsented": [True, False],
            "includeReason": True,
            self.patient_field: vendor_id,
        }
        answer = await self._call("POST", self.server.base, body)
        if not isinstance(answer, list):
            raise _malformed(self.kind, "expected a list of patients")
        if self.patient_field == "patientId":
            for index, group in enumerate(answer):
                if isinstance(group, dict) and group.get("patientId") != vendor_id:
                    raise _other_patient(f"healthex response[{index}]")
        return answer


class HealtheIntentSource(_VendorSource):
    """HealtheIntent Patient Consent v1 for one population.

    Reads ``GET {source_url}/populations/{populationId}/patients/{patientId}/patient-consents``
    with ``page[limit]``, following ``nextLink`` (sent back as ``page[nextLink]``) until it
    is blank. An emergency record that names its personnel grants that person only (see
    ``personal_emergency``). Emergency consents are stored with ``POST`` to the same path.
    Credential: ``Authorization`` (the variable holds the whole header value).
    """

    kind = "healtheintent"

    def __init__(
        self,
        server: Upstream,
        patients: PatientIds,
        auth_headers: Mapping[str, str],
        *,
        population_id: str,
        memberships: Memberships = no_groups,
        emergency_organization_id: str | None = None,
        emergency_organization_group_id: str | None = None,
        consent_duration_h: float | None = None,
        emergency_duration_h: float | None = None,
    ) -> None:
        super().__init__(server, patients, auth_headers, memberships=memberships)
        self.population_id = population_id
        self.emergency_scope = (emergency_organization_id, emergency_organization_group_id)
        self.durations = (consent_duration_h, emergency_duration_h)

    def _options(self, patient: str) -> ConvertOptions:
        consent_h, emergency_h = self.durations
        return ConvertOptions(patient_ref=patient, consent_duration_h=consent_h, emergency_duration_h=emergency_h)

    def _path(self, vendor_id: str) -> str:
        return (f"populations/{quote(self.population_id, safe='')}"
                f"/patients/{quote(vendor_id, safe='')}/patient-consents")

    async def _records(self, vendor_id: str) -> JSON:
        items: list[object] = []
        next_link = ""
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            query: dict[str, str | int] = {"page[limit]": PAGE_SIZE}
            if next_link:
                query["page[nextLink]"] = next_link
            page = await self._call("GET", self.server.url_for(self._path(vendor_id), urlencode(query)))
            page_items, next_link = _healtheintent_page(page)
            items.extend(page_items)
            if not next_link:
                return {"items": items}
            _check_progress(next_link, seen, self.kind)
        raise _too_many_pages(self.kind)

    def _convert(self, payload: object, patient: str) -> list[JSON]:
        organization, group = self.emergency_scope
        own = frozenset({f"Organization/{organization}", f"Group/{group}"}) if organization and group else frozenset()
        return [personal_emergency(consent, own) for consent in super()._convert(payload, patient)]

    async def store_consent(self, consent: JSON) -> str:
        """POST the emergency grant as an EMERGENCY patient-consent; returns ``Consent/<consentId>``."""
        organization, group = self.emergency_scope
        if organization is None or group is None:
            raise ConsentUnavailable("The HealtheIntent care unit for emergency consents is not configured.")
        patient = reference_of(consent.get("patient")) or ""
        body = emergency_patient_consent(consent, organization, group)
        answer = await self._call(
            "POST", self.server.url_for(self._path(await self.patients.vendor_id(patient))), body
        )
        consent_id = answer.get("consentId") if isinstance(answer, dict) else None
        if not isinstance(consent_id, str) or not consent_id:
            raise _malformed(self.kind, "the stored consent has no consentId")
        return f"Consent/{consent_id}"


def emergency_patient_consent(consent: JSON, organization: str, group: str) -> JSON:
    """The HealtheIntent patient-consent body of a gateway emergency Consent.

    The actor must be one Practitioner (HealtheIntent personnel); the care unit and group
    are the gateway's. ``provisionScope`` parts are ``{"id": ...}`` objects as in the
    documented example request (the schema table calls them strings; the reader accepts
    both). HealtheIntent records carry no security labels, so the labels the emergency
    opened are not kept: a stored window reopens non-sensitive data only.
    """
    provision = consent.get("provision")
    provision = provision if isinstance(provision, dict) else {}
    actors = [reference_of(a.get("reference")) for a in provision.get("actor") or () if isinstance(a, dict)]
    period = provision.get("period")
    period = period if isinstance(period, dict) else {}
    reason = next(
        (e.get("valueString") for e in consent.get("extension") or ()
         if isinstance(e, dict) and e.get("url") == REASON_EXTENSION),
        None,
    )
    if len(actors) != 1 or not (actors[0] or "").startswith("Practitioner/"):
        raise ConsentUnavailable("HealtheIntent emergency consents can only name one practitioner.")
    if not isinstance(reason, str) or not period.get("start") or not period.get("end"):
        raise ConsentUnavailable("The emergency consent has no reason or no period.")
    personnel = str(actors[0]).removeprefix("Practitioner/")
    return {
        "createdBy": personnel,
        "category": "PATIENT_CONSENT_OBSTYPE",
        "effectivePeriod": {"start": period["start"], "end": period["end"]},
        "provisionScope": {
            "organization": {"id": organization},
            "organizationGroup": {"id": group},
            "personnel": {"id": personnel},
        },
        "emergencyConsentReason": reason,
        "consentReasonType": "EMERGENCY",
        "provisionType": "PERMIT",
        "tags": [{"key": "recorded_by", "value": "consent-gateway"}],
    }


def personal_emergency(consent: JSON, own_unit: frozenset[str] = frozenset()) -> JSON:
    """A HealtheIntent emergency record shaped as a gateway emergency Consent (an audited window).

    The converter scopes the grant to the person (when named) in the care unit and group,
    all of them (``actors-all-of``). Adding the reason as the break-glass reason extension
    makes it an emergency window the engine recognises, so every access through it is
    audited as emergency access, with or without personnel. A window the gateway stored
    itself names ``own_unit`` (``consent.emergency_organization_id`` / ``_group_id``) only
    because HealtheIntent requires a unit: it opens to its person alone, as break-glass
    does. Anything else is unchanged.
    """
    is_emergency = any(
        c.get("system") == GATEWAY_CODE_SYSTEM and c.get("code") == EMERGENCY_CODE
        for c in iter_codings(consent.get("category"))
    )
    provision = consent.get("provision")
    if not is_emergency or not isinstance(provision, dict):
        return consent
    reason = next(
        (c.get("text") for c in consent.get("category") or ()
         if isinstance(c, dict) and any(cd.get("code") == EMERGENCY_CODE for cd in iter_codings(c))),
        None,
    )
    if not isinstance(reason, str):
        return consent
    actors = [a for a in provision.get("actor") or () if isinstance(a, dict)]
    refs = {reference_of(a.get("reference")) or "" for a in actors}
    person = [a for a in actors if (reference_of(a.get("reference")) or "").startswith("Practitioner/")]
    if own_unit and len(person) == 1 and refs - own_unit == {reference_of(person[0].get("reference"))}:
        # The gateway's own break-glass record: the person who broke the glass only.
        provision = {k: v for k, v in provision.items() if k != "modifierExtension"} | {"actor": person}
    return {
        **consent,
        "provision": provision,
        "extension": [*consent.get("extension", []), {"url": REASON_EXTENSION, "valueString": reason}],
    }


def _json_body(resp: UpstreamResponse, what: str) -> Any:
    if not 200 <= resp.status < 300:
        log.warning("consent lookup failed: %s answered HTTP %d", what, resp.status)
        raise ConsentUnavailable(UNAVAILABLE)
    try:
        return orjson.loads(resp.body)
    except orjson.JSONDecodeError:
        raise _malformed(what, "not JSON") from None


def _clinikapi_page(page: object) -> tuple[list[object], str | None]:
    data = page.get("data") if isinstance(page, dict) else None
    meta = page.get("meta", {}) if isinstance(page, dict) else None
    if not isinstance(data, list) or not isinstance(meta, dict):
        raise _malformed("clinikapi", "expected {data: [...], meta: {...}}")
    cursor = meta.get("nextCursor")
    if cursor is not None and not isinstance(cursor, str):
        raise _malformed("clinikapi", "meta.nextCursor is not a string")
    return data, cursor or None


def _check_clinikapi_patient(record: object, index: int, vendor_id: str) -> None:
    if not isinstance(record, dict):
        return  # the converter names this record and fails the lookup
    patient = record.get("patientId")
    if patient not in (vendor_id, f"Patient/{vendor_id}"):
        rid = record.get("id")
        raise _other_patient(f"clinikapi consent {rid}" if isinstance(rid, str) else f"clinikapi consent [{index}]")


def _healtheintent_page(page: object) -> tuple[list[object], str]:
    items = page.get("items") if isinstance(page, dict) else None
    next_link = page.get("nextLink", "") if isinstance(page, dict) else None
    if not isinstance(items, list) or not isinstance(next_link, (str, type(None))):
        raise _malformed("healtheintent", "expected {items: [...], nextLink: ...}")
    return items, next_link or ""


def _check_progress(cursor: str, seen: set[str], vendor: str) -> None:
    """A cursor served twice would page forever."""
    if cursor in seen:
        raise _malformed(vendor, "a paging cursor repeated")
    seen.add(cursor)


def _log_unconvertible(exc: VendorError) -> None:
    # The problem text may quote the patient asked about; the record and field suffice.
    log.error("consent record not understood: %s, field %s", exc.record, exc.field)


def _malformed(vendor: str, problem: str) -> ConsentUnavailable:
    log.error("consent lookup failed: %s answer malformed: %s", vendor, problem)
    return ConsentUnavailable(UNAVAILABLE)


def _other_patient(record: str) -> ConsentUnavailable:
    # SECURITY: another patient's consents must never decide for this one (issue 8).
    log.error("consent record not understood: %s, field patientId: another patient", record)
    return ConsentUnavailable(UNAVAILABLE)


def _too_many_pages(vendor: str) -> ConsentUnavailable:
    return _malformed(vendor, f"more than {MAX_PAGES} pages")
