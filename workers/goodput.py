"""The goodput controller: each session's next γ, chosen where the batch is known (target or fused worker).

Why here and not at the drafter: speculation pays while the verify step is memory-bound (a B×(γ+1) verify costs
about a B×1 decode) and stops paying when the step turns compute-bound, or when drafting and the path outweigh the
tokens gained. Acceptance alone cannot see that: the same α that makes γ=4 pay at batch 1 loses at batch 64.

Inputs, per session: acceptance α (EWMA of its rounds), the drafter's cost per draft token ``draft_ms`` and the
round's path ``path_ms`` (link, broker hops, drafter loop; both reported by the drafter in each ``Verify``), and its
context length. Per worker: a step-cost model ``verify_ms(batch, tokens, context)`` (a profile table from
``specmq profile``, or a line fitted online) times a correction factor learned from measured ticks.

Rule (distributed, ``mode="distributed"``). A plan gives every session γᵢ ∈ {0, 1..γmax}; γ = 0 is decode mode
(the target decodes the session itself, one token per tick). With τ the tick time:

- a decode session is a 1-token row in every tick and commits 1 token per τ + h, where h is the worker's host
  time between back-to-back ticks (answering, reading, planning: measured, ``observe_host``), and once per
  request of k tokens it misses the ticks of its request's way back and forth: TPOT = τ + h + (g − h) / k, g the
  measured gap between one request's last tick and the next one's first (before one is measured: pathᵢ + w);
- a speculative session's round takes Rᵢ = γᵢ·draftᵢ + pathᵢ + w + τ (drafting, the path, on average half a tick
  of waiting (w = τ/2) when decode rows keep the target ticking back to back, and its tick) and commits
  E(αᵢ, γᵢ) = (1 − αᵢ^(γᵢ+1)) / (1 − αᵢ) tokens (h is inside pathᵢ: the drafter measures the round trip);
- τ = cost(n, Σ(γᵢ+1), context): every session's row counted in every tick. That is exact when a drafter
  process drafts its sessions in one batch (they arrive together) and conservative for independent drafters:
  when unsure, the model charges speculation more, so the controller errs towards decoding.

Goodput is Σ committed tokens per second; TPOTᵢ is the decode TPOT above or Rᵢ/Eᵢ. The controller takes the plan of highest
goodput whose worst TPOT meets ``tpot_slo_ms`` (when set; when no plan meets it, the plan with the lowest worst
TPOT). Candidates: every uniform plan (all sessions at one γ), then a pass over groups of sessions with similar α
that tries each γ for that group alone. Fused workers (``mode="fused"``) draft and verify in lockstep on one device:
a round is max γ · draft step + τ with every row in it.

The plan is recomputed at most every ``replan_ms`` (and when the session count changes), so a tick pays a dict
lookup, not a search.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

from workers.adaptive_gamma import expected_tokens

DISTRIBUTED = "distributed"
FUSED = "fused"
ALPHA_BUCKET = 0.05  # sessions whose α estimates round to the same multiple form one group
FLEET_WEIGHT = 0.1  # weight of each report in the worker-wide draft and path cost averages
FLEET_STALE_S = 30.0  # a load level's fleet costs unrefreshed this long are forgotten (the next newcomer measures)
FLEET_DECAY = 0.99  # per round, of the worker's pooled acceptance


class StepCost(Protocol):
    """What the controller asks of a cost model: one forward's latency in ms."""

    def verify_ms(self, batch: int, tokens: int, context: float) -> float: ...


@dataclass
class OnlineStepCost:
    """τ ≈ a + b·tokens + c·rows, fitted by exponentially forgetting least squares over measured ticks.

    The fallback when a worker has no profile table: before two distinct shapes were seen it predicts the mean
    measured tick (every shape costs the same: the memory-bound assumption).
    """

    forget: float = 0.98
    _n: float = 0.0
    _sums: dict = field(default_factory=lambda: {k: 0.0 for k in ("t", "r", "y", "tt", "rr", "tr", "ty", "ry")})

    def observe(self, batch: int, tokens: int, context: float, ms: float) -> None:
        s, f = self._sums, self.forget
        for k in s:
            s[k] *= f
        self._n = self._n * f + 1.0
        s["t"] += tokens
        s["r"] += batch
        s["y"] += ms
        s["tt"] += tokens * tokens
        s["rr"] += batch * batch
        s["tr"] += tokens * batch
        s["ty"] += tokens * ms
        s["ry"] += batch * ms

    def verify_ms(self, batch: int, tokens: int, context: float) -> float:
        if self._n <= 0:
            return 1.0
        n, s = self._n, self._sums
        mt, mr, my = s["t"] / n, s["r"] / n, s["y"] / n
        vtt, vrr, vtr = s["tt"] / n - mt * mt, s["rr"] / n - mr * mr, s["tr"] / n - mt * mr
        cty, cry = s["ty"] / n - mt * my, s["ry"] / n - mr * my
        det = vtt * vrr - vtr * vtr
        if det > 1e-9 * max(1.0, vtt * vrr):
            b = (cty * vrr - cry * vtr) / det
            c = (cry * vtt - cty * vtr) / det
        elif vtt > 1e-9:
            b, c = cty / vtt, 0.0
        else:
            b = c = 0.0
        b, c = max(0.0, b), max(0.0, c)  # a bigger step never costs less
        return max(1e-3, my + b * (tokens - mt) + c * (batch - mr))


