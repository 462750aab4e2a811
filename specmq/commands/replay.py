"""``specmq replay FILE --broker ADDR``: re-send a capture's client side with its recorded timing.

Causal per session by default: sessions start at their recorded times / --speed, and a session's next request
leaves after the answer to its previous one plus the recorded think time / --speed (``broker.replay``).
--open-loop sends every request at its recorded time / --speed whatever the answers. Fresh session and job ids,
--loop N times; reports sent, answered, errors (by code) and schedule drift p50/p99.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from specmq.cliutil import CommandError, add_command, print_json


def _run(args: argparse.Namespace) -> int:
    from broker.curve import client_kwargs
    from broker.replay import replay

    if args.speed <= 0 or args.loop < 1 or args.timeout <= 0 or args.drain < 0 or args.answer_timeout <= 0:
        raise CommandError("--speed, --timeout and --answer-timeout must be > 0, --loop >= 1, --drain >= 0")
    curve = client_kwargs(args)  # CaptureError, ReplayError, CurveError: one line each, like CommandError
    report = asyncio.run(replay(args.file, args.broker, speed=args.speed, loops=args.loop, sessions=args.sessions,
                                drain_s=args.drain, connect_timeout=args.timeout, curve=curve,
                                open_loop=args.open_loop, answer_timeout_s=args.answer_timeout))
    for w in report["warnings"]:
        print(f"specmq replay: warning: {w}", file=sys.stderr)
    if args.json:
        print_json(report)
    else:
        print(f"{report['mode']}: sent {report['sent']}  answered {report['answered']}  errors {report['errors']}  "
              f"busy {report['busy']}  in {report['duration_s']:.2f}s")
        if report["error_codes"]:
            print("errors: " + ", ".join(f"{k}={v}" for k, v in sorted(report["error_codes"].items())))
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
    p.add_argument("--open-loop", action="store_true",
                   help="send every request at its recorded time / --speed, not after the answer to the session's "
                        "previous request (chunks can then overtake their predecessors: bad_sequence)")
    p.add_argument("--answer-timeout", type=float, default=10.0,
                   help="causal mode: seconds a session waits for an answer before going on (default: 10)")
    add_client_flags(p)
