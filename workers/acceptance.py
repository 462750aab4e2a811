"""Acceptance policies: which draft tokens the target keeps, and which token it appends. Pure functions on tensors.

Every policy takes the target's logits for one verify row, ``[γ+1, V]`` (row i scores the token after input i of
``[pending, d1..dγ]``), the γ draft tokens and, when the drafter sampled, its distributions ``q`` (row i is
``q_ids[i], q_probs[i]``: sparse ids and their probabilities, or None and a dense vector); it returns
``AcceptResult(accepted=k, tokens=[d1..dk, t])`` where ``t`` is the target's own token: the correction at the first
rejection, or the bonus token after all γ were accepted. So ``len(tokens) == k + 1`` always.

- ``exact`` (lossless): greedy exact-match at temperature 0; rejection sampling at temperature > 0 (Leviathan et
  al. 2023, Chen et al. 2023): accept x with probability min(1, p(x)/q(x)), on rejection draw from
  norm(max(0, p − q)), after γ accepted draw the bonus from p. ``p`` is the distribution the target samples from
  on its own (``workers.sampling.sampling_probs``: temperature, then top-k/top-p), so the output distribution is
  the target's. A chunk without q at temperature > 0 is treated as drawn from a one-hot q (still lossless).
- lossy, faster: ``confidence`` (keep x when p(x) >= threshold), ``topk`` (keep x when it ranks in the target's
  top k), ``typical`` (Medusa: keep x when p(x) > min(epsilon, delta * exp(-H(p)))). They judge with p at the
  session's temperature (temperature 1 when greedy, since a one-hot p would make them all exact-match) and append
  the target's own token after the first rejection: argmax when greedy, a draw from p otherwise.

``make_policy(name, args)`` validates names and arguments (``AcceptanceError``, a ``ValueError``, listing what is
valid); ``accept(...)`` is the one entry point workers call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch

from protocol.codec import Q_SUM_TOLERANCE
from workers.sampling import SamplingError, SamplingParams, sample_draft, sample_from, sampling_probs, truncate

__all__ = [
    "AcceptResult", "AcceptanceError", "Policy", "Exact", "Confidence", "TopK", "Typical", "POLICIES",
    "make_policy", "accept", "argmax_only", "batch_sampled", "greedy_match", "match_argmax", "rejection_sample",
    "rejection_sample_batch", "sample_draft",
]


class AcceptanceError(SamplingError):
    """Unknown policy, bad policy arguments, or a malformed chunk (shape, q)."""


@dataclass
class AcceptResult:
    accepted: int  # draft tokens kept (k)
    tokens: list[int]  # committed extension: d1..dk + the target's own token


# --------------------------------------------------------------------------- lossless
def greedy_match(logits: torch.Tensor, draft_tokens: Sequence[int]) -> AcceptResult:
    """Temperature 0: keep draft tokens while they equal the target's argmax, then append the target's argmax."""
    return match_argmax(logits.argmax(-1).tolist(), draft_tokens)


def match_argmax(target: Sequence[int], draft_tokens: Sequence[int]) -> AcceptResult:
    """``greedy_match`` on the target's argmax ids, already on the host (a batch's argmax is read back once)."""
    k = 0
    while k < len(draft_tokens) and int(draft_tokens[k]) == target[k]:
        k += 1
    return AcceptResult(k, [int(t) for t in draft_tokens[:k]] + [target[k]])


def _q_row(i: int, x: int, q_ids: Sequence[Any] | None, q_probs: Sequence[Any] | None,
           vocab: int) -> tuple[float, Callable[[], torch.Tensor]]:
    """Validate row i of q; return q(x) and a function that builds the row as a dense float64 vector over the target
    vocabulary (only a rejected row needs it, so accepted rows cost a few passes over their values).

    A row is ``(ids, probs)`` (sparse: q is zero off ``ids``) or ``(None, probs)`` (dense: ``probs[j]`` is q(j));
    lists or tensors (float32 tensors are used as they are: the drafter drew from those values). Ids past the
    vocabulary carry mass the target gives probability 0: they can only be rejected, and never appear in
    max(0, p - q)."""
    if q_ids is None:  # no q: the token was drawn from a one-hot
        def one_hot() -> torch.Tensor:
            dense = torch.zeros(vocab, dtype=torch.float64)
            if x < vocab:
                dense[x] = 1.0
            return dense

        return 1.0, one_hot
    ids, probs = q_ids[i], q_probs[i]  # type: ignore[index]
    probs_t = probs if isinstance(probs, torch.Tensor) and probs.is_floating_point() else torch.as_tensor(
        probs, dtype=torch.float64)
    ids_t = None if ids is None else torch.as_tensor(ids, dtype=torch.long)
    if probs_t.dim() != 1 or not len(probs_t) or (ids_t is not None and ids_t.shape != probs_t.shape):
        raise AcceptanceError(f"q at draft position {i}: ids and probs must be non-empty and of equal length")
    total = float(probs_t.sum(dtype=torch.float64))
    if not bool((probs_t >= 0).all()) or not math.isfinite(total):  # NaN fails the first test, inf the second
        raise AcceptanceError(f"q at draft position {i}: probabilities must be finite and >= 0")
    if ids_t is not None and (ids_t < 0).any():
        raise AcceptanceError(f"q at draft position {i}: negative token id")
    if ids_t is not None and torch.unique(ids_t).numel() != ids_t.numel():
        raise AcceptanceError(f"q at draft position {i}: duplicate token ids")
    if abs(total - 1.0) > Q_SUM_TOLERANCE:
        raise AcceptanceError(f"q at draft position {i}: probabilities sum to {total:.6f}, expected 1")

    def dense_row() -> torch.Tensor:
        dense = torch.zeros(vocab, dtype=torch.float64)
        if ids_t is None:
            n = min(vocab, len(probs_t))
            dense[:n] = probs_t[:n]
        else:
            inside = ids_t < vocab
            dense[ids_t[inside]] = probs_t[inside].to(torch.float64)
        return dense / total

    if ids_t is None:
        return (float(probs_t[x]) / total if x < len(probs_t) else 0.0), dense_row
    hit = (ids_t == x).nonzero()
    return (float(probs_t[hit[0, 0]]) / total if len(hit) else 0.0), dense_row


def rejection_sample(p: torch.Tensor | Callable[[int], torch.Tensor], draft_tokens: Sequence[int],
                     q_ids: Sequence[Sequence[int]] | None, q_probs: Sequence[Sequence[float]] | None,
                     generator: torch.Generator, vocab: int | None = None) -> AcceptResult:
    """Speculative sampling on target probabilities ``p`` ``[γ+1, V]`` (already tempered and truncated).

    ``p`` may also be a function of the row index (with ``vocab`` given), so rows past the first rejection are
    never computed. One uniform per examined draft token, then one draw for the correction or bonus token.
    """
    if isinstance(p, torch.Tensor):
        vocab, table = p.shape[-1], p
        p = lambda i: table[i]  # noqa: E731
    assert vocab is not None, "vocab is required when p is a function"
    q = [_q_row(i, int(x), q_ids, q_probs, vocab) for i, x in enumerate(draft_tokens)]  # validate all rows
    for i, (x, (qx, _)) in enumerate(zip(draft_tokens, q)):
        if qx <= 0.0:
            raise AcceptanceError(f"draft token {x} at position {i} has q = 0: it cannot have been sampled from q")
    for i, x in enumerate(draft_tokens):
        x = int(x)
        qx, q_row = q[i]
        p_row = p(i)
        px = float(p_row[x]) if x < vocab else 0.0
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if u * qx < px:  # u < p(x)/q(x)
            continue
        residual = torch.clamp(p_row - q_row(), min=0.0)
        t = sample_from(residual if float(residual.sum()) > 1e-12 else p_row, generator)
        return AcceptResult(i, [int(d) for d in draft_tokens[:i]] + [t])
    k = len(draft_tokens)
    return AcceptResult(k, [int(d) for d in draft_tokens] + [sample_from(p(k), generator)])


def _q_rows(draft_tokens: Sequence[int], q_ids: Sequence[Any] | None, q_probs: Sequence[Any] | None,
            vocab: int) -> list[tuple[float, Callable[[], torch.Tensor]]]:
    """``_q_row`` for every draft position. Dense rows of one length (what a wire q unpacks to) are checked and
    read in one pass over the stacked rows; anything else, or a check that fails, goes row by row (which names
    the first bad position)."""
    g = len(draft_tokens)
    if (q_ids is not None and q_probs is not None and g and all(i is None for i in q_ids)
            and all(isinstance(p, torch.Tensor) and p.dim() == 1 and p.is_floating_point() and len(p) for p in q_probs)
            and len({len(p) for p in q_probs}) == 1):
        table = torch.stack(list(q_probs))
        totals = table.sum(-1, dtype=torch.float64).tolist()
        if float(table.min()) >= 0 and all(math.isfinite(v) and abs(v - 1.0) <= Q_SUM_TOLERANCE  # NaN: min fails
                                           for v in totals):
            width = table.shape[1]
            xs = [int(x) for x in draft_tokens]
            picked = table[torch.arange(g), torch.tensor(xs).clamp(0, width - 1)].tolist()
            qx = [v / total if 0 <= x < width else 0.0 for v, total, x in zip(picked, totals, xs)]
            n = min(vocab, width)

            def dense(i: int) -> torch.Tensor:
                row = torch.zeros(vocab, dtype=torch.float64)
                row[:n] = table[i, :n]
                return row / totals[i]

            return [(qx[i], (lambda i=i: dense(i))) for i in range(g)]
    if (q_ids is not None and q_probs is not None and g
            and all(isinstance(i, torch.Tensor) and i.dim() == 1 and not i.is_floating_point() and len(i)
                    and i.device.type == "cpu" for i in q_ids)
            and all(isinstance(p, torch.Tensor) and p.dim() == 1 and p.is_floating_point() and len(p) == len(i)
                    and p.device.type == "cpu" for i, p in zip(q_ids, q_probs))):
        fast = _sparse_q_rows(draft_tokens, q_ids, q_probs, vocab)
        if fast is not None:
            return fast
    return [_q_row(i, int(x), q_ids, q_probs, vocab) for i, x in enumerate(draft_tokens)]


def _sparse_q_rows(draft_tokens: Sequence[int], q_ids: Sequence[torch.Tensor], q_probs: Sequence[torch.Tensor],
                   vocab: int) -> list[tuple[float, Callable[[], torch.Tensor]]] | None:
    """``_q_rows`` for sparse rows whose ids ascend (a wire q's do), in numpy (a few µs a row where torch's small
    operations cost tens). None when a check fails: the row-by-row path then names the problem."""
    out = []
    for x, ids_t, probs_t in zip(draft_tokens, q_ids, q_probs):
        ids, probs = ids_t.numpy(), probs_t.numpy()
        total = float(probs.sum(dtype=np.float64))
        if not (probs.min() >= 0 and ids[0] >= 0 and math.isfinite(total) and abs(total - 1.0) <= Q_SUM_TOLERANCE
                and (len(ids) == 1 or (np.diff(ids) > 0).all())):
            return None
        x = int(x)
        at = int(np.searchsorted(ids, x))
        qx = float(probs[at]) / total if at < len(ids) and ids[at] == x else 0.0

        def dense(ids=ids, probs=probs, total=total) -> torch.Tensor:
            row = np.zeros(vocab, dtype=np.float64)
            inside = ids < vocab
            row[ids[inside]] = probs[inside].astype(np.float64)
            return torch.from_numpy(row / total)

        out.append((qx, dense))
    return out


def _draw_rows(dist: torch.Tensor, u: torch.Tensor) -> list[int]:
    """``sample_from`` for every row of ``dist`` ``[M, V]`` at once, given each row's uniform ``u`` ``[M]``."""
    cdf = dist.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    width = dist.shape[1]
    safe = idx.clamp(max=width - 1)
    bad = (idx >= width) | (dist.gather(1, safe.unsqueeze(1)).squeeze(1) <= 0)  # u·total rounded onto the last step
    last = width - 1 - torch.flip(dist > 0, [1]).to(torch.int8).argmax(1)
    return torch.where(bad, last, safe).tolist()


