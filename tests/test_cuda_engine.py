"""The static-shape (CUDA-graph) engine against the eager engine, the tested reference.

On CPU the same static forward runs without graphs (padding rows, padding slot, scratch column, span buckets and
GQA grouping all exercised); on a CUDA device the graphed bf16 engine is checked against the float32 CPU reference
(relative error within bf16 expectations). CI has no CUDA: the GPU tests skip.
"""
from __future__ import annotations

import copy
import random

import pytest
import torch

from workers.engine.base import EngineError, EngineInfo
from workers.engine.cuda_engine import CudaGraphEngine, make_engine, span_buckets
from workers.engine.cuda_shapes import random_model
from workers.engine.llama import ModelArgs
from workers.engine.torch_engine import TorchEngine

ARGS = ModelArgs(vocab_size=256, dim=64, intermediate_size=128, n_layer=2, n_head=4, n_kv_head=2, head_dim=16,
                 rope_theta=10000.0, max_position_embeddings=128)
SLOTS, CTX = 4, 64
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def info(device: str, dtype: str) -> EngineInfo:
    return EngineInfo(model_id="rand", vocab_size=ARGS.vocab_size, max_context=CTX, num_slots=SLOTS,
                      eos_token_id=None, dtype=dtype, device=device)


def engines(device: str = "cpu", dtype: torch.dtype = torch.float32, graphs: bool = False,
            args: ModelArgs = ARGS, **kw) -> tuple[TorchEngine, CudaGraphEngine]:
    base = random_model(args, "cpu", torch.float32, seed=3)
    ref_model = copy.deepcopy(base)
    ref_model.setup_caches(SLOTS, CTX)
    ref = TorchEngine(ref_model, info("cpu", "float32"))
    fast = make_engine(copy.deepcopy(base).to(device=device, dtype=dtype), info(device, str(dtype)), graphs=graphs,
                       batch_buckets=(1, 2, 4), token_buckets=(1, 4, 8), span_step=16, **kw)
    return ref, fast


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().norm())


def script(seed: int) -> list[tuple[str, object]]:
    """A verify-like session: ragged prefill, batched drafts of different lengths, rollbacks, re-forwards."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(ARGS.vocab_size) for _ in range(n)]  # noqa: E731
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
    assert fast.attn == "sdpa"
    with pytest.raises(EngineError, match="fuse"):
        engines(fuse="bogus")
    with pytest.raises(EngineError, match="verify_attn"):
        engines(verify_attn="bogus")


def test_graph_shapes_ignore_the_span_on_flash_paths():
    """Flash and the split kernel read each row's length at run time: one graph per (B, T), captured up front,
    serves every context; the gather + SDPA path needs one per span too."""
    _, fast = engines()
    n_bt = len([b for b in fast.batch_buckets if b <= SLOTS]) * len(fast.token_buckets)
    assert not fast.span_free and len(fast.default_shapes()) == n_bt * len(fast.spans)
    fast.attn = "offsets"  # as on a CUDA device with flash (only the shape logic is exercised here)
    assert fast.span_free
    assert fast.shape_for(3, 2, 20)[:3] == fast.shape_for(3, 2, 60)[:3] == (4, 4, fast.spans[-1])
    assert sorted(fast.default_shapes()) == sorted((b, t, fast.spans[-1]) for b in (1, 2, 4)
                                                   for t in fast.token_buckets)
    assert fast.capture() == 0  # no graphs on CPU: nothing to capture


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
@pytest.mark.parametrize("fuse,verify_attn", [("triton", "split"), ("triton", "flash"),
                                               ("hoist", "flash"), ("off", "flash")])
def test_cuda_graphs_llama8b_head_layout_flash_match_reference(fuse, verify_attn):
    """Llama-3-8B head grouping (G=4, head_dim 128) and rope scaling, few layers: bf16 graphs on the paged flash
    path against the float32 CPU reference, with each glue variant (fused Triton kernels, unfused) and each
    attention kernel (Triton split-KV, flash)."""
    global ARGS
    saved = ARGS
    ARGS = ModelArgs(vocab_size=512, dim=512, intermediate_size=1024, n_layer=2, n_head=4, n_kv_head=1,
                     head_dim=128, rope_theta=500000.0, max_position_embeddings=4096,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    try:
        ref, fast = engines("cuda", torch.bfloat16, graphs=True, args=ARGS, fuse=fuse, verify_attn=verify_attn)
        from workers.engine.cuda_engine import FLASH_ERRORS
        assert fast.attn in ("paged", "offsets"), FLASH_ERRORS
        assert fast.fuse == fuse, FLASH_ERRORS
        assert fast.verify_attn == (verify_attn if fuse == "triton" else "flash"), FLASH_ERRORS
        assert fast.use_split(2, 4) == fast.use_split(2, 1) == (fast.verify_attn == "split")
        assert fast.token_rows or fuse == "off", FLASH_ERRORS
        play(ref, fast, script(2), tol=3e-2)
    finally:
        ARGS = saved


@cuda
def test_cuda_float32_uses_portable_path():
    ref, fast = engines("cuda", torch.float32, graphs=True)
    assert fast.attn == "sdpa"
    play(ref, fast, script(3), tol=2e-3)  # TF32 may be on for float32 matmuls


@cuda
def test_skinny_gemm_matches_cublas():
    from workers.engine.cuda_gemm import CONFIGS, SkinnyLinear, skinny_linear

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn((1000, 512), generator=g, device="cuda").to(torch.bfloat16)
    for M in (2, 5, 17, 64):
        x = torch.randn((M, 512), generator=g, device="cuda").to(torch.bfloat16)
        ref = torch.nn.functional.linear(x.float(), w.float())
        for cfg in CONFIGS:
            assert rel_err(skinny_linear(x, w, cfg), ref) < 1e-2
    lin = torch.nn.Linear(512, 1000, bias=False, device="cuda", dtype=torch.bfloat16)
    sk = SkinnyLinear()
    x = torch.randn((3, 4, 512), generator=g, device="cuda").to(torch.bfloat16)
    assert rel_err(sk(x, lin), lin(x).float()) < 1e-2 and sk.log and sk.log[0]["M"] == 12
