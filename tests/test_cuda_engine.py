"""The static-shape (CUDA-graph) engine against the eager engine, the tested reference.

On CPU the same static forward runs without graphs (padding rows, padding slot, scratch column, span buckets and
GQA grouping all exercised); on a CUDA device the graphed bf16 engine is checked against the float32 CPU reference
(relative error within bf16 expectations), on its fused path and on its portable fallback. Where triton is
installed without a GPU, the fused path's ops run under triton's CPU interpreter against the portable ops. CI has
no CUDA and no triton: those tests skip.
"""
from __future__ import annotations

import copy
import random

import pytest
import torch

from tests.triton_interp import interpreter_only, run_interpreted
from workers.engine.base import EngineError, EngineInfo
from workers.engine.cuda_engine import CudaGraphEngine, FusedOps, PortableOps, make_engine, span_buckets
from workers.engine.cuda_shapes import random_model
from workers.engine.llama import ModelArgs, static_forward
from workers.engine.torch_engine import TorchEngine

ARGS = ModelArgs(vocab_size=256, dim=64, intermediate_size=128, n_layer=2, n_head=4, n_kv_head=2, head_dim=16,
                 rope_theta=10000.0, max_position_embeddings=128)
SLOTS, CTX = 4, 64
LLAMA8B_HEADS = ModelArgs(vocab_size=512, dim=512, intermediate_size=1024, n_layer=2, n_head=4, n_kv_head=1,
                          head_dim=128, rope_theta=500000.0, max_position_embeddings=4096,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def info(device: str, dtype: str, vocab: int = ARGS.vocab_size) -> EngineInfo:
    return EngineInfo(model_id="rand", vocab_size=vocab, max_context=CTX, num_slots=SLOTS,
                      eos_token_id=None, dtype=dtype, device=device)


def engines(device: str = "cpu", dtype: torch.dtype = torch.float32, graphs: bool = False,
            args: ModelArgs = ARGS, **kw) -> tuple[TorchEngine, CudaGraphEngine]:
    base = random_model(args, "cpu", torch.float32, seed=3)
    ref_model = copy.deepcopy(base)
    ref_model.setup_caches(SLOTS, CTX)
    ref = TorchEngine(ref_model, info("cpu", "float32", args.vocab_size))
    fast = make_engine(copy.deepcopy(base).to(device=device, dtype=dtype), info(device, str(dtype), args.vocab_size),
                       graphs=graphs, batch_buckets=(1, 2, 4), token_buckets=(1, 4, 8), span_step=16, **kw)
    return ref, fast


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().norm())


def script(seed: int, vocab: int = ARGS.vocab_size) -> list[tuple[str, object]]:
    """A verify-like session: ragged prefill, batched drafts of different lengths, rollbacks, re-forwards."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    steps: list[tuple[str, object]] = [("fwd", ([(0, tok(5)), (1, tok(17)), (2, tok(1))], [True, False, True]))]
    for _ in range(6):
        rows = [(s, tok(rng.randint(1, 6))) for s in rng.sample(range(3), rng.randint(1, 3))]
        steps.append(("fwd", (rows, None)))
        steps.append(("rollback", [(s, rng.randint(0, len(t))) for s, t in rows]))
    steps.append(("fwd", ([(3, tok(12))], None)))  # a long chunk: past the token buckets, runs eagerly
    steps.append(("fwd", ([(s, tok(2)) for s in range(4)], None)))
    return steps


def play(ref: TorchEngine, fast: CudaGraphEngine, steps, tol: float) -> None:
    for _ in range(SLOTS):
        assert ref.allocate() == fast.allocate()
    for kind, what in steps:
        if kind == "fwd":
            rows, last = what
            a, b = ref.forward(rows, last), fast.forward(rows, last)
            assert [x.shape for x in a] == [x.shape for x in b]
            for x, y in zip(a, b):
                assert torch.isfinite(y).all()
                assert rel_err(y, x) < tol, rel_err(y, x)
        else:
            for s, n in what:
                ref.rollback(s, n)
                fast.rollback(s, n)
        assert [ref.length(s) for s in range(SLOTS)] == [fast.length(s) for s in range(SLOTS)]


def test_span_buckets():
    assert span_buckets(64, 16) == [16, 32, 48, 64]
    assert span_buckets(50, 16) == [16, 32, 48, 50]


def test_static_forward_equals_eager_engine_on_cpu():
    ref, fast = engines()
    assert fast.buckets() == [(b, t) for b in (1, 2, 4) for t in (1, 4, 8)]
    play(ref, fast, script(0), tol=1e-5)


def test_padding_never_touches_other_slots():
    """Dummy rows write only into the padding slot; a short row's padding only past its own length."""
    _, fast = engines()
    for _ in range(SLOTS):
        fast.allocate()
    fast.forward([(1, [3, 4, 5]), (2, [6])])  # B=2 T=4 bucket: padding tokens in both rows
    fast.forward([(0, [7, 8, 9])])  # B=1: no dummy rows
    fast.forward([(3, [1]), (0, [2]), (1, [3])])  # B=3 -> bucket 4: one dummy row
    k = fast.kv[0][0]
    assert k.shape[0] == SLOTS + 1 and k.shape[1] % 256 == 0 and k.shape[1] >= CTX + 8
    assert k[1, :4].abs().sum(-1).min() > 0 and k[2, :1].abs().sum() > 0
    assert k[3, 1:].abs().sum() == 0  # slot 3 got one token; nothing else wrote there
    assert k[SLOTS, :4].abs().sum() > 0  # the padding slot took the dummy rows


