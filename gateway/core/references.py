"""References that decide: what a resource's data depends on outside itself.

Two references change what a resource is:

- a ``Binary`` is the bytes of the patient data its ``securityContext`` names, so it is
  decided as that resource;
- a ``MedicationRequest`` (and its siblings) naming a ``Medication`` by reference is labelled
  like one that writes the same drug inline, and so are the ingredients that Medication names by
  reference (``ingredient.itemReference``: one hop, never further);
- an author given as a ``PractitionerRole`` is also that role's practitioner and organization
  (``compartment.authors_of``), read only when a consent reads authors (``author_roles``).

The web layer finds the targets that are not in the answer (``missing_targets``), reads them
from the FHIR server and hands everything to ``Resolved``; deciding stays pure.

A ``Reference.display`` can name what it points at ("HIV-1 viral load 12000 copies/mL"):
``scrub_displays`` removes the display of every reference to patient data that the answer
does not release; a reference to another server's patient data (a base not among ``ours``) is
never released here, whatever this server's record of the same ``Type/id`` is. A narrative
renders what its resource refers to, so it goes with them (``scrub_narrative``, ``scrub_listing``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.core import native
from gateway.core.compartment import (
    ROLE, author_references, authors_of, is_patient_data, patients_of, role_reference, UNKNOWN_AUTHOR,
)
from gateway.core.fhir import (
    NO_BASES, R4_RESOURCE_TYPES, Bases, JSON, contained_resource, local_reference, reference_base, reference_of,
    relative_reference, resource_reference,
)

# Resource types whose medication may be a reference to a Medication resource.
MEDICATION_HOLDERS = frozenset({
    "MedicationRequest", "MedicationAdministration", "MedicationDispense", "MedicationStatement",
})
# What a Medication's ingredient may name by reference (R4 ``Medication.ingredient.item[x]``).
INGREDIENT_TYPES = frozenset({"Medication", "Substance"})
_MEDICATION = frozenset({"Medication"})
# What a target that could not be read stands for: decide as unknown (fail closed).
UNREADABLE: JSON = {"resourceType": "OperationOutcome", "issue": []}


def iter_resources(node: JSON) -> list[JSON]:
    """Every resource in a body: Bundle entries (nested), Parameters, and contained ones.

    Depth first, a container's items last to first (what a stack of them gives)."""
    found: list[JSON] = []
    stack: list[JSON] = [node]
    pop, push, add = stack.pop, stack.append, found.append
    while stack:
        current = pop()
        rtype = current.get("resourceType")
        if rtype == "Bundle":
            stack.extend([resource for entry in current.get("entry") or ()
                          if type(entry) is dict and type(resource := entry.get("resource")) is dict])
        elif rtype == "Parameters":
            params = list(current.get("parameter") or ())
            while params:
                param = params.pop()
                if type(param) is dict:
                    resource = param.get("resource")
                    if type(resource) is dict:
                        push(resource)
                    params.extend(param.get("part") or ())
        else:
            add(current)
            contained = current.get("contained")
            if type(contained) is list:
                found.extend([inner for inner in contained if type(inner) is dict])
            elif type(contained) is dict:
                add(contained)  # not FHIR, but a reader may take it as one
    return found


def security_context(resource: JSON, ours: Bases = NO_BASES) -> str | None:
    """``Type/id`` of the patient data a Binary stands for, or None (also for another server's
    resource: ``unreadable_context``)."""
    if resource.get("resourceType") != "Binary":
        return None
    ref = reference_of(resource.get("securityContext"))
    if ref is None or ref.startswith("#"):
        return None
    target = local_reference(ref, ours)
    if target is None:
        return None
    rtype = target.split("/", 1)[0]
    return target if "/" in target and is_patient_data(rtype) else None


def unreadable_context(resource: JSON, ours: Bases = NO_BASES) -> bool:
    """A Binary whose securityContext is there but names nothing the gateway decides by: no
    Reference (null, {}, a list, a string, a list of references), a ``#`` reference (a Binary
    contains nothing), anything but ``Type/id`` of an R4 type (a conditional or misspelled
    reference may be anyone's record), another server's resource (a base not among ``ours``:
    its ``Observation/o1`` is not this server's), or another Binary (what that one stands for
    is not followed): what it stands for is unknown."""
    if resource.get("resourceType") != "Binary" or "securityContext" not in resource:
        return False
    ref = reference_of(resource.get("securityContext"))
    if ref is None or ref.startswith("#"):
        return True
    local = local_reference(ref, ours)
    if local is None:
        return True
    rtype, _, rid = local.partition("/")
    return rtype == "Binary" or rtype not in R4_RESOURCE_TYPES or _ID.fullmatch(rid) is None


