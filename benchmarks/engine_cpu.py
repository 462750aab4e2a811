"""Forward latency of our Llama engine vs HF LlamaForCausalLM + DynamicCache on CPU (float32).

A random ~20M-parameter Llama (hidden 384, 8 layers, vocab 8192, 6 heads / 2 KV heads). Each case appends
``tokens`` new tokens to ``rows`` sequences that already hold ``context`` tokens, then rolls back (ours: a length
change; HF: ``DynamicCache.crop``), and reports the median of ``--reps`` runs. HF cannot put rows at different
positions in one forward, so its batch rows share one context length; ours is also run with ragged contexts
(context - 0..rows-1) to show that mixed positions cost nothing extra.

    .venv/bin/python benchmarks/engine_cpu.py [--reps 20] [--context 256] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Callable

import torch


def build_model(model_dir: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)


def median_ms(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Median wall time of each fn; runs are interleaved so background load hits every column alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def ours_step(model_dir: str, rows: int, tokens: int, context: int, ragged: bool) -> Callable[[], None]:
    from workers.engine import load_engine
    eng = load_engine(model_dir, slots=rows, max_context=context + tokens + 8, backend="llama")
    g = torch.Generator().manual_seed(1)
    slots = [eng.allocate() for _ in range(rows)]
    for i, s in enumerate(slots):
        n = context - (i if ragged else 0)
        eng.forward([(s, torch.randint(0, 8192, (n,), generator=g).tolist())], last_only=[True])
    new = [torch.randint(0, 8192, (tokens,), generator=g).tolist() for _ in slots]

    def step() -> None:
        eng.forward(list(zip(slots, new)))
        for s in slots:
            eng.rollback(s, tokens)
    return step


def hf_step(model_dir: str, rows: int, tokens: int, context: int) -> Callable[[], None]:
    from transformers import DynamicCache, LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 8192, (rows, context), generator=g)
    new = torch.randint(0, 8192, (rows, tokens), generator=g)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=prompt, cache=cache, use_cache=True)

    def step() -> None:
        with torch.inference_mode():
            model(input_ids=new, cache=cache, use_cache=True)
            cache.crop(-tokens)  # transformers 5.x: a negative count drops that many tokens
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        build_model(d)
        print(f"random Llama ~20M params, float32, CPU threads={args.threads}, context={args.context}, "
              f"tokens/row={args.tokens}, median of {args.reps}")
        print(f"{'rows':>5} {'ours ms':>9} {'ours ragged ms':>15} {'HF DynamicCache ms':>19} {'speedup':>8}")
        for rows in (1, 4, 16):
            ms = median_ms({"ours": ours_step(d, rows, args.tokens, args.context, ragged=False),
                            "ragged": ours_step(d, rows, args.tokens, args.context, ragged=True),
                            "hf": hf_step(d, rows, args.tokens, args.context)}, args.reps)
            ours, ragged, hf = ms["ours"], ms["ragged"], ms["hf"]
            print(f"{rows:>5} {ours:>9.2f} {ragged:>15.2f} {hf:>19.2f} {hf / ours:>7.2f}x")


if __name__ == "__main__":
    main()