@dataclass
class SessionCosts:
    """What the controller knows about one session. ``draft_ms`` is per draft token."""

    alpha: float
    draft_ms: float = 0.0
    path_ms: float = 0.0
    context: int = 0
    decode_gap_ms: float = 0.0  # measured: one decode request's last tick's end to the next one's first tick (0: not)


@dataclass
class PlanOutcome:
    gammas: list[int]
    goodput_tok_s: float
    tick_ms: float
    tpot_ms: list[float]

    @property
    def worst_tpot_ms(self) -> float:
        return max(self.tpot_ms, default=0.0)


@dataclass
class ControllerConfig:
    max_gamma: int = 8
    tpot_slo_ms: float | None = None  # keep every session's predicted TPOT under this (None: goodput only)
    decode_tokens: int = 8  # tokens a decode-mode request asks the target for
    replan_ms: float = 100.0
    probe: bool = True  # probe decoding sessions' acceptance now and then (see ``next_gamma``)
    correction_weight: float = 0.2  # EWMA weight of each measured tick in the cost correction
    mode: str = DISTRIBUTED
    max_batch_tokens: int = 0  # the worker's tokens per forward (0: unknown) and its prefill chunk: what prompts
    prefill_chunk: int = 256  # waiting to be cached add to each tick (``prefill_per_tick``)

    def __post_init__(self) -> None:
        if self.max_gamma < 1:
            raise ValueError(f"max_gamma must be >= 1, got {self.max_gamma}")
        if self.decode_tokens < 1:
            raise ValueError(f"decode_tokens must be >= 1, got {self.decode_tokens}")
        if self.tpot_slo_ms is not None and self.tpot_slo_ms <= 0:
            raise ValueError(f"tpot_slo_ms must be > 0, got {self.tpot_slo_ms}")
        if self.mode not in (DISTRIBUTED, FUSED):
            raise ValueError(f"mode must be {DISTRIBUTED!r} or {FUSED!r}, got {self.mode!r}")


def evaluate_plan(cost: StepCost, sessions: Sequence[SessionCosts], gammas: Sequence[int], mode: str = DISTRIBUTED,
                  correction: float = 1.0, draft_step_ms: float = 0.0,
                  weights: Sequence[float] | None = None, host_ms: float = 0.0,
                  decode_tokens: float = 0.0, prefill: tuple[float, float, float] = (0.0, 0.0, 0.0),
                  max_tokens: int = 0) -> PlanOutcome:
    """Predicted goodput, tick time and per-session TPOT of one plan (see the module docstring).

    ``weights``: how many sessions each entry stands for (a group of alike sessions), 1 each by default.
    ``host_ms``: the worker's host time between back-to-back ticks (h), paid by decode rows on top of τ.
    ``decode_tokens``: tokens per decode request (k); a decode session then also pays its request's path and
    wait for a tick once per k tokens (0: not charged).
    ``prefill``: (tokens, rows, value) of prompt chunks a tick carries beside the plan's rows while prompts wait
    to be cached (``GoodputController.prefill_per_tick``), and what a prompt token is worth in output tokens (the
    output it unlocks). Within ``max_tokens`` (the worker's token budget; 0: none) a plan's verify tokens leave
    less room for them: its ticks are shorter, and the prompts' progress, counted in goodput at that value, slower.
    """
    if not sessions:
        return PlanOutcome([], 0.0, 0.0, [])
    w = list(weights) if weights is not None else [1.0] * len(sessions)
    n = sum(w)
    ctx = sum(s.context * k for s, k in zip(sessions, w)) / n
    p_tokens, p_rows, p_value = prefill
    verify = sum(k * (g + 1) for g, k in zip(gammas, w))
    if max_tokens > 0 and p_tokens > 0:  # verify rows first, prompt chunks in what is left (``plan_tick``)
        room = min(p_tokens, max(0.0, max_tokens - verify))
        p_rows, p_tokens = p_rows * room / p_tokens, room
    tau = correction * cost.verify_ms(max(1, round(n + p_rows)), max(1, round(verify + p_tokens)), ctx)
    if mode == FUSED:
        rnd = tau + max(gammas) * draft_step_ms
        es = [expected_tokens(s.alpha, g) if g else 1.0 for s, g in zip(sessions, gammas)]
        return PlanOutcome(list(gammas), sum(e * k for e, k in zip(es, w)) / rnd * 1000.0, tau, [rnd / e for e in es])
    cycle = tau + host_ms  # one decode tick after another
    wait = 0.5 * cycle if any(g == 0 for g in gammas) else 0.0  # decode rows keep the target ticking back to back
    goodput, tpots = p_value * p_tokens / cycle * 1000.0, []
    for s, g, k in zip(sessions, gammas, w):
        if g == 0:
            tpot = decode_tpot_ms(cycle, s.path_ms, wait, decode_tokens, s.decode_gap_ms, host_ms)
            tpots.append(tpot)
            goodput += k * 1000.0 / tpot
            continue
        rnd = g * s.draft_ms + s.path_ms + wait + tau
        e = expected_tokens(s.alpha, g)
        tpots.append(rnd / e)
        goodput += k * e / rnd * 1000.0
    return PlanOutcome(list(gammas), goodput, tau, tpots)


