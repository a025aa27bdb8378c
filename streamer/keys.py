"""``sam3-stream keys``: make the ZeroMQ CURVE key pairs that secure the tcp:// sockets, and read them back.

A key folder (``--keys DIR`` or ``SAM3_STREAM_KEYS=DIR`` on ``capture``, ``track``, ``serve`` and the robot
example) has one layout wherever it is used::

    DIR/                        0700
      server.key                the servers' public key: clients use it to know they reach the real server
      server.key_secret         0600; the servers' secret key: needed only where a socket binds
                                (the tracker's results and control, a capture's frames)
      client.key                this host's public key as a client
      client.key_secret         0600; this host's secret key as a client (a tracker reading frames, a
                                gateway, a robot)
      clients/NAME.key          the allow-list: public keys of the clients the servers accept
      exported/NAME/            a key folder for client NAME on another host (server.key, client.key,
                                client.key_secret): copy it there and pass it as --keys

Files are ZeroMQ's certificate format (z85 keys, readable with ``zmq.auth.load_certificate``). Nothing is
ever overwritten: running the command again only adds what is missing.

    sam3-stream keys ~/.config/sam3-stream/keys                  # server pair + this host's client pair
    sam3-stream keys ~/.config/sam3-stream/keys --client robot1  # + robot1's pair, allowed, exported
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

__all__ = ["KEYS_ENV", "KeyFolder", "make_keys", "add_arguments", "run_from_args"]

log = logging.getLogger(__name__)

KEYS_ENV = "SAM3_STREAM_KEYS"
SERVER = "server"
CLIENT = "client"
ALLOW_LIST = "clients"
EXPORTED = "exported"
PUBLIC_SUFFIX, SECRET_SUFFIX = ".key", ".key_secret"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_Z85_KEY_CHARS = 40  # a 32-byte CURVE key in z85


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair, z85-encoded (``secret`` is ``None`` when only the public half is at hand)."""

    public: bytes
    secret: bytes | None = None


def _write_certificate(path: Path, pair: KeyPair) -> None:
    """Write ``pair`` in ZeroMQ's certificate format; a secret one is created 0600 (never readable by others)."""
    kind = "Secret" if pair.secret else "Public"
    lines = [
        f"#   ****  Generated on {datetime.datetime.now():%Y-%m-%d %H:%M:%S} by sam3-stream keys  ****",
        f"#   ZeroMQ CURVE **{kind}** Certificate",
        "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions." if pair.secret else "",
        "",
        "metadata",
        "curve",
        f'    public-key = "{pair.public.decode()}"',
    ]
    if pair.secret:
        lines.append(f'    secret-key = "{pair.secret.decode()}"')
    # O_EXCL: never overwrite a key someone may already have handed out.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if pair.secret else 0o644)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write("\n".join(lines) + "\n")


def _check_key(path: Path, what: str, key: bytes | None) -> bytes:
    if key is None or len(key) != _Z85_KEY_CHARS:
        raise ValueError(f"{path}: no valid {what} key (expected {_Z85_KEY_CHARS} z85 characters)")
    try:
        z85.decode(key)
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: the {what} key is not valid z85") from None
    return key


def read_certificate(path: Path, *, secret: bool) -> KeyPair:
    """Read a certificate; ``ValueError`` naming the file when it is missing, malformed, or a secret one
    is readable by anyone but its owner (as ssh refuses such a key)."""
    if not path.is_file():
        raise ValueError(f"{path}: missing (make keys with 'sam3-stream keys {path.parent}')")
    if secret:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ValueError(f"{path}: a secret key readable by others (mode {mode:04o}); run: chmod 600 {path}")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a ZeroMQ certificate ({exc})") from None
    pair = KeyPair(_check_key(path, "public", public), _check_key(path, "secret", secret_key) if secret else None)
    if pair.secret is not None and zmq.curve_public(pair.secret) != pair.public:
        raise ValueError(f"{path}: the public key does not belong to the secret key")
    return pair


