"""The Grafana dashboard: valid JSON, every query over CONTRACT §8 metrics, every required view."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics
from tests.contract import CONTRACT_METRICS

from .support import DASHBOARD

# Series names a query may select: a histogram is queried through its _bucket/_sum/_count.
QUERYABLE = {
    series
    for name, kind in CONTRACT_METRICS.items()
    for series in ([f"{name}_bucket", f"{name}_sum", f"{name}_count"] if kind == "histogram" else [name])
}

PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile",
    "clamp_min", "label_values", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that can only be metric names."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # label values, regexes
    stripped = re.sub(r"label_values\(([^,()]+),\s*\w+\)", r"\1", stripped)  # Grafana: (metric, label)
    stripped = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", stripped)  # matchers, range selectors
    stripped = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", stripped)
    identifiers = set(re.findall(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", stripped))
    return identifiers - PROMQL_WORDS


def _panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return [t["expr"] for p in _panels() for t in p["targets"]] + queries


def test_metric_name_extraction_catches_foreign_metrics() -> None:
    expr = 'sum by (le) (rate(process_cpu_seconds_total{job=~"$job"}[5m])) / on (instance) up'
    assert metric_names(expr) == {"process_cpu_seconds_total", "up"}
    assert metric_names("label_values(consent_gateway_requests_total, job)") == {"consent_gateway_requests_total"}
    assert metric_names("histogram_quantile(0.95, sum by (le, interaction) (rate(x_bucket[$__rate_interval])))") == {
        "x_bucket"
    }


def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "consent-gateway"
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "job"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in _panels():
        # Bound to the data source variable so the dashboard imports into any Grafana.
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]


@pytest.mark.parametrize("expr", _expressions())
def test_every_query_uses_only_contract_metrics(expr: str) -> None:
    names = metric_names(expr)
    assert names, f"no metric in {expr!r}"
    assert names <= QUERYABLE, f"not in CONTRACT §8: {sorted(names - QUERYABLE)}"


def test_every_contract_metric_is_exported_by_the_gateway() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    exported = {
        family.name + ("_total" if family.type == "counter" else ""): family.type for family in registry.collect()
    }
    assert {name: exported.get(name) for name in CONTRACT_METRICS} == CONTRACT_METRICS


def test_legends_only_name_labels_the_query_keeps() -> None:
    for panel in _panels():
        for target in panel["targets"]:
            legend_labels = set(re.findall(r"\{\{(\w+)\}\}", target["legendFormat"]))
            kept = {
                label.strip()
                for group in re.findall(r"\bby\s*\(([^)]*)\)", target["expr"])
                for label in group.split(",")
            }
            assert legend_labels <= kept, (panel["title"], target["expr"])


def _has(predicate: Callable[[str], bool]) -> bool:
    return any(predicate(" ".join(expr.split())) for expr in _expressions())


REQUIRED_VIEWS: dict[str, Callable[[str], bool]] = {
    "request rate by interaction": lambda e: "by (interaction)" in e
    and "rate(consent_gateway_requests_total" in e,
    "latency quantile by interaction": lambda e: e.startswith("histogram_quantile(")
    and "by (le, interaction)" in e
    and "consent_gateway_request_duration_seconds_bucket" in e,
    "decisions by decision": lambda e: "by (decision)" in e and "consent_gateway_decisions_total" in e,
    "filtered resources by reason": lambda e: "by (reason)" in e and "consent_gateway_resources_filtered_total" in e,
    "cache hit ratio": lambda e: re.search(
        r"consent_gateway_consent_cache_hits_total.*\) / \(.*consent_gateway_consent_cache_hits_total"
        r".*\+.*consent_gateway_consent_cache_misses_total",
        e,
    )
    is not None,
    "lookup errors": lambda e: "consent_gateway_consent_lookup_errors_total" in e,
    "break-glass by reason": lambda e: "by (reason)" in e and "consent_gateway_break_glass_total" in e,
}


@pytest.mark.parametrize("view", REQUIRED_VIEWS)
def test_dashboard_has_every_required_view(view: str) -> None:
    assert _has(REQUIRED_VIEWS[view]), view
