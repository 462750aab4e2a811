"""``specmq keys generate DIR [--name NAME]``: a CURVE key pair as pyzmq certificate files.

Writes ``DIR/NAME.key`` (public: share it) and ``DIR/NAME.key_secret`` (keep it). Give the broker its secret file
(``--curve-secret``) and a directory of allowed clients' ``.key`` files (``--allow``); give each client its own
secret file and the broker's public ``.key`` (``--curve-server``). See docs/remote-drafts.md.
"""
from __future__ import annotations

import argparse

from specmq.cliutil import add_command, print_json


def _generate(args: argparse.Namespace) -> int:
    from broker.curve import generate_keypair

    pub, sec = generate_keypair(args.dir, args.name)  # CurveError: one line, like CommandError
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
