"""``specmq draft`` against real processes on loopback: broker + target worker(s) + the draft CLI.

Every process is a subprocess with bounded waits and is killed in teardown. The models are the tiny random pair
(float32), so greedy outputs compare exactly with target-only greedy decoding.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.model_fixtures import tiny_pair, train_tokenizer  # noqa: F401  (fixture)
from workers.local_cluster import ClusterError, LocalCluster

pytestmark = pytest.mark.slow  # real processes

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time", "The quick brown fox", "A message queue", "She said hello"]
MAX_NEW = 12
KEYS = ("prompt", "text", "token_ids", "new_tokens", "drafted", "accepted", "acceptance_rate", "rounds", "wall_s",
        "tokens_per_s")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def specmq(*args: str) -> list[str]:
    return [PY, "-m", "specmq.cli", *args]


class Cluster(LocalCluster):
    """A broker subprocess plus workers (``workers.local_cluster``) with fast heartbeats; ``close()`` stops them."""

    HB = ("--heartbeat-interval", "0.1", "--liveness", "5")

    def __init__(self, tmp: Path) -> None:
        super().__init__(logdir=tmp, env=_env(), cwd=ROOT)
        self.tmp = tmp
        self.start_broker(*self.HB, "--grace-s", "0.5")

    def target(self, name: str, model: Path, slots: int = 8) -> None:
        self.start_worker("target", name, "--model", str(model), "--slots", str(slots), *self.HB)

    def fused(self, name: str, target: Path, draft: Path, jobs: int = 4) -> None:
        self.start_worker("fused", name, "--target-model", str(target), "--draft-model", str(draft), "--jobs",
                          str(jobs), *self.HB)

    def wait_workers(self, names: set[str], timeout: float = 60.0) -> None:
        try:
            self.wait_registered(names, timeout_s=timeout)
        except ClusterError as exc:
            dead = self.exited()
            tail = dead.log.read_text()[-2000:] if dead is not None and dead.log is not None else ""
            raise RuntimeError(f"{exc}\n{tail}") from None

    def close(self) -> None:
        self.stop(grace_s=10.0)


def run_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(specmq(*args), capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def target_only(model: Path, prompts: list[str], max_new: int) -> list[list[int]]:
    """Target-only greedy ids for each prompt (our engine, one token per forward)."""
    from workers.engine import load_engine
    from workers.sampling import SamplingParams
    from workers.speculation import autoregressive_generate
    from workers.tokenizer_text import encode, load_tokenizer

    tok = load_tokenizer(model)
    engine = load_engine(model, slots=1, max_context=256)
    return [autoregressive_generate(engine, encode(tok, p), max_new, SamplingParams()).tokens for p in prompts]


@pytest.fixture(scope="module")
def cluster(tiny_pair, tmp_path_factory):  # noqa: F811
    c = Cluster(tmp_path_factory.mktemp("draft-cluster"))
    try:
        c.target("t1", tiny_pair.target)
        c.wait_workers({"t1"})
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def expected(tiny_pair):  # noqa: F811
    return target_only(tiny_pair.target, PROMPTS, MAX_NEW)


def check_rows(rows: list[dict], expected: list[list[int]]) -> None:
    assert [r["prompt"] for r in rows] == PROMPTS  # the prompt file's order
    for r, want in zip(rows, expected):
        for k in KEYS:
            assert k in r, k
        assert r["error"] is None
        assert r["new_tokens"] == len(r["token_ids"])
        assert 0 <= r["accepted"] <= r["drafted"]
        assert r["token_ids"] == want  # lossless: greedy speculative == target-only greedy


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_greedy_matches_target_only_in_prompt_order(cluster, tiny_pair, expected, tmp_path, fmt):  # noqa: F811
    path = tmp_path / f"prompts.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(PROMPTS) + "\n")
    else:
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    profile = tmp_path / "rounds.csv"
    res = run_cli("draft", "--broker", cluster.frontend, "--model", str(tiny_pair.draft), "--prompt-file", str(path),
                  "--max-new-tokens", str(MAX_NEW), "--gamma", "3", "--concurrency", "3", "--json", "--threads", "1",
                  "--profile", str(profile))
    assert res.returncode == 0, res.stderr
    rows = json_lines(res.stdout)
    check_rows(rows, expected)
    assert sum(r["accepted"] for r in rows) > 0  # the noisy draft agrees sometimes
    header = profile.read_text().splitlines()[0].split(",")
    for col in ("round", "gamma", "accepted", "draft_ms", "network_ms", "verify_ms", "draft_wait_ms", "path_ms",
                "busy_wait_ms"):
        assert col in header
    assert len(profile.read_text().splitlines()) - 1 == sum(r["rounds"] for r in rows)


@pytest.mark.parametrize("gamma", ["auto", "0"])
def test_auto_gamma_and_decode_mode_match_target_only(cluster, tiny_pair, expected, tmp_path, gamma):  # noqa: F811
    """--gamma auto follows the target's controller (decode mode included); --gamma 0 is target-only decoding
    through the same broker and target. Both are lossless."""
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    res = run_cli("draft", "--broker", cluster.frontend, "--model", str(tiny_pair.draft), "--prompt-file", str(path),
                  "--max-new-tokens", str(MAX_NEW), "--gamma", gamma, "--decode-tokens", "5", "--concurrency", "2",
                  "--json", "--threads", "1")
    assert res.returncode == 0, res.stderr
    rows = json_lines(res.stdout)
    check_rows(rows, expected)
    if gamma == "0":
        assert all(r["drafted"] == 0 and r["rounds"] == -(-len(r["token_ids"]) // 5) for r in rows)


def test_bad_gamma_is_refused_in_one_line(tiny_pair):  # noqa: F811
    res = run_cli("draft", "--model", str(tiny_pair.draft), "--prompt", "x", "--gamma", "lots")
    assert res.returncode != 0 and "--gamma" in res.stderr and "'auto' or a whole number" in res.stderr


def test_text_mode_and_adaptive_gamma(cluster, tiny_pair, expected):  # noqa: F811
    res = run_cli("draft", "--broker", cluster.frontend, "--model", str(tiny_pair.draft), "--prompt", PROMPTS[0],
                  "--max-new-tokens", str(MAX_NEW), "--adaptive-gamma", "--max-gamma", "5", "--threads", "1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("=== [0] " + PROMPTS[0])
    assert "acceptance" in res.stdout and "tok/s" in res.stdout


@pytest.mark.parametrize("extra", [(), ("--top-k", "8")], ids=["dense-q", "sparse-q"])
def test_sampled_chunks_carry_q_through_the_broker(cluster, tiny_pair, extra):  # noqa: F811
    """At temperature > 0 every chunk carries its packed q (the whole vocabulary, or a top-k support) through the
    broker's and the target's edge checks; a seed gives the same tokens every time."""
    args = ("draft", "--broker", cluster.frontend, "--model", str(tiny_pair.draft), "--prompt", PROMPTS[0],
            "--prompt", PROMPTS[1], "--max-new-tokens", str(MAX_NEW), "--gamma", "3", "--temperature", "0.8",
            "--seed", "5", "--json", "--threads", "1", *extra)
    runs = []
    for _ in range(2):
        res = run_cli(*args)
        assert res.returncode == 0, res.stderr
        runs.append(json_lines(res.stdout))
    for r in runs[0]:
        assert r["error"] is None and 0 < r["new_tokens"] <= MAX_NEW and r["drafted"] > 0
    assert [r["token_ids"] for r in runs[0]] == [r["token_ids"] for r in runs[1]]


def test_tokenizer_mismatch_names_both_fingerprints(cluster, tiny_pair, tmp_path):  # noqa: F811
    import shutil

    from workers.engine import tokenizer_fingerprint

    other = tmp_path / "other-draft"
    shutil.copytree(tiny_pair.draft, other)
    train_tokenizer(other, vocab_size=300)  # a different tokenizer, ids still in the model's range
    mine, theirs = tokenizer_fingerprint(other), tokenizer_fingerprint(tiny_pair.target)
    assert mine != theirs
    res = run_cli("draft", "--broker", cluster.frontend, "--model", str(other), "--prompt", "Once upon",
                  "--max-new-tokens", "4", "--threads", "1", "--timeout", "5")
    assert res.returncode == 1
    assert "tokenizer" in res.stderr and mine in res.stderr and theirs in res.stderr


def test_broker_down_is_a_clear_error(tiny_pair):  # noqa: F811
    t0 = time.monotonic()
    res = run_cli("draft", "--broker", f"tcp://127.0.0.1:{free_port()}", "--model", str(tiny_pair.draft),
                  "--prompt", "x", "--connect-timeout", "1", timeout=60)
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert err and "not reachable" in err[-1] and "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 60


def test_target_killed_mid_run_sessions_reopen(tiny_pair, expected, tmp_path):  # noqa: F811
    """Two targets; one is SIGKILLed while it holds sessions: every prompt completes with the same output."""
    c = Cluster(tmp_path)
    try:
        c.target("ta", tiny_pair.target)
        c.target("tb", tiny_pair.target)
        c.wait_workers({"ta", "tb"})
        max_new = 40
        want = target_only(tiny_pair.target, PROMPTS, max_new)
        # a link delay slows the rounds so the kill lands mid-run
        draft = subprocess.Popen(specmq("draft", "--broker", c.frontend, "--model", str(tiny_pair.draft),
                                        *sum((["--prompt", p] for p in PROMPTS), []), "--max-new-tokens",
                                        str(max_new), "--gamma", "2", "--json", "--threads", "1",
                                        "--link-delay-ms", "15", "--timeout", "5"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # wait until ta serves sessions and has verified chunks
                snap = c.snapshot(1.0) or {}
                w = snap.get("workers", {}).get("ta", {})
                if w.get("sessions", 0) > 0 and snap.get("counters", {}).get("msgs_in", {}).get("result", 0) > 4:
                    break
                assert draft.poll() is None, draft.communicate()
                time.sleep(0.05)
            else:
                pytest.fail("target ta never got sessions")
            c.kill("ta")
            out, err = draft.communicate(timeout=120)
        finally:
            if draft.poll() is None:
                draft.kill()
                draft.communicate()
        assert draft.returncode == 0, err
        rows = json_lines(out)
        assert [r["prompt"] for r in rows] == PROMPTS
        assert [r["token_ids"] for r in rows] == want
        assert sum(r["reopens"] for r in rows) >= 1
    finally:
        c.close()
