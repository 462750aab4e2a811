"""Function-preserving growth (workers/engine/grow.py): a grown model computes what the small one computes.

float32 on CPU: logits within 1e-4 and identical greedy tokens on the held-out prompts, through HF transformers
and through our engine (from a written directory and grown in memory); zeros only where the function needs them;
the 8B / 1B shapes on the meta device; the ``specmq model grow`` CLI and ``--grow`` end to end.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from workers.engine import load_engine  # noqa: E402
from workers.engine.grow import (GrowError, grow_state_dict, head_dim_map, parameter_count, plan_growth,  # noqa: E402
                                 read_state_dict, write_grown)
from workers.engine.llama import ModelArgs, Transformer, rope_inv_freq  # noqa: E402
from workers.engine.model_dir import read_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET, DRAFT = ROOT / "models" / "tiny-target", ROOT / "models" / "tiny-draft"
PROMPTS = [p for p in (ROOT / "examples" / "prompts.txt").read_text().splitlines() if p.strip()]
ATOL = 1e-4
NEW_TOKENS = 24
# the shipped target (hidden 384, 10 layers, 6 MHA heads x 64, MLP 1024) x2 wide, +2 layers, head dim 128, GQA
WIDE = dict(hidden=768, layers=12, heads=16, kv_heads=8, head_dim=128, intermediate=2048)
# the shipped draft (hidden 128, 2 layers, 4 MHA heads x 32, MLP 384) grown a little: fast, for the CLI
DRAFT_SHAPE = "hidden=256,layers=3,heads=8,kv_heads=4,head_dim=64,intermediate=768"
LLAMA_31_8B_PARAMS = 8_030_261_248  # meta-llama/Llama-3.1-8B: vocab 128256, untied lm_head
LLAMA_32_1B_PARAMS = 1_235_814_400  # meta-llama/Llama-3.2-1B: vocab 128256, tied


def prompt_ids(model_dir: Path) -> list[list[int]]:
    from workers.tokenizer_text import encode, load_tokenizer

    tok = load_tokenizer(model_dir)
    return [encode(tok, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def grown_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grown") / "tiny-target-wide"
    write_grown(TARGET, WIDE, out, dtype="float32")
    return out


@pytest.fixture(scope="module")
def small_hf() -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(TARGET, dtype=torch.float32).eval()


def engine_greedy(engine, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Prompt logits and greedy continuations through the engine interface: every prompt in one batched prefill,
    then one batched forward a token."""
    slots = [engine.allocate() for _ in prompts]
    try:
        logits = engine.forward(list(zip(slots, prompts)))
        outs = [[int(x[-1].argmax())] for x in logits]
        while len(outs[0]) < NEW_TOKENS:
            step = engine.forward([(s, [o[-1]]) for s, o in zip(slots, outs)])
            for o, x in zip(outs, step):
                o.append(int(x[-1].argmax()))
        return logits, outs
    finally:
        for s in slots:
            engine.free(s)


@pytest.fixture(scope="module")
def small_greedy() -> tuple[list[torch.Tensor], list[list[int]]]:
    return engine_greedy(load_engine(TARGET, slots=len(PROMPTS)), prompt_ids(TARGET))


# ----------------------------------------------------------------------------------------------- the placement
def test_rope_pairs_keep_their_frequencies():
    dims = head_dim_map(64, 128)
    assert dims.tolist() == [2 * j for j in range(32)] + [2 * j + 64 for j in range(32)]
    small, big = rope_inv_freq(64, 10000.0, None), rope_inv_freq(128, 10000.0, None)
    # small pair (j, j+32) lands on big pair (2j, 2j+64): the same frequency
    assert torch.allclose(big[dims[:32]], small, rtol=1e-6)
    assert (dims[32:] - dims[:32] == 64).all()


