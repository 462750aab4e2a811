"""Simulator vs the real local cluster: does the simulator, given this CPU's measured costs, predict the real run?

``specmq bench sim_vs_real`` starts the real deployment on loopback (``specmq broker`` + one ``specmq target``
subprocess on the shipped ``models/tiny-target``; the drafter, ``workers.draft_worker`` on ``models/tiny-draft``, in
this process, as ``bench e2e`` does), every process with ONE torch thread. For each load (concurrent draft sessions,
closed loop: each session slot runs ``--requests`` prompts back to back, fixed γ, greedy, fixed prompts and
``--max-new-tokens``) it records throughput (new tokens / wall), the mean per-request latency and every round's
profile row (``draft --profile``). Then it simulates the same setup:

- target verify cost: a cost table measured on THIS CPU for the shipped pair (``specmq profile --model
  models/tiny-target --device cpu --threads 1``, or ``--table FILE``);
- draft: ONE draft device running all sessions, batched as the real ``DraftBatcher`` does (one ``draft_batch``
  forward per step over every ready session, waiting up to ``gather_ms`` for the rest); its step cost per batch
  size is taken from the real run's rows (``draft_ms / gamma`` by ``batch``): on this 2-core machine drafter,
  broker and target share the CPU, so the loaded number, not an idle-machine one, is what the drafter pays;
- acceptance: the real run's per-round accepted-count histogram (empirical);
- link: loopback + broker, one way = half the median of ``network_ms - queue_ms`` of the one-session run (round trip
  minus verify minus the target-side wait, which the simulator models itself);
- target ticks: ``workers.batching`` with the real target's limits (tick 2 ms, 512 tokens, 64 rows);
- send spread: the drafter's event loop sends a batch's chunks one by one; the run measures the mean gap between
  two Verify sends of one draft batch (``SendClock``) and the simulated drafter sends them that far apart
  (``draft_classes.X.send_ms``; ``--no-send-spread``: all at once). When a batch's chunks spread over more than
  tick_ms the target starts with the first ones and the sessions drift apart, in the real run and the simulator.
  The target's heartbeat counts chunks read while a tick ran (``mid_tick_chunks``) and those arriving < 5 ms after
  it started (``near_miss_chunks``: a split batch).

Two simulated columns: ``sim_table`` prices every tick with the profiled table as is; ``sim`` multiplies it by a
shared-CPU factor (``targets[].cost_scale``) chosen so the simulated mean verify time per round equals the real
rounds' ``verify_ms`` (the same "cost as measured under this load" the draft side uses; the simulator has no model
of other processes on the CPU). Prints real vs simulated throughput and mean latency with relative errors
(``--json``: one object per load), and with ``--repeat R`` the range over R real runs; ``--load-real`` re-simulates
saved real runs. ``compare(rounds)`` still calibrates a one-session simulation from a
rounds file alone (``python -m benchmarks.sim_vs_real ROUNDS.csv``).

    specmq bench sim_vs_real                       # loads 1,4,8; ~2-4 minutes on 2 cores
    specmq bench sim_vs_real --loads 1,4,8,16 --repeat 2 --json
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import BenchmarkError, print_json
from simulator.acceptance import EmpiricalAcceptance, load_rounds

HELP = "the real loopback cluster vs the simulator with this CPU's cost table, side by side"
DESCRIPTION = __doc__.split("\n\n")[0]
EXAMPLE = "specmq bench sim_vs_real --loads 1,4,8"

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "models" / "tiny-target"
DRAFT = ROOT / "models" / "tiny-draft"
TICK_MS = 2.0  # the real target's defaults (specmq target), mirrored in the simulated target
MAX_BATCH_TOKENS, MAX_BATCH_ROWS, PREFILL_CHUNK = 512, 64, 256
GATHER_MS = 2.0  # DraftConfig.gather_ms


# --------------------------------------------------------------------------- rounds-file calibration (one session)
def _read_rows(path: str | Path) -> list[dict[str, float]]:
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        data = json.loads(text)
        rows = data.get("rounds", data) if isinstance(data, dict) else data
    else:
        rows = list(csv.DictReader(text.splitlines()))
    need = ("gamma", "accepted", "draft_ms", "network_ms", "verify_ms")
    out = []
    for i, r in enumerate(rows):
        missing = [c for c in need if r.get(c) in (None, "")]
        if missing:
            raise ValueError(f"{path}: round {i}: missing column {missing[0]!r}")
        out.append({c: float(r[c]) for c in need})
    if not out:
        raise ValueError(f"{path}: no rounds")
    return out


def measured(rows: list[dict[str, float]]) -> dict[str, float]:
    round_ms = [r["draft_ms"] + r["network_ms"] + r["verify_ms"] for r in rows]
    tokens = [r["accepted"] + 1 for r in rows]
    return {"round_ms": statistics.fmean(round_ms), "tokens_per_round": statistics.fmean(tokens),
            "tok_s": sum(tokens) / (sum(round_ms) / 1000.0)}


def calibrated_config(rows: list[dict[str, float]], output_tokens: int, duration_s: float) -> dict[str, Any]:
    """A one-draft, one-target closed-loop config whose parts cost what the measured rounds say."""
    from simulator.config import load_config

    gamma = round(statistics.fmean(r["gamma"] for r in rows))
    step_ms = statistics.fmean(r["draft_ms"] / max(1.0, r["gamma"]) for r in rows)
    net = [r["network_ms"] / 2 for r in rows]  # one way; round trip = up + down
    cfg = load_config(None)
    cfg.update(duration_s=duration_s, burn_in_s=0.0, drain_s=duration_s, gamma=gamma, router="rr")
    cfg["broker"] = dict(cfg["broker"], overhead_ms=0.0)
    cfg["links"] = {"measured": {"latency_ms": statistics.fmean(net), "jitter_ms": statistics.pstdev(net),
                                 "bandwidth_mbps": 1e6, "availability": 1.0, "dist": "normal"}}
    cfg["draft_classes"] = {"measured": {"step_ms": step_ms, "link": "measured"}}
    cfg["drafts"] = {"count": 1, "sessions": 1, "mix": {"measured": 1.0}}
    cfg["targets"] = [dict(cfg["targets"][0], count=1, slots=1, tick_ms=0.0)]
    cfg["workload"] = dict(cfg["workload"], arrival="closed", think_s=0.0,
                           prompt_tokens={"dist": "constant", "value": 1},
                           output_tokens={"dist": "constant", "value": output_tokens})
    return cfg


def compare(rounds_path: str | Path, output_tokens: int = 256, duration_s: float = 60.0) -> dict[str, Any]:
    from simulator.costs import ConstantCost
    from simulator.simulation import Simulation

    rows = _read_rows(rounds_path)
    cfg = calibrated_config(rows, output_tokens, duration_s)
    sim = Simulation(cfg, costs=ConstantCost(statistics.fmean(r["verify_ms"] for r in rows)))
    sim.default_acceptance = EmpiricalAcceptance(load_rounds(rounds_path), source=str(rounds_path))
    res = sim.run()
    done = [r for r in sim.requests if r.rounds > 0 and not math.isnan(r.finished)]
    sim_round_ms = statistics.fmean((r.finished - r.first_token) * 1000 / r.rounds for r in done)
    real = measured(rows)
    simulated = {"round_ms": sim_round_ms, "tokens_per_round": res["tokens_per_round"],
                 "tok_s": res["tokens_per_round"] / (sim_round_ms / 1000.0)}
    return {"real": real, "sim": simulated,
            "ratio": {k: simulated[k] / real[k] for k in real if real[k]}, "rounds": len(rows)}


# --------------------------------------------------------------------------- the real cluster
class Cluster:
    """``specmq broker`` + one ``specmq target`` (torch threads 1) as subprocesses (``workers.local_cluster``);
    ``close`` stops both."""

    def __init__(self, slots: int, logdir: Path, pin: bool = False) -> None:
        from workers.local_cluster import LocalCluster

        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        self.cluster = LocalCluster(logdir=logdir, env=env, cwd=ROOT)
        self.frontend, self.backend = self.cluster.frontend, self.cluster.backend
        hb = ["--heartbeat-interval", "0.5", "--liveness", "20", "--log-level", "warning"]
        self.cluster.start_broker(*hb, cpu=0 if pin else None)
        self.cluster.start_worker("target", "target", "--model", str(TARGET), "--slots", str(slots), "--tick-ms",
                                  str(TICK_MS), "--max-batch-tokens", str(MAX_BATCH_TOKENS), "--max-batch-rows",
                                  str(MAX_BATCH_ROWS), "--prefill-chunk", str(PREFILL_CHUNK), *hb,
                                  cpu=1 if pin else None)

    def wait_ready(self, timeout: float = 120.0) -> None:
        self.cluster.wait_registered({"target"}, timeout_s=timeout)  # ClusterError names the process and its log

    def target_stats(self) -> dict[str, float]:
        """The target's counters (ticks, rows, mid_tick_chunks, near_miss_chunks) from a heartbeat newer than the
        last call."""
        time.sleep(0.6)  # heartbeats every 0.5 s
        st = ((self.cluster.snapshot(1.0) or {}).get("workers") or {}).get("target", {}).get("stats", {})
        return {k: float(st.get(k, 0) or 0) for k in ("ticks", "rows", "mid_tick_chunks", "near_miss_chunks")}

    def close(self) -> None:
        self.cluster.stop(grace_s=15.0)


class SendClock:
    """Instruments the in-process drafter: when each draft_batch ended and when each Verify left.

    ``send_ms()`` is the mean gap between two chunks of one draft batch leaving the drafter (its event loop sends
    them one by one): what spreads a batch's arrivals at the target (simulated ``draft_classes.X.send_ms``)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []  # (perf_counter, "draft" | "verify")

    def __enter__(self) -> "SendClock":
        import workers.draft_worker as dw
        import workers.speculation as sp
        from protocol.messages import Verify

        clock, self._saved = self, (sp.draft_batch, dw.make_client)
        real_batch, real_client = self._saved

        def draft_batch(*a: Any, **kw: Any) -> Any:
            out = real_batch(*a, **kw)
            clock.events.append((time.perf_counter(), "draft"))
            return out

        def make_client(*a: Any, **kw: Any) -> Any:
            client = real_client(*a, **kw)
            send = client.send

            async def timed_send(msg: Any) -> None:
                if isinstance(msg, Verify):
                    clock.events.append((time.perf_counter(), "verify"))
                await send(msg)

            client.send = timed_send
            return client

        sp.draft_batch, dw.make_client = draft_batch, make_client
        return self

    def __exit__(self, *exc: Any) -> None:
        import workers.draft_worker as dw
        import workers.speculation as sp

        sp.draft_batch, dw.make_client = self._saved

    def send_ms(self) -> float | None:
        gaps: list[float] = []
        burst: list[float] = []
        for t, kind in self.events + [(math.inf, "draft")]:
            if kind == "draft":
                if len(burst) > 1:
                    gaps.append((burst[-1] - burst[0]) * 1000.0 / (len(burst) - 1))
                burst = []
            else:
                burst.append(t)
        return statistics.fmean(gaps) if gaps else None


