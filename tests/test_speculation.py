"""Speculative decoding steps over the Engine interface: greedy output equals target-only greedy output.

Models are tiny random Llamas (float32, seeded). The draft is the target with noise added to its weights, so it
agrees often but not always. Each test runs on two engines: ``RecomputeEngine`` below (HF ``LlamaForCausalLM``,
no cache, obviously correct) and the project's real engine (``load_engine`` on the same saved weights).
"""
from __future__ import annotations

import copy
from typing import Sequence

import pytest
import torch

from workers.acceptance import Confidence, make_policy
from workers.adaptive_gamma import AdaptiveGamma, best_gamma, expected_tokens
from workers.engine.base import Engine, EngineError, EngineInfo, NoFreeSlot
from workers.sampling import SamplingParams, round_generator
from workers.batching import BatchLimits
from workers.speculation import (DraftChunk, FusedSession, GammaPolicy, apply_result_to_draft,
                                 autoregressive_generate, clip_tokens, draft_chunk, open_target_session, prefill,
                                 speculative_generate, speculative_generate_many, verify_batch)

VOCAB = 96
PROMPTS = [[1, 5, 9, 13], [2, 40, 7, 7, 7, 30, 11, 3, 60], [50]]
GREEDY = SamplingParams()


class RecomputeEngine(Engine):
    """The fallback engine: HF model, no KV cache; each forward recomputes every row's whole sequence."""

    def __init__(self, model, slots: int = 8, max_context: int = 256, eos: int | None = None) -> None:
        self.model = model.eval()
        self.info = EngineInfo("hf-tiny", model.config.vocab_size, max_context, slots, eos, "float32", "cpu")
        self.seqs: dict[int, list[int]] = {}

    def allocate(self) -> int:
        free = [s for s in range(self.info.num_slots) if s not in self.seqs]
        if not free:
            raise NoFreeSlot("no free slot")
        self.seqs[free[0]] = []
        return free[0]

    def free(self, slot: int) -> None:
        self.seqs.pop(slot, None)

    def length(self, slot: int) -> int:
        return len(self.seqs[slot])

    def rollback(self, slot: int, n: int) -> None:
        assert 0 <= n <= len(self.seqs[slot])
        del self.seqs[slot][len(self.seqs[slot]) - n:]

    def forward(self, rows: Sequence[tuple[int, Sequence[int]]], last_only: Sequence[bool] | None = None
                ) -> list[torch.Tensor]:
        last_only = last_only or [False] * len(rows)
        for slot, toks in rows:
            if len(self.seqs[slot]) + len(toks) > self.info.max_context:
                raise EngineError("context overflow")
            if any(not 0 <= t < self.info.vocab_size for t in toks):
                raise EngineError("token out of range")
        out = []
        with torch.inference_mode():
            for (slot, toks), lo in zip(rows, last_only):
                seq = self.seqs[slot] + list(toks)
                logits = self.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, len(self.seqs[slot]):]
                out.append(logits[-1:].float() if lo else logits.float())
        for slot, toks in rows:
            self.seqs[slot].extend(int(t) for t in toks)
        return out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2, tie_word_embeddings=False, bos_token_id=0, eos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def models():
    target = _tiny_llama(0)
    draft = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.04 * p.std())
    return target, draft


