"""Speculative decoding over the ``Engine`` interface, as small functions named after the algorithm's steps.

Token positions (protocol/FLOW.md): a slot caches every committed token except the last one, the *pending* token.

- Target: ``prefill`` caches ``prompt[:-1]``; ``verify_batch`` feeds ``[pending, d1..dγ]`` per session (all
  sessions in ONE ``engine.forward``), accepts k, appends the target's own token t, rolls back γ−k entries: the
  cache then holds ``..pending, d1..dk`` and t is the new pending token.
- Draft: the draft slot lags behind the committed sequence by a few *uncached* tokens (at least the pending one).
  ``draft_chunk`` feeds them, then drafts γ tokens in γ forwards (the last draft token is never fed), and
  ``apply_result_to_draft`` rolls back the rejected drafts and returns the new uncached tokens.

Fused decoding (draft and target engines in one process) runs in *rounds*: ``plan_round`` asks a ``GammaPolicy`` for
each decoding session's γ and plans the tick with the target's batching policy (``workers.batching.plan_tick``:
rounds first, chunked prompt prefill in the leftover budget); ``run_round`` drafts, verifies, applies and counts.
``speculative_generate_many`` (in-process) and the fused worker both call these two, so the lossless tests cover the
serving code. ``autoregressive_generate`` is the target-only baseline; the target and draft workers use the same
steps over the network.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

import torch

from protocol.codec import pack_q, unpack_q
from workers.acceptance import (AcceptanceError, AcceptResult, Policy, accept, argmax_only, batch_sampled, make_policy,
                                match_argmax, rejection_sample_batch)
from workers.adaptive_gamma import AdaptiveGamma
from workers.batching import BatchLimits, plan_tick
from workers.engine.base import Engine
from workers.sampling import (STREAM_DRAFT, STREAM_TARGET, SamplingParams, round_generator, sample_draft_q,
                              sample_token)

FINISH_EOS = "eos"
FINISH_LENGTH = "length"


# --------------------------------------------------------------------------- shared steps
def prefill(engine: Engine, slot: int, prompt_ids: Sequence[int], chunk: int = 256) -> int:
    """Cache all prompt tokens but the last, ``chunk`` tokens per forward; return the last one (pending)."""
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    body = list(prompt_ids[:-1])
    for start in range(0, len(body), chunk):
        engine.forward([(slot, body[start:start + chunk])], last_only=[True])
    return int(prompt_ids[-1])


def eos_ids(info) -> frozenset[int]:
    """Every end-of-sequence id an engine knows (Llama-3 has several)."""
    ids = set(getattr(info, "eos_token_ids", ()) or ())
    if info.eos_token_id is not None:
        ids.add(int(info.eos_token_id))
    return frozenset(ids)


def clip_tokens(tokens: Sequence[int], eos: Collection[int] | int | None, remaining: int
                ) -> tuple[list[int], str | None]:
    """Cut a committed extension at EOS (kept) and at the token budget; say why the session finished, if it did."""
    stop = frozenset() if eos is None else frozenset([eos]) if isinstance(eos, int) else frozenset(eos)
    out: list[int] = []
    for t in tokens:
        if len(out) >= remaining:
            return out, FINISH_LENGTH
        out.append(int(t))
        if int(t) in stop:
            return out, FINISH_EOS
    return out, (FINISH_LENGTH if len(out) >= remaining else None)


# --------------------------------------------------------------------------- draft side
@dataclass
class DraftChunk:
    """γ draft tokens and, when sampled, the q each was drawn from (``sample_draft_q``): row i is ``q_ids[i]``
    (ids, or None when dense) and ``q_probs[i]`` (float32); both None when greedy."""

    tokens: list[int]
    q_ids: list[torch.Tensor | None] | None = None
    q_probs: list[torch.Tensor] | None = None

    def q_wire(self) -> dict[str, Any]:
        """``Verify``'s q fields for this chunk (``protocol.codec.pack_q``); all None when greedy."""
        if self.q_probs is None or not self.tokens:
            return {"q_ids": None, "q_probs": None, "q_lens": None}
        q_ids, q_probs, q_lens = pack_q(list(zip(self.q_ids, self.q_probs)))  # type: ignore[arg-type]
        return {"q_ids": q_ids, "q_probs": q_probs, "q_lens": q_lens}


