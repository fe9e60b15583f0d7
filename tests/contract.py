"""Names the external contract fixes, shared by the tests that check them."""

# CONTRACT §8, as exposed names and their Prometheus types.
CONTRACT_METRICS = {
    "consent_gateway_requests_total": "counter",
    "consent_gateway_request_duration_seconds": "histogram",
    "consent_gateway_upstream_duration_seconds": "histogram",
    "consent_gateway_decisions_total": "counter",
    "consent_gateway_resources_filtered_total": "counter",
    "consent_gateway_consent_cache_hits_total": "counter",
    "consent_gateway_consent_cache_misses_total": "counter",
    "consent_gateway_consent_cache_entries": "gauge",
    "consent_gateway_consent_lookup_errors_total": "counter",
    "consent_gateway_break_glass_total": "counter",
    # CONTRACT §5: untyped roots with conditions, so producers can be asked to add a type.
    "consent_gateway_ambiguous_consents_total": "counter",
}
