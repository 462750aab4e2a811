"""``specmq replay FILE --broker ADDR``: re-send a capture's client side with its recorded timing.

Open loop (recorded chunks at recorded times / --speed), fresh session and job ids, --loop N times; reports sent,
answered, errors (e.g. chunks whose seq/pos no longer match the target's state) and schedule drift p50/p99.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from specmq.cliutil import CommandError, add_command, print_json


def _run(args: argparse.Namespace) -> int:
    from broker.curve import client_kwargs
    from broker.replay import replay

    if args.speed <= 0 or args.loop < 1 or args.timeout <= 0 or args.drain < 0:
        raise CommandError("--speed and --timeout must be > 0, --loop >= 1, --drain >= 0")
    curve = client_kwargs(args)  # CaptureError, ReplayError, CurveError: one line each, like CommandError
    report = asyncio.run(replay(args.file, args.broker, speed=args.speed, loops=args.loop, sessions=args.sessions,
                                drain_s=args.drain, connect_timeout=args.timeout, curve=curve))
    for w in report["warnings"]:
        print(f"specmq replay: warning: {w}", file=sys.stderr)
    if args.json:
        print_json(report)
    else:
        print(f"sent {report['sent']}  answered {report['answered']}  errors {report['errors']}  busy {report['busy']}"
              f"  in {report['duration_s']:.2f}s")
        print(f"schedule drift p50 {report['drift_p50_ms']:.3f} ms  p99 {report['drift_p99_ms']:.3f} ms  "
              f"max {report['drift_max_ms']:.3f} ms")
        print("sent: " + ", ".join(f"{k}={v}" for k, v in sorted(report["sent_by_type"].items())))
        print("replies: " + ", ".join(f"{k}={v}" for k, v in sorted(report["replies"].items())))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from broker.curve import add_client_flags

    p = add_command(sub, "replay", help="replay a capture against a broker",
                    example="specmq replay broker.capture --broker tcp://127.0.0.1:5555 --speed 2 --json",
                    func=_run, json_flag=True)
    p.add_argument("file", help="capture file (specmq broker --capture)")
    p.add_argument("--broker", default="tcp://127.0.0.1:5555", help="broker FRONTEND address")
    p.add_argument("--speed", type=float, default=1.0, help="time scale: 2 = twice as fast (default: 1)")
    p.add_argument("--loop", type=int, default=1, help="replay the capture N times back to back (default: 1)")
    p.add_argument("--sessions", default="", help="only sessions/jobs whose recorded id contains this text")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the broker's first answer")
    p.add_argument("--drain", type=float, default=2.0, help="seconds to wait for answers after the last send")
    add_client_flags(p)