def q_from_wire(n_tokens: int, q_ids: bytes | None, q_probs: bytes | None, q_lens: list[int] | None
                ) -> tuple[list[torch.Tensor | None] | None, list[torch.Tensor] | None]:
    """A ``Verify``'s q as acceptance rows ``(q_ids, q_probs)`` of tensors; raises ``ProtocolError`` when malformed."""
    rows = unpack_q(n_tokens, q_ids, q_probs, q_lens)
    if rows is None:
        return None, None
    return ([None if ids is None else torch.from_numpy(ids.astype("int64")) for ids, _ in rows],
            [torch.from_numpy(probs) for _, probs in rows])


@dataclass
class DraftRequest:
    slot: int
    uncached: list[int]  # committed tokens not yet in the draft cache (ends with the pending token)
    gamma: int
    sampling: SamplingParams
    generator: torch.Generator | None = None


def draft_batch(engine: Engine, requests: Sequence[DraftRequest],
                prefill_rows: Sequence[tuple[int, Sequence[int]]] = (),
                step_ms: list[float] | None = None) -> list[DraftChunk]:
    """Draft for many sessions at once: step j runs one forward over every session still drafting.

    Step 0 feeds each session's uncached tokens, step j feeds its draft token j; the draft cache ends up holding
    ``uncached + d1..d(γ-1)``. ``prefill_rows`` (slot, prompt chunk) ride along in step 0 (chunked prefill).
    ``step_ms``, when given, gets each step's wall time (steps after the first are plain decode steps: what
    drafting costs once the cache has caught up).
    """
    for r in requests:
        if r.gamma < 1 or not r.uncached:
            raise ValueError(f"draft slot {r.slot}: need gamma >= 1 and at least one uncached token")
    chunks = [DraftChunk([], None if r.sampling.greedy else [], None if r.sampling.greedy else [])
              for r in requests]
    feeds = [list(r.uncached) for r in requests]
    live = list(range(len(requests)))
    extra = [(slot, list(toks)) for slot, toks in prefill_rows]
    if extra and not live:
        engine.forward(extra, last_only=[True] * len(extra))
    while live:
        t0 = time.perf_counter()
        rows = [(requests[i].slot, feeds[i]) for i in live] + extra
        logits = engine.forward(rows, last_only=[True] * len(rows))[:len(live)]
        extra = []
        for i, row in zip(live, logits):
            r, c = requests[i], chunks[i]
            tok, ids, probs = sample_draft_q(row[-1], r.sampling.temperature, r.sampling.top_p, r.sampling.top_k,
                                             r.generator)
            c.tokens.append(tok)
            if c.q_ids is not None:
                c.q_ids.append(ids)
                c.q_probs.append(probs)  # type: ignore[union-attr]
            feeds[i] = [tok]
        live = [i for i in live if len(chunks[i].tokens) < requests[i].gamma]
        if step_ms is not None:
            step_ms.append((time.perf_counter() - t0) * 1000.0)
    return chunks


def draft_chunk(engine: Engine, slot: int, uncached_tokens: Sequence[int], gamma: int, sampling: SamplingParams,
                generator: torch.Generator | None = None) -> DraftChunk:
    """Feed the uncached committed tokens, then draft ``gamma`` tokens autoregressively (γ forwards)."""
    return draft_batch(engine, [DraftRequest(slot, list(uncached_tokens), gamma, sampling, generator)])[0]


def apply_result_to_draft(engine: Engine, slot: int, chunk: DraftChunk, accepted: int,
                          committed: Sequence[int]) -> list[int]:
    """Roll the draft cache back to the accepted drafts it holds; return the new uncached committed tokens.

    The cache holds d1..d(γ-1) past the old committed tokens; it keeps ``min(k, γ-1)`` of them and the rest of
    ``committed`` (``d1..dk, t``) is not cached yet.
    """
    gamma = len(chunk.tokens)
    if not 0 <= accepted <= gamma or len(committed) != accepted + 1:
        raise ValueError(f"result does not fit the chunk: accepted={accepted}, gamma={gamma}, "
                         f"{len(committed)} committed tokens")
    kept = min(accepted, gamma - 1)
    engine.rollback(slot, (gamma - 1) - kept)
    return [int(t) for t in committed[kept:]]


