"""Acceptance policies and sampling: exactness at T=0, distributional losslessness at T>0, lossy policies differ.

The statistical tests run a small synthetic language (V=8, logits a fixed random function of the prefix) through
draft sampling + acceptance and compare the output distribution of short continuations with the target's own
sampling distribution (chi-square). Seeds are fixed, so the tests are deterministic.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
from collections import Counter

import pytest
import torch
from scipy import stats

from protocol.codec import decode, encode
from protocol.messages import Verify

from workers.acceptance import (POLICIES, AcceptanceError, Confidence, Exact, TopK, Typical, accept, greedy_match,
                                make_policy, rejection_sample, sample_draft)
from workers.sampling import (SamplingError, SamplingParams, round_generator, sample_draft_q, sample_from,
                              sampling_probs, truncate)
from workers.speculation import DraftChunk, q_from_wire

V = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.lru_cache(maxsize=None)
def _logits(prefix: tuple[int, ...], which: str, scale: float = 1.5) -> torch.Tensor:
    seed = int.from_bytes(hashlib.blake2b(f"{which}:{prefix}".encode(), digest_size=4).digest(), "little")
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * scale


def target_logits(prefix):
    return _logits(tuple(prefix), "target")


def draft_logits(prefix):
    # correlated with the target (so some drafts are accepted) but different
    return 0.6 * _logits(tuple(prefix), "target") + _logits(tuple(prefix), "draft", 1.0)


def exact_distribution(n: int, params: SamplingParams) -> dict[tuple[int, ...], float]:
    out = {}
    for seq in itertools.product(range(V), repeat=n):
        prob = 1.0
        for i in range(n):
            prob *= float(sampling_probs(target_logits(seq[:i]), params.temperature, params.top_p, params.top_k)[
                seq[i]])
            if prob == 0.0:
                break
        if prob > 0:
            out[seq] = prob
    return out


def speculative_samples(n_tokens: int, samples: int, gamma: int, params: SamplingParams,
                        draft_params: SamplingParams, policy, seed: int, wire: bool = False) -> Counter:
    """``wire``: draft as the draft worker does (float32 q, ``sample_draft_q``) and send q through the codec."""
    gen = torch.Generator().manual_seed(seed)
    counts: Counter = Counter()
    draw = sample_draft_q if wire else sample_draft
    for _ in range(samples):
        out: list[int] = []
        while len(out) < n_tokens:
            drafts, q_ids, q_probs = [], [], []
            for _j in range(gamma):
                tok, ids, probs = draw(draft_logits(out + drafts), draft_params.temperature,
                                       draft_params.top_p, draft_params.top_k, gen)
                drafts.append(tok)
                q_ids.append(ids)
                q_probs.append(probs)
            if wire:
                chunk = DraftChunk(drafts, q_ids, q_probs)
                msg = decode(encode(Verify(session="s", seq=0, pos=0, tokens=drafts, **chunk.q_wire())))
                q_ids, q_probs = q_from_wire(gamma, msg.q_ids, msg.q_probs, msg.q_lens)
            logits = torch.stack([target_logits(out + drafts[:i]) for i in range(gamma + 1)])
            res = accept(policy, logits, drafts, q_ids, q_probs, params, gen)
            assert len(res.tokens) == res.accepted + 1 and res.tokens[:res.accepted] == drafts[:res.accepted]
            out += res.tokens
        counts[tuple(out[:n_tokens])] += 1
    return counts


def chi_square_p(counts: Counter, expected: dict, samples: int) -> float:
    assert set(counts) <= set(expected), "sampled a sequence the target gives probability 0"
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for seq, prob in expected.items():
        if prob * samples < 5:  # pool rare cells so the chi-square approximation holds
            pool_o += counts.get(seq, 0)
            pool_e += prob * samples
        else:
            obs.append(counts.get(seq, 0))
            exp.append(prob * samples)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    return float(stats.chisquare(obs, exp).pvalue)


def total_variation(counts: Counter, expected: dict, samples: int) -> float:
    keys = set(counts) | set(expected)
    return 0.5 * sum(abs(counts.get(k, 0) / samples - expected.get(k, 0.0)) for k in keys)


# --------------------------------------------------------------------------- losslessness at T > 0
@pytest.mark.parametrize("params,draft_params,gamma", [
    (SamplingParams(temperature=1.0), SamplingParams(temperature=1.0), 3),
    (SamplingParams(temperature=0.7, top_p=0.8), SamplingParams(temperature=1.2, top_k=5), 2),
    (SamplingParams(temperature=1.0, top_p=0.6), SamplingParams(temperature=0.0), 2),  # greedy drafter
])
@pytest.mark.slow
def test_rejection_sampling_matches_target_distribution(params, draft_params, gamma):
    samples = 3000
    counts = speculative_samples(2, samples, gamma, params, draft_params, "exact", seed=1234)
    expected = exact_distribution(2, params)
    assert chi_square_p(counts, expected, samples) > 1e-3
    assert total_variation(counts, expected, samples) < 0.06


@pytest.mark.parametrize("draft_params", [SamplingParams(temperature=1.0), SamplingParams(temperature=1.2, top_k=3)],
                         ids=["dense-q", "sparse-q"])
@pytest.mark.slow
def test_rejection_sampling_through_the_wire_matches_target_distribution(draft_params):
    """q drawn in float32, packed, encoded, decoded and unpacked: still exactly the target's distribution."""
    params = SamplingParams(temperature=0.8)
    samples = 3000
    counts = speculative_samples(2, samples, 3, params, draft_params, "exact", seed=4321, wire=True)
    expected = exact_distribution(2, params)
    assert chi_square_p(counts, expected, samples) > 1e-3
    assert total_variation(counts, expected, samples) < 0.06


