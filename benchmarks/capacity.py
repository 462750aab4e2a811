"""When does distributed speculation pay? Sessions served at a TPOT SLO, per mode, through one broker and target.

Every mode runs through the same system (``specmq broker`` + one ``specmq target`` subprocess), with N concurrent
sessions drafted by ``--draft-procs`` processes (``draft_proc`` below, batched drafting, on ``--draft-device``):

- ``target-only``: every session in decode mode (``--gamma 0``): the target decodes alone, plain continuous
  batching. Its outputs are the reference of the lossless check.
- ``g2``, ``g4``: fixed γ; ``auto``: the target's goodput controller picks each session's γ each round (0 included).
- ``fused``: one ``specmq fused`` worker holding draft and target on the target's device (``--gamma auto`` there:
  the same controller module), fed by generate jobs: centralised speculation, as a draft-model speculator in one
  serving engine does it.

For each context length (prompt + output ≈ ``--contexts``) and each N of ``--sessions``, a row reports aggregate
tokens/s, TPOT p50/p90 (per session: the time from its first delivered tokens to its last over the tokens delivered
after the first delivery: decode mode delivers ``--decode-tokens`` at a time, speculation a round's tokens), TTFT p50,
the target's mean batch rows per tick and busy fraction (time in forwards over wall), the mean round breakdown (draft, network = round trip minus the
target's verify time, verify, queue; and the split of a round into draft_wait + draft + path + busy_wait + verify,
where path is the software path: drafter loop, serialisation, broker hops, the target's gather window; with the
per-round p50 of path; ``round_batch``: the sessions in a round's draft step), ``lossless``: the fraction of sessions whose tokens equal target-only's, and at one
session ``gamma_trace``: its γ per round (0: a decode request), which shows how auto chose, and ``round_trace``
([γ, accepted, draft ms, path ms] per round); ``cost_correction``, ``host_ms``, ``decode_gap_ms`` and
``catchup_ms_per_token``: what the target's controller has learned by the point's end (step-cost correction, host
time between ticks, a decode request's gap between ticks, a draft cache's catch-up per token).
Per mode and SLO, the summary gives the most sessions whose TPOT p90 meets the SLO.

On the lent 2-GPU machine: the grown 8B-class target (``--target-grow llama-3.1-8b``, bf16) on cuda:0 and the grown
1B-class draft on cuda:1, standing in for edge devices. On a CPU (``--device cpu``, no growth) the same pipeline
runs small, so it is tested anywhere.

    specmq bench capacity --json                                       # GPU defaults (2 GPUs)
    specmq bench capacity --device cpu --sessions 1,2 --contexts 96 --max-new-tokens 8 --modes target-only,g2,auto
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks import BenchmarkError, quiet_logs
from benchmarks.e2e import DRAFT, ROOT, TARGET, child_env, heldout_prompts
from benchmarks.gpu_e2e import DraftProcs as GpuE2eDraftProcs

HELP = "sessions served at a TPOT SLO: target-only vs fixed gamma vs auto vs fused, through one broker and target"
DESCRIPTION = __doc__.split("\n\n")[0]
EXAMPLE = "specmq bench capacity --device cpu --sessions 1,2 --contexts 96 --max-new-tokens 8"
MODES = ("target-only", "g2", "g4", "auto", "fused")
COLUMNS = ("context", "mode", "temperature", "sessions", "tok_s", "tpot_p50_ms", "tpot_p90_ms", "ttft_p50_s",
           "target_batch", "busy", "mean_gamma", "alpha", "round_draft_ms", "round_network_ms", "round_verify_ms",
           "round_draft_wait_ms", "round_path_ms", "round_busy_wait_ms", "round_path_p50_ms", "lossless", "errors")
RUN_TIMEOUT_S = 480.0
# a speculative round's parts (workers.draft_worker.RoundRow), summed over rounds per draft process; a round is
# draft_wait + draft + path + busy_wait + verify (network = round trip less verify; queue = busy_wait + gather)
ROUND_PARTS = ("draft_ms", "network_ms", "verify_ms", "queue_ms", "draft_wait_ms", "path_ms", "busy_wait_ms",
               "send_ms", "batch")  # batch: sessions in the round's draft step; send_ms: path before the chunk's send
HB = ("--heartbeat-interval", "0.2", "--liveness", "10")


def progress(msg: str) -> None:
    print(f"capacity: {msg}", file=sys.stderr, flush=True)


def mode_gamma(mode: str) -> int | str:
    return {"target-only": 0, "g2": 2, "g4": 4, "auto": "auto"}[mode]


# --------------------------------------------------------------------------- prompts of a given length
def prompts_of_length(n: int, tokens: int, vocab: int | None = None) -> list[list[int]]:
    """``n`` held-out code prompts of exactly ``tokens`` token ids each (cut from longer stdlib excerpts); with
    ``vocab`` (an emulated model's), every id folded into its vocabulary."""
    from workers.tokenizer_text import encode, load_tokenizer

    tok = load_tokenizer(TARGET)
    texts = heldout_prompts(max(n, 8), chars=max(240, tokens * 6))
    out: list[list[int]] = []
    for t in texts:
        ids = encode(tok, t)
        while len(ids) < tokens:
            ids = ids + ids[1:]  # short excerpt: repeat it (after its BOS)
        out.append(ids[:tokens])
    if vocab is not None:
        from workers.engine.emulated import FIRST_TOKEN

        out = [[FIRST_TOKEN + t % (vocab - FIRST_TOKEN) for t in p] for p in out]
    return [out[i % len(out)] for i in range(n)]


# --------------------------------------------------------------------------- draft processes
def draft_proc() -> None:
    """A draft process: ``python -c 'from benchmarks.capacity import draft_proc; draft_proc()' SPEC_JSON``.

    Loads (and grows) the draft engine once, captures its CUDA graphs, answers ``{"ready": true}``; then for each JSON
    command on stdin (``{"prompt_ids": [[...]], "gamma": g, "max_new": n, "temperature": t}``) runs a
    ``DraftWorker`` over those prompts (all concurrent, batched drafting) and answers one JSON line.
    """
    import asyncio

    spec = json.loads(sys.argv[1])
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to the log
    quiet_logs(spec.get("log_level", "warning"))
    import torch

    torch.set_num_threads(spec["threads"])
    from workers.draft_worker import DraftConfig, DraftError, DraftWorker, TextCodec
    from workers.engine import load_engine
    from workers.serving import capture_graphs

    model = spec.get("model", str(DRAFT))
    engine = load_engine(model, device=spec["device"], dtype=spec["dtype"], slots=spec["slots"],
                         max_context=spec["max_context"], backend=spec["backend"], grow=spec.get("grow"))
    if spec["backend"] == "cuda" and spec["device"].startswith("cuda"):
        capture_graphs(engine, "draft model")
    codec = TextCodec(model if (Path(model) / "tokenizer.json").is_file() else DRAFT)  # emulated: the shipped one
    reply.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        cfg = DraftConfig(broker=spec["broker"], model=model, max_new_tokens=cmd["max_new"], gamma=cmd["gamma"],
                          max_gamma=8, concurrency=max(1, len(cmd["prompt_ids"])), timeout=cmd.get("timeout", 60.0),
                          temperature=cmd.get("temperature", 0.0), link_delay_ms=cmd.get("link_delay_ms", 0.0),
                          decode_tokens=cmd.get("decode_tokens", 8))
        worker = DraftWorker(cfg, engine=engine, codec=codec)
        t0 = time.time()
        try:
            results = asyncio.run(worker.run_ids(cmd["prompt_ids"]))
        except DraftError as exc:
            reply.write(json.dumps({"error": str(exc)}) + "\n")
            continue
        t1 = time.time()
        dicts = [{**{k: v for k, v in r.to_json().items() if k not in ("prompt", "text")}, "gammas": r.gammas}
                 for r in results]
        if len(dicts) == 1:  # a lone session's rounds as the controller saw them: γ, accepted, draft ms, path ms
            dicts[0]["trace"] = [[r.gamma, r.accepted, r.draft_ms, r.path_ms] for r in worker.rows]
        rounds = [r for r in worker.rows if r.gamma > 0]
        sums: dict[str, Any] = {k: float(sum(getattr(r, k) for r in rounds)) for k in ROUND_PARTS}
        sums["n"] = len(rounds)
        sums["path_ms_rounds"] = [r.path_ms for r in rounds]  # per round, for the path's percentiles
        reply.write(json.dumps({"t0": t0, "t1": t1, "results": dicts, "rounds": sums}) + "\n")


class DraftProcs(GpuE2eDraftProcs):
    """``n`` draft processes (``draft_proc`` of this module) sharing each run's sessions (contiguous shares)."""

    CODE = "from benchmarks.capacity import draft_proc; draft_proc()"

    def wait_ready(self, timeout: float = 600.0) -> None:  # growing and capturing a 1B-class draft takes a while
        super().wait_ready(timeout)

    def run(self, prompt_ids: Sequence[list[int]], **cmd: Any) -> tuple[list[dict], float, dict]:
        """(results in prompt order, wall seconds first start to last end, summed round parts)."""
        n = len(self.procs)
        bounds = [len(prompt_ids) * i // n for i in range(n + 1)]
        used = [i for i in range(n) if bounds[i + 1] > bounds[i]]
        for i in used:
            msg = {"prompt_ids": [list(p) for p in prompt_ids[bounds[i]:bounds[i + 1]]], **cmd}
            self.procs[i].stdin.write((json.dumps(msg) + "\n").encode())  # type: ignore[union-attr]
            self.procs[i].stdin.flush()  # type: ignore[union-attr]
        deadline = time.monotonic() + RUN_TIMEOUT_S
        replies = [self._reply(i, deadline) for i in used]
        results = [r for rep in replies for r in rep["results"]]
        wall = max(r["t1"] for r in replies) - min(r["t0"] for r in replies)
        return results, wall, merge_rounds([rep["rounds"] for rep in replies])


def merge_rounds(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The round parts of several draft processes as one: sums add up, per-round lists join."""
    out: dict[str, Any] = {}
    for k in parts[0]:
        vals = [p.get(k, 0) for p in parts]
        out[k] = [x for v in vals for x in v] if isinstance(vals[0], list) else sum(vals)
    return out


# --------------------------------------------------------------------------- one point
def percentile(values: Sequence[float], q: float) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    k = (len(vals) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


LEARNED = ("cost_correction", "host_ms", "decode_gap_ms", "catchup_ms_per_token")


def target_counters(cluster: Any, name: str) -> dict[str, float]:
    time.sleep(0.35)  # one fresh heartbeat (0.2 s)
    st = (cluster.snapshot(2.0) or {}).get("workers", {}).get(name, {}).get("stats", {})
    return {k: float(st.get(k, 0) or 0) for k in ("ticks", "rows", "busy_ms", "rounds", *LEARNED)}


def make_row(context: int, mode: str, temperature: float, results: list[dict], wall: float, before: dict,
             after: dict, rounds: dict | None) -> dict[str, Any]:
    tokens = sum(r["new_tokens"] for r in results)
    drafted = sum(r.get("drafted", 0) for r in results)
    accepted = sum(r.get("accepted", 0) for r in results)
    rejections = sum(r.get("rejections", 0) for r in results)
    gammas = [r["mean_gamma"] for r in results if r.get("mean_gamma") is not None]
    ticks = after["ticks"] - before["ticks"]
    tpots = [r.get("tpot_ms") for r in results]
    row: dict[str, Any] = {
        "context": context, "mode": mode, "temperature": temperature, "sessions": len(results),
        "tok_s": round(tokens / wall, 1) if wall > 0 else 0.0,
        "tpot_p50_ms": _r(percentile(tpots, 0.5)), "tpot_p90_ms": _r(percentile(tpots, 0.9)),
        "ttft_p50_s": _r(percentile([r.get("ttft_s") for r in results], 0.5), 4),
        "target_batch": round((after["rows"] - before["rows"]) / ticks, 2) if ticks > 0 else None,
        "busy": round((after["busy_ms"] - before["busy_ms"]) / 1000.0 / wall, 3) if wall > 0 else None,
        "mean_gamma": round(statistics.mean(gammas), 2) if gammas else None,
        "alpha": round(accepted / (accepted + rejections), 3) if accepted + rejections else None,
        "acceptance": round(accepted / drafted, 3) if drafted else None,
        "tokens": tokens, "wall_s": round(wall, 3), "errors": sum(1 for r in results if r.get("error")),
    }
    if rounds and rounds.get("n"):
        for k in ROUND_PARTS:
            if k in rounds:
                row[f"round_{k}"] = round(rounds[k] / rounds["n"], 3)
        if rounds.get("path_ms_rounds"):
            row["round_path_p50_ms"] = _r(percentile(rounds["path_ms_rounds"], 0.5))
    if len(results) == 1 and results[0].get("gammas") is not None and mode != "target-only":
        row["gamma_trace"] = results[0]["gammas"]  # a lone session's γ per round (0: a decode request): how it chose
        if results[0].get("trace"):
            row["round_trace"] = results[0]["trace"]  # [γ, accepted, draft ms, path ms] per round
    for k in LEARNED:  # what the target's controller has learned by the point's end
        if after.get(k):
            row[k] = round(after[k], 4)
    first_error = next((r["error"] for r in results if r.get("error")), None)
    if first_error:
        row["first_error"] = first_error
    return row


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def lossless(results: list[dict], reference: list[list[int]] | None) -> float | None:
    if reference is None:
        return None
    n = min(len(results), len(reference))
    return round(sum(r["token_ids"] == ref for r, ref in zip(results, reference)) / n, 4) if n else None


# --------------------------------------------------------------------------- the sweep
def target_flags(args: argparse.Namespace, slots: int, max_context: int) -> list[str]:
    flags = ["--device", args.device, "--dtype", args.dtype, "--backend", args.backend, "--slots", str(slots),
             "--max-context", str(max_context), "--max-batch-rows", str(max(64, slots)),
             "--max-batch-tokens", str(max(512, slots * 9)), "--tick-ms", str(args.tick_ms), *HB,
             "--model", str(args.target_model)]
    if args.target_grow:
        flags += ["--grow", args.target_grow]
    if args.cost_table:
        flags += ["--cost-table", str(args.cost_table)]
    return flags


def run_distributed(args: argparse.Namespace, context: int, prompts: list[list[int]], logdir: Path,
                    emit: Any) -> dict[int, list[list[int]]]:
    """Every non-fused mode at every N for one context; returns target-only's outputs per N (the reference)."""
    from workers.local_cluster import LocalCluster

    slots = max(args.sessions + [args.sampled_sessions or 0])  # the temperature-0.8 rows run sampled_sessions
    max_context = context + 64
    cluster = LocalCluster(logdir=logdir / f"ctx{context}", env=child_env(args.threads), cwd=ROOT)
    drafts: DraftProcs | None = None
    reference: dict[int, list[list[int]]] = {}
    try:
        cluster.start_broker(*HB)
        cluster.start_worker("target", "target", *target_flags(args, slots, max_context))
        spec = {"broker": cluster.frontend, "device": args.draft_device, "threads": args.threads,
                "dtype": "float32" if args.draft_device == "cpu" else args.dtype, "backend": args.draft_backend,
                "grow": args.draft_grow, "slots": -(-slots // args.draft_procs), "max_context": max_context,
                "log_level": "warning", "model": str(args.draft_model)}
        (logdir / f"ctx{context}").mkdir(parents=True, exist_ok=True)
        drafts = DraftProcs(args.draft_procs, spec, args.threads, logdir / f"ctx{context}")
        cluster.wait_registered({"target"}, timeout_s=900)
        drafts.wait_ready()
        warm = prompts[:min(len(prompts), 4)]
        drafts.run(warm, gamma=4, max_new=8)  # first rounds of a process are slow (allocator, kernels)
        modes = [m for m in args.modes if m != "fused"]
        for mode in modes:
            for n in args.sessions:
                progress(f"context {context}: {mode}, {n} sessions")
                before = target_counters(cluster, "target")
                results, wall, rounds = drafts.run(prompts[:n], gamma=mode_gamma(mode), max_new=args.max_new_tokens,
                                                   link_delay_ms=args.link_delay_ms)
                after = target_counters(cluster, "target")
                row = make_row(context, mode, 0.0, results, wall, before, after, rounds)
                if mode == "target-only":
                    reference[n] = [r["token_ids"] for r in results]
                row["lossless"] = lossless(results, reference.get(n))
                emit(row)
        if args.sampled_sessions:
            n = args.sampled_sessions
            for mode in modes:  # a temperature-0.8 row per mode: lossless there is distributional (statistical tests)
                progress(f"context {context}: {mode}, {n} sessions, temperature 0.8")
                before = target_counters(cluster, "target")
                results, wall, rounds = drafts.run(prompts[:n], gamma=mode_gamma(mode), max_new=args.max_new_tokens,
                                                   temperature=0.8)
                after = target_counters(cluster, "target")
                emit(make_row(context, mode, 0.8, results, wall, before, after, rounds))
    finally:
        from workers.local_cluster import stop_processes

        if drafts is not None:
            stop_processes(drafts.procs, grace_s=10.0)
        cluster.stop(grace_s=20.0)
    return reference


def run_fused(args: argparse.Namespace, context: int, prompts: list[list[int]], logdir: Path, emit: Any,
              reference: dict[int, list[list[int]]]) -> None:
    import asyncio

    from workers.generate_client import run_jobs_ids
    from workers.local_cluster import LocalCluster

    slots = max(args.sessions + [args.sampled_sessions or 0])  # the temperature-0.8 rows run sampled_sessions
    max_context = context + 64
    cluster = LocalCluster(logdir=logdir / f"ctx{context}-fused", env=child_env(args.threads), cwd=ROOT)
    try:
        cluster.start_broker(*HB)
        flags = ["--device", args.device, "--dtype", args.dtype, "--backend", args.backend, "--jobs", str(slots),
                 "--max-context", str(max_context), "--max-batch-rows", str(max(64, slots)),
                 "--max-batch-tokens", str(max(512, slots * 9)), "--gamma", "auto", *HB,
                 "--target-model", str(args.target_model), "--draft-model", str(args.draft_model)]
        if args.target_grow:
            flags += ["--grow", args.target_grow]
        fused_draft_grow = args.draft_grow or getattr(args, "draft_grow_on_cpu", None)
        if fused_draft_grow and args.device.startswith("cuda"):
            flags += ["--draft-grow", fused_draft_grow]
        if args.fused_cost_table:
            flags += ["--cost-table", str(args.fused_cost_table)]
        cluster.start_worker("fused", "fused", *flags)
        cluster.wait_registered({"fused"}, timeout_s=900)

        def jobs(ids: list[list[int]], max_new: int, temperature: float = 0.0) -> tuple[list[dict], float]:
            t0 = time.perf_counter()
            res = asyncio.run(run_jobs_ids(ids, broker=cluster.frontend, model=args.target_model, max_new_tokens=max_new,
                                           gamma=0, temperature=temperature, top_p=1.0, seed=0,
                                           concurrency=len(ids), timeout=120.0, connect_timeout=30.0))
            return [r.to_json() for r in res], time.perf_counter() - t0

        jobs(prompts[:4], 8)  # warm-up
        for n in args.sessions:
            progress(f"context {context}: fused, {n} jobs")
            before = target_counters(cluster, "fused")
            results, wall = jobs(prompts[:n], args.max_new_tokens)
            after = target_counters(cluster, "fused")
            row = make_row(context, "fused", 0.0, results, wall, before, after, None)
            row["lossless"] = lossless(results, reference.get(n))
            emit(row)
        if args.sampled_sessions:
            n = args.sampled_sessions
            progress(f"context {context}: fused, {n} jobs, temperature 0.8")
            before = target_counters(cluster, "fused")
            results, wall = jobs(prompts[:n], args.max_new_tokens, 0.8)
            emit(make_row(context, "fused", 0.8, results, wall, before, target_counters(cluster, "fused"), None))
    finally:
        cluster.stop(grace_s=20.0)


# --------------------------------------------------------------------------- summary and goals
def capacity_at(rows: list[dict], context: int, mode: str, slo_ms: float) -> int:
    """The most sessions of ``mode`` whose TPOT p90 met ``slo_ms`` (0 when none did)."""
    ok = [r["sessions"] for r in rows if r["context"] == context and r["mode"] == mode and r["temperature"] == 0
          and r["tpot_p90_ms"] is not None and r["tpot_p90_ms"] <= slo_ms and not r["errors"]]
    return max(ok, default=0)


def summarise(rows: list[dict], slos: Sequence[float]) -> dict[str, Any]:
    greedy = [r for r in rows if r["temperature"] == 0]
    out: dict[str, Any] = {"capacity": {}, "goals": {}}
    contexts = sorted({r["context"] for r in greedy})
    modes = [m for m in MODES if any(r["mode"] == m for r in greedy)]
    for c in contexts:
        out["capacity"][str(c)] = {m: {str(s): capacity_at(greedy, c, m, s) for s in slos} for m in modes}
    # auto never loses: at every N, auto's tok/s >= 0.95 x the best of target-only and fixed gamma, TPOT p50 <= +5%
    checks = []
    for c in contexts:
        for n in sorted({r["sessions"] for r in greedy if r["context"] == c}):
            pts = {r["mode"]: r for r in greedy if r["context"] == c and r["sessions"] == n}
            if "auto" not in pts:
                continue
            rivals = [pts[m] for m in ("target-only", "g2", "g4") if m in pts]
            if not rivals:
                continue
            best = max(rivals, key=lambda r: r["tok_s"])
            ratio = pts["auto"]["tok_s"] / best["tok_s"] if best["tok_s"] else None
            tp = (pts["auto"]["tpot_p50_ms"] / best["tpot_p50_ms"]
                  if best["tpot_p50_ms"] and pts["auto"]["tpot_p50_ms"] else None)
            checks.append({"context": c, "sessions": n, "best_rival": best["mode"], "auto_over_best": _r(ratio),
                           "auto_tpot_p50_over_best": _r(tp),
                           "met": ratio is not None and ratio >= 0.95 and (tp is None or tp <= 1.05)})
    out["goals"]["auto_never_loses"] = {"met": all(x["met"] for x in checks) if checks else None, "points": checks}
    one = {r["mode"]: r for r in greedy if r["sessions"] == 1 and r["context"] == min(contexts, default=0)}
    if "auto" in one and "target-only" in one and one["auto"]["tpot_p50_ms"] and one["target-only"]["tpot_p50_ms"]:
        gain = one["target-only"]["tpot_p50_ms"] / one["auto"]["tpot_p50_ms"]
        out["goals"]["one_session_auto_tpot_gain"] = {"value": _r(gain), "met": gain >= 1.4}
    big = max(contexts, default=None)
    if big is not None:
        per_slo = {}
        for s in slos:
            cap = out["capacity"][str(big)]
            dist = max((cap[m][str(s)] for m in ("g2", "g4", "auto") if m in cap), default=0)
            per_slo[str(s)] = {"distributed": dist, "target_only": cap.get("target-only", {}).get(str(s)),
                               "fused": cap.get("fused", {}).get(str(s))}
        out["goals"][f"distributed_sessions_at_slo_ctx{big}"] = per_slo
    ll = [r["lossless"] for r in greedy if r.get("lossless") is not None]
    out["goals"]["lossless_min"] = min(ll) if ll else None
    return out


def print_table(rows: list[dict], header: bool) -> None:
    if header:
        print("  ".join(f"{c:>12}" for c in COLUMNS))
    for r in rows:
        print("  ".join(f"{'' if r.get(c) is None else r.get(c)!s:>12}" for c in COLUMNS), flush=True)


def setup_row(args: argparse.Namespace) -> dict[str, Any]:
    import platform

    import torch

    def name(dev: str) -> str:
        if dev.startswith("cuda") and torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(dev))
        return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"

    return {"device": args.device, "device_name": name(args.device), "draft_device": args.draft_device,
            "draft_device_name": name(args.draft_device), "torch": torch.__version__, "dtype": args.dtype,
            "target_grow": args.target_grow, "draft_grow": args.draft_grow, "sessions": args.sessions,
            "contexts": args.contexts, "modes": args.modes, "max_new_tokens": args.max_new_tokens,
            "draft_procs": args.draft_procs, "tick_ms": args.tick_ms, "link_delay_ms": args.link_delay_ms,
            "cost_table": str(args.cost_table) if args.cost_table else None, "slos_ms": args.slo_ms,
            "target_model": str(args.target_model), "draft_model": str(args.draft_model),
            "emulated": args.emulated,
            "command": "specmq bench capacity " + " ".join(sys.argv[3:])}


def _list(text: str | Sequence, cast=int) -> list:
    if not isinstance(text, str):
        return [cast(x) for x in text]
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchmarkError(f"not a comma-separated list of numbers: {text!r}") from None


def _check(args: argparse.Namespace) -> None:
    import torch

    args.sessions = _list(args.sessions)
    args.contexts = _list(args.contexts)
    args.slo_ms = _list(args.slo_ms, float)
    args.modes = [m.strip() for m in (args.modes.split(",") if isinstance(args.modes, str) else args.modes)]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        raise BenchmarkError(f"--modes: unknown {bad[0]!r} (choose from {', '.join(MODES)})")
    if not args.sessions or min(args.sessions) < 1 or not args.contexts:
        raise BenchmarkError("--sessions and --contexts need positive numbers")
    if args.max_new_tokens < 2:
        raise BenchmarkError("--max-new-tokens must be >= 2 (TPOT needs two tokens)")
    for c in args.contexts:
        if c <= args.max_new_tokens + 8:
            raise BenchmarkError(f"--contexts {c}: must exceed --max-new-tokens + 8")
    if args.device is None:
        args.device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if args.draft_device is None:  # a second GPU stands in for edge devices; without one, the CPU cores (laptops)
        args.draft_device = "cuda:1" if torch.cuda.device_count() > 1 else "cpu"
    for dev in (args.device, args.draft_device):
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise BenchmarkError(f"device {dev}: this torch ({torch.__version__}) sees no CUDA device")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.backend is None:
        args.backend = "cuda" if args.device.startswith("cuda") else "auto"
    if args.draft_backend is None:
        args.draft_backend = "cuda" if args.draft_device.startswith("cuda") else "auto"
    if not args.device.startswith("cuda"):
        args.target_grow = args.target_grow if args.target_grow != "llama-3.1-8b" else None
    if not args.draft_device.startswith("cuda"):  # the shipped draft computes what the grown one does, cheaper
        args.draft_grow_on_cpu = args.draft_grow
        args.draft_grow = None
    _check_models(args)


def _check_models(args: argparse.Namespace) -> None:
    """Both models load the same way (real or emulated); an emulated pair needs no growth and folds the prompts
    into its vocabulary. ``args.emulated``: the device the emulated target's table was profiled on, or None."""
    from workers.engine import EngineError
    from workers.engine.emulated import MODEL_TYPE
    from workers.engine.model_dir import read_config

    cfgs = []
    for flag, path in (("--target-model", args.target_model), ("--draft-model", args.draft_model)):
        try:
            cfgs.append(read_config(path)[1])
        except EngineError as exc:
            raise BenchmarkError(f"{flag}: {exc}") from None
    kinds = [c.get("model_type") == MODEL_TYPE for c in cfgs]
    if kinds[0] != kinds[1]:
        raise BenchmarkError("--target-model and --draft-model: emulate both or neither (an emulated model's tokens "
                             "mean nothing to a real one)")
    args.emulated, args.emulated_vocab = None, None
    if kinds[0]:
        from workers.engine import load_engine

        if cfgs[0].get("vocab_size") != cfgs[1].get("vocab_size"):
            raise BenchmarkError("--target-model and --draft-model: the emulated pair's vocab_size differ")
        try:
            engine = load_engine(args.target_model, slots=1)
            load_engine(args.draft_model, slots=1)
        except EngineError as exc:
            raise BenchmarkError(str(exc)) from None
        args.emulated, args.emulated_vocab = engine.info.device, engine.info.vocab_size
        if "fused" in args.modes:
            raise BenchmarkError("--modes fused: the fused worker needs real models (it serves text jobs); run it "
                                 "without --target-model / --draft-model emulated, or leave fused out")
        args.target_grow = args.draft_grow = args.draft_grow_on_cpu = None


def load_rows(path: Path) -> tuple[dict, list[dict]]:
    """(setup, rows) of a ``--out`` file."""
    setup: dict = {}
    rows: list[dict] = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise BenchmarkError(f"--report {path}: {exc.strerror or exc}") from None
    for i, line in enumerate(lines, 1):
        try:
            d = json.loads(line)
        except ValueError:
            raise BenchmarkError(f"--report {path}: line {i} is not JSON") from None
        if "setup" in d:
            setup = d["setup"]
        elif "context" in d and "mode" in d:
            rows.append(d)
    if not rows:
        raise BenchmarkError(f"--report {path}: no result rows")
    return setup, rows


def markdown(setup: dict, rows: list[dict], slos: Sequence[float]) -> str:
    """Tables for docs/capacity.md: every point, then sessions at each SLO per mode."""
    cols = ("mode", "sessions", "tok_s", "tpot_p50_ms", "tpot_p90_ms", "ttft_p50_s", "target_batch", "busy",
            "mean_gamma", "alpha", "round_draft_ms", "round_network_ms", "round_verify_ms", "round_path_p50_ms",
            "lossless")
    out = []
    for c in sorted({r["context"] for r in rows}):
        for temp in sorted({r["temperature"] for r in rows if r["context"] == c}):
            sel = [r for r in rows if r["context"] == c and r["temperature"] == temp]
            out.append(f"\n#### context {c}, temperature {temp}\n")
            out.append("| " + " | ".join(cols) + " |")
            out.append("|" + "---|" * len(cols))
            for r in sel:
                out.append("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in cols) + " |")
    summary = summarise(rows, slos)
    out.append("\n#### Most sessions with TPOT p90 within the SLO (greedy)\n")
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    out.append("| context | SLO ms | " + " | ".join(modes) + " |")
    out.append("|" + "---|" * (len(modes) + 2))
    for c, per_mode in summary["capacity"].items():
        for s in slos:
            out.append(f"| {c} | {s:g} | " + " | ".join(str(per_mode[m][str(s)]) for m in modes) + " |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Aggregate tokens/s and TPOT p90 against sessions, one panel pair per context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    greedy = [r for r in rows if r["temperature"] == 0]
    contexts = sorted({r["context"] for r in greedy})
    fig, axes = plt.subplots(2, len(contexts), figsize=(6 * len(contexts), 8), squeeze=False)
    for j, c in enumerate(contexts):
        for m in MODES:
            pts = sorted((r["sessions"], r["tok_s"], r["tpot_p90_ms"]) for r in greedy
                         if r["context"] == c and r["mode"] == m)
            if not pts:
                continue
            axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            axes[1][j].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=m)
        axes[0][j].set_title(f"context {c}: aggregate tokens/s")
        axes[1][j].set_title(f"context {c}: TPOT p90 (ms)")
        for i in (0, 1):
            axes[i][j].set_xscale("log", base=2)
            axes[i][j].set_xlabel("concurrent sessions")
            axes[i][j].grid(alpha=0.3)
        axes[1][j].set_yscale("log")
        axes[0][j].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(args: argparse.Namespace) -> int:
    setup, rows = load_rows(args.report)
    slos = _list(args.slo_ms, float)
    text = markdown(setup, rows, slos)
    print(text)
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps({"summary": summarise(rows, slos)}))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.report:
        return report(args)
    _check(args)
    logdir = args.logdir or Path(tempfile.mkdtemp(prefix="specmq-capacity-"))
    logdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print_table([row], header=len(rows) == 1)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    setup = setup_row(args)
    if args.json:
        print(json.dumps({"setup": setup}), flush=True)
    else:
        print("setup: " + ", ".join(f"{k}={v}" for k, v in setup.items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"setup": setup}) + "\n")
    progress(f"logs in {logdir}")
    for context in args.contexts:
        prompts = prompts_of_length(max(args.sessions + [args.sampled_sessions or 0]),
                                    context - args.max_new_tokens, args.emulated_vocab)
        reference: dict[int, list[list[int]]] = {}
        if any(m != "fused" for m in args.modes):
            reference = run_distributed(args, context, prompts, logdir, emit)
        if "fused" in args.modes:
            run_fused(args, context, prompts, logdir, emit, reference)
    summary = summarise(rows, args.slo_ms)
    print(json.dumps({"summary": summary}) if args.json else "summary: " + json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"summary": summary}) + "\n")
    return 0 if not any(r["errors"] for r in rows) else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="target device (default: cuda:0 if available, else cpu)")
    p.add_argument("--draft-device", default=None,
                   help="draft device (default: cuda:1 with two GPUs, else cpu: the shipped draft on the CPU cores, "
                        "laptop-class drafts)")
    p.add_argument("--dtype", default=None, help="dtype on CUDA devices (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--backend", default=None, help="target engine backend (default: cuda on a GPU, else auto)")
    p.add_argument("--draft-backend", default=None, help="draft engine backend (default: cuda on a GPU, else auto)")
    p.add_argument("--target-model", type=Path, default=TARGET,
                   help="target model directory; an emulated one (models/emulated/) runs a profiled GPU's step "
                        "times on any machine (default: the shipped target)")
    p.add_argument("--draft-model", type=Path, default=DRAFT, help="draft model directory (default: the shipped draft)")
    p.add_argument("--target-grow", default="llama-3.1-8b",
                   help="grow the shipped target to this shape on the GPU (default: llama-3.1-8b; ignored on cpu)")
    p.add_argument("--draft-grow", default="llama-3.2-1b",
                   help="grow the shipped draft to this shape on a GPU (drafts on cuda and the fused worker's draft; "
                        "CPU drafts run the shipped draft, which computes the same tokens) (default: llama-3.2-1b)")
    p.add_argument("--sessions", default="1,8,32,64,128,256", help="concurrent sessions per point")
    p.add_argument("--contexts", default="512,2048", help="prompt + output tokens per session")
    p.add_argument("--modes", default=",".join(MODES), help=f"modes to run (default: {','.join(MODES)})")
    p.add_argument("--max-new-tokens", type=int, default=64, help="output tokens per session (default: 64)")
    p.add_argument("--slo-ms", default="15,30,60", help="TPOT p90 SLOs for the capacity summary (default: 15,30,60)")
    p.add_argument("--sampled-sessions", type=int, default=8,
                   help="sessions of the temperature-0.8 row per mode (0: none) (default: 8)")
    p.add_argument("--draft-procs", type=int, default=1, help="draft processes (default: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    p.add_argument("--tick-ms", type=float, default=2.0, help="the target's --tick-ms (default: 2)")
    p.add_argument("--link-delay-ms", type=float, default=0.0, help="emulated one-way link delay (default: 0)")
    p.add_argument("--cost-table", type=Path, default=None, help="the target's --cost-table (default: fitted online)")
    p.add_argument("--fused-cost-table", type=Path, default=None, help="the fused worker's --cost-table")
    p.add_argument("--out", type=Path, default=None, help="also append every row as JSON to this file")
    p.add_argument("--logdir", type=Path, default=None, help="subprocess logs (default: a new temporary directory)")
    p.add_argument("--report", type=Path, default=None,
                   help="run nothing: print markdown tables and the summary of an --out file")
    p.add_argument("--plot", type=Path, default=None, help="with --report: also draw tokens/s and TPOT (PNG)")
