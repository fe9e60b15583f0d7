"""What is computed from a text alone, remembered under that text, within bounds."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


def text_size(key: Hashable) -> int:
    """The bytes of text a key holds (a text, or a tuple of names and texts)."""
    if isinstance(key, bytes):
        return len(key)
    if isinstance(key, tuple):
        return sum(len(part) for part in key if isinstance(part, bytes))
    return 0


class TextMemo(Generic[V]):
    """Values by text key, bounded by their number and by the bytes of text their keys hold;
    cleared whole when either bound would be passed."""

    __slots__ = ("entries", "held", "max_entries", "max_bytes")

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.entries: dict[Hashable, V] = {}
        self.held = 0  # bytes of text the keys hold
        self.max_entries, self.max_bytes = max_entries, max_bytes

    def get(self, key: Hashable) -> V | None:
        return self.entries.get(key)

    def put(self, key: Hashable, value: V) -> None:
        size = text_size(key)
        if len(self.entries) >= self.max_entries or self.held + size > self.max_bytes:
            self.clear()
        self.entries[key] = value
        self.held += size

    def clear(self) -> None:
        self.entries.clear()
        self.held = 0

    def __len__(self) -> int:
        return len(self.entries)
