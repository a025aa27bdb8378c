"""Who may use the gateway: Host and Origin checks on every request, and the token when one is set.

- **Host** (every request) must name this gateway: its ``http_host``, ``localhost``, a loopback
  address, any IP address when it listens on all interfaces, or a name in ``allowed_hosts``. A page
  whose DNS name an attacker re-points at this machine (DNS rebinding) sends its own name: refused.
- **Origin** (requests that change something: POST) must be this gateway's own page, i.e. the same
  host and port as ``Host``: a page of another site cannot post offers or log in, even on the
  operator's own machine. A request without ``Origin`` comes from a script, not a browser (browsers
  send it on every POST); the token is what guards those.
- **Token** (when set) is needed for everything but ``/login``, ``/static/`` and ``/health`` (which then
  tells only the feed's state): ``Authorization: Bearer <token>`` (scripts), or the session cookie
  that the login form or ``/?token=<token>`` sets (HttpOnly, SameSite=Strict; its value is derived
  from the token, not the token itself). Comparisons take constant time.

Serving an address other machines can reach without a token is refused (``check_exposure``) unless
the operator says ``--insecure``.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import logging
import re
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler, Middleware

log = logging.getLogger(__name__)

TOKEN_ENV = "SAM3_STREAM_TOKEN"
MIN_TOKEN_CHARS = 16
MAKE_TOKEN = "python3 -c 'import secrets; print(secrets.token_urlsafe())'"
SESSION_COOKIE = "sam3_stream_session"
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
OPEN_PATHS = frozenset({"/login", "/health"})
OPEN_PREFIX = "/static/"
FORM = "application/x-www-form-urlencoded"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOGIN_PAGE = Path(__file__).parent / "static" / "login.html"
AUTHORIZED = web.RequestKey("authorized", bool)
REPORT_REFUSALS_EVERY_S = 60.0
# The page loads only its own files; nobody may frame it (clickjacking its clicks into prompts).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: with it, browsers send "Origin: null" on form posts, and the login form would fail.
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'",
}
_HOST_HEADER = re.compile(r"^(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>\d{1,5}))?$")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: str | None) -> str | None:
    """``token`` if it is usable (``None`` or empty: no token); ``ValueError`` naming the problem if not."""
    if not token:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"token: at least {MIN_TOKEN_CHARS} characters, got {len(token)}; make one with {MAKE_TOKEN}")
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise ValueError("token: printable ASCII without spaces only (it travels in an HTTP header)")
    return token


def check_exposure(http_host: str, token: str | None, insecure: bool = False) -> None:
    """Refuse (``ValueError``) to serve an address other machines can reach without a token, unless ``insecure``."""
    if token or insecure or is_loopback(http_host):
        return
    where = "all interfaces" if http_host in WILDCARD_HOSTS else http_host
    raise ValueError(
        f"http_host: {where} is reachable from other machines and no token is set; "
        f"set one with --token or {TOKEN_ENV} (make one with {MAKE_TOKEN}), or pass --insecure"
    )


def _digest(value: str) -> bytes:
    # Comparing fixed-length digests keeps even the token's length out of the timing.
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class AccessPolicy:
    """The Host, Origin and token checks of one gateway (see the module's docstring).

    ``refused`` counts refusals by the field at fault (``host``, ``origin``, ``token``) for ``/metrics``.
    """

    def __init__(self, http_host: str, allowed_hosts: tuple[str, ...] = (), token: str | None = None) -> None:
        names = {"localhost", "127.0.0.1", "::1", *(h.strip("[]").lower() for h in allowed_hosts)}
        if http_host not in WILDCARD_HOSTS:
            names.add(http_host.strip("[]").lower())
        self._names = frozenset(names)
        self._any_address = http_host in WILDCARD_HOSTS
        self._token_digest = _digest(token) if token else None
        # The cookie proves the token without being it: a stolen cookie store does not reveal the token.
        self._cookie = hmac.new(token.encode(), b"sam3-stream session", hashlib.sha256).hexdigest() if token else ""
        self.refused: Counter[str] = Counter()
        self._next_report = 0.0  # monotonic

    @property
    def token_required(self) -> bool:
        """Whether a token is set."""
        return self._token_digest is not None

    def host_problem(self, request: web.BaseRequest) -> str | None:
        """Why the request's ``Host`` does not name this gateway, or ``None`` when it does."""
        header = request.headers.get("Host")
        if not header:
            return "host: the request has no Host header"
        match = _HOST_HEADER.match(header)
        if match is None:
            return f"host: malformed Host header {header[:100]!r}"
        name = (match["ipv6"] or match["name"]).lower()
        if name in self._names:
            return None
        if self._any_address:
            try:
                ipaddress.ip_address(name)
                return None  # an address is no DNS name an attacker could re-point
            except ValueError:
                pass
        return f"host: {name[:100]!r} is not a name of this gateway (add it with --allowed-host)"

    def origin_problem(self, request: web.BaseRequest) -> str | None:
        """Why a browser's request that changes something comes from another site's page, or ``None``."""
        if request.method in SAFE_METHODS:
            return None
        origin = request.headers.get("Origin")
        if origin is not None:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or parts.netloc.lower() != request.headers["Host"].lower():
                return f"origin: a page of {origin[:100]!r} may not use this gateway"
        # Browsers too old to send Origin still send Sec-Fetch-Site, or neither (then the token guards).
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return f"origin: a {site[:20]} request may not use this gateway"
        return None

    def refuse(self, problem: str) -> None:
        """Count a refusal by its field (``problem`` starts ``field:``); log the first at once, then at most one
        summary line a minute, so a flood of bad requests cannot flood the log."""
        self.refused[problem.split(":", 1)[0]] += 1
        now = time.monotonic()
        if now >= self._next_report:
            self._next_report = now + REPORT_REFUSALS_EVERY_S
            log.warning("refused a request (%s); refusals so far: %s", problem, dict(self.refused))

    def token_matches(self, candidate: str) -> bool:
        """Whether ``candidate`` is the token (constant time)."""
        return self._token_digest is not None and hmac.compare_digest(_digest(candidate), self._token_digest)

    def authorized(self, request: web.BaseRequest) -> bool:
        """Whether the request carries the token (Bearer header or session cookie), or none is needed."""
        if self._token_digest is None:
            return True
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.token_matches(credentials.strip()):
            return True
        cookie = request.cookies.get(SESSION_COOKIE, "")
        return hmac.compare_digest(_digest(cookie), _digest(self._cookie))

    def log_in(self, response: web.StreamResponse, request: web.BaseRequest) -> None:
        """Give the browser the session cookie (on a response to a request that showed the token)."""
        response.set_cookie(
            SESSION_COOKIE, self._cookie, path="/", httponly=True, samesite="Strict", secure=request.secure
        )


def login_page(error: str | None = None, status: int = 200) -> web.Response:
    """The login form, with ``error`` shown above it."""
    text = LOGIN_PAGE.read_text(encoding="utf-8").replace("<!--error-->", html.escape(error or ""))
    return web.Response(text=text, status=status, content_type="text/html", headers={"Cache-Control": "no-store"})


def unauthorized() -> web.Response:
    """401 for a script or page without the token."""
    return web.json_response(
        {"error": "token: missing or wrong; send 'Authorization: Bearer <token>' or log in at /login"},
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="sam3-stream"'},
    )


def access_middleware(policy: AccessPolicy) -> Middleware:
    """An aiohttp middleware enforcing ``policy``; handlers read ``request[AUTHORIZED]``."""

    @web.middleware
    async def check_access(request: web.Request, handler: Handler) -> web.StreamResponse:
        problem = policy.host_problem(request) or policy.origin_problem(request)
        if problem is not None:
            policy.refuse(problem)
            return web.json_response({"error": problem}, status=403)
        request[AUTHORIZED] = policy.authorized(request)
        if request[AUTHORIZED] or request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIX):
            return await handler(request)
        if request.path == "/" and request.method in SAFE_METHODS:
            offered = request.query.get("token")
            if offered is not None and policy.token_matches(offered):
                # Served in place, not redirected: a redirect that began on another site would not
                # carry a SameSite=Strict cookie. The page drops the token from its address bar.
                request[AUTHORIZED] = True
                response = await handler(request)
                policy.log_in(response, request)
                return response
            policy.refuse("token: missing or wrong on the page")
            return login_page("wrong token" if offered is not None else None, status=401)
        policy.refuse(f"token: missing or wrong on {request.path[:100]}")
        return unauthorized()

    return check_access


def login_routes(policy: AccessPolicy) -> list[web.RouteDef]:
    """``GET /login`` (the form) and ``POST /login`` (form field ``token``: sets the cookie, back to ``/``)."""

    async def form(request: web.Request) -> web.StreamResponse:
        if not policy.token_required:
            raise web.HTTPSeeOther("/")
        return login_page()

    async def submit(request: web.Request) -> web.StreamResponse:
        if request.content_type != FORM:
            return login_page(f"content-type: the form posts {FORM}, not {request.content_type!r}", 415)
        token = (await request.post()).get("token")
        if not isinstance(token, str) or not policy.token_matches(token):
            policy.refuse("token: wrong token in the login form")
            return login_page("wrong token", status=401)
        response = web.Response(status=303, headers={"Location": "/"})
        policy.log_in(response, request)
        return response

    return [web.get("/login", form), web.post("/login", submit)]


async def add_security_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: headers that keep the page from being framed, sniffed or referred."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log at DEBUG (probes and viewers would fill INFO), without query strings
    (``/?token=...`` must not reach the logs)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug('%s "%s %s" %d %.3fs', request.remote, request.method, request.path, response.status, time)
