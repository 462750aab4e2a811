"""Simulation config: a nested YAML mapping over ``DEFAULTS``; ``--set a.b=value`` overrides any leaf.

Unknown keys are errors (typos should not silently do nothing), except inside the free-form maps
(``draft_classes``, ``links``, ``acceptance.pairs``) and the lists (``targets``) where users name their own things.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "duration_s": 20.0,  # virtual seconds of arrivals
    "burn_in_s": 2.0,  # arrivals and tokens before this are not measured
    "drain_s": 30.0,  # after duration, keep running up to this long so measured requests can finish
    "sample_ms": 100.0,  # queue-depth sampling period
    "architecture": "distributed",  # distributed | fused | mixed
    "fused_fraction": 0.5,  # mixed: share of requests sent to the generate queue
    "router": "jsq2",  # broker.routing name
    "gamma": 4,  # drafts' γ: an int (0 = decode mode: the target decodes alone) or "auto" (the goodput controller)
    "decode_tokens": 8,  # tokens one decode-mode request asks the target for
    "controller": {"max_gamma": 8, "tpot_slo_ms": None, "replan_ms": 100.0},  # the targets' goodput controller
    "costs": "configs/profiles/example-cpu.yaml",
    "broker": {"overhead_ms": 0.05, "verify_queue_max": 1024, "generate_queue_max": 4096, "retry_ms": 50.0},
    "drafts": {
        "count": 8,
        "sessions": 1,  # concurrent sessions one draft device runs
        "mix": {"laptop": 1.0},  # class name -> share of the drafts
    },
    "draft_classes": {
        "phone": {"slowdown": 6.0, "link": "cellular"},
        "laptop": {"slowdown": 2.0, "link": "wifi"},
        "server": {"slowdown": 1.0, "link": "datacenter"},
    },
    "links": {
        "cellular": {"latency_ms": 40.0, "jitter_ms": 15.0, "bandwidth_mbps": 20.0, "availability": 0.995},
        "wifi": {"latency_ms": 8.0, "jitter_ms": 4.0, "bandwidth_mbps": 100.0, "availability": 0.999},
        "datacenter": {"latency_ms": 0.2, "jitter_ms": 0.05, "bandwidth_mbps": 10000.0, "availability": 1.0},
    },
    "targets": [{"name": "t", "count": 2, "slots": 32, "max_batch_tokens": 512, "max_batch_rows": 64,
                 "prefill_chunk": 256, "tick_ms": 2.0, "costs": None,
                 "cost_scale": 1.0,  # x every forward's table cost: a CPU/GPU shared with other work
                 "tick_overhead_ms": 0.0,  # host time per tick outside the forward (plan, accept, answer)
                 "tick_row_overhead_ms": 0.0}],  # and per row of the tick: a tick of R rows adds R x this
    "fused": {"count": 0, "slots": 16, "max_batch_tokens": 512, "max_batch_rows": 32, "prefill_chunk": 256,
              "tick_ms": 0.0, "costs": None, "client_link": "datacenter", "gamma": None},
    "acceptance": {"alpha": 0.7, "rounds": None, "pairs": {}},
    "workload": {"arrival": "poisson", "rate": 20.0, "cv": 2.0, "speed": 1.0, "max_requests": 0, "think_s": 0.0,
                 "requests_per_user": 0,  # closed loop: requests each user sends, then it stops (0 = no limit)
                 "prompt_tokens": {"dist": "uniform", "low": 32, "high": 256},
                 "output_tokens": {"dist": "uniform", "low": 32, "high": 128},
                 "trace": None, "capture": None},
    "slo": {"ttft_ms": 1000.0, "tpot_ms": 200.0},
}

FREE_FORM = {"draft_classes", "links", "pairs", "mix"}
REPLACED = {"prompt_tokens", "output_tokens", "mix"}  # given as a whole, never merged key by key
ALIASES = {  # short names for --set / --vary
    "drafts": "drafts.count", "rate": "workload.rate", "alpha": "acceptance.alpha", "fused": "fused.count",
    "targets": "targets.0.count", "slots": "targets.0.slots", "tick_ms": "targets.0.tick_ms",
    "arrival": "workload.arrival",
}


class ConfigError(ValueError):
    pass


def _merge(base: Any, over: Any, where: str, free: bool = False) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for k, v in over.items():
            if k not in base and not free:
                raise ConfigError(f"unknown config key {where + str(k)!r}")
            if k in base and k not in REPLACED:
                out[k] = _merge(base[k], v, f"{where}{k}.", k in FREE_FORM)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(over, list) and base and isinstance(base[0], dict):
        return [_merge(base[0], o, f"{where}{i}.") for i, o in enumerate(over)]  # list items default to item 0
    return copy.deepcopy(over)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULTS, then the YAML file, then ``overrides`` (dotted keys)."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config {path} not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping")
        cfg = _merge(cfg, data, "")
        base = Path(path).parent
        cfg["_dir"] = str(base)
    for key, value in (overrides or {}).items():
        set_key(cfg, key, value)
    return cfg


def parse_value(text: str) -> Any:
    """YAML scalar parsing for ``--set k=v`` (so 3 is an int, 0.5 a float, true a bool, [a, b] a list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_key(cfg: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key (list items by index: ``targets.0.count``); aliases from ``ALIASES``."""
    key = ALIASES.get(key, key)
    parts = key.split(".")
    node: Any = cfg
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            try:
                node = node[int(p)]
            except (ValueError, IndexError):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not an index of the list") from None
        elif isinstance(node, dict) and p in node:
            node = node[p]
        else:
            raise ConfigError(f"--set {key}: unknown key {'.'.join(parts[:i + 1])!r}")
    last = parts[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError):
            raise ConfigError(f"--set {key}: {last} is not an index of the list") from None
        return
    if not isinstance(node, dict) or (last not in node and parts[-2:-1] and parts[-2] not in FREE_FORM):
        raise ConfigError(f"--set {key}: unknown key {key!r}")
    node[last] = value


def resolve_path(cfg: dict[str, Any], p: str | None) -> str | None:
    """Paths in a config are relative to the working directory, or failing that to the config's folder."""
    if not p:
        return p
    if Path(p).exists() or Path(p).is_absolute():
        return p
    alt = Path(cfg.get("_dir", ".")) / p
    return str(alt) if alt.exists() else p
