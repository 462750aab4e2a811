"""oneDNN pre-packed linears (workers/engine/cpu_packed.py): same logits as HF, fewer-rows-cost-the-same layout."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from workers.engine import cpu_packed  # noqa: E402
from workers.engine.torch_engine import load_torch_engine  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu_packed.available(), reason="this torch build has no oneDNN linear kernels")


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """Wide enough (hidden 256) for its linears to be packed."""
    path = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return path, model


def test_wide_layers_are_packed_and_narrow_ones_are_not(wide_llama):
    path, _ = wide_llama
    eng = load_torch_engine(path, slots=2)
    kinds = {type(m).__name__ for m in eng.model.modules()}
    assert "PackedLinear" in kinds
    narrow = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.Linear(512, 64))
    assert cpu_packed.pack_linears(narrow) == 1  # only the 512-wide input layer
    assert isinstance(narrow[0], torch.nn.Linear) and isinstance(narrow[1], cpu_packed.PackedLinear)


def test_packed_engine_matches_hf_and_the_unpacked_engine_at_every_row_count(wide_llama):
    path, hf = wide_llama
    packed = load_torch_engine(path, slots=4, packed=True)
    plain = load_torch_engine(path, slots=4, packed=False)
    seqs = [[5, 9, 17, 33, 2, 8, 100, 250, 7], [3, 4], [299, 1, 2, 3, 4, 5]]
    for eng in (packed, plain):
        slots = [eng.allocate() for _ in seqs]
        got = eng.forward(list(zip(slots, seqs)))  # 3 rows of different lengths in one pass
        for s, toks, logits in zip(slots, seqs, got):
            with torch.no_grad():
                ref = hf(torch.tensor([toks])).logits[0]
            assert torch.allclose(logits, ref, atol=1e-4, rtol=1e-4)
        more = eng.forward([(slots[0], [11])])  # then a single row (the gemv-shaped case)
        with torch.no_grad():
            ref = hf(torch.tensor([seqs[0] + [11]])).logits[0, -1:]
        assert torch.allclose(more[0], ref, atol=1e-4, rtol=1e-4)
