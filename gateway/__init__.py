"""FHIR Consent Gateway: a consent-enforcing reverse proxy for FHIR R4 servers."""

__version__ = "0.1.0"
