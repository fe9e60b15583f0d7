"""Apply per-resource decisions to a parsed response body.

Semantics: every resource is decided on its own, including entries of nested Bundles,
resources inside Parameters and ``contained`` resources (a contained resource belongs to
its container's patients; if any is denied the container is denied with it; so are the
resources a contained Bundle or Parameters holds). Denied
Bundle entries are removed and one OperationOutcome entry (issue ``suppressed``) is added;
in batch/transaction responses the denied entry keeps its place but loses its resource.
``Bundle.total`` is dropped whenever filtering could have hidden anything, and with it the
``last`` link (whose offset counts the matches).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field

from gateway.core.compartment import UNKNOWN_PATIENT, is_patient_data, patients_of, references_of
from gateway.core.fhir import NO_BASES, Bases, JSON, relative_reference, resource_reference
from gateway.core.errors import UpstreamUnavailable
from gateway.core.memo import TextMemo
from gateway.core.model import Decision, Reason, Verdict
from gateway.core.references import DESCRIBING

# judge(resource, the patients it belongs to) -> Decision
Judge = Callable[[JSON, frozenset[str]], Decision]

# A batch/transaction response slot whose resource was withheld looks like a refused read.
WITHHELD_RESPONSE: JSON = {
    "status": "403 Forbidden",
    "outcome": {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "forbidden", "diagnostics": "Access denied."}],
    },
}
_RESPONSE_BUNDLES = frozenset({"batch-response", "transaction-response"})
SUPPRESSED_OUTCOME: JSON = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "information",
            "code": "suppressed",
            "diagnostics": "Some results were withheld by consent policy.",
        }
    ],
}


def scrubbed_outcome(outcome: JSON, text: str = "The FHIR server reported an error.") -> JSON:
    """An OperationOutcome with its severities and codes but none of its texts (each issue says
    ``text``)."""
    issues = [i for i in outcome.get("issue") or () if isinstance(i, dict)] or [{}]
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": str(i.get("severity", "error")), "code": str(i.get("code", "processing")),
             "diagnostics": text}
            for i in issues
        ],
    }


# What an issue of the FHIR server's own outcome in a successful answer says instead of its texts.
SERVER_NOTE = "The FHIR server added a note to this answer."


def scrub_server_outcome(resource: JSON) -> None:
    """An OperationOutcome the FHIR server put in a read answer (a search set's ``outcome``
    entry, a batch slot's resource, an operation's result) keeps its severities and codes only.

    SECURITY: its texts (``details``, ``diagnostics``, ``expression``, ``location``, its
    narrative) can name what the answer withholds ("Resource Observation/123 was filtered"); no
    text of the server's can be vouched for, so none stays (fail closed)."""
    scrubbed = scrubbed_outcome(resource, SERVER_NOTE)
    resource.clear()
    resource.update(scrubbed)


def not_found_slot() -> JSON:
    """The batch slot of a missing record, and of a withheld one in 404 mode."""
    return {"status": "404 Not Found",
            "outcome": scrubbed_outcome({"issue": [{"severity": "error", "code": "not-found"}]})}


def withheld_slot(status: str) -> JSON:
    """The batch slot of a withheld record: a refused read, or a missing one in 404 mode."""
    if status.startswith("404"):
        return not_found_slot()
    slot = dict(WITHHELD_RESPONSE)
    slot["status"] = status
    return slot


@dataclass
class Enforced:
    """What enforcement did to one body."""

    denied: bool = False            # the body as a whole may not be returned
    removed: list[tuple[str, Decision]] = field(default_factory=list)  # (resource type, why)
    deciding: list[Reason] = field(default_factory=list)
    changed: bool = False           # the body was altered (else its original bytes may be sent)
    # The verdicts on a Bundle body's entries (None: not a Bundle), applied by ``apply``: the
    # indices of the entries kept; in a batch/transaction answer every other entry becomes a
    # refused slot (``slots``), in any other the "withheld" outcome entry may follow them.
    kept: list[int] | None = None
    slots: str | None = None        # the status of a refused slot, in a batch/transaction answer
    outcome_entry: bool = False     # the "some results were withheld" entry goes last
    drop_total: bool = False        # Bundle.total goes, and the last link
    applied: bool = False
    # A Composition, List or AuditEvent was met: its narrative or entities may name what the
    # answer does not release (references.scrub_listing, scrub_audit_entities), whatever the displays.
    listings: bool = False

    @property
    def header(self) -> str:
        if self.denied:
            return "deny"
        return "filtered" if self.removed else "permit"


