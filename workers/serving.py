"""What every model-serving command shares: the shipped model paths, loading an engine with every failure as one
``ServingError`` line, and running an asyncio service until SIGINT/SIGTERM (then a clean Disconnect, exit 0)."""
from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Awaitable, Callable

import structlog

from protocol.errors import SpecmqError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TARGET_MODEL = REPO_ROOT / "models" / "tiny-target"
DEFAULT_DRAFT_MODEL = REPO_ROOT / "models" / "tiny-draft"
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"

log = structlog.get_logger("worker.engine")


class ServingError(SpecmqError):
    """A worker cannot start serving (model missing or unloadable, bad slot count): one line for the user."""


def load_engine_or_fail(model_dir: str | Path, *, device: str = "cpu", dtype: str = "float32", slots: int = 8,
                        max_context: int | None = None, backend: str = "auto", what: str = "model",
                        grow: str | dict | None = None):
    """``load_engine`` with every failure (missing or corrupt directory, device absent) as one line; ``grow``: the
    model grown in memory to that shape (``workers.engine.grow``)."""
    from workers.engine import EngineError, load_engine

    if not isinstance(slots, int) or slots < 1:
        raise ServingError(f"--slots must be >= 1, got {slots!r}")
    try:
        return load_engine(model_dir, device=device, dtype=dtype, slots=slots, max_context=max_context,
                           backend=backend, grow=grow or None)
    except EngineError as exc:
        raise ServingError(f"cannot load {what}: {exc}") from None
    except Exception as exc:  # corrupt weights (safetensors), shape mismatches, out of memory...
        first = (str(exc).splitlines() or [""])[0][:200]
        raise ServingError(f"cannot load {what} from {model_dir}: {type(exc).__name__}: {first}") from None


def capture_graphs(engine, what: str = "model") -> int:
    """Capture every CUDA graph the engine can serve with (``CudaGraphEngine.capture``) before the worker
    registers, so serving never stalls for a capture (one is ~0.05-0.3 s; lazily, a burst of new shapes held the
    worker's loop long enough for the broker to call it silent). Logs progress; returns the number captured."""
    import time

    if not getattr(engine, "graphs", False) or not hasattr(engine, "capture"):
        return 0
    t0 = time.monotonic()
    total = len(engine.default_shapes())
    log.info("graphs.capturing", model=what, graphs=total, path=getattr(engine, "path", None),
             why_portable=getattr(engine, "why_portable", None) or None)

    def progress(done: int, n: int) -> None:
        if done == n or done % 10 == 0:
            log.info("graphs.progress", model=what, done=done, total=n, seconds=round(time.monotonic() - t0, 1))

    n = engine.capture(progress=progress)
    log.info("graphs.captured", model=what, graphs=n, seconds=round(time.monotonic() - t0, 1))
    return n


def run_service(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run ``main(stop)`` until it returns; SIGINT/SIGTERM set ``stop`` so it can say Disconnect. Exit 0."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        asyncio.run(runner())
    except KeyboardInterrupt:
        pass
    return 0