# --------------------------------------------------------------------------- target side
@dataclass
class VerifyItem:
    slot: int
    pending: int
    tokens: list[int]  # draft tokens d1..dγ
    q_ids: Sequence[Any] | None  # q rows as acceptance takes them (workers.acceptance); None when greedy
    q_probs: Sequence[Any] | None
    params: SamplingParams
    policy: Policy
    generator: torch.Generator | None


@dataclass
class VerifyOutcome:
    accepted: int
    tokens: list[int]  # d1..dk + the target's own token
    pending: int  # the new pending token (tokens[-1])
    error: str | None = None  # set when this row's chunk was malformed (cache left as before)


def judge_sampled_in_batch(logits: torch.Tensor) -> bool:
    """Whether lossless sampled rows with these logits are judged together (``rejection_sample_batch``): on an
    accelerator, yes; on the CPU the row-by-row judge is cheaper (see ``verify_batch``)."""
    return logits.device.type != "cpu"


def verify_batch(engine: Engine, items: Sequence[VerifyItem],
                 prefill_rows: Sequence[tuple[int, Sequence[int]]] = ()) -> list[VerifyOutcome]:
    """Verify many sessions' chunks in ONE forward, accept per row, roll back each slot's rejected entries.

    ``prefill_rows`` (slot, prompt chunk) ride along in the same forward (chunked prefill), last-token logits only.
    A malformed chunk fails alone: its outcome carries ``error`` and its slot is restored.
    """
    rows = [(it.slot, [it.pending] + list(it.tokens)) for it in items] + [(s, list(t)) for s, t in prefill_rows]
    if not rows:
        return []
    logits = engine.forward(rows, last_only=[False] * len(items) + [True] * len(prefill_rows))
    # lossless greedy rows need only the argmax: one kernel and one read-back for all of them, not one per row
    # (a per-row read-back is a device sync each: ~0.1 ms a row, tens of ms a tick at batch 256)
    greedy = [i for i, it in enumerate(items) if argmax_only(it.policy, it.params)]
    ids: dict[int, list[int]] = {}
    if greedy:
        flat = torch.cat([logits[i] for i in greedy]).argmax(-1).tolist()
        at = 0
        for i in greedy:
            ids[i], at = flat[at:at + logits[i].shape[0]], at + logits[i].shape[0]
    # lossless sampled rows on an accelerator: one pass over all of them where the logits are, then p(x) and one
    # row each read back (on the CPU, judging row by row computes only the positions up to the first rejection,
    # which is cheaper there)
    sampled = [i for i, it in enumerate(items) if i not in ids and batch_sampled(it.policy, it.params)
               and judge_sampled_in_batch(logits[i])]
    judged: dict[int, AcceptResult | AcceptanceError] = {}
    if sampled:
        judged = dict(zip(sampled, rejection_sample_batch(
            [logits[i] for i in sampled], [items[i].tokens for i in sampled],
            [(items[i].q_ids, items[i].q_probs) for i in sampled], [items[i].params for i in sampled],
            [items[i].generator for i in sampled])))
    # the other rows (lossy policies) are judged on the host: one copy for all of them instead of a device round
    # trip per softmax, draw and comparison of every row
    others = [i for i in range(len(items)) if i not in ids and i not in judged]
    host: dict[int, torch.Tensor] = {}
    if others and logits[others[0]].device.type != "cpu":
        moved = torch.cat([logits[i] for i in others]).cpu()
        host = dict(zip(others, moved.split([logits[i].shape[0] for i in others])))
    outcomes = []
    for n, (it, row_logits) in enumerate(zip(items, logits)):
        gamma = len(it.tokens)
        row_logits = host.get(n, row_logits)
        try:
            if n in ids:
                res = match_argmax(ids[n], it.tokens)
            elif n in judged:
                res = judged[n]
                if isinstance(res, AcceptanceError):
                    raise res
            else:
                res = accept(it.policy, row_logits, it.tokens, it.q_ids, it.q_probs, it.params, it.generator)
        except AcceptanceError as exc:
            engine.rollback(it.slot, gamma + 1)
            outcomes.append(VerifyOutcome(0, [], it.pending, error=str(exc)))
            continue
        engine.rollback(it.slot, gamma - res.accepted)
        outcomes.append(VerifyOutcome(res.accepted, res.tokens, res.tokens[-1]))
    return outcomes


