"""The JSON-lines log: RFC 3339 UTC millisecond timestamps, the request id on every line
written while a request is handled, the audit id on a break-glass request's access line."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from gateway.web.middleware import JsonLogFormatter, log_line
from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.unit._util import MakeGateway

RFC3339_UTC_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


class Lines(logging.Handler):
    """Formats each record when it is emitted (as the stderr handler does) and keeps the line."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonLogFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(orjson.loads(self.format(record)))


@pytest.fixture
def log_lines() -> Iterator[Lines]:
    handler = Lines()
    root = logging.getLogger("gateway")
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


async def test_every_line_of_a_request_carries_its_id_and_a_millisecond_utc_time(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, log_lines: Lines
) -> None:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_out(c.PAT_BEN))
    gw: GatewayUnderTest = await make_gateway(fake_fhir.base_url)
    resp = await gw.get(f"/Observation?patient={c.PAT_BEN}", actor=c.DOCTOR, **{"X-Request-Id": "req-filtered-1"})
    await resp.read()
    lines = [line for line in log_lines.lines if line["logger"] != "gateway.changes"]
    loggers = {line["logger"] for line in lines}
    assert {"gateway.access", "gateway.decision"} <= loggers, lines  # the access and the decision line
    for line in lines:
        assert line["request_id"] == "req-filtered-1", line
        assert RFC3339_UTC_MS.match(line["ts"]), line["ts"]


async def test_break_glass_access_line_names_the_audit_event(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, log_lines: Lines
) -> None:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_out(c.PAT_BEN))
    gw: GatewayUnderTest = await make_gateway(fake_fhir.base_url)
    resp = await gw.get(f"/Observation?patient={c.PAT_BEN}", actor=c.DOCTOR, **{"X-Break-Glass": "Medical emergency"})
    await resp.read()
    assert resp.status == 200
    (access,) = [line for line in log_lines.lines if line["logger"] == "gateway.access"]
    assert access["audit_id"] == resp.headers["X-Break-Glass-Audit-Id"]
    assert access["request_id"] == resp.headers["X-Request-Id"]
    stored = [line for line in log_lines.lines if line["msg"] == "emergency consent stored"]
    assert stored and stored[0]["request_id"] == resp.headers["X-Request-Id"]


def test_timestamps_are_utc_with_milliseconds_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        record = logging.LogRecord("gateway", logging.INFO, __file__, 1, "x", None, None)
        record.created, record.msecs = 1_780_000_000.0421, 42.1
        line = orjson.loads(JsonLogFormatter().format(record))
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert line["ts"] == "2026-05-28T20:26:40.042Z"


def test_every_logged_field_comes_from_extra_and_none_is_left_out() -> None:
    bare = logging.LogRecord("gateway", logging.INFO, __file__, 1, "x", None, None)
    # The formatter reads the fields from the record's own dict: none may shadow a record attribute.
    assert not [name for name in JsonLogFormatter.FIELDS if hasattr(bare, name)]
    given = {name: f"v-{name}" for name in JsonLogFormatter.FIELDS}
    record = logging.makeLogRecord({**bare.__dict__, **given, "status": None})
    line = orjson.loads(JsonLogFormatter().format(record))
    assert {k: v for k, v in line.items() if k in given} == {k: v for k, v in given.items() if k != "status"}
    assert list(line)[4:] == [name for name in JsonLogFormatter.FIELDS if name != "status"]


def test_a_hot_path_line_is_the_line_info_with_extra_writes(log_lines: Lines) -> None:
    fields: dict[str, object] = {"request_id": "r-1", "method": "GET", "status": 200, "decision": "permit",
                                 "released": {"Observation": 1}, "audit_id": None}
    logger = logging.getLogger("gateway.access")
    logger.info("request", extra=fields)
    log_line(logger, "request", fields)
    logger.setLevel(logging.WARNING)
    try:
        log_line(logger, "request", fields)  # below the logger's level: nothing is written
    finally:
        logger.setLevel(logging.NOTSET)
    by_info, by_line = ({k: v for k, v in line.items() if k != "ts"} for line in log_lines.lines)
    assert by_info == by_line == {"level": "info", "logger": "gateway.access", "msg": "request", "request_id": "r-1",
                                  "method": "GET", "status": 200, "decision": "permit", "released": {"Observation": 1}}
    assert len(log_lines.lines) == 2


def test_the_access_lines_duration_is_milliseconds_rounded_to_three_places(log_lines: Lines) -> None:
    import random

    from gateway.web.middleware import RequestInfo
    from gateway.web.proxy import log_access

    draw = random.Random(19)
    samples = [0.0, 0.0005, 0.0015, 0.0123456, 1.0, 29.9999996] + [
        draw.random() * draw.choice((0.001, 0.01, 0.1, 1.0, 30.0)) for _ in range(2000)
    ]
    for seconds in samples:
        log_access("GET", RequestInfo("r-1", 0.0), 200, seconds)
    assert [line["duration_ms"] for line in log_lines.lines] == [round(s * 1000, 3) for s in samples]


@pytest.mark.parametrize(("created", "msecs", "tail"), [
    (1_780_000_000.0, 0.0, "40.000Z"), (1_780_000_000.007, 7.9, "40.007Z"), (1_780_000_000.9999, 999.9, "40.999Z"),
    (1_780_000_001.5, 500.0, "41.500Z"),
])
def test_each_millisecond_is_written_with_three_digits(created: float, msecs: float, tail: str) -> None:
    formatter = JsonLogFormatter()
    record = logging.LogRecord("gateway", logging.INFO, __file__, 1, "x", None, None)
    record.created, record.msecs = created, msecs
    assert orjson.loads(formatter.format(record))["ts"] == f"2026-05-28T20:26:{tail}"


