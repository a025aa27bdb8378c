"""Download an input URL into a file, bounded in size and time, refusing private addresses.

The check is made on the address actually connected to: a resolver that drops loopback, private,
link-local and other non-global addresses sits inside the HTTP client, so a name that resolves to
``127.0.0.1`` (or rebinds to it between two look-ups) never gets a connection. Redirects are followed
here, one hop at a time, so every hop's URL goes through the same checks (an IP literal skips the
resolver, so literals are checked before connecting).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver

from streamer.api.errors import ApiError, too_large, unreachable

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 256 * 1024


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address (not loopback, private, link-local, reserved...)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not is_public_address(str(embedded)):
            return False
    return ip.is_global and not ip.is_multicast


class RefusedAddress(OSError):
    """A host that resolves only to addresses the server will not connect to."""


class PublicOnlyResolver(ThreadedResolver):
    """The system resolver, keeping only public addresses; none left raises :class:`RefusedAddress`."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await super().resolve(host, port, family)
        public = [r for r in results if is_public_address(r["host"])]
        if not public:
            raise RefusedAddress(f"{host} resolves to a private, loopback or link-local address")
        return public


def _short(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."


class UrlFetcher:
    """One HTTP client for every input download. ``allow_private`` lifts the address check (tests, or a
    server meant to read from its own network)."""

    def __init__(self, *, allow_private: bool, timeout_s: float, max_bytes: int) -> None:
        self.allow_private = allow_private
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> UrlFetcher:
        resolver = ThreadedResolver() if self.allow_private else PublicOnlyResolver()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=resolver, limit=8),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=min(10.0, self.timeout_s)),
            trust_env=False,  # no proxy from the environment: the address check must see the real peer
            headers={"User-Agent": "sam3-stream-api"},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _check(self, field: str, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise unreachable(f"{field}: only http(s) URLs can be fetched, got {parts.scheme or 'no'} scheme")
        if not parts.hostname:
            raise unreachable(f"{field}: URL {_short(url)!r} has no host")
        if self.allow_private:
            return
        try:
            literal = ipaddress.ip_address(parts.hostname)
        except ValueError:
            return  # a name: the resolver checks what it resolves to
        if not is_public_address(str(literal)):
            raise unreachable(
                f"{field}: {parts.hostname} is a private, loopback or link-local address; this server does not "
                "fetch from those (start it with --allow-private-urls to allow them)"
            )

    async def fetch(self, field: str, url: str, destination: Path) -> None:
        """Download ``url`` into ``destination``. Raises :class:`ApiError`: 400 when the URL cannot be
        fetched or is refused, 413 when the content is larger than ``max_bytes``."""
        assert self._session is not None, "use UrlFetcher as an async context manager"
        try:
            for _ in range(MAX_REDIRECTS + 1):
                self._check(field, url)
                async with self._session.get(url, allow_redirects=False) as response:
                    if response.status in _REDIRECTS and "Location" in response.headers:
                        url = urljoin(url, response.headers["Location"])
                        continue
                    if response.status != 200:
                        raise unreachable(f"{field}: {_short(url)} answered HTTP {response.status}")
                    await self._save(field, response, destination)
                    return
            raise unreachable(f"{field}: more than {MAX_REDIRECTS} redirects")
        except ApiError:
            raise
        except RefusedAddress as exc:
            raise unreachable(f"{field}: {exc}; this server does not fetch from those") from None
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error if isinstance(exc.os_error, RefusedAddress) else exc
            raise unreachable(f"{field}: cannot connect: {reason}") from None
        except (TimeoutError, asyncio.TimeoutError):
            raise unreachable(f"{field}: download did not finish within {self.timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise unreachable(f"{field}: cannot download {_short(url)!r}: {exc}") from None

    async def _save(self, field: str, response: Any, destination: Path) -> None:
        limit_mb = self.max_bytes / 2**20
        if response.content_length is not None and response.content_length > self.max_bytes:
            raise too_large(f"{field}: {response.content_length / 2**20:.1f} MB is over the {limit_mb:g} MB limit")
        received = 0
        with destination.open("wb") as out:
            async for chunk in response.content.iter_chunked(_CHUNK):
                received += len(chunk)
                if received > self.max_bytes:
                    raise too_large(f"{field}: download is over the {limit_mb:g} MB limit")
                out.write(chunk)