@dataclass
class TargetSession:
    """A session's state on a target worker."""

    session: str
    slot: int
    pending: int
    pos: int  # committed tokens (prompt + output), pending included
    params: SamplingParams
    policy: Policy
    max_new_tokens: int
    generated: int = 0
    finished: bool = False
    last_seq: int = -1
    last_result: object | None = None  # the answer to ``last_seq`` (idempotent resend)

    def generator(self) -> torch.Generator | None:
        """This round's generator, keyed by (seed, pos): a re-placed session draws the same numbers."""
        return None if self.params.greedy else round_generator(self.params.seed, self.pos, STREAM_TARGET)

    def verify_item(self, tokens: Sequence[int], q_ids: Sequence[Any] | None = None,
                    q_probs: Sequence[Any] | None = None) -> VerifyItem:
        return VerifyItem(self.slot, self.pending, list(tokens), q_ids, q_probs, self.params, self.policy,
                          self.generator())

    def apply(self, outcome: VerifyOutcome, eos: Collection[int] | int | None) -> list[int]:
        """Commit an outcome; returns the tokens to report (clipped at EOS / budget) and sets ``finished``."""
        if outcome.error:
            raise ValueError(f"cannot apply a failed verify: {outcome.error}")
        tokens, why = clip_tokens(outcome.tokens, eos, self.max_new_tokens - self.generated)
        self.generated += len(tokens)
        self.pos += len(tokens)
        self.pending = outcome.pending
        self.finished = why is not None
        return tokens


def open_target_session(engine: Engine, session: str, prompt_ids: Sequence[int], max_new_tokens: int,
                        params: SamplingParams, policy: str | Policy = "exact", policy_args: dict | None = None,
                        chunk: int = 256) -> TargetSession:
    """Allocate a slot, prefill the prompt and return the session (frees the slot if prefill fails)."""
    pol = policy if isinstance(policy, Policy) else make_policy(policy, policy_args)
    slot = engine.allocate()
    try:
        pending = prefill(engine, slot, prompt_ids, chunk)
    except BaseException:
        engine.free(slot)
        raise
    return TargetSession(session, slot, pending, len(prompt_ids), params, pol, max_new_tokens)


# --------------------------------------------------------------------------- whole generations
@dataclass
class GenerationResult:
    tokens: list[int]
    finish_reason: str
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    gammas: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def autoregressive_generate(engine: Engine, prompt: Sequence[int], max_new: int, sampling: SamplingParams,
                            prefill_chunk: int = 256) -> GenerationResult:
    """Target-only decoding, one token per forward: the baseline speculative output must match (greedy)."""
    slot = engine.allocate()
    try:
        pending = prefill(engine, slot, prompt, prefill_chunk)
        out: list[int] = []
        pos = len(prompt)
        stop = eos_ids(engine.info)
        while len(out) < max_new:
            logits = engine.forward([(slot, [pending])], last_only=[True])[0][-1]
            gen = None if sampling.greedy else round_generator(sampling.seed, pos, STREAM_TARGET)
            pending = sample_token(logits, sampling, gen)
            out.append(pending)
            pos += 1
            if pending in stop:
                return GenerationResult(out, FINISH_EOS, rounds=len(out))
        return GenerationResult(out, FINISH_LENGTH, rounds=len(out))
    finally:
        engine.free(slot)