def _contained(resource: JSON) -> list[JSON]:
    """Contained resources; one written as an object (not FHIR, but a reader may take it) too."""
    contained = resource.get("contained")
    if isinstance(contained, dict):
        return [contained]
    return [c for c in contained if isinstance(c, dict)] if isinstance(contained, list) else []


def owners_of(resource: JSON, inherited: frozenset[str] = frozenset(), ours: Bases = NO_BASES) -> frozenset[str]:
    """The patients a resource belongs to; a contained one of a patient-data type inherits its container's."""
    own = patients_of(resource, ours)
    if own or not inherited:
        return own
    rtype = resource.get("resourceType")
    return inherited if isinstance(rtype, str) and is_patient_data(rtype) else frozenset()


# Entry types the loop of ``Enforcer._bundle`` notes: listings, documents, the server's outcomes.
_NOTED = frozenset({"Composition", "List", "AuditEvent", "OperationOutcome"})
# Entries indexed by a call of their own: they hold resources, or are collected (Binary).
_WALKED = frozenset({"Bundle", "Parameters", "Binary"})


def owners_index(
    body: JSON, binaries: list[JSON] | None = None, content_keys: Mapping[int, Hashable] | None = None,
    ours: Bases = NO_BASES,
) -> dict[int, frozenset[str]]:
    """The patients of every resource in ``body``, by object identity (computed once per body);
    every Binary met on the way (contained ones too) goes into ``binaries`` when given.
    ``content_keys``: by object identity, a text that fixes a resource's whole content (its
    entry's, core.view.spans_of), under which its patients are remembered across answers.
    ``ours``: the bases of this server's absolute references (``compartment.patients_of``).

    Equal owner sets are shared, so the per-resource decision memo hashes each one once.
    """
    index: dict[int, frozenset[str]] = {}
    _index_into(body, index, {}, [] if binaries is None else binaries, content_keys or _NO_KEYS, ours)
    return index


_NO_KEYS: Mapping[int, Hashable] = {}
# Patients by content key (see owners_index), with the bases they were read under.
_OWNERS: TextMemo[tuple[Bases, frozenset[str]]] = TextMemo(16_384, 16 << 20)


def forget_owners() -> None:
    """Forget the patients remembered by content key."""
    _OWNERS.clear()


def _index_into(
    node: JSON, index: dict[int, frozenset[str]], shared: dict[frozenset[str], frozenset[str]], binaries: list[JSON],
    keys: Mapping[int, Hashable] = _NO_KEYS, ours: Bases = NO_BASES,
) -> None:
    """Add every resource in ``node`` (Bundles, Parameters, contained) with its patients."""
    rtype = node.get("resourceType")
    if rtype == "Bundle":
        for entry in node.get("entry") or ():
            resource = entry.get("resource") if type(entry) is dict else None
            if type(resource) is not dict:
                continue
            inner_type = resource.get("resourceType")
            if type(inner_type) is str and inner_type not in _WALKED and "contained" not in resource:
                # The common entry, indexed here: one call per resource fewer.
                key = keys.get(id(resource)) if keys else None
                memo = _OWNERS.get(key) if key is not None else None
                if memo is not None and (memo[0] is ours or memo[0] == ours):
                    found = memo[1]
                else:
                    found = patients_of(resource, ours)
                    if key is not None:
                        _OWNERS.put(key, (ours, found))
                index[id(resource)] = shared.setdefault(found, found)
            else:
                _index_into(resource, index, shared, binaries, ours=ours)
        return
    if rtype == "Parameters":
        for param in _iter_parameters(node.get("parameter")):
            resource = param.get("resource")
            if isinstance(resource, dict):
                _index_into(resource, index, shared, binaries, ours=ours)
        return
    owners = patients_of(node, ours)
    owners = shared.setdefault(owners, owners)
    index[id(node)] = owners
    if not isinstance(rtype, (str, type(None))):
        raise UpstreamUnavailable("The FHIR server sent a malformed answer.")
    if rtype == "Binary":
        binaries.append(node)
    if "contained" in node:
        for inner in _contained(node):
            if not isinstance(inner.get("resourceType"), (str, type(None))):
                raise UpstreamUnavailable("The FHIR server sent a malformed answer.")
            if inner.get("resourceType") == "Binary":
                binaries.append(inner)
            inner_owners = owners_of(inner, owners, ours)
            index[id(inner)] = shared.setdefault(inner_owners, inner_owners)


