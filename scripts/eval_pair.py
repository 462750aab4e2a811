#!/usr/bin/env python3
"""Measure how well the draft predicts the target: greedy agreement, tokens per round, CPU forward-cost ratio.

Greedy speculative decoding accepts a drafted token exactly when it equals the target's greedy token, so the
number that matters is agreement *on the target's own greedy continuation*. For held-out stdlib files we take
fixed prefixes, let the target continue them greedily, then teacher-force both models on prefix+continuation
and compare the draft's argmax with the target's tokens at every continuation position.

Tokens per round for gamma = 1..8 are reported two ways: `measured` replays greedy speculative decoding over the
per-position matches (a round accepts the run of matches, at most gamma, plus the target's one bonus token);
`iid` is the closed form E = (1 - a^(gamma+1)) / (1 - a) for a per-token acceptance a.

Example:
  python scripts/eval_pair.py --target models/tiny-target --draft models/tiny-draft --json
  python scripts/eval_pair.py --cost-only --threads 2
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path


def heldout_files(models_dir: Path, stdlib: Path, every: int = 20) -> list[Path]:
    """The held-out files recorded at export (else recomputed with the training split rule)."""
    listed = models_dir / "heldout_files.json"
    if listed.exists():
        rels = json.loads(listed.read_text())
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from train_tiny_pair import stdlib_files

        rels = [p.relative_to(stdlib).as_posix() for p in stdlib_files(stdlib)]
        rels = [r for r in rels if int(hashlib.sha256(r.encode()).hexdigest(), 16) % every == 0]
    return [stdlib / r for r in rels if (stdlib / r).exists()]


def forward_kwargs(model) -> str:
    """Name of the KV-cache argument: `cache` in newer transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_continue(model, prefix, new_tokens: int):
    """Plain greedy decoding with a KV cache (no EOS stop, so every row has the same length)."""
    import torch

    key = forward_kwargs(model)
    with torch.no_grad():
        out = model(input_ids=prefix, use_cache=True)
        cache = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        toks = [tok]
        for _ in range(new_tokens - 1):
            out = model(input_ids=tok, use_cache=True, **{key: cache})
            cache = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(tok)
    return torch.cat(toks, dim=1)


def tokens_per_round(matches: list[list[bool]], gamma: int) -> float:
    """Replay greedy speculative decoding: each round emits the run of draft matches (<= gamma) + 1 target token."""
    emitted, rounds = 0, 0
    for row in matches:
        pos = 0
        while pos < len(row):
            run = 0
            while run < gamma and pos + run < len(row) and row[pos + run]:
                run += 1
            step = min(run + 1, len(row) - pos)
            emitted += step
            rounds += 1
            pos += step
    return emitted / rounds


def iid_tokens_per_round(a: float, gamma: int) -> float:
    return float(gamma + 1) if a >= 1.0 else (1 - a ** (gamma + 1)) / (1 - a)


