"""A tiny random Llama pair (target + draft, same BPE tokenizer) saved as HF directories, for worker tests.

Seconds to build, megabytes on disk, float32 so greedy outputs compare exactly. The draft is the target with a
little noise on its weights, so it agrees often (acceptance well above zero) but not always (rejections happen).

    from tests.model_fixtures import tiny_pair          # in a test module (a session-scoped fixture)
    def test_x(tiny_pair): target_dir, draft_dir = tiny_pair.target, tiny_pair.draft
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest

CORPUS = [
    "Once upon a time there was a little fox who liked to run in the forest.",
    "The quick brown fox jumps over the lazy dog, and the dog sleeps all day.",
    "A message queue carries draft chunks from many drafters to one verifier.",
    "Speculative decoding drafts a few tokens and the target verifies them at once.",
    "She said hello to the sun, the moon and every star in the night sky.",
    "Numbers like 1, 2, 3 and 42 appear in stories about clocks and trains.",
]
SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>"]  # ids 0, 1, 2
VOCAB = 320


@dataclass(frozen=True)
class TinyPair:
    target: Path
    draft: Path
    vocab_size: int
    eos_token_id: int = 2


def train_tokenizer(out_dir: Path, vocab_size: int = VOCAB):
    """A byte-level BPE trained on ``CORPUS``, saved as ``tokenizer.json`` (+ config) in ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        '{"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}\n')
    return tok


def make_tiny_pair(root: Path, seed: int = 0, noise: float = 0.05, eos: bool = True) -> TinyPair:
    """Build and save the pair under ``root/target`` and ``root/draft``; ``eos=False`` leaves eos unset."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(root / "target")
    vocab = tok.get_vocab_size()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.2, tie_word_embeddings=False, bos_token_id=1, pad_token_id=0,
                      eos_token_id=2 if eos else None)
    torch.manual_seed(seed)
    target = LlamaForCausalLM(cfg).float().eval()
    draft = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.std())
    target.save_pretrained(root / "target")
    draft.save_pretrained(root / "draft")
    train_tokenizer(root / "draft")  # same corpus and settings: the same tokenizer.json
    return TinyPair(root / "target", root / "draft", vocab)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> TinyPair:
    """One random pair per test session (shared by every test module that imports this fixture)."""
    return make_tiny_pair(tmp_path_factory.mktemp("tiny-pair"))