@pytest.fixture(scope="module")
def model_dirs(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = []
    for name, model in zip(("target", "draft"), models):
        model.save_pretrained(root / name)
        dirs.append(root / name)
    return dirs


@pytest.fixture(scope="module", params=["recompute", "real"])
def engines(request, models, model_dirs):
    """(target, draft) engines of one kind."""
    if request.param == "recompute":
        return RecomputeEngine(models[0]), RecomputeEngine(models[1])
    from workers.engine import load_engine
    return tuple(load_engine(d, slots=8, max_context=256) for d in model_dirs)


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Independent oracle: plain HF recomputation, argmax per step."""
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


# --------------------------------------------------------------------------- losslessness at temperature 0
def test_target_only_baseline_matches_hf_greedy(engines, models):
    target, _ = engines
    for prompt in PROMPTS:
        assert autoregressive_generate(target, prompt, 20, GREEDY).tokens == _hf_greedy(models[0], prompt, 20)


def test_greedy_speculative_equals_target_greedy(engines):
    target, draft = engines
    max_new = 24
    baseline = [autoregressive_generate(target, p, max_new, GREEDY).tokens for p in PROMPTS]
    drafted = accepted = 0
    for gamma in range(1, 7):
        for prompt, expect in zip(PROMPTS, baseline):
            res = speculative_generate(draft, target, prompt, gamma, max_new, GREEDY)
            assert res.tokens == expect, f"gamma={gamma} prompt={prompt}"
            assert res.finish_reason == "length"
            drafted += res.drafted
            accepted += res.accepted
    assert 0.2 < accepted / drafted < 0.95, "the draft should be right often but not always"
    for s in range(8):  # every slot was freed
        assert s not in getattr(target, "seqs", {}) or target.length(s) == 0


def test_many_sessions_in_one_batch_equal_each_alone(engines):
    target, draft = engines
    baseline = [autoregressive_generate(target, p, 16, GREEDY).tokens for p in PROMPTS]
    streamed: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    results = speculative_generate_many(draft, target, PROMPTS, 3, 16, GREEDY,
                                        on_tokens=lambda i, toks: streamed[i].extend(toks))
    assert [r.tokens for r in results] == baseline
    assert [streamed[i] for i in range(len(PROMPTS))] == baseline


def test_draft_equal_to_target_accepts_everything(engines):
    target, _ = engines
    for gamma in (1, 4):
        res = speculative_generate(target, target, PROMPTS[1], gamma, 20, GREEDY)
        assert res.acceptance_rate == 1.0
        assert res.tokens == autoregressive_generate(target, PROMPTS[1], 20, GREEDY).tokens


def test_eos_stops_both_paths_at_the_same_token(engines):
    target, draft = engines
    ref = autoregressive_generate(target, PROMPTS[0], 30, GREEDY).tokens
    eos = ref[6]
    old = target.info.eos_token_id
    target.info.eos_token_id = eos
    try:
        base = autoregressive_generate(target, PROMPTS[0], 30, GREEDY)
        spec = speculative_generate(draft, target, PROMPTS[0], 4, 30, GREEDY)
    finally:
        target.info.eos_token_id = old
    assert base.tokens == ref[:ref.index(eos) + 1] == spec.tokens
    assert base.finish_reason == spec.finish_reason == "eos"


# --------------------------------------------------------------------------- cache positions and rollback
def test_cache_holds_all_committed_but_pending(engines):
    target, draft = engines
    prompt = PROMPTS[1]
    ts = open_target_session(target, "s", prompt, 40, GREEDY, chunk=3)
    dslot = draft.allocate()
    try:
        assert target.length(ts.slot) == len(prompt) - 1 and ts.pending == prompt[-1]
        uncached = [prefill(draft, dslot, prompt, chunk=4)]
        committed = list(prompt)
        for gamma in (1, 2, 5, 3, 6):
            chunk = draft_chunk(draft, dslot, uncached, gamma, GREEDY)
            assert len(chunk.tokens) == gamma and chunk.q_ids is None
            (out,) = verify_batch(target, [ts.verify_item(chunk.tokens)])
            assert out.tokens[:out.accepted] == chunk.tokens[:out.accepted] and len(out.tokens) == out.accepted + 1
            committed += ts.apply(out, None)
            uncached = apply_result_to_draft(draft, dslot, chunk, out.accepted, out.tokens)
            assert target.length(ts.slot) == len(committed) - 1 == ts.pos - 1
            assert draft.length(dslot) + len(uncached) == len(committed)
            assert committed[-len(uncached):] == uncached
    finally:
        target.free(ts.slot)
        draft.free(dslot)
    assert committed[len(prompt):] == autoregressive_generate(target, prompt, len(committed) - len(prompt),
                                                              GREEDY).tokens


def test_verify_batch_isolates_a_malformed_chunk_and_carries_prefill_rows(engines):
    target, _ = engines
    t1 = open_target_session(target, "a", PROMPTS[0], 10, SamplingParams(temperature=1.0, seed=3))
    t2 = open_target_session(target, "b", PROMPTS[1], 10, GREEDY)
    pslot = target.allocate()
    try:
        before = target.length(t1.slot)
        bad = t1.verify_item([4, 5], q_ids=[[4], [6]], q_probs=[[1.0], [1.0]])  # 5 has q = 0: malformed
        good = t2.verify_item([1, 2, 3])
        out_bad, out_good = verify_batch(target, [bad, good], prefill_rows=[(pslot, [3, 4, 5, 6])])
        assert out_bad.error and "q = 0" in out_bad.error and target.length(t1.slot) == before
        assert out_good.error is None and target.length(t2.slot) == len(PROMPTS[1]) + out_good.accepted
        assert target.length(pslot) == 4
    finally:
        for s in (t1.slot, t2.slot, pslot):
            target.free(s)


class LogitsEngine(Engine):
    """Answers every forward with fixed per-row logits (acceptance tests without a model)."""

    def __init__(self, logits: list[torch.Tensor]) -> None:
        self.logits = logits
        self.info = EngineInfo("fixed", logits[0].shape[-1], 64, len(logits), None, "float32", "cpu")
        self.rolled: dict[int, int] = {}

    def forward(self, rows, last_only=None):
        return [self.logits[i] for i, _ in enumerate(rows)]

    def rollback(self, slot: int, n: int) -> None:
        self.rolled[slot] = n


def test_verify_batch_reads_greedy_rows_in_one_pass_with_the_same_outcomes_as_per_row_acceptance():
    from workers.acceptance import accept
    from workers.speculation import VerifyItem

    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(g + 1, VOCAB, generator=gen) for g in (3, 0, 2, 4, 1)]
    hot = logits[0].argmax(-1).tolist()  # row 0's drafts follow the target's argmax for two tokens, then miss
    drafts = [[hot[0], hot[1], (hot[2] + 1) % VOCAB], [], [5, 6], logits[3].argmax(-1).tolist()[:4], [7]]
    kinds = [(make_policy("exact"), GREEDY), (make_policy("exact"), GREEDY),
             (make_policy("exact"), SamplingParams(temperature=0.8, seed=1)), (make_policy("exact"), GREEDY),
             (Confidence(threshold=0.0), GREEDY)]
    items = [VerifyItem(slot, 9, d, None, None, params, policy,
                        None if params.greedy else round_generator(params.seed, 4))
             for slot, (d, (policy, params)) in enumerate(zip(drafts, kinds))]
    engine = LogitsEngine(logits)
    outcomes = verify_batch(engine, items)
    for it, row, out in zip(items, logits, outcomes):
        gen_row = None if it.params.greedy else round_generator(it.params.seed, 4)
        want = accept(it.policy, row, it.tokens, None, None, it.params, gen_row)
        assert (out.accepted, out.tokens) == (want.accepted, want.tokens)
        assert engine.rolled[it.slot] == len(it.tokens) - want.accepted
    assert outcomes[0].accepted == 2 and outcomes[3].accepted == 4 and outcomes[4].accepted == 1


def _sampled_rows(n: int = 12, seed: int = 0):
    """Verify rows at temperature > 0 of every kind the wire carries: dense q, sparse q, no q (a one-hot), several
    sampling settings, a draft token past the target's vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    settings = [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=1.3, top_p=0.7, seed=2),
                SamplingParams(temperature=0.6, top_k=5, seed=3)]
    logits, drafts, qs, params = [], [], [], []
    for j in range(n):
        g = 1 + j % 4
        row = torch.randn(g + 1, VOCAB, generator=gen) * 2
        q = torch.softmax(row[:g] + torch.randn(g, VOCAB, generator=gen), -1)
        toks = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(g)]
        if j % 3 == 0:  # dense
            qj = ([None] * g, [q[i].float() for i in range(g)])
        elif j % 3 == 1:  # sparse: the drafter's top 20 renormalised, its token inside
            ids = [torch.sort(torch.unique(torch.cat([torch.topk(q[i], 20).indices, torch.tensor([toks[i]])])))[0]
                   for i in range(g)]
            qj = (ids, [(q[i][ids[i]] / q[i][ids[i]].sum()).float() for i in range(g)])
        else:
            qj = (None, None)
        if j == 5:
            toks[-1] = VOCAB + 3  # the drafter's vocabulary is larger: the target rejects it
            qj = (None, None)
        logits.append(row)
        drafts.append(toks)
        qs.append(qj)
        params.append(settings[j % 3])
    return logits, drafts, qs, params


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_rejection_sampling_is_row_by_row_rejection_sampling(seed):
    """Same results and the same draws as ``accept("exact", ...)`` row by row; a malformed row fails alone."""
    from workers.acceptance import AcceptanceError, accept, rejection_sample_batch

    logits, drafts, qs, params = _sampled_rows(seed=seed)
    bad_q = ([None], [torch.nn.functional.one_hot(torch.tensor(5), VOCAB).float()])  # q(4) = 0: never drawn from q
    logits.append(torch.randn(2, VOCAB))
    drafts.append([4])
    qs.append(bad_q)
    params.append(SamplingParams(temperature=0.9, seed=9))
    nan_q = torch.full((VOCAB,), 1.0 / VOCAB)
    nan_q[3] = float("nan")
    logits.insert(0, torch.randn(3, VOCAB))
    drafts.insert(0, [1, 2])
    qs.insert(0, ([None, None], [torch.full((VOCAB,), 1.0 / VOCAB), nan_q]))  # position 1's q is not finite
    params.insert(0, SamplingParams(temperature=0.9, seed=8))
    gens = [round_generator(p.seed, 7 + j) for j, p in enumerate(params)]
    got = rejection_sample_batch(logits, drafts, qs, params, gens)
    assert isinstance(got[0], AcceptanceError) and "q at draft position 1" in str(got[0]) and "finite" in str(got[0])
    for j, (row, toks, q, p) in enumerate(zip(logits, drafts, qs, params)):
        ref_gen = round_generator(p.seed, 7 + j)
        if j == 0:
            continue
        if j == len(logits) - 1:
            assert isinstance(got[j], AcceptanceError) and "q = 0" in str(got[j])
            continue
        want = accept("exact", row, toks, q[0], q[1], p, ref_gen)
        assert (got[j].accepted, got[j].tokens) == (want.accepted, want.tokens)
        # the generator is left where the row-by-row judge leaves it: later draws agree too
        assert torch.rand((), generator=gens[j]) == torch.rand((), generator=ref_gen)
    assert got[6].accepted < len(drafts[6])  # the out-of-vocabulary token was rejected
    assert {r.accepted for r in got[1:-1]} != {0}  # the rows accept something: the comparison is not vacuous