def measure_agreement(target, draft, tok, files: list[Path], prefix_len: int, new_tokens: int,
                      per_file: int, max_files: int, batch: int) -> dict:
    import torch

    prefixes = []
    for path in files[:max_files]:
        ids = tok(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(ids) < prefix_len + 1:
            continue
        span = len(ids) - prefix_len
        for k in range(per_file):
            end = prefix_len + (span * k) // per_file
            prefixes.append(ids[end - prefix_len:end])
    matches: list[list[bool]] = []
    self_consistent = 0
    total = 0
    for i in range(0, len(prefixes), batch):
        x = torch.tensor(prefixes[i:i + batch], dtype=torch.long)
        cont = greedy_continue(target, x, new_tokens)
        full = torch.cat([x, cont], dim=1)
        with torch.no_grad():
            t_arg = target(input_ids=full[:, :-1]).logits[:, prefix_len - 1:].argmax(-1)
            d_arg = draft(input_ids=full[:, :-1]).logits[:, prefix_len - 1:].argmax(-1)
        self_consistent += (t_arg == cont).sum().item()
        total += cont.numel()
        matches.extend((d_arg == cont).tolist())
    a = sum(map(sum, matches)) / total
    return {
        "sequences": len(matches), "prefix_len": prefix_len, "new_tokens": new_tokens,
        "agreement": a,
        "target_teacher_forced_consistency": self_consistent / total,
        "tokens_per_round": {
            str(g): {"measured": tokens_per_round(matches, g), "iid": iid_tokens_per_round(a, g)}
            for g in range(1, 9)},
    }


def measure_perplexity(model, tok, files: list[Path], ctx: int = 512) -> float:
    """Held-out perplexity over whole files, in non-overlapping windows of `ctx` tokens."""
    import math

    import torch
    import torch.nn.functional as F

    nll, n = 0.0, 0
    for path in files:
        ids = [tok.bos_token_id] + tok(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        ids.append(tok.eos_token_id)
        for s in range(0, len(ids) - 1, ctx):
            x = torch.tensor([ids[s:s + ctx + 1]])
            if x.size(1) < 2:
                continue
            with torch.no_grad():
                logits = model(input_ids=x[:, :-1]).logits
            nll += F.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
            n += x.size(1) - 1
    return math.exp(nll / n)


def measure_cost(target, draft, ctx: int, reps: int) -> dict:
    """CPU latency of one forward at batch 1 after a `ctx`-token prefill, for 1 and 5 new tokens.

    Target and draft are timed alternately so that load from other processes hits both alike; the ratio of the
    minima is the headline number (the least disturbed runs), the ratio of the medians is reported beside it.
    """
    import torch

    out = {}
    for new in (1, 5):
        state = {}
        for name, model in (("target", target), ("draft", draft)):
            gen = torch.Generator().manual_seed(0)
            prompt = torch.randint(3, model.config.vocab_size, (1, ctx), generator=gen)
            step = torch.randint(3, model.config.vocab_size, (1, new), generator=gen)
            with torch.no_grad():
                cache = model(input_ids=prompt, use_cache=True).past_key_values
            state[name] = (model, forward_kwargs(model), cache, step, [])
        with torch.no_grad():
            for rep in range(reps + 3):
                for name in ("target", "draft"):
                    model, key, cache, step, times = state[name]
                    t = time.perf_counter()
                    model(input_ids=step, use_cache=True, **{key: cache})
                    if rep >= 3:
                        times.append(time.perf_counter() - t)
                    cache.crop(-new)  # back to the prefix: every rep costs the same
        t_ms = [x * 1e3 for x in state["target"][4]]
        d_ms = [x * 1e3 for x in state["draft"][4]]
        out[f"new_{new}"] = {
            "target_ms_min": min(t_ms), "draft_ms_min": min(d_ms), "ratio": min(t_ms) / min(d_ms),
            "target_ms_median": statistics.median(t_ms), "draft_ms_median": statistics.median(d_ms),
            "ratio_median": statistics.median(t_ms) / statistics.median(d_ms)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="models/tiny-target")
    p.add_argument("--draft", default="models/tiny-draft")
    p.add_argument("--stdlib", default=None, help="stdlib folder holding the held-out files (default: this Python's)")
    p.add_argument("--prefix-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--per-file", type=int, default=2, help="prefixes per held-out file")
    p.add_argument("--max-files", type=int, default=24)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cost-ctx", type=int, default=256)
    p.add_argument("--cost-reps", type=int, default=50)
    p.add_argument("--cost-only", action="store_true")
    p.add_argument("--no-cost", action="store_true")
    p.add_argument("--perplexity", action="store_true", help="also held-out perplexity of both on --max-files files (slow on CPU)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.target)
    tok.model_max_length = 1 << 30  # whole files are tokenized, then windowed; silence the length warning
    report: dict = {"target": args.target, "draft": args.draft, "threads": args.threads,
                    "params": {"target": sum(p.numel() for p in target.parameters()),
                               "draft": sum(p.numel() for p in draft.parameters())}}
    if not args.cost_only:
        stdlib = Path(args.stdlib or sysconfig.get_paths()["stdlib"])
        files = heldout_files(Path(args.target).parent, stdlib)
        if not files:
            print(f"no held-out files found under {stdlib}", file=sys.stderr)
            return 1
        t = time.time()
        report["agreement"] = measure_agreement(target, draft, tok, files, args.prefix_len, args.new_tokens,
                                                args.per_file, args.max_files, args.batch)
        report["agreement"]["seconds"] = round(time.time() - t, 1)
        if args.perplexity:
            some = files[:args.max_files]
            report["heldout_ppl"] = {"target": measure_perplexity(target, tok, some),
                                     "draft": measure_perplexity(draft, tok, some), "files": len(some)}
    if not args.no_cost:
        report["forward_cost"] = {"ctx": args.cost_ctx, **measure_cost(target, draft, args.cost_ctx, args.cost_reps)}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        if "agreement" in report:
            ag = report["agreement"]
            print(f"greedy agreement {ag['agreement']:.3f} over {ag['sequences']} continuations")
            for g, v in ag["tokens_per_round"].items():
                print(f"  gamma={g}: {v['measured']:.2f} tokens/round measured, {v['iid']:.2f} iid")
        if "heldout_ppl" in report:
            print(f"held-out ppl: target {report['heldout_ppl']['target']:.2f}, draft {report['heldout_ppl']['draft']:.2f}")
        for k, v in report.get("forward_cost", {}).items():
            if k != "ctx":
                print(f"forward {k}: target {v['target_ms_min']:.2f} ms, draft {v['draft_ms_min']:.2f} ms (min), "
                      f"ratio {v['ratio']:.1f}x (medians: {v['ratio_median']:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
