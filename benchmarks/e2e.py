"""End-to-end decoding speed on this machine with the shipped pair: target-only vs HF assisted vs distributed vs fused.

One run measures, with the same prompts (beginnings of stdlib files the pair never trained on, listed in
``models/heldout_files.json``; fixed snippets when those are absent) and the same greedy settings:

- ``target-only``: our engine, one token per forward (``speculation.autoregressive_generate``), one session.
- ``hf-assisted``: transformers' own assisted generation, ``target.generate(..., assistant_model=draft)``, greedy,
  constant ``num_assistant_tokens = gamma``, one session.
- ``distributed``: ``specmq broker`` + ``specmq target`` subprocesses; the drafter (``workers.draft_worker``) runs in
  this process; 1/4/16 concurrent sessions, with and without an added one-way link delay on the draft side.
- ``fused``: ``specmq fused`` subprocess fed by ``specmq generate``'s client code (``generate_client.run_jobs``).

Per row: tokens/s per session (mean), aggregate tokens/s (all tokens / wall), acceptance rate, mean accepted tokens
per round, and the target's mean batch rows per tick (delta of the worker's heartbeat counters via broker Stats).
Every process gets ``--threads`` torch threads (default 1): on a 2-core machine drafter, broker and target share
the CPU, which the numbers include.

    specmq bench e2e --quick            # gamma {2,4,6}, sessions {1,16}
    specmq bench e2e --gammas 1-8 --sessions 1,4,16 --json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sysconfig
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks import BenchmarkError, print_json

HELP = "target-only vs HF assisted vs distributed vs fused tokens/s on this machine"
DESCRIPTION = __doc__.split("\n\n")[0]
EXAMPLE = "specmq bench e2e --quick"
ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "models" / "tiny-target"
DRAFT = ROOT / "models" / "tiny-draft"
SNIPPETS = [
    "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists.\"\"\"\n    out = []\n",
    "class LRUCache:\n    def __init__(self, capacity):\n        self.capacity = capacity\n",
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(\n",
]


def heldout_prompts(n: int, chars: int = 240) -> list[str]:
    """Code-completion prompts from held-out stdlib files, else fixed snippets; ``n`` prompts, cycled.

    Each prompt is about ``chars`` characters of code from the middle of a held-out file (starting at a line start,
    skipping the license header and module docstring that open most files), cut right after a word so the model
    continues mid-line, as an editor's completion does: a prompt ending in whitespace would split a BPE token the
    models never saw split.
    """
    import re

    out: list[str] = []
    listing = ROOT / "models" / "heldout_files.json"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    try:
        names = json.loads(listing.read_text())
    except (OSError, ValueError):
        names = []
    word_end = re.compile(r"\w(?=[^\w])")
    for name in names:
        path = stdlib / name
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) < 4 * chars:
            continue
        m = word_end.search(text, len(text) * 2 // 5)
        if m is None:
            continue
        end = m.end()
        start = text.find("\n", max(0, end - chars)) + 1
        if 0 < start < end - 40:
            out.append(text[start:end])
        if len(out) >= n:
            break
    out = out or list(SNIPPETS)
    return [out[i % len(out)] for i in range(n)]


def _parse_list(text: str, what: str) -> list[int]:
    vals: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                vals += list(range(int(a), int(b) + 1))
            elif part.strip():
                vals.append(int(part))
    except ValueError:
        raise BenchmarkError(f"--{what}: expected numbers like 1,2,4 or 1-8, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise BenchmarkError(f"--{what}: every value must be >= 1")
    return vals


def child_env(threads: int) -> dict[str, str]:
    """The environment of a benchmark's subprocesses: ours, ``threads`` OpenMP threads, the repo first on
    PYTHONPATH (kept: a device run puts its wheels there too)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=path)


class Services:
    """Broker + one target + one fused worker (``fused=False``: none) as subprocesses (``workers.local_cluster``; fast
    heartbeats so stats are fresh); ``target_args`` / ``fused_args`` are extra flags for those workers (device, dtype,
    backend...); ``close`` stops them all."""

    HB = 0.2

    def __init__(self, threads: int, slots: int, logdir: Path, target_args: Sequence[str] = (), fused: bool = True,
                 fused_args: Sequence[str] = ()) -> None:
        from workers.local_cluster import LocalCluster

        self.cluster = LocalCluster(logdir=logdir, env=child_env(threads), cwd=ROOT)
        self.frontend, self.backend = self.cluster.frontend, self.cluster.backend
        self.logdir = logdir
        self.workers = {"target", "fused"} if fused else {"target"}
        hb = ["--heartbeat-interval", str(self.HB), "--liveness", "10"]
        self.cluster.start_broker(*hb)
        self.cluster.start_worker("target", "target", "--slots", str(slots), "--max-gamma", "16", *hb, *target_args)
        if fused:
            self.cluster.start_worker("fused", "fused", "--jobs", str(slots), *hb, *fused_args)

    def snapshot(self) -> dict:
        return self.cluster.snapshot(1.0) or {}

    def wait_ready(self, timeout: float = 120.0) -> None:
        self.cluster.wait_registered(self.workers, timeout_s=timeout)  # ClusterError names the process and its log

    def counters(self, worker: str) -> tuple[float, float]:
        """(ticks, rows) of a worker so far, from its latest heartbeat."""
        time.sleep(self.HB * 1.5)  # one fresh heartbeat
        st = self.snapshot().get("workers", {}).get(worker, {}).get("stats", {})
        return float(st.get("ticks", 0) or 0), float(st.get("rows", 0) or 0)

    def close(self) -> None:
        self.cluster.stop(grace_s=15.0)