def test_verify_batch_judges_sampled_rows_together_where_the_logits_are(monkeypatch):
    """With the batch judge on (an accelerator's logits), verify_batch's outcomes and rollbacks are the per-row
    judge's, and a malformed sampled row fails alone."""
    import workers.speculation as spec
    from workers.acceptance import accept
    from workers.speculation import VerifyItem

    calls = []
    real = spec.rejection_sample_batch
    monkeypatch.setattr(spec, "judge_sampled_in_batch", lambda logits: True)
    monkeypatch.setattr(spec, "rejection_sample_batch", lambda *a: calls.append(len(a[0])) or real(*a))
    logits, drafts, qs, params = _sampled_rows(n=6, seed=4)
    logits.append(torch.randn(3, VOCAB))
    drafts.append([1, 2])
    qs.append(([None], [torch.full((VOCAB,), 1.0 / VOCAB)]))  # one q row for two draft tokens: malformed
    params.append(SamplingParams(temperature=0.8, seed=5))
    items = [VerifyItem(slot, 9, d, q[0], q[1], p, make_policy("exact"), round_generator(p.seed, 4))
             for slot, (d, q, p) in enumerate(zip(drafts, qs, params))]
    engine = LogitsEngine(logits)
    outcomes = verify_batch(engine, items)
    assert calls == [len(items)]
    for it, row, out in zip(items[:-1], logits, outcomes):
        want = accept(it.policy, row, it.tokens, it.q_ids, it.q_probs, it.params, round_generator(it.params.seed, 4))
        assert (out.accepted, out.tokens, out.error) == (want.accepted, want.tokens, None)
        assert engine.rolled[it.slot] == len(it.tokens) - want.accepted
    assert outcomes[-1].error and "one row per draft token" in outcomes[-1].error
    assert engine.rolled[items[-1].slot] == 3  # the malformed row's slot is restored whole


