"""Remote drafts over a real (emulated) network: two network namespaces joined by a veth pair with 10 ms netem
delay each way (20 ms RTT). Broker + echo target live in one "host", a client in the other; round trips work and
take at least the RTT. Needs root and ``ip netns``; skipped with the reason otherwise. Namespaces always go.
(The broker binds the veth address inside a private namespace: nothing outside the test can reach it.)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # real processes in network namespaces
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def _netns_usable() -> str:
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs the ip and tc tools (iproute2)"
    if os.geteuid() != 0:
        return "needs root for ip netns"
    probe = f"specmq-probe-{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"ip netns add is not permitted here: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return ""


CLIENT = textwrap.dedent("""
    import asyncio, json, sys, time
    from broker.client import BrokerClient
    from protocol.messages import SessionOpen, Verify

    async def main(addr):
        async with BrokerClient(addr, timeout=2) as c:
            deadline = time.monotonic() + 30
            while True:  # wait for the broker and its target
                try:
                    if (await c.stats(timeout=1, retries=0))["workers"]:
                        break
                except TimeoutError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("broker not ready")
                await asyncio.sleep(0.2)
            opened = await c.request(SessionOpen(session="net", prompt_ids=[1, 2, 3]))
            pos, rtts = opened.pos, []
            for seq in range(10):
                t = time.perf_counter()
                r = await c.request(Verify(session="net", seq=seq, pos=pos, tokens=[4, 5]))
                rtts.append((time.perf_counter() - t) * 1000)
                pos = r.pos
            print(json.dumps({"rtts_ms": rtts, "accepted": r.accepted}))

    asyncio.run(main(sys.argv[1]))
""")


def _netem_usable() -> str:
    """'' when tc netem works in a namespace (the kernel needs sch_netem), else why not."""
    probe = f"specmq-netem-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        r = subprocess.run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                            "delay", "1ms"], capture_output=True, text=True, timeout=20)
        return "" if r.returncode == 0 else f"tc netem unavailable ({r.stderr.strip()}; kernel lacks sch_netem?)"
    finally:
        _ip("netns", "del", probe, check=False)


@pytest.fixture(params=["plain", "netem"])
def two_hosts(request):
    why = _netns_usable()
    if why:
        pytest.skip(why)
    delayed = request.param == "netem"
    if delayed:
        why = _netem_usable()
        if why:
            pytest.skip(why)
    tag = f"{os.getpid() % 100000}"
    host, client = f"smq-h{tag}", f"smq-c{tag}"
    va, vb = f"smqa{tag}", f"smqb{tag}"
    subnet = 10 + os.getpid() % 200
    ha, hb = f"10.201.{subnet}.1", f"10.201.{subnet}.2"
    try:
        _ip("netns", "add", host)
        _ip("netns", "add", client)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", host)
        _ip("link", "set", vb, "netns", client)
        for ns, dev, addr in ((host, va, ha), (client, vb, hb)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if delayed:
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem",
                                "delay", "10ms"], check=True, capture_output=True, timeout=20)
        yield host, client, ha, delayed
    finally:
        _ip("netns", "del", host, check=False)  # deleting a namespace removes its end of the veth pair
        _ip("netns", "del", client, check=False)


def test_round_trips_across_namespaces_with_20ms_rtt(two_hosts):
    host, client, host_addr, delayed = two_hosts
    env = dict(os.environ, PYTHONPATH=ROOT)
    py = sys.executable
    frontend, backend = f"tcp://{host_addr}:5555", "tcp://127.0.0.1:5556"  # inside the private namespace
    procs = []
    try:
        procs.append(subprocess.Popen(["ip", "netns", "exec", host, py, "-m", "specmq", "broker", "--frontend",
                                       frontend, "--backend", backend, "--log-level", "warning"], env=env, cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["ip", "netns", "exec", host, py, "-m", "specmq", "echo-worker", "--broker",
                                       backend, "--log-level", "warning"], env=env, cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        out = subprocess.run(["ip", "netns", "exec", client, py, "-c", CLIENT, frontend], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["accepted"] == 2
        assert len(result["rtts_ms"]) == 10
        if delayed:
            assert min(result["rtts_ms"]) >= 20.0, result["rtts_ms"]  # 10 ms each way on the wire
        else:
            assert max(result["rtts_ms"]) < 5000
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
