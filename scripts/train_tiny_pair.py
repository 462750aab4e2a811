#!/usr/bin/env python3
"""Train the project's tiny Llama pair (target + distilled draft) on the Python standard library's source.

No model hub is reachable, so every demo, test and benchmark needs a real pair that loads through the same
path as a real Llama directory. Stages, each deterministic given --seed:

  prepare  list the running interpreter's Lib/*.py (tests excluded, sorted), split held-out files by hash,
           train a byte-level BPE tokenizer, write the token stream as uint16 .npy    (CPU, here)
  train    train the target LM, then distil the draft from it (KL to the target's logits); checkpoints
           every --ckpt-every steps and resumes from them; writes weights + metrics    (CPU or CUDA)
  export   write two Hugging Face directories (config, safetensors, tokenizer, generation config) and
           the loss curve                                                               (CPU, here)
  encode   the same corpus and split, encoded with the SHIPPED tokenizer into a small folder that can be
           carried to a machine whose Python (and so whose Lib/) differs              (CPU, here)
  distil   fine-tune a shipped draft against a shipped target on long windows (KL + a little CE), so the
           draft also agrees with the target at positions it never saw; reports teacher-forced agreement
           per position bucket before and after; writes a directory shaped like models/tiny-draft (CPU or CUDA)

Example:
  python scripts/train_tiny_pair.py prepare --data-dir .tinydata
  python scripts/train_tiny_pair.py train --data-dir .tinydata --work-dir runs/tiny --device cuda
  python scripts/train_tiny_pair.py export --data-dir .tinydata --work-dir runs/tiny --out models

  # long-context draft: encode here (6 MB), carry runs/distil-data to the GPU machine, distil there
  python scripts/train_tiny_pair.py encode --data-dir runs/distil-data
  python scripts/train_tiny_pair.py distil --data-dir runs/distil-data --target models/tiny-target \\
      --draft models/tiny-draft --out runs/tiny-draft-2048 --device cuda --ctx 2048 --batch 16 \\
      --steps 2000 --max-minutes 4
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>"]  # ids 0, 1, 2
PAD, BOS, EOS = SPECIAL_TOKENS
EXCLUDED_DIRS = {"test", "tests", "site-packages", "__pycache__", "idle_test"}
MAX_SHARD_BYTES = 15_000_000  # every shipped file stays under 16 MB
MODELS = Path(__file__).resolve().parents[1] / "models"


# ----------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """Llama shape; the target must cost >= 5x the draft per CPU forward (measured by eval_pair.py --cost)."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int


TARGET = Shape(hidden_size=384, num_hidden_layers=10, intermediate_size=1024, num_attention_heads=6,
               num_key_value_heads=6)
DRAFT = Shape(hidden_size=128, num_hidden_layers=2, intermediate_size=384, num_attention_heads=4,
              num_key_value_heads=4)


def llama_config(shape: Shape, vocab_size: int):
    """A plain LlamaConfig with tied embeddings (keeps the pair small) and room for 2048 positions."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, **asdict(shape))


# ---------------------------------------------------------------------------------------------- prepare
def stdlib_files(root: Path) -> list[Path]:
    """Sorted .py files of the stdlib, without test suites or installed packages (a fixed, reproducible list)."""
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        if any(p in EXCLUDED_DIRS for p in rel[:-1]):
            continue
        if rel[0] == "idlelib" and any(p.startswith("test") or p.startswith("idle_test") for p in rel[1:]):
            continue
        out.append(path)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(rel: str, every: int) -> bool:
    """Held-out split by file: a stable hash of the relative path, so the split never depends on the order."""
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % every == 0


def split_files(root: Path, held_out: Callable[[str], bool]) -> tuple[list, list, list]:
    """(training, held-out) lists of (relative path, text) of the stdlib under ``root``, and the relative paths
    skipped because they are not UTF-8."""
    train, held, skipped = [], [], []
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        (held if held_out(rel) else train).append((rel, text))
    return train, held, skipped


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE: any text (any bytes of UTF-8) round-trips exactly, no unknown token needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def encode_stream(tok, texts: list[str]) -> np.ndarray:
    """Files joined as `<|bos|> text <|eos|>`: the model learns where files start and end."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


