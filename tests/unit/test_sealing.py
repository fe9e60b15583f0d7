"""The seal of paging links (gateway.sealing): round trip, padding, tampering, keys, binding."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.sealing import (
    NONCE_BYTES, PADDED_MIN, SECRET_MIN, KeyFileError, PageSeal, decode_token, encode_token, read_secret, write_random_key,
)

BASE = "https://fhir.example.org/r4"
LINK = "/Condition?patient=Patient/pat-ana-5581&_count=10&_offset=13"


def _raw(token: str) -> bytes:
    raw = decode_token(token)
    assert raw is not None
    return raw


def _token(raw: bytes) -> str:
    return encode_token(raw)


@pytest.fixture
def seal() -> PageSeal:
    return PageSeal(b"k" * SECRET_MIN)


@pytest.mark.parametrize("relative", [LINK, "", "?_getpages=b7c1&_getpagesoffset=20", "/Observation?code=" + "é" * 40,
                                      "/x" * 300])
def test_a_sealed_link_opens_as_it_was(seal: PageSeal, relative: str) -> None:
    assert seal.open(seal.seal(relative, BASE), BASE) == relative


def test_a_token_is_url_safe_and_new_each_time(seal: PageSeal) -> None:
    first, second = seal.seal(LINK, BASE), seal.seal(LINK, BASE)
    assert first != second, "a random nonce each time: equal links do not give equal tokens"
    assert set(first + second) <= set("-._~"), "unreserved symbols only: sent back as they are"


def test_the_length_says_neither_the_digits_nor_a_continuation(seal: PageSeal) -> None:
    """An offset's digits (3, 13, 113, 1013) and the gateway's own continuation parameter do not
    change the token's length: every link up to PADDED_MIN bytes gives a token of one length."""
    links = [f"/Condition?patient=Patient/pat-ana-5581&_count=10&_offset={n}" for n in (3, 13, 113, 1013)]
    links += [link + "&gateway-skip=9999" for link in links] + ["", "?_getpages=b7c1&_getpagesoffset=20"]
    assert len({len(seal.seal(link, BASE)) for link in links}) == 1
    sizes = {}
    for size in (0, PADDED_MIN - 2, PADDED_MIN - 1, PADDED_MIN * 2 - 2, PADDED_MIN * 2, PADDED_MIN * 5):
        sizes[size] = len(_raw(seal.seal("a" * size, BASE))) - NONCE_BYTES - 16
    assert sizes == {0: PADDED_MIN, PADDED_MIN - 2: PADDED_MIN, PADDED_MIN - 1: PADDED_MIN * 2,
                     PADDED_MIN * 2 - 2: PADDED_MIN * 2, PADDED_MIN * 2: PADDED_MIN * 4, PADDED_MIN * 5: PADDED_MIN * 8}


def test_every_flipped_bit_is_refused(seal: PageSeal) -> None:
    raw = _raw(seal.seal(LINK, BASE))
    for index in range(len(raw)):
        tampered = bytearray(raw)
        tampered[index] ^= 0x01
        assert seal.open(_token(bytes(tampered)), BASE) is None, index


@pytest.mark.parametrize("token", ["", "not a token", "A" * 40, "%%%", "é", "A" * 20000, "AAAA" * 30])
def test_a_malformed_token_is_refused(seal: PageSeal, token: str) -> None:
    assert seal.open(token, BASE) is None


def test_a_cut_or_lengthened_token_is_refused(seal: PageSeal) -> None:
    token = seal.seal(LINK, BASE)
    assert seal.open(token[:-1], BASE) is None
    assert seal.open(token + "A", BASE) is None
    assert seal.open(token[:-4], BASE) is None
    assert seal.open(token[:100], BASE) is None


def test_another_key_does_not_open_it(seal: PageSeal) -> None:
    other = PageSeal(b"j" * SECRET_MIN)
    assert other.open(seal.seal(LINK, BASE), BASE) is None
    assert PageSeal.random().open(seal.seal(LINK, BASE), BASE) is None


def test_another_public_base_does_not_open_it(seal: PageSeal) -> None:
    """Bound to the base it was handed out under: another gateway's (or another Host's) token."""
    token = seal.seal(LINK, BASE)
    for base in ("https://fhir.example.org", "https://fhir.example.org/r4/", "http://fhir.example.org/r4",
                 "https://other.example.org/r4"):
        assert seal.open(token, base) is None, base


def test_the_same_secret_opens_it_anywhere(seal: PageSeal) -> None:
    """Replicas and workers under one secret open each other's links."""
    assert PageSeal(b"k" * SECRET_MIN).open(seal.seal(LINK, BASE), BASE) == LINK


def test_a_plaintext_of_another_version_is_refused() -> None:
    """What the key seals without the version byte and padding end (a future format) is not read."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    seal = PageSeal(b"k" * SECRET_MIN)
    aead = seal._aead  # noqa: SLF001 - the same key, writing a plaintext of another shape
    assert isinstance(aead, AESGCM)
    for plain in (b"\x02/Condition\x80", b"\x01/Condition", b"\x01\xff\xfe\x80"):
        plain += b"\x00" * (PADDED_MIN - len(plain))
        nonce = b"\x00" * NONCE_BYTES
        assert seal.open(_token(nonce + aead.encrypt(nonce, plain, BASE.encode())), BASE) is None


def test_a_key_file_is_read_and_checked(tmp_path: Path) -> None:
    good = tmp_path / "paging.key"
    good.write_text("  " + "s" * SECRET_MIN + "\n")
    assert read_secret(good) == b"s" * SECRET_MIN
    assert PageSeal.from_file(good).open(PageSeal(b"s" * SECRET_MIN).seal(LINK, BASE), BASE) == LINK
    short = tmp_path / "short.key"
    short.write_text("s" * (SECRET_MIN - 1))
    with pytest.raises(KeyFileError, match="at least 32"):
        read_secret(short)
    with pytest.raises(KeyFileError, match="cannot read"):
        read_secret(tmp_path / "missing.key")


def test_a_random_key_file_is_private_and_long_enough(tmp_path: Path) -> None:
    path = tmp_path / "paging.key"
    write_random_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(read_secret(path)) >= SECRET_MIN
    with pytest.raises(FileExistsError):
        write_random_key(path)
