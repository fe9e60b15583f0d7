"""404 mode: a search page that lost matches to withholding is refilled (CONTRACT §6).

Without it a page that lost matches is short yet has a ``next`` link, which never happens
when nothing is hidden, and a page whose every match was withheld comes back empty with one:
"there are matching records you cannot see". When an answer is a search set (a search,
``_search``, an operation's pages), lost at least one match, and has a ``next`` link, the
gateway follows the upstream's own ``next`` links (only under the upstream base, or a base
it writes for itself: ``upstream.reference_bases``), decides
each further page for the same requester and purpose through the very pipeline of the first
(``answer_page``: references, labels, Binary contexts, orphan includes, display scrubbing,
disclosures), and gathers kept matches until it holds the page size (the first upstream
page's matches), the chain ends, or ``enforcement.refill_max_pages`` further pages were read.

A page gathered past the page size is cut there: its ``next`` link is the gateway's URL of
the upstream page it was cut in plus ``gateway-skip`` (how many of that page's kept matches
were sent), which the gateway strips before forwarding (``take_skip``). ``previous`` links
go; kept entries go out as the upstream wrote them. An upstream error on a further page fails
the whole answer (502/504), never a partial page that looks complete.

The client holds every link sealed (web.pages), so the upstream's own paging parameters (an
offset that moved past the hidden matches skipped) are never read by it. Residual signals
(README): the bound reached leaves a short page with a ``next`` link; refilling takes the time
of the pages it reads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.payload import Payload
from multidict import CIMultiDict

from gateway.core.errors import BadRequest, UpstreamUnavailable
from gateway.core.links import LinkRewriter
from gateway.core.paging import (
    SKIP_PARAM, AnswerParts, PageWindow, UpstreamPage, answer_parts, carries_notice, names_any, outcomes_last, read_skip, refilled,
    upstream_page, with_notice, with_skip, withheld_marks,
)
from gateway.upstream import UpstreamResponse
from gateway.web import officer
from gateway.web.exchange import Exchange, conceals
from gateway.web.middleware import INFO
from gateway.web.request import parse_route
from gateway.web.state import GatewayState

# One upstream answer decided for an exchange, as the handler answers it (proxy.answer_page).
AnswerPage = Callable[[GatewayState, web.Request, Exchange, UpstreamResponse, LinkRewriter], Awaitable[web.StreamResponse]]
# The headers a request sends upstream (proxy.upstream_headers).
HeadersOf = Callable[[web.Request, str], CIMultiDict[str]]

_REFILLED = frozenset({"search", "operation"})
# A further page is read with GET: what described the client's own body or made it conditional goes.
_NOT_FOR_PAGES = ("Content-Type", "If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since")


def in_force(state: GatewayState) -> bool:
    """Whether answers may be refilled at all: 404 mode, enforced, with a bound above 0."""
    return conceals(state) and state.settings.enforcement.refill_max_pages > 0


def continues(state: GatewayState) -> bool:
    """Whether the gateway continues answers from anchors (a link naming a withheld entry is
    never handed out): enforced, with a bound above 0, in either mode."""
    enforcement = state.settings.enforcement
    return enforcement.mode == "enforce" and enforcement.refill_max_pages > 0


def _eligible(state: GatewayState, ex: Exchange) -> bool:
    # Break-glass answers hide nothing; a batch is not a page.
    return continues(state) and ex.reason is None and ex.route.interaction in _REFILLED


def take_skip(state: GatewayState, ex: Exchange) -> None:
    """The gateway's continuation parameter is stripped before the request goes on (and checked:
    BadRequest); a search it may continue then starts after that many kept matches."""
    if not (state.settings.enforcement.denied_read_status == 404 or continues(state)) or "skip" not in ex.raw_query:
        return
    # SECURITY: the value counts visible matches only; a bad one is a 400 (core.paging.read_skip).
    ex.raw_query, skip = read_skip(ex.raw_query)
    if skip is None:
        return
    ex.query = [(k, v) for k, v in ex.query if k != SKIP_PARAM]
    if skip and _eligible(state, ex):
        ex.page = PageWindow(skip=skip)


def wanted(state: GatewayState, ex: Exchange, decision: str | None, raw: bytes) -> bool:
    """Whether the first page's answer may need refilling or continuing from an anchor: it
    withheld something (``decision``) and has a next link, or was asked to skip; or (404 mode)
    it may have a ``previous`` link, which goes from every page a refill may answer. The links
    are the relations read when the answer was parsed (``Exchange.relations``), else the
    upstream's answer ``raw`` is searched for them."""
    if ex.page is not None:
        return True
    if not _eligible(state, ex):
        return False
    relations = ex.relations
    if relations is not None:
        # Read from the parsed answer: two scans of a large answer's text cost as much as
        # deciding a tenth of it.
        back = "previous" in relations or "prev" in relations
        return (decision == "filtered" and ("next" in relations or back)) or (in_force(state) and back)
    return (decision == "filtered" and (b'"next"' in raw or b'"prev' in raw)) or (in_force(state) and b'"prev' in raw)