def test_named_shapes_are_the_profiled_shapes():
    from workers.engine.cuda_shapes import SHAPES as PROFILED
    from workers.engine.grow import SHAPES

    for name, s in SHAPES.items():
        a = PROFILED[name]
        assert (s.hidden_size, s.num_hidden_layers, s.num_attention_heads, s.num_key_value_heads, s.head_dim,
                s.intermediate_size) == (a.dim, a.n_layer, a.n_head, a.n_kv_head, a.head_dim, a.intermediate_size)


def test_grown_config_shape_and_scales():
    _, cfg = read_config(TARGET)
    g = plan_growth(cfg, WIDE)
    assert g.config["hidden_size"] == 768 and g.config["num_key_value_heads"] == 8 and g.config["head_dim"] == 128
    assert g.config["vocab_size"] == 8192 and g.config["tie_word_embeddings"] is True
    assert g.config["rope_parameters"] == cfg["rope_parameters"]
    assert g.config["rms_norm_eps"] == pytest.approx(cfg["rms_norm_eps"] * 384 / 768)
    # MHA -> GQA (G = 2): small head i on big head 2i, i.e. alone with big KV head i
    assert (g.q_rows.view(6, 64) // 128)[:, 0].tolist() == [0, 2, 4, 6, 8, 10]
    assert (g.kv_rows.view(6, 64) // 128)[:, 0].tolist() == list(range(6))


@pytest.mark.slow
def test_zeros_only_where_the_function_needs_them():
    _, cfg = read_config(TARGET)
    sd, _ = grow_state_dict(read_state_dict(TARGET), cfg, WIDE)
    g = plan_growth(cfg, WIDE)
    d, inter = 384, 1024
    nonzero = lambda t: bool((t != 0).float().mean() > 0.999)  # noqa: E731  (random: an exact 0 is rare)
    zero = lambda t: bool((t == 0).all())  # noqa: E731
    emb = sd["model.embed_tokens.weight"]
    assert zero(emb[:, d:]) and "lm_head.weight" not in sd  # the residual stream is zero past d; lm_head tied
    p = "model.layers.0."
    q, k, v = (sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
    o, down = sd[p + "self_attn.o_proj.weight"], sd[p + "mlp.down_proj.weight"]
    assert zero(q[g.q_pad_rows, :d])  # q's padded head dims see nothing
    assert nonzero(q[g.q_pad_rows, d:]) and nonzero(q[:, d:])  # ...and multiply zero inputs elsewhere: random
    added_heads = torch.ones(q.shape[0], dtype=torch.bool)
    added_heads[torch.cat([g.q_rows, g.q_pad_rows])] = False
    assert nonzero(q[added_heads])  # added query heads: random
    assert nonzero(k[:, d:]) and nonzero(v[:, d:]) and nonzero(k[6 * 128:])  # k, v columns past d, added KV heads
    pad_k = torch.ones(k.shape[0], dtype=torch.bool)
    pad_k[g.kv_rows] = False
    assert nonzero(k[pad_k])  # k's padded head dims: random (q is zero there)
    assert zero(o[d:]) and (o != 0).sum() == (o[:d, g.q_rows] != 0).sum()  # o_proj: only the placed block
    assert nonzero(sd[p + "mlp.gate_proj.weight"][:, d:]) and nonzero(sd[p + "mlp.up_proj.weight"][inter:])
    assert zero(down[d:]) and zero(down[:, inter:])
    added = "model.layers.11."  # an added layer: o_proj and down_proj zero, the rest random
    assert zero(sd[added + "self_attn.o_proj.weight"]) and zero(sd[added + "mlp.down_proj.weight"])
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert nonzero(sd[added + name + ".weight"])


# ----------------------------------------------------------------------------------------------- same function
@pytest.mark.slow  # a 120M-parameter model in float32 on CPU
def test_hf_grown_model_matches_the_small_one(grown_dir, small_hf, small_greedy):
    """Each prompt with the small model's greedy continuation, teacher-forced: equal argmax at every position is
    equal greedy output (one forward each instead of a generate loop)."""
    big = LlamaForCausalLM.from_pretrained(grown_dir, dtype=torch.float32).eval()
    assert big.config.hidden_size == 768 and big.config.num_hidden_layers == 12
    assert big.lm_head.weight.data_ptr() == big.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        for ids, cont in zip(prompt_ids(TARGET), small_greedy[1]):
            seq = ids + cont  # the small model's greedy continuation (the engine's; checked below against HF's)
            a, b = small_hf(torch.tensor([seq])).logits[0], big(torch.tensor([seq])).logits[0]
            assert (a - b).abs().max() < ATOL
            assert b[len(ids) - 1:-1].argmax(-1).tolist() == seq[len(ids):]
            assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.slow  # a 120M-parameter model in float32 on CPU
@pytest.mark.parametrize("how", ["directory", "in_memory"])
def test_engine_grown_model_matches_the_small_one(grown_dir, small_greedy, how):
    n = len(PROMPTS)
    big = load_engine(grown_dir, slots=n) if how == "directory" else load_engine(TARGET, slots=n, grow=WIDE)
    assert big.model.args.dim == 768 and big.model.args.n_kv_head == 8 and big.model.args.head_dim == 128
    assert big.info.tokenizer_fingerprint == load_engine(TARGET, slots=1).info.tokenizer_fingerprint
    if how == "in_memory":
        assert big.info.model_id == "tiny-target@custom"
    logits, tokens = engine_greedy(big, prompt_ids(TARGET))
    assert tokens == small_greedy[1]
    for a, b in zip(small_greedy[0], logits):
        assert (a - b).abs().max() < ATOL


def test_gqa_untied_llama3_rope_model_grows(tmp_path):
    """Paths the shipped pair does not take: KV groups of 2 query heads, an untied lm_head, llama3 RoPE scaling."""
    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
                      rope_parameters=rope)
    small = LlamaForCausalLM(cfg).eval()
    small.save_pretrained(tmp_path / "small")
    shape = dict(hidden=192, layers=3, heads=12, kv_heads=3, head_dim=32, intermediate=200)
    write_grown(tmp_path / "small", shape, tmp_path / "big", dtype="float32")
    big = LlamaForCausalLM.from_pretrained(tmp_path / "big", dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (small(ids).logits - big(ids).logits).abs().max() < ATOL
    engine = load_engine(tmp_path / "small", slots=1, grow=shape)
    ref = load_engine(tmp_path / "small", slots=1)
    row = [ids[0].tolist()]
    assert (engine_greedy(engine, row)[0][0] - engine_greedy(ref, row)[0][0]).abs().max() < ATOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_grown_in_memory_matches_the_small_one(small_greedy):
    """The CUDA-graph engine (float32, so argmax ties do not flip) on a model grown on the GPU."""
    n = len(PROMPTS)
    big = load_engine(TARGET, slots=n, backend="cuda", device="cuda", dtype="float32", grow=WIDE)
    logits, tokens = engine_greedy(big, prompt_ids(TARGET))
    assert tokens == small_greedy[1]
    for a, b in zip(small_greedy[0], logits):
        assert (a - b.cpu()).abs().max() < ATOL


# ----------------------------------------------------------------------------------------------- the big shapes
@pytest.mark.parametrize("source,shape,real,real_vocab_params", [
    (TARGET, "llama-3.1-8b", LLAMA_31_8B_PARAMS, 2 * 128256 * 4096),
    (DRAFT, "llama-3.2-1b", LLAMA_32_1B_PARAMS, 128256 * 2048),
])
def test_8b_and_1b_shapes_on_meta(source, shape, real, real_vocab_params):
    _, cfg = read_config(source)
    sd, big_cfg = grow_state_dict(read_state_dict(source), cfg, shape, device="meta")
    n = sum(t.numel() for t in sd.values())
    hidden = big_cfg["hidden_size"]
    expected = real - real_vocab_params + 8192 * hidden  # the real body with our (tied) 8192-entry embedding
    print(f"{source.name} grown to {shape}: {n:,} parameters ({n / 1e9:.3f} B; {n * 2 / 1e9:.2f} GB in bf16), "
          f"the real model's body + a tied 8192 x {hidden} embedding: {expected:,}")
    assert abs(n - expected) / expected < 0.01
    assert n == parameter_count(plan_growth(cfg, shape).big, 8192, tied=True)
    with torch.device("meta"):  # the state dict fits a model built from the grown config, tensor for tensor
        model = Transformer(ModelArgs.from_hf_config(big_cfg))
    from workers.engine.llama import layer_from_hf

    args = model.args
    for i in range(args.n_layer):
        model.layers[i].load_state_dict(layer_from_hf(sd.pop, i, args), strict=True, assign=True)
    assert sd["model.embed_tokens.weight"].shape == model.tok_embeddings.weight.shape


@pytest.mark.parametrize("shape,match", [
    ("llama-9b", "unknown"),
    ("hidden=256,layers=3", "missing"),
    ("hidden=256,layers=3,heads=8,kv_heads=4,head_dim=64,intermediate=768,width=3", "width"),
    ("hidden=64,layers=3,heads=8,kv_heads=4,head_dim=64,intermediate=768", "hidden_size 64 <"),
    ("hidden=256,layers=3,heads=8,kv_heads=4,head_dim=48,intermediate=768", "multiple"),
    ("hidden=256,layers=3,heads=8,kv_heads=2,head_dim=64,intermediate=768", "num_key_value_heads 2 <"),
    ("hidden=256,layers=3,heads=4,kv_heads=4,head_dim=64,intermediate=768,layers=1", "num_hidden_layers 1 <"),
    ("hidden=260,layers=3,heads=8,kv_heads=4,head_dim=64,intermediate=768", "multiple of num_attention_heads"),
])
def test_impossible_growths_say_why(shape, match):
    _, cfg = read_config(DRAFT)
    with pytest.raises(GrowError, match=match):
        plan_growth(cfg, shape)


# ----------------------------------------------------------------------------------------------- the CLI
def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from specmq.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
def test_cli_model_grow_end_to_end(tmp_path, capsys):
    out = tmp_path / "draft-grown"
    rc, stdout, _ = run_cli(["model", "grow", "--from", str(DRAFT), "--shape", DRAFT_SHAPE, "--out", str(out),
                             "--dtype", "float32", "--json"], capsys)
    assert rc == 0
    report = json.loads(stdout)
    assert report["parameters"] == sum(t.numel() for t in read_state_dict(out).values())
    assert report["weight_bytes"] == 4 * report["parameters"] and report["vocab_size"] == 8192
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    small, big = load_engine(DRAFT, slots=len(PROMPTS)), load_engine(out, slots=len(PROMPTS))
    assert big.model.args.dim == 256 and big.model.args.n_layer == 3
    assert engine_greedy(big, prompt_ids(DRAFT))[1] == engine_greedy(small, prompt_ids(DRAFT))[1]
    # a second write into the same directory: refused in one line, exit 1
    rc, _, err = run_cli(["model", "grow", "--from", str(DRAFT), "--shape", DRAFT_SHAPE, "--out", str(out)], capsys)
    assert rc == 1 and "not empty" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_sharded_directory_loads_everywhere(tmp_path, monkeypatch):
    """Shards are whole parts (embedding, layers, final norm) with an index, as HF writes them."""
    import workers.engine.grow as grow

    monkeypatch.setattr(grow, "SHARD_BYTES", 6 << 20)
    report = write_grown(DRAFT, DRAFT_SHAPE, tmp_path / "g", dtype="float32")
    shards = sorted(p.name for p in (tmp_path / "g").glob("model-*.safetensors"))
    assert len(shards) > 2 and shards == [f for f in report.files if f.startswith("model-")]
    index = json.loads((tmp_path / "g" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards) and index["metadata"]["total_size"] == report.weight_bytes
    ids = prompt_ids(DRAFT)
    small, big = load_engine(DRAFT, slots=len(ids)), load_engine(tmp_path / "g", slots=len(ids))
    assert engine_greedy(big, ids)[1] == engine_greedy(small, ids)[1]
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "g", dtype=torch.float32).eval()
    ref = LlamaForCausalLM.from_pretrained(DRAFT, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(torch.tensor([ids[0]])).logits - ref(torch.tensor([ids[0]])).logits).abs().max() < ATOL


def test_cli_model_grow_config_and_errors(tmp_path, capsys):
    cfg = tmp_path / "grow.yaml"
    cfg.write_text(f"from: {DRAFT}\nout: {tmp_path / 'g'}\ndtype: float32\n"
                   "shape: {hidden: 192, layers: 2, heads: 4, kv_heads: 4, head_dim: 32, intermediate: 384}\n")
    rc, stdout, _ = run_cli(["model", "grow", "--config", str(cfg)], capsys)
    assert rc == 0 and "192" in stdout and "vocabulary 8192" in stdout
    assert json.loads((tmp_path / "g" / "config.json").read_text())["hidden_size"] == 192
    rc, _, err = run_cli(["model", "grow", "--from", str(DRAFT), "--shape", "llama-3.1-8b"], capsys)
    assert rc == 1 and "--out is required" in err
    rc, _, err = run_cli(["model", "grow", "--from", str(tmp_path / "nowhere"), "--shape", "llama-3.1-8b",
                          "--out", str(tmp_path / "x")], capsys)
    assert rc == 1 and "does not exist" in err
    rc, _, err = run_cli(["model", "grow", "--from", str(TARGET), "--shape", DRAFT_SHAPE, "--out",
                          str(tmp_path / "y")], capsys)
    assert rc == 1 and "growth only adds" in err and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_verify_grow_flag_gives_the_same_tokens(capsys):
    argv = ["verify", "--model", str(DRAFT), "--prompt", PROMPTS[0], "--max-new-tokens", "16", "--json"]
    rc, plain, _ = run_cli(argv, capsys)
    assert rc == 0
    rc, grown, _ = run_cli(argv + ["--grow", DRAFT_SHAPE], capsys)
    assert rc == 0
    a, b = json.loads(plain), json.loads(grown)
    assert a["token_ids"] == b["token_ids"] and b["model"] == "tiny-draft@custom"
    rc, _, err = run_cli(argv + ["--grow", "llama-9b"], capsys)
    assert rc == 1 and "unknown" in err


def test_target_and_fused_refuse_a_bad_grow_shape_in_one_line(capsys):
    """``--grow`` reaches the engine loader before any broker is contacted: a bad shape is a one-line exit 1."""
    rc, _, err = run_cli(["target", "--model", str(DRAFT), "--grow", "hidden=64,layers=1"], capsys)
    assert rc == 1 and "missing" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(["fused", "--target-model", str(DRAFT), "--draft-model", str(DRAFT), "--draft-grow",
                          "llama-9b"], capsys)
    assert rc == 1 and "draft model" in err and "unknown" in err


@pytest.mark.slow  # a benchmark, on CPU with a small shape: checks its plumbing, not its timings
def test_grow_cost_bench_runs_on_cpu(capsys):
    rc, stdout, _ = run_cli(["bench", "grow_cost", "--device", "cpu", "--dtype", "float32", "--source", str(DRAFT),
                             "--shape", DRAFT_SHAPE, "--points", "1x1,2x3", "--contexts", "16", "--reps", "2",
                             "--json"], capsys)
    assert rc == 0
    lines = [json.loads(x) for x in stdout.splitlines()]
    head, rows = lines[0]["header"], lines[1:]
    assert head["argmax_agreement"] == 1.0  # float32: the grown model's argmax is the small one's everywhere
    assert head["grown_weight_bytes"] == head["random_weight_bytes"] and 0 < head["grown_zero_share"] < 1
    assert [(r["batch"], r["tokens"]) for r in rows] == [(1, 1), (2, 3)] and all(r["ratio"] > 0 for r in rows)
