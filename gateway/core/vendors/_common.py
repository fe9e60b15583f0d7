"""Reading vendor JSON strictly, and the FHIR building blocks every converter shares.

A converter reads a vendor record through ``Fields``, which raises ``VendorError`` naming
the record and the field on anything unexpected: a wrong type, a missing required field,
an enum value the vendor's documentation does not list. Nothing is guessed, so a record
the gateway does not understand can never be dropped or widened into a permit.
Error messages name records by id or position and fields by path, never by their values,
because the sources log them and values may be clinical.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import orjson

from gateway.core.fhir import JSON
from gateway.core.model import Label

CONSENT_SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
LOINC = "http://loinc.org"
PARTICIPATION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"

# FHIR R4 dateTime (year, year-month, date, or date-time with a zone).
_DATE_TIME = re.compile(
    r"\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01])"
    r"(T([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d{1,9})?(Z|[+-]((0\d|1[0-3]):[0-5]\d|14:00)))?)?)?"
)
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# Resource types a Consent.provision.actor.reference may point at (FHIR R4).
CONSENT_ACTOR_TYPES = frozenset(
    {"Device", "Group", "CareTeam", "Organization", "Patient", "Practitioner", "RelatedPerson",
     "PractitionerRole"}
)


class VendorError(Exception):
    """A vendor record the converter cannot understand; the lookup must fail closed.

    The message is one line: the record (id or position), the field path and the problem.
    """

    def __init__(self, record: str, field: str, problem: str) -> None:
        super().__init__(f"{record}: {field}: {problem}")
        self.record = record
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class ConvertOptions:
    """What a converter needs beyond the vendor payload.

    ``sensitivity_labels`` maps a vendor sensitivity scope (``HIV_OR_STI``) to the labels
    the rules give it; ``patient_ref`` is the FHIR patient the records belong to when the
    vendor payload does not say (HealtheIntent); ``consent_duration_h`` and
    ``emergency_duration_h`` end HealtheIntent records that have no end.
    """

    sensitivity_labels: Mapping[str, tuple[Label, ...]] = field(default_factory=dict)
    patient_ref: str | None = None
    # HealtheIntent ConsentConfiguration consentDuration / emergencyConsentDuration (hours):
    # the validity of a record that names no end.
    consent_duration_h: float | None = None
    emergency_duration_h: float | None = None
    # HealthEx: the study this site's research requests are for (consent.healthex_study_id).
    study_id: str | None = None


Converter = Callable[[object, ConvertOptions], list[JSON]]


@dataclass(frozen=True, slots=True)
class Fields:
    """One vendor JSON object being read; ``record`` and ``path`` locate it for errors."""

    data: Mapping[str, Any]
    record: str
    path: str = ""

    @classmethod
    def of(cls, value: object, record: str, path: str = "") -> Fields:
        """Wrap ``value``, which must be a JSON object."""
        if not isinstance(value, dict):
            raise VendorError(record, path or "(record)", "expected an object")
        return cls(value, record, path)

    def name(self, key: str) -> str:
        """The dotted path of ``key`` inside this object."""
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, problem: str) -> NoReturn:
        raise VendorError(self.record, self.name(key), problem)

    def present(self, key: str) -> bool:
        """True when ``key`` is there and not null."""
        return self.data.get(key) is not None

    def only(self, allowed: Collection[str]) -> None:
        """Refuse keys outside ``allowed``: an unread key could carry a restriction."""
        for key in self.data:
            if key not in allowed:
                self.fail(key, "unknown field")

    def text(self, key: str, *, required: bool = False) -> str | None:
        """A non-empty string, or None when absent (an error when ``required``)."""
        value = self.data.get(key)
        if value is None:
            if required:
                self.fail(key, "missing")
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(key, "expected a non-empty string")
        return value

    def required_text(self, key: str) -> str:
        value = self.text(key, required=True)
        assert value is not None
        return value

    def enum(self, key: str, allowed: Sequence[str], *, required: bool = False) -> str | None:
        """A string that must be one of the documented ``allowed`` values."""
        value = self.text(key, required=required)
        if value is not None and value not in allowed:
            self.fail(key, f"unknown value; expected one of {', '.join(allowed)}")
        return value

    def required_enum(self, key: str, allowed: Sequence[str]) -> str:
        value = self.enum(key, allowed, required=True)
        assert value is not None
        return value

    def flag(self, key: str, *, required: bool = False) -> bool | None:
        value = self.data.get(key)
        if value is None:
            if required:
                self.fail(key, "missing")
            return None
        if not isinstance(value, bool):
            self.fail(key, "expected true or false")
        return value

    def positive_int(self, key: str) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.fail(key, "expected a positive integer")
        return value

    def date_time(self, key: str, *, required: bool = False) -> str | None:
        """A FHIR dateTime string (kept as written: the engine parses it)."""
        value = self.text(key, required=required)
        if value is not None and not _DATE_TIME.fullmatch(value):
            self.fail(key, "expected a date-time such as 2024-03-01T09:30:00Z")
        return value

    def obj(self, key: str, *, required: bool = False) -> Fields | None:
        value = self.data.get(key)
        if value is None:
            if required:
                self.fail(key, "missing")
            return None
        return Fields.of(value, self.record, self.name(key))

    def objs(self, key: str) -> list[Fields]:
        """A list of objects (absent or null -> empty)."""
        return [Fields.of(item, self.record, f"{self.name(key)}[{i}]")
                for i, item in enumerate(self.items(key))]

    def texts(self, key: str, allowed: Sequence[str] | None = None) -> list[str]:
        """A list of non-empty strings, each one of ``allowed`` when given."""
        values: list[str] = []
        for i, item in enumerate(self.items(key)):
            where = f"{self.name(key)}[{i}]"
            if not isinstance(item, str) or not item.strip():
                raise VendorError(self.record, where, "expected a non-empty string")
            if allowed is not None and item not in allowed:
                raise VendorError(
                    self.record, where, f"unknown value; expected one of {', '.join(allowed)}"
                )
            values.append(item)
        return values

    def items(self, key: str) -> list[Any]:
        """A list (absent or null -> empty)."""
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(key, "expected a list")
        return value


def records_of(payload: object, vendor: str, page_key: str | None = None) -> list[object]:
    """The records of a payload that is one record, a list, or a page ``{page_key: [...]}``."""
    if isinstance(payload, list):
        return list(payload)
    if isinstance(payload, dict):
        if page_key is not None and page_key in payload:
            items = payload[page_key]
            if not isinstance(items, list):
                raise VendorError(vendor, page_key, "expected a list")
            return list(items)
        return [payload]
    raise VendorError(vendor, "(payload)", "expected an object or a list")


def stable_id(prefix: str, *parts: object) -> str:
    """A FHIR id derived from ``parts`` only, so the same record always gets the same id."""
    digest = hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"{prefix}-{digest[:32]}"


def fhir_id(vendor_id: str | None, prefix: str, *fallback: object) -> str:
    """The vendor's id when it is a valid FHIR id, else a stable hash of it (or ``fallback``)."""
    if vendor_id is not None and _FHIR_ID.fullmatch(vendor_id):
        return vendor_id
    return stable_id(prefix, vendor_id, *fallback)


