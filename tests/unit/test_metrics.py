"""Metric children bound once per label set still count into the registry's samples."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics


def test_bound_error_and_shadow_children_count_each_label_set_apart() -> None:
    metrics = Metrics(CollectorRegistry())
    for code in ("consent-denied", "http-404", "consent-denied", "internal-error", "consent-denied"):
        metrics.count_error(code)
    for decision in ("permit", "deny", "permit", "filtered", "permit"):
        metrics.count_shadow(decision)
    errors = {code: metrics.registry.get_sample_value("consent_gateway_errors_total", {"code": code})
              for code in ("consent-denied", "http-404", "internal-error", "shutting-down")}
    shadow = {d: metrics.registry.get_sample_value("consent_gateway_shadow_decisions_total", {"decision": d})
              for d in ("permit", "filtered", "deny")}
    assert errors == {"consent-denied": 3.0, "http-404": 1.0, "internal-error": 1.0, "shutting-down": None}
    assert shadow == {"permit": 3.0, "filtered": 1.0, "deny": 1.0}


def test_request_counters_bound_once_follow_every_method_interaction_and_status() -> None:
    metrics = Metrics(CollectorRegistry())
    for method, interaction, status in [("GET", "read", 200), ("GET", "read", 200), ("GET", "read", 404),
                                        ("BREW", "other", 405), ("POST", "batch", 200)]:
        metrics.observe_request(method, interaction, status, 0.002)
    value = metrics.registry.get_sample_value
    assert value("consent_gateway_requests_total", {"method": "GET", "interaction": "read", "code": "200"}) == 2.0
    assert value("consent_gateway_requests_total", {"method": "GET", "interaction": "read", "code": "404"}) == 1.0
    assert value("consent_gateway_requests_total", {"method": "other", "interaction": "other", "code": "405"}) == 1.0
    assert value("consent_gateway_request_duration_seconds_count", {"interaction": "read"}) == 3.0
