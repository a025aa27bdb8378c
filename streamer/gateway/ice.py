"""Which local addresses aiortc offers as ICE host candidates.

aioice (aiortc's ICE agent) gathers host candidates on every interface address except the
loopback ones, as RFC 8445 5.1.1.1 asks, and has no option to change that. On a loopback-only box
(a CI container, a robot reached through an SSH tunnel) nothing would connect, so the gateway
names the addresses to gather on itself: by default 127.0.0.1, which matches its HTTP server's
default listen address.

The tweak is one wrapper around ``aioice.ice.get_host_addresses``, the function aioice calls once
per gathering. The wrapper reads the addresses from a context variable, so it only changes the
gatherings started inside ``gather_on(...)`` and leaves every other ``RTCPeerConnection`` in the
process to aioice's own choice. ``AUTO`` in the list stands for aioice's own addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import aioice.ice

AUTO = "auto"
_hosts: ContextVar[tuple[str, ...] | None] = ContextVar("sam3_stream_ice_hosts", default=None)
_aioice_host_addresses = aioice.ice.get_host_addresses


def _host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    hosts = _hosts.get()
    if hosts is None:
        return _aioice_host_addresses(use_ipv4, use_ipv6)
    addresses: list[str] = []
    for host in hosts:
        if host == AUTO:
            candidates = _aioice_host_addresses(use_ipv4, use_ipv6)
        elif ipaddress.ip_address(host).version == 4:
            candidates = [host] if use_ipv4 else []
        else:
            candidates = [host] if use_ipv6 else []
        addresses += [a for a in candidates if a not in addresses]
    return addresses


def check_hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    """Validate a list of IP addresses (or ``AUTO``); raise ``ValueError`` naming a bad one."""
    for host in hosts:
        if host != AUTO:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"ice_hosts: {host!r} is neither an IP address nor {AUTO!r}") from None
    return tuple(hosts)


@contextmanager
def gather_on(hosts: Sequence[str]) -> Iterator[None]:
    """Within this block (and the tasks it starts), ICE gathers host candidates on ``hosts`` only.

    Wrap the ``setLocalDescription`` call, which is where aiortc gathers.
    """
    aioice.ice.get_host_addresses = _host_addresses  # idempotent; falls through outside the block
    token = _hosts.set(check_hosts(hosts))
    try:
        yield
    finally:
        _hosts.reset(token)
