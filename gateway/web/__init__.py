"""The HTTP side: middleware, the FHIR proxy handler and the admin endpoints."""
