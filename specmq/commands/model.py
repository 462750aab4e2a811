"""``specmq model``: tools on model directories. ``specmq model grow`` writes a larger-shape Llama that computes
exactly what a small one computes (``workers/engine/grow.py``): 8B-class cost with the small pair's acceptance."""
from __future__ import annotations

import argparse
import sys

from specmq.cliutil import CommandError, add_command, print_json

GROW_EXAMPLE = ("specmq model grow --from models/tiny-target --shape llama-3.1-8b --out /data/tiny-target-8b\n"
                "  specmq model grow --from models/tiny-draft --shape llama-3.2-1b --out /data/tiny-draft-1b\n"
                "  specmq model grow --from models/tiny-target --out /tmp/grown --dtype float32 --json \\\n"
                "      --shape hidden=768,layers=12,heads=16,kv_heads=8,head_dim=128,intermediate=2048")


def _grow(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from workers.engine.base import EngineError
    from workers.engine.grow import plan_growth, write_grown
    from workers.engine.model_dir import read_config

    source = vars(args)["from"]
    for flag, value in (("--from", source), ("--shape", args.shape), ("--out", args.out)):
        if not value:
            raise CommandError(f"{flag} is required")
    try:
        _, cfg = read_config(source)
        layers = plan_growth(cfg, args.shape).big.num_hidden_layers
        bar = tqdm(total=layers + 2, desc="grow", unit="part", file=sys.stderr, disable=None)

        def progress(parts):
            for part in parts:
                yield part
                bar.update(1)

        try:
            report = write_grown(source, args.shape, args.out, dtype=args.dtype, seed=args.seed, force=args.force,
                                 progress=progress)
        finally:
            bar.close()
    except EngineError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:  # disk full, permissions
        raise CommandError(f"cannot write {args.out}: {exc}") from None
    if args.json:
        print_json(vars(report))
    else:
        print(f"wrote {report.out}: {report.summary()}", flush=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="model tools: grow a model to a larger shape with the same outputs",
                       description="Tools on HF model directories.",
                       epilog=f"example:\n  {GROW_EXAMPLE}", formatter_class=argparse.RawDescriptionHelpFormatter)
    tools = p.add_subparsers(dest="tool", required=True, metavar="TOOL")
    g = add_command(tools, "grow", help="write a larger-shape Llama whose outputs equal the model's",
                    description="Grow a Llama directory to a larger shape (zero-padded dimensions, pass-through "
                                "layers, rescaled norms and attention scale, RoPE dims placed to keep their "
                                "frequencies): the same logits, the big shape's step cost. The vocabulary stays the "
                                "model's. To grow in memory instead, give --grow SHAPE to target, fused or verify.",
                    example=GROW_EXAMPLE, func=_grow, json_flag=True)
    g.add_argument("--from", default=None, metavar="DIR", help="the small HF Llama directory (required)")
    g.add_argument("--shape", default=None,
                   help="llama-3.1-8b, llama-3.2-1b, or key=value pairs: hidden, layers, heads, kv_heads, head_dim, "
                        "intermediate (required; a mapping in --config)")
    g.add_argument("--out", default=None, metavar="DIR", help="directory to write (required; must be empty)")
    g.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16 (default: bfloat16)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights that meet only zeros (default: 0)")
    g.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing its weights")