def decode_tpot_ms(cycle_ms: float, path_ms: float, wait_ms: float, decode_tokens: float, gap_ms: float = 0.0,
                   host_ms: float = 0.0) -> float:
    """A decode session's time per token: a tick cycle (τ + h) per token, plus, once per request of k tokens, the
    request's path (the answer's way back, the next request's way in) and its wait for the next tick: the session
    misses the ticks that run meanwhile. ``gap_ms``, when measured (the end of a request's last tick to the start
    of the next request's first): that time less the h a back-to-back tick would have taken, in place of the
    speculative rounds' path (which includes waits for draft steps that a decode request does not have)."""
    if decode_tokens <= 0:
        return cycle_ms
    extra = max(0.0, gap_ms - host_ms) if gap_ms > 0 else path_ms + wait_ms
    return cycle_ms + extra / decode_tokens


def best_speculative_tpot_ms(s: SessionCosts, tick_ms: float, wait_ms: float, max_gamma: int) -> float:
    """The lowest TPOT session ``s`` could get by drafting, over γ ∈ 1..max_gamma, with the tick as planned (one
    session's extra rows barely move a batch's tick)."""
    return min((g * s.draft_ms + s.path_ms + wait_ms + tick_ms) / expected_tokens(s.alpha, g)
               for g in range(1, max_gamma + 1))


def _better(a: PlanOutcome, b: PlanOutcome | None, slo: float | None) -> bool:
    """Is plan ``a`` preferable to ``b``: meets the SLO where ``b`` does not, else more goodput (fewer drafts on
    a tie within 0.5%), or, when neither meets it, a lower worst TPOT."""
    if b is None:
        return True
    if slo is not None:
        a_ok, b_ok = a.worst_tpot_ms <= slo, b.worst_tpot_ms <= slo
        if a_ok != b_ok:
            return a_ok
        if not a_ok:
            return a.worst_tpot_ms < b.worst_tpot_ms * 0.995
    if a.goodput_tok_s > b.goodput_tok_s * 1.005:
        return True
    return a.goodput_tok_s >= b.goodput_tok_s * 0.995 and sum(a.gammas) < sum(b.gammas)


def alpha_bucket(alpha: float) -> int:
    """The α group a session belongs to (``ALPHA_BUCKET`` wide)."""
    return int(round(alpha / ALPHA_BUCKET))


def group_sessions(sessions: Sequence[SessionCosts]) -> tuple[list[SessionCosts], list[float], list[int]]:
    """Sessions with α in the same bucket of width ``ALPHA_BUCKET`` as one entry (mean costs, weight = members):
    (group costs, weights, each session's group index). Planning then costs O(groups), not O(sessions)."""
    index: dict[int, int] = {}
    members: list[list[SessionCosts]] = []
    of: list[int] = []
    for s in sessions:
        b = alpha_bucket(s.alpha)
        if b not in index:
            index[b] = len(members)
            members.append([])
        members[index[b]].append(s)
        of.append(index[b])
    groups = [SessionCosts(sum(m.alpha for m in ms) / len(ms), sum(m.draft_ms for m in ms) / len(ms),
                           sum(m.path_ms for m in ms) / len(ms), round(sum(m.context for m in ms) / len(ms)),
                           sum(m.decode_gap_ms for m in ms) / len(ms)) for ms in members]
    return groups, [float(len(ms)) for ms in members], of


