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
