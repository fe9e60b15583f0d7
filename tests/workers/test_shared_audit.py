"""Several worker processes append to one audit file (README "Several worker processes").

Each batch of AuditEvents is one ``write(2)`` on an ``O_APPEND`` descriptor; Linux applies it
whole at the end of a file on a local file system, whatever its size (``PIPE_BUF`` bounds
atomic writes to pipes, not to files). Two processes writing 40 KiB lines at once must leave
only whole lines.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson

WRITER = """
import asyncio, sys, uuid
from pathlib import Path
from gateway.audit import AuditLog

async def main(path, name):
    log = AuditLog(Path(path))
    log.open()
    sys.stdin.readline()  # both writers start together
    for i in range(60):
        await log.append({"resourceType": "AuditEvent", "id": str(uuid.uuid4()),
                          "outcomeDesc": name * 40960, "n": i})
    # and a burst: concurrent appends share one write of about 1 MiB
    await asyncio.gather(*(log.append({"resourceType": "AuditEvent", "id": str(uuid.uuid4()),
                                       "outcomeDesc": name * 40960, "n": 60 + i}) for i in range(25)))
    log.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_two_processes_appending_large_lines_leave_only_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writers = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER, str(path), name, stdin=asyncio.subprocess.PIPE)
        for name in ("a", "b")
    ]
    for writer in writers:
        assert writer.stdin is not None
        writer.stdin.write(b"go\n")
        await writer.stdin.drain()
    assert [await asyncio.wait_for(w.wait(), 120) for w in writers] == [0, 0]
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    events = [orjson.loads(line) for line in raw.splitlines()]
    assert len(events) == len({e["id"] for e in events}) == 170
    names = [e["outcomeDesc"][0] for e in events]
    assert sum(x != y for x, y in zip(names, names[1:])) >= 2  # the writers did overlap
    for name in ("a", "b"):
        mine = [e["n"] for e in events if e["outcomeDesc"] == name * 40960]
        assert sorted(mine) == list(range(85))
