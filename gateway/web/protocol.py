"""Errors raised by the HTTP layer before any handler runs, answered as FHIR.

aiohttp answers an unparsable request line or headers beyond its limits with a text/plain
page that repeats its parser's message (which quotes the request). The gateway answers them
like every other error: an OperationOutcome that echoes nothing of the request.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

import orjson
from aiohttp import web, web_protocol, web_request, web_server

from gateway.core.fhir import operation_outcome

log = logging.getLogger("gateway.error")

_ISSUE = {400: "invalid", 413: "too-costly", 414: "too-costly", 431: "too-costly"}


def http_layer_error(status: int) -> web.Response:
    """The answer to a request the HTTP layer could not read; says only what kind of problem."""
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    message = "The request could not be read." if status < 500 else "Internal error."
    body = orjson.dumps(operation_outcome("error", _ISSUE.get(status, "processing"), message, f"http-{status}"))
    response = web.Response(status=status, reason=phrase, body=body, content_type="application/fhir+json")
    response.headers["X-Consent-Decision"] = "deny"
    response.force_close()
    return response


class FhirRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler with FHIR answers for its own errors."""

    def handle_error(
        self, request: web_request.BaseRequest, status: int = 500,
        exc: BaseException | None = None, message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response")
        # The parser's message quotes the request (a header value, a path): log the kind only.
        log.info("unreadable request", extra={"status": status})
        return http_layer_error(status)


class FhirServer(web_server.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return FhirRequestHandler(self, loop=self._loop, **self._kwargs)


class FhirAppRunner(web.AppRunner):
    """An AppRunner whose connections answer HTTP-layer errors as OperationOutcomes."""

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        server.__class__ = FhirServer
        return server
