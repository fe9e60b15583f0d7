"""A Binary nothing ties to a patient: no ``securityContext``, and no DocumentReference attaches it
(it is a DiagnosticReport's ``presentedForm``, a Media's ``content``, a Communication's
payload). R4 and the FHIR engine offer no search that finds those holders by the Binary's URL
(only ``DocumentReference?location=``), so the gateway cannot learn whose it is.

``enforcement.unattached_binaries``: ``release`` (the default: CONTRACT §5 passes data in no
patient compartment, and §6 decides a Binary by its securityContext) or ``withhold`` (refused
to everyone at every door, as a Binary whose context cannot be read). Each test searches the
RAW response bytes and headers for the hidden ids and texts.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_side_doors import ORDINARY_BINARY, MakeGateway, batch, call, ids_in, leaks, routes, slots

REPORT_PDF = {
    "resourceType": "Binary", "id": "bin-report-hiv-7c2", "contentType": "text/plain",
    "data": base64.b64encode(b"HIV-1 RNA quantitative: 12000 copies/mL").decode(),
}
REPORT = {
    "resourceType": "DiagnosticReport", "id": "rep-hiv-vl-3d1", "status": "final", "subject": {"reference": c.PAT_ANA},
    "code": {"text": "Laboratory report"},
    "presentedForm": [{"contentType": "text/plain", "url": f"Binary/{REPORT_PDF['id']}"}],
}
SECRETS = (REPORT_PDF["id"], REPORT_PDF["data"])
WITHHOLD = {"enforcement": {"unattached_binaries": "withhold"}}


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), REPORT, REPORT_PDF, ORDINARY_BINARY)
    return fake_fhir


def doors(world: FakeFhir) -> dict[str, tuple[str, str, Any]]:
    return {
        "read": ("GET", f"/Binary/{REPORT_PDF['id']}", None),
        "search": ("GET", f"/Binary?_id={REPORT_PDF['id']},{ORDINARY_BINARY['id']}", None),
        "batch": ("POST", "/", batch(("GET", f"Binary/{REPORT_PDF['id']}"), ("GET", f"Binary/{ORDINARY_BINARY['id']}"))),
        "include": ("GET", f"/DiagnosticReport?patient={c.PAT_ANA}&_include=*", None),
    }


@pytest.mark.parametrize("door", ["read", "search", "batch", "include"])
async def test_withhold_refuses_a_binary_nothing_ties_to_a_patient_at_every_door(
    world: FakeFhir, make_gateway: MakeGateway, door: str,
) -> None:
    world.override = routes({
        ("GET", "/Binary"): lambda r: c.bundle([REPORT_PDF, ORDINARY_BINARY], world.base_url),
        ("GET", "/DiagnosticReport"): lambda r: c.bundle([REPORT], world.base_url, include=(REPORT_PDF, ORDINARY_BINARY)),
    })
    gateway = await make_gateway(world.base_url, **WITHHOLD)
    method, path, body_sent = doors(world)[door]
    status, headers, body = await call(gateway, method, path, body=body_sent)
    if door == "include":
        # Its report came with it: the Binary is that report's, released with it (below).
        assert status == 200, body
        assert {REPORT["id"], REPORT_PDF["id"]} <= ids_in(body)
        return
    # What the client wrote itself (the ids it searched by) comes back in the search's self link.
    assert leaks(body, headers, tuple(s for s in SECRETS if door != "search" or s not in path)) == []
    if door == "read":
        assert status == 403, body
    elif door == "batch":
        hidden, ordinary = slots(body)
        assert hidden["response"]["status"].startswith("403") and "resource" not in hidden
        assert ordinary["resource"]["id"] == ORDINARY_BINARY["id"]  # its securityContext ties it
    else:
        assert status == 200, body
        kept = ids_in(body)
        assert REPORT_PDF["id"] not in kept
        assert ORDINARY_BINARY["id"] in kept


async def test_withhold_in_404_mode_answers_as_for_a_missing_binary(world: FakeFhir, make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(world.base_url, enforcement={"unattached_binaries": "withhold", "denied_read_status": 404})
    status, headers, body = await call(gateway, "GET", f"/Binary/{REPORT_PDF['id']}")
    assert status == 404, body
    assert leaks(body, headers, SECRETS) == []


async def test_withhold_keeps_a_binary_a_document_attaches(world: FakeFhir, make_gateway: MakeGateway) -> None:
    """Tied by a DocumentReference (``DocumentReference?location=``): decided as that document."""
    attached = {**REPORT_PDF, "id": "bin-cbc-doc-8e1"}
    document = {"resourceType": "DocumentReference", "id": "doc-cbc-ana-2f2", "status": "current",
                "subject": {"reference": c.PAT_ANA}, "content": [{"attachment": {"url": f"Binary/{attached['id']}"}}]}
    world.add(attached, document)
    gateway = await make_gateway(world.base_url, **WITHHOLD)
    status, _, body = await call(gateway, "GET", f"/Binary/{attached['id']}")
    assert status == 200, body


async def test_release_is_the_default(world: FakeFhir, make_gateway: MakeGateway) -> None:
    """The contract's reading: a Binary in no patient compartment that nothing ties to a patient
    is no one's data, and passes (CONTRACT §5, §6)."""
    gateway = await make_gateway(world.base_url)
    assert gateway.state.settings.enforcement.unattached_binaries == "release"
    status, _, body = await call(gateway, "GET", f"/Binary/{REPORT_PDF['id']}")
    assert status == 200, body


