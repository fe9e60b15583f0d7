"""Red team 13: conditional writes, 404-mode searches, cursors in paging links, and the values
of operations' Parameters answers.

Scenario: Ana may write her own records by a search (self access), but the hypertension record
Ben asserted (``JOINT``) is his too, and Ben opted out: she does not read it. Dr Gomez holds
Ana's general opt-in, which does not open her HIV diagnosis. Each test goes through the real
request path (HTTP to the gateway, the fake FHIR server on a real socket) and searches the RAW
response bytes and headers. The leak conftest runs each test on both paths (answers parsed
whole, and decided on views).

Holes found and closed here (each test below fails on the code before this pass):

1. Conditional create (``If-None-Exist``, also a batch entry's ``request.ifNoneExist``) was let
   through for a patient's own records without the search the gateway runs for a conditional
   update or delete: the server found the record she may not read and answered 200 (nothing
   created) where a missing one gives 201, so the status told that a hidden record of hers holds
   that identifier. In 404 mode even the refusal told it (403 where a missing one is created,
   and a conditional update or delete refused where a missing one is sent). Now the gateway runs
   every conditional write's search first, decided for the requester: in 403 mode a withheld
   match refuses it (as a search would say "withheld"); in 404 mode the write is narrowed to the
   matches he may see (``_id=``): a create with none creates, an update, patch or delete with
   none is answered 404 and not sent, whether something hidden matched or nothing did.
2. 404 mode: a patient's own search kept ``total: 0`` where nothing matched and lost it where a
   record she shares with a patient who does not permit her matched (by identifier, ``_id``,
   ``_lastUpdated``): a search set has no total in this mode now.
3. Cursors: a server that names the page's last entry in its ``next`` link (base64 of its id and
   time, base64 JSON, ``_id:above``) handed the id and time of a withheld entry to the client.
   Such a link is no longer handed out (core.paging.names_any): the answer continues from an
   anchor (the request, or the last link that named nothing withheld) with ``gateway-skip``.
4. ``$diff`` answered the differences of two open records as stored values: a display the
   gateway removes on a read ("HIV-1 RNA viral load 12000 copies/mL") came back as a
   ``valueString``; and an operation target named by ``valueCanonical`` (``valueUrl``, ...) in a
   Parameters body was not decided first.

5. 404 mode: the upstream's own offset in a refilled page's ``next`` link counted the hidden
   matches skipped (``_offset=2`` where a missing record gives ``_offset=1``): paging links are
   sealed now (web.pages), so the client holds a token of equal length in both worlds.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.sealed import opaque
from tests.leak.test_side_doors import MakeGateway, batch, call, is_outcome, leaks, routes, slots

ANA_ID = c.PAT_ANA.split("/", 1)[1]
HIV_ID = c.HIV_CONDITION["id"]
HIV_SECRETS = (HIV_ID, "B20", "86406008", "Human immunodeficiency", "HIV disease")

# ================================================================ 1. conditional writes

IDENTIFIER = {"system": "urn:oid:2.16.840.1.113883.19.5", "value": "htn-asserted-ben-7f3"}
JOINT = {**c.condition("cond-joint-htn-asserted-7f3", c.PAT_ANA, c.ANA_HYPERTENSION["code"], "2020-02-02"),
         "identifier": [IDENTIFIER], "asserter": {"reference": c.PAT_BEN},
         "note": [{"text": "Reported by Ben Okafor at the family visit"}]}
JOINT_SECRETS = (JOINT["id"], "Reported by Ben", "family visit")
# Ana's own record under the same identifier (a duplicate entry of the same finding).
OWN = {**c.condition("cond-own-htn-dup-51a", c.PAT_ANA, c.ANA_HYPERTENSION["code"], "2020-02-02"),
       "identifier": [IDENTIFIER]}
CONDITION = f"patient={c.PAT_ANA}&identifier={IDENTIFIER['system']}|{IDENTIFIER['value']}"
NEW = {"resourceType": "Condition", "subject": {"reference": c.PAT_ANA}, "code": c.ANA_HYPERTENSION["code"],
       "identifier": [IDENTIFIER]}


def _matching(fake: FakeFhir, query: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The Conditions a search by ``patient``, ``identifier`` and ``_id`` finds (as R4 runs it)."""
    found = []
    for key, res in fake.resources.items():
        if not key.startswith("Condition/"):
            continue
        text = orjson.dumps(res).decode()
        ok = True
        for name, value in query:
            if name == "patient":
                ok = ok and f'"reference":"{value}"' in text
            elif name == "identifier":
                ok = ok and value.rpartition("|")[2] in text
            elif name == "_id":
                ok = ok and res["id"] in value.split(",")
        if ok:
            found.append(res)
    return found