@pytest.mark.slow
def test_three_token_continuation_is_lossless():
    params = SamplingParams(temperature=0.9, top_p=0.9)
    samples = 2500
    counts = speculative_samples(3, samples, 2, params, SamplingParams(temperature=1.0), "exact", seed=77)
    assert chi_square_p(counts, exact_distribution(3, params), samples) > 1e-3


@pytest.mark.slow
def test_lossy_confidence_policy_differs_measurably():
    params = SamplingParams(temperature=1.0)
    samples = 2000
    expected = exact_distribution(2, params)
    lossless = speculative_samples(2, samples, 3, params, params, "exact", seed=5)
    lossy = speculative_samples(2, samples, 3, params, params, Confidence(threshold=0.05), seed=5)
    tv_lossless = total_variation(lossless, expected, samples)
    tv_lossy = total_variation(lossy, expected, samples)
    assert tv_lossy > 0.1 > tv_lossless
    assert chi_square_p(lossy, expected, samples) < 1e-6


def test_single_position_residual_distribution_is_exact():
    # p and q disagree strongly; q is sparse (support {0, 1, 2}); output must follow p exactly.
    p = torch.tensor([[0.05, 0.05, 0.1, 0.3, 0.2, 0.1, 0.1, 0.1], [1.0 / V] * V], dtype=torch.float64)
    q_ids, q_probs = [0, 1, 2], [0.6, 0.3, 0.1]
    gen = torch.Generator().manual_seed(3)
    counts = Counter()
    n = 6000
    for _ in range(n):
        x = q_ids[sample_from(torch.tensor(q_probs), gen)]
        res = rejection_sample(p, [x], [q_ids], [q_probs], gen)
        counts[res.tokens[0]] += 1
    pval = stats.chisquare([counts[i] for i in range(V)], [float(p[0, i]) * n for i in range(V)]).pvalue
    assert pval > 1e-3


# --------------------------------------------------------------------------- exactness and shapes
def test_greedy_match_accepts_prefix_then_corrects_or_adds_bonus():
    logits = torch.full((4, V), -5.0)
    for row, tok in enumerate([3, 1, 4, 6]):
        logits[row, tok] = 5.0
    assert greedy_match(logits, [3, 1, 4]).__dict__ == {"accepted": 3, "tokens": [3, 1, 4, 6]}
    assert greedy_match(logits, [3, 2, 4]).__dict__ == {"accepted": 1, "tokens": [3, 1]}
    assert greedy_match(logits, [0, 1, 4]).__dict__ == {"accepted": 0, "tokens": [3]}
    greedy = SamplingParams()
    for name in POLICIES:  # at T=0 every policy appends the argmax after its last kept token
        res = accept(name, logits, [3, 1, 4], None, None, greedy, None)
        assert res.tokens[-1] == [3, 1, 4, 6][res.accepted]