# --------------------------------------------------------------------------- fused rounds (draft + target, one process)
@dataclass(eq=False)  # identity: sessions are plan keys
class FusedSession:
    """One generation on a draft + target engine pair: both slots, the prompt's prefill progress, the counters.

    Both caches are prefilled with ``prompt[:-1]`` a chunk per tick (``prefilled`` counts them); after that every
    tick that plans the session runs one round.
    """

    key: str
    target: TargetSession
    draft_slot: int
    prompt: list[int]
    draft_params: SamplingParams
    gamma: int | None = None  # the γ this session asked for; None: the gamma policy decides
    prefilled: int = 0  # tokens of prompt[:-1] cached in both slots
    uncached: list[int] = field(default_factory=list)  # committed tokens not in the draft cache (ends with pending)
    result: GenerationResult = field(default_factory=lambda: GenerationResult([], FINISH_LENGTH))
    rejections: int = 0  # rounds that ended at a rejected draft token
    error: str | None = None
    gamma_state: Any = None  # the gamma policy's own per-session state (e.g. an ``AdaptiveGamma``)

    @property
    def to_prefill(self) -> int:
        return len(self.prompt) - 1 - self.prefilled

    @property
    def done(self) -> bool:
        return self.error is not None or self.target.finished

    @property
    def decoding(self) -> bool:
        return not self.done and self.to_prefill == 0

    @property
    def remaining(self) -> int:
        return self.target.max_new_tokens - self.target.generated


def open_fused_session(draft_engine: Engine, target_engine: Engine, key: str, prompt_ids: Sequence[int],
                       max_new_tokens: int, params: SamplingParams, policy: str | Policy = "exact",
                       gamma: int | None = None, draft_params: SamplingParams | None = None) -> FusedSession:
    """Allocate a slot on each engine (nothing is prefilled yet: ``run_round`` does it in chunks)."""
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token")
    if gamma is not None and gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    pol = policy if isinstance(policy, Policy) else make_policy(policy)
    tslot = target_engine.allocate()
    try:
        dslot = draft_engine.allocate()
    except BaseException:
        target_engine.free(tslot)
        raise
    prompt = [int(t) for t in prompt_ids]
    ts = TargetSession(key, tslot, prompt[-1], len(prompt), params, pol, max_new_tokens)
    ts.finished = max_new_tokens <= 0
    return FusedSession(key, ts, dslot, prompt, draft_params or params, gamma, uncached=[prompt[-1]])


def close_fused_session(draft_engine: Engine, target_engine: Engine, session: FusedSession) -> None:
    """Free both slots (once)."""
    if session.draft_slot >= 0:
        target_engine.free(session.target.slot)
        draft_engine.free(session.draft_slot)
        session.draft_slot = -1


class GammaPolicy:
    """Chooses each decoding session's γ for its next round and learns from the outcomes.

    γ = 0 is decode mode: the session drafts nothing and the target decodes its next token (the draft cache
    catches up at the session's next drafted round). A policy that needs the whole batch at once (goodput from the
    target's cost model) overrides ``choose``; one that needs step times uses ``observe_tick``.
    """

    def choose(self, sessions: Sequence[FusedSession]) -> list[int]:
        return [self.choose_gamma(s) for s in sessions]

    def choose_gamma(self, session: FusedSession) -> int:
        raise NotImplementedError

    def observe(self, session: FusedSession, accepted: int, drafted: int) -> None:
        """One round of ``session``: ``accepted`` of ``drafted`` draft tokens kept."""

    def observe_tick(self, rows: int, tokens: int, context: float, ms: float) -> None:
        """One measured tick: target forward rows and tokens, mean context, wall time of the whole tick."""

    def forget(self, session: FusedSession) -> None:
        """``session`` ended."""


@dataclass
class FixedGamma(GammaPolicy):
    """Every session drafts the γ it asked for, else ``gamma``."""

    gamma: int = 4

    def __post_init__(self) -> None:
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")

    def choose_gamma(self, session: FusedSession) -> int:
        return self.gamma if session.gamma is None else session.gamma


