"""The specmq broker (never imports torch).

- ``broker.broker``: the broker: sockets, the main loop and handlers named after messages (Majordomo style).
- ``broker.state``: its explicit state (workers, sessions, jobs, queues), the counters and ``stats_snapshot``.
- ``broker.routing``: session placement policies, shared with the simulator.
- ``broker.ops``: operations surface: Prometheus metrics, the stats PUB socket, the capture writer's timer.
- ``broker.capture``: capture files (writer, the one reader, summary); ``broker.replay``: replay a capture.
- ``broker.client``: async DEALER client for drafts and generate clients; ``request_stats``, the one-shot stats.
- ``broker.monitor``: what ``specmq monitor`` computes and draws from stats snapshots.
- ``broker.curve``: CURVE keys and the allow-list.

Frame parsing lives in ``protocol.frames``; the command-line front ends live in ``specmq.commands``.
"""