def medication_reference(resource: JSON, ours: Bases = NO_BASES) -> str | None:
    """The ``medicationReference`` of an order or statement (``#id`` for a contained one);
    ``FOREIGN_MEDICATION`` for another server's (a base not among ``ours``: never read from this
    server by its ``Type/id``, what it is, is unknown)."""
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or rtype not in MEDICATION_HOLDERS:
        return None
    ref = reference_of(resource.get("medicationReference"))
    if ref is None:
        return None
    if ref.startswith("#"):
        return ref
    local = local_reference(ref, ours)
    return FOREIGN_MEDICATION if local is None else local


# What an order's medicationReference to another FHIR server stands for: unknown (it closes).
FOREIGN_MEDICATION = "\0foreign-medication"


def ingredient_references(medication: JSON, ours: Bases = NO_BASES) -> list[str]:
    """The ``ingredient.itemReference`` of a Medication as ``Type/id`` (``#id`` for a contained
    one); ``UNKNOWN_INGREDIENT`` for one naming no Medication or Substance in a form that can be
    read, or naming another server's (a base not among ``ours``): what it is, is unknown."""
    ingredients = medication.get("ingredient")
    if medication.get("resourceType") != "Medication" or not isinstance(ingredients, list):
        return []
    found: list[str] = []
    for ingredient in ingredients:
        item = ingredient.get("itemReference") if isinstance(ingredient, dict) else None
        if item is None:
            continue
        ref = reference_of(item)
        if ref is None:
            if isinstance(item, dict) and set(item) <= _NAMING_NOTHING:
                continue  # a display or identifier alone names nothing the gateway could read
            found.append(UNKNOWN_INGREDIENT)
        elif ref.startswith("#"):
            found.append(ref)
        else:
            target = local_reference(ref, ours) or UNKNOWN_INGREDIENT
            rtype, _, rid = target.partition("/")
            found.append(target if rtype in INGREDIENT_TYPES and _ID.fullmatch(rid) else UNKNOWN_INGREDIENT)
    return found


# Reference members that name nothing the gateway follows.
_NAMING_NOTHING = frozenset({"display", "identifier", "type", "id", "extension"})
UNKNOWN_INGREDIENT = "\0unknown-ingredient"


def in_answer(body: JSON) -> dict[str, JSON]:
    """The resources of an answer by ``Type/id``; the first one ``iter_resources`` gives wins.

    SECURITY: a contained resource is not addressable from outside its container, so it never
    stands for a ``Type/id`` of the answer (a contained ``Condition`` with a hidden record's id
    would otherwise count that record as released, and keep displays that name it)."""
    found: dict[str, JSON] = {}
    for resource, addressable in addressed_resources(body):
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if addressable and isinstance(rtype, str) and isinstance(rid, str):  # resource_reference
            found.setdefault(f"{rtype}/{rid}", resource)
    return found


def addressed_resources(body: JSON) -> Iterator[tuple[JSON, bool]]:
    """Every resource of an answer (``iter_resources``), each with whether it stands for its
    ``Type/id``: a contained resource is not addressable from outside its container."""
    inner: set[int] = set()
    for resource in iter_resources(body):  # a container comes before what it contains
        if "contained" in resource:
            contained = resource["contained"]
            if type(contained) is list:
                inner.update(id(r) for r in contained)
            elif type(contained) is dict:
                inner.add(id(contained))
        yield resource, id(resource) not in inner


@dataclass(frozen=True, slots=True)
class Deciding:
    """What decides resources of an answer beyond themselves."""

    present: dict[str, JSON]        # the answer's current resources by ``Type/id`` (current_resources)
    contexts: frozenset[str]        # security contexts not in the answer
    medications: frozenset[str]     # Medications named by reference, not in the answer
    unattached: frozenset[str]      # Binaries without a security context (``Binary/id``)
    ingredients: frozenset[str] = frozenset()  # ingredients of the answer's Medications, not in it


def may_refer(raw: bytes) -> bool:
    """False when the JSON text ``raw`` certainly holds no Binary, no ``medicationReference`` and
    no ``itemReference`` (then ``deciding_references`` of it is None, without a walk).

    One scan finds both keys (and the rare other ``...Reference`` key, which costs a walk that
    finds nothing): each scan of a large answer costs as much as the walk of a small one."""
    return b'Reference"' in raw or b'"Binary"' in raw or has_u_escape(raw)


def lists_records(raw: bytes) -> bool:
    """Whether the JSON text ``raw`` (one entry's) may hold a resource whose narrative renders the
    records it lists (``LISTINGS``; a ``\\u`` escape that could spell one is ``has_u_escape``'s)."""
    return b'"Composition"' in raw or b'"List"' in raw


