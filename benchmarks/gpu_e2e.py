"""End-to-end on a GPU: broker + a CUDA target worker + N concurrent draft sessions vs target-only decoding.

One run, with the same N prompts (``benchmarks.e2e.heldout_prompts``) and greedy sampling throughout:

- ``target-only`` (``batched``): our engine on the target's device, every prompt at once, one token per session
  per step, all unfinished sessions in ONE forward: what a target serving N users without speculation does.
- ``target-only`` (``single``): the same engine, one session at a time (``--single-prompts`` prompts).
- ``distributed``: ``specmq broker`` + one ``specmq target --backend cuda`` subprocess; the N sessions are drafted
  by ``--draft-procs`` processes (``draft_proc`` below), each running ``workers.draft_worker`` over its share with
  batched drafting, on ``--draft-device`` (default cpu: the drafts of users' laptops).
- ``fused`` (``--fused``): one ``specmq fused`` worker on the same device, fed by ``specmq generate``'s client.

Per row: aggregate tokens/s (all tokens / wall), tokens/s per session, acceptance, alpha, mean accepted tokens per
round, the target's mean batch rows per tick (delta of its heartbeat counters), aggregate speedups over the two
target-only rows, and ``lossless``: the fraction of sessions whose tokens equal the batched target-only tokens
(``lossless_single``: against the one-at-a-time run, its prompts only). Batched bf16 on a GPU may flip rare
near-tied argmaxes (different batch shapes, different reductions): reported, not asserted; float32 on CPU gives 1.0.

On a CPU (``--device cpu``) the same pipeline runs with the static-shape CUDA engine without graphs, so it can be
tested anywhere.

    specmq bench gpu_e2e --json                                  # cuda: 64 sessions, gamma 4, 128 tokens
    specmq bench gpu_e2e --device cpu --sessions 8 --max-new-tokens 16 --gammas 2,4
"""
from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.e2e import (DRAFT, ROOT, TARGET, Services, _parse_list, _row, bench_fused, child_env,
                            heldout_prompts, print_table)
from benchmarks import BenchmarkError, print_json, quiet_logs

HELP = "broker + CUDA target worker + N draft sessions vs target-only decoding (tokens/s)"
DESCRIPTION = __doc__.split("\n\n")[0]
EXAMPLE = ("specmq bench gpu_e2e --json --gammas 2,4 --fused\n"
           "  specmq bench gpu_e2e --device cpu --sessions 8 --max-new-tokens 16")
RUN_TIMEOUT_S = 300.0  # one distributed run, all draft processes
COLUMNS = ("arch", "mode", "gamma", "sessions", "tok_s_aggregate", "tok_s_session", "acceptance", "alpha",
           "mean_accepted", "target_batch", "speedup_batched", "speedup_single", "lossless", "errors")


