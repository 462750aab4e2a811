"""Fused worker: streamed tokens == Done tokens == target-only greedy, several jobs at once, bad jobs answered."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker.client import BrokerClient, wait_for
from protocol import errors as E
from protocol.messages import Done, Error, Generate, Tokens
from tests.conftest import run_async
from tests.model_fixtures import tiny_pair  # noqa: F401  (fixture)
from workers.engine import load_engine
from workers.engine.base import Engine
from workers.fused_worker import FusedConfig, FusedServer, serve_fused
from workers.sampling import SamplingParams
from workers.speculation import AdaptiveGammaPolicy, autoregressive_generate
from workers.tokenizer_text import decode, encode, load_tokenizer

TEXTS = ["Once upon a time", "The quick brown fox", "Numbers like"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def broker(patient_broker):
    return patient_broker


async def _collect(client: BrokerClient, job: Generate) -> list:
    return [m async for m in client.generate(job, timeout=30)]


def test_fused_jobs_stream_exactly_the_target_greedy_output(broker, tiny_pair):
    tok = load_tokenizer(tiny_pair.target)
    ref_engine = load_engine(tiny_pair.target, slots=1, max_context=256)
    reference = [autoregressive_generate(ref_engine, encode(tok, t), 20, SamplingParams()).tokens for t in TEXTS]
    target = load_engine(tiny_pair.target, slots=4, max_context=256)
    draft = load_engine(tiny_pair.draft, slots=4, max_context=256)

    servers = []

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(serve_fused(broker.backend, draft, target, tok, FusedConfig(name="f0"),
                                               stop=stop, heartbeat_interval=0.2, liveness=25,
                                               on_server=servers.append))
        try:
            assert await wait_for(lambda: len(broker.snapshot()["workers"]) == 1, timeout=10)
            async with BrokerClient(broker.frontend, timeout=30) as client:
                jobs = [Generate(job=f"j{i}", prompt=t, max_new_tokens=20, gamma=3) for i, t in enumerate(TEXTS)]
                jobs.append(Generate(job="ids", prompt_ids=encode(tok, TEXTS[0]), max_new_tokens=20, gamma=5))
                runs = await asyncio.gather(*(_collect(client, j) for j in jobs))
                bad = await _collect(client, Generate(job="bad", prompt_ids=[1, 10 ** 5]))
                too_long = await _collect(client, Generate(job="long", prompt="hi", max_new_tokens=10_000))
                return runs, bad, too_long
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    runs, bad, too_long = run_async(main(), 120)
    for msgs, want in zip(runs, reference + [reference[0]]):
        *stream, done = msgs
        assert isinstance(done, Done), done
        assert all(isinstance(m, Tokens) for m in stream) and stream
        streamed = [t for m in stream for t in m.tokens]
        assert streamed == done.token_ids == want
        assert [m.index for m in stream] == [sum(len(s.tokens) for s in stream[:i]) for i in range(len(stream))]
        assert "".join(m.text for m in stream) == done.text == decode(tok, want)
        s = done.stats
        assert s["rounds"] >= 1 and 0 <= s["accepted"] <= s["drafted"] and s["new_tokens"] == len(want)
    # jobs progressed together: fewer ticks (one target forward each) than the jobs' rounds summed
    st = servers[0].stats()  # what the heartbeat reports: rows per tick shows the batching
    assert st["ticks"] < st["rounds"] == sum(m[-1].stats["rounds"] for m in runs)
    assert st["rows"] == st["rounds"] + st["prefill_rows"] and st["mean_batch"] > 1.0
    assert st["prefill_tokens"] == sum(m[-1].stats["prompt_tokens"] - 1 for m in runs)
    assert isinstance(bad[-1], Error) and bad[-1].code == E.TOKEN_OUT_OF_RANGE
    assert isinstance(too_long[-1], Error) and too_long[-1].code == E.CONTEXT_TOO_LONG


# --------------------------------------------------------------------------- the tick policy, on the shipped pair
SHIPPED = Path(__file__).resolve().parents[1] / "models"


class CountingEngine(Engine):
    """Wraps an engine and records each forward's rows as (slot, tokens fed)."""

    def __init__(self, inner: Engine) -> None:
        self.inner, self.info = inner, inner.info
        self.calls: list[list[tuple[int, int]]] = []

    def allocate(self) -> int:
        return self.inner.allocate()

    def free(self, slot: int) -> None:
        self.inner.free(slot)

    def length(self, slot: int) -> int:
        return self.inner.length(slot)

    def rollback(self, slot: int, n: int) -> None:
        self.inner.rollback(slot, n)

    def forward(self, rows, last_only=None):
        self.calls.append([(slot, len(toks)) for slot, toks in rows])
        return self.inner.forward(rows, last_only)

    def fed(self, slot: int) -> int:
        return sum(n for call in self.calls for s, n in call if s == slot)


@pytest.fixture(scope="module")
def shipped():
    tok = load_tokenizer(SHIPPED / "tiny-target")
    engines = [load_engine(SHIPPED / name, slots=4, max_context=1024) for name in ("tiny-target", "tiny-draft")]
    return tok, engines[0], engines[1], load_engine(SHIPPED / "tiny-target", slots=1, max_context=1024)


def _long_prompt(tok, n: int) -> list[int]:
    text = " ".join(line.strip() for line in (SHIPPED.parent / "examples" / "prompts.txt").read_text().splitlines())
    ids = encode(tok, text)
    while len(ids) < n:
        ids += ids
    return ids[:n]