# --------------------------------------------------------------------------- sampling and policies end to end
def test_sampled_generation_is_reproducible_per_seed(engines):
    target, draft = engines
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    dparams = SamplingParams(temperature=1.0, top_k=20, seed=11)
    runs = [speculative_generate(draft, target, PROMPTS[0], 3, 20, params, draft_sampling=dparams).tokens
            for _ in range(2)]
    other = speculative_generate(draft, target, PROMPTS[0], 3, 20, SamplingParams(temperature=0.8, top_p=0.9,
                                                                                    seed=12)).tokens
    assert runs[0] == runs[1] and len(runs[0]) == 20 and runs[0] != other
    assert all(0 <= t < VOCAB for t in runs[0])
    base = [autoregressive_generate(target, PROMPTS[0], 10, params).tokens for _ in range(2)]
    assert base[0] == base[1]


def test_draft_chunk_reports_sparse_q_when_sampling(engines):
    _, draft = engines
    slot = draft.allocate()
    try:
        uncached = [prefill(draft, slot, PROMPTS[0])]
        chunk = draft_chunk(draft, slot, uncached, 4, SamplingParams(temperature=1.0, top_k=5),
                            round_generator(0, 4, 1))
        assert len(chunk.q_ids) == len(chunk.q_probs) == 4
        for tok, ids, probs in zip(chunk.tokens, chunk.q_ids, chunk.q_probs):
            assert len(ids) == 5 and tok in ids and abs(sum(probs) - 1) < 1e-6
        assert draft.length(slot) == len(PROMPTS[0]) - 1 + 1 + 3  # uncached + d1..d3
    finally:
        draft.free(slot)


