"""Capture files: the broker records every frame; the reader survives truncation, corruption and rotation."""
from __future__ import annotations

import subprocess
import sys
import json

import msgpack
import pytest

from broker.capture import CaptureError, CaptureWriter, iter_records, summarize
from broker.client import BrokerClient
from protocol.codec import encode
from protocol.messages import SessionOpen, Verify
from tests.conftest import run_async
from tests.ops_helpers import drive, echo_workers, wait_settled, wait_workers


def _write(path, n: int = 10, max_bytes: int = 0) -> CaptureWriter:
    w = CaptureWriter(path, {"frontend": "tcp://x:1"}, max_bytes=max_bytes)
    for i in range(n):
        w.tap("in", "frontend", b"peer1", encode(SessionOpen(session=f"s{i}", prompt_ids=[1, 2])))
        w.tap("in", "frontend", b"peer1", encode(Verify(session=f"s{i}", seq=0, pos=2, tokens=[3])))
        w.tap("out", "backend", b"wk", b"\x81\xa4type\xa6verify")
    w.close()
    return w


def test_roundtrip_and_summary(tmp_path):
    path = tmp_path / "c.capture"
    _write(path, 10)
    recs = list(iter_records(path))
    assert len(recs) == 30 and recs[0]["dir"] == "in" and recs[0]["side"] == "frontend" and recs[0]["peer"] == b"peer1"
    s = summarize(path)
    assert s["sessions"] == 10 and s["messages"]["session_open"] == 10 and s["messages"]["verify"] == 20
    assert s["client_messages"] == {"session_open": 10, "verify": 10}
    assert s["warnings"] == [] and s["version"] == 1


def test_rotation_by_size_is_read_as_one_capture(tmp_path):
    path = tmp_path / "c.capture"
    w = _write(path, 200, max_bytes=4000)
    assert w.part >= 2 and (tmp_path / "c.capture.1").exists()
    s = summarize(path)
    assert s["sessions"] == 200 and s["records"] == 600 and len(s["parts"]) == w.part + 1


def test_the_simulator_reads_a_rotated_capture_whole(tmp_path):
    """The simulator's workload loader reads through the same reader: every part, not just the first file."""
    from simulator.workload import KIND_SPEC, load_capture

    path = tmp_path / "c.capture"
    w = _write(path, 200, max_bytes=4000)
    assert w.part >= 2
    reqs = load_capture(path)
    assert len(reqs) == 200 and {r.kind for r in reqs} == {KIND_SPEC}
    assert all(r.prompt_tokens == 2 for r in reqs)


def test_truncated_tail_is_skipped_with_offset(tmp_path):
    path = tmp_path / "c.capture"
    _write(path, 10)
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # a crash mid-record
    s = summarize(path)
    assert s["records"] == 29
    assert len(s["warnings"]) == 1 and "truncated record" in s["warnings"][0] and "byte " in s["warnings"][0]


def test_corrupt_record_and_newer_version_warn_but_summarise(tmp_path):
    path = tmp_path / "c.capture"
    _write(path, 5)
    with open(path, "ab") as f:
        f.write(msgpack.packb([1, 2, 3]))  # not a record map
        f.write(msgpack.packb({"t": 1.0, "dir": "in", "peer": b"x", "body": b"\x80"}))
    s = summarize(path)
    assert s["records"] == 15 and "not a capture map" in s["warnings"][0]
    newer = tmp_path / "new.capture"
    newer.write_bytes(msgpack.packb({"format": "specmq-capture", "version": 2})
                      + msgpack.packb({"t": 0.0, "dir": "in", "side": "frontend", "peer": b"p",
                                       "body": encode(SessionOpen(session="a", prompt_ids=[1]))}))
    s = summarize(newer)
    assert s["sessions"] == 1 and "version 2" in s["warnings"][0]


def test_unreadable_header_is_an_error(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\xc1\xc1garbage")
    with pytest.raises(CaptureError, match="byte 0"):
        summarize(bad)
    with pytest.raises(CaptureError, match="not found"):
        summarize(tmp_path / "missing")


@pytest.mark.slow
def test_inspect_cli_exit_codes(tmp_path):
    path = tmp_path / "c.capture"
    _write(path, 3)
    path.write_bytes(path.read_bytes()[:-3])
    ok = subprocess.run([sys.executable, "-m", "specmq", "capture", "inspect", str(path), "--json"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert {"duration_s", "sessions", "messages"} <= set(summary) and summary["sessions"] == 3
    assert "warning" in ok.stderr and "byte" in ok.stderr
    (tmp_path / "bad").write_bytes(b"nope")
    bad = subprocess.run([sys.executable, "-m", "specmq", "capture", "inspect", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "byte 0" in bad.stderr


def test_broker_captures_every_frame_and_the_simulator_reads_it(make_broker, tmp_path):
    path = tmp_path / "broker.capture"
    b = make_broker(capture=str(path))

    async def main():
        async with echo_workers(b.backend, "target", "fused"):
            await wait_workers(b, 2)
            async with BrokerClient(b.frontend, timeout=5) as client:
                await drive(client, sessions=3, chunks=4, jobs=2)
                await wait_settled(b)  # the last closes land
            snap = b.snapshot()
            assert snap["capture"]["records"] > 0

    run_async(main(), timeout=60)
    b.stop()  # flushes and closes the file
    counters = b.broker.counters.as_dict()
    s = summarize(path)
    assert s["warnings"] == []
    assert s["client_messages"]["session_open"] == 3 and s["client_messages"]["verify"] == 12
    assert s["client_messages"]["generate"] == 2 and s["sessions"] == 3 and s["jobs"] == 2
    ins = sum(v for k, v in s["by_side"].items() if k.endswith("_in") for v in v.values())
    assert ins == sum(counters["msgs_in"].values())  # every frame in was recorded
    from simulator.workload import load_capture

    reqs = load_capture(path)
    assert len(reqs) == 5  # 3 sessions + 2 generate jobs


def test_a_failed_write_stops_capture_not_the_caller(tmp_path):
    failed = []
    w = CaptureWriter(tmp_path / "c.capture", on_fail=lambda: failed.append(1))

    class Full:
        def write(self, data):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    w._fh = Full()
    w.tap("in", "frontend", b"p", encode(SessionOpen(session="s", prompt_ids=[1])))
    w.flush()
    assert failed == [1] and "No space left" in w.info()["failed"]
    w.tap("in", "frontend", b"p", b"x")  # now a no-op
    w.close()