def choose_plan(cost: StepCost, sessions: Sequence[SessionCosts], config: ControllerConfig,
                correction: float = 1.0, draft_step_ms: float = 0.0, host_ms: float = 0.0,
                decode_tokens: float = 0.0, prefill: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> PlanOutcome:
    """The best plan: uniform candidates first, then one improvement pass per α group (see the module docstring).
    ``decode_tokens``: tokens per decode request, for the request's path (0: not charged)."""
    if not sessions:
        return PlanOutcome([], 0.0, 0.0, [])
    groups, weights, of = group_sessions(sessions)
    cands = range(0, config.max_gamma + 1)

    def evaluate(gs: list[int]) -> PlanOutcome:
        return evaluate_plan(cost, groups, gs, config.mode, correction, draft_step_ms, weights, host_ms,
                             decode_tokens, prefill, config.max_batch_tokens)

    best: PlanOutcome | None = None
    for g in cands:
        out = evaluate([g] * len(groups))
        if _better(out, best, config.tpot_slo_ms):
            best = out
    assert best is not None
    if len(groups) > 1:
        for i in range(len(groups)):
            for g in cands:
                trial = list(best.gammas)
                if trial[i] == g:
                    continue
                trial[i] = g
                out = evaluate(trial)
                if _better(out, best, config.tpot_slo_ms):
                    best = out
    return PlanOutcome([best.gammas[i] for i in of], best.goodput_tok_s, best.tick_ms, [best.tpot_ms[i] for i in of])


PRIOR_ALPHA = 0.6  # acceptance assumed before a session's first round (until the fleet's is known)...
PRIOR_TOKENS = 4.0  # ...worth this many examined draft tokens
MIN_EVIDENCE = 4.0  # examined draft tokens a session needs before its own acceptance steers it...
FLEET_EVIDENCE = 32.0  # ...unless the worker has pooled this many: then the fleet's acceptance is its prior
DECAY = 0.9  # each round's weight relative to the one before (recent rounds count most)
PROBE_GAMMA = 2  # γ of a probe round, which keeps a decoding session's acceptance estimate fresh
PROBE_FIRST, PROBE_MAX = 2, 32  # decode requests between probes: from PROBE_FIRST, doubling up to PROBE_MAX
HOPE_ALPHA = 0.9  # decoding sessions are probed at PROBE_FIRST.. only while speculation would pay at this α
PROBE_PAYBACK = 2.0  # a probe (or a newcomer's scout) must be able to save this many times its draft catch-up
EVIDENCE_SHARE = 1 / 16  # at most this share of a worker's sessions (at least one) in a probe or scout at once
CATCHUP_MIN_TOKENS = 8  # catch-up reports over fewer tokens are mostly a step's fixed cost: not used for the rate


@dataclass
class _Tracked:
    accepted: float = 0.0  # decayed sums over the session's rounds
    examined: float = 0.0
    draft_ms: float = 0.0
    path_ms: float = 0.0
    context: int = 0
    decodes: int = 0  # decode-mode requests since the last probe
    probe_every: int = PROBE_FIRST
    uncached: int = 0  # tokens the session's draft cache has not seen (its prompt, then decode-mode output)
    remaining: int = 0  # output tokens the session may still ask for (0: not known)
    scouted: bool = False  # a newcomer's scout round was given

    @property
    def alpha(self) -> float:
        """Accepted over examined draft tokens (a rejection examines one), with a weak prior: one bad round moves
        the estimate, it does not sentence the session to decode mode forever."""
        return self.alpha_with(PRIOR_ALPHA)

    def alpha_with(self, prior: float) -> float:
        return (self.accepted + prior * PRIOR_TOKENS) / (self.examined + PRIOR_TOKENS)

    def update(self, accepted: int, drafted: int) -> None:
        self.accepted = DECAY * self.accepted + accepted
        self.examined = DECAY * self.examined + accepted + (1 if accepted < drafted else 0)


@dataclass
class _FleetCosts:
    """The fleet's reports at one load level: running averages, and when drafting was last reported."""

    draft_ms: float = 0.0  # per draft token
    path_ms: float = 0.0
    at: float = 0.0
    catchup_ms: float = 0.0  # per token the draft cache catches up
    decode_gap_ms: float = 0.0  # between one decode request's last tick and the next request's first


def _ewma(old: float, new: float, weight: float) -> float:
    """An average moved ``weight`` of the way to ``new``; the first value (``old`` = 0: none yet) is taken as is."""
    return (1 - weight) * old + weight * new if old else new


class GoodputController:
    """Per-worker state: sessions' estimates, the cost correction, the current plan (by α group)."""

    def __init__(self, cost: StepCost | None = None, config: ControllerConfig | None = None,
                 draft_cost: StepCost | None = None, clock=time.monotonic) -> None:
        self.config = config or ControllerConfig()
        self.online = cost is None
        self.cost: StepCost = cost if cost is not None else OnlineStepCost()
        self.draft_cost = draft_cost
        self.correction = 1.0
        self.host_ms = 0.0  # EWMA of the host time between back-to-back ticks (h; distributed decode rows pay it)
        self.sessions: dict[str, _Tracked] = {}
        self.plan: PlanOutcome | None = None
        self._by_bucket: dict[int, int] = {}  # the plan's γ per α bucket: a session moving buckets follows at once
        self._hopeful = True  # would speculation pay for some session at an optimistic α (see ``probe_worth``)
        self._planned_at = -math.inf
        self._planned_n = -1
        self._clock = clock
        # EWMAs over every session's reports, per load level (see ``load_level``): what a session that has
        # reported nothing yet is planned with. Drafting and the path cost more when more sessions share the
        # drafters, the broker and the target's loop, so one average would carry one load's costs into another's
        self._fleet: dict[int, _FleetCosts] = {}
        self.fleet_accepted = 0.0  # pooled, slowly decayed acceptance over every session's rounds
        self.fleet_examined = 0.0
        self.decode_tokens = float(self.config.decode_tokens)  # EWMA of what decode-mode requests ask for
        self._probing: set[str] = set()  # sessions advised a probe or scout whose round is not answered yet
        self.prefill_backlog = (0, 0)  # (prompt tokens not yet cached, sessions holding them): ``observe_prefill``
        self.prefill_prompt_tokens = 0  # the whole length of those sessions' prompts

    # ------------------------------------------------------------------ observations
    def track(self, key: str, context: int = 0, remaining: int | None = None) -> None:
        """Start following a session (its draft cache holds none of its ``context`` yet); ``remaining``: the
        output tokens it may still ask for, when known."""
        if key not in self.sessions:
            self.sessions[key] = _Tracked(context=context, uncached=context)
        if remaining is not None:
            self.sessions[key].remaining = max(0, int(remaining))

    def forget(self, key: str) -> None:
        self.sessions.pop(key, None)
        self._probing.discard(key)

    def observe_round(self, key: str, accepted: int, drafted: int, draft_ms: float = 0.0, path_ms: float = 0.0,
                      context: int = 0, catchup_ms: float = 0.0, catchup_tokens: int = 0) -> None:
        """A verified chunk: its acceptance, and the drafter's reported costs (0 = not reported: keep the last).
        ``catchup_ms`` / ``catchup_tokens``: what the chunk's draft step paid to feed tokens the draft cache had not
        seen; the fleet's rate per token prices the catch-up of later probes."""
        self.track(key, context)
        t = self.sessions[key]
        if drafted > 0:
            t.uncached = 0
            if catchup_tokens >= CATCHUP_MIN_TOKENS and 0 < catchup_ms < math.inf:
                fleet = self._fleet_at(self.load_level())
                fleet.catchup_ms = _ewma(fleet.catchup_ms, catchup_ms / catchup_tokens, FLEET_WEIGHT)
            t.update(accepted, drafted)
            self.fleet_accepted = FLEET_DECAY * self.fleet_accepted + accepted
            self.fleet_examined = FLEET_DECAY * self.fleet_examined + accepted + (1 if accepted < drafted else 0)
            if draft_ms > 0:
                per = draft_ms / drafted
                t.draft_ms = _ewma(t.draft_ms, per, 0.3)
                fleet = self._fleet_at(self.load_level())
                fleet.draft_ms, fleet.at = _ewma(fleet.draft_ms, per, FLEET_WEIGHT), self._clock()
        if path_ms > 0:
            t.path_ms = _ewma(t.path_ms, path_ms, 0.3)
            fleet = self._fleet_at(self.load_level())
            fleet.path_ms = _ewma(fleet.path_ms, path_ms, FLEET_WEIGHT)
        if context:
            t.context = context

    def observe_decode(self, key: str, tokens: int, asked: int) -> None:
        """A decode-mode request answered with ``tokens`` of the ``asked``: the draft cache has that much more to
        catch up, and decode rows are priced with the request size drafters use."""
        self.track(key)
        self.sessions[key].uncached += max(0, int(tokens))
        if asked > 0:
            self.decode_tokens = _ewma(self.decode_tokens, float(asked), self.config.correction_weight)

    def observe_decode_gap(self, key: str, ms: float) -> None:
        """The time from the end of a session's decode request's last tick to the start of its next request's
        first tick: what decoding costs that session per request beyond its ticks (the answer's way back, the
        drafter's loop, the next request's way in, its wait for a tick)."""
        if 0 <= ms < math.inf:
            fleet = self._fleet_at(self.load_level())
            fleet.decode_gap_ms = _ewma(fleet.decode_gap_ms, max(ms, 1e-3), FLEET_WEIGHT)

    def observe_tick(self, rows: int, tokens: int, context: float, ms: float) -> None:
        """A measured forward: corrects the cost model (online fit, or a ratio over the table)."""
        if rows <= 0 or ms <= 0:
            return
        if isinstance(self.cost, OnlineStepCost):
            self.cost.observe(rows, tokens, context, ms)
            return
        predicted = self.cost.verify_ms(rows, tokens, context)
        if predicted > 0:
            w = self.config.correction_weight
            self.correction = (1 - w) * self.correction + w * (ms / predicted)

    def observe_prefill(self, tokens: int, sessions: int, prompt_tokens: int = 0) -> None:
        """The prompts waiting to be cached now (tokens not yet cached, sessions, and those prompts' whole length):
        while there are any, every tick carries chunks of them, which makes each tick cost more whatever the plan,
        and speculation's extra verify tokens cost relatively less."""
        self.prefill_backlog = (max(0, int(tokens)), max(0, int(sessions)))
        self.prefill_prompt_tokens = max(int(prompt_tokens), self.prefill_backlog[0])

    def prefill_per_tick(self, rows: int) -> tuple[float, float, float]:
        """(tokens, rows, value) of the prompt chunks the next ticks carry beside ``rows`` decode rows, and a prompt
        token's worth in output tokens. A tick takes at most a chunk per waiting prompt, at most the backlog, and
        fits the worker's token budget as decoding leaves it. That is what the next round's tick carries, and a γ
        is chosen for the next round only (the plan is redone as the backlog drains). Value: the output a waiting
        prompt's tokens unlock, taken as the running sessions' mean remaining output over a waiting prompt's mean
        whole length; a plan whose verify tokens crowd prompts out of the budget pays for their slower progress at
        that rate."""
        tokens, sessions = self.prefill_backlog
        if tokens <= 0 or sessions <= 0:
            return 0.0, 0.0, 0.0
        take = min(tokens, self.config.prefill_chunk * sessions)
        if self.config.max_batch_tokens > 0:
            take = min(take, max(0, self.config.max_batch_tokens - rows))
        if take <= 0:
            return 0.0, 0.0, 0.0
        left = [t.remaining for t in self.sessions.values() if t.remaining > 0]
        out = sum(left) / len(left) if left else 0.0
        return (float(take), float(min(sessions, math.ceil(take / self.config.prefill_chunk))),
                out / (max(tokens, self.prefill_prompt_tokens) / sessions))

    def observe_host(self, ms: float) -> None:
        """The host time between one tick's forward and the next one's start, when nothing was waited for:
        what a decoded token costs beyond its forward."""
        if ms >= 0:
            self.host_ms = _ewma(self.host_ms, ms, self.config.correction_weight)

    # ------------------------------------------------------------------ decisions
    def prior_alpha(self) -> float:
        """The acceptance a session is assumed to have before its own rounds say otherwise: the fleet's pooled
        acceptance once the worker has seen ``FLEET_EVIDENCE`` examined tokens, else ``PRIOR_ALPHA``."""
        if self.fleet_examined >= FLEET_EVIDENCE:
            return self.fleet_accepted / self.fleet_examined
        return PRIOR_ALPHA

    def alpha_of(self, key: str) -> float:
        return min(self.sessions[key].alpha_with(self.prior_alpha()), 0.999)

    def warm(self, costs: dict[int, tuple[float, float]], alpha: float, examined: float = FLEET_EVIDENCE) -> None:
        """Start from what a worker that has served before knows: per load level, (draft ms per token, path ms) as
        the fleet reported them, and the fleet's pooled acceptance over ``examined`` draft tokens. A restarted
        target can be warmed from a saved state; the simulator warms a point the way the runs before it did."""
        now = self._clock()
        for level, (draft_ms, path_ms) in costs.items():
            self._fleet[int(level)] = _FleetCosts(float(draft_ms), float(path_ms), now)
        self.fleet_accepted, self.fleet_examined = alpha * examined, float(examined)

    def load_level(self) -> int:
        """The worker's load as a level: 1 for one session, 2 for 2-3, 3 for 4-7, ... (doublings)."""
        return max(1, len(self.sessions)).bit_length()

    def _fleet_at(self, level: int) -> _FleetCosts:
        f = self._fleet.get(level)
        if f is None:
            f = self._fleet[level] = _FleetCosts(at=self._clock())
        return f

    def fleet_costs(self) -> tuple[float, float]:
        """(draft ms per token, path ms) the fleet reported at this load level, or at a neighbouring one when
        this one has none (0, 0: none known, or none refreshed within ``FLEET_STALE_S``)."""
        now, level = self._clock(), self.load_level()
        for at in (level, level - 1, level + 1):
            f = self._fleet.get(at)
            if f is not None and f.draft_ms > 0 and now - f.at <= FLEET_STALE_S:
                return f.draft_ms, f.path_ms
        return 0.0, 0.0

    def _nearby(self, name: str) -> float:
        """A fleet figure (a ``_FleetCosts`` field) at this load level, else at a neighbouring one (0: none)."""
        level = self.load_level()
        for at in (level, level - 1, level + 1):
            value = getattr(self._fleet.get(at), name, 0.0)
            if value > 0:
                return value
        return 0.0

    def catchup_rate(self) -> float:
        """ms per token a draft cache's catch-up costs, as reported at this load level or a neighbouring one
        (0: not known)."""
        return self._nearby("catchup_ms")

    def probe_pays(self, key: str) -> bool | None:
        """Could a probe of this decoding session repay its draft cache's catch-up: would drafting at an acceptance
        of ``HOPE_ALPHA`` save, over the session's remaining tokens, ``PROBE_PAYBACK`` times what feeding its
        unseen tokens costs? None when the catch-up rate or the remaining tokens are not known. At one session
        on the H200 a probe's catch-up cost 15 ms at context 512 and 93-125 ms at 2048 on a CPU drafter: the
        first repays itself in a 64-token session, the second does not."""
        t = self.sessions[key]
        rate = self.catchup_rate()
        if rate <= 0 or t.remaining <= 0 or self.plan is None:
            return None
        view = self._views([key])[0]
        cycle = self.plan.tick_ms + self._host()
        wait = 0.5 * cycle  # this session decodes: the target ticks back to back
        decode = decode_tpot_ms(cycle, view.path_ms, wait, self.decode_tokens, view.decode_gap_ms, self._host())
        hope = SessionCosts(max(view.alpha, HOPE_ALPHA), view.draft_ms, view.path_ms, view.context)
        saving = decode - best_speculative_tpot_ms(hope, self.plan.tick_ms, wait, self.config.max_gamma)
        return saving * t.remaining >= PROBE_PAYBACK * rate * t.uncached

    def decode_gap(self) -> float:
        """The decode gap measured at this load level or a neighbouring one (0: not known)."""
        return self._nearby("decode_gap_ms")

    def _views(self, keys: Iterable[str]) -> list[SessionCosts]:
        """Each session's costs; one that has reported none yet borrows the fleet's at this load (drafters on one
        target are mostly alike). The decode gap is the fleet's: every decode request pays the same path."""
        draft, path = self.fleet_costs()
        gap = self.decode_gap() if self.config.mode == DISTRIBUTED else 0.0
        return [SessionCosts(self.alpha_of(k), self.sessions[k].draft_ms or draft, self.sessions[k].path_ms or path,
                             self.sessions[k].context, gap) for k in keys]

    def knows_costs(self, key: str) -> bool:
        """Whether a drafting cost is known for this session (its own reports, or the fleet's at this load)."""
        return bool(self.sessions[key].draft_ms or self.fleet_costs()[0])

    def replan(self, force: bool = False) -> PlanOutcome | None:
        now = self._clock()
        n = len(self.sessions)
        if not force and n == self._planned_n and (now - self._planned_at) * 1000.0 < self.config.replan_ms:
            return self.plan
        keys = list(self.sessions)
        if not keys:
            self.plan, self._by_bucket = None, {}
            return None
        draft_step = 0.0
        if self.config.mode == FUSED and self.draft_cost is not None:
            draft_step = self.draft_cost.verify_ms(n, n, sum(s.context for s in self.sessions.values()) / n)
        views = self._views(keys)
        self.plan = choose_plan(self.cost, views, self.config, self.correction, draft_step, self._host(),
                                self._decode_tokens(), self._prefill(n))
        self._by_bucket = {alpha_bucket(v.alpha): g for v, g in zip(views, self.plan.gammas)}
        self._hopeful = any(self.plan.gammas) or self.probe_worth(views, draft_step)
        self._planned_at, self._planned_n = now, n
        return self.plan

    def probe_worth(self, views: list[SessionCosts], draft_step_ms: float = 0.0) -> bool:
        """Would the best plan speculate for any session were every acceptance at least ``HOPE_ALPHA``? When not
        (drafting or the path cost more than a good draft could save, or the batch is compute-bound), a probe
        round cannot change the plan, and each costs a session a drafted round (with its draft cache's catch-up)
        for nothing."""
        hopeful = [SessionCosts(max(v.alpha, HOPE_ALPHA), v.draft_ms, v.path_ms, v.context, v.decode_gap_ms)
                   for v in views]
        return any(choose_plan(self.cost, hopeful, self.config, self.correction, draft_step_ms,
                               self._host(), self._decode_tokens(), self._prefill(len(views))).gammas)

    def _prefill(self, rows: int) -> tuple[float, float, float]:
        """Prompt chunks per tick for planning (a fused worker's prefill runs in its own rounds: none)."""
        return self.prefill_per_tick(rows) if self.config.mode == DISTRIBUTED else (0.0, 0.0, 0.0)

    def _host(self) -> float:
        """h for planning: a fused worker drafts and verifies in lockstep, so its host time is every row's."""
        return self.host_ms if self.config.mode == DISTRIBUTED else 0.0

    def _decode_tokens(self) -> float:
        """k for planning decode rows (a fused worker's decode rows have no request path)."""
        return self.decode_tokens if self.config.mode == DISTRIBUTED else 0.0

    def next_gamma(self, key: str) -> int:
        """This session's γ for its next round (0: decode mode; -1: no advice, the drafter keeps its γ, while no
        drafting cost has been reported by this session or any other, or while neither the session nor the worker
        has examined enough draft tokens to judge acceptance). A session kept in decode mode gets a probe round
        (γ = ``PROBE_GAMMA``) after ``probe_every`` decode requests, the interval doubling while decoding stays
        best, so a changed acceptance or load is noticed. While speculation could not pay even at a high acceptance
        (``probe_worth``), probes come only every ``PROBE_MAX`` decode requests: they cannot change the plan then,
        but they keep the drafting and path costs from going stale when the load falls. A probe is skipped when it
        cannot repay its draft cache's catch-up (``probe_pays``), and a newcomer planned to decode on the fleet's
        acceptance alone scouts its own with one probe round at once when that repays its prompt's catch-up. At
        most ``EVIDENCE_SHARE`` of the sessions (at least one) are in a probe or scout round at once: sessions that
        open together would otherwise all scout, and their catch-ups share the drafters."""
        self.track(key)
        t = self.sessions[key]
        self._probing.discard(key)  # the round it was advised for is being answered
        if self.config.mode == DISTRIBUTED and (
                not self.knows_costs(key)  # planning would take drafting as free
                or (t.examined < MIN_EVIDENCE and self.fleet_examined < FLEET_EVIDENCE)):  # two unlucky first
            return -1  # rounds are no evidence, and decoding on them would cost the rest of the session
        self.replan()
        bucket = alpha_bucket(self.alpha_of(key))
        g = self._by_bucket.get(bucket)
        if g is None:  # its α left every group of the plan: plan again now, not at the next replan_ms
            self.replan(force=True)
            g = self._by_bucket.get(bucket, 1)
        if g > 0:
            t.decodes, t.probe_every = 0, PROBE_FIRST
            return g
        probe = min(PROBE_GAMMA, self.config.max_gamma)
        room = len(self._probing) < max(1, int(EVIDENCE_SHARE * len(self.sessions)))
        if self.config.probe and room and self._hopeful and t.examined == 0 and not t.scouted:
            t.scouted = True  # a newcomer planned to decode on the fleet's acceptance alone: scout its own at once
            if self.probe_pays(key):  # when that repays its catch-up (unknown: decode, no draft prefill)
                self._probing.add(key)
                return probe
        if self.config.probe and room and t.decodes >= (t.probe_every if self._hopeful else PROBE_MAX):
            t.decodes = 0
            if self.probe_pays(key) is not False:  # else decode on, and ask again after another interval
                if self._hopeful:  # a rare probe (no hope) leaves the schedule for when hope returns
                    t.probe_every = min(PROBE_MAX, 2 * t.probe_every)
                self._probing.add(key)
                return probe
        t.decodes += 1
        return 0

    def stats(self) -> dict:
        p = self.plan
        learned = {"cost_correction": round(self.correction, 3), "host_ms": round(self.host_ms, 3),
                   "decode_gap_ms": round(self.decode_gap(), 3), "catchup_ms_per_token": round(self.catchup_rate(), 4),
                   "decode_tokens": round(self.decode_tokens, 2)}
        if p is None:
            return {"plan_sessions": 0, **learned}
        gs = p.gammas
        return {"plan_sessions": len(gs), "plan_decode": sum(1 for g in gs if g == 0),
                "plan_mean_gamma": round(sum(gs) / len(gs), 3) if gs else 0.0,
                "plan_goodput_tok_s": round(p.goodput_tok_s, 1), "plan_tick_ms": round(p.tick_ms, 3),
                "plan_worst_tpot_ms": round(p.worst_tpot_ms, 3), **learned}


# ---------------------------------------------------------------------- the fused worker's γ policy
class TableDraftCost:
    """A cost table's draft grid as a ``StepCost`` (one draft decode step of ``batch`` rows)."""

    def __init__(self, table) -> None:
        self.table = table

    def verify_ms(self, batch: int, tokens: int, context: float) -> float:
        return self.table.draft_step_ms(batch, context)


class GoodputGammaPolicy:
    """The controller as a fused worker's ``speculation.GammaPolicy`` (draft and verify in lockstep on one device).

    With a cost table the measured tick, less the predicted drafting, corrects the table's verify cost; without
    one, the whole tick (drafting included) is fitted online against its rows and tokens.
    """

    def __init__(self, controller: GoodputController) -> None:
        if controller.config.mode != FUSED:
            raise ValueError("a fused worker's controller needs mode='fused'")
        self.controller = controller
        self._max_gamma = 0

    def choose(self, sessions) -> list[int]:
        ctl = self.controller
        for s in sessions:
            ctl.track(s.key, s.target.pos)
        gammas = [s.gamma if s.gamma is not None else ctl.next_gamma(s.key) for s in sessions]
        self._max_gamma = max(gammas, default=0)
        return gammas

    def choose_gamma(self, session) -> int:
        return self.choose([session])[0]

    def observe(self, session, accepted: int, drafted: int) -> None:
        self.controller.observe_round(session.key, accepted, drafted, context=session.target.pos)

    def observe_tick(self, rows: int, tokens: int, context: float, ms: float) -> None:
        ctl = self.controller
        if not ctl.online and ctl.draft_cost is not None:
            ms -= self._max_gamma * ctl.draft_cost.verify_ms(rows, rows, context)
        ctl.observe_tick(rows, tokens, context, max(ms, 1e-3))

    def forget(self, session) -> None:
        self.controller.forget(session.key)


def load_cost(cost_table: str | None):
    """The profile table at ``cost_table`` as the controller's step-cost model; None: fit the cost online."""
    if not cost_table:
        return None
    from workers.cost_table import load_table

    return load_table(cost_table)


def fused_policy(cost_table: str | None = None, max_gamma: int = 8, tpot_slo_ms: float | None = None
                 ) -> GoodputGammaPolicy:
    """A fused worker's goodput policy over ``cost_table`` (target and draft grids), or fitted online."""
    cost = load_cost(cost_table)
    draft = TableDraftCost(cost) if cost is not None else None
    return GoodputGammaPolicy(GoodputController(cost, ControllerConfig(max_gamma=max_gamma, tpot_slo_ms=tpot_slo_ms,
                                                                       mode=FUSED), draft_cost=draft))
