"""Request ids, timing, access log, and the one place errors become OperationOutcomes."""

from __future__ import annotations

import logging
import os
import re
import time
import traceback
from contextvars import ContextVar
from dataclasses import dataclass
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.core.errors import GatewayError
from gateway.core.fhir import operation_outcome
from gateway.metrics import Metrics

FHIR_JSON = "application/fhir+json"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

log = logging.getLogger("gateway.error")


@dataclass
class RequestInfo:
    """What the access log and metrics need to know about one request."""

    request_id: str
    started: float
    interaction: str = "other"
    resource_type: str | None = None
    actor: str | None = None
    purpose: str | None = None
    decision: str | None = None
    audit_id: str | None = None  # the break-glass AuditEvent of this request, if any


# The id of the request being handled, for every log line written while handling it.
CURRENT_REQUEST_ID: ContextVar[str | None] = ContextVar("gateway_request_id", default=None)

INFO = web.RequestKey("gateway_request_info", RequestInfo)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# aiohttp's own HTTP errors mapped to FHIR issue codes.
_HTTP_ISSUE_CODES = {400: "invalid", 404: "not-found", 405: "not-supported", 413: "too-costly"}


# The version (4) and variant (RFC 4122) bits of a random UUID, as uuid.UUID(version=4) sets them.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


class _RandomPool:
    """Random bytes from os.urandom, read 4 KiB at a time: one system call per 256 ids.
    A forked process starts with an empty pool, so no two processes hand out the same bytes."""

    SIZE = 4096

    def __init__(self) -> None:
        self._bytes = b""
        self._at = 0

    def empty(self) -> None:
        self._bytes, self._at = b"", 0

    def take16(self) -> bytes:
        at = self._at
        if at + 16 > len(self._bytes):
            self._bytes, at = os.urandom(self.SIZE), 0
        self._at = at + 16
        return self._bytes[at:at + 16]


_RANDOM = _RandomPool()
os.register_at_fork(after_in_child=_RANDOM.empty)


def fresh_request_id() -> str:
    """A random UUID4 as 32 hex digits: ``uuid.uuid4().hex`` without building a UUID object or
    making a system call, which cost three times as much on every request that brings no id."""
    return "%032x" % ((int.from_bytes(_RANDOM.take16(), "big") & _UUID4_CLEAR) | _UUID4_SET)


def fresh_uuid() -> str:
    """A random UUID4 in its canonical form (``str(uuid.uuid4())``), from the same pool."""
    h = fresh_request_id()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def request_id_of(request: web.Request) -> str:
    """The caller's X-Request-Id when it is a sane token, else a fresh one."""
    given = request.headers.get("X-Request-Id")
    return given if given and _REQUEST_ID_OK.match(given) else fresh_request_id()


