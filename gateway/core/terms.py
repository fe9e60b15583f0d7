"""Sensitive terms found in text: the words of a concept that carries no standard code.

A term list (``rules/terms-*.yaml``) names phrases; ``TermMatcher`` finds them in a text.

Semantics:
- Text and terms are read alike (``words``): compatibility forms folded (NFKC), case folded,
  and split into runs of letters and digits, so that every other character (blanks, hyphens,
  apostrophes, brackets, slashes) only separates words: ``HIV-1 RNA`` is ``hiv 1 rna``,
  ``Alzheimer's`` is ``alzheimer s``, ``Buprenorphine/naloxone`` is ``buprenorphine naloxone``.
- A term matches where its words stand in the text, one after the other, whole: ``hiv`` matches
  ``Anti-HIV antibody`` and not ``archive``; ``opioid use disorder`` matches ``Opioid use
  disorder, moderate``. The last word of a term, when a word of letters longer than three,
  also matches with an ``s`` after it (``opioid use disorders``).
- A match right after the word ``non`` does not count (``Non-alcoholic fatty liver``: the
  prefix turns the word into its opposite). No other negation is read: ``HIV test negative``
  names HIV and matches ``hiv`` (a test for HIV is itself what HIV-testing laws protect).
- One pass over the text's words, one dict look-up per word (a trie keyed by whole words):
  the cost does not grow with the number of terms.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Generic, TypeVar

H = TypeVar("H")

_WORD = re.compile(r"[^\W_]+")
_NEGATING_PREFIX = "non"


def words(text: str) -> list[str]:
    """``text`` as the words terms are matched on (see the module's semantics)."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return _WORD.findall(text.casefold())


class TermMatcher(Generic[H]):
    """Phrases, each with what a match gives (``H``), compiled for ``scan``."""

    __slots__ = ("_first", "count")

    def __init__(self) -> None:
        # first word -> (the words after it, what a match gives)
        self._first: dict[str, list[tuple[tuple[str, ...], H]]] = {}
        self.count = 0

    def __bool__(self) -> bool:
        return self.count > 0

    def add(self, term: str, hit: H) -> bool:
        """Add ``term`` (False when it has no word); its plural (an ``s`` after its last word,
        when that is a word of letters longer than three) is added with it."""
        found = words(term)
        if not found:
            return False
        self.count += 1
        variants = [tuple(found)]
        if len(found[-1]) > 3 and found[-1].isalpha() and not found[-1].endswith("s"):
            variants.append((*found[:-1], found[-1] + "s"))
        for variant in variants:
            self._first.setdefault(variant[0], []).append((variant[1:], hit))
        return True

    def scan(self, text: str, out: list[H]) -> None:
        """Append to ``out`` what each term found in ``text`` gives (a term found twice gives twice)."""
        first = self._first
        found = words(text)
        for at, word in enumerate(found):
            candidates = first.get(word)
            if candidates is None or (at and found[at - 1] == _NEGATING_PREFIX):
                continue
            for rest, hit in candidates:
                if not rest or tuple(found[at + 1:at + 1 + len(rest)]) == rest:
                    out.append(hit)
