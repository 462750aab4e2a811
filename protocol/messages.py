"""The specmq wire protocol, written down first (as the Majordomo spec is).

Every message is a msgpack map ``{"v": VERSION, "type": <TYPE>, ...fields}``. On ROUTER sockets it follows the
peer's identity frame; DEALER peers send and receive the single body frame. The dataclasses below are the
protocol: the codec (``protocol.codec``) encodes them and validates untrusted input against their fields.

Naming: ``session`` ids are chosen by the drafter (unique per client), ``job`` ids by the generate client.
``incarnation`` fences stale answers: a worker registers with a fresh one (``Ready.incarnation``) on every
(re)registration, the broker stamps it on every request it forwards, the worker echoes the incarnation of the request
it answers, and the broker drops answers of any other incarnation (protocol/FLOW.md, "Fencing").
``pos`` is always the number of tokens already committed in the session (prompt + accepted output), so a
chunk's first draft token sits at position ``pos``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

VERSION = 1

# Liveness constants (Majordomo style: one place, at the top). Brokers and workers may override by config.
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_LIVENESS = 3  # a peer is dead after this many missed beats

# Worker kinds announced in READY.
KIND_TARGET = "target"
KIND_FUSED = "fused"
WORKER_KINDS = (KIND_TARGET, KIND_FUSED)


@dataclass
class Message:
    """Base class; ``TYPE`` is the wire ``type`` string."""

    TYPE: ClassVar[str] = ""


# --------------------------------------------------------------------------- client -> broker -> target
@dataclass
class SessionOpen(Message):
    """Open (or re-open after re-placement) a speculative session.

    ``prompt_ids`` is every committed token so far: the prompt on first open, prompt + accepted output when the
    broker asks the drafter to re-send context after its target died.
    """

    TYPE: ClassVar[str] = "session_open"
    session: str
    prompt_ids: list[int]
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    tokenizer: str = ""  # tokenizer fingerprint; targets refuse a mismatch
    policy: str = "exact"  # acceptance policy name (workers.acceptance)
    policy_args: dict = field(default_factory=dict)
    model: str = ""  # requested target model id ("" = any)
    incarnation: int = 0  # set by the broker: the target's registration this was forwarded under (fencing)
    queue_timeout_s: float = 0.0  # how long the client waits in the broker's admission queue; 0 = broker default


@dataclass
class Verify(Message):
    """A draft chunk: ``tokens`` proposed at positions ``pos .. pos+len-1``.

    When sampling, ``q_*`` carry the distribution q that each draft token was drawn from, packed (a full-vocabulary
    q is thousands of numbers per token; ``protocol.codec.pack_q`` / ``unpack_q`` / ``check_q``):

    - dense: ``q_probs`` is len(tokens) rows of float32 (little-endian), entry j of row i is q_i(j); ``q_ids`` and
      ``q_lens`` are None. 4 bytes per vocabulary entry per token (a 128k vocabulary: 0.5 MB per token, past the
      broker's default 1 MiB frame limit from γ 3; truncate with top-k / top-p or raise ``--max-frame``).
    - sparse: row i is the next ``q_lens[i]`` entries of ``q_ids`` (uint32, ascending) and ``q_probs`` (float32);
      q is zero elsewhere (exact: that is q's whole support). Used when the support is small (top-k / top-p).

    The target judges with exactly these float32 values (rows sum to 1 within 1e-3 and are renormalised), so the
    drafter draws from them too. ``seq`` increases by one per chunk of a session; a resend of the same ``seq``
    returns the cached result.
    """

    TYPE: ClassVar[str] = "verify"
    session: str
    seq: int
    pos: int
    tokens: list[int]
    q_ids: bytes | None = None
    q_probs: bytes | None = None
    q_lens: list[int] | None = None
    sent_at: float = 0.0  # sender's clock, echoed back for latency accounting
    decode: int = 0  # with no draft tokens: the target decodes this many tokens itself (decode mode, γ = 0)
    draft_ms: float = 0.0  # drafter's time to draft this chunk (goodput controller input; 0 = not measured)
    path_ms: float = 0.0  # what the drafter's last round cost beyond drafting and verifying: link, broker, loops,
    # and every wait (for a draft step, at the target); goodput controller input
    catchup_ms: float = 0.0  # of draft_ms's step, what feeding tokens the draft had not seen cost (prompt, decoded
    catchup_tokens: int = 0  # output): the controller prices a probe's catch-up with it (0 = not measured)
    incarnation: int = 0  # set by the broker: the target's registration this was forwarded under (fencing)


@dataclass
class Result(Message):
    """Outcome of verifying one chunk.

    ``accepted`` draft tokens were kept; ``tokens`` is the committed extension: the accepted draft prefix plus the
    target's own token (correction or bonus). ``pos`` is the new committed length. ``finished`` says the target
    saw EOS or the session's token budget is spent.

    Timing, so the drafter can split its round trip: ``verify_ms`` is the answering tick's forward; ``queue_ms`` the
    chunk's wait at the target from arrival to that tick's start, of which ``busy_wait_ms`` passed while earlier
    ticks ran (the device was busy: a pipeline wait) and the rest, ``queue_ms - busy_wait_ms``, was the gather
    window (the device idle, waiting up to ``tick_ms`` for company) plus the loop's handling.
    """

    TYPE: ClassVar[str] = "result"
    session: str
    seq: int
    accepted: int
    tokens: list[int]
    pos: int
    finished: bool = False
    sent_at: float = 0.0
    verify_ms: float = 0.0  # time the chunk spent in the target's forward pass
    queue_ms: float = 0.0  # time the chunk waited at the target before its tick
    busy_wait_ms: float = 0.0  # the part of queue_ms spent while an earlier tick was running
    next_gamma: int = -1  # the target's choice for the session's next chunk (0: decode mode; -1: no advice)
    incarnation: int = 0  # echoed from the Verify it answers (fencing)
    broker: str = ""  # instance id of the broker that sent it on (the broker sets it on every reply to a client)


@dataclass
class SessionOpened(Message):
    """Target's answer to SESSION_OPEN: the session holds a slot and its prompt is prefilled."""

    TYPE: ClassVar[str] = "session_opened"
    session: str
    pos: int
    worker: str = ""
    token: int = -1  # target's first token after the prompt when it has one (greedy/sampled), else -1
    incarnation: int = 0  # echoed from the SessionOpen it answers (fencing)
    broker: str = ""
    next_gamma: int = -1  # the target's choice for the first chunk, as in Result (a decoding fleet: no first draft)


@dataclass
class SessionClose(Message):
    TYPE: ClassVar[str] = "session_close"
    session: str
    incarnation: int = 0  # set by the broker: the target's registration this was forwarded under (fencing)


@dataclass
class Reopen(Message):
    """Broker -> drafter: your target is gone; re-send SESSION_OPEN with every committed token."""

    TYPE: ClassVar[str] = "reopen"
    session: str
    reason: str = ""
    broker: str = ""


# --------------------------------------------------------------------------- generate queue (fused workers)
@dataclass
class Generate(Message):
    """A whole-generation job. Either ``prompt`` (text; the fused worker tokenizes) or ``prompt_ids``."""

    TYPE: ClassVar[str] = "generate"
    job: str
    prompt: str = ""
    prompt_ids: list[int] | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    gamma: int = 4
    policy: str = "exact"
    policy_args: dict = field(default_factory=dict)
    stream: bool = True
    delivery: int = 0  # set by the broker: how many times this job was handed out before
    incarnation: int = 0  # set by the broker: the fused worker's registration it was handed out under (fencing)
    queue_timeout_s: float = 0.0  # how long the client waits in the generate queue; 0 = broker default


@dataclass
class Tokens(Message):
    """Streamed progress of a generate job: newly committed tokens (and their text when known)."""

    TYPE: ClassVar[str] = "tokens"
    job: str
    tokens: list[int]
    text: str = ""
    index: int = 0  # running count of tokens before this message
    incarnation: int = 0  # echoed from the Generate it belongs to (fencing)
    broker: str = ""


@dataclass
class Done(Message):
    """A generate job finished (also the worker's ack: the broker forgets the job only on DONE)."""

    TYPE: ClassVar[str] = "done"
    job: str
    token_ids: list[int]
    text: str = ""
    finish_reason: str = "length"
    stats: dict = field(default_factory=dict)
    incarnation: int = 0  # echoed from the Generate it answers (fencing)
    broker: str = ""


@dataclass
class Cancel(Message):
    """Client -> broker -> fused worker: nobody waits for this job any more (its HTTP client hung up, a stop string
    matched). The broker drops it from the generate queue or forwards it to the worker holding it, which frees the
    job's slots and returns its credit. No answer; a job already over is left alone."""

    TYPE: ClassVar[str] = "cancel"
    job: str
    reason: str = ""
    incarnation: int = 0  # set by the broker on the way to the fused worker (fencing)


# --------------------------------------------------------------------------- worker <-> broker
@dataclass
class Ready(Message):
    """Worker registration. ``capacity``: session slots (target) or concurrent jobs (fused).

    ``incarnation`` is picked afresh on every (re)registration (``workers.link.WorkerLink`` does it): the broker
    accepts answers only when they echo the incarnation of the worker's current registration, so an answer computed
    for an earlier registration (a tick that finished after the link reconnected) can never pass for a new one.
    """

    TYPE: ClassVar[str] = "ready"
    kind: str
    model: str
    capacity: int
    vocab_size: int = 0
    tokenizer: str = ""
    max_gamma: int = 16
    max_context: int = 0
    worker: str = ""  # human-readable name
    incarnation: int = 0  # this registration's id (0: the worker does not fence its answers)


@dataclass
class Heartbeat(Message):
    """Liveness, both ways. Workers attach their own figures (tick time, batch size, slots used) in ``stats``.

    Clients send heartbeats too while they wait for answers; the broker answers each with its ``broker`` instance
    id, so a client notices a restarted broker within a beat or two instead of after a request timeout.
    """

    TYPE: ClassVar[str] = "heartbeat"
    stats: dict = field(default_factory=dict)
    broker: str = ""


@dataclass
class Credit(Message):
    """Worker -> broker: I can take ``n`` more generate jobs (fused) or chunks (target)."""

    TYPE: ClassVar[str] = "credit"
    n: int


@dataclass
class Disconnect(Message):
    TYPE: ClassVar[str] = "disconnect"
    reason: str = ""


# --------------------------------------------------------------------------- errors and backpressure
@dataclass
class Error(Message):
    """An error reply. ``code`` is stable (see ``protocol.errors``); ``message`` is for humans.

    ``session`` / ``seq`` / ``job`` name what the error is about when known.
    """

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    session: str = ""
    seq: int = -1
    job: str = ""
    incarnation: int = 0  # from a worker: echoed from the request it refuses (fencing)
    broker: str = ""


@dataclass
class Busy(Message):
    """Backpressure: the queue is full; retry after ``retry_ms``. Nothing was enqueued."""

    TYPE: ClassVar[str] = "busy"
    retry_ms: int
    queue: str = ""
    session: str = ""
    seq: int = -1
    job: str = ""
    incarnation: int = 0  # from a worker: echoed from the request it refuses (fencing)
    broker: str = ""


# --------------------------------------------------------------------------- observability
@dataclass
class StatsRequest(Message):
    """Client -> broker: send me one stats snapshot (``specmq monitor --once``)."""

    TYPE: ClassVar[str] = "stats_request"


@dataclass
class Stats(Message):
    TYPE: ClassVar[str] = "stats"
    snapshot: dict = field(default_factory=dict)
    broker: str = ""


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        SessionOpen,
        Verify,
        Result,
        SessionOpened,
        SessionClose,
        Reopen,
        Generate,
        Tokens,
        Done,
        Cancel,
        Ready,
        Heartbeat,
        Credit,
        Disconnect,
        Error,
        Busy,
        StatsRequest,
        Stats,
    )
}


# Which side may send what: the broker's frontend accepts only CLIENT_TYPES, its backend only WORKER_TYPES.
CLIENT_TYPES: frozenset[str] = frozenset(cls.TYPE for cls in (SessionOpen, Verify, SessionClose, Generate, Cancel,
                                                              StatsRequest, Heartbeat))
WORKER_TYPES: frozenset[str] = frozenset(cls.TYPE for cls in (Ready, Heartbeat, Credit, Disconnect, Result,
                                                              SessionOpened, Error, Busy, Tokens, Done))


def as_dict(msg: Message) -> dict[str, Any]:
    """Field values of a message (no version/type)."""
    return {k: getattr(msg, k) for k in msg.__dataclass_fields__}
