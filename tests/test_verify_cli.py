"""``specmq verify`` (the target-only baseline) and the prompt-file reader it shares with the draft side."""
from __future__ import annotations

import json

import pytest

from specmq.cli import main
from tests.model_fixtures import tiny_pair  # noqa: F401  (fixture)
from workers.engine import load_engine
from workers.prompts import PromptFileError, read_prompts
from workers.sampling import SamplingParams
from workers.speculation import autoregressive_generate
from workers.tokenizer_text import encode, load_tokenizer


def test_read_prompts_text_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\n  second one\n")
    assert read_prompts(tmp_path / "p.txt") == ["first prompt", "  second one"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b", "x": 1}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]


@pytest.mark.parametrize("name, body, needle", [
    ("bad.jsonl", '{"prompt": "a"}\n{oops\n', "bad.jsonl:2: not valid JSON"),
    ("bad.jsonl", '{"prompt": "a"}\n["x"]\n', 'bad.jsonl:2: expected an object with a string "prompt"'),
    ("empty.txt", "\n\n", "holds no prompts"),
    ("missing.txt", None, "not found"),
])
def test_read_prompts_errors_name_file_and_line(tmp_path, name, body, needle):
    if body is not None:
        (tmp_path / name).write_text(body)
    with pytest.raises(PromptFileError, match=needle.replace("[", r"\[")):
        read_prompts(tmp_path / name)


def test_verify_cli_json_equals_target_greedy(tiny_pair, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "Once upon a time"}\n{"prompt": "The quick"}\n')
    rc = main(["verify", "--model", str(tiny_pair.target), "--prompt-file", str(tmp_path / "p.jsonl"),
               "--max-new-tokens", "12", "--json"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tok = load_tokenizer(tiny_pair.target)
    eng = load_engine(tiny_pair.target, slots=1, max_context=256)
    for row, text in zip(rows, ["Once upon a time", "The quick"]):
        want = autoregressive_generate(eng, encode(tok, text), 12, SamplingParams()).tokens
        assert row["prompt"] == text and row["token_ids"] == want
        assert row["new_tokens"] == row["rounds"] == len(want) and row["tokens_per_s"] > 0
        assert row["acceptance_rate"] is None and row["drafted"] == 0


def test_verify_cli_errors_are_one_line(tiny_pair, tmp_path, capsys):
    assert main(["verify", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 1
    assert main(["verify", "--model", str(tiny_pair.target)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"specmq verify: cannot load model: model directory '{tmp_path / 'nope'}' does not exist",
                   "specmq verify: give exactly one of --prompt TEXT or --prompt-file FILE"]