@dataclass(frozen=True)
class KeyFolder:
    """A key folder (layout in this module's docstring); each accessor reads its file when asked, so a host
    that only connects needs no server secret, and a missing or unsafe file is named in the error."""

    path: Path

    @classmethod
    def open(cls, path: str | os.PathLike) -> KeyFolder:
        """The key folder at ``path``; ``ValueError`` if it is not a folder."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ValueError(f"--keys {path}: not a folder (make one with 'sam3-stream keys {path}')")
        return cls(folder)

    def server_pair(self) -> KeyPair:
        """The servers' key pair (to bind)."""
        return read_certificate(self.path / f"{SERVER}{SECRET_SUFFIX}", secret=True)

    def server_public(self) -> bytes:
        """The servers' public key (to connect)."""
        return read_certificate(self.path / f"{SERVER}{PUBLIC_SUFFIX}", secret=False).public

    def client_pair(self) -> KeyPair:
        """This host's client key pair (to connect)."""
        return read_certificate(self.path / f"{CLIENT}{SECRET_SUFFIX}", secret=True)

    @property
    def allow_list(self) -> Path:
        """The folder of client public keys a server accepts."""
        return self.path / ALLOW_LIST


def _new_pair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public, secret)


def _write_pair(folder: Path, name: str, pair: KeyPair) -> list[Path]:
    public, secret = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    _write_certificate(secret, pair)
    _write_certificate(public, KeyPair(pair.public))
    return [public, secret]


def _private_folder(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)  # mkdir's mode is cut by the umask, and an existing folder keeps its own
    return path


def make_keys(folder: str | os.PathLike, clients: Sequence[str] = ()) -> list[Path]:
    """Fill the key folder at ``folder``: the server pair and this host's client pair when missing, and for
    each name in ``clients`` a new allowed client with its exported key folder. Returns the files written.

    ``ValueError`` for a bad client name or one that exists already; existing files are never overwritten.
    """
    for name in clients:
        if not _NAME.fullmatch(name) or name in (SERVER, CLIENT):
            raise ValueError(f"--client {name!r}: use letters, digits, '.', '_' or '-' (not {SERVER!r}, {CLIENT!r})")
    root = _private_folder(Path(folder).expanduser())
    allow = _private_folder(root / ALLOW_LIST)
    for name in clients:
        if (allow / f"{name}{PUBLIC_SUFFIX}").exists() or (root / EXPORTED / name).exists():
            raise ValueError(f"--client {name!r}: already made ({allow / (name + PUBLIC_SUFFIX)})")
    written: list[Path] = []
    if not (root / f"{SERVER}{SECRET_SUFFIX}").exists():
        written += _write_pair(root, SERVER, _new_pair())
    if not (root / f"{CLIENT}{SECRET_SUFFIX}").exists():
        pair = _new_pair()
        written += _write_pair(root, CLIENT, pair)
        allowed = allow / f"{CLIENT}{PUBLIC_SUFFIX}"
        if not allowed.exists():
            _write_certificate(allowed, KeyPair(pair.public))
            written.append(allowed)
    server_public = read_certificate(root / f"{SERVER}{PUBLIC_SUFFIX}", secret=False)
    for name in clients:
        pair = _new_pair()
        export = _private_folder(root / EXPORTED / name)
        written += _write_pair(export, CLIENT, pair)
        _write_certificate(export / f"{SERVER}{PUBLIC_SUFFIX}", server_public)
        _write_certificate(allow / f"{name}{PUBLIC_SUFFIX}", KeyPair(pair.public))
        written += [export / f"{SERVER}{PUBLIC_SUFFIX}", allow / f"{name}{PUBLIC_SUFFIX}"]
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``keys`` command's options to ``parser``."""
    parser.add_argument("folder", metavar="DIR", help="the key folder to make or add to (made 0700)")
    parser.add_argument(
        "--client",
        action="append",
        dest="clients",
        default=[],
        metavar="NAME",
        help="also make a key pair for client NAME (a robot, a remote gateway), add it to the allow-list and "
        "export it to DIR/exported/NAME/ to copy to that host; repeatable",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Make the keys; print what was written and how to use it. Returns a process exit status."""
    try:
        written = make_keys(args.folder, args.clients)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("cannot write keys in %s: %s", args.folder, exc)
        return 1
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"{args.folder}: every key is there already; nothing written")
    print(
        f"use: --keys {args.folder} (or {KEYS_ENV}={args.folder}) on capture, track and serve; "
        f"a client on another host gets {Path(args.folder) / EXPORTED / 'NAME'} (made with --client NAME)"
    )
    return 0
