"""The torch engine against HF LlamaForCausalLM (float32, CPU): logits, batching, chunking, rollback, errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from workers.engine import EngineError, NoFreeSlot, load_engine, tokenizer_fingerprint  # noqa: E402
from workers.engine.llama import weight_files  # noqa: E402

VOCAB = 128
ATOL = 1e-4


def make_llama(path: Path, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    make_llama(path, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}, "version": "1.0"}))
    return path


@pytest.fixture(scope="module")
def hf_model(llama_dir) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


@pytest.fixture()
def engine(llama_dir):
    return load_engine(llama_dir, slots=4, max_context=64)


def seq(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0].float()


def test_info(engine, llama_dir):
    info = engine.info
    assert (info.vocab_size, info.max_context, info.num_slots) == (VOCAB, 64, 4)
    assert info.eos_token_id == 2 and info.eos_token_ids == (2,)
    assert info.dtype == "float32" and info.device == "cpu"
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(llama_dir) and len(info.tokenizer_fingerprint) == 16
    assert engine.buckets() is None


def test_logits_match_hf(engine, hf_model):
    tokens = seq(40, 1)
    slot = engine.allocate()
    out = engine.forward([(slot, tokens)])[0]
    assert out.dtype == torch.float32 and out.shape == (40, VOCAB)
    torch.testing.assert_close(out, hf_logits(hf_model, tokens), atol=ATOL, rtol=0)
    assert engine.length(slot) == 40


def test_batched_rows_at_different_positions_equal_one_at_a_time(llama_dir, hf_model):
    prompts = [seq(n, 10 + i) for i, n in enumerate([7, 1, 20, 12])]
    news = [seq(n, 20 + i) for i, n in enumerate([3, 5, 1, 4])]
    batched = load_engine(llama_dir, slots=4, max_context=64)
    single = load_engine(llama_dir, slots=4, max_context=64)
    bslots = [batched.allocate() for _ in prompts]
    sslots = [single.allocate() for _ in prompts]
    # prefill in one ragged batch, slots out of order, last_only mixed
    order = [2, 0, 3, 1]
    rows = [(bslots[i], prompts[i]) for i in order]
    out = batched.forward(rows, last_only=[True, False, True, False])
    for (i, o, lo) in zip(order, out, [True, False, True, False]):
        full = hf_logits(hf_model, prompts[i])
        torch.testing.assert_close(o, full[-1:] if lo else full, atol=ATOL, rtol=0)
        single.forward([(sslots[i], prompts[i])])
    # append different numbers of tokens to rows at different positions
    out = batched.forward([(bslots[i], news[i]) for i in order])
    for i, o in zip(order, out):
        ref = single.forward([(sslots[i], news[i])])[0]
        assert o.shape == (len(news[i]), VOCAB)
        torch.testing.assert_close(o, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(o, hf_logits(hf_model, prompts[i] + news[i])[-len(news[i]):], atol=ATOL, rtol=0)
        assert batched.length(bslots[i]) == len(prompts[i]) + len(news[i])


def test_chunked_prefill_equals_prefill_at_once(engine, hf_model):
    tokens = seq(33, 3)
    a, b = engine.allocate(), engine.allocate()
    whole = engine.forward([(a, tokens)])[0]
    parts = [engine.forward([(b, tokens[i:i + 8])])[0] for i in range(0, 33, 8)]
    torch.testing.assert_close(torch.cat(parts), whole, atol=ATOL, rtol=0)
    nxt = seq(2, 4)
    torch.testing.assert_close(engine.forward([(a, nxt)])[0], engine.forward([(b, nxt)])[0], atol=ATOL, rtol=0)


def test_rollback_then_reforward_equals_never_going_forward(engine, hf_model):
    prompt, wrong, right = seq(10, 5), seq(6, 6), seq(4, 7)
    slot = engine.allocate()
    engine.forward([(slot, prompt)])
    engine.forward([(slot, wrong)])
    engine.rollback(slot, 6)
    assert engine.length(slot) == 10
    out = engine.forward([(slot, right)])[0]
    torch.testing.assert_close(out, hf_logits(hf_model, prompt + right)[-4:], atol=ATOL, rtol=0)
    # partial rollback (verify: keep k of gamma draft tokens)
    engine.forward([(slot, wrong)])
    engine.rollback(slot, 4)
    out = engine.forward([(slot, right)])[0]
    torch.testing.assert_close(out, hf_logits(hf_model, prompt + right + wrong[:2] + right)[-4:], atol=ATOL, rtol=0)
    with pytest.raises(EngineError):
        engine.rollback(slot, engine.length(slot) + 1)


def test_free_allocate_reuse_and_no_free_slot(engine, hf_model):
    slots = [engine.allocate() for _ in range(4)]
    assert sorted(slots) == [0, 1, 2, 3]
    with pytest.raises(NoFreeSlot):
        engine.allocate()
    engine.forward([(slots[1], seq(30, 8))])
    engine.free(slots[1])
    with pytest.raises(EngineError):
        engine.forward([(slots[1], [1])])  # freed slot
    again = engine.allocate()
    assert again == slots[1] and engine.length(again) == 0
    tokens = seq(5, 9)  # stale entries of the previous owner must not leak in
    torch.testing.assert_close(engine.forward([(again, tokens)])[0], hf_logits(hf_model, tokens), atol=ATOL, rtol=0)


def test_bad_rows_raise_before_touching_the_cache(engine, hf_model):
    a, b = engine.allocate(), engine.allocate()
    prompt = seq(60, 10)
    engine.forward([(a, prompt)])
    engine.forward([(b, prompt[:3])])
    with pytest.raises(EngineError, match="context overflow"):
        engine.forward([(b, [1, 2]), (a, seq(5, 11))])  # a: 60 + 5 > 64
    with pytest.raises(EngineError, match="out of range"):
        engine.forward([(b, [1, 2]), (a, [3, VOCAB])])
    with pytest.raises(EngineError, match="out of range"):
        engine.forward([(b, [-1])])
    with pytest.raises(EngineError, match="twice"):
        engine.forward([(b, [1]), (b, [2])])
    with pytest.raises(EngineError, match="no tokens"):
        engine.forward([(b, [])])
    with pytest.raises(EngineError):
        engine.forward([(99, [1])])
    assert (engine.length(a), engine.length(b)) == (60, 3)
    out = engine.forward([(a, [5, 6, 7, 8]), (b, [9])])
    torch.testing.assert_close(out[0], hf_logits(hf_model, prompt + [5, 6, 7, 8])[-4:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], hf_logits(hf_model, prompt[:3] + [9])[-1:], atol=ATOL, rtol=0)
    with pytest.raises(EngineError, match="context overflow"):
        engine.forward([(a, [1])])  # exactly full


def test_reference_engine_agrees(llama_dir):
    fast = load_engine(llama_dir, slots=2, max_context=64)
    ref = load_engine(llama_dir, slots=2, max_context=64, backend="reference")
    for eng in (fast, ref):
        assert [eng.allocate(), eng.allocate()] == [0, 1]
    steps = [([(0, seq(9, 12)), (1, seq(4, 13))], None), ([(1, seq(3, 14)), (0, seq(2, 15))], [True, False])]
    for rows, last in steps:
        torch.testing.assert_close(fast.forward(rows, last), ref.forward(rows, last), atol=ATOL, rtol=0)
    for eng in (fast, ref):
        eng.rollback(0, 3)
    rows = [(0, seq(3, 16)), (1, seq(1, 17))]
    torch.testing.assert_close(fast.forward(rows), ref.forward(rows), atol=ATOL, rtol=0)
    assert ref.info.eos_token_id == fast.info.eos_token_id
    assert ref.info.tokenizer_fingerprint == fast.info.tokenizer_fingerprint


def test_tied_embeddings_and_sharded_weights(tmp_path):
    model = make_llama(tmp_path / "tied", tie_word_embeddings=True, num_key_value_heads=1)
    eng = load_engine(tmp_path / "tied", slots=1, max_context=32)
    tokens = seq(12, 18)
    torch.testing.assert_close(eng.forward([(eng.allocate(), tokens)])[0], hf_logits(model, tokens), atol=ATOL, rtol=0)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert len(weight_files(tmp_path / "sharded")) > 1
    eng = load_engine(tmp_path / "sharded", slots=1, max_context=32)
    torch.testing.assert_close(eng.forward([(eng.allocate(), tokens)])[0], hf_logits(model, tokens), atol=ATOL, rtol=0)
    shard = weight_files(tmp_path / "sharded")[-1]
    shard.unlink()
    with pytest.raises(EngineError, match=shard.name):
        load_engine(tmp_path / "sharded")


def test_auto_picks_reference_for_other_architectures(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    model.save_pretrained(tmp_path)
    eng = load_engine(tmp_path, slots=2)
    assert type(eng).__name__ == "ReferenceEngine" and eng.info.max_context == 64
    tokens = seq(9, 21)
    slot = eng.allocate()
    first = eng.forward([(slot, tokens[:6])], last_only=[True])[0]
    rest = eng.forward([(slot, tokens[6:])])[0]
    full = hf_logits(model, tokens)
    torch.testing.assert_close(torch.cat([first, rest]), full[5:], atol=ATOL, rtol=0)


def test_load_errors(tmp_path, llama_dir):
    with pytest.raises(EngineError, match="does not exist"):
        load_engine(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="config.json"):
        load_engine(tmp_path / "empty")
    bad = tmp_path / "noweights"
    shutil.copytree(llama_dir, bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(EngineError, match="model.safetensors"):
        load_engine(bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(EngineError, match="cannot read weights"):
        load_engine(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        load_engine(bad)
    other = tmp_path / "gpt2"
    shutil.copytree(llama_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError, match="'gpt2' not supported.*llama"):
        load_engine(other, backend="llama")
    with pytest.raises(EngineError, match="dtype"):
        load_engine(llama_dir, dtype="float8")
    with pytest.raises(EngineError, match="backend"):
        load_engine(llama_dir, backend="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="cuda requested but torch.cuda.is_available\\(\\) is False"):
            load_engine(llama_dir, device="cuda")
    with pytest.raises(EngineError, match="backend 'neuron' unknown"):  # not offered until a Neuron engine exists
        load_engine(llama_dir, backend="neuron")


def test_tokenizer_fingerprint_is_canonical(tmp_path):
    assert tokenizer_fingerprint(tmp_path) == ""
    (tmp_path / "tokenizer.json").write_text('{"b": 1, "a": [1, 2]}')
    fp = tokenizer_fingerprint(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{\n  "a": [1,2],\n  "b": 1\n}')
    assert tokenizer_fingerprint(tmp_path) == fp
    (tmp_path / "tokenizer.json").write_text('{"a": [1, 2], "b": 2}')
    assert tokenizer_fingerprint(tmp_path) != fp


def test_bfloat16_runs(llama_dir, hf_model):
    eng = load_engine(llama_dir, slots=2, max_context=32, dtype="bfloat16")
    tokens = seq(10, 19)
    out = eng.forward([(eng.allocate(), tokens)])[0]
    assert out.dtype == torch.float32 and eng.info.dtype == "bfloat16"
    assert (out.argmax(-1) == hf_logits(hf_model, tokens).argmax(-1)).float().mean() > 0.7
