"""Consent sources behind one interface, with the TTL cache of compiled consents."""
