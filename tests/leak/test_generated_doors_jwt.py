"""Generated requests in jwt mode (Hypothesis): the doors' parts with SMART access tokens.

The requests are composed as in ``test_generated_doors.py`` (paths, ids, operations, query
parameters, encodings, form and batch bodies), and the requester is an access token drawn
from its own parts: SMART v1 and v2 scopes (granular ones with a query, scopes for one type,
``user/``, ``system/``, none), a ``patient`` launch context (Ana, Ben, a patient nobody
has), a ``fhirUser`` (a practitioner, Ana, Ben, an absolute URL, one that names no
requester, none), and what can be wrong with a token (expired, not yet valid, another
audience or issuer, ``alg: none``, HMAC with the public key, a key not in the JWKS, altered
after signing, no ``exp``), written in odd ways (scheme case and spacing, another scheme,
given twice) and sometimes with headers jwt mode refuses (``X-Actor*``,
``X-Purpose-Of-Use``).

Scenario: Ana and Ben both hold a general opt-in (Ana's HIV, opioid-use, mental-health and
psychotherapy records stay closed), so what keeps Ben's records from a token confined to
Ana is the token alone. For every request, on a gateway deciding whole answers (403) and
one on views in 404 mode:

- no unhandled failure (``internal-error`` stays 0); an error answer is a FHIR JSON
  OperationOutcome;
- a request without a valid identity never gets data: a token problem is a 401 with
  ``WWW-Authenticate: Bearer realm="FHIR"`` (``error="invalid_token"`` when a token was
  given), a refused header a 400, and only discovery answers 2xx;
- a valid token is never answered 401;
- no hidden string (Ana's sensitive records, to anyone but Ana) and no string of a patient
  the token may not see (a token whose scopes are all ``patient/`` sees one patient's data)
  is in the raw answer, unless the request carried it;
- every write that reaches the FHIR server (each write entry of a batch sent whole too) is
  one the token's scopes allow (its letter on the type; confined: a create in the launch
  patient's compartment);
- a token whose scopes restrict anything gets no ``Bundle.total``;
- every resource of a 2xx answer (entries, batch slots, nested bundles, contained ones) is
  of a type the token's scopes release (outright, or confined for a patient-compartment type
  to the launch patient), or one that carries no data of its own.

Derandomized by default; to search further:
``GATEWAY_FUZZ_EXAMPLES=5000 GATEWAY_FUZZ_RANDOM=1 pytest --timeout=0 tests/leak/test_generated_doors_jwt.py``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway.app import build_state, start
from gateway.core.compartment import is_patient_data
from gateway.core.scopes import parse_scopes, write_interaction
from gateway.demo.issuer import LocalIssuer, rsa_key
from gateway.metrics import Metrics
from tests.conftest import LABELS, gateway_settings, serving
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.hidden import hidden_in
from tests.leak.test_generated_doors import (
    ACCEPTS,
    ANA_ID,
    BEN_ID,
    BEN_SECRETS,
    EXAMPLES,
    EXTRA,
    KEPT_REFERENCE,
    PREFERS,
    RANDOM,
    SECRETS,
    Attempt,
    Doors,
    parts,
    request_parts,
)

AUDIENCE = "https://gateway.example.org/fhir"
# Ana's ordinary records: hidden only from a token that may not see Ana's data at all.
ANA_STRINGS = (c.ANA_CBC["id"], c.ANA_HYPERTENSION["id"], "Reyes", "1984-07-19", ANA_ID)
BEN_STRINGS = (*BEN_SECRETS, BEN_ID)
# Ana's hidden records (Ben opted in here: his records are hidden by tokens only).
ANA_HIDDEN = tuple(s for s in SECRETS if s not in BEN_SECRETS)
# An ordinary report of Ana's with an ordinary Observation of hers contained in it.
CONTAINED_REPORT = {
    "resourceType": "DiagnosticReport", "id": "dr-cbc-contained-9", "status": "final",
    "code": c.concept(c.LOINC, "58410-2", "CBC panel - Blood by Automated count"),
    "subject": {"reference": c.PAT_ANA},
    "contained": [{**{k: v for k, v in c.ANA_CBC.items() if k != "subject"}, "id": "cbc-inline-1"}],
    "result": [{"reference": "#cbc-inline-1"}],
}
# A stored collection holding records of both patients.
MIXED_COLLECTION = {
    "resourceType": "Bundle", "id": "bundle-mixed-1", "type": "collection",
    "entry": [{"resource": c.BEN_CBC}, {"resource": c.ANA_HYPERTENSION}],
}
JWT_EXTRA = (CONTAINED_REPORT, MIXED_COLLECTION)
# What carries no data of its own, and what discovery answers with.
NEUTRAL = frozenset({"OperationOutcome", "Bundle", "Parameters", "CapabilityStatement"})

# ---------------------------------------------------------------- the parts of a token

SCOPES = (
    "patient/Observation.read", "patient/*.rs", "patient/*.read", "patient/*.*", "patient/Condition.rs",
    "patient/Patient.read", "patient/Observation.cu", "patient/*.cruds", "patient/DiagnosticReport.rs",
    "patient/Condition.rs?category=problem-list-item", "patient/Observation.rs?category=laboratory",
    "user/*.read", "user/*.rs", "user/Observation.rs", "user/Practitioner.rs", "user/Observation.s", "user/*.write",
    "user/*.cruds", "system/*.rs", "system/Condition.read",
    "openid", "fhirUser", "launch/patient", "offline_access", "patient/Observation.sr", "user/observation.read",
)
# Most tokens hold one of these, and up to two more of any kind.
MAIN_SCOPES = (
    ("patient/*.rs",), ("patient/*.read",), ("patient/Observation.read",), ("patient/Condition.rs",),
    ("user/*.rs",), ("user/Observation.rs",), ("system/*.rs",), ("patient/*.rs", "user/Practitioner.rs"), (),
)
FHIR_USERS = (
    *(c.DOCTOR, c.PSYCHIATRIST, c.PAT_ANA, c.PAT_BEN) * 5,
    f"https://ehr.example.org/fhir/{c.DOCTOR}", f"https://ehr.example.org/fhir/{c.PAT_ANA}",
    None, "Organization/org-1", "Practitioner/../Patient/pat-ana-5581", "Practitioner/dr%2Dgomez",
)
LAUNCHES = (None, None, None, ANA_ID, ANA_ID, ANA_ID, BEN_ID, BEN_ID, c.PAT_ANA, c.PAT_BEN, "nope-1", "", "Practitioner/dr-gomez")
FLAWS = (None,) * 60 + (
    "expired", "not-yet-valid", "wrong-audience", "wrong-issuer", "alg-none", "hs256-public-key",
    "unknown-key", "wrong-key", "altered", "no-exp",
)
# How the Authorization header is written: {t} is the token.
PRESENTATIONS = (
    ("Bearer {t}",) * 60 + ("bearer {t}", "BEARER {t}", "Bearer  {t}", " Bearer {t} ")
    + ("Bearer\t{t}", "Basic {t}", "Token {t}", "{t}", "Bearer", "Bearer ", "", "twice", "two-tokens", "absent")
)
ACCEPTED_PRESENTATIONS = frozenset({"Bearer {t}", "bearer {t}", "BEARER {t}", "Bearer  {t}", " Bearer {t} "})
REFUSED_HEADERS = (
    ("X-Actor", c.PAT_ANA), ("X-Actor", c.DOCTOR), ("X-Purpose-Of-Use", "TREAT"), ("X-Purpose-Of-Use", "ETREAT"),
    ("X-Actor-Role", "PRCP"), ("X-Actor-Organization", "Organization/org-1"), ("x-actor", c.PAT_BEN),
)


@dataclass(frozen=True)
class Token:
    scopes: tuple[str, ...]
    launch: str | None
    fhir_user: str | None
    flaw: str | None
    kid: str
    as_list: bool

    def claims(self) -> dict[str, Any]:
        claims: dict[str, Any] = {"scope": list(self.scopes) if self.as_list else " ".join(self.scopes)}
        if self.fhir_user is not None:
            claims["fhirUser"] = self.fhir_user
        if self.launch is not None:
            claims["patient"] = self.launch
        return claims

    @property
    def verifiable(self) -> bool:
        """Signed by the issuer, for this gateway, in its time, naming a requester."""
        return self.flaw is None and self.fhir_user in (
            c.DOCTOR, c.PSYCHIATRIST, c.PAT_ANA, c.PAT_BEN,
            f"https://ehr.example.org/fhir/{c.DOCTOR}", f"https://ehr.example.org/fhir/{c.PAT_ANA}",
        )

    @property
    def requester(self) -> str | None:
        return None if self.fhir_user is None else self.fhir_user.removeprefix("https://ehr.example.org/fhir/")


@dataclass(frozen=True)
class Case:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    token: Token
    presentation: str
    refused: tuple[tuple[str, str], ...]
    break_glass: bool

    @property
    def identified(self) -> bool:
        """The gateway must know who asks."""
        return self.token.verifiable and self.presentation in ACCEPTED_PRESENTATIONS and not self.refused

    def attempt(self, issuer: LocalIssuer) -> Attempt:
        token = mint(issuer, self.token)
        headers = list(self.headers)
        if self.presentation == "twice":
            headers += [("Authorization", f"Bearer {token}")] * 2
        elif self.presentation == "two-tokens":
            other = mint(issuer, Token(("user/*.rs",), None, c.DOCTOR, None, "rsa-1", False))
            headers += [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {other}")]
        elif self.presentation != "absent":
            headers.append(("Authorization", self.presentation.replace("{t}", token)))
        headers += self.refused
        if self.break_glass:
            headers.append(("X-Break-Glass", "Medical emergency"))
        return Attempt(self.method, self.target, tuple(headers), self.body)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(issuer: LocalIssuer, token: Token) -> str:
    """The token, signed now (or made wrong the way ``token.flaw`` says)."""
    claims, now, flaw = token.claims(), time.time(), token.flaw
    if flaw == "expired":
        return issuer.mint(claims, kid=token.kid, audience=AUDIENCE, now=now - 7200, lifetime_s=3600)
    if flaw == "not-yet-valid":
        return issuer.mint({**claims, "nbf": int(now) + 600}, kid=token.kid, audience=AUDIENCE)
    if flaw == "wrong-audience":
        return issuer.mint(claims, kid=token.kid, audience="https://other.example.org/fhir")
    if flaw == "wrong-issuer":
        return issuer.mint({**claims, "iss": issuer.base_url + "/"}, kid=token.kid, audience=AUDIENCE)
    if flaw == "no-exp":
        return issuer.mint({**claims, "exp": None}, kid=token.kid, audience=AUDIENCE)
    if flaw == "unknown-key":
        return issuer.mint(claims, kid="rsa-rogue", audience=AUDIENCE)
    if flaw == "wrong-key":
        rogue = issuer.key("rsa-rogue")
        body = {"iss": issuer.base_url, "aud": AUDIENCE, "exp": int(now) + 600, **claims}
        return jwt.encode(body, rogue.private, algorithm="RS256", headers={"kid": "rsa-1"})
    payload = _b64(orjson.dumps({"iss": issuer.base_url, "aud": AUDIENCE, "exp": int(now) + 600, **claims}))
    if flaw == "alg-none":
        return f"{_b64(orjson.dumps({'alg': 'none', 'typ': 'JWT'}))}.{payload}."
    if flaw == "hs256-public-key":
        pem = issuer.key("rsa-1").private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        header = _b64(orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}))
        return f"{header}.{payload}.{_b64(hmac.new(pem, f'{header}.{payload}'.encode(), hashlib.sha256).digest())}"
    signed = issuer.mint(claims, kid=token.kid, audience=AUDIENCE)
    if flaw == "altered":  # the same signature on a wider grant
        header, _, rest = signed.partition(".")
        signature = rest.partition(".")[2]
        return f"{header}.{_b64(orjson.dumps({**orjson.loads(base64.urlsafe_b64decode(rest.partition('.')[0] + '==')), 'scope': 'user/*.rs'}))}.{signature}"
    return signed


# One in twenty (Hypothesis leans to a strategy's first values: the common case comes first).
_RARELY = st.sampled_from((False,) * 19 + (True,))


@st.composite
def tokens(draw: st.DrawFn) -> Token:
    return Token(
        scopes=(*draw(st.sampled_from(MAIN_SCOPES)), *draw(st.lists(st.sampled_from(SCOPES), max_size=2))),
        launch=draw(st.sampled_from(LAUNCHES)),
        fhir_user=draw(st.sampled_from(FHIR_USERS)),
        flaw=draw(st.sampled_from(FLAWS)),
        kid=draw(st.sampled_from(("rsa-1", "rsa-1", "ec-1"))),
        as_list=draw(st.sampled_from((False,) * 5 + (True,))),
    )


# Reads and searches as a client writes them, over the records of both patients.
READ_TYPES = ("Observation", "Condition", "Patient", "DiagnosticReport", "Bundle", "Practitioner", "Provenance",
              "MedicationRequest", "DocumentReference", "Flag", "Consent", "Encounter")
READ_IDS = (c.ANA_CBC["id"], c.ANA_HYPERTENSION["id"], c.BEN_CBC["id"], c.BEN_HYPERTENSION["id"], ANA_ID, BEN_ID,
            "dr-gomez", "dr-cbc-contained-9", "bundle-mixed-1", "prov-lab-3", "obs-cbc-derived-2",
            c.HIV_TEST["id"], c.DEPRESSION["id"], "consent-ben-in")
READ_PARAMS = (
    ("patient", c.PAT_ANA), ("patient", c.PAT_BEN), ("subject", BEN_ID), ("subject", c.PAT_ANA), ("_id", c.BEN_CBC["id"]),
    ("_include", "*"), ("_include", "Observation:subject"), ("_revinclude", "Observation:subject"),
    ("_revinclude", "Provenance:target"), ("_revinclude", "*"), ("_has:Observation:patient:code", "58410-2"),
    ("_elements", "id,subject"), ("_summary", "true"), ("_summary", "count"), ("_count", "1"), ("_total", "accurate"),
    ("_contained", "true"), ("_type", "Observation,Condition,Patient"), ("code", "58410-2"), ("_sort", "-_lastUpdated"),
)


@st.composite
def _read(draw: st.DrawFn) -> str:
    rtype, rid = draw(st.sampled_from(READ_TYPES)), draw(st.sampled_from(READ_IDS))
    patient = draw(st.sampled_from((ANA_ID, BEN_ID)))
    parts = draw(st.sampled_from((
        [rtype], [rtype], [rtype, rid], [rtype, rid], ["Patient", patient, rtype], ["Patient", patient, "$everything"],
        [rtype, rid, "_history"], [rtype, "_history"], ["_history"], [],
    )))
    pairs = draw(st.lists(st.sampled_from(READ_PARAMS), max_size=3))
    query = "&".join(f"{name}={quote(value, safe='/:$|,*')}" for name, value in pairs)
    path = "/".join(parts)
    return f"{path}?{query}" if query else path


@st.composite
def _reads(draw: st.DrawFn) -> tuple[str, str, bytes, str | None]:
    """A read at the front door, a batch of them, or a search written as a form."""
    kind = draw(st.sampled_from(("alone",) * 6 + ("batch", "batch", "form")))
    if kind == "alone":
        return "GET", "/fhir/" + draw(_read()), b"", None
    if kind == "batch":
        entries = [{"request": {"method": "GET", "url": url}} for url in draw(st.lists(_read(), min_size=1, max_size=3))]
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": entries}
        return "POST", "/fhir", orjson.dumps(bundle), "application/fhir+json"
    rtype = draw(st.sampled_from(READ_TYPES))
    pairs = draw(st.lists(st.sampled_from(READ_PARAMS), max_size=3))
    body = "&".join(f"{name}={quote(value, safe='')}" for name, value in pairs).encode()
    return "POST", f"/fhir/{rtype}/_search", body, "application/x-www-form-urlencoded"


@st.composite
def cases(draw: st.DrawFn) -> Case:
    if draw(st.booleans()):
        method, target, body, content_type = draw(_reads())
        headers = [("Content-Type", content_type)] if content_type else []
        return Case(method, target, tuple(headers), body, draw(tokens()), draw(st.sampled_from(PRESENTATIONS)),
                    (draw(st.sampled_from(REFUSED_HEADERS)),) if draw(_RARELY) else (), draw(_RARELY))
    method, target, headers, body = draw(request_parts((("Accept", ACCEPTS), ("Prefer", PREFERS))))
    refused: tuple[tuple[str, str], ...] = ()
    if draw(_RARELY):
        refused = (draw(st.sampled_from(REFUSED_HEADERS)),)
    return Case(method, target, tuple(headers), body, draw(tokens()), draw(st.sampled_from(PRESENTATIONS)), refused,
                draw(_RARELY))


# ---------------------------------------------------------------- what a token releases (the test's own reading)

_LETTERS = {"read": "rs", "write": "cud", "*": "cruds"}
_GRANT = re.compile(r"^(patient|user|system)/([A-Z][A-Za-z]+|\*)\.(read|write|\*|c?r?u?d?s?)$")


def releases(token: Token) -> tuple[set[str], set[str], str | None]:
    """Types released outright, types released in the launch patient's compartment, and that
    patient (``Patient/<id>``) when the token is confined to one."""
    outright: set[str] = set()
    confined: set[str] = set()
    launch = token.launch
    patient = None
    if launch:
        patient = launch if launch.startswith("Patient/") else (None if "/" in launch else f"Patient/{launch}")
    for scope in token.scopes:
        found = _GRANT.match(scope)
        if found is None or not found.group(3):
            continue
        context, rtype, letters = found.groups()
        letters = _LETTERS.get(letters, letters)
        if "r" in letters or "s" in letters:
            if context != "patient":
                outright.add(rtype)
            elif patient is not None:
                confined.add(rtype)
    return outright, confined, patient


_WRITE_LETTER = {"POST": "c", "PUT": "u", "PATCH": "u", "DELETE": "d"}


def may_write(token: Token, method: str, rtype: str, body: bytes) -> bool:
    """May the token's scopes send this write (CONTRACT §4): its letter on the type outright,
    or confined: a create in the launch patient's compartment, an update or delete only of
    data outside every compartment."""
    letter = _WRITE_LETTER[method]
    _, _, patient = releases(token)
    for scope in token.scopes:
        found = _GRANT.match(scope)
        if found is None or found.group(2) not in (rtype, "*") or letter not in _LETTERS.get(found.group(3), found.group(3)):
            continue
        if found.group(1) != "patient":
            return True
        if patient is None:
            continue
        if not is_patient_data(rtype):
            return True
        if letter == "c" and patient.encode() in body:  # a loose check: the body names the patient
            return True
    return False


def unrestricted(token: Token) -> bool:
    """Every type may be read and searched outright (``user/*.read``, ``system/*.rs``)."""
    for scope in token.scopes:
        found = _GRANT.match(scope)
        if found and found.group(1) != "patient" and found.group(2) == "*":
            letters = _LETTERS.get(found.group(3), found.group(3))
            if "r" in letters and "s" in letters:
                return True
    return False


def resources_in(node: Any) -> Iterator[dict[str, Any]]:
    """Every resource of an answer: the answer, its entries and slots, nested, and contained."""
    if not isinstance(node, dict):
        return
    if isinstance(node.get("resourceType"), str):
        yield node
    for entry in node.get("entry", []) if isinstance(node.get("entry"), list) else []:
        if isinstance(entry, dict):
            yield from resources_in(entry.get("resource"))
            response = entry.get("response")
            if isinstance(response, dict):
                yield from resources_in(response.get("outcome"))
    for inner in node.get("contained", []) if isinstance(node.get("contained"), list) else []:
        yield from resources_in(inner)
    for parameter in node.get("parameter", []) if isinstance(node.get("parameter"), list) else []:
        if isinstance(parameter, dict):
            yield from resources_in(parameter.get("resource"))


def type_released(rtype: str, outright: set[str], confined: set[str]) -> bool:
    if rtype in NEUTRAL or rtype in outright or "*" in outright:
        return True
    return rtype in confined or "*" in confined


# ---------------------------------------------------------------- the issuer, the server and two gateways


class JwtDoors(Doors):
    """The fake FHIR server, a local token issuer, and two gateways in jwt mode: answers
    decided whole (403), and on views in 404 mode."""

    GATEWAYS = (("whole", {}, 403), ("views-404", {"views_above_bytes": 0}, 404))

    async def _start(self) -> bool:
        self.issuer = LocalIssuer()
        self.issuer.keys.append(rsa_key("rsa-rogue"))
        self.issuer.keys[-1].published = False
        self._issuing = serving(self.issuer.app())
        self.issuer.base_url = await self._issuing.__aenter__()
        return await super()._start()

    def settings_for(self) -> dict[str, Any]:
        return {"auth": {"mode": "jwt", "jwt": {"issuer": self.issuer.base_url, "audience": AUDIENCE}}}

    def seed(self) -> None:
        self.fake.add(*EXTRA, *JWT_EXTRA)
        self.fake.add(c.opt_in(c.PAT_ANA), c.opt_in(c.PAT_BEN, "consent-ben-in"))

    async def _stop_servers(self) -> None:
        await super()._stop_servers()
        await self._issuing.__aexit__(None, None, None)


@pytest.fixture(scope="module")
def jwt_doors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JwtDoors]:
    running = JwtDoors(tmp_path_factory.mktemp("generated-doors-jwt"))
    yield running
    running.close()


def _discovery(body: bytes) -> bool:
    """A CapabilityStatement or a SMART configuration: what answers without an identity."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and (doc.get("resourceType") == "CapabilityStatement"
                                      or ("resourceType" not in doc and "token_endpoint" in doc))


def check_writes(name: str, case: Case, attempt: Attempt, sent: list[Any]) -> None:
    """Every write that reached the FHIR server is one the token's scopes allow, also each
    write entry of a batch or transaction sent whole."""
    writes: list[tuple[str, str, bytes]] = []
    for request in sent:
        writes.append((request.method, request.path_qs, request.body or b""))
        if request.method == "POST" and request.path_qs.split("?", 1)[0].rstrip("/") == "/fhir" and request.body:
            bundle = orjson.loads(request.body)
            for entry in bundle.get("entry", []) if isinstance(bundle, dict) else []:
                inner = entry.get("request", {}) if isinstance(entry, dict) else {}
                if isinstance(inner.get("method"), str) and isinstance(inner.get("url"), str):
                    writes.append((inner["method"], "/fhir/" + inner["url"], orjson.dumps(entry.get("resource"))))
    for method, path_qs, body in writes:
        path = [unquote(p) for p in path_qs.split("?", 1)[0].removeprefix("/fhir").strip("/").split("/")]
        if method not in _WRITE_LETTER or not path[0] or path[-1] == "_search":
            continue
        if any(p.startswith("$") for p in path):  # operations: the allowed ones read, but these
            if not any(p.lower() in ("$meta-add", "$meta-delete") for p in path):
                continue
            method = "PUT"
        if case.break_glass and method == "POST" and path == ["Consent"]:
            continue  # the gateway's own record of an emergency access
        if method == "POST" and path[0] in ("AuditEvent",):
            continue
        assert case.identified, f"{name}: a write reached the server without an identity: {attempt.raw()!r}"
        assert may_write(case.token, method, path[0], body), (
            f"{name}: {method} {path_qs} reached the server: {attempt.raw()!r}\n{case.token}")


def check_answer(name: str, case: Case, attempt: Attempt, answer: bytes) -> None:
    said = attempt.said()
    status, headers, body = parts(answer)
    seen = (answer.partition(b"\r\n\r\n")[0] + b"\n" + body).replace(KEPT_REFERENCE, b"")
    where = f"{name}: {attempt.raw()!r}\n{case.token}\n{answer[:2500]!r}"
    if status >= 400 and attempt.method != "HEAD" and body:
        assert headers.get("content-type", "").startswith("application/fhir+json"), where
        assert orjson.loads(body).get("resourceType") == "OperationOutcome", where
    if not case.identified:
        assert status >= 400 or (status < 300 and _discovery(body)) or attempt.method == "HEAD", where
        if case.refused and status not in (400, 405, 406) and status < 300:
            raise AssertionError(f"a refused header was not refused: {where}")
    elif status == 401:
        raise AssertionError(f"a valid token was refused: {where}")
    if status == 401:
        challenge = headers.get("www-authenticate", "")
        assert challenge.startswith('Bearer realm="FHIR"'), where
        if case.presentation in ACCEPTED_PRESENTATIONS:
            assert 'error="invalid_token"' in challenge, where
    # What this token may see of each patient, and of Ana's hidden records.
    outright, confined, patient = releases(case.token)
    shown: list[str] = []
    if not case.identified:
        shown += [*ANA_HIDDEN, *BEN_STRINGS, *ANA_STRINGS]
    else:
        if case.token.requester != c.PAT_ANA and not case.break_glass:
            shown += ANA_HIDDEN
        if not outright:  # all its grants are confined to one patient (or it has none)
            shown += [*(BEN_STRINGS if patient != c.PAT_BEN else ()), *(ANA_STRINGS if patient != c.PAT_ANA else ())]
            if patient != c.PAT_ANA:
                shown += ANA_HIDDEN
    secrets = [s for s in dict.fromkeys(shown) if s.lower() not in said]
    found = hidden_in(seen, secrets)
    assert not found, f"{found} in the answer: {where}"
    if 200 <= status < 300 and body and case.identified and not _discovery(body):
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        for resource in resources_in(doc):
            rtype = resource["resourceType"]
            assert type_released(rtype, outright, confined), f"a {rtype} its scopes do not release: {where}"
            if rtype == "Bundle" and not unrestricted(case.token):  # CONTRACT §4: a restricted token keeps no total
                assert "total" not in resource, f"a total for a token whose scopes restrict: {where}"


def _plain(target: str, scopes: tuple[str, ...], launch: str | None, fhir_user: str = c.DOCTOR) -> Case:
    """A read with a valid token: what every run tries first."""
    return Case("GET", target, (), b"", Token(scopes, launch, fhir_user, None, "rsa-1", False), "Bearer {t}", (), False)


def _batch(urls: tuple[str, ...], scopes: tuple[str, ...], launch: str | None) -> Case:
    body = orjson.dumps({"resourceType": "Bundle", "type": "batch",
                         "entry": [{"request": {"method": "GET", "url": url}} for url in urls]})
    return Case("POST", "/fhir", (("Content-Type", "application/fhir+json"),), body,
                Token(scopes, launch, c.DOCTOR, None, "rsa-1", False), "Bearer {t}", (), False)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@example(case=_plain("/fhir/Observation", ("patient/*.rs",), ANA_ID))
@example(case=_plain(f"/fhir/Patient/{BEN_ID}", ("patient/*.read",), ANA_ID))
@example(case=_plain(f"/fhir/Patient/{ANA_ID}/$everything", ("patient/*.rs",), BEN_ID))
@example(case=_plain("/fhir/Condition?_include=*", ("user/Observation.rs",), None))
@example(case=_plain("/fhir/Observation?_revinclude=Provenance:target", ("patient/Observation.read",), ANA_ID))
@example(case=_plain("/fhir/Bundle/bundle-mixed-1", ("patient/*.rs",), ANA_ID))
@example(case=_plain("/fhir/Bundle/bundle-mixed-1", ("user/Observation.rs",), None))
@example(case=_plain("/fhir/DiagnosticReport/dr-cbc-contained-9", ("patient/DiagnosticReport.rs",), ANA_ID))
@example(case=_plain("/fhir/DiagnosticReport?_contained=true", ("user/DiagnosticReport.rs",), None))
@example(case=_batch(("Observation", f"Condition?patient={c.PAT_BEN}", f"Patient/{BEN_ID}"), ("patient/*.rs",), ANA_ID))
@example(case=_batch(("Observation", "Condition", "Patient"), ("user/Observation.rs",), None))
@given(case=cases())
def test_no_generated_token_request_fails_unhandled_or_reaches_what_its_token_may_not(jwt_doors: JwtDoors, case: Case) -> None:
    attempt = case.attempt(jwt_doors.issuer)
    for name, _, _ in jwt_doors.gateways:
        before = len(jwt_doors.fake.requests)
        answer, errors = jwt_doors.send_to(name, attempt)
        check_writes(name, case, attempt, jwt_doors.fake.requests[before:])
        assert errors == 0, f"{name}: the gateway failed unhandled on {attempt.raw()!r}"
        status = parts(answer)[0]
        identity = "valid" if case.identified else "refused header" if case.refused else "no identity"
        entries = " with entries" if b'"entry"' in answer else ""
        event(f"{identity}: {attempt.method} {status}{entries}")
        check_answer(name, case, attempt, answer)


# ---------------------------------------------------------------- what the generated tests found


@pytest.mark.parametrize(("method", "target", "body"), [
    ("DELETE", f"/fhir/{c.HIV_CONDITION['id']}/Observation", b""),
    ("DELETE", "/fhir?_id=" + c.ANA_CBC["id"], b""),
    ("DELETE", "/fhir/", b""),
    ("PUT", f"/fhir/{c.ANA_CBC['id']}/Observation", orjson.dumps(c.ANA_CBC)),
    ("PATCH", f"/fhir/{c.ANA_CBC['id']}/Observation", b"[]"),
    ("POST", f"/fhir/Observation/{c.ANA_CBC['id']}", orjson.dumps(c.ANA_CBC)),
])
def test_a_write_on_a_path_of_no_fhir_shape_needs_its_scope(jwt_doors: JwtDoors, method: str, target: str, body: bytes) -> None:
    """Found by the generated test: a DELETE (or PUT, PATCH) whose path names no type first,
    and a POST to a record's path, went to the server for a token granting no write; the
    server decides what such a path means. A write needs its letter on the type it names, and
    one that names none needs it on every type."""
    headers = (("Content-Type", "application/fhir+json"),) if body else ()
    for scopes, launch in ((("user/*.rs",), None), (("patient/*.cruds",), BEN_ID), (("user/Patient.cruds",), None)):
        case = Case(method, target, headers, body, Token(scopes, launch, c.DOCTOR, None, "rsa-1", False), "Bearer {t}", (), False)
        for name, _, _ in jwt_doors.gateways:
            before = len(jwt_doors.fake.requests)
            answer, errors = jwt_doors.send_to(name, case.attempt(jwt_doors.issuer))
            status, answer_headers, _ = parts(answer)
            assert errors == 0
            # (a POST to a record's path is no FHIR interaction: 400 before any scope is asked)
            assert status == (400 if method == "POST" else 403), (scopes, answer[:600])
            if status == 403:
                assert 'error="insufficient_scope"' in answer_headers.get("www-authenticate", ""), answer[:600]
            assert jwt_doors.fake.requests[before:] == [], (scopes, method, target)


@pytest.mark.parametrize(("method", "interaction", "operation", "needed"), [
    ("DELETE", "other", None, "delete"), ("DELETE", "delete", None, "delete"), ("PUT", "other", None, "update"),
    ("PATCH", "update", None, "patch"), ("POST", "other", None, "create"), ("POST", "create", None, "create"),
    ("POST", "search", None, "search"), ("POST", "batch", None, "batch"), ("POST", "operation", "$everything", "operation"),
    ("POST", "operation", "$META-ADD", "update"), ("GET", "read", None, "read"),
])
def test_the_write_a_request_makes_is_told_by_its_method(method: str, interaction: str, operation: str | None, needed: str) -> None:
    assert write_interaction(method, interaction, operation) == needed


def test_a_write_naming_no_type_needs_its_letter_on_every_type_outright() -> None:
    assert not parse_scopes("user/*.rs user/Observation.cruds", None).permits_request("delete", None)
    assert not parse_scopes("patient/*.cruds", ANA_ID).permits_request("delete", None)
    assert not parse_scopes("patient/*.cruds", ANA_ID).permits_request("create", None)
    assert parse_scopes("user/*.cruds", None).permits_request("delete", None)
    assert parse_scopes("system/*.write", None).permits_request("update", None)
    assert parse_scopes("user/*.rs", None).permits_request("read", None)


def test_a_write_on_a_path_of_no_fhir_shape_goes_on_with_the_scope_for_every_type(jwt_doors: JwtDoors) -> None:
    """The letter on every type, outright, lets such a write through to the server to judge."""
    case = Case("DELETE", f"/fhir/{c.HIV_CONDITION['id']}/Observation", (), b"",
                Token(("user/*.cruds",), None, c.DOCTOR, None, "rsa-1", False), "Bearer {t}", (), False)
    before = len(jwt_doors.fake.requests)
    answer, errors = jwt_doors.send_to("whole", case.attempt(jwt_doors.issuer))
    assert errors == 0 and parts(answer)[0] != 403, answer[:600]
    assert [r.method for r in jwt_doors.fake.requests[before:]] == ["DELETE"]
