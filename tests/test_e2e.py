"""End to end on loopback: broker + fused worker + ``specmq generate`` (real processes, tiny random pair).

Greedy fused output must equal target-only greedy output; ``--json`` keys match ``specmq draft --json``; text mode
streams completions in prompt order; a broker that is not there is a clear, quick error.
"""
from __future__ import annotations

import json

import pytest

from tests.model_fixtures import tiny_pair  # noqa: F401  (fixture)
from tests.test_draft_worker import KEYS, PROMPTS, Cluster, free_port, json_lines, run_cli, target_only

pytestmark = pytest.mark.slow  # real processes
MAX_NEW = 12


@pytest.fixture(scope="module")
def fused_cluster(tiny_pair, tmp_path_factory):  # noqa: F811
    c = Cluster(tmp_path_factory.mktemp("fused-cluster"))
    try:
        c.fused("f1", tiny_pair.target, tiny_pair.draft, jobs=4)
        c.wait_workers({"f1"})
        yield c
    finally:
        c.close()


def test_generate_json_matches_target_only(fused_cluster, tiny_pair, tmp_path):  # noqa: F811
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    res = run_cli("generate", "--broker", fused_cluster.frontend, "--model", str(tiny_pair.draft), "--prompt-file",
                  str(path), "--max-new-tokens", str(MAX_NEW), "--gamma", "3", "--concurrency", "3", "--json")
    assert res.returncode == 0, res.stderr
    rows = json_lines(res.stdout)
    assert [r["prompt"] for r in rows] == PROMPTS
    want = target_only(tiny_pair.target, PROMPTS, MAX_NEW)
    for r, ids in zip(rows, want):
        for k in KEYS:
            assert k in r, k
        assert r["error"] is None
        assert r["new_tokens"] == len(r["token_ids"])
        assert 0 <= r["accepted"] <= r["drafted"]
        assert r["token_ids"] == ids


def test_generate_text_streams_in_order(fused_cluster, tiny_pair):  # noqa: F811
    res = run_cli("generate", "--broker", fused_cluster.frontend, "--model", str(tiny_pair.draft),
                  *sum((["--prompt", p] for p in PROMPTS[:3]), []), "--max-new-tokens", "6", "--concurrency", "3")
    assert res.returncode == 0, res.stderr
    heads = [line for line in res.stdout.splitlines() if line.startswith("=== [")]
    assert heads == [f"=== [{i}] {p}" for i, p in enumerate(PROMPTS[:3])]
    assert res.stdout.count("tok/s") == 3


def test_generate_broker_down(tiny_pair):  # noqa: F811
    res = run_cli("generate", "--broker", f"tcp://127.0.0.1:{free_port()}", "--model", str(tiny_pair.draft),
                  "--prompt", "x", "--connect-timeout", "1", timeout=60)
    assert res.returncode == 1
    assert "not reachable" in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""
