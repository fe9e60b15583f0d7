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

# Appends 40 KiB events, one at a time and in bursts that share one write, and goes on until
# the other writer has written some too: so the two surely overlap, however they are scheduled.
WRITER = """
import asyncio, sys, uuid
from pathlib import Path
from gateway.audit import AuditLog

async def main(path, name, other):
    log = AuditLog(Path(path))
    log.open()
    progress, theirs = Path(path + "." + name), Path(path + "." + other)
    n = 0
    def event():
        nonlocal n
        n += 1
        return {"resourceType": "AuditEvent", "id": str(uuid.uuid4()), "outcomeDesc": name * 40960, "n": n - 1}
    while n < 5000:
        if n % 10 == 9:
            await asyncio.gather(*(log.append(event()) for _ in range(8)))
        else:
            await log.append(event())
        progress.write_text(str(n))
        if n >= 60:
            if theirs.exists() and int(theirs.read_text() or 0) >= 20:
                break
            await asyncio.sleep(0.02)  # the other is slow to start: wait for it, writing slowly
    log.close()
    print(n)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_two_processes_appending_large_lines_leave_only_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRITER, str(path), name, other, stdout=asyncio.subprocess.PIPE,
        )
        for name, other in (("a", "b"), ("b", "a"))
    ]
    outputs = [await asyncio.wait_for(w.communicate(), 120) for w in writers]
    assert [w.returncode for w in writers] == [0, 0]
    written = {name: int(out) for name, (out, _) in zip("ab", outputs)}
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    events = [orjson.loads(line) for line in raw.splitlines()]
    assert len(events) == len({e["id"] for e in events}) == sum(written.values())
    names = [e["outcomeDesc"][0] for e in events]
    assert sum(x != y for x, y in zip(names, names[1:])) >= 2  # the writers overlapped
    for name in "ab":
        assert [e["n"] for e in events if e["outcomeDesc"] == name * 40960] == list(range(written[name]))


def test_a_process_opening_the_file_during_anothers_write_adds_no_empty_line(tmp_path: Path) -> None:
    """Found by CI: a worker that opened the file while another's write was in progress saw a
    line without its newline (the size grows as the write goes), took it for one a crash cut
    short, and ended it: an empty line after the other's. The repair now waits for writes."""
    import fcntl
    import os
    import threading

    from gateway.audit import AuditLog

    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"a":1}\n{"b":')  # another process's write, half done
    other = os.open(path, os.O_WRONLY | os.O_APPEND)
    fcntl.flock(other, fcntl.LOCK_SH)  # as AuditLog holds it while writing
    log = AuditLog(path)
    opened = threading.Thread(target=log.open)
    opened.start()
    opened.join(0.3)
    assert opened.is_alive()  # waits for the write in progress
    os.write(other, b"2}\n")
    fcntl.flock(other, fcntl.LOCK_UN)
    os.close(other)
    opened.join(5)
    log.close()
    assert path.read_bytes() == b'{"a":1}\n{"b":2}\n'


def test_a_line_a_crash_cut_short_is_still_ended_at_open(tmp_path: Path) -> None:
    from gateway.audit import AuditLog

    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"a":1}\n{"b":')
    log = AuditLog(path)
    log.open()
    log.close()
    assert path.read_bytes() == b'{"a":1}\n{"b":\n'