def may_narrate(raw: bytes) -> bool:
    """Whether the JSON text ``raw`` may hold a narrative (``scrub_narrative``): its XHTML holds a
    ``<`` (a ``\\u`` escape that could spell one is ``has_u_escape``'s). One byte, found by
    ``memchr``: a scan for ``"div"`` costs about a millisecond per 3 MB answer."""
    return b"<" in raw


def names_records(raw: bytes) -> bool:
    """Whether the JSON text ``raw`` (one entry's) may hold a narrative or an AuditEvent, which
    describe what they refer to (``scrub_narrative``, ``scrub_audit_entities``)."""
    return b"<" in raw or b'"AuditEvent"' in raw


def has_u_escape(raw: bytes) -> bool:
    """``b"\\u" in raw``, faster: a backslash alone is found by ``memchr``, and most answers
    have none."""
    first = raw.find(b"\\")
    return first >= 0 and raw.find(b"\\u", first) >= 0


def deciding_references(body: JSON, ours: Bases = NO_BASES) -> Deciding | None:
    """What decides resources of ``body`` beyond themselves; None when nothing does. A reference
    to another server (a base not among ``ours``) is never read: it is unknown.

    A contained resource is not addressable from outside its container: it never stands for a
    ``Type/id`` of the answer."""
    present: dict[str, JSON] = {}
    contexts: set[str] = set()
    medications: set[str] = set()
    ingredients: set[str] = set()
    unattached: set[str] = set()
    current = current_resources(body)
    refers = False
    for resource, addressable in addressed_resources(body):
        rtype, rid = resource.get("resourceType"), resource.get("id")
        ref = f"{rtype}/{rid}" if isinstance(rtype, str) and isinstance(rid, str) else None  # resource_reference
        if ref is not None and addressable and id(resource) in current:
            present.setdefault(ref, resource)
        # Only a Binary has a security context, and only an order or statement a medication.
        if rtype == "Binary":
            context = security_context(resource, ours)
            if context is not None:
                refers = True
                contexts.add(context)
            elif ref is not None and "securityContext" not in resource:
                refers = True
                unattached.add(ref)
            elif unreadable_context(resource, ours):
                refers = True  # decided as unknown (contexts_of: None), so it closes
        elif isinstance(rtype, str) and rtype in MEDICATION_HOLDERS:
            med = medication_reference(resource, ours)
            if med is not None:
                refers = True
                if med[0] not in "#\0":
                    medications.add(med)
        elif rtype == "Medication" and "ingredient" in resource:
            named = ingredient_references(resource, ours)
            if named:
                refers = True
                ingredients.update(r for r in named if r[0] not in "#\0")
    if not refers:
        return None
    return Deciding(present, frozenset(contexts - present.keys()), frozenset(medications - present.keys()),
                    frozenset(unattached), frozenset(ingredients - present.keys()))


# Bundles whose direct entries hold the server's resources as they are now (a search's matches
# and includes), and those whose searchsets do (a batch's answer).
_CURRENT_ENTRIES = "searchset"
_ANSWERS = frozenset({"batch-response", "transaction-response"})


def current_resources(body: JSON) -> set[int]:
    """The identities of the resources of an answer that are the FHIR server's current version of
    their ``Type/id``: the answer itself when it is a resource, a searchset's entries, and the
    entries of the searchsets a batch answered with.

    SECURITY: anything else may be another version of the same ``Type/id`` (a vread or an
    instance history in a batch; a history lists the oldest version last, which a walk meets
    first) or a copy (a Bundle stored on the server, which has a ``meta.versionId`` as no
    search answer does, whatever its type; a Parameters): a
    PractitionerRole that was once another doctor's, a Medication before its ingredient was
    entered. Only current resources stand for what a reference names now; others are read."""
    rtype = body.get("resourceType")
    if rtype != "Bundle":
        return set() if rtype == "Parameters" else {id(body)}
    meta = body.get("meta")
    if type(meta) is dict and "versionId" in meta:
        return set()  # a Bundle stored on the server (a search saved as a resource): copies
    kind = body.get("type")
    found: set[int] = set()
    for entry in body.get("entry") or ():
        resource = entry.get("resource") if type(entry) is dict else None
        if type(resource) is not dict:
            continue
        if kind == _CURRENT_ENTRIES:
            found.add(id(resource))
        elif kind in _ANSWERS and resource.get("resourceType") == "Bundle" and resource.get("type") == _CURRENT_ENTRIES:
            found.update(current_resources(resource))
    return found


def ingredients_to_read(
    medications: Iterable[JSON | None], known: Mapping[str, object], ours: Bases = NO_BASES,
) -> frozenset[str]:
    """The ingredients the given Medications name by reference that ``known`` does not hold."""
    found: set[str] = set()
    for medication in medications:
        if type(medication) is dict and "ingredient" in medication:
            found.update(r for r in ingredient_references(medication, ours) if r[0] not in "#\0" and r not in known)
    return frozenset(found)


