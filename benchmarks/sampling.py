"""Sampling at the speed of greedy: one session's round cost, greedy vs temperature > 0, at the same γ.

``specmq broker`` + ``specmq target`` run as subprocesses; the drafter (``workers.draft_worker``) runs in this
process with one session at a time over held-out prompts (``benchmarks.e2e.heldout_prompts``). The two modes
alternate prompt by prompt (``--repeats`` passes), so load bursts on a shared machine hit both alike. Per mode, over
the rounds drafted at the full γ (a prompt's last round may be shorter): ``draft_ms`` (draft forwards and sampling),
``verify_ms`` (the target's tick: forward and acceptance), ``network_ms`` (round trip minus verify: encode, link,
broker, decode, drafter loop) and their sum ``round_ms``. The goal: a sampled round costs at most ``--goal`` times a
greedy one (``ratio`` of the median rounds; the means are shown too). At temperature > 0 without top-k/top-p, each draft token carries a full-vocabulary q.
Wall times on a shared machine move with its load; the CPU time each process spends per round (``cpu_*_ms``, from
/proc on Linux) does not, and says which process pays for sampling.

    specmq bench sampling
    specmq bench sampling --temperature 0.8 --top-p 0.95 --repeats 3 --json
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import BenchmarkError, print_json

HELP = "per-round draft / verify / network ms of one session, greedy vs sampled, at the same gamma"
DESCRIPTION = __doc__.split("\n\n")[0]
EXAMPLE = "specmq bench sampling --repeats 2 --json"
PARTS = ("draft_ms", "verify_ms", "network_ms", "round_ms")
CPU_PARTS = ("cpu_drafter_ms", "cpu_broker_ms", "cpu_target_ms")


def process_cpu_ms(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), or None where that is not available."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1000.0 / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Mode:
    """One way of drafting (greedy or sampled): its own ``DraftWorker`` over one loaded draft engine, and what its
    prompts measured so far. ``run`` drafts one prompt, so the benchmark can interleave the modes prompt by prompt
    and load bursts on a shared machine land on both alike."""

    def __init__(self, name: str, frontend: str, args: argparse.Namespace, temperature: float, engine: Any) -> None:
        from benchmarks.e2e import DRAFT
        from workers.draft_worker import DraftConfig, DraftWorker

        sampled = temperature > 0
        cfg = DraftConfig(broker=frontend, model=DRAFT, max_new_tokens=args.max_new_tokens, gamma=args.gamma,
                          max_gamma=max(8, args.gamma), concurrency=1, threads=args.threads, timeout=30.0,
                          temperature=temperature, top_p=args.top_p if sampled else 1.0,
                          top_k=args.top_k if sampled else 0, seed=args.seed)
        self.name, self.gamma = name, args.gamma
        self.worker = DraftWorker(cfg, engine=engine)
        self.tokens = self.drafted = self.accepted = 0
        self.wall_s = 0.0
        self.cpu: dict[str, float | None] = {}

    def run(self, prompt: str, pids: dict[str, int]) -> None:
        """Draft one prompt; add its rounds, tokens, wall time and the CPU ms each process spent (``pids``: broker,
        target; the drafter is this process)."""
        cpu0 = {name: process_cpu_ms(pid) for name, pid in pids.items()}
        t0, own0 = time.perf_counter(), time.process_time()
        (res,) = asyncio.run(self.worker.run([prompt]))
        self.wall_s += time.perf_counter() - t0
        spent = {"cpu_drafter_ms": (time.process_time() - own0) * 1000.0}
        for name, pid in pids.items():
            now = process_cpu_ms(pid)
            spent[f"cpu_{name}_ms"] = None if now is None or cpu0[name] is None else now - cpu0[name]
        for part, ms in spent.items():
            old = self.cpu.get(part, 0.0)
            self.cpu[part] = None if ms is None or old is None else old + ms
        if res.error:
            raise BenchmarkError(f"{self.name}: prompt failed: {res.error}")
        self.tokens += res.new_tokens
        self.drafted += res.drafted
        self.accepted += res.accepted

    def summary(self) -> dict[str, Any]:
        rows = [r for r in self.worker.rows if r.gamma == self.gamma]  # the last round of a prompt may be shorter
        if not rows:
            raise BenchmarkError(f"{self.name}: no round at gamma {self.gamma} (raise --max-new-tokens)")
        out: dict[str, Any] = {"mode": self.name, "gamma": self.gamma, "rounds": len(rows),
                               "tok_s": round(self.tokens / self.wall_s, 2) if self.wall_s else None,
                               "acceptance": round(self.accepted / self.drafted, 3) if self.drafted else None}
        parts = {"draft_ms": [r.draft_ms for r in rows], "verify_ms": [r.verify_ms for r in rows],
                 "network_ms": [r.network_ms for r in rows],
                 "round_ms": [r.draft_ms + r.network_ms + r.verify_ms for r in rows]}
        for part, values in parts.items():
            out[part] = round(statistics.fmean(values), 3)
        out["round_ms_median"] = round(statistics.median(parts["round_ms"]), 3)
        every = len(self.worker.rows)  # CPU time cannot be split by γ: per round, every round
        for part in CPU_PARTS:
            ms = self.cpu.get(part)
            out[part] = None if ms is None or not every else round(ms / every, 3)
        return out


def compare(greedy: dict[str, Any], sampled: dict[str, Any], goal: float) -> dict[str, Any]:
    """Sampled over greedy, per part and for the whole round; ``ok``: the median round's ratio meets ``goal`` (the
    median, since a preempted round on a shared machine can weigh on one mode's mean alone)."""
    out: dict[str, Any] = {"mode": "ratio"}
    for part in PARTS + ("round_ms_median",) + CPU_PARTS:
        out[part] = round(sampled[part] / greedy[part], 3) if greedy.get(part) and sampled.get(part) else None
    out["goal"] = goal
    out["ok"] = out["round_ms_median"] is not None and out["round_ms_median"] <= goal
    return out


