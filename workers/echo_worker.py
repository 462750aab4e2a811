"""A model-free worker for tests and benchmarks (``specmq echo-worker`` runs it).

As a target it answers SessionOpen with SessionOpened and Verify with a Result that accepts every draft token
plus one bonus token; as a fused worker it streams a few Tokens and then Done. It speaks the real protocol through
``workers.link.WorkerLink`` (Ready, heartbeats, credit, reconnect), so it exercises the broker like a real worker.
"""
from __future__ import annotations

import asyncio

import structlog

from protocol.messages import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_LIVENESS,
    KIND_TARGET,
    Disconnect,
    Done,
    Generate,
    Message,
    Ready,
    Result,
    SessionClose,
    SessionOpen,
    SessionOpened,
    Tokens,
    Verify,
)
from workers.link import WorkerLink

log = structlog.get_logger("echo_worker")


def answer(msg: Message, name: str = "echo", vocab_size: int = 32000, stream_tokens: int = 3) -> list[Message]:
    """The echo worker's whole behaviour: the replies to one request (pure, shared with the benchmark). Every reply
    echoes the request's ``incarnation`` (the broker drops answers of an earlier registration)."""
    if isinstance(msg, Verify):
        bonus = (msg.tokens[-1] + 1) % vocab_size if msg.tokens else 0
        return [Result(session=msg.session, seq=msg.seq, accepted=len(msg.tokens), tokens=msg.tokens + [bonus],
                       pos=msg.pos + len(msg.tokens) + 1, sent_at=msg.sent_at, incarnation=msg.incarnation)]
    if isinstance(msg, SessionOpen):
        return [SessionOpened(session=msg.session, pos=len(msg.prompt_ids), worker=name, incarnation=msg.incarnation)]
    if isinstance(msg, Generate):
        out: list[Message] = []
        ids: list[int] = []
        for i in range(min(stream_tokens, max(1, msg.max_new_tokens))):
            out.append(Tokens(job=msg.job, tokens=[i + 1], text=f"t{i + 1} ", index=i, incarnation=msg.incarnation))
            ids.append(i + 1)
        out.append(Done(job=msg.job, token_ids=ids, text="".join(t.text for t in out), finish_reason="length",
                        stats={"delivery": msg.delivery}, incarnation=msg.incarnation))
        return out
    return []


async def serve_echo(broker: str, kind: str = KIND_TARGET, *, capacity: int = 256, name: str = "echo",
                     vocab_size: int = 32000, heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
                     liveness: int = HEARTBEAT_LIVENESS,
                     delay_ms: float = 0.0, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or forever). ``delay_ms`` simulates a slow worker per batch."""
    ready = Ready(kind=kind, model="echo", capacity=capacity, vocab_size=vocab_size, worker=name, max_gamma=64)
    served = 0
    async with WorkerLink(broker, ready, heartbeat_interval=heartbeat_interval, liveness=liveness,
                          initial_credit=capacity, stats=lambda: {"served": served, "slots_total": capacity}) as link:
        stop = stop or asyncio.Event()
        while not stop.is_set():
            batch = await link.recv_batch(timeout=0.2)
            if delay_ms and batch:
                await asyncio.sleep(delay_ms / 1000)
            done = 0
            for msg in batch:
                if isinstance(msg, Disconnect):
                    continue  # re-registered: the link already re-granted full credit
                for reply in answer(msg, name, vocab_size):
                    if not link.send_nowait(reply):
                        await link.send(reply)
                if isinstance(msg, (Verify, SessionOpen, SessionClose, Generate)):
                    done += 1
            served += done
            link.grant(done)