def patients_in(index: dict[int, frozenset[str]]) -> frozenset[str]:
    """Every patient any resource belongs to: the consents to look up (another server's patient,
    ``UNKNOWN_PATIENT``, has none that can be)."""
    return frozenset().union(*index.values()) - {UNKNOWN_PATIENT}


def _iter_parameters(params: object) -> Iterator[JSON]:
    if isinstance(params, list):
        for param in params:
            if isinstance(param, dict):
                yield param
                yield from _iter_parameters(param.get("part"))


def judge_resource(
    resource: JSON, judge: Judge, index: dict[int, frozenset[str]] | None = None, ours: Bases = NO_BASES,
) -> Decision:
    """A resource with its contained resources: denied if it or any contained one is denied.
    ``ours``: as for ``owners_index``, for resources ``index`` does not hold."""
    owners = index.get(id(resource)) if index is not None else None
    if owners is None:
        owners = owners_of(resource, ours=ours)
    decision = judge(resource, owners)
    if decision.verdict is Verdict.DENY or "contained" not in resource:
        return decision
    for inner in _contained(resource):
        for one in _within(inner):
            one_owners = index.get(id(one)) if index is not None else None
            inner_decision = judge(one, owners_of(one, owners, ours) if one_owners is None else one_owners)
            if inner_decision.verdict is Verdict.DENY:
                return inner_decision
    return decision


