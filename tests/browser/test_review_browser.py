"""The break-glass review page in a real browser: Debian's headless Chromium.

Skipped when chromium is not installed (``tests/browser/install.sh`` installs it as root).
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from gateway.demo.server import DemoFhirServer
from tests.officer.conftest import demo_fhir  # noqa: F401  (fixture)
from tests.officer.test_review_page import ER, break_glass
from tests.unit._util import MakeGateway

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
OPEN_ROW = (0xFF, 0xF3, 0xCD)  # the review page's background of a row not yet reviewed


async def chromium(profile: Path, *args: str, timeout_s: float = 60.0) -> bytes:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode == 0
    return out


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, ...]]]:
    """Width, height and RGB pixels of an 8-bit RGB/RGBA PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and color in (2, 6)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytearray] = []
    prev = bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        rows.append(line)
        prev = line
    pixels = [tuple(row[x * channels : x * channels + 3]) for row in rows for x in range(width)]
    return width, height, pixels


async def test_review_page_shows_the_demo_break_glass(
    demo_fhir: DemoFhirServer, make_gateway: MakeGateway, tmp_path: Path  # noqa: F811
) -> None:
    gw = await make_gateway(demo_fhir.base_url)
    event_id = await break_glass(gw)
    url = gw.admin_url + "/admin/break-glass"
    dom = (await chromium(tmp_path / "profile-dom", "--dump-dom", url)).decode()
    row = dom.split(f'id="event-{event_id}"', 1)[1].split("</tr>", 1)[0]
    for text in (ER, "Patient/pat-carol", "Medical emergency", "Condition/carol-pregnancy"):
        assert text in row
    shot = tmp_path / "review.png"
    await chromium(tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1200,700",
                   "--hide-scrollbars", url)
    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 700)
    assert len(set(pixels)) > 20, "the screenshot is blank"
    # The open emergency access is painted as a highlighted table row.
    assert sum(1 for p in pixels if p == OPEN_ROW) > 1000
