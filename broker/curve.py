"""CURVE for remote drafts: load key files, encrypt the broker's frontend, allow only listed client keys.

Keys are pyzmq certificate files (``generate_keypair``, behind ``specmq keys generate``): ``NAME.key`` (public)
and ``NAME.key_secret`` (public + secret). The broker runs a ZAP handler (``zmq.auth.thread.ThreadAuthenticator``)
on its own context with a callback that checks each client's public key against the ``--allow`` directory and
counts refusals.

Handshake failures are diagnosed here, once, for both ends: ``client_handshake_failure`` turns a client socket's
monitor event into the sentence every frontend client prints (``specmq monitor``, ``draft``, ``generate``), and
``HandshakeWatch`` counts and logs every handshake the broker's frontend refuses (a key not allowed, a client
encrypting for another broker key, a client without CURVE, or with CURVE at a broker without it).
"""
from __future__ import annotations

import os
import re
import time
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


class HandshakeRefused(SpecmqError):
    """The broker would not complete this client's handshake; the message says why (``client_handshake_failure``)."""


FAILED_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
HANDSHAKE_EVENTS = FAILED_HANDSHAKE_EVENTS | zmq.EVENT_HANDSHAKE_SUCCEEDED


def client_handshake_failure(event: int, value: int, curve: bool) -> str:
    """Why the broker would not talk to this client, from a monitor event of the client's socket ("" for a
    successful handshake). ``curve``: whether this client uses CURVE. A ZAP refusal (FAILED_AUTH) names the key; a
    mechanism mismatch means one side has CURVE and the other not; a handshake that the broker just ends
    (NO_DETAIL) means, for a CURVE client, that the broker could not decrypt its HELLO (another broker key, or no CURVE
    there), and for a plain client that the broker wants CURVE (a broker never ends a plain handshake otherwise; which
    of the two events a refused plain client sees depends on who closes first)."""
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return ""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the broker refused this client's CURVE key (status {value}: its public key is not in the broker's "
                "--allow directory)")
    mismatch = event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
    if mismatch and curve:
        return "the broker does not use CURVE (leave out --curve-secret and --curve-server)"
    if not curve and (mismatch or event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
        return ("the broker requires CURVE: give --curve-secret (this client's NAME.key_secret) and --curve-server "
                "(the broker's public key)")
    if curve and event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return "CURVE handshake failed (is --curve-server the broker's public key, and does the broker use CURVE?)"
    return f"handshake failed (ZMTP protocol error {value:#x})"


def refused_handshake_reason(event: int, value: int, curve: bool) -> str:
    """Broker side: a short reason for a failed handshake on the frontend (``curve``: whether the broker has CURVE)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "key_not_allowed"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return "client_without_curve" if curve else "client_with_curve"
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return "wrong_broker_key"  # the client encrypted its HELLO for another server key
        return f"protocol_error_{value:#x}"
    return "no_detail"


class HandshakeWatch:
    """Broker side: a monitor on the frontend socket; ``drain()`` (on the loop thread, when ``fd`` is readable)
    calls ``on_refused(reason)`` for every refused handshake and logs them, at most once a second per reason (a
    misconfigured client retries every 100 ms)."""

    def __init__(self, sock: zmq.Socket, curve: bool, on_refused: Callable[[str], None]) -> None:
        self.sock = sock
        self.curve = curve
        self.on_refused = on_refused
        self.mon = sock.get_monitor_socket(FAILED_HANDSHAKE_EVENTS)
        self.fd = self.mon.getsockopt(zmq.FD)
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (last log time, refusals not logged since)

    def drain(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        while True:
            try:
                frames = self.mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:  # closed under us at shutdown
                return
            ev = parse_monitor_message(frames)
            reason = refused_handshake_reason(ev["event"], ev["value"], self.curve)
            self.on_refused(reason)
            now = time.monotonic()
            last, quiet = self._logged.get(reason, (0.0, 0))
            if now - last >= 1.0:
                log.warning("handshake.refused", reason=reason, endpoint=ev["endpoint"].decode("utf-8", "replace"),
                            repeats=quiet)
                self._logged[reason] = (now, 0)
            else:
                self._logged[reason] = (last, quiet + 1)

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.mon.close(linger=0)


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
