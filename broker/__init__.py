"""The specmq broker (never imports torch).

- ``broker.broker``: the broker: sockets, the main loop and handlers named after messages (Majordomo style).
- ``broker.state``: its explicit state (workers, sessions, jobs, queues), the counters and ``stats_snapshot``.
- ``broker.frames``: fast, validated parsing of untrusted frames (same verdicts as ``protocol.codec``).
- ``broker.routing``: session placement policies, shared with the simulator.
- ``broker.client``: async DEALER client for drafts and generate clients.
- ``broker.echo_worker``: model-free worker for tests and benchmarks.
- ``broker.cli``: ``specmq broker``.
"""