def test_sparse_q_equals_dense_q():
    torch.manual_seed(0)
    logits = torch.randn(3, V)
    params = SamplingParams(temperature=1.0)
    q = torch.softmax(torch.randn(2, V), -1)
    q[:, 5:] = 0
    q = q / q.sum(-1, keepdim=True)
    drafts = [1, 4]
    sparse_ids = [[i for i in range(V) if q[r, i] > 0] for r in range(2)]
    sparse_probs = [[float(q[r, i]) for i in ids] for r, ids in enumerate(sparse_ids)]
    dense_ids = [list(range(V))] * 2
    dense_probs = [q[r].tolist() for r in range(2)]
    for seed in range(50):
        a = accept("exact", logits, drafts, sparse_ids, sparse_probs, params, torch.Generator().manual_seed(seed))
        b = accept("exact", logits, drafts, dense_ids, dense_probs, params, torch.Generator().manual_seed(seed))
        assert a == b


def test_same_seed_same_result_and_round_generator_is_keyed():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, seed=9)
    runs = [accept("exact", logits, [1, 2, 3], None, None, params, round_generator(9, 10)) for _ in range(2)]
    assert runs[0] == runs[1]
    a = torch.rand(4, generator=round_generator(9, 10))
    assert torch.equal(a, torch.rand(4, generator=round_generator(9, 10)))
    assert not torch.equal(a, torch.rand(4, generator=round_generator(9, 11)))
    assert not torch.equal(a, torch.rand(4, generator=round_generator(9, 10, stream=1)))


def test_sample_draft_reports_its_exact_support():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    assert sample_draft(logits, 0.0) == (0, [0], [1.0])
    gen = torch.Generator().manual_seed(0)
    tok, ids, probs = sample_draft(logits, 1.0, top_p=1.0, top_k=3, generator=gen)
    assert ids == [0, 1, 2] and tok in ids and abs(sum(probs) - 1) < 1e-9
    ref = torch.softmax(logits[:3].double(), -1).tolist()
    assert probs == pytest.approx(ref)
    tok, ids, probs = sample_draft(logits, 1.0, top_p=0.5, generator=gen)
    assert ids == [0] and probs == [1.0]  # softmax(3)=0.63 alone passes 0.5
    with pytest.raises(SamplingError, match="generator"):
        sample_draft(logits, 1.0)


@pytest.mark.parametrize("top_p,top_k,dense", [(1.0, 0, True), (0.8, 0, False), (1.0, 5, False), (1.0, 40, True)])
def test_sample_draft_q_is_the_truncated_distribution_in_float32(top_p, top_k, dense):
    logits = torch.randn(64, generator=torch.Generator().manual_seed(2)) * 2
    tok, ids, q = sample_draft_q(logits, 0.7, top_p, top_k, torch.Generator().manual_seed(0))
    assert (ids is None) == dense and q.dtype == torch.float32
    got = torch.zeros(64, dtype=torch.float64)
    if ids is None:
        got[:] = q.double()
    else:
        assert bool((ids[1:] > ids[:-1]).all())  # ascending, as on the wire
        got[ids] = q.double()
    assert torch.allclose(got, sampling_probs(logits, 0.7, top_p, top_k), atol=1e-6) and got[tok] > 0


def test_truncate_top_p_keeps_smallest_nucleus_and_top_k():
    probs = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64)
    assert truncate(probs, top_p=0.7).tolist() == pytest.approx([0, 4 / 7, 3 / 7, 0])
    assert truncate(probs, top_p=0.71).tolist() == pytest.approx([0, 4 / 9, 3 / 9, 2 / 9])
    assert truncate(probs, top_k=1).tolist() == [0, 1, 0, 0]
    assert truncate(probs, top_p=0.01, top_k=3).tolist() == [0, 1, 0, 0]


def test_lossy_policies_keep_what_they_promise():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0, 0.0, 0.0]) + 1e-9
    logits = probs.log().expand(3, V).clone()
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    assert accept(Confidence(threshold=0.149), logits, [1, 2], None, None, params, gen).accepted == 2
    assert accept(Confidence(threshold=0.151), logits, [1, 2], None, None, params, gen).accepted == 1
    assert accept(TopK(k=3), logits, [2, 3], None, None, params, gen).accepted == 1
    assert accept(TopK(k=4), logits, [2, 3], None, None, params, gen).accepted == 2
    # typical: H(p) ~ 1.33 nats -> delta*exp(-H) = 0.3*0.26 = 0.079; threshold min(0.09, 0.079)
    assert accept(Typical(), logits, [3, 4], None, None, params, gen).accepted == 1
    assert accept(Typical(epsilon=0.01), logits, [3, 4], None, None, params, gen).accepted == 2
    # after a rejection the appended token is the target's own, drawn from p (never from outside its support)
    for _ in range(20):
        res = accept(TopK(k=1), logits[:2], [4], None, None, params, gen)
        assert res.accepted == 0 and res.tokens[0] in range(5)