def run_real(cluster: Cluster, engine: Any, prompts: list[str], sessions: int, max_new: int,
             gamma: int) -> dict[str, Any]:
    """One closed-loop run: ``sessions`` slots work through ``prompts``; throughput, latencies and round rows.

    The draft engine is loaded once outside the timed part (a drafter that is up, not one starting)."""
    from workers.draft_worker import DraftConfig, DraftWorker

    cfg = DraftConfig(broker=cluster.frontend, model=DRAFT, max_new_tokens=max_new, gamma=gamma,
                      concurrency=sessions, threads=1, timeout=60.0, gather_ms=GATHER_MS)
    worker = DraftWorker(cfg, engine=engine)
    st0 = cluster.target_stats()
    with SendClock() as clock:
        t0 = time.perf_counter()
        results = asyncio.run(worker.run(prompts))
        wall = time.perf_counter() - t0
    st1 = cluster.target_stats()
    ticks = st1.get("ticks", 0) - st0.get("ticks", 0)
    delta = {k: st1.get(k, 0) - st0.get(k, 0) for k in ("rows", "mid_tick_chunks", "near_miss_chunks")}
    errors = [r.error for r in results if r.error]
    tokens = sum(r.new_tokens for r in results)
    rows = [{c: getattr(r, c) for c in ("session", "round", "gamma", "accepted", "draft_ms", "network_ms",
                                        "verify_ms", "queue_ms", "batch")} for r in worker.rows]
    return {"tok_s": tokens / wall, "latency_ms": 1000 * statistics.fmean(r.wall_s for r in results),
            "wall_s": wall, "tokens": tokens, "requests": len(results), "errors": len(errors),
            "first_error": errors[0] if errors else None, "rows": rows,
            "new_tokens": [r.new_tokens for r in results], "prompt_tokens": [len(r.prompt_ids) for r in results],
            "tick_rows": delta["rows"] / ticks if ticks > 0 else None, "ticks": ticks,
            "mid_tick_chunks": delta["mid_tick_chunks"], "near_miss_chunks": delta["near_miss_chunks"],
            "chunks": len(rows), "send_ms": clock.send_ms()}