def test_lossy_policy_accepts_at_least_as_much_as_exact(engines):
    target, draft = engines
    exact = speculative_generate(draft, target, PROMPTS[1], 4, 24, GREEDY)
    lossy = speculative_generate(draft, target, PROMPTS[1], 4, 24, GREEDY, policy=Confidence(threshold=0.01))
    topk = speculative_generate(draft, target, PROMPTS[1], 4, 24, GREEDY, policy=make_policy("topk", {"k": 5}))
    assert len(lossy.tokens) == len(topk.tokens) == 24
    assert lossy.acceptance_rate >= exact.acceptance_rate and topk.acceptance_rate >= exact.acceptance_rate


def test_adaptive_gamma_grows_with_a_perfect_draft(engines):
    target, draft = engines
    res = speculative_generate(target, target, PROMPTS[0], 2, 40, GREEDY, adaptive=True, max_gamma=6)
    assert res.acceptance_rate == 1.0 and max(res.gammas) == 6
    assert res.tokens == autoregressive_generate(target, PROMPTS[0], 40, GREEDY).tokens
    res = speculative_generate(draft, target, PROMPTS[0], 2, 40, GREEDY, adaptive=True, max_gamma=6)
    assert res.tokens == autoregressive_generate(target, PROMPTS[0], 40, GREEDY).tokens


