"""``specmq keys generate DIR [--name NAME]``: a CURVE key pair as pyzmq certificate files.

Writes ``DIR/NAME.key`` (public: share it) and ``DIR/NAME.key_secret`` (keep it). Give the broker its secret file
(``--curve-secret``) and a directory of allowed clients' ``.key`` files (``--allow``); give each client its own
secret file and the broker's public ``.key`` (``--curve-server``). See docs/remote-drafts.md.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from specmq.cliutil import CommandError, add_command, print_json


def generate(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Create the pair (refusing to overwrite); the secret file is made readable by its owner only."""
    import zmq
    import zmq.auth

    if not zmq.has("curve"):
        raise CommandError("this libzmq was built without CURVE support")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise CommandError(f"--name {name!r}: use letters, digits, '_', '-', '.'")
    directory = Path(directory)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise CommandError(f"{public} or {secret} already exists; pick another --name or directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        pub, sec = zmq.auth.create_certificates(directory, name)
        os.chmod(sec, 0o600)
    except OSError as exc:
        raise CommandError(f"cannot write keys in {directory}: {exc.strerror}") from None
    return Path(pub), Path(sec)


def _generate(args: argparse.Namespace) -> int:
    pub, sec = generate(args.dir, args.name)
    if args.json:
        print_json({"public": str(pub), "secret": str(sec)})
    else:
        print(f"public key: {pub}  (share: the broker's --allow directory, or clients' --curve-server)")
        print(f"secret key: {sec}  (keep private: --curve-secret)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="make CURVE key pairs", description="Make CURVE key pairs.",
                       epilog="example:\n  specmq keys generate keys/ --name laptop",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ksub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    g = add_command(ksub, "generate", help="write NAME.key and NAME.key_secret into DIR",
                    example="specmq keys generate keys/ --name broker && specmq keys generate keys/clients "
                            "--name laptop", func=_generate, json_flag=True)
    g.add_argument("dir", help="directory to write the key files into (created if missing)")
    g.add_argument("--name", default="client", help="file name stem (default: client)")