# --------------------------------------------------------------------------- errors
def test_unknown_policy_lists_valid_names():
    with pytest.raises(AcceptanceError) as info:
        make_policy("bogus")
    for name in ("exact", "confidence", "topk", "typical"):
        assert name in str(info.value)
    with pytest.raises(ValueError):  # AcceptanceError is a ValueError for generic handlers
        accept("nope", torch.zeros(2, V), [1], None, None, SamplingParams(), None)


@pytest.mark.parametrize("name,args,match", [
    ("confidence", {"threshold": 1.5}, "threshold"),
    ("confidence", {"threshold": "high"}, "threshold"),
    ("topk", {"k": 0}, "k must be"),
    ("typical", {"epsilon": -0.1}, "epsilon"),
    ("exact", {"threshold": 0.5}, "unknown argument"),
    ("topk", {"kk": 3}, "valid: \\['k'\\]"),
])
def test_bad_policy_args(name, args, match):
    with pytest.raises(AcceptanceError, match=match):
        make_policy(name, args)


def test_policy_args_are_applied():
    assert make_policy("confidence", {"threshold": 0.2}) == Confidence(0.2)
    assert make_policy("typical", {"epsilon": 0.1, "delta": 0.2}) == Typical(0.1, 0.2)
    assert make_policy("exact", None) == Exact()


@pytest.mark.parametrize("kw,match", [
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
])
def test_bad_sampling_params(kw, match):
    with pytest.raises(SamplingError, match=match):
        SamplingParams(**kw)


def test_malformed_chunks_are_rejected_clearly():
    logits = torch.randn(3, V)
    p1 = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    cases = [
        (torch.randn(2, V), [1, 2], None, None, "gamma\\+1"),
        (logits, [1, 2], [[1]], None, "together"),
        (logits, [1, 2], [[1]], [[1.0]], "one row per draft token"),
        (logits, [1, 2], [[1], [3]], [[1.0], [0.5]], "sum to"),
        (logits, [1, 2], [[1], [3]], [[1.0], [1.0]], "q = 0"),
        (logits, [1, 2], [[1], [2, 2]], [[1.0], [0.5, 0.5]], "duplicate"),
        (logits, [1, 2], [[1], [2, 3]], [[1.0], [1.5, -0.5]], ">= 0"),
        (logits, [1, 2], [[1], []], [[1.0], []], "non-empty"),
    ]
    for lg, drafts, qi, qp, match in cases:
        with pytest.raises(AcceptanceError, match=match):
            accept("exact", lg, drafts, qi, qp, p1, gen)
    with pytest.raises(AcceptanceError, match="generator"):
        accept("exact", logits, [1, 2], None, None, p1, None)


def test_draft_token_outside_target_vocab_is_rejected_not_crashing():
    logits = torch.randn(2, V)
    res = accept("exact", logits, [V + 3], [[V + 3]], [[1.0]], SamplingParams(temperature=1.0),
                 torch.Generator().manual_seed(0))
    assert res.accepted == 0 and 0 <= res.tokens[0] < V
    assert accept("exact", logits, [V + 3], None, None, SamplingParams(), None).accepted == 0
    assert accept("topk", logits, [V + 3], None, None, SamplingParams(), None).accepted == 0


@pytest.mark.parametrize("top_p,top_k", [(0.95, 0), (0.3, 0), (1.0, 700), (0.99, 1500), (0.5, 3)])
def test_truncate_matches_a_full_sort_when_the_nucleus_is_wide(top_p, top_k):
    probs = torch.softmax(torch.randn(3, 2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) *
                          torch.tensor([[0.5], [2.0], [6.0]], dtype=torch.float64), -1)
    ref = []
    for row in probs:
        order = torch.argsort(row, descending=True).tolist()
        kept, mass = [], 0.0
        for rank, i in enumerate(order):
            if (top_k and rank >= top_k) or (rank and mass >= top_p):
                break
            kept.append(i)
            mass += float(row[i])
        r = torch.zeros_like(row)
        r[kept] = row[kept]
        ref.append(r / r.sum())
    assert torch.allclose(truncate(probs, top_p, top_k), torch.stack(ref))
