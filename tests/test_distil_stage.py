"""scripts/train_tiny_pair.py `encode` + `distil`: a fake stdlib encoded with the shipped tokenizer, a draft
fine-tuned for a few steps against the shipped target, written as a directory shaped like models/tiny-draft.

Everything is written under tmp_path; models/ is only read."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
np = pytest.importorskip("numpy")

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DRAFT = MODELS / "tiny-draft"

pytestmark = pytest.mark.slow  # loads the 20M target and trains a few steps on CPU (seconds)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_tiny_pair", ROOT / "scripts" / "train_tiny_pair.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return mod


def fake_source(name: str, n_funcs: int = 12) -> str:
    body = []
    for i in range(n_funcs):
        body.append(f'def {name}_{i}(path, size={i}):\n    """Read {i} chunks of `path`."""\n'
                    f"    with open(path, 'rb') as f:\n        return [f.read(size) for _ in range({i})]\n")
    return f'"""Module {name}."""\nimport os\n\n' + "\n\n".join(body)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    lib = tmp_path_factory.mktemp("lib")
    for name in ("alpha", "beta", "gamma", "delta", "held"):
        (lib / f"{name}.py").write_text(fake_source(name))
    (lib / "pkg").mkdir()
    (lib / "pkg" / "inner.py").write_text(fake_source("inner"))
    (lib / "test").mkdir()
    (lib / "test" / "test_alpha.py").write_text(fake_source("skipped"))
    listed = lib.parent / "heldout.json"
    listed.write_text(json.dumps(["held.py"]))
    return lib, listed


def encode(script, corpus, data: Path, *extra: str) -> dict:
    lib, listed = corpus
    script.main(["encode", "--stdlib", str(lib), "--heldout-list", str(listed), "--data-dir", str(data), *extra])
    return json.loads((data / "manifest.json").read_text())


def test_encode_uses_the_shipped_tokenizer_the_list_split_and_a_token_cap(script, corpus, tmp_path):
    full = encode(script, corpus, tmp_path / "full")
    assert full["heldout_files"] == ["held.py"]
    assert "test/test_alpha.py" not in full["train_files"] and len(full["train_files"]) == 5
    train = np.load(tmp_path / "full" / "train.npy")
    assert train.dtype == np.uint16 and train.size == full["train_tokens"] and train[0] == 1  # <|bos|>
    shipped = transformers.AutoTokenizer.from_pretrained(DRAFT)
    ids = shipped(fake_source(Path(full["train_files"][0]).stem), add_special_tokens=False)["input_ids"]
    assert train[1:len(ids) + 1].tolist() == ids and train[len(ids) + 1] == 2  # <|bos|> file <|eos|>

    capped = encode(script, corpus, tmp_path / "capped", "--max-train-tokens", str(full["train_tokens"] - 1))
    assert capped["train_tokens"] <= full["train_tokens"] - 1
    assert capped["train_files"] == full["train_files"][:len(capped["train_files"])]  # a prefix: deterministic
    assert 0 < len(capped["train_files"]) < len(full["train_files"])


def test_distil_writes_a_changed_draft_and_agreement_by_bucket(script, corpus, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    encode(script, corpus, data)
    script.main(["distil", "--data-dir", str(data), "--target", str(MODELS / "tiny-target"), "--draft", str(DRAFT),
                 "--out", str(out), "--work-dir", str(tmp_path / "work"), "--device", "cpu", "--ctx", "64",
                 "--batch", "2", "--steps", "3", "--val-windows", "2", "--buckets", "16,32", "--warmup", "1",
                 "--lr", "1e-3", "--eval-every", "1", "--log-every", "1"])

    assert sorted(f.name for f in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "distil_summary.json"])
    assert (out / "config.json").read_bytes() == (DRAFT / "config.json").read_bytes()
    new = transformers.AutoModelForCausalLM.from_pretrained(out)
    old = transformers.AutoModelForCausalLM.from_pretrained(DRAFT)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        assert getattr(new.config, key) == getattr(old.config, key)
    new_sd, old_sd = new.state_dict(), old.state_dict()
    assert new_sd.keys() == old_sd.keys()
    assert all(v.dtype == torch.float32 for v in new_sd.values())
    assert any(not torch.equal(new_sd[k], old_sd[k]) for k in old_sd)

    summary = json.loads((out / "distil_summary.json").read_text())
    assert summary["steps_done"] == 3 and summary["selected_by"] == "val_kl"
    for when in ("before", "after"):
        agree = summary[when]["agreement"]
        assert list(agree["buckets"]) == ["0-15", "16-31", "32-63"] and agree["windows"] == 2
        assert all(0.0 <= v <= 1.0 for v in [*agree["buckets"].values(), agree["all"]])


def test_agreement_is_one_for_a_draft_against_itself(script):
    draft = transformers.AutoModelForCausalLM.from_pretrained(DRAFT).eval()
    stream = np.arange(3, 3 + 3 * 33, dtype=np.uint16)
    agree = script.agreement_by_position(draft, draft, stream, ctx=32, buckets=[8, 100], windows=3, bsz=2)
    assert agree == {"ctx": 32, "windows": 3, "buckets": {"0-7": 1.0, "8-31": 1.0}, "all": 1.0}


def test_distil_refuses_a_held_out_stream_shorter_than_a_window(script, corpus, tmp_path):
    data = tmp_path / "data"
    encode(script, corpus, data)
    with pytest.raises(SystemExit, match=r"\.npy has \d+ tokens, fewer than --ctx 2048"):
        script.main(["distil", "--data-dir", str(data), "--out", str(tmp_path / "out"),
                     "--work-dir", str(tmp_path / "work"), "--device", "cpu", "--ctx", "2048"])
    assert not (tmp_path / "out").exists()


def test_distil_past_its_deadline_still_writes_the_draft_and_summary(script, corpus, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    encode(script, corpus, data)
    script.main(["distil", "--data-dir", str(data), "--out", str(out), "--work-dir", str(tmp_path / "work"),
                 "--device", "cpu", "--ctx", "64", "--batch", "2", "--steps", "50", "--val-windows", "2",
                 "--max-minutes", "1e-9"])
    summary = json.loads((out / "distil_summary.json").read_text())
    assert summary["stopped_early"] and summary["steps_done"] == 0
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 128
