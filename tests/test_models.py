"""The shipped tiny pair (models/tiny-target, models/tiny-draft) loads offline like any Llama directory.

Greedy continuations are pinned to ids recorded when the pair was exported (float32 on CPU), so a change to
the weights, the tokenizer or the loading path shows up here rather than as a mysterious acceptance drop.
"""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"
TARGET, DRAFT = MODELS / "tiny-target", MODELS / "tiny-draft"
PROMPT = 'import os\n\n\ndef read_config(path):\n    """Return the parsed config file."""\n'
PROMPT_IDS = [754, 658, 585, 201, 484, 970, 65, 1244, 10, 534, 307, 268, 382, 709, 297, 4581, 1648, 471, 648, 201]
# Recorded with float32 on CPU (scripts/eval_pair.py loads the same way).
EXPECTED = {
    "tiny-target": [201, 484, 369, 584, 65, 5023, 65, 762, 10, 534, 307, 268, 382, 709, 297, 1101],
    "tiny-draft": [201, 484, 369, 399, 65, 1244, 65, 2412, 10, 534, 307, 268, 382, 709, 297, 1101],
}


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(TARGET)


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return {d.name: transformers.AutoModelForCausalLM.from_pretrained(d).eval() for d in (TARGET, DRAFT)}


def test_files_within_size_limits():
    files = [p for p in MODELS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 50_000_000
    assert all(p.stat().st_size < 16_000_000 for p in files)


def test_same_tokenizer_in_both_dirs():
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (TARGET / name).read_bytes() == (DRAFT / name).read_bytes()


def test_load_offline_and_shapes(models, tok):
    target, draft = models["tiny-target"], models["tiny-draft"]
    assert isinstance(target, transformers.LlamaForCausalLM) and isinstance(draft, transformers.LlamaForCausalLM)
    assert target.config.vocab_size == draft.config.vocab_size == len(tok)
    assert target.dtype == draft.dtype == torch.float32  # bf16-stored target weights load as float32
    n_target = sum(p.numel() for p in target.parameters())
    n_draft = sum(p.numel() for p in draft.parameters())
    assert 15e6 <= n_target <= 25e6 and 1e6 <= n_draft <= 3e6
    assert tok.convert_tokens_to_ids(["<|pad|>", "<|bos|>", "<|eos|>"]) == [0, 1, 2]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "tiny-target" else n
                                  for n in sorted(EXPECTED)])  # the 20M target's pin is seconds of CPU
def test_greedy_continuation_is_pinned(models, tok, name):
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert ids == PROMPT_IDS
    model = models[name]
    seq = torch.tensor([ids])
    with torch.no_grad():  # plain greedy loop: no dependence on generate()'s defaults
        for _ in range(len(EXPECTED[name])):
            nxt = model(input_ids=seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert seq[0, len(ids):].tolist() == EXPECTED[name]


def test_draft_agrees_with_target_on_prompt(models):
    """Cheap sanity check of distillation: the draft's argmax matches the target's on most prompt positions."""
    x = torch.tensor([PROMPT_IDS + EXPECTED["tiny-target"]])
    with torch.no_grad():
        t = models["tiny-target"](input_ids=x).logits.argmax(-1)
        d = models["tiny-draft"](input_ids=x).logits.argmax(-1)
    assert (t == d).float().mean().item() >= 0.5


def roundtrip(tok, text: str) -> str:
    return tok.decode(tok(text, add_special_tokens=False)["input_ids"], skip_special_tokens=False,
                      clean_up_tokenization_spaces=False)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_tokenizer_roundtrips_any_text(tok, text):
    assert roundtrip(tok, text) == text


@pytest.mark.parametrize("text", ["", " ", "\t\n\r\n  ", "déjà vu — ünïcödé ✓ 日本語 🐍\U0010ffff", "x = '\\x00'\0",
                                  "    if a:\n\t\treturn b  # über\n", "a\u200bb\ufeffc"])
def test_tokenizer_roundtrips_edge_cases(tok, text):
    assert roundtrip(tok, text) == text
    assert roundtrip(tok, text).encode("utf-8", "surrogatepass") == text.encode("utf-8", "surrogatepass")


def test_tokenizer_roundtrips_stdlib_files(tok):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["os.py", "codecs.py", "encodings/cp1252.py", "unicodedata.py", "email/_header_value_parser.py",
             "locale.py", "this.py"]
    checked = 0
    for name in names:
        path = stdlib / name
        if not path.exists():
            continue
        data = path.read_bytes()
        text = data.decode("utf-8")
        assert roundtrip(tok, text).encode("utf-8") == data, name
        checked += 1
    assert checked >= 3