def id_reference(fields: Fields, key: str, value: str, rtype: str) -> str:
    """``rtype/value`` for a vendor's bare id. SECURITY: an id holding a path, a fragment or a
    query (``x/Practitioner/dr1``, an absolute URL) would make the reference name another
    resource than the vendor's, of this server or another one: it fails."""
    if not value.strip() or any(ch in value for ch in "/#?"):
        fields.fail(key, f"expected a {rtype} id")
    return f"{rtype}/{value}"


def typed_reference(value: str, default_type: str) -> str:
    """``Type/id`` as given, or ``default_type/id`` for a bare vendor id."""
    return value if "/" in value else f"{default_type}/{value}"


def period(fields: Fields | None) -> JSON | None:
    """A FHIR Period from ``{start, end}``; an empty string end means open-ended."""
    if fields is None:
        return None
    out: JSON = {}
    for key in ("start", "end"):
        if fields.data.get(key) == "":
            continue
        value = fields.date_time(key)
        if value is not None:
            out[key] = value
    if not out:
        fields.fail("start", "a period needs a start or an end")
    return out


def coding(fields: Fields, default_system: str | None = None) -> JSON:
    """A FHIR Coding from ``{system, code, display}``; the code is required."""
    out: JSON = {}
    system = fields.text("system") or default_system
    if system:
        out["system"] = system
    out["code"] = fields.required_text("code")
    display = fields.text("display")
    if display:
        out["display"] = display
    return out


def label_coding(label: Label) -> JSON:
    """A Coding for a security label (no system when the label has none)."""
    return {"system": label.system, "code": label.code} if label.system else {"code": label.code}


def patient_consent_category() -> JSON:
    """Consent.category LOINC 59284-0 "Patient Consent" (a fresh object each call)."""
    return {"coding": [{"system": LOINC, "code": "59284-0"}]}


def scope_concept(code: str) -> JSON:
    """Consent.scope for a consentscope code (patient-privacy, research, treatment, adr)."""
    return {"coding": [{"system": CONSENT_SCOPE_SYSTEM, "code": code}]}


def drop_empty(resource: JSON) -> JSON:
    """``resource`` without keys whose value is None or an empty list/object."""
    return {k: v for k, v in resource.items() if v is not None and v != [] and v != {}}