def attachment_urls(binary: str, base_urls: Iterable[str]) -> tuple[str, ...]:
    """The ways a DocumentReference's ``content.attachment.url`` names a Binary: relative, or
    under one of this server's bases."""
    return (binary, *(f"{base.rstrip('/')}/{binary}" for base in base_urls))


def attachments_by_binary(
    documents: list[JSON], binaries: frozenset[str], ours: Bases = NO_BASES,
) -> dict[str, tuple[JSON, ...]]:
    """The DocumentReferences that attach each Binary (by ``content.attachment.url``); an
    attachment on another server (a base not among ``ours``) attaches none of this server's."""
    found: dict[str, list[JSON]] = {b: [] for b in binaries}
    for doc in documents:
        for content in doc.get("content") or ():
            attachment = content.get("attachment") if isinstance(content, dict) else None
            url = attachment.get("url") if isinstance(attachment, dict) else None
            binary = local_reference(url, ours) if isinstance(url, str) else None
            if binary is not None and binary in found:
                found[binary].append(doc)
    return {b: tuple(d) for b, d in found.items()}


def attachment_holders(
    body: JSON, binaries: frozenset[str], ours: Bases = NO_BASES,
) -> dict[str, tuple[JSON, ...]]:
    """The resources of the answer ``body`` that hold an attachment (any ``url`` element, in
    the resource or what it contains) naming one of ``binaries`` (``Binary/id``), by Binary: a
    report's ``presentedForm``, a Media's ``content``, a message's payload. A holder that is
    contained counts as its container, whose patients it shares.

    SECURITY: no search finds these holders by URL (``read_attachments`` finds documents
    only); a Binary that comes with its report in one answer is that report's, and goes where
    the report goes."""
    found: dict[str, list[JSON]] = {}
    for resource, addressable in addressed_resources(body):
        if not addressable or resource.get("resourceType") == "Binary":
            continue
        stack: list[Any] = [resource]
        named: set[str] = set()
        while stack:
            node = stack.pop()
            if type(node) is dict:
                url = node.get("url")
                if type(url) is str and "Binary/" in url:
                    binary = local_reference(url, ours)
                    if binary in binaries:
                        named.add(binary)
                stack.extend(v for v in node.values() if type(v) is dict or type(v) is list)
            elif type(node) is list:
                stack.extend(v for v in node if type(v) is dict or type(v) is list)
        for binary in named:
            found.setdefault(binary, []).append(resource)
    return {b: tuple(h) for b, h in found.items()}