class DecodeThenDraft(GammaPolicy):
    """γ = 0 (decode mode) for a session's first rounds, then growing γ: the draft cache must catch up."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int]] = []

    def choose_gamma(self, session: FusedSession) -> int:
        r = session.result.rounds
        return 0 if r < 3 or r % 4 == 0 else r % 4 + 1

    def observe(self, session: FusedSession, accepted: int, drafted: int) -> None:
        self.seen.append((session.key, accepted, drafted))


def test_a_pluggable_gamma_policy_with_decode_mode_stays_lossless(engines):
    target, draft = engines
    baseline = [autoregressive_generate(target, p, 20, GREEDY).tokens for p in PROMPTS]
    policy = DecodeThenDraft()
    results = speculative_generate_many(draft, target, PROMPTS, 3, 20, GREEDY, gamma_policy=policy)
    assert [r.tokens for r in results] == baseline
    for r in results:
        assert r.gammas[:3] == [0, 0, 0] and max(r.gammas) > 1 and r.drafted == sum(r.gammas)
    assert len(policy.seen) == sum(r.rounds for r in results)
    assert all(d == 0 and a == 0 for _, a, d in policy.seen if d == 0)


def test_chunked_prefill_in_the_leftover_budget_keeps_the_output(engines):
    target, draft = engines
    prompts = PROMPTS + [[7], [9, 8]]
    baseline = [autoregressive_generate(target, p, 12, GREEDY).tokens for p in prompts]
    limits = BatchLimits(max_batch_tokens=8, max_batch_rows=64, prefill_chunk=2)
    results = speculative_generate_many(draft, target, prompts, 2, 12, GREEDY, limits=limits)
    assert [r.tokens for r in results] == baseline


def test_rounds_rotate_when_the_token_budget_binds(engines):
    target, draft = engines
    order: list[int] = []
    limits = BatchLimits(max_batch_tokens=7, prefill_chunk=2)  # two rounds of γ+1 = 3 tokens per tick
    results = speculative_generate_many(draft, target, [[50], [7], [9]], 2, 12, GREEDY, limits=limits,
                                        on_tokens=lambda i, toks: order.append(i))
    assert order[:9] == [0, 1, 2] * 3
    assert [r.tokens for r in results] == [autoregressive_generate(target, p, 12, GREEDY).tokens
                                           for p in ([50], [7], [9])]


# --------------------------------------------------------------------------- pure helpers
def test_clip_tokens():
    assert clip_tokens([1, 2, 3], None, 5) == ([1, 2, 3], None)
    assert clip_tokens([1, 2, 3], 2, 5) == ([1, 2], "eos")
    assert clip_tokens([1, 2, 3], {9, 3}, 5) == ([1, 2, 3], "eos")
    assert clip_tokens([1, 2, 3], None, 2) == ([1, 2], "length")
    assert clip_tokens([1, 2, 3], None, 3) == ([1, 2, 3], "length")


def test_adaptive_gamma_rule():
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    gammas = [best_gamma(a, 16, c_draft=0.1) for a in (0.1, 0.5, 0.8, 0.95)]
    assert gammas == sorted(gammas) and gammas[0] == 1 and gammas[-1] > 5
    assert best_gamma(0.99, 4, c_draft=0.01) == 4  # clamped to max
    ctl = AdaptiveGamma(max_gamma=8, weight=0.2)
    for _ in range(60):
        ctl.update(accepted=3, drafted=4)  # 3 of 4 examined: alpha 0.75
    assert ctl.alpha == pytest.approx(0.75, abs=1e-6)
    hi = ctl.next_gamma()
    for _ in range(60):
        ctl.update(accepted=0, drafted=4)
    assert ctl.alpha < 0.01 and ctl.next_gamma() == 1 < hi
    with pytest.raises(ValueError):
        AdaptiveGamma(max_gamma=0)


def test_bad_arguments_are_clear(engines):
    target, draft = engines
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(draft, target, PROMPTS[0], 0, 5, GREEDY)
    with pytest.raises(ValueError, match="unknown acceptance policy"):
        speculative_generate(draft, target, PROMPTS[0], 2, 5, GREEDY, policy="fast")
    with pytest.raises(ValueError, match="at least one token"):
        open_target_session(target, "x", [], 5, GREEDY)
    with pytest.raises(ValueError, match="does not fit"):
        apply_result_to_draft(draft, 0, DraftChunk([1, 2]), 3, [1])
    with pytest.raises(EngineError):  # token id past the vocabulary: the engine refuses before touching a cache
        speculative_generate(draft, target, [VOCAB + 5, 1], 2, 5, GREEDY)


@pytest.mark.slow
def test_sampled_speculative_output_follows_target_distribution(engines, models):
    """End to end at T>0: the first two generated tokens, over many seeds, follow the target's own distribution."""
    from scipy import stats

    from workers.sampling import sampling_probs
    target, draft = engines
    if isinstance(target, RecomputeEngine):
        pytest.skip("the statistical run uses the fast engine; exactness on the recompute engine is tested above")
    params = dict(temperature=1.0, top_p=0.8)
    prompt = PROMPTS[0]
    with torch.inference_mode():
        p1 = sampling_probs(models[0](input_ids=torch.tensor([prompt])).logits[0, -1], **params)
        firsts = torch.nonzero(p1 > 0).reshape(-1).tolist()
        seqs = torch.tensor([prompt + [x] for x in firsts])
        p2 = sampling_probs(models[0](input_ids=seqs).logits[:, -1], **params)
    expected = {(x, y): float(p1[x] * p2[i, y]) for i, x in enumerate(firsts) for y in range(VOCAB) if p2[i, y] > 0}
    n = 1200
    counts: dict[tuple[int, int], int] = {}
    for seed in range(n):
        toks = speculative_generate(draft, target, prompt, 3, 2, SamplingParams(seed=seed, **params),
                                    draft_sampling=SamplingParams(temperature=1.0, top_k=10, seed=seed)).tokens
        counts[tuple(toks)] = counts.get(tuple(toks), 0) + 1
    assert set(counts) <= set(expected)
    obs, exp, rest_o, rest_e = [], [], 0, 0.0
    for key, prob in expected.items():
        if prob * n >= 5:
            obs.append(counts.get(key, 0))
            exp.append(prob * n)
        else:
            rest_o += counts.get(key, 0)
            rest_e += prob * n
    obs.append(rest_o)
    exp.append(rest_e)
    assert stats.chisquare(obs, exp).pvalue > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_verify_batch_judges_device_rows_on_the_host_with_the_same_outcomes():
    from workers.acceptance import accept
    from workers.speculation import VerifyItem

    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(g + 1, VOCAB, generator=gen) for g in (3, 2, 4)]
    params = [SamplingParams(temperature=0.8, seed=s) for s in (1, 2, 3)]
    items = [VerifyItem(slot, 9, [5, 6, 7, 8][:row.shape[0] - 1], None, None, p, make_policy("exact"),
                        round_generator(p.seed, 4)) for slot, (row, p) in enumerate(zip(logits, params))]
    engine = LogitsEngine([row.cuda() for row in logits])
    outcomes = verify_batch(engine, items)
    for it, row, out in zip(items, logits, outcomes):
        want = accept(it.policy, row, it.tokens, None, None, it.params, round_generator(it.params.seed, 4))
        assert (out.accepted, out.tokens) == (want.accepted, want.tokens)