def progress(msg: str) -> None:
    print(f"gpu_e2e: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- target-only
def batched_greedy(engine: Any, prompts: Sequence[Sequence[int]], max_new: int, chunk: int = 256
                   ) -> tuple[list[list[int]], int, int]:
    """Target-only greedy decoding of every prompt at once: chunked prefill of all prompts together, then one
    forward a step with one row per unfinished session. Returns (tokens per prompt, forwards, rows) of the decode."""
    import torch

    from workers.speculation import eos_ids

    stop = eos_ids(engine.info)
    slots: list[int] = []
    try:
        for _ in prompts:
            slots.append(engine.allocate())
        bodies = [list(p[:-1]) for p in prompts]
        for start in range(0, max(map(len, bodies), default=0), chunk):
            rows = [(s, b[start:start + chunk]) for s, b in zip(slots, bodies) if len(b) > start]
            engine.forward(rows, last_only=[True] * len(rows))
        pending = [int(p[-1]) for p in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        live = list(range(len(prompts))) if max_new > 0 else []
        forwards = rows_total = 0
        while live:
            logits = engine.forward([(slots[i], [pending[i]]) for i in live], last_only=[True] * len(live))
            nxt = torch.cat(logits).argmax(-1).tolist()
            forwards, rows_total = forwards + 1, rows_total + len(live)
            for i, t in zip(live, nxt):
                out[i].append(t)
                pending[i] = t
            live = [i for i in live if len(out[i]) < max_new and out[i][-1] not in stop]
        return out, forwards, rows_total
    finally:
        for s in slots:
            engine.free(s)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def bench_batched(engine: Any, ids: list[list[int]], max_new: int, device: str, warmup: int
                  ) -> tuple[dict, list[list[int]]]:
    for _ in range(warmup):  # captures the graphs of every (batch, span) bucket the run meets
        batched_greedy(engine, ids, max_new)
    _sync(device)
    t0 = time.perf_counter()
    out, forwards, rows = batched_greedy(engine, ids, max_new)
    _sync(device)
    wall = time.perf_counter() - t0
    res = [{"new_tokens": len(o), "tokens_per_s": len(o) / wall} for o in out]
    row = _row("target-only", None, len(ids), 0.0, res, wall, rows / forwards if forwards else None)
    row["mode"] = "batched"
    return row, out


def bench_single(engine: Any, ids: list[list[int]], max_new: int, device: str, warmup: int
                 ) -> tuple[dict, list[list[int]]]:
    from workers.sampling import SamplingParams
    from workers.speculation import autoregressive_generate

    for _ in range(warmup):  # the graphs of batch 1 at every span these prompts reach
        for p in ids:
            autoregressive_generate(engine, p, max_new, SamplingParams())
    res, out = [], []
    _sync(device)
    t_all = time.perf_counter()
    for p in ids:
        t0 = time.perf_counter()
        toks = autoregressive_generate(engine, p, max_new, SamplingParams()).tokens
        dt = time.perf_counter() - t0
        out.append(toks)
        res.append({"new_tokens": len(toks), "tokens_per_s": len(toks) / dt})
    row = _row("target-only", None, 1, 0.0, res, time.perf_counter() - t_all, 1.0)
    row["mode"] = "single"
    return row, out


def match_fraction(got: Sequence[Sequence[int]], want: Sequence[Sequence[int]]) -> float | None:
    """Fraction of sessions whose tokens equal ``want``'s, over the first ``len(want)`` sessions."""
    n = min(len(got), len(want))
    return round(sum(list(g) == list(w) for g, w in zip(got[:n], want[:n])) / n, 4) if n else None


# --------------------------------------------------------------------------- draft processes
def draft_proc() -> None:
    """A draft process: ``python -c 'from benchmarks.gpu_e2e import draft_proc; draft_proc()' SPEC_JSON``.

    Loads the draft engine once, answers ``{"ready": true}``, then for each JSON command line on stdin
    (``{"prompts": [...], "gamma": g, "max_new": n}``) runs ``DraftWorker`` over those prompts (all concurrent,
    batched drafting) and answers one JSON line: wall-clock start and end, per-prompt results. Replies travel on
    the original stdout; anything else printed goes to stderr (the process's log).
    """
    import asyncio

    spec = json.loads(sys.argv[1])
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    quiet_logs(spec.get("log_level", "warning"))
    import torch

    torch.set_num_threads(spec["threads"])
    from workers.draft_worker import DraftConfig, DraftError, DraftWorker, TextCodec
    from workers.engine import load_engine

    engine = load_engine(DRAFT, device=spec["device"], dtype=spec["dtype"], slots=spec["slots"],
                         max_context=spec["max_context"])
    codec = TextCodec(DRAFT)
    slot = engine.allocate()  # warm-up: the first forwards of a process are slow (allocator, kernels)
    engine.forward([(slot, list(range(3, 19)))], last_only=[True])
    engine.free(slot)
    reply.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        cfg = DraftConfig(broker=spec["broker"], model=DRAFT, max_new_tokens=cmd["max_new"], gamma=cmd["gamma"],
                          max_gamma=max(8, cmd["gamma"]), concurrency=max(1, len(cmd["prompts"])),
                          timeout=cmd.get("timeout", 60.0))
        t0 = time.time()
        worker = DraftWorker(cfg, engine=engine, codec=codec)
        try:
            results = asyncio.run(worker.run(cmd["prompts"]))
        except DraftError as exc:
            reply.write(json.dumps({"error": str(exc)}) + "\n")
            continue
        t1 = time.time()
        dicts = [{k: v for k, v in r.to_json().items() if k not in ("prompt", "text")} for r in results]
        reply.write(json.dumps({"t0": t0, "t1": t1, "results": dicts, "rounds": round_sums(worker.rows)}) + "\n")


ROUND_PARTS = ("draft_ms", "network_ms", "verify_ms", "queue_ms", "batch")


def round_sums(rows: Sequence[Any]) -> dict[str, float]:
    """Sums over a draft worker's rounds (``RoundRow``) of where a round's time went, for ``round_breakdown``."""
    out = {k: float(sum(getattr(r, k) for r in rows)) for k in ROUND_PARTS}
    out["n"] = len(rows)
    return out


def round_breakdown(sums: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean per round over all draft processes: draft_ms (the shared draft batch's forward time), network_ms
    (round trip minus the target's time: broker, sockets, codec, the drafter's event loop), verify_ms (the
    target's forward), queue_ms (waiting at the target for a tick), batch (sessions drafted together)."""
    n = sum(s["n"] for s in sums)
    return {f"round_{k}": round(sum(s[k] for s in sums) / n, 3) for k in ROUND_PARTS} if n else {}


class DraftProcs:
    """``n`` draft processes (``draft_proc``) sharing a run's sessions; ``run`` drives them all at once."""

    CODE = "from benchmarks.gpu_e2e import draft_proc; draft_proc()"  # what each process runs

    def __init__(self, n: int, spec: dict, threads: int, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []
        code = self.CODE
        env = child_env(threads)
        for i in range(n):
            log = open(logdir / f"draft-{i}.log", "w")
            self.procs.append(subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, stderr=log, env=env, cwd=ROOT))

    def _reply(self, i: int, deadline: float) -> dict:
        p = self.procs[i]
        ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = p.stdout.readline() if ready else b""  # type: ignore[union-attr]
        if not line:
            why = "exited" if p.poll() is not None else "did not answer in time"
            raise BenchmarkError(f"draft process {i} {why} (log: {self.logdir}/draft-{i}.log)")
        msg = json.loads(line)
        if msg.get("error"):
            raise BenchmarkError(f"draft process {i}: {msg['error']} (log: {self.logdir}/draft-{i}.log)")
        return msg

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        for i in range(len(self.procs)):
            self._reply(i, deadline)

    def run(self, prompts: Sequence[str], gamma: int, max_new: int) -> tuple[list[dict], float]:
        """Split ``prompts`` into contiguous shares, one per process; (results in prompt order, wall seconds from
        the first start to the last end)."""
        n = len(self.procs)
        bounds = [len(prompts) * i // n for i in range(n + 1)]
        for i, p in enumerate(self.procs):
            cmd = {"prompts": list(prompts[bounds[i]:bounds[i + 1]]), "gamma": gamma, "max_new": max_new}
            p.stdin.write((json.dumps(cmd) + "\n").encode())  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        deadline = time.monotonic() + RUN_TIMEOUT_S
        replies = [self._reply(i, deadline) for i in range(n)]
        results = [r for rep in replies for r in rep["results"]]
        wall = max(r["t1"] for r in replies) - min(r["t0"] for r in replies)
        self.last_rounds = round_breakdown([rep["rounds"] for rep in replies if "rounds" in rep])
        return results, wall


def bench_distributed(svc: Services, drafts: DraftProcs, prompts: Sequence[str], max_new: int, gamma: int
                      ) -> tuple[dict, list[dict]]:
    t0_ticks, t0_rows = svc.counters("target")
    results, wall = drafts.run(prompts, gamma, max_new)
    t1_ticks, t1_rows = svc.counters("target")
    batch = (t1_rows - t0_rows) / (t1_ticks - t0_ticks) if t1_ticks > t0_ticks else None
    row = _row("distributed", gamma, len(prompts), 0.0, results, wall, batch)
    row["mode"] = f"{len(drafts.procs)} procs"
    tick_ms = svc.snapshot().get("workers", {}).get("target", {}).get("stats", {}).get("tick_ms")
    row["target_tick_ms"] = tick_ms
    row.update(getattr(drafts, "last_rounds", {}))
    return row, results


# --------------------------------------------------------------------------- the run
def setup_row(args: argparse.Namespace, gammas: list[int], prompt_tokens: list[int]) -> dict[str, Any]:
    import platform

    import torch

    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(args.device))
    else:
        name = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    return {"device": args.device, "device_name": name, "torch": torch.__version__,
            "python": platform.python_version(), "dtype": args.dtype, "backend": args.backend,
            "sessions": args.sessions, "gammas": gammas, "max_new_tokens": args.max_new_tokens,
            "draft_procs": args.draft_procs, "draft_device": args.draft_device, "threads": args.threads,
            "tick_ms": args.tick_ms, "prompt_tokens_mean": round(sum(prompt_tokens) / len(prompt_tokens), 1)}


def _speedups(row: dict, batched: dict, single: dict) -> None:
    agg = row["tok_s_aggregate"]
    row["speedup_batched"] = round(agg / batched["tok_s_aggregate"], 3) if batched["tok_s_aggregate"] else None
    row["speedup_single"] = round(agg / single["tok_s_aggregate"], 3) if single["tok_s_aggregate"] else None
    row["session_speedup_single"] = (round(row["tok_s_session"] / single["tok_s_session"], 3)
                                     if single["tok_s_session"] else None)


def _check(args: argparse.Namespace) -> list[int]:
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchmarkError(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    if args.draft_device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchmarkError(f"--draft-device {args.draft_device}: no CUDA device")
    for name in ("sessions", "max_new_tokens", "draft_procs", "threads", "single_prompts"):
        if getattr(args, name) < 1:
            raise BenchmarkError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup_runs < 0:
        raise BenchmarkError(f"--warmup-runs must be >= 0, got {args.warmup_runs}")
    return _parse_list(args.gammas, "gammas")


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so ``finally`` stops the subprocesses (``timeout`` sends SIGTERM)


def run(args: argparse.Namespace) -> int:
    import signal
    import tempfile

    import torch

    gammas = _check(args)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    torch.set_num_threads(args.threads)
    from workers.engine import load_engine
    from workers.tokenizer_text import encode, load_tokenizer

    n = args.sessions
    prompts = heldout_prompts(n)
    tok = load_tokenizer(TARGET)
    ids = [encode(tok, p) for p in prompts]
    # room for the prompt, the output, one chunk past it and the padding; a multiple of the engine's span step
    max_context = -(-(max(map(len, ids)) + args.max_new_tokens + max(gammas) + 16) // 128) * 128
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        if args.json:
            print_json(row)
        else:
            print_table([row], header=len(rows) == 2, columns=COLUMNS)

    setup = setup_row(args, gammas, [len(i) for i in ids])
    rows.append(setup)
    if args.json:
        print_json({"setup": setup})
    else:
        print("setup: " + ", ".join(f"{k}={v}" for k, v in setup.items()), flush=True)

    progress(f"target-only on {args.device} ({args.backend} engine, {args.dtype}), {n} prompts")
    engine = load_engine(TARGET, device=args.device, dtype=args.dtype, slots=n, max_context=max_context,
                         backend=args.backend)
    batched, want = bench_batched(engine, ids, args.max_new_tokens, args.device, args.warmup_runs)
    k = min(args.single_prompts, n)
    single, want_single = bench_single(engine, ids[:k], args.max_new_tokens, args.device, args.warmup_runs)
    batched["lossless_single"] = match_fraction(want, want_single)  # the baseline's own batch-shape effects
    emit(batched)
    emit(single)
    del engine
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()

    if args.logdir is not None:
        logdir = args.logdir
        logdir.mkdir(parents=True, exist_ok=True)
    else:
        logdir = Path(tempfile.mkdtemp(prefix="specmq-gpu-e2e-"))
    progress(f"starting broker, target ({args.device}), {args.draft_procs} draft processes "
             f"({args.draft_device}){' and a fused worker' if args.fused else ''}; logs in {logdir}")
    common = ["--device", args.device, "--dtype", args.dtype, "--max-context", str(max_context)]
    target_args = [*common, "--backend", args.backend, "--tick-ms", str(args.tick_ms),
                   "--max-batch-rows", str(max(64, n)), "--max-batch-tokens", str(max(512, n * (max(gammas) + 1)))]
    svc = Services(args.threads, n, logdir, target_args=target_args, fused=args.fused,
                   fused_args=[*common, "--backend", args.backend])
    drafts: DraftProcs | None = None
    ok = False
    try:
        procs = min(args.draft_procs, n)
        spec = {"broker": svc.frontend, "device": args.draft_device, "threads": args.threads,
                "dtype": "float32" if args.draft_device == "cpu" else args.dtype,
                "slots": -(-n // procs), "max_context": max_context, "log_level": "warning"}
        drafts = DraftProcs(procs, spec, args.threads, logdir)
        svc.wait_ready()
        drafts.wait_ready()
        for g in gammas:
            for w in range(args.warmup_runs):  # the target captures its graphs for the buckets this run meets
                progress(f"distributed gamma={g}: warm-up {w + 1}/{args.warmup_runs}")
                drafts.run(prompts, g, args.max_new_tokens)
            progress(f"distributed gamma={g}: {n} sessions")
            row, results = bench_distributed(svc, drafts, prompts, args.max_new_tokens, g)
            got = [r["token_ids"] for r in results]
            _speedups(row, batched, single)
            row["lossless"], row["lossless_single"] = match_fraction(got, want), match_fraction(got, want_single)
            emit(row)
        if args.fused:
            bench_fused(svc, prompts[:2], 8, gammas[0], 2)  # warm-up
            for g in gammas:
                progress(f"fused gamma={g}: {n} jobs")
                outs: list[dict] = []
                row = bench_fused(svc, prompts, args.max_new_tokens, g, n, outputs=outs)
                row["mode"] = "1 worker"
                got = [r["token_ids"] for r in outs]
                _speedups(row, batched, single)
                row["lossless"], row["lossless_single"] = match_fraction(got, want), match_fraction(got, want_single)
                emit(row)
        ok = True
    finally:
        from workers.local_cluster import stop_processes

        if drafts is not None:
            stop_processes(drafts.procs, grace_s=5.0)
        svc.close()
        if not ok:
            progress(f"failed; logs in {logdir}")
    summary = summarise(rows[1:])
    if args.json:
        print_json({"summary": summary})
    else:
        print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return 0 if not any(r.get("errors") for r in rows[1:]) else 1


def summarise(rows: list[dict]) -> dict[str, Any]:
    """The headline figures: the best distributed row against both target-only rows."""
    base = {r.get("mode"): r for r in rows if r["arch"] == "target-only"}
    out: dict[str, Any] = {"target_only_batched_tok_s": base["batched"]["tok_s_aggregate"],
                           "target_only_single_tok_s": base["single"]["tok_s_aggregate"]}
    for arch in ("distributed", "fused"):
        mine = [r for r in rows if r["arch"] == arch]
        if mine:
            best = max(mine, key=lambda r: r["tok_s_aggregate"])
            out[f"{arch}_best_gamma"] = best["gamma"]
            out[f"{arch}_tok_s"] = best["tok_s_aggregate"]
            out[f"{arch}_speedup_batched"] = best["speedup_batched"]
            out[f"{arch}_speedup_single"] = best["speedup_single"]
            out[f"{arch}_target_batch"] = best["target_batch"]
            out[f"{arch}_lossless"] = min(r["lossless"] for r in mine)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="target device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="target dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--backend", default="cuda",
                   help="target engine, worker and target-only alike (default: cuda, the CUDA-graph engine; on a "
                        "CPU it runs without graphs)")
    p.add_argument("--sessions", type=int, default=64, help="concurrent sessions = prompts (default: 64)")
    p.add_argument("--gammas", default="4", help="draft tokens per round, e.g. 4 or 2,4 or 2-6 (default: 4)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per prompt (default: 128)")
    p.add_argument("--draft-procs", type=int, default=4,
                   help="draft processes, each drafting sessions/procs sessions batched (default: 4)")
    p.add_argument("--draft-device", default="cpu", help="draft device: cpu (default, a user's laptop) or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    p.add_argument("--tick-ms", type=float, default=2.0, help="the target's --tick-ms (default: 2)")
    p.add_argument("--single-prompts", type=int, default=4,
                   help="prompts decoded one at a time in the target-only single row (default: 4)")
    p.add_argument("--warmup-runs", type=int, default=1,
                   help="unmeasured full runs before each measured one (CUDA graph capture) (default: 1)")
    p.add_argument("--fused", action="store_true", help="also run a fused worker on the target's device")
    p.add_argument("--logdir", type=Path, default=None,
                   help="where the subprocesses' logs go (default: a new temporary directory, named on stderr)")