@dataclass(frozen=True, slots=True)
class Resolved:
    """Targets by ``Type/id``: from the answer, or read from the FHIR server.

    A target mapped to None is missing on the server (it decides nothing); one mapped to
    ``UNREADABLE`` could not be read (what it decides is unknown, so it closes). ``attached``
    maps a Binary without a security context to the DocumentReferences that attach it (None:
    unknown, so it closes). ``roles``: the PractitionerRoles named as authors, by ``Type/id``
    (None: missing on the server), read only when a consent reads authors; a role it does not
    hold, or one missing on the server, is an unknown author (``compartment.authors_of``).
    ``ours``: the bases under which an absolute reference names this server's resources
    (``fhir.local_reference``); another server's target is unknown, never read by its ``Type/id``.
    """

    targets: Mapping[str, JSON | None] = field(default_factory=dict)
    attached: Mapping[str, tuple[JSON, ...] | None] = field(default_factory=dict)
    roles: Mapping[str, JSON | None] = field(default_factory=dict)
    ours: Bases = NO_BASES
    # enforcement.unattached_binaries: withhold: a Binary nothing ties to a patient is unknown.
    withhold_unattached: bool = False

    def contexts_of(self, resource: JSON) -> tuple[JSON, ...] | None:
        """The patient data a Binary is decided as; None when that is unknown (it closes)."""
        if resource.get("resourceType") != "Binary":
            return ()
        if unreadable_context(resource, self.ours):
            return None
        ref = security_context(resource, self.ours)
        if ref is not None:
            target = self.targets.get(ref, UNREADABLE)
            # SECURITY: a context the server does not hold (deleted, or another server's) is
            # unknown, so the Binary closes: missing data never opens data (CONTRACT §5).
            if target is UNREADABLE or target is None:
                return None
            return (target,)
        own = resource_reference(resource)
        if "securityContext" in resource:
            return ()
        attached = self.attached.get(own, ()) if own is not None else ()
        if attached == () and self.withhold_unattached:
            # SECURITY: no search finds a report's presentedForm or a Media's content by URL; a
            # site that withholds what nothing ties to a patient closes such a Binary.
            return None
        return attached

    def medication_of(self, resource: JSON) -> JSON | None:
        """The Medication an order names by reference, contained or resolved (``UNREADABLE``
        for another server's)."""
        ref = medication_reference(resource, self.ours)
        if ref is None:
            return None
        if ref == FOREIGN_MEDICATION:
            return UNREADABLE
        if ref.startswith("#"):
            found = contained_resource(resource, ref, _MEDICATION)
            return found if found is not None else UNREADABLE
        return self.targets.get(ref, UNREADABLE)

    def medications_of(self, resource: JSON) -> tuple[JSON, ...] | None:
        """The Medication an order names by reference followed by the ingredients that one names
        by reference (one hop; an ingredient's own ingredients are not followed): their codes and
        labels are the order's. () when it names none; None when one of them cannot be read or is
        missing on the server (unknown: the order closes).

        SECURITY: a drug the order names that the server does not hold (deleted, or named by an
        absolute URL of another server) is not no drug: it may be methadone (CONTRACT §5, missing
        data never opens data)."""
        if medication_reference(resource, self.ours) is None:
            return ()
        medication = self.medication_of(resource)
        if medication is None or medication is UNREADABLE:
            return None
        ingredients = self.ingredients_of(medication, resource)
        if ingredients is None:
            return None
        return (medication, *ingredients)

    def ingredients_of(self, medication: JSON, container: JSON | None = None) -> tuple[JSON, ...] | None:
        """The Medications and Substances a Medication names as ingredients by reference:
        contained (in it, or in the ``container`` that contains it), in the answer or read. None
        when one cannot be read, is missing on the server or names nothing readable, or names ingredients of its own by
        reference that are not contained in it (one hop is followed; beyond it is unknown)."""
        if "ingredient" not in medication:
            return ()
        found: list[JSON] = []
        for ref in ingredient_references(medication, self.ours):
            if ref == UNKNOWN_INGREDIENT:
                return None
            if ref.startswith("#"):
                target = contained_resource(medication, ref)
                if target is None and container is not None:
                    target = contained_resource(container, ref)
                if target is None or target.get("resourceType") not in INGREDIENT_TYPES:
                    return None
            else:
                target = self.targets.get(ref, UNREADABLE)
                if target is None or target is UNREADABLE:
                    return None  # missing on the server or unread: what it is, is unknown
            if any(r[0] != "#" for r in ingredient_references(target, self.ours)):
                # SECURITY: beyond the one hop followed, what an ingredient names is unknown,
                # so it closes (a kit whose component names methadone is not an ordinary drug).
                return None
            found.append(target)
        return tuple(found)

    def authors_of(self, resource: JSON) -> frozenset[str]:
        """``compartment.authors_of`` with the PractitionerRoles read."""
        return authors_of(resource, self.roles, self.ours)


NOTHING_RESOLVED = Resolved()


def author_roles(body: JSON, ours: Bases = NO_BASES) -> tuple[dict[str, JSON], frozenset[str]]:
    """The PractitionerRoles of an answer (current ones, ``current_resources``) by ``Type/id``, and the
    ``PractitionerRole/id`` its resources name as authors that it does not hold (to be read)."""
    present: dict[str, JSON] = {}
    named: set[str] = set()
    current = current_resources(body)
    for resource, addressable in addressed_resources(body):
        if not addressable:
            continue  # a contained resource's authors are not its container's
        if resource.get("resourceType") == ROLE and id(resource) in current:
            rid = resource.get("id")
            if isinstance(rid, str):
                present.setdefault(f"{ROLE}/{rid}", resource)
        for ref in author_references(resource):
            key = role_reference(ref, ours)
            if key is not None and key != UNKNOWN_AUTHOR:
                named.add(key)
    return present, frozenset(named - present.keys())


# A ``"reference": "..."`` member as written; the string's body unrolled (runs of plain bytes
# between escapes), which matches exactly what ``(?:[^"\\]|\\.)*`` does, in half the time.
_REFERENCE = re.compile(rb'"reference"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"')


_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def may_be_patient_data(target: str) -> bool:
    """Whether a reference (relative form) may point at patient data: anything but ``Type/id``
    of a FHIR type outside the Patient compartment (a conditional reference, an unknown or
    misspelled type may be anyone's record)."""
    rtype, _, rid = target.partition("/")
    return not (rtype in R4_RESOURCE_TYPES and not is_patient_data(rtype) and _ID.fullmatch(rid) is not None)


def may_name_unreleased(raw: bytes, released: frozenset[str], ours: Bases = NO_BASES) -> bool:
    """False when no reference in the JSON text ``raw`` points at patient data outside
    ``released`` (then no display needs removing); True when one may."""
    return unreleased_named(raw, released, ours) != frozenset()


