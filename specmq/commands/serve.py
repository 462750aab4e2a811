"""``specmq serve``: the OpenAI-compatible HTTP gateway (``gateway.server``) in front of a broker's generate queue."""
from __future__ import annotations

import argparse
import asyncio
import signal

from specmq.cliutil import CommandError, add_command, positive

DEFAULT_LISTEN = "127.0.0.1:8000"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` -> (host, port); loopback when no host is given."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "", value
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise CommandError(f"--listen {value!r}: expected HOST:PORT with a port in 0..65535")
    return host, int(port)


def _run(args: argparse.Namespace) -> int:
    from gateway.server import GatewayConfig, read_api_keys, serve_gateway

    host, port = parse_listen(args.listen)
    for name in ("default_max_tokens", "max_body"):
        positive(name.replace("_", "-"), getattr(args, name))
    for name in ("health_interval", "broker_timeout", "job_timeout"):
        positive(name.replace("_", "-"), getattr(args, name), minimum=0.01)
    if not 0 <= args.gamma <= 64:
        raise CommandError(f"--gamma must be in 0..64, got {args.gamma}")
    config = GatewayConfig(broker=args.broker, host=host, port=port, tokenizer=args.tokenizer,
                           model_name=args.model_name, api_keys=read_api_keys(args.api_key_file) if args.api_key_file
                           else (), default_max_tokens=args.default_max_tokens, gamma=args.gamma,
                           max_body=args.max_body, health_interval=args.health_interval,
                           broker_timeout=args.broker_timeout, job_timeout=args.job_timeout)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_gateway(config, stop, on_ready=lambda gw: print(f"specmq serve: ready {gw.url} "
                                                                     f"model={gw.model_name}", flush=True))

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from gateway.server import DEFAULT_TOKENIZER

    p = add_command(sub, "serve", help="OpenAI-compatible HTTP gateway over the generate queue",
                    description="Serve POST /v1/completions and /v1/chat/completions (OpenAI's API, streamed or "
                                "not), GET /v1/models, /health and /metrics; every request is a generate job for "
                                "the broker's fused workers.",
                    example="specmq serve --broker tcp://127.0.0.1:5555 --listen 0.0.0.0:8000 --model-name tiny "
                            "--api-key-file keys.txt", func=_run)
    p.add_argument("--broker", default="tcp://127.0.0.1:5555", help="broker frontend (default: tcp://127.0.0.1:5555)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HTTP address HOST:PORT (default: {DEFAULT_LISTEN})")
    p.add_argument("--tokenizer", "--model", dest="tokenizer", default=str(DEFAULT_TOKENIZER),
                   help="model directory whose tokenizer.json (and chat template) the gateway uses; the fused "
                        "workers must serve a model with this tokenizer (default: shipped models/tiny-target)")
    p.add_argument("--model-name", default="", help="model id clients name in requests and /v1/models (default: "
                   "the tokenizer directory's name)")
    p.add_argument("--api-key-file", default="", help="file of accepted API keys, one per line; requests must send "
                   "'Authorization: Bearer KEY' (default: no authentication)")
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="max_tokens of chat requests that name none (default: 256; completions: 16, as OpenAI)")
    p.add_argument("--gamma", type=int, default=0, help="draft tokens per round for requests that name none "
                   "(0: the fused worker's default)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default: 1 MiB)")
    p.add_argument("--health-interval", type=float, default=1.0,
                   help="seconds between stats requests to the broker (default: 1)")
    p.add_argument("--broker-timeout", type=float, default=3.0,
                   help="seconds without a broker answer before requests get 503 (default: 3)")
    p.add_argument("--job-timeout", type=float, default=600.0,
                   help="seconds a job may send nothing before it fails with 504 (default: 600)")