@dataclass(slots=True)
class _Anchor:
    """Where the answer may continue from: an upstream page whose URL names nothing withheld
    (None: no such page, as for a POST ``_search``, whose URL is not the search) and how many
    kept matches of it and the pages after it were sent."""

    url: str | None
    skip: int

    def link(self, links: LinkRewriter, start: "_Anchor") -> str | None:
        """The gateway's link continuing here; None when it would not move past ``start`` (the
        request itself: a client following it would loop)."""
        if self.url is None or (self.url == start.url and self.skip <= start.skip):
            return None
        return with_skip(links.header(self.url), self.skip)


async def completed(
    state: GatewayState, request: web.Request, ex: Exchange, upstream: UpstreamResponse, links: LinkRewriter,
    response: web.StreamResponse, answer_page: AnswerPage, headers_of: HeadersOf,
) -> web.StreamResponse:
    """The first page's ``response``, refilled (404 mode) when it lost matches and has a ``next``
    link, and continued from an anchor (either mode) where a link would name a withheld entry.

    SECURITY: a refilled page has no ``previous`` link, so no page has one: its absence would
    tell that the page lost matches. A link the upstream made after withheld entries (a cursor
    of the last one's id or time) is handed out only when it names none of them
    (core.paging.names_any); otherwise the answer is gathered on and its ``next`` link continues
    from the last page reached by a link that names nothing withheld (the request itself at
    first) with ``gateway-skip`` counting the kept matches sent from there."""
    if not _eligible(state, ex) or response.status != 200 or not isinstance(response, web.Response):
        return response
    page = upstream_page(upstream.body)
    if page is None or (page.next is None and not page.previous):
        return response  # the answer is not read (a large one is sent without being joined)
    concealing = in_force(state)
    if not concealing and ex.page is None and not _may_name_entries(page, upstream.body):
        return response  # 403 mode: no link names an entry of the page; the answer is not joined
    first = answer_parts(_bytes_of(response))
    if first is None:
        return response
    window0 = ex.page
    asked = window0.skip if window0 is not None else 0
    size = page.matches
    gathered = first.matches()
    hidden = set(withheld_marks(upstream.body, first.entries))
    # What of the skip asked for this page did not use up goes on to the pages after it.
    remaining = max(0, asked - window0.matches) if window0 is not None else 0
    start = _Anchor(str(state.upstream.url_for(ex.route.path, ex.raw_query)) if ex.method in ("GET", "HEAD") else None, asked)
    anchor = _Anchor(start.url, asked - remaining + gathered)
    naming = page.next is not None and names_any(page.next, hidden)
    naming_back = any(names_any(url, hidden) for url in page.previous_urls)
    if page.next is None or gathered >= size or not (concealing or window0 is not None or naming):
        # Nothing to refill (only includes were lost, or this is the last page).
        if naming or (page.previous and (concealing or naming_back)):
            response.body = refilled(first, first.entries, anchor.link(links, start) if naming else page.next and
                                     links.header(page.next), asked)
        return response
    info = request[INFO]
    outcome = officer.outcome_of(request)
    consents = dict(outcome.consents)
    decision = info.decision or "permit"
    filtered = decision == "filtered"
    entries = list(first.entries)
    notice = False  # a further page brought Part 2 data: the answer carries the notice (CONTRACT §10)
    link: str | None = page.next  # the upstream's next link, as it wrote it
    continuation: str | None = None
    read: set[str] = {page.next}
    for _ in range(state.settings.enforcement.refill_max_pages):
        if (gathered >= size and remaining == 0) or link is None:
            break
        # SECURITY: only the upstream's own pages are read (under its base, or a base it writes
        # for itself, read at its base), never a link to another host or base.
        url = links.upstream_url(link)
        further = _further(state, ex, url, size - gathered, remaining) if url is not None else None
        if url is None or further is None:
            break
        safe = not names_any(link, hidden)
        answer, parts, upstream_next, raw = await _read_page(state, request, further, url, links, answer_page, headers_of)
        if safe:
            anchor = _Anchor(url, 0)
        hidden |= withheld_marks(raw, parts.entries)
        consents.update(outcome.consents)
        filtered = filtered or info.decision == "filtered"
        entries.extend(parts.entries)
        notice = notice or carries_notice(parts)
        window = further.page
        assert window is not None
        skipped = min(remaining, window.matches)
        remaining -= skipped
        gathered += window.taken
        anchor.skip += skipped + window.taken
        if window.matches > skipped + window.taken:
            # Cut inside this page: the next answer starts after what this one took of it.
            continuation = anchor.link(links, start)
            link = None
            break
        if upstream_next in read:
            upstream_next = None  # a chain that comes back to a page read already ends: none is sent twice
        if upstream_next is not None:
            read.add(upstream_next)
        link = upstream_next
    if link is not None:
        continuation = anchor.link(links, start) if names_any(link, hidden) else links.header(link)
    outcome.consents = consents
    if notice:
        with_notice(first)
    info.decision = decision = "filtered" if filtered else decision
    response.body = refilled(first, outcomes_last(entries), continuation, asked)
    response.headers["X-Consent-Decision"] = decision
    return response