def _conditional_server(fake: FakeFhir) -> Any:
    """A server that runs conditional writes as R4 says: a create with one match answers 200 with
    it (nothing created), with several 412, with none creates (201); a conditional update, patch
    or delete changes its one match, or answers 412 for several, and names what it changed."""
    def create(request: web.Request) -> Any:
        condition = request.headers.get("If-None-Exist")
        if condition is None:
            return None
        found = _matching(fake, parse_qsl(condition))
        if len(found) > 1:
            return web.json_response({"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "duplicate", "diagnostics": "Multiple matches"}]}, status=412)
        if found:
            match = found[0]
            return web.json_response(match, status=200, headers={
                "Location": f"{fake.base_url}/Condition/{match['id']}/_history/1", "ETag": 'W/"1"'})
        return None  # the fake creates it (201)

    def change(request: web.Request) -> Any:
        found = _matching(fake, list(request.query.items()))
        if len(found) > 1:
            return web.json_response({"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "multiple-matches"}]}, status=412)
        if request.method == "DELETE":
            for res in found:
                fake.resources.pop(f"Condition/{res['id']}")
            return {"resourceType": "OperationOutcome", "issue": [{"severity": "information", "code": "informational",
                    "diagnostics": f"Deleted {len(found)}: {', '.join(r['id'] for r in found)}"}]}
        if not found:
            return web.json_response({**NEW, "id": "made-by-update"}, status=201)
        return web.json_response(found[0], status=200)

    def search(request: web.Request) -> Any:
        return fake.bundle(_matching(fake, list(request.query.items())), str(request.url))

    return routes({("GET", "/Condition"): search, ("POST", "/Condition"): create, ("DELETE", "/Condition"): change,
                   ("PUT", "/Condition"): change, ("PATCH", "/Condition"): change})


@pytest.fixture
def joint(fake_fhir: FakeFhir) -> FakeFhir:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), c.opt_out(c.PAT_BEN, "consent-ben-out"), JOINT)
    fake_fhir.override = _conditional_server(fake_fhir)
    return fake_fhir


def _forget_hidden(fake: FakeFhir) -> None:
    """The world where the hidden record is missing (and the first attempt created nothing)."""
    for key, res in list(fake.resources.items()):
        if key.startswith("Condition/") and IDENTIFIER in res.get("identifier", []) and res["id"] != OWN["id"]:
            fake.resources.pop(key)


def _as_sent(fake: FakeFhir, method: str) -> list[str]:
    return [f"{r.method} {r.path_qs} {r.headers.get('If-None-Exist', '')}" for r in fake.requests
            if r.method == method and r.path_qs.startswith("/fhir/Condition")]


def _shape(answer: tuple[int, dict[str, str], bytes]) -> tuple[int, set[str], Any]:
    """What a client compares: the status, which headers, and the body without the new id."""
    status, headers, body = answer
    parsed = orjson.loads(body) if body else None
    if isinstance(parsed, dict):
        parsed.pop("id", None)
    keep = {h for h in headers if h not in ("Date", "X-Request-Id", "Content-Length", "Transfer-Encoding")}
    return status, keep, parsed


async def _create(gateway: GatewayUnderTest) -> tuple[int, dict[str, str], bytes]:
    return await call(gateway, "POST", "/Condition", actor=c.PAT_ANA, body=NEW, **{"If-None-Exist": CONDITION})


async def test_403_mode_a_patients_conditional_create_does_not_find_a_record_she_may_not_read(
    joint: FakeFhir, gateway: GatewayUnderTest,
) -> None:
    """The create's search meets a record Ana may not read: refused like her conditional delete
    would be (in this mode her search says "withheld" too), and not sent."""
    status, headers, body = await _create(gateway)
    is_outcome(status, headers, body, 403)
    assert leaks(body, headers, JOINT_SECRETS) == []
    assert _as_sent(joint, "POST") == []


async def test_404_mode_a_conditional_create_over_a_hidden_match_answers_as_over_none(
    joint: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """In 404 mode the answer is the one she gets when nothing matches: her record is created
    (the server is asked without the condition), nothing names the hidden one."""
    gateway = await make_gateway(joint.base_url, enforcement={"denied_read_status": 404})
    hidden = await _create(gateway)
    assert leaks(hidden[2], hidden[1], JOINT_SECRETS) == []
    _forget_hidden(joint)
    missing = await _create(gateway)
    assert hidden[0] == missing[0] == 201, hidden
    assert _shape(hidden) == _shape(missing)


async def test_404_mode_a_conditional_create_finds_what_she_may_see_beside_a_hidden_match(
    joint: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Her own record under the same identifier is found (200, nothing created), as when the
    hidden one is not there; the server would otherwise answer 412 "multiple matches"."""
    joint.add(OWN)
    gateway = await make_gateway(joint.base_url, enforcement={"denied_read_status": 404})
    hidden = await _create(gateway)
    assert leaks(hidden[2], hidden[1], JOINT_SECRETS) == []
    _forget_hidden(joint)
    missing = await _create(gateway)
    assert hidden[0] == missing[0] == 200, hidden
    assert orjson.loads(hidden[2])["id"] == OWN["id"]
    assert _shape(hidden) == _shape(missing)


def _entry_server(fake: FakeFhir) -> Any:
    """A batch whose entries carry ``ifNoneExist`` sent on as the header (as servers do)."""
    inner = _conditional_server(fake)

    async def override(request: web.Request) -> Any:
        if request.method == "POST" and request.path.rstrip("/") == "/fhir":
            bundle = orjson.loads(await request.read())
            out = []
            for entry in bundle["entry"]:
                req = entry["request"]
                headers = {"If-None-Exist": req["ifNoneExist"]} if "ifNoneExist" in req else {}
                async with aiohttp.ClientSession() as session:
                    async with session.request(req["method"], f"{fake.base_url}/{req['url']}",
                                               data=orjson.dumps(entry["resource"]),
                                               headers={"Content-Type": "application/fhir+json", **headers}) as resp:
                        answer = await resp.json(content_type=None)
                        slot: dict[str, Any] = {"response": {"status": f"{resp.status} {resp.reason}"}}
                        if "Location" in resp.headers:
                            slot["response"]["location"] = resp.headers["Location"]
                        slot["resource"] = answer
                out.append(slot)
            return web.json_response({"resourceType": "Bundle", "type": "batch-response", "entry": out})
        return await inner(request)

    return override


def _conditional_batch() -> dict[str, Any]:
    bundle = batch(("POST", "Condition", NEW))
    bundle["entry"][0]["request"]["ifNoneExist"] = CONDITION
    return bundle


async def test_403_mode_a_conditional_create_in_a_batch_is_refused_in_its_slot(
    joint: FakeFhir, gateway: GatewayUnderTest,
) -> None:
    joint.override = _entry_server(joint)
    status, headers, body = await call(gateway, "POST", "/", actor=c.PAT_ANA, body=_conditional_batch())
    assert leaks(body, headers, JOINT_SECRETS) == []
    assert [s["response"]["status"] for s in slots(body)] == ["403 Forbidden"], body
    assert _as_sent(joint, "POST") == []


async def test_404_mode_a_conditional_create_in_a_batch_answers_as_over_none(
    joint: FakeFhir, make_gateway: MakeGateway,
) -> None:
    joint.override = _entry_server(joint)
    gateway = await make_gateway(joint.base_url, enforcement={"denied_read_status": 404})
    hidden = await call(gateway, "POST", "/", actor=c.PAT_ANA, body=_conditional_batch())
    assert leaks(hidden[2], hidden[1], JOINT_SECRETS) == []
    _forget_hidden(joint)
    missing = await call(gateway, "POST", "/", actor=c.PAT_ANA, body=_conditional_batch())
    statuses = [[s["response"]["status"] for s in slots(b[2])] for b in (hidden, missing)]
    assert statuses == [["201 Created"], ["201 Created"]], statuses


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH"])
async def test_404_mode_a_conditional_change_over_a_hidden_match_answers_as_over_none(
    joint: FakeFhir, make_gateway: MakeGateway, method: str,
) -> None:
    """An update, patch or delete by a search that finds only what she may not read is answered
    as one that finds nothing: 404, not sent (as a write to a missing id is in this mode)."""
    gateway = await make_gateway(joint.base_url, enforcement={"denied_read_status": 404})
    body: Any = [{"op": "replace", "path": "/clinicalStatus", "value": {"text": "x"}}] if method == "PATCH" else (
        NEW if method == "PUT" else None)
    ctype = {"Content-Type": "application/json-patch+json"} if method == "PATCH" else {}
    hidden = await call(gateway, method, f"/Condition?{CONDITION}", actor=c.PAT_ANA, body=body, **ctype)
    assert leaks(hidden[2], hidden[1], JOINT_SECRETS) == []
    _forget_hidden(joint)
    missing = await call(gateway, method, f"/Condition?{CONDITION}", actor=c.PAT_ANA, body=body, **ctype)
    assert hidden[0] == missing[0] == 404, (hidden, missing)
    assert hidden[2] == missing[2]
    assert _as_sent(joint, method) == []


async def test_404_mode_a_conditional_delete_reaches_only_what_she_may_see(
    joint: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Her own record beside the hidden one: the delete is narrowed to hers (the server would
    otherwise answer 412 for two matches), and the hidden one stays."""
    joint.add(OWN)
    gateway = await make_gateway(joint.base_url, enforcement={"denied_read_status": 404})
    status, headers, body = await call(gateway, "DELETE", f"/Condition?{CONDITION}", actor=c.PAT_ANA)
    assert status == 200, body
    assert leaks(body, headers, JOINT_SECRETS) == []
    assert f"Condition/{JOINT['id']}" in joint.resources and f"Condition/{OWN['id']}" not in joint.resources


async def test_an_if_none_exist_given_twice_is_refused(joint: FakeFhir, gateway: GatewayUnderTest) -> None:
    """The gateway checks one condition; a server may read the other (or both joined)."""
    async with gateway.session.post(gateway.url + "/Condition", data=orjson.dumps(NEW), headers=[
            ("X-Actor", c.PAT_ANA), ("Content-Type", "application/fhir+json"),
            ("If-None-Exist", f"patient={c.PAT_ANA}"), ("If-None-Exist", "identifier=x")]) as resp:
        assert resp.status == 400, await resp.read()
    assert _as_sent(joint, "POST") == []


async def test_a_batch_condition_that_is_not_text_is_refused(joint: FakeFhir, gateway: GatewayUnderTest) -> None:
    bundle = batch(("POST", "Condition", NEW))
    bundle["entry"][0]["request"]["ifNoneExist"] = [CONDITION]
    status, _, body = await call(gateway, "POST", "/", actor=c.PAT_ANA, body=bundle)
    assert status == 400, body
    assert _as_sent(joint, "POST") == []


# ================================================================ 2. 404 mode: searches by what only a hidden record holds

HIV_IDENTIFIER = {"system": "urn:oid:2.16.840.1.113883.19.5.99", "value": "dx-hiv-20230114-ana"}
HIV_DATED = {**c.HIV_CONDITION, "identifier": [HIV_IDENTIFIER],
             "meta": {"lastUpdated": "2023-01-14T09:30:00Z", "versionId": "3"}}
HIV_DATED_SECRETS = (*HIV_SECRETS, HIV_IDENTIFIER["value"], "2023-01-14T09:30:00Z")


def _searching(fake: FakeFhir) -> Any:
    """A server that searches Conditions by ``identifier``, ``_id``, ``patient``, ``_lastUpdated``
    (``ge``), sorted by ``-_lastUpdated`` and paged by ``_count``/``_offset``, with ``total``."""
    def search(request: web.Request) -> Any:
        query = list(request.query.items())
        found = [r for k, r in fake.resources.items() if k.startswith("Condition/")]
        for name, value in query:
            if name == "identifier":
                found = [r for r in found if any(i.get("value") == value.rpartition("|")[2] for i in r.get("identifier", []))]
            elif name == "_id":
                found = [r for r in found if r["id"] in value.split(",")]
            elif name == "patient":
                found = [r for r in found if (r.get("subject") or {}).get("reference") == value]
            elif name == "_lastUpdated":
                found = [r for r in found if (r.get("meta") or {}).get("lastUpdated", "") >= value.removeprefix("ge")]
        found.sort(key=lambda r: (r.get("meta") or {}).get("lastUpdated", ""), reverse=True)
        count = int(request.query.get("_count", "50"))
        offset = int(request.query.get("_offset", "0"))
        bundle = fake.bundle(found[offset:offset + count], str(request.url))
        bundle["total"] = len(found)
        if offset + count < len(found):
            rest = [(k, v) for k, v in query if k != "_offset"] + [("_offset", str(offset + count))]
            bundle["link"].append({"relation": "next", "url": f"{fake.base_url}/Condition?" + "&".join(
                f"{k}={v}" for k, v in rest)})
        return bundle

    return routes({("GET", "/Condition"): search})


@pytest.fixture
def dated(fake_fhir: FakeFhir) -> FakeFhir:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), c.opt_in(c.PAT_BEN, "consent-ben-in"), HIV_DATED)
    fake_fhir.override = _searching(fake_fhir)
    return fake_fhir


def _comparable(answer: tuple[int, dict[str, str], bytes]) -> tuple[int, list[tuple[str, str]], bytes]:
    """What a client compares: the status, the headers, the bytes (a sealed link by its length)."""
    status, headers, body = answer
    return status, sorted((k, opaque(v).decode()) for k, v in headers.items()
                          if k not in ("Date", "X-Request-ID", "X-Request-Id")), opaque(body)


SEARCHES = [
    f"/Condition?identifier={HIV_IDENTIFIER['system']}|{HIV_IDENTIFIER['value']}",
    f"/Condition?identifier={HIV_IDENTIFIER['value']}&patient={c.PAT_ANA}",
    f"/Condition?_id={HIV_ID}",
    f"/Condition?patient={c.PAT_ANA}&_lastUpdated=ge2023-01-14T09:30:00Z",
    f"/Condition?patient={c.PAT_ANA}&_sort=-_lastUpdated&_count=1",
]


@pytest.mark.parametrize("actor", [c.DOCTOR, c.PAT_ANA])
@pytest.mark.parametrize("path", SEARCHES)
async def test_404_mode_a_search_by_what_only_a_hidden_record_holds_answers_as_for_a_missing_one(
    dated: FakeFhir, make_gateway: MakeGateway, path: str, actor: str,
) -> None:
    """By its identifier, its id, its time, or sorted to the top: the answer (status, headers,
    bytes) is the one for the same search when the record is not there. Ana herself is asked
    too: her record shared with Ben, who opted out, is hidden from her; sorted to the top with
    one a page, the next visible one is on the upstream's third page there and its second here,
    and the sealed next link says neither."""
    if actor == c.PAT_ANA:
        dated.resources.pop(f"Condition/{HIV_ID}")
        dated.add(c.opt_out(c.PAT_BEN, "consent-ben-in"), {**HIV_DATED, "asserter": {"reference": c.PAT_BEN}})
    gateway = await make_gateway(dated.base_url, enforcement={"denied_read_status": 404})
    hidden = await call(gateway, "GET", path, actor=actor)
    assert hidden[0] == 200, hidden
    # What the client wrote itself comes back in the self link.
    assert leaks(hidden[2], hidden[1], tuple(s for s in HIV_DATED_SECRETS if s not in path)) == []
    dated.resources.pop(f"Condition/{HIV_ID}")
    missing = await call(gateway, "GET", path, actor=actor)
    assert _comparable(hidden) == _comparable(missing)


# ================================================================ 3. cursors in paging links

VISIBLE = [{**c.condition(f"cond-htn-visit-{n}", c.PAT_ANA, c.ANA_HYPERTENSION["code"], f"2021-0{n}-01"),
            "meta": {"lastUpdated": f"2024-0{9 - n}-01T00:00:00Z"}} for n in range(1, 7)]
HIDDEN_AT = {**c.HIV_CONDITION, "meta": {"lastUpdated": "2024-07-15T12:34:56Z"}}  # between visits 1 and 2
CURSOR_SECRETS = (HIV_ID, "2024-07-15T12:34:56", "1721046896")


def _b64(text: str) -> str:
    import base64
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _cursor_server(fake: FakeFhir, style: str) -> Any:
    """Ana's Conditions newest first, ``_count`` a page; the ``next`` link continues after the
    page's last entry, named in a cursor as servers write them."""
    def cursor_of(res: dict[str, Any]) -> tuple[str, str]:
        stamp = res["meta"]["lastUpdated"]
        if style == "base64":
            return "_cursor", _b64(f"Condition/{res['id']}|{stamp}")
        if style == "json":
            import base64
            return "ct", base64.b64encode(orjson.dumps({"id": res["id"], "lastUpdated": stamp})).decode()
        return "_id:above", res["id"]

    def after(found: list[dict[str, Any]], query: dict[str, str]) -> list[dict[str, Any]]:
        for name in ("_cursor", "ct", "_id:above"):
            if name in query:
                ids = [r["id"] for r in found]
                for i, r in enumerate(found):
                    if cursor_of(r)[1] == query[name]:
                        return found[i + 1:]
                raise AssertionError(f"unknown cursor {query[name]} among {ids}")
        return found

    def search(request: web.Request) -> Any:
        found = sorted((r for k, r in fake.resources.items() if k.startswith("Condition/")
                        and (r.get("subject") or {}).get("reference") == request.query.get("patient")),
                       key=lambda r: (r.get("meta") or {}).get("lastUpdated", ""), reverse=True)
        rest = after(found, dict(request.query))
        count = int(request.query.get("_count", "50"))
        page = rest[:count]
        bundle = fake.bundle(page, str(request.url))
        del bundle["total"]
        if len(rest) > count:
            name, value = cursor_of(page[-1])
            from urllib.parse import quote
            bundle["link"].append({"relation": "next", "url": f"{fake.base_url}/Condition?patient={request.query['patient']}"
                                   f"&_count={count}&{quote(name)}={quote(value, safe='')}"})
        return bundle

    return routes({("GET", "/Condition"): search})


def _decodings(body: bytes) -> str:
    """The body with every link's query decoded as a client would try: percent, base64(url), JSON."""
    import base64
    from urllib.parse import parse_qsl, urlsplit
    texts = [body.decode()]
    for link in orjson.loads(body).get("link", []):
        for _, value in parse_qsl(urlsplit(link["url"]).query):
            texts.append(value)
            for decode in (base64.b64decode, base64.urlsafe_b64decode):
                try:
                    texts.append(decode(value + "=" * (-len(value) % 4)).decode("utf-8", "replace"))
                except ValueError:
                    pass
    return "\n".join(texts)


async def _all_pages(gateway: GatewayUnderTest, path: str) -> tuple[list[str], list[bytes]]:
    ids: list[str] = []
    bodies: list[bytes] = []
    url = gateway.url + path
    for _ in range(20):
        async with gateway.session.get(url, headers={"X-Actor": c.DOCTOR}) as resp:
            body = await resp.read()
            assert resp.status == 200, body
        bodies.append(body)
        bundle = orjson.loads(body)
        ids += [e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"]
        nxt = [link["url"] for link in bundle.get("link", []) if link["relation"] == "next"]
        if not nxt:
            return ids, bodies
        url = nxt[0]
    raise AssertionError("paging did not end")


@pytest.fixture
def cursored(fake_fhir: FakeFhir) -> FakeFhir:
    c.seed_all(fake_fhir)
    for key in [k for k in fake_fhir.resources if k.startswith("Condition/")]:
        fake_fhir.resources.pop(key)
    fake_fhir.add(c.opt_in(c.PAT_ANA), *VISIBLE, HIDDEN_AT)
    return fake_fhir


@pytest.mark.parametrize("status", [403, 404])
@pytest.mark.parametrize("style", ["base64", "json", "id-above"])
@pytest.mark.parametrize("count", [2, 3])
async def test_a_cursor_in_a_next_link_does_not_name_the_withheld_record(
    cursored: FakeFhir, make_gateway: MakeGateway, style: str, status: int, count: int,
) -> None:
    """The server continues after the page's last entry and names it in the link (a cursor of
    its id and time; base64, JSON in base64, or ``_id:above``). When that entry is withheld the
    client would read it there. Paging still gives every visible record once, in order."""
    cursored.override = _cursor_server(cursored, style)
    gateway = await make_gateway(cursored.base_url, enforcement={"denied_read_status": status})
    ids, bodies = await _all_pages(gateway, f"/Condition?patient={c.PAT_ANA}&_count={count}")
    assert ids == [r["id"] for r in VISIBLE]
    for body in bodies:
        assert leaks(_decodings(body).encode(), {}, CURSOR_SECRETS) == []


# ================================================================ 4. values of operations' Parameters answers

HTN_ID = c.ANA_HYPERTENSION["id"]
VL_TEXT = "HIV-1 RNA viral load 12000 copies/mL"
# Two of Ana's open records; the second names her hidden HIV diagnosis, with a display saying so.
HTN_NOTED = {**c.ANA_HYPERTENSION, "id": "cond-htn-noted-2b"}
HTN_LINKED = {**c.ANA_HYPERTENSION, "id": "cond-htn-linked-2c",
              "evidence": [{"detail": [{"reference": f"Condition/{HIV_ID}", "display": VL_TEXT}]}]}
DIFF_SECRETS = (VL_TEXT, "viral load", "12000")


def _diff_server(fake: FakeFhir) -> Any:
    """A server's ``$diff`` as HAPI writes it: one ``operation`` per changed leaf, its path and its
    values as primitives; ``from``/``to`` read from the query or a Parameters body (any value[x])."""
    async def diff(request: web.Request) -> Any:
        names = dict(request.query)
        if request.method == "POST":
            for param in (await request.json()).get("parameter", []):
                value = next((v for k, v in param.items() if k.startswith("value")), None)
                names[param["name"]] = value["reference"] if isinstance(value, dict) else value
        old, new = fake.resources[names["from"]], fake.resources[names["to"]]
        ops = []
        if "evidence" in new and "evidence" not in old:
            detail = new["evidence"][0]["detail"][0]
            ops += [{"name": "operation", "part": [
                {"name": "type", "valueCode": "insert"},
                {"name": "path", "valueString": "Condition.evidence[0].detail[0].display"},
                {"name": "value", "valueString": detail["display"]}]},
                {"name": "operation", "part": [
                    {"name": "type", "valueCode": "insert"}, {"name": "path", "valueString": "Condition.evidence[0].detail[0]"},
                    {"name": "value", "valueReference": detail}]}]
        return {"resourceType": "Parameters", "parameter": ops}

    return routes({("GET", "/Condition/$diff"): diff, ("POST", "/Condition/$diff"): diff,
                   ("GET", "/$diff"): diff, ("POST", "/$diff"): diff})


@pytest.fixture
def diffs(fake_fhir: FakeFhir) -> FakeFhir:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), HTN_NOTED, HTN_LINKED)
    fake_fhir.override = _diff_server(fake_fhir)
    return fake_fhir


async def test_a_diff_of_open_records_does_not_carry_the_display_a_read_would_remove(
    diffs: FakeFhir, gateway: GatewayUnderTest,
) -> None:
    """Both records are open to Dr Gomez, and a read of the second removes the display naming the
    hidden diagnosis; the difference of the two must not hand it over as a value."""
    status, headers, read = await call(gateway, "GET", f"/Condition/{HTN_LINKED['id']}")
    assert status == 200 and leaks(read, headers, DIFF_SECRETS) == [], read
    status, headers, body = await call(
        gateway, "GET", f"/Condition/$diff?from=Condition/{HTN_NOTED['id']}&to=Condition/{HTN_LINKED['id']}")
    assert status == 200, body
    assert leaks(body, headers, DIFF_SECRETS) == []
    assert f"Condition/{HIV_ID}" in body.decode()  # the reference itself stays, as in the read


@pytest.mark.parametrize("key", ["valueCanonical", "valueUrl", "valueOid", "valueUuid", "valueMarkdown"])
@pytest.mark.parametrize("status", [403, 404])
async def test_an_operation_target_named_in_any_primitive_value_is_decided(
    diffs: FakeFhir, make_gateway: MakeGateway, key: str, status: int,
) -> None:
    """``from`` given as a canonical, a url, ...: a server that reads any primitive for an id
    parameter compares the hidden record; it is decided first, as when named as a string."""
    gateway = await make_gateway(diffs.base_url, enforcement={"denied_read_status": status})
    code, headers, body = await call(gateway, "POST", "/$diff", body={"resourceType": "Parameters", "parameter": [
        {"name": "from", key: f"Condition/{HIV_ID}"}, {"name": "to", "valueString": f"Condition/{HTN_ID}"}]})
    assert code == status, body
    assert not [r for r in diffs.requests if "$diff" in r.path_qs]
    assert leaks(body, headers, HIV_SECRETS) == []


def _including(fake: FakeFhir) -> Any:
    """``Condition?_id=...&_include=Condition:evidence-detail`` as a server answers it."""
    def search(request: web.Request) -> Any:
        found = [fake.resources[f"Condition/{i}"] for i in request.query.get("_id", "").split(",")
                 if f"Condition/{i}" in fake.resources]
        bundle = fake.bundle(found, str(request.url))
        for res in found:
            for ev in res.get("evidence", []):
                for detail in ev.get("detail", []):
                    target = fake.resources.get(detail["reference"])
                    if target is not None and "_include" in request.query:
                        bundle["entry"].append({"fullUrl": f"{fake.base_url}/{detail['reference']}", "resource": target,
                                                "search": {"mode": "include"}})
        return bundle

    return routes({("GET", "/Condition"): search})


@pytest.mark.parametrize("status", [403, 404])
async def test_an_include_reaching_a_hidden_record_answers_as_one_reaching_a_missing_one(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, status: int,
) -> None:
    """In 404 mode the whole answer is the same (the display naming it goes either way); in 403
    mode only the ``suppressed`` entry differs, as CONTRACT §6 says."""
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), HTN_LINKED)
    fake_fhir.override = _including(fake_fhir)
    gateway = await make_gateway(fake_fhir.base_url, enforcement={"denied_read_status": status})
    path = f"/Condition?_id={HTN_LINKED['id']}&_include=Condition:evidence-detail"
    hidden = await call(gateway, "GET", path)
    # The open record's reference to it stays (CONTRACT §6 removes only its display).
    assert leaks(hidden[2], hidden[1], (*HIV_SECRETS[1:], *DIFF_SECRETS)) == []
    fake_fhir.resources.pop(f"Condition/{HIV_ID}")
    missing = await call(gateway, "GET", path)
    if status == 404:
        assert _comparable(hidden) == _comparable(missing)
    else:
        assert b"suppressed" in hidden[2] and b"suppressed" not in missing[2]


@pytest.mark.parametrize("path", [
    "/Condition?_content=HIV", "/Condition?_text=immunodeficiency",
    f"/Condition?subject:Patient.identifier={HIV_IDENTIFIER['value']}", f"/Condition?subject.identifier={HIV_IDENTIFIER['value']}",
    f"/Condition?_has:Provenance:target:agent={c.DOCTOR}",
])
async def test_404_mode_searches_by_what_the_gateway_cannot_check_are_refused_alike(
    dated: FakeFhir, make_gateway: MakeGateway, path: str,
) -> None:
    """Free text, chains and reverse chains select by what the gateway cannot decide: refused
    (403) before they are sent, whether a hidden record would match or none would."""
    gateway = await make_gateway(dated.base_url, enforcement={"denied_read_status": 404})
    hidden = await call(gateway, "GET", path)
    dated.resources.pop(f"Condition/{HIV_ID}")
    missing = await call(gateway, "GET", path)
    assert hidden[0] == 403, hidden
    assert _comparable(hidden) == _comparable(missing)
    assert not [r for r in dated.requests if r.path_qs.startswith("/fhir/Condition?")]