def test_shapes_and_errors():
    _, fast = engines()
    assert fast.shape_for(3, 2, 20) == (4, 4, 32, False)
    assert fast.shape_for(5, 2, 20) == (5, 2, 32, False)  # more rows than any bucket: eager, exact shape
    s = fast.allocate()
    with pytest.raises(EngineError, match="context overflow"):
        fast.forward([(s, [1] * (CTX + 1))])
    with pytest.raises(EngineError, match="out of range"):
        fast.forward([(s, [ARGS.vocab_size])])
    assert fast.length(s) == 0
    with pytest.raises(EngineError, match="CUDA"):
        make_engine(random_model(ARGS, "cpu", torch.float32), info("cpu", "float32"), graphs=True)
    assert fast.path == "portable" and fast.flash_layout is None and "needs CUDA" in fast.why_portable
    assert fast.attention_for(1) == fast.attention_for(12) == "sdpa"


def test_graph_shapes_ignore_the_span_on_the_fused_path():
    """Flash and the split kernel read each row's length at run time: one graph per (B, T), captured up front,
    serves every context; the gather + SDPA path needs one per span too."""
    _, fast = engines()
    n_bt = len([b for b in fast.batch_buckets if b <= SLOTS]) * len(fast.token_buckets)
    assert not fast.span_free and len(fast.default_shapes()) == n_bt * len(fast.spans)
    fast.path = "fused"  # as on a CUDA device where its kernels check out (only the shape logic is exercised here)
    assert fast.span_free
    assert fast.attention_for(1) == fast.attention_for(8) == "split"  # verify rows, up to the largest token bucket
    assert fast.attention_for(9) == "flash"  # prefill rows
    assert fast.shape_for(3, 2, 20)[:3] == fast.shape_for(3, 2, 60)[:3] == (4, 4, fast.spans[-1])
    assert sorted(fast.default_shapes()) == sorted((b, t, fast.spans[-1]) for b in (1, 2, 4)
                                                   for t in fast.token_buckets)
    assert fast.capture() == 0  # no graphs on CPU: nothing to capture


def fused_vs_portable() -> tuple[float, float]:
    """(logits, cache) largest relative difference between the fused path's ops (Triton glue, split-KV attention)
    and the portable ops, through ``static_forward`` from the same cache: verify steps of T = 1 and 4, rows at
    different lengths in shuffled slots, a dummy row on the padding slot. Float32; runs wherever triton does."""
    _, fast = engines()
    for _ in range(SLOTS):
        fast.allocate()
    fast.forward([(0, list(range(1, 20))), (1, list(range(5, 12))), (2, [3]), (3, list(range(30, 60)))])
    n_slots, cols = fast.kv[0][0].shape[:2]
    a, g = fast.model.args, torch.Generator().manual_seed(0)
    worst_logits = worst_cache = 0.0
    for T in (1, 4):
        slots = torch.tensor([2, 0, 3, SLOTS])
        start = torch.tensor([fast.length(2), fast.length(0), fast.length(3), 0])
        tokens = torch.randint(0, a.vocab_size, (4, T), generator=g)
        span = fast.shape_for(4, T, int(start.max()) + T)[2]
        caches = [[tuple(t.clone() for t in kv) for kv in fast.kv] for _ in range(2)]
        with torch.inference_mode():
            want = static_forward(fast.model, caches[0], tokens, PortableOps(fast.rope, slots, start, T, span, cols,
                                                                              a.n_head, a.n_kv_head, torch.float32))
            got = static_forward(fast.model, caches[1], tokens, FusedOps(fast.rope, slots, start, T, a.n_head, span,
                                                                          None, cols, n_slots))
        worst_logits = max(worst_logits, float((got - want).norm() / want.norm()))
        for (k0, v0), (k1, v1) in zip(*caches):
            worst_cache = max(worst_cache, float((k1 - k0).norm() / k0.norm()), float((v1 - v0).norm() / v0.norm()))
    return worst_logits, worst_cache