def _row(arch: str, gamma: int | None, sessions: int, delay: float, results: list[dict], wall: float,
         batch: float | None) -> dict[str, Any]:
    tokens = sum(r["new_tokens"] for r in results)
    drafted = sum(r.get("drafted", 0) for r in results)
    accepted = sum(r.get("accepted", 0) for r in results)
    rounds = sum(r.get("rounds", 0) for r in results)
    rejections = sum(r.get("rejections", 0) for r in results)
    errors = [r["error"] for r in results if r.get("error")]
    return {"arch": arch, "gamma": gamma, "sessions": sessions, "link_delay_ms": delay,
            "tok_s_session": round(sum(r["tokens_per_s"] for r in results) / len(results), 2),
            "tok_s_aggregate": round(tokens / wall, 2) if wall > 0 else 0.0,
            "acceptance": round(accepted / drafted, 3) if drafted else None,
            "mean_accepted": round(accepted / rounds, 3) if rounds else None,
            # per-token acceptance: accepted / (accepted + rejections); a round rejects at most once
            "alpha": round(accepted / (accepted + rejections), 3) if accepted + rejections else None,
            "target_batch": None if batch is None else round(batch, 2), "tokens": tokens, "wall_s": round(wall, 3),
            "errors": len(errors)}


def bench_target_only(prompts: list[str], max_new: int) -> dict:
    from workers.engine import load_engine
    from workers.sampling import SamplingParams
    from workers.speculation import autoregressive_generate
    from workers.tokenizer_text import encode, load_tokenizer

    tok = load_tokenizer(TARGET)
    eng = load_engine(TARGET, slots=1, max_context=1024)
    autoregressive_generate(eng, encode(tok, prompts[0]), 8, SamplingParams())  # warm-up
    res = []
    t_all = time.perf_counter()
    for p in prompts:
        t0 = time.perf_counter()
        out = autoregressive_generate(eng, encode(tok, p), max_new, SamplingParams())
        dt = time.perf_counter() - t0
        res.append({"new_tokens": len(out.tokens), "tokens_per_s": len(out.tokens) / dt})
    return _row("target-only", None, 1, 0.0, res, time.perf_counter() - t_all, 1.0)


def bench_hf(prompts: list[str], max_new: int, gammas: list[int]) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from workers.tokenizer_text import encode, load_tokenizer

    tok = load_tokenizer(TARGET)
    target = AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(DRAFT, dtype=torch.float32).eval()
    rows = []
    for g in gammas:
        draft.generation_config.num_assistant_tokens = g
        draft.generation_config.num_assistant_tokens_schedule = "constant"
        draft.generation_config.assistant_confidence_threshold = 0.0
        res = []
        t_all = time.perf_counter()
        for p in prompts:
            ids = torch.tensor([encode(tok, p)])
            t0 = time.perf_counter()
            with torch.no_grad():
                out = target.generate(ids, assistant_model=draft, max_new_tokens=max_new, min_new_tokens=max_new,
                                      do_sample=False, pad_token_id=0)
            dt = time.perf_counter() - t0
            n = out.shape[1] - ids.shape[1]
            res.append({"new_tokens": n, "tokens_per_s": n / dt})
        rows.append(_row("hf-assisted", g, 1, 0.0, res, time.perf_counter() - t_all, None))
    return rows


def bench_distributed(svc: Services, prompts: list[str], max_new: int, gamma: int, sessions: int,
                      delay: float, threads: int) -> dict:
    from workers.draft_worker import DraftConfig, DraftWorker

    cfg = DraftConfig(broker=svc.frontend, model=DRAFT, max_new_tokens=max_new, gamma=gamma, concurrency=sessions,
                      link_delay_ms=delay, threads=threads, max_gamma=max(8, gamma), timeout=30.0)
    t0_ticks, t0_rows = svc.counters("target")
    worker = DraftWorker(cfg)
    t0 = time.perf_counter()
    results = asyncio.run(worker.run(prompts))
    wall = time.perf_counter() - t0
    t1_ticks, t1_rows = svc.counters("target")
    batch = (t1_rows - t0_rows) / (t1_ticks - t0_ticks) if t1_ticks > t0_ticks else None
    return _row("distributed", gamma, sessions, delay, [r.to_json() for r in results], wall, batch)


