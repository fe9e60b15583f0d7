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
- One pass over the text's words, walking a trie keyed by whole words from each (a dict
  look-up per word, and one more per word of a phrase that goes on matching): the cost does
  not grow with the number of terms.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Generic, TypeVar

H = TypeVar("H")

_WORD = re.compile(r"[^\W_]+")
_NEGATING_PREFIX = "non"


def words(text: str) -> list[str]:
    """``text`` as the words terms are matched on (see the module's semantics)."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return _WORD.findall(text.casefold())


# In a trie node, the key under which the hits of the phrase ending there are kept (a word is
# never empty, so no word can be this key).
_END = ""


class TermMatcher(Generic[H]):
    """Phrases, each with what a match gives (``H``), compiled for ``scan``: a trie keyed by
    whole words, each node a dict (next word -> node; ``_END`` -> the hits of a phrase ending
    there)."""

    __slots__ = ("_root", "count")

    def __init__(self) -> None:
        self._root: dict[str, Any] = {}
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
        variants = [found]
        last = found[-1]
        if len(last) > 3 and last.isalpha() and not last.endswith("s"):
            variants.append([*found[:-1], last + "s"])
        for variant in variants:
            node = self._root
            for word in variant:
                node = node.setdefault(word, {})
            node.setdefault(_END, []).append(hit)
        return True

    def scan(self, text: str, out: list[H]) -> None:
        """Append to ``out`` what each term found in ``text`` gives (a term found twice gives twice)."""
        root = self._root
        found = words(text)
        for at, word in enumerate(found):
            node = root.get(word)
            if node is None or (at and found[at - 1] == _NEGATING_PREFIX):
                continue
            following = at + 1
            while True:
                hits = node.get(_END)
                if hits is not None:
                    out.extend(hits)
                if following == len(found):
                    break
                node = node.get(found[following])
                if node is None:
                    break
                following += 1