@interpreter_only
@pytest.mark.slow
def test_fused_ops_match_portable_ops_in_triton_interpreter():
    """The fused path's wiring (rope + cache writes, add + norm, silu * up, split attention) computes what the
    portable path computes, through the one static forward."""
    out = run_interpreted("from test_cuda_engine import fused_vs_portable\nprint(*fused_vs_portable())\n")
    logits_err, cache_err = map(float, out.split()[-2:])
    assert logits_err < 1e-5 and cache_err < 1e-5, (logits_err, cache_err)


def test_load_engine_cuda_backend_from_hf_dir(tmp_path):
    """``load_engine(backend="cuda")`` reads an HF directory; on CPU it serves the static forward without graphs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.engine import load_engine

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    ref = load_engine(tmp_path, slots=2, max_context=48)
    fast = load_engine(tmp_path, slots=2, max_context=48, backend="cuda")
    assert isinstance(fast, CudaGraphEngine) and not fast.graphs and fast.info.max_context == 48
    for e in (ref, fast):
        e.allocate()
    a = ref.forward([(0, [1, 2, 3, 4, 5])])[0]
    b = fast.forward([(0, [1, 2, 3, 4, 5])])[0]
    assert rel_err(b, a) < 1e-5


@cuda
def test_cuda_graphs_bf16_match_float32_cpu_reference():
    ref, fast = engines("cuda", torch.bfloat16, graphs=True)
    play(ref, fast, script(1), tol=3e-2)
    assert fast._buckets, "no graph was captured"


@cuda
def test_cuda_graphs_llama8b_head_layout_fused_path_match_reference():
    """Llama-3-8B head grouping (G=4, head_dim 128) and rope scaling, few layers: bf16 graphs on the fused path
    (Triton glue, split-KV attention for verify rows, flash for the longer rows) against the float32 CPU
    reference."""
    ref, fast = engines("cuda", torch.bfloat16, graphs=True, args=LLAMA8B_HEADS)
    assert fast.path == "fused" and fast.flash_layout in ("paged", "offsets"), fast.why_portable
    play(ref, fast, script(2, LLAMA8B_HEADS.vocab_size), tol=3e-2)


@cuda
def test_cuda_bf16_falls_back_to_the_portable_path_when_a_kernel_fails_its_check(monkeypatch):
    """A fused-path kernel that disagrees with plain math at engine start sends the engine to the portable path
    (torch glue, gather + SDPA), which still matches the reference."""
    from workers.engine import cuda_fused

    monkeypatch.setattr(cuda_fused, "self_check", lambda *a, **k: "mismatch (forced)")
    ref, fast = engines("cuda", torch.bfloat16, graphs=True, args=LLAMA8B_HEADS)
    assert fast.path == "portable" and fast.why_portable == "fused glue: mismatch (forced)"
    play(ref, fast, script(4, LLAMA8B_HEADS.vocab_size), tol=3e-2)


@cuda
def test_cuda_float32_uses_portable_path():
    ref, fast = engines("cuda", torch.float32, graphs=True)
    assert fast.path == "portable" and "bf16/fp16" in fast.why_portable
    play(ref, fast, script(3), tol=2e-3)  # TF32 may be on for float32 matmuls


def test_buckets_whose_logits_outgrow_the_budget_run_eagerly(monkeypatch):
    """Graphs keep a logits buffer per (B, T): with a big vocabulary the largest buckets would hold gigabytes, so
    shapes past ``GRAPH_LOGITS_BYTES`` leave the graph set and run eagerly at their exact size."""
    import workers.engine.cuda_engine as ce

    _, fast = engines()
    per_row_token = ARGS.vocab_size * fast.model.output.weight.element_size()
    monkeypatch.setattr(ce, "GRAPH_LOGITS_BYTES", 8 * per_row_token)  # B x T <= 8 stays on graphs
    assert sorted(fast.buckets()) == [(1, 1), (1, 4), (1, 8), (2, 1), (2, 4), (4, 1)]
    assert all(b * t <= 8 for b, t, _ in fast.default_shapes())
    fast.graphs = True  # the shape logic as on a CUDA device
    assert fast.shape_for(2, 3, 20)[3] is True and fast.shape_for(2, 3, 20)[:2] == (2, 4)
    assert fast.shape_for(4, 3, 20) == (4, 3, fast.shape_for(4, 3, 20)[2], False)  # (4, 4) is over: exact, eager