def unreleased_named(raw: bytes, released: frozenset[str], ours: Bases = NO_BASES) -> frozenset[bytes] | None:
    """The reference values (as written in ``raw``) that point at patient data outside
    ``released`` from a Reference that may carry a display; None when the text cannot be read
    this way (then any reference may).

    One scan of the text: each distinct value is judged once, and the object around a match
    is read only while its value is a suspect not yet named. A value that is no JSON string
    raises (``ValueError``) unless the text is unreadable anyway (None). ``ours``: as for
    ``unreleased``."""
    if has_u_escape(raw):
        return None  # a \u escape can spell a key the pattern cannot see ("displa\u0079")
    if b'"display"' not in raw:
        return frozenset()
    found = native.reference_displays(raw)
    if found is not None:
        return _named(found, released, ours)
    return python_unreleased_named(raw, released, ours)


def _named(found: dict[bytes, bool] | bool, released: frozenset[str], ours: Bases) -> frozenset[bytes] | None:
    """``unreleased_named`` from the C reader's reading of the text (``native.reference_displays``:
    each distinct value with whether any object around it may have a display)."""
    if found is False or found is True:
        return None  # a "reference" key the pattern could not read may be any reference
    named: list[bytes] = []
    error: ValueError | None = None
    for value, display in found.items():
        try:
            suspect = _points_outside(value, released, ours)
        except ValueError as exc:
            error, suspect = exc, False
        if suspect and display:
            named.append(value)
    if error is not None:
        raise error
    return frozenset(named)


def python_unreleased_named(raw: bytes, released: frozenset[str], ours: Bases = NO_BASES) -> frozenset[bytes] | None:
    """``unreleased_named`` in Python alone, after its first two checks: the reference the C
    reader is held to."""
    pending: dict[bytes, bool] = {}  # per distinct value: a suspect not yet named
    named: list[bytes] = []
    objects: dict[bytes, bool] = {}  # the text around a match, read once
    error: ValueError | None = None
    matches = 0
    for match in _REFERENCE.finditer(raw):
        matches += 1
        value = match[1]
        suspect = pending.get(value)
        if suspect is None:
            try:
                suspect = _points_outside(value, released, ours)
            except ValueError as exc:  # raised below, once the text is known to be read whole
                error, suspect = exc, False
            pending[value] = suspect
        if suspect and _may_have_display(raw, match.start(), match.end(), objects):
            named.append(value)
            pending[value] = False
    # SECURITY: a "reference" key the pattern could not read may be any reference.
    if matches != raw.count(b'"reference"'):
        return None
    if error is not None:
        raise error
    return frozenset(named)


def _reference_text(value: bytes) -> str:
    """A reference value as written in JSON text (between its quotes), as a string; raises
    ValueError when it is no JSON string."""
    return json.loads(b'"' + value + b'"') if b"\\" in value else value.decode("utf-8", "replace")


def _points_outside(value: bytes, released: frozenset[str], ours: Bases) -> bool:
    """Whether a reference value as written may point at patient data outside ``released``."""
    ref = _reference_text(value)
    if ref.startswith("#"):
        return False
    return unreleased(ref, released, ours)


def unreleased(ref: str, released: frozenset[str], ours: Bases = NO_BASES) -> bool:
    """Whether a reference (not a ``#`` one) may point at patient data outside ``released``, the
    ``Type/id`` of what the answer releases.

    SECURITY: a reference under a base not among ``ours`` names another server's record, which
    no answer of this server releases (this server's record of the same ``Type/id`` may be): its
    display may name what the gateway cannot decide, so it is unreleased whenever its type may
    be patient data."""
    target = relative_reference(ref)
    if "://" in ref and reference_base(ref) not in ours:
        return may_be_patient_data(target)
    return target not in released and may_be_patient_data(target)


def _names_display(text: bytes) -> bool:
    """Whether the object text has a display (or cannot be read as one object: it may)."""
    try:
        node = orjson.loads(text)
    except orjson.JSONDecodeError:
        return True
    return not isinstance(node, dict) or "display" in node


def _may_have_display(raw: bytes, start: int, end: int, seen: dict[bytes, bool]) -> bool:
    """Whether the Reference object around ``raw[start:end]`` has a display. The text from the
    nearest ``{`` before to the nearest ``}`` after is that very object only when it parses as
    one object holding the match (a nested or brace-bearing object does not): then its keys
    answer; anything else may have one."""
    if raw[start - 1:start] == b"{" and raw[start + 11:start + 13] == b':"' and raw[end:end + 1] == b"}":
        return False  # the object is {"reference":"..."} and nothing else
    first, last = raw.rfind(b"{", 0, start), raw.find(b"}", end)
    if first < 0 or last < 0:
        return True
    text = raw[first:last + 1]
    if text not in seen:
        seen[text] = _names_display(text)
    return seen[text]