def bench_fused(svc: Services, prompts: list[str], max_new: int, gamma: int, sessions: int,
                outputs: list[dict] | None = None) -> dict:
    """One fused row; ``outputs``, when given, receives each prompt's result (``token_ids``...) in prompt order."""
    from workers.generate_client import run_jobs

    t0_ticks, t0_rows = svc.counters("fused")
    t0 = time.perf_counter()
    results = asyncio.run(run_jobs(prompts, broker=svc.frontend, model=DRAFT, max_new_tokens=max_new,
                                   gamma=gamma, temperature=0.0, top_p=1.0, seed=0, concurrency=sessions,
                                   timeout=60.0, connect_timeout=5.0))
    wall = time.perf_counter() - t0
    t1_ticks, t1_rows = svc.counters("fused")
    batch = (t1_rows - t0_rows) / (t1_ticks - t0_ticks) if t1_ticks > t0_ticks and t1_rows > 0 else None
    dicts = [r.to_json() for r in results]
    if outputs is not None:
        outputs += dicts
    return _row("fused", gamma, sessions, 0.0, dicts, wall, batch)


COLUMNS = ("arch", "gamma", "sessions", "link_delay_ms", "tok_s_session", "tok_s_aggregate", "acceptance",
           "alpha", "mean_accepted", "target_batch", "errors")


def print_table(rows: list[dict], header: bool = True, columns: Sequence[str] = COLUMNS) -> None:
    widths = [max(len(c), 11) for c in columns]
    if header:
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(("-" if r.get(c) is None else str(r[c])).rjust(w) for c, w in zip(columns, widths)),
              flush=True)


def goals(rows: list[dict]) -> dict[str, Any]:
    """The project's goals (README "Results"), computed from the rows."""
    base = max((r["tok_s_session"] for r in rows if r["arch"] == "target-only"), default=None)  # conservative
    out: dict[str, Any] = {"target_only_tok_s": base}
    for arch in ("distributed", "fused", "hf-assisted"):
        one = [r for r in rows if r["arch"] == arch and r["sessions"] == 1 and not r["link_delay_ms"]]
        if one and base:
            best = max(one, key=lambda r: r["tok_s_session"])
            out[f"{arch}_best_speedup_1_session"] = round(best["tok_s_session"] / base, 3)
            out[f"{arch}_best_gamma"] = best["gamma"]
        many = [r for r in rows if r["arch"] == arch and r["sessions"] == 16 and not r["link_delay_ms"]]
        if one and many:
            out[f"{arch}_aggregate_16_over_1"] = round(max(r["tok_s_aggregate"] for r in many)
                                                       / max(r["tok_s_aggregate"] for r in one), 3)
    return out


def run(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    gammas = [2, 4, 6] if args.quick and not args.gammas else _parse_list(args.gammas or "1-8", "gammas")
    sessions = [1, 16] if args.quick and not args.sessions else _parse_list(args.sessions or "1,4,16", "sessions")
    delays = [0.0] + ([args.link_delay_ms] if args.link_delay_ms > 0 else [])
    skip = set(filter(None, args.skip.split(",")))
    prompts = heldout_prompts(max(sessions + [args.single_prompts]))
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        if args.json:
            print_json(row)
        else:
            print_table([row], header=len(rows) == 1)

    single = prompts[:args.single_prompts]
    emit(bench_target_only(single, args.max_new_tokens))  # again at the end: the CPU is shared, load drifts
    if "hf" not in skip:
        for r in bench_hf(single, args.max_new_tokens, gammas):
            emit(r)
    if not {"distributed", "fused"} <= skip:
        svc = Services(args.threads, max(sessions), Path(tempfile.mkdtemp(prefix="specmq-e2e-")))
        try:
            svc.wait_ready()
            bench_distributed(svc, prompts[:1], 8, 2, 1, 0.0, args.threads)  # warm-up (model load, first tick)
            for n in sessions:
                ps = single if n == 1 else prompts[:n]  # one session: the target-only prompts, one after another
                for g in gammas:
                    if "distributed" not in skip:
                        for d in delays:
                            emit(bench_distributed(svc, ps, args.max_new_tokens, g, n, d, args.threads))
                    if "fused" not in skip:
                        emit(bench_fused(svc, ps, args.max_new_tokens, g, n))
        finally:
            svc.close()
    emit(bench_target_only(single, args.max_new_tokens))
    summary = goals(rows)
    if args.json:
        print_json({"summary": summary})
    else:
        print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="gamma {2,4,6} and sessions {1,16} only")
    p.add_argument("--gammas", default="", help="gammas, e.g. 1-8 or 2,4 (default: 1-8)")
    p.add_argument("--sessions", default="", help="concurrent sessions, e.g. 1,4,16 (default: 1,4,16)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt (default: 64)")
    p.add_argument("--link-delay-ms", type=float, default=10.0,
                   help="one-way delay of the 'with link delay' rows, 0 = skip them (default: 10)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    p.add_argument("--single-prompts", type=int, default=3, help="prompts averaged in one-session rows (default: 3)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: hf, distributed, fused")