def cmd_prepare(args: argparse.Namespace) -> None:
    root = Path(args.stdlib or sysconfig.get_paths()["stdlib"])
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    train, held, skipped = split_files(root, lambda rel: is_heldout(rel, args.heldout_every))
    tok = train_tokenizer([t for _, t in train], args.vocab_size)
    tok.save(str(data / "tokenizer.json"))
    np.save(data / "train.npy", encode_stream(tok, [t for _, t in train]))
    np.save(data / "val.npy", encode_stream(tok, [t for _, t in held]))
    manifest = {
        "python": platform.python_version(), "stdlib": str(root), "vocab_size": tok.get_vocab_size(),
        "heldout_every": args.heldout_every, "train_files": [r for r, _ in train],
        "heldout_files": [r for r, _ in held], "skipped": skipped,
        "train_bytes": sum(len(t.encode()) for _, t in train), "heldout_bytes": sum(len(t.encode()) for _, t in held),
        "train_tokens": int(np.load(data / "train.npy").size), "heldout_tokens": int(np.load(data / "val.npy").size),
    }
    (data / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps({k: v for k, v in manifest.items() if not k.endswith("_files")}, indent=1))


# ----------------------------------------------------------------------------------------------- encode
def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cmd_encode(args: argparse.Namespace) -> None:
    """Encode the corpus with the shipped tokenizer, so a fine-tune sees exactly the ids the shipped pair knows.

    The held-out list written at export is authoritative (the target never trained on those files); without it
    the hash rule of `prepare` recomputes the split. Training files are taken in sha256(path) order up to
    --max-train-tokens (whole files), a deterministic subset that keeps the folder small enough to carry.
    """
    from tokenizers import Tokenizer

    root = Path(args.stdlib or sysconfig.get_paths()["stdlib"])
    tok_path, data = Path(args.tokenizer), Path(args.data_dir)
    if not root.is_dir():
        raise SystemExit(f"encode: --stdlib {root} is not a folder")
    if not tok_path.is_file():
        raise SystemExit(f"encode: --tokenizer {tok_path} does not exist")
    listed = Path(args.heldout_list) if args.heldout_list else None
    held_rels = set(json.loads(listed.read_text())) if listed is not None and listed.is_file() else None
    tok = Tokenizer.from_file(str(tok_path))
    train, held, skipped = split_files(root, lambda rel: rel in held_rels if held_rels is not None
                                       else is_heldout(rel, args.heldout_every))
    if not train or not held:
        raise SystemExit(f"encode: {len(train)} training and {len(held)} held-out files under {root}; need both")
    train.sort(key=lambda rt: hashlib.sha256(rt[0].encode()).hexdigest())
    parts, taken, total = [], [], 0
    for rel, text in train:
        ids = encode_stream(tok, [text])
        if total + ids.size > args.max_train_tokens:
            break
        parts.append(ids)
        taken.append(rel)
        total += ids.size
    if not parts:
        raise SystemExit(f"encode: --max-train-tokens {args.max_train_tokens} is smaller than the first file")
    data.mkdir(parents=True, exist_ok=True)
    train_ids = np.concatenate(parts)
    val_ids = encode_stream(tok, [t for _, t in held])
    np.save(data / "train.npy", train_ids)
    np.save(data / "val.npy", val_ids)
    manifest = {
        "stage": "encode", "python": platform.python_version(), "stdlib": str(root), "tokenizer": str(tok_path),
        "tokenizer_sha256": file_sha256(tok_path), "vocab_size": tok.get_vocab_size(),
        "heldout_split": f"list {listed}" if held_rels is not None else f"sha256 mod {args.heldout_every}",
        "max_train_tokens": args.max_train_tokens, "train_files_available": len(train),
        "train_files": taken, "heldout_files": [r for r, _ in held], "skipped": skipped,
        "train_tokens": int(train_ids.size), "heldout_tokens": int(val_ids.size),
    }
    (data / "manifest.json").write_text(json.dumps(manifest, indent=1))
    sizes = {f.name: f.stat().st_size for f in sorted(data.iterdir()) if f.is_file()}
    report = {k: v for k, v in manifest.items() if not k.endswith("_files") and k != "skipped"}
    report.update(train_files=len(taken), heldout_files=len(held), skipped=len(skipped), bytes=sizes,
                  total_mb=round(sum(sizes.values()) / 1e6, 2))
    print(json.dumps(report, indent=1))


