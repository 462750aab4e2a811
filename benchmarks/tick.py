"""``specmq bench tick``: where a target tick's time goes, beside the engine's forward.

A profile table (``specmq profile``) times ``engine.forward`` alone. A serving tick does more: it files each
session's chunk (``read``: parsing its frame, as the target's loop does; ``handle``), plans the batch (``take_tick``), runs the forward, judges every row (acceptance and
rollback), commits and answers (``finish``: the controller and one ``Result`` per session) and encodes the answers
for the wire. This runs that exact path, ``TargetServer`` without sockets, on B open sessions at a given context,
and reports each part per tick and per row. Anything here beyond ``forward_ms`` is host time the GPU may sit idle
for, and it is what the simulator's table-driven ticks leave out.

Sessions are placed straight into their slots (cache rows of random contents at ``--context``), so no prefill
runs: the numbers are the steady state of B decoding (``--gamma 0``: decode mode, 1-token rows) or verifying
(``--gamma N``: N random draft tokens a row, nearly all rejected) sessions. ``--prefill-rows P`` adds P sessions
prefilling ``--context``-token prompts, one chunk each per tick, at staggered points of their prompts: the mixed
ticks a target runs while sessions arrive. With ``--cost-table``, each row also gives ``table_ms``, the table's
cost for the median tick's shape (rows, tokens, mean context: how the simulator prices a tick), and
``forward_over_table``.

    specmq bench tick --device cuda --grow llama-3.1-8b --batches 1,8,32,64,128,256 --gammas 0,4 --json
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import BenchmarkError, print_rows_json
from workers.profiling import ProfileError, build_engine, int_list, sync

HELP = "a target tick's parts (handle, plan, forward, acceptance, finish, encode) per batch size"
EXAMPLE = "specmq bench tick --device cuda --grow llama-3.1-8b --batches 1,8,64,256 --gammas 0,4 --json"
ROOT = Path(__file__).resolve().parents[1]
PARTS = ("read_ms", "handle_ms", "take_ms", "forward_ms", "accept_ms", "finish_ms", "encode_ms")


def place_session(server: Any, key: str, prompt: list[int], cached: int, params: Any, max_new_tokens: int) -> Any:
    """A session put straight into a slot whose cache already holds ``cached`` of its prompt's tokens (random
    contents: no prefill pass runs for them)."""
    from workers.acceptance import make_policy
    from workers.target_worker import Served

    slot = server.engine.allocate()
    server.engine.table.lengths[slot] = cached
    s = Served(key, slot, prompt, params, make_policy("exact"), max_new_tokens=max_new_tokens,
               arrived=time.monotonic(), prefilled=cached)
    server.sessions[key] = s
    return s


def open_sessions(server: Any, n: int, context: int, temperature: float, seed: int) -> list[str]:
    """``n`` sessions opened straight into slots whose cache holds ``context`` tokens (no prefill pass)."""
    from workers.sampling import SamplingParams

    rng = random.Random(seed)
    server.eos = frozenset()  # random contexts may produce EOS: the sessions must not finish mid-measure
    vocab, keys = server.engine.info.vocab_size, []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(context)]
        server.opened(place_session(server, f"s{i}", prompt, context - 1,
                                    SamplingParams(temperature=temperature, seed=i), 1 << 30))
        keys.append(f"s{i}")
    server.take_credits()
    return keys


def keep_prefilling(server: Any, want: int, context: int, rng: random.Random) -> None:
    """Keep ``want`` sessions prefilling a ``context``-token prompt (``--prefill-rows``): a finished one is dropped
    and a new one opened, each starting at a different point of its prompt so the ticks mix early and late
    chunks, as a serving target's do while new sessions arrive."""
    from workers.sampling import SamplingParams

    for key in [k for k, s in server.sessions.items() if k.startswith("p") and s.target is not None]:
        server.drop_session(key)
    vocab, chunk = server.engine.info.vocab_size, server.config.prefill_chunk
    have = sum(1 for k in server.sessions if k.startswith("p"))
    for _ in range(want - have):
        key = f"p{rng.randrange(1 << 40)}"
        start = chunk * rng.randrange(max(1, (context - 1) // chunk))  # its chunks so far, cached already
        prompt = [rng.randrange(3, vocab) for _ in range(context)]
        place_session(server, key, prompt, start, SamplingParams(), 1)
        server.prefill_order.append(key)


def tick_shape(server: Any, tick: Any) -> tuple[int, int, float]:
    """(rows, tokens, mean context) of a tick, as the simulator prices it from a profile table."""
    rows = tick.plan.rows
    tokens = sum(len(c.msg.tokens) + 1 for _, c in tick.verify) + sum(take for _, take in tick.prefill)
    ctx = [server.sessions[k].target.pos for k, _ in tick.verify] + [server.sessions[k].prefilled
                                                                     for k, _ in tick.prefill]
    return rows, tokens, sum(ctx) / max(1, len(ctx))


def chunk_for(server: Any, key: str, gamma: int, temperature: float, rng: random.Random, dense: bool = False
              ) -> Any:
    """The session's next chunk: decode mode (γ 0) or γ random draft tokens (with a random q when sampling: 32
    entries a row, or ``dense``: a whole-vocabulary row, what a drafter sampling without top-k / top-p sends)."""
    from protocol.codec import pack_q
    from protocol.messages import Verify

    t = server.sessions[key].target
    vocab = server.engine.info.vocab_size
    tokens = [rng.randrange(3, vocab) for _ in range(gamma)]
    q: tuple = (None, None, None)
    if gamma and temperature > 0:
        import numpy as np

        rows = []
        for x in tokens:
            if dense:
                p = np.random.default_rng(rng.randrange(1 << 30)).random(vocab, dtype=np.float32) + 1e-3
                rows.append((None, (p / p.sum()).astype(np.float32)))
                continue
            ids = np.array(sorted(set(rng.sample(range(vocab), 31)) | {x}), dtype=np.uint32)
            p = np.full(ids.size, 1.0 / ids.size, dtype=np.float32)
            rows.append((ids, p))
        q = pack_q(rows)
    return Verify(session=key, seq=t.last_seq + 1, pos=t.pos, tokens=tokens, q_ids=q[0], q_probs=q[1], q_lens=q[2],
                  decode=0 if gamma else 1, draft_ms=2.0, path_ms=1.0)


def measure_point(server: Any, keys: list[str], gamma: int, temperature: float, ticks: int, seed: int,
                  dense: bool = False, prefill_rows: int = 0, context: int = 0, table: Any = None
                  ) -> dict[str, float]:
    """The parts of the median tick of ``ticks`` ticks, in ms (the first, warm-up/capture tick dropped).
    ``prefill_rows``: that many sessions prefill ``context``-token prompts beside the verifying ones (mixed ticks);
    ``table``: a profile table whose prediction for each tick's shape is reported beside the forward."""
    from protocol.codec import DEFAULT_MAX_FRAME, encode
    from protocol.frames import parse, to_message

    engine = server.engine
    done = sync(engine)
    rng = random.Random(seed)
    forward = engine.forward
    timing: dict[str, float] = {}

    def timed_forward(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = forward(*a, **kw)
        done()
        timing["forward_ms"] = (time.perf_counter() - t0) * 1e3
        return out

    engine.forward = timed_forward
    parts: dict[str, list[float]] = {p: [] for p in PARTS + ("tick_ms", "table_ms", "tokens")}
    try:
        for i in range(ticks + 1):
            if prefill_rows:
                keep_prefilling(server, prefill_rows, context, rng)
            frames = [encode(chunk_for(server, k, gamma, temperature, rng, dense)) for k in keys]
            tr = time.perf_counter()
            msgs = [to_message(parse(f, DEFAULT_MAX_FRAME)) for f in frames]  # what the target's loop reads
            t0 = time.perf_counter()
            for m in msgs:
                refused = server.handle(m)
                if refused:
                    raise BenchmarkError(f"the target refused a chunk for {m.session}: {refused[0]}")
            t1 = time.perf_counter()
            tick = server.take_tick()
            if tick is not None and prefill_rows and len(tick.prefill) != prefill_rows:
                raise BenchmarkError(f"the tick took {len(tick.prefill)} of {prefill_rows} prefill rows")
            if tick is None or len(tick.verify) != len(keys):
                raise BenchmarkError(f"the tick took {0 if tick is None else len(tick.verify)} of {len(keys)} "
                                     "sessions: raise --max-batch-rows / --max-batch-tokens")
            t2 = time.perf_counter()
            shape = tick_shape(server, tick)  # before finish moves the prefills on; not part of the tick's time
            tc = time.perf_counter()
            outcomes = server.compute(tick)
            done()
            t3 = time.perf_counter()
            if isinstance(outcomes, Exception):
                raise BenchmarkError(f"the tick's forward failed: {outcomes!r}")
            replies = server.finish(tick, outcomes, (t3 - tc) * 1e3)
            t4 = time.perf_counter()
            for r in replies:
                encode(r)
            t5 = time.perf_counter()
            server.take_credits()
            if not i:
                continue
            if table is not None:
                parts["table_ms"].append(table.verify_ms(*shape))
            if prefill_rows:
                parts["tokens"].append(float(shape[1]))
            parts["read_ms"].append((t0 - tr) * 1e3)
            parts["handle_ms"].append((t1 - t0) * 1e3)
            parts["take_ms"].append((t2 - t1) * 1e3)
            parts["forward_ms"].append(timing["forward_ms"])
            parts["accept_ms"].append((t3 - tc) * 1e3 - timing["forward_ms"])
            parts["finish_ms"].append((t4 - t3) * 1e3)
            parts["encode_ms"].append((t5 - t4) * 1e3)
            parts["tick_ms"].append((t5 - tr - (tc - t2)) * 1e3)
    finally:
        engine.forward = forward
    ticks_ms = parts["tick_ms"]
    mid = sorted(range(len(ticks_ms)), key=ticks_ms.__getitem__)[len(ticks_ms) // 2]
    return {p: v[mid] for p, v in parts.items() if v}  # the median tick, with its own parts (they add up)


def run(args: argparse.Namespace) -> int:
    from workers.target_worker import TargetConfig, TargetServer

    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if args.prefill_rows < 0:
        raise BenchmarkError(f"--prefill-rows must be >= 0, got {args.prefill_rows}")
    table = None
    if args.cost_table:
        from workers.cost_table import CostTableError, load_table

        try:
            table = load_table(args.cost_table)
        except (CostTableError, OSError) as exc:
            raise BenchmarkError(f"cannot read --cost-table {args.cost_table}: {exc}") from None
    top = max(args.batches) + args.prefill_rows
    max_ctx = args.context + (args.ticks + 2) * (max(args.gammas) + 1) + 16  # every point starts from --context
    say(f"loading {Path(args.model).name}" + (f" grown to {args.grow}" if args.grow else "")
        + f" on {args.device} ({top} slots, context {max_ctx}) ...")
    try:
        engine = build_engine(args.model, None, args.device, args.dtype, top, max_ctx, grow=args.grow)
    except ProfileError as exc:
        raise BenchmarkError(str(exc)) from None
    rows = []
    for gamma in args.gammas:
        for b in args.batches:
            for slot in [s for s, taken in enumerate(engine.table.taken) if taken]:
                engine.free(slot)
            chunk = TargetConfig.prefill_chunk
            cfg = TargetConfig(max_batch_rows=b + args.prefill_rows,
                               max_batch_tokens=b * (gamma + 1) + args.prefill_rows * chunk, max_gamma=max(gamma, 1),
                               controller=not args.no_controller, cost_table=args.cost_table, tick_ms=0.0)
            server = TargetServer(engine, cfg)
            keys = open_sessions(server, b, args.context, args.temperature, args.seed)
            med = measure_point(server, keys, gamma, args.temperature, args.ticks, args.seed, args.q == "dense",
                                args.prefill_rows, args.context, table)
            host = med["tick_ms"] - med["forward_ms"]
            extra = {"prefill_rows": args.prefill_rows} if args.prefill_rows else {}
            if table is not None:
                extra["forward_over_table"] = round(med["forward_ms"] / med["table_ms"], 3)
            row = {"batch": b, "gamma": gamma, "context": args.context, "temperature": args.temperature, **extra,
                   **{k: round(v, 3) for k, v in med.items()},
                   "host_ms": round(host, 3), "host_us_per_row": round(host * 1e3 / b, 1),
                   "host_share": round(host / med["tick_ms"], 3)}
            rows.append(row)
            say(f"  γ={gamma} B={b:3d}: tick {row['tick_ms']:8.3f} ms, forward {row['forward_ms']:8.3f}, "
                f"host {row['host_ms']:7.3f} ({row['host_us_per_row']:.0f} µs/row)")
    head = {"device": args.device, "model": args.model, "grow": args.grow, "dtype": args.dtype,
            "context": args.context, "ticks": args.ticks, "controller": not args.no_controller, "q": args.q,
            "command": "specmq bench tick " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "tick"] else [])}
    if args.json:
        print_rows_json(head, rows)
        return 0
    print(f"# target tick parts, ms, the median of {args.ticks} ticks: {head['model']}"
          + (f" grown to {args.grow}" if args.grow else "") + f", {args.dtype} on {args.device}, context {args.context}")
    cols = ("gamma", "batch", "tick_ms", "forward_ms") + tuple(p for p in PARTS if p != "forward_ms") + (
        "host_ms", "host_us_per_row", "host_share")
    print(" ".join(f"{c:>15s}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>15}" for c in cols))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(ROOT / "models" / "tiny-target"), help="target model directory")
    p.add_argument("--grow", default=None, help="grow the model in memory to this shape (e.g. llama-3.1-8b)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--batches", type=int_list, default=int_list("1,8,32"), help="sessions per tick (default: 1,8,32)")
    p.add_argument("--gammas", type=int_list, default=int_list("0,4"),
                   help="draft tokens a row; 0 = decode mode (default: 0,4)")
    p.add_argument("--context", type=int, default=512, help="cached tokens per session (default: 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every session (default: 0)")
    p.add_argument("--ticks", type=int, default=10, help="timed ticks per point (default: 10)")
    p.add_argument("--cost-table", default=None, help="the controller's profile table (default: fitted online)")
    p.add_argument("--no-controller", action="store_true", help="run the target without the goodput controller")
    p.add_argument("--q", choices=("sparse", "dense"), default="sparse",
                   help="when sampling: each draft token's q as 32 entries (a top-k drafter) or the whole vocabulary "
                        "(a drafter without top-k / top-p) (default: sparse)")
    p.add_argument("--prefill-rows", type=int, default=0,
                   help="sessions prefilling a --context-token prompt in every tick beside the verifying ones, one "
                        "chunk each: mixed ticks, as a target serving new sessions runs them (default: 0)")
    p.add_argument("--seed", type=int, default=0)
