"""Speculative decoding over the ``Engine`` interface, as small functions named after the algorithm's steps.

Token positions (protocol/FLOW.md): a slot caches every committed token except the last one, the *pending* token.

- Target: ``prefill`` caches ``prompt[:-1]``; ``verify_batch`` feeds ``[pending, d1..dγ]`` per session (all
  sessions in ONE ``engine.forward``), accepts k, appends the target's own token t, rolls back γ−k entries: the
  cache then holds ``..pending, d1..dk`` and t is the new pending token.
- Draft: the draft slot lags behind the committed sequence by a few *uncached* tokens (at least the pending one).
  ``draft_chunk`` feeds them, then drafts γ tokens in γ forwards (the last draft token is never fed), and
  ``apply_result_to_draft`` rolls back the rejected drafts and returns the new uncached tokens.

``speculative_generate`` (fused, in-process) and ``autoregressive_generate`` (target-only baseline) are built from
these steps; the target, draft and fused workers use the same steps over the network.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import torch

from workers.acceptance import AcceptanceError, Policy, accept, make_policy
from workers.adaptive_gamma import AdaptiveGamma
from workers.engine.base import Engine
from workers.sampling import (STREAM_DRAFT, STREAM_TARGET, SamplingParams, round_generator, sample_draft,
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
    tokens: list[int]
    q_ids: list[list[int]] | None = None  # sparse q per draft token; None when greedy
    q_probs: list[list[float]] | None = None


@dataclass
class DraftRequest:
    slot: int
    uncached: list[int]  # committed tokens not yet in the draft cache (ends with the pending token)
    gamma: int
    sampling: SamplingParams
    generator: torch.Generator | None = None


def draft_batch(engine: Engine, requests: Sequence[DraftRequest]) -> list[DraftChunk]:
    """Draft for many sessions at once: step j runs one forward over every session still drafting.

    Step 0 feeds each session's uncached tokens, step j feeds its draft token j; the draft cache ends up holding
    ``uncached + d1..d(γ-1)``.
    """
    for r in requests:
        if r.gamma < 1 or not r.uncached:
            raise ValueError(f"draft slot {r.slot}: need gamma >= 1 and at least one uncached token")
    chunks = [DraftChunk([], None if r.sampling.greedy else [], None if r.sampling.greedy else [])
              for r in requests]
    feeds = [list(r.uncached) for r in requests]
    live = list(range(len(requests)))
    while live:
        logits = engine.forward([(requests[i].slot, feeds[i]) for i in live], last_only=[True] * len(live))
        for i, row in zip(live, logits):
            r, c = requests[i], chunks[i]
            tok, ids, probs = sample_draft(row[-1], r.sampling.temperature, r.sampling.top_p, r.sampling.top_k,
                                           r.generator)
            c.tokens.append(tok)
            if c.q_ids is not None:
                c.q_ids.append(ids)
                c.q_probs.append(probs)  # type: ignore[union-attr]
            feeds[i] = [tok]
        live = [i for i in live if len(chunks[i].tokens) < requests[i].gamma]
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
    q_ids: list[list[int]] | None
    q_probs: list[list[float]] | None
    params: SamplingParams
    policy: Policy
    generator: torch.Generator | None


@dataclass
class VerifyOutcome:
    accepted: int
    tokens: list[int]  # d1..dk + the target's own token
    pending: int  # the new pending token (tokens[-1])
    error: str | None = None  # set when this row's chunk was malformed (cache left as before)


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
    outcomes = []
    for it, row_logits in zip(items, logits):
        gamma = len(it.tokens)
        try:
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

    def verify_item(self, tokens: Sequence[int], q_ids: list[list[int]] | None = None,
                    q_probs: list[list[float]] | None = None) -> VerifyItem:
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


@dataclass
class _Fused:
    target: TargetSession
    draft_slot: int
    uncached: list[int]
    result: GenerationResult
    controller: AdaptiveGamma | None


def speculative_generate_many(draft_engine: Engine, target_engine: Engine, prompts: Sequence[Sequence[int]],
                              gamma: int, max_new: int, sampling: SamplingParams, policy: str | Policy = "exact",
                              adaptive: bool = False, draft_sampling: SamplingParams | None = None,
                              prefill_chunk: int = 256, max_gamma: int | None = None,
                              on_tokens: Callable[[int, list[int]], None] | None = None) -> list[GenerationResult]:
    """Fused speculative decoding of several prompts at once: batched drafting, one verify forward per round.

    ``draft_sampling`` defaults to the target's sampling; any draft distribution is lossless under ``exact``.
    ``adaptive`` re-chooses γ per session per round (``AdaptiveGamma``, at most ``max_gamma``, default 2·gamma).
    ``on_tokens(index, tokens)`` streams each session's newly committed tokens.
    """
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    pol = policy if isinstance(policy, Policy) else make_policy(policy)
    dparams = draft_sampling or sampling
    eos = eos_ids(target_engine.info)
    sessions: list[_Fused] = []
    try:
        for i, prompt in enumerate(prompts):
            ds = draft_engine.allocate()
            try:
                ts = open_target_session(target_engine, str(i), prompt, max_new, sampling, pol, chunk=prefill_chunk)
            except BaseException:
                draft_engine.free(ds)
                raise
            s = _Fused(ts, ds, [], GenerationResult([], FINISH_LENGTH),
                       AdaptiveGamma(max_gamma or 2 * gamma) if adaptive else None)
            sessions.append(s)
            s.uncached = [prefill(draft_engine, ds, prompt, prefill_chunk)]
            ts.finished = max_new <= 0
        while True:
            live = [s for s in sessions if not s.target.finished]
            if not live:
                break
            gammas = []
            for s in live:
                g = s.controller.next_gamma() if s.controller else gamma
                gammas.append(max(1, min(g, s.target.max_new_tokens - s.target.generated - 1)))
            requests = [DraftRequest(s.draft_slot, s.uncached, g, dparams,
                                     None if dparams.greedy else round_generator(dparams.seed, s.target.pos,
                                                                                 STREAM_DRAFT))
                        for s, g in zip(live, gammas)]
            chunks = draft_batch(draft_engine, requests)
            items = [s.target.verify_item(c.tokens, c.q_ids, c.q_probs) for s, c in zip(live, chunks)]
            outcomes = verify_batch(target_engine, items)
            for s, c, o, g in zip(live, chunks, outcomes, gammas):
                if o.error:
                    raise AcceptanceError(o.error)
                s.uncached = apply_result_to_draft(draft_engine, s.draft_slot, c, o.accepted, o.tokens)
                new = s.target.apply(o, eos)
                r = s.result
                r.tokens += new
                r.rounds += 1
                r.drafted += g
                r.accepted += o.accepted
                r.gammas.append(g)
                if s.controller:
                    s.controller.update(o.accepted, g)
                if s.target.finished:
                    r.finish_reason = FINISH_EOS if new and new[-1] in eos else FINISH_LENGTH
                if on_tokens and new:
                    on_tokens(sessions.index(s), new)
        return [s.result for s in sessions]
    finally:
        for s in sessions:
            target_engine.free(s.target.slot)
            draft_engine.free(s.draft_slot)


def speculative_generate(draft_engine: Engine, target_engine: Engine, prompt: Sequence[int], gamma: int,
                         max_new: int, sampling: SamplingParams, policy: str | Policy = "exact",
                         adaptive: bool = False, **kwargs) -> GenerationResult:
    """Fused speculative decoding of one prompt (see ``speculative_generate_many``)."""
    return speculative_generate_many(draft_engine, target_engine, [prompt], gamma, max_new, sampling, policy,
                                     adaptive, **kwargs)[0]
