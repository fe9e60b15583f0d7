"""An answer's resources are freed when its request ends, by reference counting alone.

A reference cycle around the per-request pipeline (a closure that calls itself, a judge that
keeps its wrapper) keeps every resource of every answer alive until the cyclic collector
runs, and that collector then walks all of them: on a 1,000-resource answer, measured, about
a tenth of the gateway's CPU and the answer's memory held across requests.
"""

from __future__ import annotations

import base64
import gc
from collections.abc import Awaitable, Callable, Iterator

import aiohttp.web_app
import orjson
import pytest

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c

MEDICATION = {"resourceType": "Medication", "id": "med-bupnal-41a",
              "code": c.BUPRENORPHINE["medicationCodeableConcept"]}
BY_REFERENCE = {**{k: v for k, v in c.BUPRENORPHINE.items() if k != "medicationCodeableConcept"},
                "id": "medrx-byref-77c", "medicationReference": {"reference": f"Medication/{MEDICATION['id']}"}}
LETTER = {"resourceType": "Binary", "id": "bin-htn-letter-5e1", "contentType": "text/plain",
          "securityContext": {"reference": f"Condition/{c.ANA_HYPERTENSION['id']}"},
          "data": base64.b64encode(b"Blood pressure follow-up letter").decode()}


@pytest.fixture
def only_collector_frees() -> Iterator[Callable[[], list[object]]]:
    """With the cyclic collector off from here on, a call gives what only it would free:
    resources, and anything the gateway's own code made (its objects and closures)."""

    def collect() -> list[object]:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            return [o for o in gc.garbage if _of_the_gateway(o)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()

    # aiohttp remembers each app's built middleware chain (an LRU of 1,024 entries holding the
    # Application): once a long session has filled it, a request here evicts an app of an earlier
    # test, whose gateway then becomes cyclic garbage in this test's window. Let them go first.
    cached = getattr(aiohttp.web_app, "_cached_build_middleware", None)
    if cached is not None:
        cached.cache_clear()
    gc.collect()
    # Held until the end: what was alive before (an earlier test's gateway still being let go)
    # cannot turn up as this test's garbage.
    alive = gc.get_objects()
    gc.disable()
    try:
        yield collect
    finally:
        gc.enable()
        del alive


def _of_the_gateway(obj: object) -> bool:
    """A resource, or anything the gateway's own code made (its objects and closures)."""
    if isinstance(obj, dict):
        return "resourceType" in obj
    module = getattr(obj, "__module__", None) if callable(obj) else type(obj).__module__
    return isinstance(module, str) and module.startswith("gateway")


@pytest.mark.parametrize("views_above_bytes", [1 << 20, 0], ids=["whole", "views"])
async def test_no_answer_outlives_its_request_in_a_reference_cycle(
    fake_fhir: FakeFhir, make_gateway: Callable[..., Awaitable[GatewayUnderTest]], views_above_bytes: int,
    only_collector_frees: Callable[[], list[object]],
) -> None:
    gateway = await make_gateway(fake_fhir.base_url, upstream={"views_above_bytes": views_above_bytes})
    fake_fhir.add(*c.ANA_ORDINARY, *c.ANA_SENSITIVE, c.ANA, MEDICATION, BY_REFERENCE, LETTER,
                  c.not_this_doctor(c.PAT_ANA, c.BANNED_DOCTOR))
    doctor = {"X-Actor": c.DOCTOR}
    asks = [
        ("GET", f"/Condition?patient={c.PAT_ANA}", doctor),
        ("GET", f"/MedicationRequest?patient={c.PAT_ANA}", doctor),      # a Medication resolved
        ("GET", f"/Binary?_id={LETTER['id']}", doctor),                   # a Binary decided as its context
        ("GET", f"/Binary/{LETTER['id']}", doctor),
        ("GET", f"/Condition/{c.HIV_CONDITION['id']}", doctor),
        ("GET", f"/Condition?patient={c.PAT_ANA}", {**doctor, "X-Break-Glass": "Medical emergency"}),
        ("POST", "/", doctor),                                            # a batch
        ("GET", f"/Condition/{c.HIV_CONDITION['id']}", {"X-Actor": c.BANNED_DOCTOR}),  # refused
        ("GET", "/Condition/no-such-record", doctor),                     # missing upstream
        ("GET", "/Condition?_count=abc&patient=", {}),                     # no requester
    ]
    batch = orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Condition?patient={c.PAT_ANA}"}},
        {"request": {"method": "GET", "url": f"Binary/{LETTER['id']}"}}]})
    statuses = []
    for method, path, headers in asks:
        body = batch if method == "POST" else None
        if body is not None:
            headers = {**headers, "Content-Type": "application/fhir+json"}
        async with gateway.session.request(method, gateway.url + path, headers=headers, data=body) as resp:
            await resp.read()
            statuses.append(resp.status)
    assert all(s < 500 for s in statuses) and {403, 404} <= set(statuses), statuses
    cyclic = only_collector_frees()
    assert cyclic == [], sorted({getattr(o, "__qualname__", type(o).__qualname__) for o in cyclic})