@dataclass
class AdaptiveGammaPolicy(GammaPolicy):
    """An ``AdaptiveGamma`` per session (acceptance-rate rule, γ in [1, max_gamma]); a session that asked for a γ
    keeps it."""

    max_gamma: int = 8
    c_draft: float = 0.1  # one draft forward's cost relative to one verify forward
    c_verify: float = 1.0

    def __post_init__(self) -> None:
        AdaptiveGamma(self.max_gamma, self.c_draft, self.c_verify)  # validates

    def controller(self, session: FusedSession) -> AdaptiveGamma:
        if not isinstance(session.gamma_state, AdaptiveGamma):
            session.gamma_state = AdaptiveGamma(self.max_gamma, self.c_draft, self.c_verify)
        return session.gamma_state

    def choose_gamma(self, session: FusedSession) -> int:
        return session.gamma if session.gamma is not None else self.controller(session).next_gamma()

    def observe(self, session: FusedSession, accepted: int, drafted: int) -> None:
        if session.gamma is None and drafted > 0:
            self.controller(session).update(accepted, drafted)


def round_gamma(chosen: int, session: FusedSession) -> int:
    """The γ a round really drafts: 0 stays decode mode, else at least 1 and no more than the budget needs."""
    if chosen <= 0:
        return 0
    return max(1, min(int(chosen), session.remaining - 1))


@dataclass
class RoundPlan:
    """One fused tick: rounds ``(session, γ)`` (one verify row of γ+1 tokens each) and prefill chunks
    ``(session, tokens)`` (one row on each engine), as ``plan_tick`` chose them."""

    rounds: list[tuple[FusedSession, int]] = field(default_factory=list)
    prefills: list[tuple[FusedSession, int]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.rounds) + len(self.prefills)

    @property
    def tokens(self) -> int:
        """Tokens in the target forward."""
        return sum(g + 1 for _, g in self.rounds) + sum(n for _, n in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.rounds or self.prefills)


def plan_round(sessions: Sequence[FusedSession], gamma_policy: GammaPolicy, limits: BatchLimits) -> RoundPlan:
    """Choose this tick's work with the target's batching policy (the simulator's fused worker asks the same).

    ``sessions`` in priority order: decoding sessions ask for a round of γ+1 tokens, sessions still prefilling
    for their remaining prompt tokens; ``plan_tick`` takes rounds first and prefills ``prefill_chunk`` at a time
    in the leftover token budget, so a long prompt never stalls the running sessions.
    """
    decoding = [s for s in sessions if s.decoding]
    gammas = {s: round_gamma(g, s) for s, g in zip(decoding, gamma_policy.choose(decoding))}
    prefilling = [(s, s.to_prefill) for s in sessions if not s.done and s.to_prefill > 0]
    tick = plan_tick([(s, gammas[s] + 1) for s in decoding], prefilling, limits)
    return RoundPlan([(s, gammas[s]) for s in tick.verify], list(tick.prefill))


def run_round(draft_engine: Engine, target_engine: Engine, plan: RoundPlan, gamma_policy: GammaPolicy,
              eos: Collection[int] | int | None) -> list[list[int]]:
    """Run one planned tick: draft (one batched pass, prefill chunks riding in its first forward), verify every
    round in ONE target forward (prefill chunks riding along), accept, roll both caches back, count.

    Returns each round's newly committed tokens, in ``plan.rounds`` order. A malformed round sets its session's
    ``error``; an engine failure raises and leaves the plan's sessions unusable (the caller ends them).
    """
    drafting = [(s, g) for s, g in plan.rounds if g > 0]
    requests = [DraftRequest(s.draft_slot, s.uncached, g, s.draft_params,
                             None if s.draft_params.greedy else round_generator(s.draft_params.seed, s.target.pos,
                                                                                STREAM_DRAFT))
                for s, g in drafting]
    chunks = dict(zip((s for s, _ in drafting), draft_batch(
        draft_engine, requests, [(s.draft_slot, s.prompt[s.prefilled:s.prefilled + n]) for s, n in plan.prefills])))
    decode = DraftChunk([])  # γ = 0: the target decodes one token
    items = [s.target.verify_item(c.tokens, c.q_ids, c.q_probs)
             for s, c in ((s, chunks.get(s, decode)) for s, _ in plan.rounds)]
    outcomes = verify_batch(target_engine, items,
                            [(s.target.slot, s.prompt[s.prefilled:s.prefilled + n]) for s, n in plan.prefills])
    for s, n in plan.prefills:
        s.prefilled += n
    fresh: list[list[int]] = []
    for (s, g), o in zip(plan.rounds, outcomes):
        if o.error:
            s.error = o.error
            fresh.append([])
            continue
        if g > 0:
            s.uncached = apply_result_to_draft(draft_engine, s.draft_slot, chunks[s], o.accepted, o.tokens)
        else:
            s.uncached = s.uncached + [int(t) for t in o.tokens]
        new = s.target.apply(o, eos)
        r = s.result
        r.tokens += new
        r.rounds += 1
        r.drafted += g
        r.accepted += o.accepted
        r.gammas.append(g)
        s.rejections += int(o.accepted < g and not s.target.finished)
        gamma_policy.observe(s, o.accepted, g)
        if s.target.finished:
            r.finish_reason = FINISH_EOS if new and new[-1] in _stop_set(eos) else FINISH_LENGTH
        fresh.append(new)
    return fresh