# A report the doctor may not see (its HIV viral load code labels it), with its printout.
HIV_PDF = {
    "resourceType": "Binary", "id": "bin-hiv-vl-print-5e4", "contentType": "text/plain",
    "data": base64.b64encode(b"HIV-1 RNA 48000 copies/mL, detected").decode(),
}
HIV_REPORT = {
    "resourceType": "DiagnosticReport", "id": "rep-hiv-vl-8b9", "status": "final", "subject": {"reference": c.PAT_ANA},
    "code": {"coding": [{"system": "http://loinc.org", "code": "20447-9"}]},
    "presentedForm": [{"contentType": "text/plain", "url": f"Binary/{HIV_PDF['id']}"}],
}
HIV_SECRETS = (HIV_PDF["id"], HIV_PDF["data"], HIV_REPORT["id"], "20447-9")


def _with_its_report(world: FakeFhir, report: dict[str, Any], pdf: dict[str, Any], absolute: bool = False) -> None:
    """``$everything`` and a report search with ``_include``: the report and its printout in one answer."""
    if absolute:
        report = {**report, "presentedForm": [{"contentType": "text/plain", "url": f"{world.base_url}/Binary/{pdf['id']}"}]}
    world.add(report, pdf)
    world.override = routes({
        ("GET", f"/Patient/{c.PAT_ANA.split('/')[1]}/$everything"): lambda r: c.bundle([report, pdf], world.base_url),
        ("GET", "/DiagnosticReport"): lambda r: c.bundle([report], world.base_url, include=(pdf,)),
    })


@pytest.mark.parametrize("door", ["everything", "include"])
@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
async def test_a_binary_goes_with_the_withheld_report_it_came_with(
    world: FakeFhir, make_gateway: MakeGateway, door: str, absolute: bool,
) -> None:
    """The default (release) passes a Binary nothing on the server ties to a patient; one whose
    report is in the same answer is that report's, and is withheld with it."""
    _with_its_report(world, HIV_REPORT, HIV_PDF, absolute)
    gateway = await make_gateway(world.base_url)
    path = (f"/Patient/{c.PAT_ANA.split('/')[1]}/$everything" if door == "everything"
            else f"/DiagnosticReport?patient={c.PAT_ANA}&_include=*")
    status, headers, body = await call(gateway, "GET", path)
    assert status == 200, body
    assert leaks(body, headers, HIV_SECRETS) == []


async def test_a_binary_comes_with_the_released_report_it_came_with(world: FakeFhir, make_gateway: MakeGateway) -> None:
    """Control: the same shape with a report the doctor may see keeps both, under either setting."""
    _with_its_report(world, REPORT, REPORT_PDF)
    for config in ({}, WITHHOLD):
        gateway = await make_gateway(world.base_url, **config)
        status, _, body = await call(gateway, "GET", f"/Patient/{c.PAT_ANA.split('/')[1]}/$everything")
        assert status == 200, body
        assert {REPORT["id"], REPORT_PDF["id"]} <= ids_in(body), config