def error_response(
    status: int, issue_code: str, message: str, detail_code: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An OperationOutcome answer; the only constructor of error bodies."""
    body = orjson.dumps(operation_outcome("error", issue_code, message, detail_code))
    return web.Response(status=status, body=body, content_type=FHIR_JSON, headers=headers)


def _from_http_exception(exc: web.HTTPException) -> web.Response:
    status = exc.status
    issue = _HTTP_ISSUE_CODES.get(status, "processing")
    if status == 413:
        return error_response(413, issue, "The request body is too large.", "payload-too-large")
    message = {404: "Not found.", 405: "Method not allowed."}.get(status, exc.reason or "Error.")
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return error_response(status, issue, message, f"http-{status}", headers)


def code_locations(exc: BaseException, last: int = 12) -> list[str]:
    """The code an exception passed through (``file:line function``, innermost last): its
    message and the values it carries are left out."""
    return [f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
            for frame in traceback.extract_tb(exc.__traceback__)[-last:]]


def build_error_middleware(metrics: Metrics) -> Middleware:
    """Middleware turning every exception into an application/fhir+json OperationOutcome."""

    @web.middleware
    async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except GatewayError as exc:
            metrics.count_error(exc.code)
            return error_response(exc.status, exc.issue_code, exc.message, exc.code, exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            metrics.count_error(f"http-{exc.status}")
            return _from_http_exception(exc)
        except Exception as exc:
            # SECURITY: where it happened goes to the log only, and never the error's message or
            # values (they may quote the record being handled); the body says nothing of internals.
            info = request.get(INFO)
            log.error(f"unhandled error: {type(exc).__name__}",
                      extra={"request_id": info.request_id if info else None, "where": code_locations(exc)})
            metrics.count_error("internal-error")
            return error_response(500, "exception", "Internal error.", "internal-error")

    return error_middleware


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Assign the request id and start the clock before anything else runs."""
    info = RequestInfo(request_id_of(request), time.perf_counter())
    request[INFO] = info
    token = CURRENT_REQUEST_ID.set(info.request_id)
    try:
        response = await handler(request)
    finally:
        CURRENT_REQUEST_ID.reset(token)
    response.headers["X-Request-Id"] = info.request_id
    return response


def log_line(logger: logging.Logger, message: str, fields: dict[str, object]) -> None:
    """``logger.info(message, extra=fields)`` for the lines written on every request (the
    callers' keys are JsonLogFormatter.FIELDS, none a LogRecord attribute).

    Where the line would reach exactly one handler, the gateway's own JSON lines on a stream
    (``configure_logging``) with no filter on the way, it is formatted from ``fields`` and
    written under the handler's lock, as the handler would, without a LogRecord; anywhere
    else (a test's capturing handler, a site's own logging set-up) it goes through logging."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _only_json_handler(logger)
    if handler is not None:
        formatter = handler.formatter
        assert isinstance(formatter, JsonLogFormatter)
        created = time.time()
        text = formatter.line(created, (created - int(created)) * 1000, "info", logger.name, message, fields)
        try:
            with handler.lock:  # type: ignore[union-attr]
                handler.stream.write(text + handler.terminator)
                handler.flush()
        except Exception:  # a line that cannot be written never fails the request (as logging)
            pass
        return
    record = logger.makeRecord(logger.name, logging.INFO, "(unknown file)", 0, message, (), None, "(unknown function)")
    record.__dict__.update(fields)
    logger.handle(record)


def _only_json_handler(logger: logging.Logger) -> logging.StreamHandler[Any] | None:
    """The one handler an INFO line of ``logger`` reaches when that is a plain StreamHandler
    with the JSON formatter and nothing on the way filters; None otherwise."""
    found: logging.StreamHandler[Any] | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if (found is not None or type(handler) is not logging.StreamHandler
                    or type(handler.formatter) is not JsonLogFormatter or handler.filters
                    or handler.level > logging.INFO):
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    return found


# ".000Z" to ".999Z": a timestamp's tail, formatted once.
_MILLIS = tuple(f".{millis:03d}Z" for millis in range(1000))


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line; fields come from ``extra``.

    ``ts`` is RFC 3339 in UTC with milliseconds (``2026-11-27T13:14:15.123Z``); a line
    written while a request is handled carries that request's ``request_id``.
    """

    FIELDS = (
        "request_id", "method", "interaction", "resource_type", "status", "duration_ms",
        "decision", "actor", "purpose", "break_glass", "reasons", "audit_id",
        # The decision log (CONTRACT §10).
        "organization", "role", "path", "query", "replayable", "mode", "shadow", "consents",
        "released", "withheld",
        "worker",  # listen.workers above 1: which worker process wrote the line
        "where",  # an unhandled error: the code locations it passed through
    )

    _second = -1
    _prefix = ""

    def _timestamp(self, created: float, msecs: float) -> str:
        # Lines come many per second: format each second once, then add the milliseconds.
        second = int(created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        millis = int(msecs)
        return self._prefix + (_MILLIS[millis] if 0 <= millis < 1000 else f".{millis:03d}Z")

    def format(self, record: logging.LogRecord) -> str:
        # ``extra`` lands in the record's __dict__; none of FIELDS is a LogRecord attribute.
        exc = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(record.created, record.msecs, record.levelname.lower(), record.name, record.getMessage(),
                         record.__dict__, exc)

    def line(self, created: float, msecs: float, level: str, logger: str, message: str, given: Mapping[str, object],
             exc: str | None = None) -> str:
        """One line: the time ``created`` (seconds since the epoch, ``msecs`` its milliseconds as
        LogRecord has them), and of ``given`` the FIELDS that are not None, in their order."""
        entry: dict[str, object] = {"ts": self._timestamp(created, msecs), "level": level, "logger": logger,
                                    "msg": message}
        for name in self.FIELDS:
            value = given.get(name)
            if value is not None:
                entry[name] = value
        if "request_id" not in entry:
            current = CURRENT_REQUEST_ID.get()
            if current is not None:
                entry["request_id"] = current
        if exc is not None:
            entry["exc"] = exc
        return orjson.dumps(entry).decode()
