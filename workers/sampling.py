"""Sampling primitives shared by draft, target and fused workers: one truncation rule, one sampler, one seed rule.

Losslessness needs the target's acceptance to use *exactly* the distribution the target would sample from on its
own (temperature, then top-k / top-p truncation, renormalised), and the drafter to report *exactly* the support it
sampled from. Both sides therefore go through ``sampling_probs`` here. Sampling is inverse-CDF on one float64
uniform per draw from a ``torch.Generator`` on the CPU, so a given seed gives the same tokens on any machine and
whatever the batch composition was.

Seeds are per round: ``round_generator(seed, pos, stream)`` depends only on the session seed and the committed
length, so a session re-placed on another target (which replays the committed tokens) draws the same numbers.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

STREAM_TARGET = 0  # acceptance / correction / bonus draws on the target
STREAM_DRAFT = 1  # draft token draws on the drafter


class SamplingError(ValueError):
    """Bad sampling parameters or a malformed draft distribution (becomes ``bad_request`` on the wire)."""


@dataclass(frozen=True)
class SamplingParams:
    """How a session samples. ``temperature == 0`` is greedy (argmax); ``top_k == 0`` and ``top_p == 1`` disable
    truncation."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        validate_sampling(self.temperature, self.top_p, self.top_k)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def validate_sampling(temperature: float, top_p: float, top_k: int) -> None:
    """Raise ``SamplingError`` naming the bad value."""
    if not isinstance(temperature, (int, float)) or not temperature >= 0.0 or temperature == float("inf"):
        raise SamplingError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise SamplingError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise SamplingError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")


def round_generator(seed: int, pos: int, stream: int = STREAM_TARGET) -> torch.Generator:
    """A CPU generator for one round of one session, keyed by (seed, committed length, stream)."""
    digest = hashlib.blake2b(f"{seed}:{pos}:{stream}".encode(), digest_size=8).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def kept_window(probs: torch.Tensor, top_p: float = 1.0, top_k: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The truncation rule: ``(values, order, keep)`` of a descending ``topk`` window holding every row's kept set
    (``keep`` marks it), or None when top-k / top-p cut nothing. ``truncate`` and ``sample_draft_q`` share it."""
    vocab = probs.shape[-1]
    limit = top_k if 0 < top_k < vocab else vocab
    if limit == vocab and top_p >= 1.0:
        return None
    window = min(limit, 256)
    while True:
        values, order = torch.topk(probs, window, dim=-1, sorted=True)
        keep = torch.ones_like(values, dtype=torch.bool)
        if top_p < 1.0:
            keep &= (values.cumsum(-1) - values) < top_p  # mass of strictly more likely tokens < top_p
        keep[..., 0] = True
        if window == limit or not bool(keep[..., -1].any()):  # every row's kept set closed inside the window
            return values, order, keep
        window = min(limit, window * 4)


def truncate(probs: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Zero everything outside the top-k and the smallest top-p nucleus, per row, and renormalise.

    The most likely token is always kept. The kept set is a prefix of the descending order, so it is found with
    ``torch.topk`` on a growing window (256, 1024, ... tokens) instead of sorting the whole vocabulary: the
    nucleus is usually small. Deterministic on a given input (ties at the boundary resolve as ``topk`` orders them).
    """
    kept = kept_window(probs, top_p, top_k)
    if kept is None:
        return probs
    values, order, keep = kept
    mask = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device).scatter(-1, order, keep)
    out = torch.where(mask, probs, torch.zeros_like(probs))
    return out / out.sum(-1, keepdim=True)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """The distribution a model samples from: float64 on the CPU, rows ``[..., V]``.

    Greedy (temperature 0) is a one-hot on the argmax (lowest id on ties, as ``torch.argmax``).
    """
    logits = logits.detach().to("cpu", torch.float64)
    if temperature == 0.0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float64)
    probs = torch.softmax(logits / temperature, dim=-1)
    return truncate(probs, top_p, top_k)


def sample_from(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from a 1-D (unnormalised, non-negative) distribution by inverse CDF on one float64 uniform."""
    cdf = probs.to(torch.float64).cumsum(0)
    total = cdf[-1]
    if not total > 0:
        raise SamplingError("cannot sample from an all-zero distribution")
    u = torch.rand((), generator=generator, dtype=torch.float64)
    idx = int(torch.searchsorted(cdf, (u * total).reshape(1), right=True)[0])
    if idx >= probs.shape[0] or probs[idx] <= 0:  # u*total rounded onto the last step
        idx = int(torch.nonzero(probs > 0)[-1])
    return idx


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The token a model emits on its own from one row of logits: argmax when greedy, else a draw."""
    if params.greedy:
        return int(logits.argmax(-1))
    assert generator is not None, "sampling at temperature > 0 needs a generator"
    return sample_from(sampling_probs(logits, params.temperature, params.top_p, params.top_k), generator)


def sample_draft(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None) -> tuple[int, list[int], list[float]]:
    """Draw a draft token and return the exact sparse distribution it was drawn from: ``(token, ids, probs)``.

    ``ids``/``probs`` are q's whole support (q is zero elsewhere), which is what lossless verification needs.
    Greedy returns the argmax with probability 1.0. Keep q small on the wire with ``top_k`` / ``top_p``.
    """
    row = logits.reshape(-1)
    if temperature == 0.0:
        tok = int(row.argmax())
        return tok, [tok], [1.0]
    if generator is None:
        raise SamplingError("sampling at temperature > 0 needs a generator")
    probs = sampling_probs(row, temperature, top_p, top_k)
    tok = sample_from(probs, generator)
    ids = torch.nonzero(probs > 0).reshape(-1)
    return tok, ids.tolist(), probs[ids].tolist()


def sample_draft_q(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
                   generator: torch.Generator | None = None) -> tuple[int, torch.Tensor | None, torch.Tensor]:
    """Draw a draft token from q rounded to float32, the form q travels in: ``(token, ids or None, probs)``.

    ``probs`` (float32) is q on ``ids`` (sparse: q's whole support, ascending), or on the whole vocabulary when
    ``ids`` is None (dense: chosen once the support covers more than half of it, where ids would cost more than
    the zeros they skip). The token is drawn from these very float32 values, so the target, which judges with
    them, judges the exact q the token came from: lossless, with no float64 lists to build or ship.
    """
    row = logits.reshape(-1)
    if temperature == 0.0:
        tok = int(row.argmax())
        return tok, torch.tensor([tok]), torch.ones(1, dtype=torch.float32)
    if generator is None:
        raise SamplingError("sampling at temperature > 0 needs a generator")
    probs = sampling_probs(row, temperature)  # untruncated: the support is taken below, without a dense pass
    kept = kept_window(probs, top_p, top_k)
    if kept is None:  # the whole vocabulary (but for float32 underflow): dense
        q = probs.to(torch.float32)
        return sample_from(q, generator), None, q
    values, order, keep = kept
    ids, perm = order[keep].sort()  # ascending, as on the wire
    q = (values[keep] / values[keep].sum())[perm].to(torch.float32)
    tok = int(ids[sample_from(q, generator)])
    if 2 * len(ids) > probs.numel():
        return tok, None, torch.zeros(probs.numel(), dtype=torch.float32).index_put_((ids,), q)
    return tok, ids, q
