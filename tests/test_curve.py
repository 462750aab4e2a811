"""CURVE: an encrypted frontend that serves listed client keys, refuses and counts others, and says why."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from broker.client import BrokerClient
from broker.curve import CurveError, generate_keypair, load_keypair
from protocol.messages import Result, SessionOpen, SessionOpened, Verify
from tests.conftest import run_async
from tests.ops_helpers import echo_workers, wait_workers


@pytest.fixture
def keys(tmp_path):
    server_pub, server_sec = generate_keypair(tmp_path / "server", "broker")
    allowed_pub, allowed_sec = generate_keypair(tmp_path / "allow", "laptop")
    _, stranger_sec = generate_keypair(tmp_path / "other", "stranger")
    _, impostor_sec = generate_keypair(tmp_path / "impostor", "fake-broker")
    return {"server_pub": str(server_pub), "server_sec": str(server_sec), "allow": str(tmp_path / "allow"),
            "client_sec": str(allowed_sec), "client_pub": str(allowed_pub), "stranger_sec": str(stranger_sec),
            "impostor_pub": str(impostor_sec).replace(".key_secret", ".key")}


def test_allowed_client_works_and_strangers_are_refused_and_counted(make_broker, keys):
    b = make_broker(curve_secret=keys["server_sec"], allow=keys["allow"], metrics_port=0)

    async def main():
        async with echo_workers(b.backend, "target"):
            await wait_workers(b, 1)
            async with BrokerClient(b.frontend, timeout=3, curve_secret=keys["client_sec"],
                                    curve_server=keys["server_pub"], curve_public=keys["client_pub"]) as ok:
                opened = await ok.request(SessionOpen(session="s", prompt_ids=[1, 2]))
                assert isinstance(opened, SessionOpened)
                res = await ok.request(Verify(session="s", seq=0, pos=opened.pos, tokens=[3, 4]))
                assert isinstance(res, Result) and res.accepted == 2
            async with BrokerClient(b.frontend, timeout=0.5, curve_secret=keys["stranger_sec"],
                                    curve_server=keys["server_pub"]) as stranger:
                with pytest.raises(TimeoutError, match="refused this client's CURVE key"):
                    await stranger.request(SessionOpen(session="x", prompt_ids=[1]), retries=1)
            async with BrokerClient(b.frontend, timeout=0.5) as plain:  # no CURVE at all: never answered
                with pytest.raises(TimeoutError):
                    await plain.stats(timeout=0.3)
            async with BrokerClient(b.frontend, timeout=0.5, curve_secret=keys["client_sec"],
                                    curve_server=keys["impostor_pub"]) as wrong_server:
                with pytest.raises(TimeoutError, match="handshake failed"):
                    await wrong_server.request(SessionOpen(session="y", prompt_ids=[1]), retries=1)

    run_async(main(), timeout=60)
    snap = b.snapshot()
    assert snap["counters"]["auth_failures"] >= 1
    import urllib.request

    text = urllib.request.urlopen(snap["metrics"], timeout=5).read().decode()
    line = next(x for x in text.splitlines() if x.startswith("specmq_auth_failures_total"))
    assert float(line.split()[-1]) >= 1


@pytest.mark.slow
def test_key_file_errors_are_clear(keys, tmp_path):
    with pytest.raises(CurveError, match="not found"):
        load_keypair(tmp_path / "nope.key_secret")
    with pytest.raises(CurveError, match="no secret key"):
        load_keypair(keys["server_pub"])  # the public half where the secret is needed

    async def client_side():
        with pytest.raises(CurveError, match="not found"):
            async with BrokerClient("tcp://127.0.0.1:1", curve_secret=str(tmp_path / "missing"),
                                    curve_server=keys["server_pub"]):
                pass
        with pytest.raises(CurveError, match="both"):
            async with BrokerClient("tcp://127.0.0.1:1", curve_secret=keys["client_sec"]):
                pass

    run_async(client_side(), timeout=10)
    for argv, why in (
        (["--curve-secret", str(tmp_path / "missing"), "--allow", keys["allow"]], "not found"),
        (["--curve-secret", keys["server_sec"]], "--allow"),
        (["--curve-secret", keys["server_sec"], "--allow", str(tmp_path)], "no *.key"),
    ):
        out = subprocess.run([sys.executable, "-m", "specmq", "broker", "--frontend", "tcp://127.0.0.1:*",
                              "--backend", "tcp://127.0.0.1:*", *argv], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and why in out.stderr, (argv, out.stderr)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "specmq", "monitor", "--broker", "tcp://127.0.0.1:1", "--once",
                          "--curve-secret", keys["client_sec"]], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "--curve-server" in out.stderr
    assert time.monotonic() - t0 < 30


def test_draft_and_generate_clients_carry_curve_keys(make_broker, keys):
    """The drafter's client factory (used by `specmq draft` and `specmq generate`) speaks CURVE when given keys."""
    from broker.curve import client_kwargs
    from workers.draft_worker import make_client, probe_broker

    b = make_broker(curve_secret=keys["server_sec"], allow=keys["allow"])

    class Args:
        curve_secret, curve_server, curve_public = keys["client_sec"], keys["server_pub"], keys["client_pub"]

    async def main():
        for delay_ms in (0.0, 1.0):  # plain and link-delayed clients
            client = make_client(b.frontend, delay_ms, 3.0, client_kwargs(Args))
            await client.start()
            try:
                snap = await probe_broker(client, b.frontend, 3.0)
                assert "queues" in snap
            finally:
                await client.close()

    run_async(main(), timeout=30)


