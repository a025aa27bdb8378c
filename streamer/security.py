"""CURVE security for the tcp:// sockets, and the rule that nothing is exposed to the network by accident.

With a key folder (``--keys DIR``, see :mod:`streamer.keys`) every tcp:// socket of a process uses ZeroMQ's
CURVE: traffic is encrypted, a client checks the server's public key, and a server answers only clients
whose public key is in the folder's allow-list (``DIR/clients/*.key``), checked by a ZAP handler
(``zmq.auth.thread.ThreadAuthenticator``). Knowing the server's public key is not enough to drive a
tracker: a client must hold a secret key the operator allowed. The allow-list is re-read when files are
added to or removed from it, so a new robot needs no restart.

ipc:// sockets (``sam3-stream run``) stay plain: they are files in a private 0700 folder.

A tracker or capture asked to bind a tcp:// address other than loopback without keys refuses to start
(:func:`check_exposure`) unless ``--insecure`` is given.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from streamer.keys import KEYS_ENV, PUBLIC_SUFFIX, KeyFolder

__all__ = [
    "SocketSecurity",
    "CurveClient",
    "CurveServer",
    "AllowList",
    "check_exposure",
    "is_loopback",
    "add_arguments",
    "key_folder_from_args",
]

log = logging.getLogger(__name__)

ZAP_DOMAIN = b"sam3-stream"


class SocketSecurity(Protocol):
    """Sets a socket's security options before it binds or connects (see ``streamer.transport``)."""

    def apply(self, sock: zmq.Socket) -> None: ...


class CurveClient:
    """The connecting side: this host's client pair, and the server key it expects (read at once, so a
    missing or unsafe key file stops the process at start with the file's name)."""

    def __init__(self, keys: KeyFolder) -> None:
        self._server_public = keys.server_public()
        self._pair = keys.client_pair()

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self._server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self._pair.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._pair.secret)


class AllowList:
    """The client public keys in a folder (``*.key`` certificates), re-read whenever the folder changes.

    Used as the ZAP handler's credentials provider: :meth:`callback` says whether a client may connect.
    """

    def __init__(self, folder: Path) -> None:
        if not folder.is_dir():
            raise ValueError(f"{folder}: no allow-list folder (make keys with 'sam3-stream keys {folder.parent}')")
        self.folder = folder
        self._stamp: int | None = None
        self._keys: frozenset[bytes] = frozenset()

    def keys(self) -> frozenset[bytes]:
        """The allowed public keys (z85), re-read if a file was added, removed or renamed since last time."""
        try:
            stamp = self.folder.stat().st_mtime_ns
        except OSError:
            return frozenset()  # the folder is gone: allow no one
        if stamp != self._stamp:
            keys = set()
            for path in sorted(self.folder.glob(f"*{PUBLIC_SUFFIX}")):
                try:
                    keys.add(zmq.auth.load_certificate(path)[0])
                except (OSError, ValueError) as exc:
                    log.warning("allow-list: skipped %s (%s)", path, exc)
            self._keys, self._stamp = frozenset(keys), stamp
            log.info("allow-list %s: %d client keys", self.folder, len(self._keys))
        return self._keys

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP credentials provider: is ``client_key`` (z85) on the list?"""
        return client_key in self.keys()


class CurveServer:
    """The binding side: the server pair, and a ZAP handler on ``context`` that admits only clients on the
    allow-list. One per context; :meth:`close` it before the context is terminated."""

    def __init__(self, keys: KeyFolder, context: zmq.Context) -> None:
        self._pair = keys.server_pair()
        self._allow = AllowList(keys.allow_list)
        self._allow.keys()  # read now: a broken folder shows at start
        self._context = context
        self._auth = ThreadAuthenticator(context, log=logging.getLogger(f"{__name__}.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN.decode(), credentials_provider=self._allow)

    def apply(self, sock: zmq.Socket) -> None:
        if sock.context.underlying != self._context.underlying:
            raise ValueError("CurveServer.apply: the socket is not on the context its ZAP handler serves")
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self._pair.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._pair.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)  # always ask the handler, never admit by default

    def close(self) -> None:
        """Stop the ZAP handler (its socket would keep the context from terminating)."""
        self._auth.stop()


def is_loopback(endpoint: str) -> bool:
    """True for ipc:// and inproc:// and for tcp:// on a loopback address or ``localhost``; false for
    wildcards (``*``, ``0.0.0.0``), interface names and any other host."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(bound: Sequence[str], keys: KeyFolder | None, insecure: bool, exposes: str) -> None:
    """``ValueError`` (one line, naming the endpoint and the ways out) if a bound endpoint is reachable from
    other hosts while no keys are set and ``insecure`` was not asked for. ``exposes`` says what an
    intruder could do, e.g. ``"read its results and drive the tracker"``."""
    exposed = [endpoint for endpoint in bound if not is_loopback(endpoint)]
    if exposed and keys is None and not insecure:
        raise ValueError(
            f"{exposed[0]} is reachable from other hosts and no --keys are set: anyone there could {exposes}; "
            f"make keys with 'sam3-stream keys DIR' and pass --keys DIR (or {KEYS_ENV}=DIR), "
            "or pass --insecure to accept that"
        )


def add_arguments(parser: argparse.ArgumentParser, *, binds: bool) -> None:
    """Add ``--keys`` (default ``$SAM3_STREAM_KEYS``) and, for a process that binds, ``--insecure``."""
    parser.add_argument(
        "--keys",
        metavar="DIR",
        default=os.environ.get(KEYS_ENV) or None,
        help=f"key folder made by 'sam3-stream keys': every tcp:// socket then uses CURVE "
        f"(default ${KEYS_ENV}, else none)",
    )
    if binds:
        parser.add_argument(
            "--insecure",
            action="store_true",
            help="allow binding a non-loopback tcp:// address without --keys (anyone on the network can connect)",
        )


def key_folder_from_args(args: argparse.Namespace, endpoints: Sequence[str]) -> KeyFolder | None:
    """The ``--keys`` folder, or ``None`` when none is given or no endpoint is tcp:// (keys only ever apply
    there, so ``SAM3_STREAM_KEYS`` set in a shell does not get in the way of ``run``'s ipc:// sockets);
    ``ValueError`` naming the folder when it is not one."""
    if not args.keys or not any(endpoint.startswith("tcp://") for endpoint in endpoints):
        return None
    return KeyFolder.open(args.keys)
