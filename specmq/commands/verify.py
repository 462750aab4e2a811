"""``specmq verify``: one model alone, autoregressive, no broker: the baseline speculative runs are compared to."""
from __future__ import annotations

import argparse
import time

from specmq.cliutil import CommandError, add_command, positive, print_json
from workers.serving import DEFAULT_TARGET_MODEL, load_engine_or_fail


def _run(args: argparse.Namespace) -> int:
    from workers.prompts import PromptFileError, read_prompts
    from workers.sampling import SamplingError, SamplingParams
    from workers.speculation import autoregressive_generate
    from workers.tokenizer_text import TokenizerError, decode, encode, load_tokenizer

    if (args.prompt is None) == (args.prompt_file is None):
        raise CommandError("give exactly one of --prompt TEXT or --prompt-file FILE")
    positive("max-new-tokens", args.max_new_tokens)
    try:
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompt_file)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except (PromptFileError, SamplingError) as exc:
        raise CommandError(str(exc)) from None
    engine = load_engine_or_fail(args.model, device=args.device, dtype=args.dtype, slots=1,
                                 max_context=args.max_context, what="model", grow=args.grow)
    try:
        tokenizer = load_tokenizer(args.model)
    except TokenizerError as exc:
        raise CommandError(str(exc)) from None
    for prompt in prompts:
        ids = encode(tokenizer, prompt)
        if not ids:
            raise CommandError(f"prompt {prompt[:40]!r} tokenizes to nothing")
        if len(ids) + args.max_new_tokens > engine.info.max_context:
            raise CommandError(f"prompt of {len(ids)} tokens + --max-new-tokens {args.max_new_tokens} exceeds "
                               f"the context ({engine.info.max_context})")
        t0 = time.perf_counter()
        res = autoregressive_generate(engine, ids, args.max_new_tokens, params)
        wall = time.perf_counter() - t0
        text = decode(tokenizer, res.tokens)
        if args.json:
            print_json({"prompt": prompt, "text": text, "token_ids": res.tokens, "new_tokens": len(res.tokens),
                        "finish_reason": res.finish_reason, "rounds": len(res.tokens), "wall_s": round(wall, 4),
                        "tokens_per_s": round(len(res.tokens) / wall, 2) if wall > 0 else 0.0,
                        "drafted": 0, "accepted": 0, "acceptance_rate": None, "model": engine.info.model_id})
        else:
            print(prompt + text, flush=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "verify", help="target-only autoregressive decoding, no broker (baseline)",
                    example='specmq verify --prompt "Once upon a time" --max-new-tokens 64 --json', func=_run,
                    json_flag=True)
    p.add_argument("--model", default=str(DEFAULT_TARGET_MODEL), help="HF model directory (default: shipped "
                   "models/tiny-target)")
    p.add_argument("--grow", default=None, metavar="SHAPE",
                   help="grow the model in memory to this shape (llama-3.1-8b, llama-3.2-1b, or key=value pairs as in "
                        "'specmq model grow'): same outputs at that shape's cost (default: off)")
    p.add_argument("--prompt", default=None, help="one prompt (text)")
    p.add_argument("--prompt-file", default=None, help="prompts: text, one per line, or .jsonl with {\"prompt\"}")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus truncation when sampling (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--max-context", type=int, default=None, help="tokens per slot (default: model's, at most 2048)")