def scrub_displays(body: JSON, released: frozenset[str], ours: Bases = NO_BASES) -> bool:
    """Remove ``display`` from references to patient data not in ``released``, and the narrative
    of a listing that lists such data (``scrub_listing``); True if any was.

    ``released`` are the ``Type/id`` of the resources the answer keeps. One walk over the
    whole body (contained resources included). ``ours``: the bases under which an absolute
    reference names this server's resources; another server's patient data is never released
    (``unreleased``).
    """
    changed = False
    stack: list[object] = [body]
    pop, push = stack.pop, stack.append
    while stack:
        node = pop()
        if type(node) is dict:
            if "resourceType" in node:
                rtype = node["resourceType"]
                if rtype in LISTINGS:
                    changed |= scrub_listing(node, released, ours)
                elif rtype == "AuditEvent":
                    changed |= scrub_audit_entities(node, released, ours)
                if "text" in node and rtype not in _CONTAINERS:
                    # A listing's own narrative renders its other references too (an event's detail).
                    changed |= scrub_narrative(node, released, ours)
            if "display" in node:
                ref = node.get("reference")
                if type(ref) is str and not ref.startswith("#") and unreleased(ref, released, ours):
                    del node["display"]
                    changed = True
            for value in node.values():
                kind = type(value)
                if kind is dict or kind is list:
                    push(value)
        else:
            for value in node:  # type: ignore[attr-defined]
                kind = type(value)
                if kind is dict or kind is list:
                    push(value)
    return changed


# Resources whose narrative renders the records they list: a summary's sections, a list's items.
LISTINGS = frozenset({"Composition", "List"})
# Resources met by enforcement whose every kept text is read again (``scrub_displays``): listings,
# and AuditEvents, whose entities describe the records they name (``scrub_audit_entities``).
DESCRIBING = LISTINGS | {"AuditEvent"}
# Resources that hold resources (decided and scrubbed one by one), with no narrative of their own
# that renders them.
_CONTAINERS = frozenset({"Bundle", "Parameters"})
# A resource's own context: the visit it was made at. Its narrative names it, not another record.
_CONTEXT_LINKS = frozenset({"encounter"})
# Elements that hold no Reference to patient data (codings, metadata, the narrative itself, a
# business identifier, whose assigner is an Organization), not walked.
_NO_REFERENCES = frozenset({"coding", "meta", "text", "identifier"})


# What an AuditEvent's entity says of the record its ``what`` names.
_ENTITY_DESCRIPTIONS = ("name", "description", "query", "detail", "securityLabel")


def scrub_audit_entities(event: JSON, released: frozenset[str], ours: Bases = NO_BASES) -> bool:
    """Remove what each entity of an AuditEvent says of a record (its name, description, query,
    details and labels) when its ``what`` is patient data not in ``released``; True if any was.

    SECURITY: "HIV-1 viral load result" beside ``what: Observation/..`` is that record's display
    under another name. The ``what`` reference stays, like references anywhere."""
    changed = False
    entities = event.get("entity")
    for entity in entities if isinstance(entities, list) else ():
        if not isinstance(entity, dict):
            continue
        what = reference_of(entity.get("what"))
        if what is None or what.startswith("#") or not unreleased(what, released, ours):
            continue
        for key in _ENTITY_DESCRIPTIONS:
            if key in entity:
                del entity[key]
                changed = True
    return changed


def scrub_narrative(resource: JSON, released: frozenset[str], ours: Bases = NO_BASES) -> bool:
    """Remove the narrative of a resource (not a listing) that refers, beyond its own patients
    (``compartment.patients_of``) and its ``encounter``, to patient data not in ``released``;
    True if it was.

    SECURITY: a narrative renders the resource and what it refers to: a lab report's its results
    ("HIV-1 RNA 12000 copies/mL"), a Provenance, AuditEvent, Task, DetectedIssue or Communication
    the record it is about, a panel its members. Read without them (alone, or beside the withheld
    one), it would say what the withheld record is. Contained resources count as the resource's;
    a reference naming only an identifier or a display is not followed (it names no record here).
    """
    patients: frozenset[str] | None = None  # the resource's own, read at the first suspect
    stack: list[object] = [resource]
    pop, push = stack.pop, stack.append
    while stack:
        node = pop()
        if type(node) is dict:
            ref = node.get("reference")
            if type(ref) is str and not ref.startswith("#") and unreleased(ref, released, ours):
                if patients is None:
                    patients = patients_of(resource, ours)
                if local_reference(ref, ours) not in patients:
                    del resource["text"]
                    return True
            skipped = _NO_REFERENCES | _CONTEXT_LINKS if "resourceType" in node else _NO_REFERENCES
            for key, value in node.items():
                if (type(value) is dict or type(value) is list) and key not in skipped:
                    push(value)
        elif type(node) is list:
            for value in node:
                if type(value) is dict or type(value) is list:
                    push(value)
    return False


