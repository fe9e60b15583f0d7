"""The gateway's errors. Each carries an HTTP status, a FHIR issue code and a stable code.

Only ``web.middleware`` turns these into responses; everything else raises them.
Messages are shown to clients, so they never name a hidden record or a reason for hiding.
"""

from __future__ import annotations


class GatewayError(Exception):
    status = 500
    issue_code = "exception"
    code = "internal-error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(GatewayError):
    status = 400
    issue_code = "invalid"
    code = "bad-request"


class PagingLinkInvalid(BadRequest):
    """A sealed paging link that does not open here (web.pages): it says no more than that."""

    code = "paging-link-invalid"

    def __init__(self) -> None:
        super().__init__("This paging link is not valid here. Repeat the search to page through its results.")


class Unauthenticated(GatewayError):
    status = 401
    issue_code = "login"
    code = "unauthenticated"


class ConsentDenied(GatewayError):
    status = 403
    issue_code = "forbidden"
    code = "consent-denied"


class Refused(GatewayError):
    """A request the gateway cannot filter safely (``_has``, ``$graphql``, ...)."""

    status = 403
    issue_code = "forbidden"
    code = "not-filterable"


class OfficerOnly(GatewayError):
    """A privacy officer's page asked from a peer outside ``admin.officer_from``."""

    status = 403
    issue_code = "forbidden"
    code = "officer-only"


class BreakGlassDisabled(GatewayError):
    status = 403
    issue_code = "forbidden"
    code = "break-glass-disabled"


class NotAcceptable(GatewayError):
    status = 406
    issue_code = "not-supported"
    code = "not-acceptable"


class PayloadTooLarge(GatewayError):
    status = 413
    issue_code = "too-costly"
    code = "payload-too-large"


class UpstreamUnavailable(GatewayError):
    status = 502
    issue_code = "transient"
    code = "upstream-unavailable"


class UpstreamTooLarge(UpstreamUnavailable):
    """The FHIR server's answer exceeds ``upstream.max_response_bytes`` (read no further)."""

    code = "upstream-too-large"


class ConsentUnavailable(GatewayError):
    status = 503
    issue_code = "transient"
    code = "consent-unavailable"


class AuditUnavailable(GatewayError):
    status = 503
    issue_code = "transient"
    code = "audit-unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    issue_code = "timeout"
    code = "upstream-timeout"


class UnsupportedMediaType(GatewayError):
    status = 415
    issue_code = "not-supported"
    code = "unsupported-media-type"


class IdentityUnavailable(GatewayError):
    """The token issuer's keys or discovery document cannot be read: nobody can be identified."""

    status = 503
    issue_code = "transient"
    code = "identity-unavailable"


class InsufficientScope(GatewayError):
    """The access token's scopes do not grant the request (RFC 6750 ``insufficient_scope``)."""

    status = 403
    issue_code = "forbidden"
    code = "insufficient-scope"
