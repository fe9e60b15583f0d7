"""The embedded demo: a small in-memory FHIR server with demo patients, and its data set."""