def scrub_narrative_read(
    resource: JSON, text: bytes, released: frozenset[str], ours: Bases = NO_BASES,
    memo: dict[bytes, bool] | None = None, patients: frozenset[str] | None = None,
) -> bool:
    """``scrub_narrative(resource, released, ours)``, settled first from ``text``, the resource's
    (or its entry's) exact JSON text, by one scan of its reference values: the walk runs only when
    a value points outside ``released`` and is neither one of the resource's own patients nor,
    written once in the text, its ``encounter``. ``memo``: per distinct value as written, whether
    it points outside (shared by the entries of one answer). ``patients``: the resource's
    (``compartment.patients_of`` under ``ours``) when already known.

    Exact: every ``reference`` string the walk meets is one the scan reads (a text whose keys may
    be spelled with an escape, ``has_u_escape``, is walked); the walk excuses the resource's own
    patients anywhere, and its encounter where the ``encounter`` element names it, the only place
    a value written once can stand."""
    if "text" not in resource:
        return False
    if has_u_escape(text):
        return scrub_narrative(resource, released, ours)
    memo = {} if memo is None else memo
    suspects: list[bytes] = []
    for match in _REFERENCE.finditer(text):
        value = match[1]
        outside = memo.get(value)
        if outside is None:
            try:
                outside = memo[value] = _points_outside(value, released, ours)
            except ValueError:
                return scrub_narrative(resource, released, ours)  # not a JSON string: the walk decides
        if outside:
            suspects.append(value)
    if not suspects:
        return False
    if patients is None:
        patients = patients_of(resource, ours)
    encounter = resource.get("encounter")
    context = encounter.get("reference") if type(encounter) is dict else None
    for value in suspects:
        ref = _reference_text(value)
        if local_reference(ref, ours) in patients:
            continue
        if ref == context and text.count(b'"' + value + b'"') == 1:
            continue
        return scrub_narrative(resource, released, ours)
    return False


def scrub_listing(listing: JSON, released: frozenset[str], ours: Bases = NO_BASES) -> bool:
    """Remove the narratives of a Composition or List that lists patient data not in
    ``released``: each section's that lists it (and those of the sections around it), and the
    resource's own; True if any was. The entries stay, like references anywhere.

    SECURITY: read without its entries (a summary read alone, or found by a search), its
    narrative ("HIV disease", "Opioid dependence") would say what the withheld records are. An
    entry whose target cannot be read (a display or identifier alone) may be any record."""
    removed: list[object] = []
    if listing.get("resourceType") == "List":
        items = listing.get("entry")
        lists = isinstance(items, list) and any(
            _names_unreleased(e.get("item") if isinstance(e, dict) else e, released, ours) for e in items)
    else:
        lists = _scrub_sections(listing.get("section"), released, removed, ours)
    if lists and "text" in listing:
        removed.append(listing.pop("text"))
    return bool(removed)


def _scrub_sections(sections: object, released: frozenset[str], removed: list[object], ours: Bases) -> bool:
    """Drop the narrative of each section listing unreleased data (or holding one that does),
    into ``removed``; True when any section here lists such data."""
    found = False
    for section in sections if isinstance(sections, list) else ():
        if not isinstance(section, dict):
            continue
        entries = section.get("entry")
        lists = isinstance(entries, list) and any(_names_unreleased(e, released, ours) for e in entries)
        if _scrub_sections(section.get("section"), released, removed, ours) or lists:
            if "text" in section:
                removed.append(section.pop("text"))
            found = True
    return found


def _names_unreleased(ref: object, released: frozenset[str], ours: Bases) -> bool:
    target = reference_of(ref)
    if target is None:
        return ref is not None  # a Reference naming nothing readable (a display alone) may be any record
    return not target.startswith("#") and unreleased(target, released, ours)


def displays_scrubber(
    released: frozenset[str], named: frozenset[bytes] | None, ours: Bases = NO_BASES,
) -> Callable[[bytes], bytes]:
    """Rewrites one kept entry's text without the displays of references to patient data the
    answer does not release, and the narratives of a listing (``scrub_displays``; the entry as
    the upstream wrote it when it has none). ``named``: the reference values of the whole
    answer that may (``unreleased_named``); None when any may (an answer holding a listing)."""

    def scrub(text: bytes) -> bytes:
        if named is not None and not any(value in text for value in named):
            return text
        if not may_name_unreleased(text, released, ours) and not lists_records(text) and not names_records(text):
            return text
        entry = orjson.loads(text)
        return orjson.dumps(entry) if scrub_displays(entry, released, ours) else text

    return scrub
