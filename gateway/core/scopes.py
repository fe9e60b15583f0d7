"""SMART on FHIR scopes: what an access token lets its holder see and do (CONTRACT §4).

Semantics:
- v1 scopes ``<context>/<Type|*>.<read|write|*>`` and v2 scopes ``<context>/<Type|*>.<cruds>``
  (letters in that order, any subset) are read; ``read`` grants ``r`` and ``s``, ``write``
  grants ``c``, ``u`` and ``d``, ``*`` grants all five. Contexts: ``patient``, ``user`` and
  ``system``.
- A v2 scope with a query (``patient/Observation.rs?category=laboratory``) narrows a grant
  in ways the gateway does not evaluate, so it grants nothing (fail closed). Anything else
  that is not a resource scope (``openid``, ``launch``, ``offline_access``) grants nothing.
- ``user/`` and ``system/`` scopes grant a type outright. A ``patient/`` scope grants a
  type only inside the compartment of the token's ``patient`` claim: a resource of a
  patient-compartment type is released only when that patient is one of its patients; a
  type outside every compartment (Medication, Practitioner) is released as granted. A
  ``patient/`` scope without a ``patient`` claim grants nothing.
- Scopes decide before consent and are never overridden by break-glass: a resource they do
  not grant is withheld like a consent denial, with the reason rule ``scope-not-granted``.
- A released resource needs ``r`` or ``s`` on its type (reads and searches are decided on
  what they return). A write is checked before it is sent with the letter it needs (create
  ``c``, update and patch ``u``, delete ``d``), also each write entry of a batch. A token
  confined to a patient may create resources in that patient's compartment, and may not
  update, patch or delete patient data (the stored resource it would change is not known
  before the write).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.core.compartment import is_patient_data
from gateway.core.enforce import Judge
from gateway.core.fhir import JSON
from gateway.core.model import Decision, Reason, Verdict

_SCOPE = re.compile(r"^(patient|user|system)/([A-Z][A-Za-z]{1,63}|\*)\.(read|write|\*|c?r?u?d?s?)$")
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
ALL = "cruds"
# Letters a released resource may carry: shown by a read or by a search.
_RELEASE = ("r", "s")
# The letter each write needs before it is sent (reads and searches are decided on their
# answers, so a type not granted reads exactly like a consent denial).
INTERACTION_LETTER = {"create": "c", "update": "u", "patch": "u", "delete": "d"}
# What a method writes whatever its path's shape (DELETE on a path that is no FHIR shape still
# deletes at a server that reads it otherwise); POST writes unless it searches, runs an
# operation or is a batch (whose entries are checked each).
_METHOD_WRITES = {"DELETE": "delete", "PUT": "update", "PATCH": "patch"}
# $meta-add / $meta-delete change the stored resource's labels: an update (in any case: a
# server may fold it).
META_WRITES = frozenset({"$meta-add", "$meta-delete"})
# Answers that carry no data of their own.
_NEUTRAL = frozenset({"OperationOutcome", "Bundle", "Parameters"})

SCOPE_DENIED = Decision(Verdict.DENY, (Reason("", "", "scope-not-granted"),), combining="scope")


@dataclass(frozen=True, slots=True)
class Grants:
    """What a token's scopes grant: (type or ``*``, letter) pairs, outright or confined."""

    outright: frozenset[tuple[str, str]]
    confined: frozenset[tuple[str, str]]
    patient: str | None  # "Patient/<id>" of the launch context, when confined grants apply

    @property
    def unrestricted(self) -> bool:
        """Every type may be read and searched outright (``user/*.read``, ``system/*.rs``)."""
        return ("*", "r") in self.outright and ("*", "s") in self.outright

    def _has(self, pairs: frozenset[tuple[str, str]], rtype: str, letter: str) -> bool:
        return (rtype, letter) in pairs or ("*", letter) in pairs

    def grants(self, rtype: str, letter: str) -> bool:
        """The letter is granted on the type outright or in the patient's compartment."""
        return self._has(self.outright, rtype, letter) or self._has(self.confined, rtype, letter)

    def releases(self, rtype: str, owners: frozenset[str]) -> bool:
        """May a resource of ``rtype`` belonging to ``owners`` be shown to this token?"""
        if rtype in _NEUTRAL:
            return True
        if any(self._has(self.outright, rtype, letter) for letter in _RELEASE):
            return True
        if not any(self._has(self.confined, rtype, letter) for letter in _RELEASE):
            return False
        return not is_patient_data(rtype) or self.patient in owners

    def permits_request(self, interaction: str, rtype: str | None) -> bool:
        """May a write of this interaction on this type be sent at all? (True for reads.) A
        write whose type the path does not name needs its letter on every type, outright."""
        letter = INTERACTION_LETTER.get(interaction)
        if letter is None:
            return True
        if rtype is None:
            return self._has(self.outright, "*", letter)
        if self._has(self.outright, rtype, letter):
            return True
        if not self._has(self.confined, rtype, letter):
            return False
        return letter == "c" or not is_patient_data(rtype)

    def permits_write(self, rtype: str, owners: frozenset[str]) -> bool:
        """A body written (create) by a confined grant must belong to the token's patient."""
        if self._has(self.outright, rtype, "c"):
            return True
        return not is_patient_data(rtype) or self.patient in owners


def write_interaction(method: str, interaction: str, operation: str | None) -> str:
    """The interaction whose letter a request needs: its route's, or the write its method makes."""
    if (operation or "").lower() in META_WRITES:
        return "update"
    if method in _METHOD_WRITES:
        return _METHOD_WRITES[method]
    if method == "POST" and interaction == "other":
        return "create"
    return interaction


def parse_scopes(scopes: str | list[str] | tuple[str, ...], patient: str | None) -> Grants:
    """Grants of a ``scope`` claim (space-separated string or list); ``patient`` is the launch id."""
    items = scopes.split() if isinstance(scopes, str) else [s for s in scopes if isinstance(s, str)]
    outright: set[tuple[str, str]] = set()
    confined: set[tuple[str, str]] = set()
    launch = f"Patient/{patient}" if patient and "/" not in patient else patient
    for item in items:
        found = _SCOPE.match(item)
        if found is None or not found.group(3):
            continue
        context, rtype, perms = found.groups()
        letters = _V1.get(perms, perms)
        target = confined if context == "patient" else outright
        if context == "patient" and launch is None:
            continue
        target.update((rtype, letter) for letter in letters)
    return Grants(frozenset(outright), frozenset(confined), launch if confined else None)


def scoped(judge: Judge, grants: Grants) -> Judge:
    """Wrap ``judge`` so what the scopes do not grant is denied before consent is asked."""

    def wrapped(resource: JSON, owners: frozenset[str]) -> Decision:
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str) or not grants.releases(rtype, owners):
            return SCOPE_DENIED
        return judge(resource, owners)

    return wrapped