# ------------------------------------------------------------------------------------------------ train
def batch_at(stream: np.ndarray, seed: int, step: int, batch: int, ctx: int):
    """Random windows chosen from (seed, step) alone, so a resumed run sees exactly the same batches."""
    import torch

    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, stream.size - ctx - 1, size=batch)
    x = np.stack([stream[s:s + ctx + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(x)


def val_batches(stream: np.ndarray, ctx: int, limit: int):
    """Fixed, non-overlapping held-out windows (the whole held-out set up to `limit` windows)."""
    import torch

    n = min((stream.size - 1) // ctx, limit)
    x = np.stack([stream[i * ctx:i * ctx + ctx + 1] for i in range(n)]).astype(np.int64)
    return torch.from_numpy(x)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def autocast(device):
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def evaluate(model, val, device, bsz: int = 32, teacher=None) -> dict:
    """Held-out mean cross-entropy (nats/token); with a teacher, also KL(teacher || model) and argmax agreement."""
    import torch
    import torch.nn.functional as F

    model.eval()
    tot, n, agree, kl = 0.0, 0, 0, 0.0
    with torch.no_grad(), autocast(device):
        for i in range(0, val.size(0), bsz):
            xb = val[i:i + bsz].to(device)
            logits = model(xb[:, :-1]).logits.float()
            tot += F.cross_entropy(logits.flatten(0, 1), xb[:, 1:].flatten(), reduction="sum").item()
            n += xb[:, 1:].numel()
            if teacher is not None:
                t = teacher(xb[:, :-1]).logits
                agree += (t.argmax(-1) == logits.argmax(-1)).sum().item()
                t_logp = F.log_softmax(t.float(), -1)
                kl += (t_logp.exp() * (t_logp - F.log_softmax(logits, -1))).sum().item()
    model.train()
    out = {"val_loss": tot / n, "val_ppl": math.exp(tot / n)}
    if teacher is not None:
        out["val_agree"] = agree / n
        out["val_kl"] = kl / n
    return out


def rng_state() -> dict:
    import torch

    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import torch

    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class _PlainProgress:
    """What run_phase needs of a tqdm bar, printed as a line every `every_s` seconds (tqdm is optional)."""

    def __init__(self, iterable, desc: str, initial: int, total: int, every_s: float = 30.0) -> None:
        self.iterable, self.desc, self.initial, self.total, self.every_s = iterable, desc, initial, total, every_s
        self.postfix: dict = {}

    def __iter__(self):
        last = time.time()
        for i, item in enumerate(self.iterable):
            if time.time() - last >= self.every_s:
                last = time.time()
                print(f"[{self.desc}] {self.initial + i}/{self.total} {self.postfix}", flush=True)
            yield item

    def set_postfix(self, postfix: dict) -> None:
        self.postfix = postfix


def progress(iterable, desc: str, initial: int, total: int):
    """A tqdm bar when tqdm is installed, else a plain line every 30 s."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(iterable, desc, initial, total)
    return tqdm(iterable, desc=desc, initial=initial, total=total, mininterval=5)


def run_phase(name: str, model, args, train, val, device, steps: int, peak_lr: float, teacher=None,
              select: str = "val_loss") -> dict:
    """One training phase (target: next-token CE; draft: KL to the teacher's logits), checkpointed and resumable.

    Keeps the weights with the lowest held-out `select` metric (`val_loss`: CE; `val_kl` needs a teacher), since
    the corpus is small enough for a 20M model to overfit. A deadline stops the phase after evaluating the last
    weights, so they compete for best too.
    """
    import torch
    import torch.nn.functional as F

    work = Path(args.work_dir)
    ckpt_path = work / f"ckpt-{name}.pt"
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=peak_lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    state = {"step": 0, "history": [], "best": None, "best_loss": float("inf")}
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        set_rng_state(ck["rng"])
        print(f"[{name}] resumed at step {state['step']}", flush=True)
    state["start_step"] = state["step"]
    if state["step"] >= steps:
        return state

    def save() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state, "rng": rng_state()}, tmp)
        os.replace(tmp, ckpt_path)

    def consider(rec: dict, done: int) -> None:
        rec.update(evaluate(model, val, device, teacher=teacher))
        if rec[select] < state["best_loss"]:
            state["best_loss"] = rec[select]
            state["best"] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            state["best_step"] = done

    model.train()
    bar = progress(range(state["step"], steps), desc=name, initial=state["step"], total=steps)
    t0 = time.time()
    for step in bar:
        if args.deadline and time.time() > args.deadline:
            print(f"[{name}] deadline reached at step {step}: stopping early", flush=True)
            state["stopped_early"] = step
            if step > 0 and not (state["history"] and state["history"][-1]["step"] == step
                                 and select in state["history"][-1]):
                rec = {"step": step, "elapsed_s": round(time.time() - t0, 1)}
                consider(rec, step)
                state["history"].append(rec)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak_lr, args.warmup)
        xb = batch_at(train, args.seed + (0 if teacher is None else 1), step, args.batch, args.ctx).to(device)
        with autocast(device):
            logits = model(xb[:, :-1]).logits.float()
            if teacher is None:
                loss = F.cross_entropy(logits.flatten(0, 1), xb[:, 1:].flatten())
            else:
                with torch.no_grad():
                    t_logp = F.log_softmax(teacher(xb[:, :-1]).logits.float(), -1)
                logp = F.log_softmax(logits, -1)
                kl = (t_logp.exp() * (t_logp - logp)).sum(-1).mean()
                ce = F.cross_entropy(logits.flatten(0, 1), xb[:, 1:].flatten())
                loss = kl + args.distil_ce * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        if done % args.log_every == 0 or done == steps:
            rec = {"step": done, "train_loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                   "elapsed_s": round(time.time() - t0, 1)}
            if done % args.eval_every == 0 or done == steps:
                consider(rec, done)
            state["history"].append(rec)
            bar.set_postfix({k: round(v, 3) for k, v in rec.items()
                             if k in ("train_loss", "val_loss", "val_kl", "val_agree")})
        state["step"] = done
        if done % args.ckpt_every == 0 or done == steps:
            save()
    if state["best"] is None:  # stopped before the first evaluation
        state["best"] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return state


def save_sharded(state: dict, out: Path, prefix: str) -> list[str]:
    """safetensors shards of < 15 MB each (the shipping limit is 16 MB a file)."""
    from safetensors.torch import save_file

    shards, cur, size = [], {}, 0
    for k in sorted(state):
        if k == "lm_head.weight":  # tied to the embeddings: stored once
            continue
        nb = state[k].numel() * state[k].element_size()
        if cur and size + nb > MAX_SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = state[k].contiguous()
        size += nb
    shards.append(cur)
    names = []
    for i, sh in enumerate(shards):
        name = f"{prefix}-{i:02d}.safetensors"
        save_file(sh, str(out / name))
        names.append(name)
    return names


def pick_device(name: str):
    """`auto` is CUDA when present, else CPU; TF32 matmuls on CUDA (the models compute under bf16 autocast)."""
    import torch

    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          ("cpu" if name == "auto" else name))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return device


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def cmd_train(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaForCausalLM

    data, work = Path(args.data_dir), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    device = pick_device(args.device)
    args.deadline = time.time() + args.max_minutes * 60 if args.max_minutes else None
    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    train = np.load(data / "train.npy")
    val_stream = np.load(data / "val.npy")
    val = val_batches(val_stream, args.ctx, args.val_windows)
    t_start = time.time()
    info = {"device": device_name(device),
            "torch": torch.__version__, "args": vars(args)}

    torch.manual_seed(args.seed)
    target = LlamaForCausalLM(llama_config(TARGET, vocab)).to(device)
    t_state = run_phase("target", target, args, train, val, device, args.target_steps, args.target_lr)
    # Ship (and distil against) exactly the bf16-rounded best weights: the draft learns the model we ship.
    best = {k: v.to(torch.bfloat16) for k, v in t_state["best"].items()}
    target.load_state_dict({k: v.float() for k, v in best.items()})
    target.eval().requires_grad_(False)
    info["target"] = {"best_step": t_state.get("best_step"), "history": t_state["history"],
                      **evaluate(target, val, device)}
    t_mid = time.time()

    torch.manual_seed(args.seed + 1)
    draft = LlamaForCausalLM(llama_config(DRAFT, vocab)).to(device)
    d_state = run_phase("draft", draft, args, train, val, device, args.draft_steps, args.draft_lr, teacher=target)
    draft.load_state_dict(d_state["best"])
    info["draft"] = {"best_step": d_state.get("best_step"), "history": d_state["history"],
                     **evaluate(draft, val, device, teacher=target)}
    info["time_s"] = {"target": round(t_mid - t_start, 1), "draft": round(time.time() - t_mid, 1)}

    final = work / "final"
    final.mkdir(exist_ok=True)
    info["files"] = {
        "target": save_sharded(best, final, "target"),
        "draft": save_sharded({k: v.float().cpu() for k, v in d_state["best"].items()}, final, "draft"),
    }
    (final / "metrics.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "history"} if isinstance(v, dict) else v
                      for k, v in info.items() if k != "args"}, indent=1))


# ----------------------------------------------------------------------------------------------- distil
def position_buckets(ctx: int, edges: list[int]) -> list[tuple[int, int]]:
    """[lo, hi) ranges covering 0..ctx, cut at the `edges` that fall inside the window."""
    cuts = [0] + sorted({e for e in edges if 0 < e < ctx}) + [ctx]
    return list(itertools.pairwise(cuts))


def agreement_by_position(target, draft, val_stream: np.ndarray, ctx: int, buckets: list[int],
                          windows: int = 64, bsz: int = 16) -> dict:
    """Teacher-forced argmax agreement of draft with target on held-out windows of `ctx` tokens, by position.

    Greedy acceptance is this agreement along the target's own path, so a bucket the draft never trained at
    (positions past its training window) shows up here as a drop. Positions count from the window start.
    Returns {"ctx", "windows", "buckets": {"lo-hi": share}, "all": share}.
    """
    import torch

    device = next(draft.parameters()).device
    val = val_batches(val_stream, ctx, windows)
    if val.size(0) == 0:
        raise ValueError(f"held-out stream of {val_stream.size} tokens has no window of {ctx + 1} tokens")
    hits = torch.zeros(ctx, dtype=torch.long)
    was_training = draft.training
    draft.eval()
    with torch.no_grad(), autocast(device):
        for i in range(0, val.size(0), bsz):
            xb = val[i:i + bsz, :-1].to(device)
            hits += (target(xb).logits.argmax(-1) == draft(xb).logits.argmax(-1)).sum(0).cpu()
    draft.train(was_training)
    n = val.size(0)
    return {"ctx": ctx, "windows": n,
            "buckets": {f"{lo}-{hi - 1}": round(hits[lo:hi].sum().item() / (n * (hi - lo)), 4)
                        for lo, hi in position_buckets(ctx, buckets)},
            "all": round(hits.sum().item() / (n * ctx), 4)}


def write_draft_dir(model, source: Path, out: Path) -> None:
    """A directory like the source draft's: its config, generation config and tokenizer files copied byte for
    byte, and the new weights as one float32 model.safetensors (tied lm_head stored once), so the result does
    not depend on the transformers version of the machine that trained it."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors*"):
        old.unlink()
    for f in sorted(source.iterdir()):
        if f.is_file() and (f.name in ("config.json", "generation_config.json") or f.name.startswith("tokenizer")
                            or f.name == "special_tokens_map.json"):
            shutil.copyfile(f, out / f.name)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def cmd_distil(args: argparse.Namespace) -> None:
    """Fine-tune the draft only: KL(target || draft) + distil_ce x CE on windows of --ctx tokens.

    Best weights are chosen by held-out KL, the smooth quantity the loss optimises; agreement (what acceptance
    follows) is reported per position bucket for the source draft and the chosen weights.
    """
    import torch
    from transformers import LlamaForCausalLM

    data, src, tgt, out = Path(args.data_dir), Path(args.draft), Path(args.target), Path(args.out)
    for path in (data / "train.npy", data / "val.npy", tgt / "config.json", src / "config.json"):
        if not path.is_file():
            raise SystemExit(f"distil: {path} does not exist")
    try:
        buckets = [int(b) for b in args.buckets.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"distil: --buckets {args.buckets!r} is not a comma-separated list of positions") from None
    manifest = json.loads((data / "manifest.json").read_text()) if (data / "manifest.json").is_file() else {}
    if manifest.get("tokenizer_sha256") and (src / "tokenizer.json").is_file() \
            and file_sha256(src / "tokenizer.json") != manifest["tokenizer_sha256"]:
        raise SystemExit(f"distil: {data} was encoded with another tokenizer than {src / 'tokenizer.json'}")
    train, val_stream = np.load(data / "train.npy"), np.load(data / "val.npy")
    for label, stream in (("train.npy", train), ("val.npy", val_stream)):
        if stream.size < args.ctx + 2:
            raise SystemExit(f"distil: {label} has {stream.size} tokens, fewer than --ctx {args.ctx} + 2")
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    target = LlamaForCausalLM.from_pretrained(tgt).float().to(device).eval().requires_grad_(False)
    draft = LlamaForCausalLM.from_pretrained(src).float().to(device)
    vocab = draft.config.vocab_size
    if target.config.vocab_size != vocab:
        raise SystemExit(f"distil: target vocab {target.config.vocab_size} != draft vocab {vocab}")
    if max(int(train.max()), int(val_stream.max())) >= vocab:
        raise SystemExit(f"distil: {data} holds token ids >= the models' vocab {vocab}")
    if args.ctx > draft.config.max_position_embeddings:
        raise SystemExit(f"distil: --ctx {args.ctx} > max_position_embeddings {draft.config.max_position_embeddings}")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    args.deadline = t_start + args.max_minutes * 60 if args.max_minutes else None
    val = val_batches(val_stream, args.ctx, args.val_windows)

    def measure() -> dict:
        agree = agreement_by_position(target, draft, val_stream, args.ctx, buckets, args.val_windows, args.batch)
        return {"agreement": agree, **{k: round(v, 4) for k, v in evaluate(draft, val, device, args.batch,
                                                                         teacher=target).items()}}

    before = measure()
    print(json.dumps({"before": before}), flush=True)
    t_train = time.time()
    state = run_phase("distil", draft, args, train, val, device, args.steps, args.lr, teacher=target,
                      select="val_kl")
    train_s = time.time() - t_train
    done = state.get("stopped_early", state["step"])
    ran = done - state["start_step"]
    draft.load_state_dict(state["best"])
    after = measure()
    write_draft_dir(draft, src, out)
    summary = {
        "device": device_name(device), "torch": torch.__version__, "source_draft": str(src), "target": str(tgt),
        "data": {k: manifest.get(k) for k in ("python", "tokenizer_sha256", "train_tokens", "heldout_tokens")},
        "steps_planned": args.steps, "steps_done": done, "steps_this_run": ran,
        "stopped_early": "stopped_early" in state,
        "best_step": state.get("best_step"), "selected_by": "val_kl",
        "seconds": {"total": round(time.time() - t_start, 1), "train": round(train_s, 1),
                    "per_step": round(train_s / max(1, ran), 4)},
        "before": before, "after": after, "history": state["history"],
        "args": {k: v for k, v in vars(args).items() if k not in ("deadline",)},
    }
    (out / "distil_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "args")}, indent=1))


# ----------------------------------------------------------------------------------------------- export
def hf_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=2048, clean_up_tokenization_spaces=False)


def export_one(name: str, shape: Shape, vocab: int, final: Path, files: list[str], out: Path, tok,
               store_bf16: bool) -> None:
    """A directory that loads like any Llama checkpoint with AutoModelForCausalLM / AutoTokenizer."""
    import torch
    from safetensors.torch import load_file
    from transformers import GenerationConfig, LlamaForCausalLM

    state = {}
    for f in files:
        state.update(load_file(str(final / f)))
    model = LlamaForCausalLM(llama_config(shape, vocab))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise SystemExit(f"{name}: weights do not match the shape: missing={missing} unexpected={unexpected}")
    if store_bf16:
        model = model.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors*"):
        old.unlink()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=False)
    model.save_pretrained(out, max_shard_size="15MB")
    if store_bf16:
        # Weights are stored in bf16 to fit the size limit; loading defaults to float32 compute (exact on CPU).
        cfg = json.loads((out / "config.json").read_text())
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = "float32"
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(out)


def plot_losses(info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name in zip(axes, ("target", "draft")):
        h = info[name]["history"]
        ax.plot([r["step"] for r in h], [r["train_loss"] for r in h], label="train (CE)" if name == "target"
                else f"train (KL + {info['args']['distil_ce']} CE)")
        ev = [r for r in h if "val_loss" in r]
        ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", label="held-out CE")
        ax.set_title(f"{name}: best step {info[name]['best_step']}, held-out ppl {info[name]['val_ppl']:.2f}")
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cmd_export(args: argparse.Namespace) -> None:
    data, final, out = Path(args.data_dir), Path(args.work_dir) / "final", Path(args.out)
    info = json.loads((final / "metrics.json").read_text())
    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    tok = hf_tokenizer(data / "tokenizer.json")
    export_one("target", TARGET, vocab, final, info["files"]["target"], out / "tiny-target", tok, store_bf16=True)
    export_one("draft", DRAFT, vocab, final, info["files"]["draft"], out / "tiny-draft", tok, store_bf16=False)
    plot_losses(info, out / "loss.png")
    manifest = json.loads((data / "manifest.json").read_text())
    (out / "heldout_files.json").write_text(json.dumps(manifest["heldout_files"], indent=0) + "\n")
    summary = {n: {k: info[n][k] for k in ("best_step", "val_loss", "val_ppl", "val_agree") if k in info[n]}
               for n in ("target", "draft")}
    summary["time_s"] = info["time_s"]
    summary["device"] = info["device"]
    (out / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=".tinydata", help="corpus, tokenizer and manifest")
    common.add_argument("--seed", type=int, default=0)
    pp = sub.add_parser("prepare", parents=[common], help="corpus + tokenizer (run with the Python whose Lib/ to use)")
    pp.add_argument("--stdlib", default=None, help="stdlib folder (default: the running interpreter's)")
    pp.add_argument("--vocab-size", type=int, default=8192)
    pp.add_argument("--heldout-every", type=int, default=20, help="about 1 file in N is held out")
    pt = sub.add_parser("train", parents=[common], help="train the target, then distil the draft")
    pt.add_argument("--work-dir", default="runs/tiny-pair")
    pt.add_argument("--device", default="auto")
    pt.add_argument("--ctx", type=int, default=512)
    pt.add_argument("--batch", type=int, default=32)
    pt.add_argument("--target-steps", type=int, default=2000)
    pt.add_argument("--draft-steps", type=int, default=4000)
    pt.add_argument("--target-lr", type=float, default=1e-3)
    pt.add_argument("--draft-lr", type=float, default=2e-3)
    pt.add_argument("--warmup", type=int, default=100)
    pt.add_argument("--weight-decay", type=float, default=0.1)
    pt.add_argument("--distil-ce", type=float, default=0.1, help="weight of plain CE added to the draft's KL")
    pt.add_argument("--val-windows", type=int, default=256)
    pt.add_argument("--log-every", type=int, default=25)
    pt.add_argument("--eval-every", type=int, default=100)
    pt.add_argument("--ckpt-every", type=int, default=500)
    pt.add_argument("--max-minutes", type=float, default=None,
                    help="safety valve: end each phase early past this wall time (breaks exact reproducibility)")
    pe = sub.add_parser("export", parents=[common], help="write the Hugging Face directories and loss.png")
    pe.add_argument("--work-dir", default="runs/tiny-pair")
    pe.add_argument("--out", default="models")
    pn = sub.add_parser("encode", parents=[common], help="corpus encoded with the shipped tokenizer (carryable)",
                        epilog="example: train_tiny_pair.py encode --data-dir runs/distil-data")
    pn.set_defaults(data_dir="runs/distil-data")
    pn.add_argument("--stdlib", default=None, help="stdlib folder (default: the running interpreter's)")
    pn.add_argument("--tokenizer", default=str(MODELS / "tiny-target" / "tokenizer.json"))
    pn.add_argument("--heldout-list", default=str(MODELS / "heldout_files.json"),
                    help="held-out files (authoritative when the file exists; else the hash rule)")
    pn.add_argument("--heldout-every", type=int, default=20, help="hash rule: about 1 file in N is held out")
    pn.add_argument("--max-train-tokens", type=int, default=4_000_000,
                    help="whole training files in sha256(path) order up to this many tokens")
    pd = sub.add_parser("distil", parents=[common], help="fine-tune a draft against a target on long windows",
                        epilog="example: train_tiny_pair.py distil --data-dir runs/distil-data --device cuda "
                               "--ctx 2048 --batch 16 --steps 2000 --max-minutes 4 --out runs/tiny-draft-2048")
    pd.set_defaults(data_dir="runs/distil-data")
    pd.add_argument("--target", default=str(MODELS / "tiny-target"), help="HF directory of the frozen target")
    pd.add_argument("--draft", default=str(MODELS / "tiny-draft"), help="HF directory of the draft to start from")
    pd.add_argument("--out", default="runs/tiny-draft-2048", help="HF directory to write (+ distil_summary.json)")
    pd.add_argument("--work-dir", default="runs/tiny-distil", help="checkpoint (resumed from; delete to restart)")
    pd.add_argument("--device", default="auto")
    pd.add_argument("--ctx", type=int, default=2048)
    pd.add_argument("--batch", type=int, default=16)
    pd.add_argument("--steps", type=int, default=2000)
    pd.add_argument("--lr", type=float, default=5e-4)
    pd.add_argument("--warmup", type=int, default=50)
    pd.add_argument("--weight-decay", type=float, default=0.1)
    pd.add_argument("--distil-ce", type=float, default=0.1, help="weight of plain CE added to the KL")
    pd.add_argument("--val-windows", type=int, default=64, help="held-out windows of --ctx for eval + agreement")
    pd.add_argument("--buckets", default="512,1024", help="agreement bucket edges (positions), comma-separated")
    pd.add_argument("--log-every", type=int, default=25)
    pd.add_argument("--eval-every", type=int, default=100)
    pd.add_argument("--ckpt-every", type=int, default=500)
    pd.add_argument("--max-minutes", type=float, default=None,
                    help="stop training past this wall time; the output is still written")
    args = p.parse_args(argv)
    {"prepare": cmd_prepare, "train": cmd_train, "export": cmd_export, "encode": cmd_encode,
     "distil": cmd_distil}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
