"""In-process figures: decision cost per resource, memory per cached patient, body pipeline.

These run the gateway's own objects (rules, consent store, enforcement) on the workloads'
data, without sockets, so they isolate the consent work from the HTTP work.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from bench.upstream import ACTOR, W2_PATH, W3_PATH, Fixture, consents_for, everything, search_entries
from gateway.config import build_settings
from gateway.core.enforce import judge_resource
from gateway.core.labels import LabelIndex
from gateway.core.links import LinkRewriter
from gateway.core.model import Actor
from gateway.metrics import Metrics
from gateway.rules import load_rules
from gateway.sources.store import ConsentStore
from gateway.web.enforcement import ConsentEnforcement, policy_from

JSON = dict[str, Any]
PURPOSE = "TREAT"


class CannedSource:
    """A ConsentSource answering from serialized Consents, parsed per fetch like a real one."""

    def __init__(self, serialized: dict[str, bytes]) -> None:
        self.serialized = serialized

    async def fetch(self, patients: Sequence[str]) -> dict[str, list[JSON]]:
        return {p: orjson.loads(self.serialized[p]) if p in self.serialized else [] for p in patients}

    async def memberships(self, actor: str) -> frozenset[str]:
        return frozenset()

    async def store_consent(self, consent: JSON) -> str:
        raise NotImplementedError("the in-process figures record no emergency consents")


def _enforcement(labels: LabelIndex, source: CannedSource, max_patients: int) -> ConsentEnforcement:
    settings = build_settings({"upstream": {"url": "http://127.0.0.1:1/fhir"}})
    store = ConsentStore(
        source, Metrics(CollectorRegistry()), ttl_s=3600, max_patients=max_patients
    )
    return ConsentEnforcement(store, labels, policy_from(settings.consent, settings.sensitivity, labels))


def _best_of(runs: int, action: Callable[[], object]) -> float:
    """Fastest of ``runs`` timings of ``action`` in seconds (the least disturbed one)."""
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


async def decision_us_per_resource(labels: LabelIndex, passes: int) -> dict[str, float]:
    """Label extraction + decision per resource (consents cached), on W2's and W3's resources."""
    source = CannedSource({"Patient/p1": orjson.dumps(consents_for("Patient/p1", 0))})
    enforcement = _enforcement(labels, source, 10)
    looked = await enforcement.look_up(frozenset({"Patient/p1"}), Actor(ACTOR), PURPOSE)
    judge = enforcement.judge(looked)
    out: dict[str, float] = {}
    for name, resources in (("W2", search_entries("Patient/p1")), ("W3", everything())):

        def run(resources: list[JSON] = resources) -> None:
            for _ in range(passes):
                for resource in resources:
                    judge_resource(resource, judge)

        run()
        out[name] = _best_of(5, run) / (passes * len(resources)) * 1e6
    return out


async def bytes_per_cached_patient(labels: LabelIndex, patients: int) -> float:
    """Traced bytes the consent cache holds per patient with two compiled Consents each."""
    names = [f"Patient/m{n:06d}" for n in range(patients + 10)]
    source = CannedSource({p: orjson.dumps(consents_for(p, n)) for n, p in enumerate(names)})
    enforcement = _enforcement(labels, source, patients + 10)
    store = enforcement.store
    await store.get(names[:10])  # module-level caches and first-use allocations stay outside
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for start in range(10, patients + 10, 50):
        await store.get(names[start : start + 50])
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / patients


async def pipeline_us(labels: LabelIndex, base_url: str, runs: int) -> dict[str, dict[str, float]]:
    """The gateway's work on a W2 / W3 answer body (parse, enforce, serialize, rewrite links).

    Beside it, for scale: a whole-body orjson round trip and a stdlib ``json`` round trip.
    """
    fixture = Fixture(base_url, [], 0)
    source = CannedSource({"Patient/p1": orjson.dumps(consents_for("Patient/p1", 0))})
    enforcement = _enforcement(labels, source, 10)
    links = LinkRewriter(base_url, "http://gateway.example/fhir")
    actor = Actor(ACTOR)
    out: dict[str, dict[str, float]] = {}
    for name, path in (("W2", W2_PATH), ("W3", W3_PATH)):
        body = fixture.answers[path]

        async def gateway_once(body: bytes = body) -> None:
            parsed = orjson.loads(body)
            await enforcement.enforce(parsed, actor, PURPOSE, confined=frozenset({"Patient/p1"}))
            links.body(orjson.dumps(parsed))

        await gateway_once()
        best = float("inf")
        for _ in range(runs):
            started = time.perf_counter()
            await gateway_once()
            best = min(best, time.perf_counter() - started)

        def orjson_round_trip(body: bytes = body) -> None:
            orjson.dumps(orjson.loads(body))

        def stdlib_round_trip(body: bytes = body) -> None:
            json.dumps(json.loads(body)).encode()

        out[name] = {
            "gateway_us": best * 1e6,
            "orjson_round_trip_us": _best_of(runs, orjson_round_trip) * 1e6,
            "stdlib_json_round_trip_us": _best_of(runs, stdlib_round_trip) * 1e6,
        }
    return out


def measure(smoke: bool, base_url: str) -> dict[str, Any]:
    """Every in-process figure; smaller samples in smoke mode."""
    labels = load_rules()

    async def run() -> dict[str, Any]:
        return {
            "decision_us_per_resource": await decision_us_per_resource(labels, 2 if smoke else 20),
            "bytes_per_cached_patient": await bytes_per_cached_patient(labels, 200 if smoke else 2000),
            "pipeline": await pipeline_us(labels, base_url, 3 if smoke else 15),
        }

    return asyncio.run(run())
