"""The wire protocol: codec round trip for every message type, and every validation error code."""
from __future__ import annotations

import msgpack
import pytest

from protocol import errors as E
from protocol.codec import check_tokens, decode, encode, pack_q
from protocol.errors import ProtocolError
from protocol.frames import check_vocab, parse
from protocol.messages import (
    MESSAGE_TYPES,
    VERSION,
    Busy,
    Cancel,
    Credit,
    Disconnect,
    Done,
    Error,
    Generate,
    Heartbeat,
    Ready,
    Reopen,
    Result,
    SessionClose,
    SessionOpen,
    SessionOpened,
    Stats,
    StatsRequest,
    Tokens,
    Verify,
)

SAMPLES = [
    SessionOpen(session="s", prompt_ids=[1, 2, 3], max_new_tokens=8, temperature=0.7, top_p=0.9, seed=3,
                tokenizer="fp", policy="exact", policy_args={"k": 2}, model="m"),
    Verify(session="s", seq=2, pos=5, tokens=[4, 5], **dict(zip(("q_ids", "q_probs", "q_lens"), pack_q(
        [([4, 9], [0.5, 0.5]), ([5], [1.0])]))), sent_at=1.5),
    Verify(session="s", seq=2, pos=5, tokens=[1, 0], q_probs=pack_q([(None, [0.0, 1.0]), (None, [0.5, 0.5])])[1]),
    Verify(session="s", seq=0, pos=3, tokens=[7]),
    Result(session="s", seq=2, accepted=1, tokens=[4, 6], pos=7, finished=True, sent_at=1.5, verify_ms=2.0),
    SessionOpened(session="s", pos=3, worker="w", token=11),
    SessionClose(session="s"),
    Reopen(session="s", reason="target_gone"),
    Generate(job="j", prompt="hi", max_new_tokens=4, delivery=1),
    Generate(job="j", prompt_ids=[1, 2]),
    Tokens(job="j", tokens=[1], text="a", index=0),
    Done(job="j", token_ids=[1, 2], text="ab", finish_reason="eos", stats={"x": 1}),
    Cancel(job="j", reason="client gone"),
    Ready(kind="target", model="m", capacity=8, vocab_size=100, tokenizer="fp", max_gamma=8, max_context=512,
          worker="w"),
    Heartbeat(stats={"tick_ms": 1.0}),
    Credit(n=4),
    Disconnect(reason="bye"),
    Error(code=E.BAD_FIELD, message="m", session="s", seq=1, job=""),
    Busy(retry_ms=10, queue="generate", job="j"),
    StatsRequest(),
    Stats(snapshot={"queues": {}}),
]


def test_samples_cover_every_type():
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg):
    frame = encode(msg)
    assert decode(frame) == msg
    body = parse(frame, 1 << 20)  # the broker's fast parser agrees
    assert body["type"] == msg.TYPE and body["v"] == VERSION


def _raw(**body) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


BAD = [
    (b"\xc1garbage", E.BAD_ENCODING),
    (msgpack.packb([1, 2, 3]), E.BAD_ENCODING),
    (_raw(v=99, type="credit", n=1), E.BAD_VERSION),
    (_raw(type="credit", n=1), E.BAD_VERSION),
    (_raw(v=VERSION, type="nope"), E.UNKNOWN_TYPE),
    (_raw(v=VERSION, type=5), E.UNKNOWN_TYPE),
    (_raw(v=VERSION, type="credit"), E.BAD_FIELD),  # missing n
    (_raw(v=VERSION, type="credit", n="4"), E.BAD_FIELD),  # mistyped
    (_raw(v=VERSION, type="credit", n=True), E.BAD_FIELD),  # bool is not int
    (_raw(v=VERSION, type="credit", n=1, extra=2), E.BAD_FIELD),  # unexpected field
    (_raw(v=VERSION, type="verify", session="s", seq=0, pos=0, tokens=[1, "x"]), E.BAD_FIELD),
    (_raw(v=VERSION, type="verify", session="s", seq=0, pos=0, tokens=[-1]), E.TOKEN_OUT_OF_RANGE),
    (_raw(v=VERSION, type="verify", session="s", seq=1 << 63, pos=0, tokens=[1]), E.BAD_FIELD),
    (_raw(v=VERSION, type="verify", session="s", seq=0, pos=0, tokens=[1], q_ids=[[1]]), E.BAD_FIELD),
    (_raw(v=VERSION, type="verify", session="s", seq=0, pos=0, tokens=[1], q_ids=[[1]], q_probs=[[2.0]]),
     E.BAD_FIELD),
    (_raw(v=VERSION, type="result", session="s", seq=0, accepted=0, tokens=[1], pos=1, finished=1), E.BAD_FIELD),
    (_raw(v=VERSION, type="session_open", session=3, prompt_ids=[1]), E.BAD_FIELD),
]


@pytest.mark.parametrize("frame,code", BAD)
def test_validation_errors(frame, code):
    with pytest.raises(ProtocolError) as codec_err:
        decode(frame)
    assert codec_err.value.code == code
    with pytest.raises(ProtocolError) as fast_err:
        parse(frame, 1 << 20)
    assert fast_err.value.code == code


def test_oversize_frame():
    frame = encode(SessionOpen(session="s", prompt_ids=list(range(1000))))
    for fn in (lambda: decode(frame, max_frame=100), lambda: parse(frame, 100)):
        with pytest.raises(ProtocolError) as err:
            fn()
        assert err.value.code == E.TOO_LARGE


def test_vocab_checks():
    with pytest.raises(ProtocolError) as err:
        decode(encode(Verify(session="s", seq=0, pos=0, tokens=[5, 100])), vocab_size=100)
    assert err.value.code == E.TOKEN_OUT_OF_RANGE
    with pytest.raises(ProtocolError):
        check_tokens([0, 100], 100)
    check_tokens([0, 99], 100)
    assert check_vocab({"tokens": [1, 150]}, "tokens", 100) == 150
    assert check_vocab({"tokens": [1, 99]}, "tokens", 100) is None
    assert check_vocab({"tokens": [10 ** 6]}, "tokens", 0) is None  # unknown vocab: no check


def test_all_codes_stable():
    assert E.POISON_JOB in E.ALL_CODES and E.SHUTTING_DOWN in E.ALL_CODES and E.BAD_FRAMES in E.ALL_CODES


def test_fast_paths_take_the_controller_fields():
    """Results with the controller's advice and decode-mode / costed chunks stay on the brokers' fast path."""
    import msgpack

    from protocol.frames import _fast_result, _fast_verify
    from protocol.messages import Result

    res = msgpack.unpackb(encode(Result(session="s", seq=1, accepted=2, tokens=[3, 4, 5], pos=9, next_gamma=0,
                                        queue_ms=3.5, busy_wait_ms=2.5)))
    assert _fast_result(res) and res["busy_wait_ms"] == 2.5
    assert not _fast_result({**res, "busy_wait_ms": "2.5"})  # mistyped: the codec's checks answer it
    ver = msgpack.unpackb(encode(Verify(session="s", seq=2, pos=9, tokens=[], decode=8, draft_ms=1.5, path_ms=2)))
    assert _fast_verify(ver)
    assert not _fast_verify({**ver, "decode": "8"}) and not _fast_result({**res, "next_gamma": 1.5})
