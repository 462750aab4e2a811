"""The draft distribution q on the wire: packed rows round-trip exactly, and every malformed q gets a clear error.

Both parsers are checked: ``protocol.codec.decode`` (clients, tests) and ``protocol.frames.parse`` (the broker's
and the workers' edge), which must give the same verdicts.
"""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from protocol import errors as E
from protocol.codec import MAX_TOKEN_ID, check_q, decode, encode, pack_q, unpack_q
from protocol.errors import ProtocolError
from protocol.frames import parse, to_message
from protocol.messages import VERSION, Verify
from workers.sampling import round_generator, sample_draft_q
from workers.speculation import DraftChunk, q_from_wire

V = 512


def _drafted(n: int, temperature: float = 0.8, top_p: float = 1.0, top_k: int = 0) -> DraftChunk:
    """A chunk of n draft tokens drawn by ``sample_draft_q`` from fixed random logits."""
    gen = round_generator(5, 7, 1)
    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(3)) * 3
    chunk = DraftChunk([], [], [])
    for row in logits:
        tok, ids, probs = sample_draft_q(row, temperature, top_p, top_k, gen)
        chunk.tokens.append(tok)
        chunk.q_ids.append(ids)  # type: ignore[union-attr]
        chunk.q_probs.append(probs)  # type: ignore[union-attr]
    return chunk


def _through_both_parsers(msg: Verify) -> list[Verify]:
    frame = encode(msg)
    return [decode(frame), to_message(parse(frame, 1 << 20))]


def _dense(ids, probs) -> np.ndarray:
    out = np.zeros(V, dtype=np.float32)
    if ids is None:
        out[:len(probs)] = np.asarray(probs)
    else:
        out[np.asarray(ids)] = np.asarray(probs)
    return out


@pytest.mark.parametrize("top_p,top_k,dense", [(1.0, 0, True), (0.9, 0, False), (1.0, 20, False)])
def test_q_round_trips_exactly(top_p, top_k, dense):
    chunk = _drafted(4, top_p=top_p, top_k=top_k)
    assert all((ids is None) == dense for ids in chunk.q_ids)
    msg = Verify(session="s", seq=1, pos=9, tokens=chunk.tokens, **chunk.q_wire())
    assert (msg.q_ids is None) == dense and (msg.q_lens is None) == dense
    for got in _through_both_parsers(msg):
        assert got == msg
        q_ids, q_probs = q_from_wire(len(got.tokens), got.q_ids, got.q_probs, got.q_lens)
        for tok, ids, probs, want_ids, want in zip(chunk.tokens, q_ids, q_probs, chunk.q_ids, chunk.q_probs):
            assert probs.dtype == torch.float32 and torch.equal(probs, want)  # bit for bit
            assert (ids is None and want_ids is None) or torch.equal(ids, want_ids)
            assert _dense(ids, probs)[tok] > 0  # the token lies in its own support


def test_mixed_rows_go_sparse_and_keep_every_value():
    dense_row = torch.softmax(torch.randn(V), -1).float()
    sparse_ids, sparse_p = torch.tensor([3, 40, 7]), torch.tensor([0.5, 0.25, 0.25])
    q_ids, q_probs, q_lens = pack_q([(None, dense_row), (sparse_ids, sparse_p)])
    assert q_ids is not None and q_lens == [int((dense_row > 0).sum()), 3]
    rows = unpack_q(2, q_ids, q_probs, q_lens)
    assert np.array_equal(_dense(*rows[0]), dense_row.numpy())
    assert rows[1][0].tolist() == [3, 7, 40] and rows[1][1].tolist() == [0.5, 0.25, 0.25]  # ascending ids
    assert unpack_q(2, None, None, None) is None


def _dense_bytes(*rows) -> bytes:
    return np.asarray(rows, dtype="<f4").tobytes()


def _ids(*ids) -> bytes:
    return np.asarray(ids, dtype="<u4").tobytes()


def _probs(*probs) -> bytes:
    return np.asarray(probs, dtype="<f4").tobytes()


