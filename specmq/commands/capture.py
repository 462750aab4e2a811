"""``specmq capture inspect FILE``: what a capture holds (duration, sessions, messages by type, rates).

A truncated, corrupt or newer-format file is summarised up to the problem, which is printed with its byte offset
(exit 0 with a warning); only an unreadable header is a failure (exit 1).
"""
from __future__ import annotations

import argparse
import sys

from specmq.cliutil import add_command, print_json


def _inspect(args: argparse.Namespace) -> int:
    from broker.capture import summarize

    summary = summarize(args.file)  # CaptureError: one line, like CommandError
    for w in summary["warnings"]:
        print(f"specmq capture: warning: {w}", file=sys.stderr)
    if args.json:
        print_json(summary)
        return 0
    print(f"{summary['path']}: version {summary['version']}, {len(summary['parts'])} part(s), "
          f"{summary['records']} records, {summary['body_bytes']} body bytes")
    print(f"duration {summary['duration_s']:.3f} s, {summary['sessions']} sessions, {summary['jobs']} jobs, "
          f"{summary['clients']} clients")
    print(f"{'type':<16} {'count':>9} {'per s':>10} {'client in':>10}")
    for mtype, n in sorted(summary["messages"].items(), key=lambda kv: -kv[1]):
        print(f"{mtype:<16} {n:>9} {summary['rates_per_s'].get(mtype, 0):>10.1f} "
              f"{summary['client_messages'].get(mtype, 0):>10}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("capture", help="inspect capture files", description="Inspect capture files.",
                       epilog="example:\n  specmq capture inspect run.capture --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ip = add_command(csub, "inspect", help="summarise a capture file (duration, sessions, messages by type)",
                     example="specmq capture inspect broker.capture --json", func=_inspect, json_flag=True)
    ip.add_argument("file", help="capture file written by specmq broker --capture")