@pytest.mark.parametrize("cmd", ["draft", "generate"])
@pytest.mark.slow
def test_client_clis_refuse_half_configured_curve(cmd, keys):
    proc = subprocess.run([sys.executable, "-m", "specmq.cli", cmd, "--prompt", "x", "--curve-secret",
                           keys["client_sec"]], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "--curve-server" in proc.stderr and proc.stderr.count("\n") == 1


def _refused(b) -> int:
    return b.snapshot()["counters"]["refused_handshakes"]


def test_each_refused_handshake_is_explained_at_once_and_counted_by_the_broker(make_broker, keys):
    """Unlisted key, wrong broker key, no CURVE against a CURVE broker, CURVE against a plain one: the client says
    which (``probe`` ends at the refusal, not after its timeout) and the broker counts every refusal."""
    from broker.curve import HandshakeRefused

    b = make_broker(curve_secret=keys["server_sec"], allow=keys["allow"], metrics_port=0)
    plain_broker = make_broker()
    cases = [
        (b, {"curve_secret": keys["stranger_sec"], "curve_server": keys["server_pub"]},
         "the broker refused this client's CURVE key"),
        (b, {"curve_secret": keys["client_sec"], "curve_server": keys["impostor_pub"]},
         r"CURVE handshake failed \(is --curve-server the broker's public key"),
        (b, {}, "the broker requires CURVE: give --curve-secret"),
        (plain_broker, {"curve_secret": keys["client_sec"], "curve_server": keys["server_pub"]},
         "the broker does not use CURVE|does the broker use CURVE"),
    ]

    async def main():
        for broker, curve, why in cases:
            before = _refused(broker)
            async with BrokerClient(broker.frontend, **curve) as client:
                t0 = time.monotonic()
                with pytest.raises(HandshakeRefused, match=why):
                    await client.probe(timeout=20)
                assert time.monotonic() - t0 < 10  # the refusal, not the timeout, ended it
            from broker.client import wait_for

            assert await wait_for(lambda: _refused(broker) > before, 5), why
        async with BrokerClient(b.frontend, curve_secret=keys["client_sec"], curve_server=keys["server_pub"]) as ok:
            assert "queues" in await ok.probe(timeout=5)

    run_async(main(), timeout=120)
    snap = b.snapshot()
    assert snap["counters"]["refused_handshakes"] >= 3 and snap["counters"]["auth_failures"] >= 1
    import urllib.request

    text = urllib.request.urlopen(snap["metrics"], timeout=5).read().decode()
    line = next(x for x in text.splitlines() if x.startswith("specmq_refused_handshakes_total"))
    assert float(line.split()[-1]) >= 3


@pytest.mark.slow
def test_draft_generate_and_monitor_give_the_same_reason_for_a_refusal(make_broker, keys):
    b = make_broker(curve_secret=keys["server_sec"], allow=keys["allow"])
    stranger = ["--curve-secret", keys["stranger_sec"], "--curve-server", keys["server_pub"]]
    runs = {
        "draft": ["draft", "--prompt", "x", "--connect-timeout", "20"],
        "generate": ["generate", "--prompt", "x", "--connect-timeout", "20"],
        "monitor": ["monitor", "--once", "--timeout", "20"],
    }
    lines = {}
    for name, argv in runs.items():
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "specmq", *argv, "--broker", b.frontend, *stranger],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, (name, out.stderr)
        assert time.monotonic() - t0 < 20, name  # refused at once, not after the 20 s timeout
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith(f"specmq {name}: broker at {b.frontend}: the broker refused this client's CURVE key")
        lines[name] = last.split(": ", 1)[1]
    assert len(set(lines.values())) == 1, lines
    for name in ("draft", "generate"):  # no CURVE at all against a CURVE broker
        out = subprocess.run([sys.executable, "-m", "specmq", *runs[name], "--broker", b.frontend],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "the broker requires CURVE" in out.stderr.strip().splitlines()[-1], out.stderr
