"""The pure core: standard library and orjson only, no I/O and no clock reads."""
