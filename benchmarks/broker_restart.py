"""``specmq bench broker_restart``: how long drafter sessions stall when the broker restarts under them.

A broker and one target run as processes (``workers.local_cluster``); a draft worker runs here so that every
``Result`` it receives is timestamped per session. Once results flow, the broker gets SIGTERM (a graceful drain) or
SIGKILL, and a new broker starts on the same ports ``--gap-s`` seconds after the old one is gone. Recovery of a
session = time from the new broker's start to that session's next result, for every session that was mid-run when
the fault hit; the promise (docs/operations.md) is a few heartbeat intervals, not a request timeout. The run also
checks that every output equals target-only greedy decoding.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks import BenchmarkError, print_json

ROOT = Path(__file__).resolve().parent.parent
HELP = "drafter sessions' stall when the broker restarts (SIGTERM or SIGKILL) mid-run"
EXAMPLE = "specmq bench broker_restart --signal kill --prompts 10 --concurrency 8 --json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--signal", choices=("term", "kill"), default="kill", help="how the broker stops (default: kill)")
    p.add_argument("--gap-s", type=float, default=2.0, help="seconds between the old broker's exit and the new "
                   "one's start (default: 2)")
    p.add_argument("--prompts", type=int, default=10, help="prompts to run (default: 10)")
    p.add_argument("--concurrency", type=int, default=8, help="sessions at once (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt (default: 64)")
    p.add_argument("--gamma", default="4", help="draft tokens per round, or auto (default: 4)")
    p.add_argument("--slots", type=int, default=16, help="target slots (default: 16)")
    p.add_argument("--after-results", type=int, default=3,
                   help="stop the broker once a full set of sessions has this many results each (default: 3)")
    p.add_argument("--timeout", type=float, default=10.0, help="drafter's request timeout (default: 10)")
    p.add_argument("--target-model", type=Path, default=ROOT / "models" / "tiny-target")
    p.add_argument("--draft-model", type=Path, default=ROOT / "models" / "tiny-draft")
    p.add_argument("--logdir", type=Path, default=None, help="keep the processes' logs here (default: none)")


def run(args: argparse.Namespace) -> int:
    if args.prompts < 1 or args.concurrency < 1 or args.max_new_tokens < 1 or args.gap_s < 0:
        raise BenchmarkError("--prompts, --concurrency and --max-new-tokens must be >= 1, --gap-s >= 0")
    row = asyncio.run(measure(args))
    if args.json:
        print_json(row)
    else:
        print(f"broker {args.signal} mid-run, back after {args.gap_s:g} s: {row['sessions_hit']} sessions hit, "
              f"recovery max {row['recovery_max_s']} s, median {row['recovery_p50_s']} s; failed {row['failed']}; "
              f"outputs equal target-only greedy: {row['lossless']}; run {row['wall_s']} s")
    return 0 if row["failed"] == 0 and row["lossless"] else 1


class _Stamped:
    """Result arrival times per session id, filled by the recording client."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}


def _recording_client(stamps: _Stamped):
    from broker.client import BrokerClient
    from protocol.messages import Result

    class RecordingClient(BrokerClient):
        def _deliver(self, msg: Any) -> None:
            if isinstance(msg, Result):
                stamps.times.setdefault(msg.session, []).append(time.monotonic())
            super()._deliver(msg)

    return RecordingClient


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    import workers.draft_worker as dw
    from workers.local_cluster import LocalCluster

    prompts = [f"def function_{i}(x):" for i in range(args.prompts)]
    gamma: int | str = "auto" if args.gamma == "auto" else int(args.gamma)
    want = _target_only(args.target_model, prompts, args.max_new_tokens)
    stamps = _Stamped()
    recording = _recording_client(stamps)
    dw.make_client = lambda address, link_delay_ms=0.0, timeout=10.0, curve=None, **kw: recording(address,
                                                                                                timeout=timeout, **kw)
    with LocalCluster(logdir=args.logdir, cwd=ROOT) as cluster:
        cluster.start_broker()
        cluster.start_worker("target", "t0", "--model", str(args.target_model), "--slots", str(args.slots))
        cluster.wait_registered({"t0"}, timeout_s=120)
        config = dw.DraftConfig(broker=cluster.frontend, model=args.draft_model, max_new_tokens=args.max_new_tokens,
                                gamma=gamma, concurrency=args.concurrency, timeout=args.timeout, threads=1)
        worker = dw.DraftWorker(config)
        t0 = time.monotonic()
        run_task = asyncio.create_task(worker.run(prompts))
        fault: dict[str, Any] = {}
        while not run_task.done():  # wait until a full set of sessions has had a few results each
            if sum(len(t) >= args.after_results for t in stamps.times.values()) >= min(args.concurrency,
                                                                                        args.prompts):
                break
            await asyncio.sleep(0.01)
        if run_task.done():
            raise BenchmarkError("the run finished before the fault: raise --max-new-tokens")
        fault["at"] = time.monotonic()
        before = {s: len(t) for s, t in stamps.times.items()}
        fault.update(await asyncio.to_thread(_restart, cluster, args.signal, args.gap_s))
        results = await run_task
        wall = time.monotonic() - t0
    recoveries = []
    for sid, n in before.items():
        later = [t for t in stamps.times.get(sid, [])[n:] if t >= fault["started"]]
        if later:
            recoveries.append(later[0] - fault["started"])
    hit = len(recoveries)
    failed = [r for r in results if r.error]
    return {
        "signal": args.signal, "gap_s": args.gap_s, "prompts": args.prompts, "concurrency": args.concurrency,
        "max_new_tokens": args.max_new_tokens, "gamma": args.gamma, "sessions_hit": hit,
        "recovery_max_s": round(max(recoveries), 3) if recoveries else None,
        "recovery_p50_s": round(statistics.median(recoveries), 3) if recoveries else None,
        "recovery_mean_s": round(statistics.fmean(recoveries), 3) if recoveries else None,
        "old_broker_exit_s": round(fault["exited"] - fault["at"], 3),
        "new_broker_answers_s": round(fault["answering"] - fault["started"], 3),
        "failed": len(failed), "first_error": failed[0].error if failed else None,
        "reopens": sum(r.reopens for r in results),
        "lossless": [r.token_ids for r in results] == want,
        "wall_s": round(wall, 3),
    }


def _restart(cluster: Any, how: str, gap_s: float) -> dict[str, float]:
    """Stop the broker (SIGTERM: it drains; SIGKILL), wait ``gap_s``, start a new one on the same ports."""
    from broker.client import request_stats

    old = cluster.services["broker"]
    old.proc.send_signal(signal.SIGTERM if how == "term" else signal.SIGKILL)
    old.proc.wait(60)
    exited = time.monotonic()
    time.sleep(gap_s)  # the outage itself: the length of the fault being measured
    started = time.monotonic()
    cluster.start("broker-2", "broker", "--frontend", cluster.frontend, "--backend", cluster.backend)
    deadline = started + 60
    while request_stats(cluster.frontend, 0.2) is None:
        if time.monotonic() > deadline:
            raise BenchmarkError("the new broker did not answer within 60 s")
    return {"exited": exited, "started": started, "answering": time.monotonic()}


def _target_only(model: Path, prompts: list[str], max_new: int) -> list[list[int]]:
    from workers.engine import load_engine
    from workers.sampling import SamplingParams
    from workers.speculation import autoregressive_generate
    from workers.tokenizer_text import encode, load_tokenizer

    tok = load_tokenizer(model)
    engine = load_engine(model, slots=1, max_context=512)
    return [autoregressive_generate(engine, encode(tok, p), max_new, SamplingParams()).tokens for p in prompts]
