"""CURVE for remote drafts: load key files, encrypt the broker's frontend, allow only listed client keys.

Keys are pyzmq certificate files (``generate_keypair``, behind ``specmq keys generate``): ``NAME.key`` (public)
and ``NAME.key_secret`` (public + secret). The broker runs a ZAP handler (``zmq.auth.thread.ThreadAuthenticator``)
on its own context with a callback that checks each client's public key against the ``--allow`` directory and
counts refusals.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import structlog
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from protocol.errors import SpecmqError

log = structlog.get_logger("broker.curve")


class CurveError(SpecmqError):
    """A key file or directory is missing or not a CURVE certificate, or a key pair cannot be made."""


def generate_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (readable by its owner only), refusing to
    overwrite either. Returns (public file, secret file)."""
    if not zmq.has("curve"):
        raise CurveError("this libzmq was built without CURVE support")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise CurveError(f"--name {name!r}: use letters, digits, '_', '-', '.'")
    directory = Path(directory)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise CurveError(f"{public} or {secret} already exists; pick another --name or directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        pub, sec = zmq.auth.create_certificates(directory, name)
        os.chmod(sec, 0o600)
    except OSError as exc:
        raise CurveError(f"cannot write keys in {directory}: {exc.strerror}") from None
    return Path(pub), Path(sec)


def load_keypair(path: str | Path, need_secret: bool = True) -> tuple[bytes, bytes | None]:
    """(public, secret) from a certificate file; ``need_secret`` insists on a ``.key_secret`` file."""
    path = Path(path)
    if not path.is_file():
        raise CurveError(f"key file {path} not found")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except Exception as exc:  # ValueError / OSError / malformed z85
        raise CurveError(f"{path} is not a CURVE key file ({exc})") from None
    if not public or len(public) != 40:
        raise CurveError(f"{path} holds no valid public key")
    if need_secret and (not secret or len(secret) != 40):
        raise CurveError(f"{path} holds no secret key (use the .key_secret file, not the public .key)")
    return public, secret


def load_public(path: str | Path) -> bytes:
    return load_keypair(path, need_secret=False)[0]


def load_allowed(directory: str | Path) -> set[bytes]:
    """Every public key (z85) in ``directory``'s ``*.key`` files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CurveError(f"allow directory {directory} not found")
    keys = set()
    for f in sorted(directory.glob("*.key")):
        keys.add(load_public(f))
    if not keys:
        raise CurveError(f"allow directory {directory} holds no *.key public key files")
    return keys


class _AllowList:
    """ZAP credentials callback: allowed when the client's key is listed; refusals counted and logged."""

    def __init__(self, keys: set[bytes], on_refused: Callable[[], None]) -> None:
        self.keys = keys
        self.on_refused = on_refused

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        self.on_refused()
        log.warning("auth.refused", client_key=key.decode("ascii", "replace"))
        return False


class CurveServer:
    """Broker side: keys plus the running authenticator; ``apply(sock)`` before ``bind``."""

    def __init__(self, ctx: zmq.Context, secret_file: str | Path, allow_dir: str | Path,
                 on_refused: Callable[[], None]) -> None:
        if not allow_dir:
            raise CurveError("--curve-secret needs --allow DIR (the allowed clients' public keys)")
        self.public, self.secret = load_keypair(secret_file)
        self.allow = _AllowList(load_allowed(allow_dir), on_refused)
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve_callback("*", credentials_provider=self.allow)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def stop(self) -> None:
        try:
            self.auth.stop()
        except Exception:  # already stopped or context gone
            pass


def apply_client(sock: zmq.Socket, secret_file: str | Path, server_public_file: str | Path,
                 public_file: str | Path | None = None) -> None:
    """Client side: own key pair (from the secret file; ``public_file`` optional check) and the broker's key."""
    public, secret = load_keypair(secret_file)
    if public_file:
        listed = load_public(public_file)
        if listed != public:
            raise CurveError(f"{public_file} is not the public half of {secret_file}")
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = load_public(server_public_file)


def add_client_flags(p) -> None:
    """``--curve-secret``, ``--curve-public``, ``--curve-server`` for every frontend client CLI."""
    p.add_argument("--curve-secret", default="", help="this client's CURVE secret key file (NAME.key_secret)")
    p.add_argument("--curve-public", default="", help="this client's public key file (optional check)")
    p.add_argument("--curve-server", default="", help="the broker's public key file (server.key)")


def client_kwargs(args) -> dict:
    """BrokerClient keyword arguments from parsed ``add_client_flags`` flags (empty when CURVE is off)."""
    secret, server = getattr(args, "curve_secret", ""), getattr(args, "curve_server", "")
    if not secret and not server:
        return {}
    if not (secret and server):
        raise CurveError("CURVE needs both --curve-secret (yours) and --curve-server (the broker's public key)")
    return {"curve_secret": secret, "curve_server": server, "curve_public": getattr(args, "curve_public", "") or None}