NAN, INF = float("nan"), float("inf")
BAD_Q = [  # (tokens, q fields, code, words the message must contain)
    ([1, 2], dict(q_probs=_dense_bytes([0.5, 0.5, 0.0])), E.BAD_FIELD, "not 2 equal rows"),
    ([1], dict(q_probs=b"\x00\x00\x80\x3f\x00"), E.BAD_FIELD, "float32"),
    ([1], dict(q_ids=_ids(1), q_probs=_probs(1.0)), E.BAD_FIELD, "together"),
    ([1], dict(q_lens=[1]), E.BAD_FIELD, "need q_probs"),
    ([], dict(q_probs=_dense_bytes([1.0])), E.BAD_FIELD, "without draft tokens"),
    ([1, 2], dict(q_ids=_ids(1, 2), q_probs=_probs(1.0, 1.0), q_lens=[1]), E.BAD_FIELD, "one entry per draft token"),
    ([1, 2], dict(q_ids=_ids(1, 2), q_probs=_probs(1.0, 1.0), q_lens=[1, 0]), E.BAD_FIELD, "q_lens"),
    ([1], dict(q_ids=_ids(1, 2), q_probs=_probs(0.5, 0.5), q_lens=[3]), E.BAD_FIELD, "q_lens"),
    ([1], dict(q_ids=_ids(1, 2), q_probs=_probs(1.0), q_lens=[1]), E.BAD_FIELD, "q_lens sums to 1"),
    ([1], dict(q_ids=_ids(1, 2)[:7], q_probs=_probs(1.0, 0.0), q_lens=[2]), E.BAD_FIELD, "uint32"),
    ([1], dict(q_ids=_ids(1, MAX_TOKEN_ID), q_probs=_probs(0.5, 0.5), q_lens=[2]), E.TOKEN_OUT_OF_RANGE,
     "outside [0, "),
    ([1], dict(q_ids=_ids(2, 1), q_probs=_probs(0.5, 0.5), q_lens=[2]), E.BAD_FIELD, "ascending"),
    ([1], dict(q_ids=_ids(1, 1), q_probs=_probs(0.5, 0.5), q_lens=[2]), E.BAD_FIELD, "duplicate"),
    ([1], dict(q_ids=_ids(1, 2), q_probs=_probs(NAN, 1.0), q_lens=[2]), E.BAD_FIELD, "not finite"),
    ([1], dict(q_probs=_dense_bytes([INF, 0.0])), E.BAD_FIELD, "not finite"),
    ([1, 2], dict(q_probs=_dense_bytes([0.5, 0.5], [NAN, 1.0])), E.BAD_FIELD, "not finite"),
    ([1], dict(q_probs=_dense_bytes([INF, -INF])), E.BAD_FIELD, "not finite"),
    ([1], dict(q_probs=_dense_bytes([-0.5, 1.5])), E.BAD_FIELD, "negative"),
    ([1], dict(q_ids=_ids(1, 2), q_probs=_probs(-0.5, 1.5), q_lens=[2]), E.BAD_FIELD, "negative"),
    ([1, 2], dict(q_probs=_dense_bytes([0.5, 0.5], [0.5, 0.4])), E.BAD_FIELD, "row 1 sums to 0.9"),
    ([1], dict(q_ids=_ids(1, 2), q_probs=_probs(0.7, 0.7), q_lens=[2]), E.BAD_FIELD, "sums to 1.4"),
    ([1], dict(q_ids=[[1]], q_probs=[[1.0]]), E.BAD_FIELD, "must be bytes"),  # lists of numbers: not this form
]


@pytest.mark.parametrize("tokens,fields,code,words", BAD_Q, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_q_gets_a_clear_error(tokens, fields, code, words):
    frame = msgpack.packb({"v": VERSION, "type": "verify", "session": "s", "seq": 0, "pos": 3, "tokens": tokens,
                           **fields}, use_bin_type=True)
    for parser in (lambda: decode(frame), lambda: parse(frame, 1 << 20)):
        with pytest.raises(ProtocolError) as err:
            parser()
        assert err.value.code == code and words in err.value.message, err.value.message


def test_vocab_bound_applies_to_both_forms():
    with pytest.raises(ProtocolError) as err:
        check_q(1, _ids(3, 100), _probs(0.5, 0.5), [2], vocab_size=100)
    assert err.value.code == E.TOKEN_OUT_OF_RANGE and "100" in err.value.message
    check_q(1, None, _dense_bytes([0.5, 0.5, 0.0]), None, vocab_size=2)  # zeros past the vocabulary are fine
    with pytest.raises(ProtocolError) as err:
        check_q(1, None, _dense_bytes([0.5, 0.0, 0.5]), None, vocab_size=2)
    assert err.value.code == E.TOKEN_OUT_OF_RANGE


def test_full_vocabulary_q_is_compact():
    chunk = _drafted(4)
    frame = encode(Verify(session="s", seq=1, pos=9, tokens=chunk.tokens, **chunk.q_wire()))
    assert len(frame) < 4 * V * 4 + 200  # float32 per vocabulary entry and little else