def _may_name_entries(page: UpstreamPage, raw: bytes) -> bool:
    """Whether a ``next`` or ``previous`` link of the upstream page names any of its entries (a
    cursor): only then is the answer read to learn whether that entry was withheld."""
    marks = withheld_marks(raw, [])
    return any(names_any(url, marks) for url in (page.next, *page.previous_urls) if url)


def _further(state: GatewayState, ex: Exchange, url: str, take: int, skip: int = 0) -> Exchange | None:
    """The exchange of a further page at ``url`` (under the upstream base): the same requester,
    purpose and projection; None when its path is no FHIR path (it is then not read)."""
    base = state.upstream.base_url
    rest = url[len(base.rstrip("/")):].partition("#")[0]
    path, _, query = rest.partition("?")
    try:
        route = parse_route("GET", state.upstream.base.path.rstrip("/") + path, state.upstream.base.path.rstrip("/"))
    except BadRequest:
        return None
    return replace(
        ex, method="GET", route=route, raw_query=query, body=None, content_type="", if_none_exist=None,
        resource=None, query=parse_qsl(query, keep_blank_values=True),
        page=PageWindow(skip=skip, take=max(take, 0), further=True),
    )


async def _read_page(
    state: GatewayState, request: web.Request, further: Exchange, url: str, links: LinkRewriter,
    answer_page: AnswerPage, headers_of: HeadersOf,
) -> tuple[web.Response, AnswerParts, str | None, bytes]:
    """Read and decide one further page: its answer, the answer's texts, the upstream's next
    link and the upstream's bytes. Anything but a decided search set fails the whole answer
    closed (502)."""
    headers = headers_of(request, request[INFO].request_id)
    for name in _NOT_FOR_PAGES:
        headers.popall(name, None)
    upstream = await state.upstream.request(
        "GET", state.upstream.url_for(further.route.path, further.raw_query), headers=headers,
    )
    state.metrics.upstream_duration.observe(upstream.seconds)
    answer = await answer_page(state, request, further, upstream, links)
    parts = answer_parts(_bytes_of(answer)) if isinstance(answer, web.Response) and answer.status == 200 else None
    page = upstream_page(upstream.body) if parts is not None else None
    if parts is None or page is None or not isinstance(answer, web.Response):
        raise UpstreamUnavailable("The FHIR server failed while the gateway completed a search page.")
    return answer, parts, page.next, upstream.body


def _bytes_of(response: web.Response) -> bytes:
    body = response.body
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, Payload):
        return body.decode("utf-8").encode("utf-8")
    return b""
