"""Sealed paging links: the gateway's own link to a further page, as an opaque token.

A token is ``nonce || AES-256-GCM(plaintext)`` written in the four unreserved URL symbols
``-._~`` (``TOKEN_ALPHABET``, two bits each): no letter or digit, so a token never spells an
id, a code or a word by chance (``B20``, ``HIV``, ``1819``), whatever a scanner searches the
answer for, in any case; a client sends it back as it got it (no percent-encoding). The
plaintext is a version byte and the link relative to the gateway's public base (its path and
query), padded (ISO/IEC 7816-4: ``0x80`` then zeros) to ``PADDED_MIN`` bytes, or to the next
power of two above it for a longer link: a token's length tells neither an offset's digits nor
whether the gateway continues inside a page (``gateway-skip``), unless the link is longer than
``PADDED_MIN`` bytes and the difference crosses a power of two. The associated data is the public base the
link was handed out under: a token opens only at the base that made it, under the key that
made it (``enforcement.paging_key_file``, shared by every worker and replica of a gateway).

The AES key is derived from the key file's secret with HKDF-SHA256, so any secret of at least
``SECRET_MIN`` bytes will do (``openssl rand -base64 48``). One ``AESGCM`` object per process.
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = b"\x01"
PADDED_MIN = 256
NONCE_BYTES = 12
SECRET_MIN = 32
_INFO = b"consent-gateway paging links v1"
_TAG_BYTES = 16
# A token longer than any URL the gateway accepts is refused before it is decoded.
TOKEN_MAX = 16384
# Two bits per symbol: each hex digit of the sealed bytes is two symbols.
TOKEN_ALPHABET = "-._~"
_PAIRS = [a + b for a in TOKEN_ALPHABET for b in TOKEN_ALPHABET]
_WRITTEN = str.maketrans({digit: _PAIRS[int(digit, 16)] for digit in "0123456789abcdef"})
_READ = str.maketrans({symbol: str(value) for value, symbol in enumerate(TOKEN_ALPHABET)})
_TOKEN = re.compile(r"[-._~]+")


class KeyFileError(ValueError):
    """The key file cannot be read or holds too short a secret (the message says which)."""


class PageSeal:
    """Seals and opens the gateway's paging links under one key (module docstring)."""

    __slots__ = ("_aead",)

    def __init__(self, secret: bytes) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(secret)
        self._aead = AESGCM(key)

    @classmethod
    def random(cls) -> PageSeal:
        """A seal under a key made now (one process, or a supervisor that hands it on)."""
        return cls(os.urandom(SECRET_MIN))

    @classmethod
    def from_file(cls, path: Path) -> PageSeal:
        """A seal under the secret the file holds (surrounding whitespace aside); KeyFileError
        when it cannot be read or holds fewer than ``SECRET_MIN`` bytes."""
        return cls(read_secret(path))

    def seal(self, relative: str, bound: str) -> str:
        """The token of ``relative`` (a link's path and query under the public base ``bound``)."""
        plain = VERSION + relative.encode("utf-8") + b"\x80"
        plain += b"\x00" * (padded_size(len(plain)) - len(plain))
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, plain, bound.encode("utf-8"))
        return encode_token(sealed)

    def open(self, token: str, bound: str) -> str | None:
        """The relative link a token sealed under the public base ``bound``; None when it does
        not open (malformed, tampered with, another key, another base, another version)."""
        if len(token) > TOKEN_MAX:
            return None
        sealed = decode_token(token)
        if sealed is None:
            return None
        if len(sealed) < NONCE_BYTES + _TAG_BYTES + PADDED_MIN:
            return None
        try:
            plain = self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], bound.encode("utf-8"))
        except InvalidTag:
            return None
        body = plain.rstrip(b"\x00")
        if not body.startswith(VERSION) or not body.endswith(b"\x80"):
            return None
        try:
            return body[1:-1].decode("utf-8")
        except UnicodeDecodeError:
            return None


def encode_token(sealed: bytes) -> str:
    """``sealed`` in ``TOKEN_ALPHABET``, four symbols per byte, most significant bits first."""
    return sealed.hex().translate(_WRITTEN)


def decode_token(token: str) -> bytes | None:
    """The bytes a token written by ``encode_token`` holds; None when it is not one."""
    if not token or len(token) % 4 or _TOKEN.fullmatch(token) is None:
        return None
    return int(token.translate(_READ), 4).to_bytes(len(token) // 4, "big")


def padded_size(size: int) -> int:
    """The plaintext size a link of ``size`` bytes (version and padding end included) is padded to."""
    padded = PADDED_MIN
    while padded < size:
        padded *= 2
    return padded


def read_secret(path: Path) -> bytes:
    """The secret a key file holds (surrounding whitespace aside); KeyFileError otherwise."""
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file: {exc.strerror or exc}") from None
    if len(secret) < SECRET_MIN:
        raise KeyFileError(f"the key file holds {len(secret)} bytes; a secret of at least {SECRET_MIN} is needed")
    return secret


def write_random_key(path: Path) -> None:
    """A new random secret in a file only its owner may read (a supervisor's, for its workers)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(base64.b64encode(os.urandom(48)) + b"\n")