def _job(server: FusedServer, job: str, ids: list[int], max_new: int, gamma: int = 3):
    out = server.check(Generate(job=job, prompt_ids=ids, max_new_tokens=max_new, gamma=gamma))
    assert not isinstance(out, Error), out
    return out


def _drain(server: FusedServer, arrivals: dict[int, list], limit: int = 2000) -> dict[str, Done]:
    """Step until every job has ended; ``arrivals[i]`` join before step i. Returns Done per job."""
    done: dict[str, Done] = {}
    for i in range(limit):
        answers, _ = server.answer(server.step(arrivals.pop(i, [])))
        for m in answers:
            assert not isinstance(m, Error), m
            if isinstance(m, Done):
                done[m.job] = m
        if not server.jobs and not arrivals:
            return done
    raise AssertionError("jobs did not finish")


@pytest.mark.slow
def test_long_prompt_is_prefilled_a_chunk_per_tick_while_running_jobs_keep_their_rounds(shipped):
    tok, target, draft, ref = shipped
    t, d = CountingEngine(target), CountingEngine(draft)
    server = FusedServer(d, t, tok, FusedConfig(gamma=3, prefill_chunk=64))
    running = _job(server, "running", encode(tok, TEXTS[0]), 120)
    server.step([running])  # its short prompt: one tick
    assert running.run.to_prefill == 0
    long_ids = _long_prompt(tok, 650)
    long = _job(server, "long", long_ids, 12)
    new, ticks = [long], 0
    while long.run is None or long.run.to_prefill > 0:
        t.calls.clear()
        d.calls.clear()
        rounds = running.run.result.rounds
        server.step(new)
        new, ticks = [], ticks + 1
        assert running.run.result.rounds == rounds + 1  # the running job got its round in this tick
        assert len(t.calls) == 1  # its verify row and the prompt chunk share ONE target forward
        assert 0 < t.fed(long.run.target.slot) <= 64 and 0 < d.fed(long.run.draft_slot) <= 64
    assert ticks == -(-(len(long_ids) - 1) // 64)
    assert server.stats()["prefill_tokens"] == len(long_ids) - 1 + len(encode(tok, TEXTS[0])) - 1
    done = _drain(server, {})
    assert done["long"].token_ids == autoregressive_generate(ref, long_ids, 12, SamplingParams()).tokens
    assert done["running"].token_ids == autoregressive_generate(ref, encode(tok, TEXTS[0]), 120,
                                                                SamplingParams()).tokens


@pytest.mark.slow
def test_chunked_prefill_under_tight_budgets_equals_target_greedy(shipped):
    """Jobs join at different ticks; token and row budgets bind, so rounds rotate and prefills wait their turn."""
    tok, target, draft, ref = shipped
    config = FusedConfig(gamma=4, prefill_chunk=48, max_batch_tokens=64, max_batch_rows=3)
    server = FusedServer(draft, target, tok, config)
    prompts = {"a": encode(tok, TEXTS[1]), "b": _long_prompt(tok, 300), "c": _long_prompt(tok, 180)[::-1],
               "d": encode(tok, TEXTS[2])}
    jobs = {k: _job(server, k, ids, 20, gamma=g) for (k, ids), g in zip(prompts.items(), (2, 4, 3, 5))}
    done = _drain(server, {0: [jobs["a"], jobs["b"]], 2: [jobs["c"]], 5: [jobs["d"]]})
    for k, ids in prompts.items():
        assert done[k].token_ids == autoregressive_generate(ref, ids, 20, SamplingParams()).tokens, k
    st = server.stats()
    assert st["batch_rows"] <= 3 and st["rows"] == st["rounds"] + st["prefill_rows"]
    assert st["prefill_tokens"] == sum(len(ids) - 1 for ids in prompts.values())


def test_adaptive_gamma_from_config_is_lossless(shipped):
    tok, target, draft, ref = shipped
    server = FusedServer(draft, target, tok, FusedConfig(adaptive_gamma=True, max_gamma=6))
    assert isinstance(server.gamma_policy, AdaptiveGammaPolicy)
    ids = encode(tok, TEXTS[0])
    job = _job(server, "j", ids, 48, gamma=2)
    done = _drain(server, {0: [job]})["j"]
    assert done.token_ids == autoregressive_generate(ref, ids, 48, SamplingParams()).tokens
    assert done.stats["gamma"] == "auto"
    assert all(1 <= g <= 6 for g in job.run.result.gammas) and len(set(job.run.result.gammas)) > 1


def test_an_idle_worker_waits_tick_ms_for_company_and_running_jobs_never_wait(shipped):
    tok, target, draft, _ = shipped
    server = FusedServer(draft, target, tok, FusedConfig(tick_ms=50.0))
    first = _job(server, "a", encode(tok, TEXTS[0]), 4)
    server.waiting.append(first)
    t0 = first.started
    assert not server.due(t0 + 0.01) and 0.0 < server.wait_s(t0 + 0.01) <= 0.04 + 1e-9
    assert server.due(t0 + 0.051)
    server.waiting += [_job(server, k, encode(tok, TEXTS[1]), 4) for k in "bcd"]
    assert server.due(t0)  # every slot taken: nobody else can join
    server.step(server.take_waiting())
    assert server.running() == 4 and server.due(t0) and server.wait_s(t0) == 0.0
    server.reset()
    assert not server.due(t0) and not server.jobs
    for engine in (target, draft):  # every slot was given back
        slots = [engine.allocate() for _ in range(4)]
        for s in slots:
            engine.free(s)
