"""Who may call: the API key (``Authorization: Bearer KEY`` or ``x-api-key: KEY``), the loopback-only
rule without one, and signed result URLs.

Result URLs work without headers, like the hosted services' presigned URLs (their clients download
with a plain GET): when a token is set, each carries ``?sig=`` (an HMAC of the job id under the
token), so only someone who was handed the URL can fetch it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web

from streamer.api.errors import error_response

OPEN_PATHS = ("/openapi.json", "/health")
RESULTS_PREFIX = "/results/"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


def is_loopback_host(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (``localhost``, 127.x, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_bind(host: str, token: str | None, insecure: bool) -> None:
    """Refuse (``ValueError``) to serve beyond loopback with no token, unless ``insecure``."""
    if token is None and not insecure and not is_loopback_host(host):
        raise ValueError(
            f"--http-host {host}: serving beyond loopback needs --token (clients then send it as "
            "'Authorization: Bearer TOKEN' or 'x-api-key: TOKEN'); --insecure serves without one"
        )


class Auth:
    """Checks API keys and signs result URLs. With no token every request passes."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    def _key_of(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return request.headers.get("x-api-key") or None

    def allows(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        key = self._key_of(request)
        return key is not None and hmac.compare_digest(key.encode(), self.token.encode())

    def signature(self, job_id: str) -> str:
        assert self.token is not None
        return hmac.new(self.token.encode(), job_id.encode(), hashlib.sha256).hexdigest()[:32]

    def signed_ok(self, job_id: str, sig: str | None) -> bool:
        return self.token is None or (
            sig is not None and hmac.compare_digest(sig.encode(), self.signature(job_id).encode())
        )

    def result_path(self, job_id: str, name: str) -> str:
        """Path (and signature) of one of a job's files."""
        path = f"{RESULTS_PREFIX}{job_id}/{name}"
        return path if self.token is None else f"{path}?sig={self.signature(job_id)}"

    def middleware(
        self,
    ) -> Callable[[web.Request, Callable[[web.Request], Awaitable[web.StreamResponse]]], Awaitable[web.StreamResponse]]:
        """401 for a missing or wrong key; result downloads check their signature in their handler."""

        @web.middleware
        async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path in OPEN_PATHS or request.path.startswith(RESULTS_PREFIX) or self.allows(request):
                return await handler(request)
            reason = "missing" if self._key_of(request) is None else "wrong"
            response = error_response(
                401,
                "unauthorized",
                f"authorization: {reason} API key; send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="sam3-stream"'
            return response

        return check_key


def base_url(request: web.Request, fallback: str) -> str:
    """``scheme://host`` the client reached this server by (for absolute result URLs), or ``fallback``
    when its Host header is malformed."""
    host = request.headers.get("Host", "")
    return f"{request.scheme}://{host}" if _HOST.match(host) else fallback