def _stop_set(eos: Collection[int] | int | None) -> Collection[int]:
    return () if eos is None else (eos,) if isinstance(eos, int) else eos


# --------------------------------------------------------------------------- whole generations in-process
def speculative_generate_many(draft_engine: Engine, target_engine: Engine, prompts: Sequence[Sequence[int]],
                              gamma: int, max_new: int, sampling: SamplingParams, policy: str | Policy = "exact",
                              adaptive: bool = False, draft_sampling: SamplingParams | None = None,
                              prefill_chunk: int = 256, max_gamma: int | None = None,
                              on_tokens: Callable[[int, list[int]], None] | None = None,
                              gamma_policy: GammaPolicy | None = None,
                              limits: BatchLimits | None = None) -> list[GenerationResult]:
    """Fused speculative decoding of several prompts at once, tick by tick as the fused worker runs them
    (``plan_round`` + ``run_round``).

    ``draft_sampling`` defaults to the target's sampling; any draft distribution is lossless under ``exact``.
    ``adaptive`` re-chooses γ per session per round (``AdaptiveGammaPolicy``, at most ``max_gamma``, default
    2·gamma); ``gamma_policy`` replaces both. ``limits`` defaults to the target's batching defaults with
    ``prefill_chunk``. ``on_tokens(index, tokens)`` streams each session's newly committed tokens.
    """
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    pol = policy if isinstance(policy, Policy) else make_policy(policy)
    if gamma_policy is None:
        gamma_policy = AdaptiveGammaPolicy(max_gamma or 2 * gamma) if adaptive else FixedGamma(gamma)
    limits = limits or BatchLimits(prefill_chunk=prefill_chunk)
    eos = eos_ids(target_engine.info)
    sessions: list[FusedSession] = []
    try:
        for i, prompt in enumerate(prompts):
            sessions.append(open_fused_session(draft_engine, target_engine, str(i), prompt, max_new, sampling, pol,
                                               draft_params=draft_sampling))
        index = {s: i for i, s in enumerate(sessions)}
        order = list(sessions)
        while True:
            plan = plan_round(order, gamma_policy, limits)
            if not plan:
                break
            fresh = run_round(draft_engine, target_engine, plan, gamma_policy, eos)
            for (s, _), new in zip(plan.rounds, fresh):
                if s.error:
                    raise AcceptanceError(s.error)
                if on_tokens and new:
                    on_tokens(index[s], new)
            order = next_order(order, plan)
        return [s.result for s in sessions]
    finally:
        for s in sessions:
            close_fused_session(draft_engine, target_engine, s)


def next_order(order: Sequence[FusedSession], plan: RoundPlan) -> list[FusedSession]:
    """Round-robin: sessions that had a round this tick go behind those that did not (matters when rows or tokens
    run out), finished ones leave."""
    served = {s for s, _ in plan.rounds}
    return [s for s in order if s not in served and not s.done] + [s for s, _ in plan.rounds if not s.done]


def speculative_generate(draft_engine: Engine, target_engine: Engine, prompt: Sequence[int], gamma: int,
                         max_new: int, sampling: SamplingParams, policy: str | Policy = "exact",
                         adaptive: bool = False, **kwargs) -> GenerationResult:
    """Fused speculative decoding of one prompt (see ``speculative_generate_many``)."""
    return speculative_generate_many(draft_engine, target_engine, [prompt], gamma, max_new, sampling, policy,
                                     adaptive, **kwargs)[0]