def rejection_sample_batch(logits: Sequence[torch.Tensor], drafts: Sequence[Sequence[int]],
                           qs: Sequence[tuple[Sequence[Any] | None, Sequence[Any] | None]],
                           params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
                           ) -> list[AcceptResult | AcceptanceError]:
    """``Exact`` at temperature > 0 for many verify rows at once: each row's result (or its error) is what
    ``accept("exact", ...)`` gives it, with the same draws from its generator.

    Why: judged one row at a time, a row costs ~0.3-0.5 ms of small host operations (a softmax per position,
    read-backs, q checks per position), tens of ms a tick at batch 64-256 while the device waits. Here the
    target's p for every position of every row is computed in one pass on the logits' device (float64, per
    sampling setting); p(x) of the draft tokens is read back once; the uniforms are drawn on the host in
    ``rejection_sample``'s order; the corrections and bonus tokens are drawn on the device for all rows at once
    (the rejected rows' q goes there), and read back once.
    """
    n = len(logits)
    out: list[AcceptResult | AcceptanceError | None] = [None] * n
    checked: dict[int, list[tuple[float, Callable[[], torch.Tensor]]]] = {}
    for j in range(n):
        try:
            _check_row(logits[j], drafts[j], *qs[j])
            _need(generators[j])
            if params[j].greedy:
                raise AcceptanceError("rejection_sample_batch judges sampled rows only (temperature > 0)")
            q = _q_rows(drafts[j], qs[j][0], qs[j][1], logits[j].shape[-1])
            for i, (x, (qx, _)) in enumerate(zip(drafts[j], q)):
                if qx <= 0.0:
                    raise AcceptanceError(f"draft token {x} at position {i} has q = 0: it cannot have been sampled "
                                          f"from q")
            checked[j] = q
        except AcceptanceError as exc:
            out[j] = exc
    groups: dict[tuple[float, float, int, Any], list[int]] = {}
    for j in checked:
        pj = params[j]
        groups.setdefault((pj.temperature, pj.top_p, pj.top_k, logits[j].device), []).append(j)
    for (temperature, top_p, top_k, device), members in groups.items():
        flat = torch.cat([logits[j] for j in members]).detach().to(torch.float64)
        probs = truncate(torch.softmax(flat / temperature, dim=-1), top_p, top_k)
        vocab = probs.shape[-1]
        starts, at = [], 0
        for j in members:
            starts.append(at)
            at += len(drafts[j]) + 1
        rows = [s + i for s, j in zip(starts, members) for i in range(len(drafts[j]))]
        cols = [min(max(int(x), 0), vocab - 1) for j in members for x in drafts[j]]
        px = probs[rows, cols].tolist() if rows else []
        ks, us, at = [], [], 0
        for j in members:  # each row's draws, in the order rejection_sample makes them
            gen, toks, q = generators[j], drafts[j], checked[j]
            k = len(toks)
            for i, x in enumerate(toks):
                p_x = px[at + i] if 0 <= int(x) < vocab else 0.0
                if float(torch.rand((), generator=gen, dtype=torch.float64)) * q[i][0] >= p_x:
                    k = i
                    break
            at += len(toks)
            ks.append(k)
            us.append(float(torch.rand((), generator=gen, dtype=torch.float64)))  # the correction's or bonus's
        dist = probs[[s + k for s, k in zip(starts, ks)]]
        rejected = [m for m, (j, k) in enumerate(zip(members, ks)) if k < len(drafts[j])]
        if rejected:
            q_rows = torch.stack([checked[members[m]][ks[m]][1]() for m in rejected]).to(device)
            p_rows = dist[rejected]
            residual = torch.clamp(p_rows - q_rows, min=0.0)
            dist[rejected] = torch.where((residual.sum(-1) > 1e-12).unsqueeze(1), residual, p_rows)
        tokens = _draw_rows(dist, torch.tensor(us, dtype=torch.float64, device=device))
        for j, k, t in zip(members, ks, tokens):
            out[j] = AcceptResult(k, [int(d) for d in drafts[j][:k]] + [t])
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- policies
@dataclass(frozen=True)
class Policy:
    """A named acceptance rule with validated arguments (frozen dataclass fields)."""

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = False

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None) -> "Policy":
        args = dict(args or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise AcceptanceError(f"policy {cls.name!r}: unknown argument(s) {unknown}; "
                                  f"valid: {sorted(known) or 'none'}")
        try:
            return cls(**args)
        except TypeError as exc:
            raise AcceptanceError(f"policy {cls.name!r}: {exc}") from None

    def accept(self, logits: torch.Tensor, draft_tokens: Sequence[int], q_ids: Sequence[Sequence[int]] | None,
               q_probs: Sequence[Sequence[float]] | None, params: SamplingParams,
               generator: torch.Generator | None) -> AcceptResult:
        raise NotImplementedError


@dataclass(frozen=True)
class Exact(Policy):
    """Lossless: greedy exact-match at temperature 0, rejection sampling above."""

    name: ClassVar[str] = "exact"
    lossless: ClassVar[bool] = True

    def accept(self, logits, draft_tokens, q_ids, q_probs, params, generator):
        if params.greedy:
            return greedy_match(logits, draft_tokens)
        def p_row(i: int) -> torch.Tensor:
            return sampling_probs(logits[i], params.temperature, params.top_p, params.top_k)

        return rejection_sample(p_row, draft_tokens, q_ids, q_probs, _need(generator), vocab=logits.shape[-1])


def _need(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        raise AcceptanceError("sampling at temperature > 0 needs a generator")
    return generator


def _check_number(policy: str, name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bound = "(" if lo_open else "["
        raise AcceptanceError(f"policy {policy!r}: {name} must be a number in {bound}{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class _Lossy(Policy):
    """Keep draft tokens while ``keep(...)`` says so, then append the target's own token."""

    def keep(self, logits_row: torch.Tensor, judge_row: torch.Tensor, x: int) -> bool:
        raise NotImplementedError

    def accept(self, logits, draft_tokens, q_ids, q_probs, params, generator):
        vocab = logits.shape[-1]
        logits64 = logits.detach().to("cpu", torch.float64)

        def judge(i: int) -> torch.Tensor:  # rows past the first rejection are never computed
            return sampling_probs(logits64[i], params.temperature or 1.0, params.top_p, params.top_k)

        k = 0
        for i, x in enumerate(draft_tokens):
            x = int(x)
            if not (0 <= x < vocab and self.keep(logits64[i], judge(i), x)):
                break
            k += 1
        if params.greedy:
            t = int(logits64[k].argmax())
        else:
            t = sample_from(judge(k), _need(generator))
        return AcceptResult(k, [int(d) for d in draft_tokens[:k]] + [t])


@dataclass(frozen=True)
class Confidence(_Lossy):
    """Keep x when the target gives it probability >= ``threshold``."""

    name: ClassVar[str] = "confidence"
    threshold: float = 0.3

    def __post_init__(self) -> None:
        _check_number(self.name, "threshold", self.threshold, 0.0, 1.0)

    def keep(self, logits_row, judge_row, x):
        return float(judge_row[x]) >= self.threshold


@dataclass(frozen=True)
class TopK(_Lossy):
    """Keep x when fewer than ``k`` tokens have a strictly higher target logit."""

    name: ClassVar[str] = "topk"
    k: int = 5

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise AcceptanceError(f"policy 'topk': k must be an int >= 1, got {self.k!r}")

    def keep(self, logits_row, judge_row, x):
        return int((logits_row > logits_row[x]).sum()) < self.k


@dataclass(frozen=True)
class Typical(_Lossy):
    """Medusa's typical acceptance: keep x when p(x) > min(epsilon, delta * exp(-H(p)))."""

    name: ClassVar[str] = "typical"
    epsilon: float = 0.09  # hard threshold (Medusa's posterior_threshold)
    delta: float = 0.3  # entropy-scaled threshold (Medusa's posterior_alpha)

    def __post_init__(self) -> None:
        _check_number(self.name, "epsilon", self.epsilon, 0.0, 1.0)
        _check_number(self.name, "delta", self.delta, 0.0, 1.0)

    def keep(self, logits_row, judge_row, x):
        nz = judge_row[judge_row > 0]
        entropy = float(-(nz * nz.log()).sum())
        return float(judge_row[x]) > min(self.epsilon, self.delta * math.exp(-entropy))


POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (Exact, Confidence, TopK, Typical)}


def make_policy(name: str, args: Mapping[str, Any] | None = None) -> Policy:
    """Build a policy by name from wire arguments (``SessionOpen.policy`` / ``policy_args``)."""
    cls = POLICIES.get(name)
    if cls is None:
        raise AcceptanceError(f"unknown acceptance policy {name!r}; valid: {', '.join(sorted(POLICIES))}")
    return cls.from_args(args)


def batch_sampled(policy: Policy, params: SamplingParams) -> bool:
    """Whether a row is judged by ``rejection_sample_batch`` (lossless sampling) when verified in a batch."""
    return isinstance(policy, Exact) and not params.greedy


def argmax_only(policy: Policy, params: SamplingParams) -> bool:
    """Whether judging a row needs nothing but the target's argmax per position (lossless greedy)."""
    return isinstance(policy, Exact) and params.greedy


def accept(policy: str | Policy, logits: torch.Tensor, draft_tokens: Sequence[int],
           q_ids: Sequence[Sequence[int]] | None, q_probs: Sequence[Sequence[float]] | None,
           params: SamplingParams, generator: torch.Generator | None) -> AcceptResult:
    """Judge one verify row: ``logits`` ``[γ+1, V]`` for ``[pending, d1..dγ]``. See the module docstring."""
    if isinstance(policy, str):
        policy = make_policy(policy)
    _check_row(logits, draft_tokens, q_ids, q_probs)
    return policy.accept(logits, draft_tokens, q_ids, q_probs, params, generator)


def _check_row(logits: torch.Tensor, draft_tokens: Sequence[int], q_ids: Sequence[Any] | None,
               q_probs: Sequence[Any] | None) -> None:
    """The shapes every policy needs: logits ``[γ+1, V]``, q (when given) one row per draft token."""
    gamma = len(draft_tokens)
    if logits.dim() != 2 or logits.shape[0] != gamma + 1:
        raise AcceptanceError(f"logits must be [gamma+1, V] = [{gamma + 1}, V], got {list(logits.shape)}")
    if (q_ids is None) != (q_probs is None):
        raise AcceptanceError("q_ids and q_probs must be given together")
    if q_ids is not None and (len(q_ids) != gamma or len(q_probs) != gamma):  # type: ignore[arg-type]
        raise AcceptanceError(f"q must have one row per draft token ({gamma}), got {len(q_ids)}/{len(q_probs)}")
