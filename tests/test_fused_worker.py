"""Fused worker: streamed tokens == Done tokens == target-only greedy, several jobs at once, bad jobs answered."""
from __future__ import annotations

import asyncio

import pytest

from broker.client import BrokerClient, wait_for
from protocol import errors as E
from protocol.messages import Done, Error, Generate, Tokens
from tests.conftest import run_async
from tests.model_fixtures import tiny_pair  # noqa: F401  (fixture)
from workers.engine import load_engine
from workers.fused_worker import FusedConfig, serve_fused
from workers.sampling import SamplingParams
from workers.speculation import autoregressive_generate
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
    # jobs progressed together: fewer rounds (one batched verify forward each) than the jobs' rounds summed
    assert servers[0].counters["rounds"] < sum(m[-1].stats["rounds"] for m in runs)
    st = servers[0].stats()  # what the heartbeat reports: rows per round shows the batching
    assert st["ticks"] == servers[0].counters["rounds"]
    assert st["rows"] == sum(m[-1].stats["rounds"] for m in runs) and st["mean_batch"] > 1.0
    assert isinstance(bad[-1], Error) and bad[-1].code == E.TOKEN_OUT_OF_RANGE
    assert isinstance(too_long[-1], Error) and too_long[-1].code == E.CONTEXT_TOO_LONG