# --------------------------------------------------------------------------- the simulated cluster
def link_one_way_ms(rows: list[dict[str, Any]]) -> float:
    """Loopback + broker + the target loop's handling, one way: half the median of network_ms - queue_ms."""
    return max(0.0, statistics.median(r["network_ms"] - r["queue_ms"] for r in rows) / 2)


def draft_step_by_batch(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Mean draft step ms (draft_ms / gamma) per batch size, as the real drafter paid it under this load."""
    by: dict[int, list[float]] = {}
    for r in rows:
        by.setdefault(int(r["batch"]), []).append(r["draft_ms"] / max(1, r["gamma"]))
    return {b: statistics.fmean(v) for b, v in sorted(by.items())}


def sim_config(*, sessions: int, requests_per_session: int, prompt_tokens: list[int], max_new: int, gamma: int,
               table: str, link_ms: float, draft_steps: dict[int, float], slots: int, seed: int = 0,
               send_ms: float = 0.0) -> dict[str, Any]:
    from simulator.config import load_config

    cfg = load_config(None)
    cfg.update(seed=seed, duration_s=600.0, burn_in_s=0.0, drain_s=0.0, sample_ms=1000.0, gamma=gamma, router="rr", costs=table)
    cfg["broker"] = dict(cfg["broker"], overhead_ms=0.0)  # inside link_ms (measured end to end)
    cfg["links"] = {"loopback": {"latency_ms": link_ms, "jitter_ms": 0.0, "bandwidth_mbps": 1e5,
                                 "availability": 1.0, "dist": "constant"}}
    cfg["draft_classes"] = {"cpu": {"step_ms": {int(b): float(v) for b, v in draft_steps.items()}, "link": "loopback",
                                    "batched": True, "gather_ms": GATHER_MS, "send_ms": send_ms}}
    cfg["drafts"] = {"count": 1, "sessions": sessions, "mix": {"cpu": 1.0}}
    cfg["targets"] = [dict(cfg["targets"][0], name="t", count=1, slots=slots, tick_ms=TICK_MS,
                           max_batch_tokens=MAX_BATCH_TOKENS, max_batch_rows=MAX_BATCH_ROWS,
                           prefill_chunk=PREFILL_CHUNK)]
    # the real target prefills prompt[:-1] and its first committed token comes from the first round: simulate
    # prompt - 1 cached tokens and max_new + 1 output tokens (the open's "first token" is the pending prompt token)
    cfg["workload"] = dict(cfg["workload"], arrival="closed", think_s=0.0, requests_per_user=requests_per_session,
                           prompt_tokens={"dist": "choice", "values": [max(1, p - 1) for p in prompt_tokens]},
                           output_tokens={"dist": "constant", "value": max_new + 1})
    return cfg


def run_sim(cfg: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Simulate; throughput and latency as the real run measures them, plus the target's tick shapes."""
    from simulator.simulation import Simulation

    sim = Simulation(cfg)
    sim.default_acceptance = EmpiricalAcceptance([(int(r["gamma"]), int(r["accepted"])) for r in rows],
                                                 source="real rounds")
    per_chunk: list[tuple[int, float]] = []
    sim.targets[0].on_tick = lambda start, waits, service: per_chunk.append((len(waits), service))
    sim.run()
    done = [r for r in sim.requests if not math.isnan(r.finished)]
    makespan = max(r.finished for r in done)
    tokens = sum(r.committed - 1 for r in done)
    st = sim.targets[0].stats
    chunks = sum(n for n, _ in per_chunk)
    return {"tok_s": tokens / makespan, "latency_ms": 1000 * statistics.fmean(r.finished - r.arrival for r in done),
            "wall_s": makespan, "tokens": tokens, "requests": len(done),
            "verify_ms": 1000 * sum(n * s for n, s in per_chunk) / chunks if chunks else math.nan,
            "tick_rows": st.rows / st.ticks if st.ticks else math.nan}


def simulate_load(cfg: dict[str, Any], rows: list[dict[str, Any]], seeds: int = 3) -> dict[str, Any]:
    sims = [run_sim(dict(cfg, seed=s), rows) for s in range(seeds)]
    return {k: statistics.fmean(s[k] for s in sims) for k in ("tok_s", "latency_ms", "verify_ms", "tick_rows")}


# --------------------------------------------------------------------------- the benchmark
def profile_table(out: Path, contexts: str, reps: int) -> str:
    """``specmq profile`` of the shipped pair on this CPU, one torch thread (as the target runs)."""
    cmd = [sys.executable, "-m", "specmq.cli", "profile", "--model", str(TARGET), "--draft-model", str(DRAFT),
           "--device", "cpu", "--threads", "1", "--out", str(out), "--batches", "1,2,4,8,16",
           "--tokens", "1,5,16,64", "--contexts", contexts, "--reps", str(reps)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return str(out)


def measure_real(args: argparse.Namespace, loads: list[int], work: Path) -> dict[int, list[dict[str, Any]]]:
    from benchmarks.e2e import heldout_prompts

    prompts = heldout_prompts(max(loads) * args.requests)
    cluster = Cluster(max(loads), work, pin=args.pin)
    reals: dict[int, list[dict[str, Any]]] = {n: [] for n in loads}
    try:
        from workers.engine import load_engine

        engine = load_engine(DRAFT, slots=max(loads), max_context=1024)
        cluster.wait_ready()
        run_real(cluster, engine, prompts[:2], 2, 8, args.gamma)  # warm-up: first ticks
        for _ in range(args.repeat):  # loads interleaved, so drifting machine load spreads over all of them
            for n in loads:
                r = run_real(cluster, engine, prompts[:n * args.requests], n, args.max_new_tokens, args.gamma)
                if r["errors"]:
                    raise BenchmarkError(f"real run with {n} sessions: {r['errors']} failed: {r['first_error']}")
                reals[n].append(r)
    finally:
        cluster.close()
    return reals


def rel(sim: float, real: float) -> float:
    return (sim - real) / real if real else math.nan


def run(args: argparse.Namespace) -> int:
    import torch

    from benchmarks.e2e import _parse_list

    torch.set_num_threads(1)
    loads = _parse_list(args.loads, "loads")
    if args.requests < 1 or args.repeat < 1 or args.max_new_tokens < 2 or args.gamma < 1:
        raise BenchmarkError("--requests, --repeat, --gamma must be >= 1 and --max-new-tokens >= 2")
    work = Path(tempfile.mkdtemp(prefix="specmq-simreal-"))
    t_start = time.perf_counter()
    if args.load_real:  # re-simulate a saved real run (no cluster, no profiling)
        try:
            saved = json.loads(Path(args.load_real).read_text())
        except (OSError, ValueError) as exc:
            raise BenchmarkError(f"--load-real {args.load_real}: {exc}") from None
        reals = {int(n): v for n, v in saved["reals"].items()}
        loads, table = sorted(reals), args.table or saved["table"]
        args.gamma, args.max_new_tokens, args.requests = saved["gamma"], saved["max_new_tokens"], saved["requests"]
    else:
        table = args.table or profile_table(work / "cpu-tiny-pair-t1.yaml", args.contexts, args.reps)
        if not Path(table).is_file():
            raise BenchmarkError(f"--table {table}: not found")
        reals = measure_real(args, loads, work)
        dump = work / "real.json"
        dump.write_text(json.dumps({"reals": reals, "table": table, "gamma": args.gamma,
                                    "max_new_tokens": args.max_new_tokens, "requests": args.requests}))
        print(f"real runs saved to {dump} (re-simulate with --load-real)", file=sys.stderr)
    one = [row for r in reals[min(loads)] for row in r["rows"]]
    link_ms = link_one_way_ms(one)
    out: list[dict[str, Any]] = []
    for n in loads:
        runs = reals[n]
        rows = [row for r in runs for row in r["rows"]]
        steps = draft_step_by_batch(rows)
        sends = [r["send_ms"] for r in runs if r.get("send_ms") is not None]
        send_ms = statistics.fmean(sends) if sends and not args.no_send_spread else 0.0
        cfg = sim_config(sessions=n, requests_per_session=args.requests, prompt_tokens=runs[0]["prompt_tokens"],
                         max_new=args.max_new_tokens, gamma=args.gamma, table=table, link_ms=link_ms,
                         draft_steps=steps, slots=max(loads), send_ms=send_ms)
        plain = simulate_load(cfg, rows)
        # shared CPU: the target's forwards ran slower than the profile by what the real rounds' verify_ms say
        # (a fixed point: slower ticks change the batch shapes, so the scale is refined once on the scaled run)
        real_verify = statistics.fmean(r["verify_ms"] for r in rows)
        scale, shared = 1.0, plain
        for _ in range(2):
            scale *= real_verify / shared["verify_ms"]
            cfg["targets"][0]["cost_scale"] = scale
            shared = simulate_load(cfg, rows)
        real_tok = [r["tok_s"] for r in runs]
        real_lat = [r["latency_ms"] for r in runs]
        rt, rl = statistics.fmean(real_tok), statistics.fmean(real_lat)
        ticks = [r["tick_rows"] for r in runs if r.get("tick_rows")]
        rec = {"sessions": n, "gamma": args.gamma, "max_new_tokens": args.max_new_tokens,
               "requests": n * args.requests, "repeats": len(runs),
               "real_tok_s": round(rt, 2), "real_tok_s_range": [round(min(real_tok), 2), round(max(real_tok), 2)],
               "real_latency_ms": round(rl, 1), "real_latency_ms_range": [round(min(real_lat), 1),
                                                                          round(max(real_lat), 1)]}
        for name, sim in (("sim", shared), ("sim_table", plain)):
            rec.update({f"{name}_tok_s": round(sim["tok_s"], 2), f"{name}_tok_s_err": round(rel(sim["tok_s"], rt), 4),
                        f"{name}_latency_ms": round(sim["latency_ms"], 1),
                        f"{name}_latency_err": round(rel(sim["latency_ms"], rl), 4),
                        f"{name}_within_15pct": abs(rel(sim["tok_s"], rt)) <= 0.15
                        and abs(rel(sim["latency_ms"], rl)) <= 0.15,
                        f"{name}_verify_ms": round(sim["verify_ms"], 2), f"{name}_tick_rows": round(sim["tick_rows"], 2)})
        rec.update({
            "verify_cost_scale": round(scale, 3), "real_verify_ms": round(real_verify, 2),
            "real_tick_rows": round(statistics.fmean(ticks), 2) if ticks else None,
            "acceptance": round(sum(r["accepted"] for r in rows) / sum(r["gamma"] for r in rows), 3),
            "tokens_per_round": round(statistics.fmean(r["accepted"] + 1 for r in rows), 3),
            "draft_step_ms_by_batch": {b: round(v, 3) for b, v in steps.items()},
            "real_draft_batch": round(statistics.fmean(r["batch"] for r in rows), 2),
            "real_queue_ms": round(statistics.fmean(r["queue_ms"] for r in rows), 2),
            "link_one_way_ms": round(link_ms, 3), "send_ms": round(send_ms, 3),
            "mid_tick_chunks": sum(r.get("mid_tick_chunks", 0) for r in runs),
            "near_miss_chunks": sum(r.get("near_miss_chunks", 0) for r in runs),
            "chunks": sum(r.get("chunks", len(r["rows"])) for r in runs), "table": table})
        out.append(rec)
    if args.json:
        for rec in out:
            print_json(rec)
    else:
        print_report(out)
        print(f"table {table}; total wall {time.perf_counter() - t_start:.0f} s")
    return 0


def print_report(out: list[dict[str, Any]]) -> None:
    print("sim = profiled table x shared-CPU scale (real verify_ms / simulated); sim_table = table as profiled")
    print(f"{'sessions':>8} {'real tok/s (range)':>21} {'sim':>7} {'err':>7} {'sim_tab':>7} {'err':>7} "
          f"{'real lat ms (range)':>22} {'sim':>6} {'err':>7} {'sim_tab':>7} {'err':>7}  sim within 15%")
    for r in out:
        lo, hi = r["real_tok_s_range"]
        llo, lhi = r["real_latency_ms_range"]
        print(f"{r['sessions']:>8} {r['real_tok_s']:>7.1f} ({lo:5.1f}-{hi:5.1f}) {r['sim_tok_s']:>7.1f} "
              f"{r['sim_tok_s_err']:>+7.1%} {r['sim_table_tok_s']:>7.1f} {r['sim_table_tok_s_err']:>+7.1%} "
              f"{r['real_latency_ms']:>6.0f} ({llo:5.0f}-{lhi:5.0f}) {r['sim_latency_ms']:>6.0f} "
              f"{r['sim_latency_err']:>+7.1%} {r['sim_table_latency_ms']:>7.0f} {r['sim_table_latency_err']:>+7.1%}  "
              f"{'yes' if r['sim_within_15pct'] else 'NO'}")
    for r in out:
        print(f"  n={r['sessions']}: acceptance {r['acceptance']}, tokens/round {r['tokens_per_round']}; verify ms "
              f"real {r['real_verify_ms']} / table {r['sim_table_verify_ms']} (scale {r['verify_cost_scale']}); tick "
              f"rows real {r['real_tick_rows']} sim {r['sim_tick_rows']}; draft batch {r['real_draft_batch']}, step ms "
              f"{r['draft_step_ms_by_batch']}; link {r['link_one_way_ms']} ms one way; send gap {r['send_ms']} ms; "
              f"chunks read mid-tick {r['mid_tick_chunks']}/{r['chunks']} (near misses <5 ms: {r['near_miss_chunks']})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loads", default="1,4,8", help="concurrent draft sessions per run (default: 1,4,8)")
    p.add_argument("--requests", type=int, default=2, help="prompts each session slot runs back to back (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per prompt (default: 48)")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per round (default: 4)")
    p.add_argument("--repeat", type=int, default=2, help="real runs per load (default: 2)")
    p.add_argument("--table", default="", help="cost table to use instead of profiling this CPU first")
    p.add_argument("--contexts", default="64,128,256", help="profiled context points (default: 64,128,256)")
    p.add_argument("--reps", type=int, default=5, help="profiled steps per point (default: 5)")
    p.add_argument("--pin", action="store_true", help="pin the broker to CPU 0 and the target to CPU 1")
    p.add_argument("--no-send-spread", action="store_true",
                   help="simulate a draft batch's chunks leaving at once (send_ms 0, the old lock-step model)")
    p.add_argument("--load-real", default="", help="re-simulate the real runs saved by an earlier run (real.json)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sim_vs_real",
                                description="calibrate a one-session simulation from a rounds file")
    p.add_argument("rounds", help="rounds CSV/JSON from specmq draft --profile")
    p.add_argument("--output-tokens", type=int, default=256)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        out = compare(args.rounds, args.output_tokens)
    except (OSError, ValueError) as exc:
        print(f"sim_vs_real: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out))
    else:
        for k in out["real"]:
            print(f"{k:<18} real {out['real'][k]:10.2f}   sim {out['sim'][k]:10.2f}   sim/real {out['ratio'][k]:.3f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