def _within(resource: JSON) -> Iterator[JSON]:
    """A contained resource and every resource it holds: a Bundle's entries, a Parameters'
    resources, and theirs, contained ones too. SECURITY: not FHIR, but an upstream that smuggles
    records inside a contained Bundle or Parameters gets each of them decided."""
    yield resource
    rtype = resource.get("resourceType")
    held: list[object] = []
    if rtype == "Bundle":
        entries = resource.get("entry")
        held = [e.get("resource") for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    elif rtype == "Parameters":
        held = [p.get("resource") for p in _iter_parameters(resource.get("parameter"))]
    if "contained" in resource:
        held.extend(_contained(resource))
    for inner in held:
        if isinstance(inner, dict):
            yield from _within(inner)


def _identities(entry: JSON, resource: JSON) -> set[str]:
    """How other resources of the Bundle may refer to this entry: ``Type/id`` and its fullUrl."""
    found = set()
    ref = resource_reference(resource)
    if ref is not None:
        found.add(ref)
    full = entry.get("fullUrl")
    if isinstance(full, str):
        found.add(full)
        found.add(relative_reference(full))
    return found


def scrub_compositions(entries: list[object], gone: set[str]) -> bool:
    """A document's Composition whose sections list withheld entries loses those entries and
    the narrative that may name them (the section's and the document's); True if any did."""
    changed = False
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "Composition":
            if _scrub_sections(resource.get("section"), gone):
                resource.pop("text", None)
                changed = True
    return changed


def _scrub_sections(sections: object, gone: set[str]) -> bool:
    changed = False
    for section in sections if isinstance(sections, list) else ():
        if not isinstance(section, dict):
            continue
        refs = section.get("entry")
        if isinstance(refs, list):
            kept = [r for r in refs if not _names(r, gone)]
            if len(kept) != len(refs):
                section["entry"] = kept
                if not kept:
                    del section["entry"]
                section.pop("text", None)
                changed = True
        if _scrub_sections(section.get("section"), gone):
            section.pop("text", None)
            changed = True
    return changed


def _names(ref: object, gone: set[str]) -> bool:
    target = ref.get("reference") if isinstance(ref, dict) else None
    return isinstance(target, str) and (target in gone or relative_reference(target) in gone)


def _mode(entry: object) -> object:
    search = entry.get("search") if isinstance(entry, dict) else None
    return search.get("mode") if isinstance(search, dict) else None


def may_be_included(entry: object, searchset: bool = True) -> bool:
    """Whether a Bundle entry may be one the server included rather than matched: its
    ``search.mode`` is "include" in any case or spacing, or, in a search set, it has no readable
    mode at all (``search`` is optional in R4: a server that leaves it out must not turn the
    Medication of a withheld order into a match)."""
    mode = _mode(entry)
    if mode == "match":
        return False  # the common entry, without the normalising below
    if type(mode) is str:
        mode = mode.strip().lower()
        return mode == "include" or (searchset and mode != "match" and mode != "outcome")
    return searchset


def without_orphan_includes(
    entries: list[object], searchset: bool = True, gone: frozenset[str] = frozenset(), ours: Bases | None = None,
) -> list[object]:
    """Drop included resources that no kept resource refers to and that refer to no kept match:
    they were brought by a withheld match and would tell what it was (the drug of a hidden
    order, the Patient of a hidden HIV condition). ``gone``: what the withheld resources refer
    to; an include among them that refers to a kept match stays only when a kept resource
    refers to it too (a withheld condition's visit, which refers to the patient matched).

    Included: a non-patient resource that ``may_be_included``; patient data only when its
    ``search.mode`` says "include" (a server that writes no mode would lose its matches). What a
    kept include refers to is kept in turn (``_include:iterate``). ``ours``: the bases under which
    an absolute reference names this server's resources (``compartment.references_of``): a kept
    resource naming another server's ``Medication/m1`` does not keep this server's."""
    candidates = [_included(e, searchset) for e in entries]
    if not any(candidates):
        return entries
    referenced: set[str] = set()
    matches: set[str] = set()
    for entry, candidate in zip(entries, candidates):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if candidate or not isinstance(resource, dict):
            continue
        referenced.update(references_of(resource, ours))
        own = resource_reference(resource)
        if own is not None:
            matches.add(own)
    waiting: dict[str, list[int]] = {}
    keep = [not candidate for candidate in candidates]
    brought: list[int] = []
    for index, candidate in enumerate(candidates):
        if not candidate:
            continue
        resource = entries[index]["resource"]  # type: ignore[index]
        own = f"{resource.get('resourceType')}/{resource.get('id')}"
        if own in referenced or (own not in gone and references_of(resource, ours) & matches):
            keep[index] = True
            brought.append(index)
        else:
            waiting.setdefault(own, []).append(index)
    while brought and waiting:
        refs = references_of(entries[brought.pop()]["resource"], ours)  # type: ignore[index]
        for ref in refs & waiting.keys():
            for index in waiting.pop(ref):
                keep[index] = True
                brought.append(index)
    return [entry for entry, kept in zip(entries, keep) if kept]


def _included(entry: object, searchset: bool) -> bool:
    """Whether a kept entry is an include the orphan check may drop (``without_orphan_includes``)."""
    resource = entry.get("resource") if isinstance(entry, dict) else None
    if not isinstance(resource, dict):
        return False
    rtype = resource.get("resourceType")
    if isinstance(rtype, str) and is_patient_data(rtype):
        mode = _mode(entry)
        return type(mode) is str and mode.strip().lower() == "include"
    return may_be_included(entry, searchset)


def apply(body: JSON, result: Enforced) -> None:
    """Apply the verdicts ``Enforcer.decide`` gave on a Bundle body's entries to the parsed
    tree (once): the kept entries stay in their order, the others go (or become refused slots
    in a batch answer), the withheld outcome entry follows, total goes."""
    if result.kept is None or result.applied or result.denied:
        return
    result.applied = True
    _apply_bundle(body, result.kept, result.slots, result.outcome_entry, result.drop_total)


def _apply_bundle(bundle: JSON, kept: list[int], slots: str | None, outcome: bool, drop_total: bool) -> None:
    entries = bundle.get("entry")
    if isinstance(entries, list) and (
        len(kept) != len(entries) or outcome or (not entries and bundle.get("type") not in _RESPONSE_BUNDLES)
    ):
        if slots is not None:
            keep = set(kept)
            bundle["entry"] = [e if i in keep else {"response": withheld_slot(slots)} for i, e in enumerate(entries)]
        else:
            bundle["entry"] = [entries[i] for i in kept]
            if outcome:
                bundle["entry"].append({"resource": SUPPRESSED_OUTCOME, "search": {"mode": "outcome"}})
            elif not bundle["entry"]:
                # SECURITY: a page that found nothing has no entry list (FHIR JSON has no empty
                # arrays); one whose every entry was withheld must read the same.
                del bundle["entry"]
    if drop_total:
        bundle.pop("total", None)
        links = bundle.get("link")
        if isinstance(links, list) and any(_is_last(link) for link in links):
            # SECURITY: the last page's offset is the count of matches, written otherwise.
            bundle["link"] = [link for link in links if not _is_last(link)]


# Links of a page that found something: none is in the answer of a search that found nothing.
_PAGING_RELATIONS = frozenset({"next", "previous", "prev", "last"})


def found_nothing(bundle: JSON) -> bool:
    """Make a search set read as one that found nothing (in place): no entries, no total, no
    links to other pages; True if it is a search set.

    SECURITY: in 404 mode a search by a record the requester may not see (``Provenance?target=
    Observation/<hidden>``) answers as one by a missing record, which finds nothing."""
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "searchset":
        return False
    bundle.pop("entry", None)
    bundle.pop("total", None)
    links = bundle.get("link")
    if isinstance(links, list):
        bundle["link"] = [link for link in links
                          if not (isinstance(link, dict) and link.get("relation") in _PAGING_RELATIONS)]
        if not bundle["link"]:
            del bundle["link"]
    return True


def _is_last(link: object) -> bool:
    return isinstance(link, dict) and link.get("relation") == "last"


def total_is_visible(bundle: JSON) -> bool:
    """True when ``Bundle.total`` counts only entries of this very page (no next page, no
    ``_count=0``): then every match it counts has been decided and kept."""
    links = bundle.get("link")
    if isinstance(links, list) and any(isinstance(l, dict) and l.get("relation") == "next" for l in links):
        return False
    matches = 0
    for entry in bundle.get("entry") or ():
        search = entry.get("search") if isinstance(entry, dict) else None
        mode = search.get("mode", "match") if isinstance(search, dict) else "match"
        if mode == "match":
            matches += 1
    return bundle.get("total") == matches


class Enforcer:
    """Walks one parsed body, mutating it in place to what the requester may see."""

    def __init__(
        self,
        judge: Judge,
        *,
        drop_total: bool,
        index: dict[int, frozenset[str]] | None = None,
        withheld_status: str = "403 Forbidden",
        ours: Bases | None = None,
        kept_totals: frozenset[int] = frozenset(),
    ) -> None:
        self.judge = judge
        self.drop_total = drop_total
        # Bundles inside the body (by identity: a batch slot's search page) whose total is
        # judged as the body's own would be without ``drop_total``: their search, sent alone,
        # would keep it (web.enforcement.totals_kept).
        self.kept_totals = kept_totals
        self.index = index
        self.withheld_status = withheld_status
        self.ours = ours  # this server's bases (without_orphan_includes); None: every base is ours
        self.result = Enforced()

    def _malformed(self) -> None:
        # SECURITY: a shape the gateway cannot walk is never passed on (fail closed).
        self.result.denied = True
        self.result.deciding.append(Reason("", "", "malformed-response"))

    def body(self, body: JSON) -> Enforced:
        """Enforce a whole response body (a resource, a Bundle or Parameters): ``decide``, then
        ``apply`` the verdicts to it."""
        result = self.decide(body)
        apply(body, result)
        return result

    def decide(self, body: JSON) -> Enforced:
        """Decide a whole response body. A Bundle's entries are not removed here: the verdict
        per entry index is in the result, for ``apply``. What is kept may be rewritten in place
        (a batch slot's error text, a document's sections naming withheld entries, Bundles and
        Parameters inside entries, which are filtered as they are decided)."""
        rtype = body.get("resourceType")
        if not isinstance(rtype, str) or not rtype:
            self._malformed()
        elif rtype == "Bundle":
            self._bundle(body, top=True)
        elif rtype == "Parameters":
            self.parameters(body.get("parameter"))
        else:
            if rtype in DESCRIBING:
                self.result.listings = True
            elif rtype == "OperationOutcome":
                self._outcome(body)
            decision = judge_resource(body, self.judge, self.index)
            if decision.verdict is Verdict.DENY:
                self.result.denied = True
                self.result.deciding.extend(decision.reasons)
        return self.result

    def _keep(self, resource: JSON) -> bool:
        rtype = resource.get("resourceType")
        if rtype == "Bundle":
            self.bundle(resource)
            return True
        if rtype == "Parameters":
            self.parameters(resource.get("parameter"))
            return True
        if rtype in DESCRIBING:
            self.result.listings = True
        elif rtype == "OperationOutcome":
            self._outcome(resource)
        decision = judge_resource(resource, self.judge, self.index)
        if decision.verdict is Verdict.DENY:
            self.result.removed.append((str(rtype), decision))
            return False
        return True

    def _outcome(self, resource: JSON) -> None:
        """The server's own OperationOutcome met in the answer loses its texts (never the
        gateway's ``suppressed`` one, added after deciding)."""
        if resource is not SUPPRESSED_OUTCOME:
            scrub_server_outcome(resource)
            self.result.changed = True

    def bundle(self, bundle: JSON) -> None:
        """Decide a Bundle inside the body and remove its withheld entries at once."""
        found = self._bundle(bundle, top=False)
        if found is not None:
            _apply_bundle(bundle, *found)

    def _bundle(self, bundle: JSON, top: bool) -> tuple[list[int], str | None, bool, bool] | None:
        """Decide a Bundle's entries: (indices kept, refused-slot status of a batch answer,
        whether the withheld outcome entry follows, whether total goes), or None when nothing
        is to be removed. For the body itself (``top``) the verdicts go into the result."""
        entries = bundle.get("entry")
        removed_before = len(self.result.removed)
        if entries is not None and not (isinstance(entries, list) and all(isinstance(e, dict) for e in entries)):
            self._malformed()
            return None
        # An empty list goes (apply), as one emptied here does: FHIR JSON has no empty arrays.
        empty = entries == [] and bundle.get("type") not in _RESPONSE_BUNDLES
        if empty:
            self.result.changed = True
        kept_indices: list[int] = []
        slots: str | None = None
        outcome = False
        if entries:
            response_bundle = bundle.get("type") in _RESPONSE_BUNDLES
            # A history entry's response may carry the server's outcome too.
            slotted = response_bundle or bundle.get("type") == "history"
            searchset = bundle.get("type") == "searchset"
            kept: list[object] = []
            withheld: list[tuple[JSON, JSON]] = []
            judge, owners, removed = self.judge, self.index, self.result.removed
            # Seen on the way, so the passes after the loop run only where they can matter.
            compositions = includes = False
            for index, entry in enumerate(entries):
                resource = entry.get("resource")
                if slotted:
                    self._scrub_response(entry)
                if resource is None:
                    keep = True
                elif type(resource) is not dict:
                    self._malformed()
                    return None
                else:
                    rtype = resource.get("resourceType")
                    if rtype in _NOTED:  # one lookup for the rare types, on the common path
                        if rtype == "Composition":
                            compositions = True
                        elif rtype == "OperationOutcome":
                            self._outcome(resource)
                        else:
                            self.result.listings = True
                    if not includes:
                        includes = may_be_included(entry, searchset)
                    if rtype == "Bundle" or rtype == "Parameters":
                        keep = self._keep(resource)
                    else:
                        if "contained" in resource:
                            decision = judge_resource(resource, judge, owners)
                        else:
                            # judge_resource without contained resources: one call fewer.
                            found = owners.get(id(resource)) if owners is not None else None
                            decision = judge(resource, owners_of(resource) if found is None else found)
                        keep = decision.verdict is not Verdict.DENY
                        if not keep:
                            removed.append((str(rtype), decision))
                if keep:
                    kept.append(entry)
                    kept_indices.append(index)
                else:
                    withheld.append((entry, resource))
            if compositions:
                self.result.listings = True
            if withheld and compositions:
                gone = set().union(*(_identities(e, r) for e, r in withheld))
                if scrub_compositions(kept, gone):
                    self.result.changed = True
            # Something was withheld here or inside a kept entry (a Bundle in an entry).
            filtered = len(removed) > removed_before
            if filtered and not response_bundle and includes:
                named = frozenset().union(*(references_of(r, self.ours) for _, r in withheld if type(r) is dict))
                orphans = without_orphan_includes(kept, searchset, named, self.ours)
                if len(orphans) != len(kept):
                    left = {id(e) for e in orphans}
                    kept_indices = [i for i in kept_indices if id(entries[i]) in left]
            if response_bundle:
                slots = self.withheld_status
            # In 404 mode a hidden record is indistinguishable from a missing one: no outcome
            # entry tells that something was withheld.
            elif filtered and not self.withheld_status.startswith("404"):
                outcome = True
            if filtered:
                self.result.changed = True
        filtered = len(self.result.removed) > removed_before
        links = bundle.get("link")
        counted = "total" in bundle or (isinstance(links, list) and any(_is_last(link) for link in links))
        dropped = self.drop_total and id(bundle) not in self.kept_totals
        drop_total = counted and (dropped or filtered or not total_is_visible(bundle))
        if drop_total:
            # SECURITY: Bundle.total (or the last page's link) would reveal how many entries
            # were withheld, or count matches on other pages (a joint record of another patient)
            # never decided here.
            self.result.changed = True
        if top:
            result = self.result
            result.kept, result.slots, result.outcome_entry, result.drop_total = kept_indices, slots, outcome, drop_total
            return None
        if not filtered and not drop_total and not empty:
            return None
        return kept_indices, slots, outcome, drop_total

    def _scrub_response(self, entry: JSON) -> None:
        """An upstream error outcome in a batch slot keeps its codes, never its texts; a missing
        record's slot reads exactly like a withheld one in 404 mode."""
        response = entry.get("response")
        if not isinstance(response, dict):
            return
        if str(response.get("status", "")).startswith("404"):
            entry["response"] = not_found_slot()
            self.result.changed = True
            return
        outcome = response.get("outcome")
        if isinstance(outcome, dict):
            failed = str(response.get("status", "")).lstrip()[:1] not in ("1", "2", "3")
            response["outcome"] = scrubbed_outcome(outcome) if failed else scrubbed_outcome(outcome, SERVER_NOTE)
            self.result.changed = True

    def parameters(self, params: object) -> None:
        if not isinstance(params, list):
            return
        kept = [
            p for p in params
            if not isinstance(p, dict) or not isinstance(p.get("resource"), dict) or self._keep(p["resource"])
        ]
        if len(kept) != len(params):
            params[:] = kept
            self.result.changed = True
        for param in params:
            if isinstance(param, dict):
                self.parameters(param.get("part"))