async def test_an_unhandled_error_is_logged_by_type_and_place_never_by_its_message(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, log_lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error nobody expected may carry the record it was handling in its message (a KeyError
    of a code, a ValueError quoting a reference): the log names its type and the code it passed
    through, the answer is a bare 500, and neither quotes the message."""
    import gateway.web.proxy as proxy

    secret = "Condition/hiv-secret B20"

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"cannot read {secret}")

    monkeypatch.setattr(proxy, "link_rewriter", broken)
    c.seed_all(fake_fhir)
    gw: GatewayUnderTest = await make_gateway(fake_fhir.base_url)
    resp = await gw.get(f"/Observation?patient={c.PAT_BEN}", actor=c.DOCTOR)
    body = await resp.read()
    assert resp.status == 500 and secret.encode() not in body
    errors = [line for line in log_lines.lines if line["msg"].startswith("unhandled error")]
    assert len(errors) == 1, log_lines.lines
    assert errors[0]["msg"] == "unhandled error: ValueError"
    assert any(place.endswith(" broken") for place in errors[0]["where"]), errors[0]
    assert all(secret not in orjson.dumps(line).decode() for line in log_lines.lines)


@pytest.fixture
def json_stream() -> Iterator[tuple[logging.Logger, Any]]:
    """The gateway's own set-up (``configure_logging``) on a stream the test reads; the test
    calls ``only_ours`` first, as pytest adds its capturing handlers after the fixtures."""
    import io

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger("gateway")
    saved = root.handlers[:], root.level, root.propagate
    root.setLevel(logging.INFO)
    root.propagate = False
    root.handlers[:] = [handler]
    yield root, stream
    root.handlers[:], root.level, root.propagate = saved


def only_ours(root: logging.Logger) -> None:
    root.handlers[:] = [h for h in root.handlers if type(h) is logging.StreamHandler]


def test_a_hot_path_line_written_straight_to_the_stream_is_the_line_logging_writes(
    json_stream: tuple[logging.Logger, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, stream = json_stream
    only_ours(root)
    fields: dict[str, object] = {"status": 200, "request_id": "r-1", "method": "GET", "released": {"Observation": 1},
                                 "decision": "permit", "audit_id": None}
    logger = logging.getLogger("gateway.access")
    made: list[logging.LogRecord] = []
    real = logging.Logger.makeRecord
    monkeypatch.setattr(logging.Logger, "makeRecord", lambda self, *a, **k: made.append(real(self, *a, **k)) or made[-1])
    log_line(logger, "request", fields)
    assert made == []  # no LogRecord on the way
    logger.info("request", extra=fields)
    direct, by_logging = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert RFC3339_UTC_MS.match(direct["ts"]) and list(direct) == list(by_logging)
    assert {k: v for k, v in direct.items() if k != "ts"} == {k: v for k, v in by_logging.items() if k != "ts"}
    assert list(direct)[4:] == ["request_id", "method", "status", "decision", "released"]  # FIELDS' order


@pytest.mark.parametrize("where", ["logger filter", "handler filter", "second handler", "handler level", "propagates"])
def test_a_hot_path_line_goes_through_logging_wherever_a_handler_or_filter_may_act(
    json_stream: tuple[logging.Logger, Any], where: str
) -> None:
    root, stream = json_stream
    only_ours(root)
    logger = logging.getLogger("gateway.decision")
    seen = Lines()
    undo: list[Any] = []
    if where == "logger filter":
        dropping = logging.Filter("nothing")  # lets no "gateway.*" record through
        logger.addFilter(dropping)
        undo.append(lambda: logger.removeFilter(dropping))
    elif where == "handler filter":
        dropping = logging.Filter("nothing")
        root.handlers[0].addFilter(dropping)
        undo.append(lambda: root.handlers[0].removeFilter(dropping))
    elif where == "second handler":
        root.addHandler(seen)
    elif where == "handler level":
        root.handlers[0].setLevel(logging.WARNING)
    else:
        root.propagate = True
        logging.getLogger().addHandler(seen)
        undo.append(lambda: logging.getLogger().removeHandler(seen))
    try:
        log_line(logger, "decision", {"request_id": "r-2", "decision": "deny"})
    finally:
        for step in undo:
            step()
    written = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    if where in ("logger filter", "handler filter", "handler level"):
        assert written == []
    else:
        assert [line["request_id"] for line in written] == ["r-2"]
        assert [line["request_id"] for line in seen.lines] == ["r-2"]


def test_an_error_the_event_loop_catches_is_one_line_by_type_and_place_never_its_message(log_lines: Lines) -> None:
    """asyncio's own handler prints the error's message, the callback with its arguments and a
    traceback on stderr; any of them may quote the record being handled."""
    from gateway.app import loop_error

    secret = "Condition/hiv-secret B20"
    try:
        raise KeyError(secret)
    except KeyError as exc:
        error = exc
    loop_error(None, {"message": f"Exception in callback handle({secret!r})", "exception": error})  # type: ignore[arg-type]
    loop_error(None, {"message": f"Task was destroyed: {secret}"})  # type: ignore[arg-type]
    first, second = log_lines.lines
    assert first["msg"] == "event loop error: KeyError" and first["level"] == "error"
    assert any("test_logging.py" in place for place in first["where"])
    assert second["msg"] == "event loop error"
    assert secret not in orjson.dumps(log_lines.lines).decode()


async def test_the_serving_loop_logs_its_errors_by_type() -> None:
    import asyncio
    import os
    import signal

    from gateway.app import loop_error, until_signalled

    waiting = asyncio.ensure_future(until_signalled())
    await asyncio.sleep(0)
    try:
        assert asyncio.get_running_loop().get_exception_handler() is loop_error
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(waiting, 5)
        asyncio.get_running_loop().set_exception_handler(None)