COLUMNS = ("mode", "rounds", "tok_s", "acceptance", "draft_ms", "verify_ms", "network_ms", "round_ms",
           "round_ms_median")


def print_rows(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    widths = [max(len(c), 9) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(("-" if r.get(c) is None else str(r[c])).rjust(w) for c, w in zip(columns, widths)),
              flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from benchmarks.e2e import DRAFT, Services, heldout_prompts
    from workers.draft_worker import TextCodec
    from workers.engine import load_engine

    if args.gamma < 1 or args.max_new_tokens <= args.gamma or args.prompts < 1 or args.repeats < 1:
        raise BenchmarkError("need --gamma >= 1, --max-new-tokens > gamma, --prompts >= 1 and --repeats >= 1")
    if not args.temperature > 0:
        raise BenchmarkError(f"--temperature must be > 0 (the sampled mode), got {args.temperature}")
    torch.set_num_threads(args.threads)
    prompts = heldout_prompts(args.prompts)
    longest = max(len(TextCodec(DRAFT).encode(p)) for p in prompts)
    engine = load_engine(DRAFT, slots=1, max_context=longest + args.max_new_tokens + max(8, args.gamma) + 8)
    svc = Services(args.threads, 4, Path(tempfile.mkdtemp(prefix="specmq-sampling-")), fused=False)
    try:
        svc.wait_ready()
        pids = {name: s.proc.pid for name, s in getattr(getattr(svc, "cluster", None), "services", {}).items()}
        for temp in (0.0, args.temperature):  # warm-up: first ticks, both code paths
            Mode("warm-up", svc.frontend, args, temp, engine).run(prompts[0], {})
        greedy = Mode("greedy", svc.frontend, args, 0.0, engine)
        sampled = Mode("sampled", svc.frontend, args, args.temperature, engine)
        for _ in range(args.repeats):
            for prompt in prompts:  # interleaved: load bursts hit both modes alike
                greedy.run(prompt, pids)
                sampled.run(prompt, pids)
    finally:
        svc.close()
    rows = [greedy.summary(), sampled.summary()]
    ratio = compare(rows[0], rows[1], args.goal)
    setup = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
             "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
             "torch_threads": args.threads, "gamma": args.gamma, "max_new_tokens": args.max_new_tokens,
             "prompts": args.prompts, "repeats": args.repeats, "temperature": args.temperature,
             "top_p": args.top_p, "top_k": args.top_k}
    if args.json:
        for row in rows + [ratio]:
            print_json(row)
        print_json({"setup": setup})
    else:
        print_rows(rows + [ratio], COLUMNS)
        print("CPU ms per round, every process:")
        print_rows(rows + [ratio], ("mode",) + CPU_PARTS)
        verdict = "meets" if ratio["ok"] else "misses"
        print(f"sampled round / greedy round = {ratio['round_ms_median']} median, {ratio['round_ms']} mean "
              f"({verdict} the goal <= {args.goal}); "
              f"machine: {setup['machine']}, {setup['cpus']} CPUs, load {setup['load_avg_1m']}, "
              f"{args.threads} torch thread(s) per process")
    return 0 if ratio["ok"] or not args.check else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per round, both modes (default: 4)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt (default: 64)")
    p.add_argument("--prompts", type=int, default=10, help="held-out prompts, one session at a time (default: 10)")
    p.add_argument("--temperature", type=float, default=0.8, help="the sampled mode's temperature (default: 0.8)")
    p.add_argument("--top-p", type=float, default=1.0, help="the sampled mode's top-p (default: 1, off)")
    p.add_argument("--top-k", type=int, default=0, help="the sampled mode's top-k (default: 0, off)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the sampled mode (default: 0)")
    p.add_argument("--repeats", type=int, default=2, help="greedy/sampled passes, alternating (default: 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    p.add_argument("--goal", type=float, default=1.15, help="largest sampled/greedy round ratio (default: 1.15)")
    p.add_argument("--check", action="store_true", help="exit 1 when the round ratio misses --goal")
