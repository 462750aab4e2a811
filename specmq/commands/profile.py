"""``specmq profile``: measure a target's verify step and its draft's decode step; write the simulator's cost table.

The measuring is ``workers.profiling`` (what is timed and how); the file is ``workers.cost_table``'s format, which the
simulator reads (``simulator.costs.load_table``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from specmq.cliutil import CommandError, add_command, print_json
from workers.profiling import int_list

EXAMPLE = ("specmq profile --shape llama-3.1-8b --device cuda --dtype bfloat16 --out configs/profiles/h100.yaml "
           "--batches 1,4,16,64 --tokens 1,5,9 --contexts 512,2048\n"
           "  specmq profile --merge run1.yaml,run2.yaml --out configs/profiles/merged.yaml")


def run(args: argparse.Namespace) -> int:
    import torch

    from simulator.costs import load_table
    from workers.cost_table import write_table
    from workers.profiling import hardware, measure

    if args.merge:
        from workers.cost_table import merge_tables

        merged, inside, outside = merge_tables(args.merge, args.out)
        summary = {"out": str(args.out), "merged": [str(p) for p in args.merge], "points": inside + outside,
                   "extrapolated": outside, "batches": merged.target.axes["batch"],
                   "contexts": merged.target.axes["context"]}
        if getattr(args, "json", False):
            print_json(summary)
        else:
            print(f"wrote {args.out}: {len(args.merge)} tables merged, batches {summary['batches']}, contexts "
                  f"{summary['contexts']}; {outside} of {inside + outside} points extrapolated past their run's grid")
        return 0
    if not (args.model or args.shape):
        raise CommandError("give --model DIR or --shape NAME (or --merge A.yaml,B.yaml)")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches, contexts = args.batches, args.contexts
    m = measure(args.model, args.shape, args.draft_model, args.draft_shape, args.device, args.dtype, batches,
                args.tokens, contexts, args.reps, grow=args.grow, draft_grow=args.draft_grow)
    write_table(
        args.out, model=m.target_id, device=args.device, dtype=args.dtype, hardware=hardware(args.device),
        target_axes={"batch": batches, "tokens": m.totals, "context": contexts}, target_latency_ms=m.target_ms,
        draft_axes={"batch": batches, "context": contexts}, draft_latency_ms=m.draft_ms, draft_model=m.draft_id,
        note=(f"measured by specmq profile: median of {args.reps} steps, each synced; tokens = total new tokens "
              f"in the pass (rows share them evenly); {'random weights, ' if args.shape else ''}"
              f"engine {'cuda-graphs' if args.device.startswith('cuda') else 'torch eager'}"))
    table = load_table(args.out)
    summary = {"out": str(args.out), "model": m.target_id, "draft_model": m.draft_id,
               "verify_ms_b1_t1": table.verify_ms(batches[0], 1, contexts[0]),
               "draft_ms_b1": table.draft_step_ms(batches[0], contexts[0])}
    if getattr(args, "json", False):
        print_json(summary)
    else:
        print(f"wrote {args.out}: target {m.target_id} ({len(batches)}x{len(m.totals)}x{len(contexts)} points), "
              f"draft {m.draft_id}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "profile", help="measure a model's step-latency table for the simulator", example=EXAMPLE,
                    func=run, json_flag=True)
    src = p.add_argument_group("model (one of)")
    src.add_argument("--model", default=None, help="HF Llama model directory (real weights)")
    src.add_argument("--shape", default=None, help="named shape with random weights: llama-3.1-8b, llama-3.2-1b, tiny")
    p.add_argument("--draft-model", default=None, help="draft model directory (default: the draft shape of --shape, "
                                                       "else --model itself)")
    p.add_argument("--draft-shape", default=None, help="draft shape (default: llama-3.2-1b for the 8B shape)")
    p.add_argument("--grow", default=None, metavar="SHAPE",
                   help="with --model: profile that model grown in memory to this shape (what 'specmq target --grow' "
                        "runs; e.g. llama-3.1-8b)")
    p.add_argument("--draft-grow", default=None, metavar="SHAPE",
                   help="with --draft-model: the draft grown likewise (e.g. llama-3.2-1b)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--out", type=Path, required=True, help="cost table YAML to write")
    p.add_argument("--batches", type=int_list, default=int_list("1,4,16,64"), help="rows per pass (default 1,4,16,64)")
    p.add_argument("--tokens", type=int_list, default=int_list("1,5,9"),
                   help="new tokens per row (default 1,5,9); the table's axis is batch x these")
    p.add_argument("--contexts", type=int_list, default=int_list("512,2048"),
                   help="cached tokens per row (default 512,2048)")
    p.add_argument("--reps", type=int, default=10, help="timed steps per point (default 10)")
    p.add_argument("--merge", type=lambda t: [x for x in str(t).split(",") if x], default=None,
                   metavar="A.yaml,B.yaml",
                   help="measure nothing: merge these tables of one model pair into --out (the union of their "
                        "axes; a batch row comes from the last table that measured it)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_with_defaults)


def _with_defaults(args: argparse.Namespace) -> int:
    if args.dtype is None:
        args.dtype = "bfloat16" if str(args.device).startswith("cuda") else "float32"
    for name in ("batches", "tokens", "contexts"):
        val = getattr(args, name)
        if isinstance(val, (str, int)):  # from --config YAML
            setattr(args, name, int_list(str(val)))
        elif isinstance(val, list):
            setattr(args, name, sorted(set(int(v) for v in val)))
    if args.reps < 1:
        raise CommandError("--reps must be >= 1")
    if isinstance(args.merge, str):  # from --config YAML
        args.merge = [x for x in args.merge.split(",") if x]
    return run(args)
