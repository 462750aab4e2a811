"""Build a deployment from a config and run it in virtual time: ``simulate(cfg) -> dict`` of metrics.

Architectures: ``distributed`` (drafts -> broker -> targets), ``fused`` (generate queue -> fused workers) or
``mixed`` (both; ``fused_fraction`` of requests go to the generate queue). All randomness flows from ``seed``
through per-entity generators, so a seed fixes the run. Every summary says which cost tables priced it and whether
any was synthetic (a formula or a test model, not a measurement): ``synthetic`` and ``cost_tables``.
"""
from __future__ import annotations

import math
import random
import time
from typing import Any, Iterable

import simpy

from simulator.acceptance import Acceptance, make_acceptance
from simulator.config import ConfigError, resolve_path
from simulator.costs import CostModel, load_table
from simulator.entities.broker import Broker
from simulator.entities.drafts import AUTO, DraftClass, DraftDevice, DraftPool, parse_gamma, run_session
from simulator.entities.fused import FusedWorker
from simulator.entities.generate_queue import GenerateQueue
from simulator.entities.links import Link, make_links
from simulator.entities.targets import Target
from simulator.metrics import Metrics, summarise
from simulator.workload import KIND_GENERATE, KIND_SPEC, Request, build_workload, draw_length
from workers.batching import BatchLimits
from workers.goodput import ControllerConfig, GoodputController

ARCHITECTURES = ("distributed", "fused", "mixed")


def _limits(spec: dict[str, Any]) -> BatchLimits:
    return BatchLimits(max_batch_tokens=int(spec["max_batch_tokens"]), max_batch_rows=int(spec["max_batch_rows"]),
                       prefill_chunk=int(spec["prefill_chunk"]), tick_ms=float(spec["tick_ms"]))


def _split(count: int, mix: dict[str, float]) -> list[str]:
    """Deterministic class assignment: counts proportional to the shares (largest remainder)."""
    total = sum(mix.values())
    if total <= 0:
        raise ConfigError("drafts.mix shares must sum to > 0")
    exact = {k: count * v / total for k, v in mix.items()}
    n = {k: int(math.floor(x)) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: n[k] - exact[k])[: count - sum(n.values())]:
        n[k] += 1
    return [k for k in mix for _ in range(n[k])]


class Simulation:
    def __init__(self, cfg: dict[str, Any], costs: CostModel | None = None,
                 requests: list[Request] | None = None) -> None:
        self.cfg = cfg
        arch = cfg["architecture"]
        if arch not in ARCHITECTURES:
            raise ConfigError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
        master = random.Random(int(cfg["seed"]))
        self._rng = lambda: random.Random(master.getrandbits(64))
        self.env = env = simpy.Environment()
        self.duration = float(cfg["duration_s"])
        self.metrics = Metrics(start=float(cfg["burn_in_s"]), end=self.duration)
        try:
            self.gamma = parse_gamma(cfg["gamma"], "gamma")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.decode_tokens = int(cfg["decode_tokens"])
        if self.decode_tokens < 1:
            raise ConfigError(f"decode_tokens must be >= 1, got {self.decode_tokens}")
        bcfg = cfg["broker"]
        self.retry_s = float(bcfg["retry_ms"]) / 1000.0
        self._tables: dict[str, CostModel] = {}
        default_cost = costs or self._table(cfg["costs"])
        try:
            self.links = make_links(cfg["links"], float(bcfg["retry_ms"]))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"links: {exc}") from None
        self._acceptance_cache: dict[tuple[str, str], Acceptance] = {}
        self.default_acceptance = make_acceptance(cfg["acceptance"])

        # draft classes (before the targets: an "auto" class gives every target a goodput controller)
        classes = {}
        for name, spec in cfg["draft_classes"].items():
            lname = spec.get("link", "datacenter")
            if lname not in self.links:
                raise ConfigError(f"draft class {name!r}: unknown link {lname!r}")
            try:
                classes[name] = DraftClass(name, self.links[lname], float(spec.get("slowdown", 1.0)),
                                           spec.get("step_ms"), bool(spec.get("batched", False)),
                                           float(spec.get("gather_ms", 0.0)), float(spec.get("send_ms", 0.0)),
                                           path_ms=float(spec.get("path_ms", 0.0)),
                                           open_ms=float(spec.get("open_ms", 0.0)), gamma=spec.get("gamma"))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"draft class {name!r}: {exc}") from None
        dcfg = cfg["drafts"]
        used_classes = [classes[c] for c in dcfg["mix"] if c in classes]
        self.auto = self.gamma == AUTO or any(c.gamma == AUTO for c in used_classes)
        try:
            self._controller_cfg = ControllerConfig(**cfg["controller"])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"controller: {exc}") from None

        # targets (distributed) and the broker
        self.targets: list[Target] = []
        if arch in ("distributed", "mixed"):
            used: set[str] = set()
            for gi, group in enumerate(cfg["targets"]):
                gname = str(group.get("name") or f"g{gi}")
                if gname in used:  # list items inherit item 0's name unless given their own
                    gname = f"{gname}{gi}_"
                used.add(gname)
                cost = costs or (self._table(group["costs"]) if group.get("costs") else default_cost)
                for i in range(int(group["count"])):
                    self.targets.append(Target(env, f"{gname}{i}", _limits(group), int(group["slots"]), cost,
                                               self._rng(), self.metrics, group=gname,
                                               queue_max=int(bcfg["verify_queue_max"]),
                                               cost_scale=float(group.get("cost_scale", 1.0)),
                                               tick_overhead_ms=float(group.get("tick_overhead_ms", 0.0)),
                                               tick_row_overhead_ms=float(group.get("tick_row_overhead_ms", 0.0)),
                                               controller=self._controller(cost, _limits(group))))
            if not self.targets:
                raise ConfigError("a distributed deployment needs at least one target")
        self.broker = Broker(self.targets, cfg["router"], self._rng(), float(bcfg["overhead_ms"]))

        # drafts
        unknown = [k for k in dcfg["mix"] if k not in classes]
        if unknown:
            raise ConfigError(f"drafts.mix: unknown draft class {unknown[0]!r} (known: {', '.join(classes)})")
        devices = [DraftDevice(f"d{i}", classes[c], default_cost, self._rng(), int(dcfg["sessions"]))
                   for i, c in enumerate(_split(int(dcfg["count"]), dcfg["mix"]))]
        self.pool = DraftPool(env, devices, self._rng(), self._start_session)
        if arch in ("distributed", "mixed") and not devices:
            raise ConfigError("a distributed deployment needs at least one draft (drafts.count)")

        # fused workers and the generate queue
        fcfg = cfg["fused"]
        self.generate_queue = GenerateQueue(int(bcfg["generate_queue_max"]))
        self.fused: list[FusedWorker] = []
        if arch in ("fused", "mixed"):
            cost = costs or (self._table(fcfg["costs"]) if fcfg.get("costs") else default_cost)
            link = self.links.get(fcfg.get("client_link") or "", Link("local", 0.0))
            for i in range(int(fcfg["count"])):
                self.fused.append(FusedWorker(env, f"f{i}", self.generate_queue, _limits(fcfg), int(fcfg["slots"]),
                                              self._fused_gamma(fcfg), cost, self._rng(),
                                              self.metrics, link, self.acceptance_for))
            if not self.fused:
                raise ConfigError(f"architecture {arch!r} needs fused.count >= 1")
            self.client_link = link

        # workload
        wrng = self._rng()
        wl = dict(cfg["workload"])
        for k in ("trace", "capture"):
            wl[k] = resolve_path(cfg, wl.get(k))
        self.requests = requests if requests is not None else build_workload(wl, self.duration, wrng)
        for r in self.requests:
            if arch == "distributed":
                r.kind = KIND_SPEC
            elif arch == "fused":
                r.kind = KIND_GENERATE
            elif not r.peer:  # mixed: synthetic and trace requests split by fused_fraction; captures keep theirs
                r.kind = KIND_GENERATE if wrng.random() < float(cfg["fused_fraction"]) else KIND_SPEC
        self.closed = wl.get("arrival") == "closed"
        if self.closed:
            if arch != "distributed":
                raise ConfigError("workload.arrival 'closed' is for the distributed architecture only")
            self._think_s = float(wl.get("think_s") or 0.0)
            self._per_user = int(wl.get("requests_per_user") or 0)
            self._wl = wl
            for d in self.pool.devices:
                for _ in range(int(dcfg["sessions"])):
                    env.process(self._closed_user(d, self._rng()))
            self.pool.free.clear()
        else:
            env.process(self._arrivals())
        env.process(self._sample(float(cfg["sample_ms"]) / 1000.0))

    # ------------------------------------------------------------------ wiring
    def _controller(self, cost: CostModel, limits: BatchLimits) -> GoodputController | None:
        """A target's goodput controller over its cost model, with virtual time as its clock (None when no draft
        follows advice: fixed-γ runs pay nothing for it). It plans with the target's token budget and prefill chunk,
        as the real target's does."""
        if not self.auto:
            return None
        cfg = ControllerConfig(**{**vars(self._controller_cfg), "max_batch_tokens": limits.max_batch_tokens,
                                  "prefill_chunk": limits.prefill_chunk})
        return GoodputController(cost, cfg, clock=lambda: self.env.now)

    def _fused_gamma(self, fcfg: dict[str, Any]) -> int:
        g = fcfg.get("gamma") or (self.gamma if isinstance(self.gamma, int) and self.gamma > 0 else 4)
        try:
            g = int(g)
        except (TypeError, ValueError):
            raise ConfigError(f"fused.gamma must be an integer >= 1, got {g!r}") from None
        if g < 1:
            raise ConfigError(f"fused.gamma must be an integer >= 1, got {g}")
        return g

    def _table(self, path: str) -> CostModel:
        path = resolve_path(self.cfg, path)
        if path not in self._tables:
            self._tables[path] = load_table(path)
        return self._tables[path]

    def acceptance_for(self, draft: str, target_group: str) -> Acceptance:
        """Acceptance of a draft-target pair: ``acceptance.pairs`` keyed ``draft/target``, ``draft`` or
        ``target``; else the default."""
        key = (draft, target_group)
        acc = self._acceptance_cache.get(key)
        if acc is None:
            pairs = self.cfg["acceptance"].get("pairs") or {}
            spec = pairs.get(f"{draft}/{target_group}") or pairs.get(draft) or pairs.get(target_group)
            if spec and spec.get("rounds"):
                spec = dict(spec, rounds=resolve_path(self.cfg, spec["rounds"]))
            acc = make_acceptance(spec) if spec else self.default_acceptance
            self._acceptance_cache[key] = acc
        return acc

    def _start_session(self, req: Request, device: DraftDevice) -> None:
        self.env.process(run_session(self.env, self, req, device))

    def _arrivals(self):
        env = self.env
        for r in self.requests:
            if r.arrival > env.now:
                yield env.timeout(r.arrival - env.now)
            if r.kind == KIND_GENERATE:
                env.process(self._generate_client(r))
            else:
                self.pool.submit(r)

    def _closed_user(self, device: DraftDevice, rng: random.Random):
        """A user on one draft slot: think, ask, wait for the whole answer, repeat until the arrivals end (or it
        has asked ``workload.requests_per_user`` times, when that is set)."""
        env = self.env
        asked = 0
        while not self._per_user or asked < self._per_user:
            asked += 1
            if self._think_s > 0:
                yield env.timeout(rng.expovariate(1.0 / self._think_s))
            if env.now >= self.duration:
                return
            r = Request(len(self.requests), env.now, draw_length(self._wl.get("prompt_tokens", 128), rng),
                        draw_length(self._wl.get("output_tokens", 128), rng))
            self.requests.append(r)
            yield env.process(run_session(env, self, r, device))

    def _generate_client(self, r: Request):
        """A generate client: send the job over its link; on BUSY wait the retry hint and resend."""
        yield self.env.timeout(self.client_link.delay(128 + 4 * r.prompt_tokens, self.pool.rng))
        while not self.generate_queue.put(r):
            yield self.env.timeout(self.retry_s)

    def _sample(self, period: float):
        env, m = self.env, self.metrics
        per = m.sample_per_target
        for t in self.targets:
            per[t.name] = []
        while True:
            m.sample_t.append(env.now)
            vq = aq = 0
            for t in self.targets:
                q = len(t.verify_q)
                per[t.name].append(q)
                vq += q
                aq += len(t.admit_q)
            m.sample_verify_q.append(vq)
            m.sample_admit_q.append(aq)
            m.sample_generate_q.append(len(self.generate_queue))
            m.sample_draft_q.append(len(self.pool.waiting))
            yield env.timeout(period)

    # ------------------------------------------------------------------ running
    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        env = self.env
        env.run(until=self.duration)
        limit = self.duration + float(self.cfg["drain_s"])
        start, end = self.metrics.start, self.metrics.end
        pending = [r for r in self.requests if start <= r.arrival <= end]
        while env.now < limit:
            pending = [r for r in pending if math.isnan(r.finished)]
            if not pending:
                break
            env.run(until=min(limit, env.now + 1.0))
        wall = time.perf_counter() - t0
        events = _events_scheduled(env)
        out = summarise(self.metrics, self.requests, float(self.cfg["slo"]["ttft_ms"]),
                        float(self.cfg["slo"]["tpot_ms"]))
        self.metrics.busy_refusals += self.generate_queue.busy_refusals
        out["busy_refusals"] = self.metrics.busy_refusals
        out.update(events=events, wall_s=wall, events_per_s=events / wall if wall > 0 else math.nan,
                   virtual_s=env.now, drafts=len(self.pool.devices), targets=len(self.targets),
                   fused=len(self.fused), router=self.cfg["router"], gamma=self.gamma,
                   architecture=self.cfg["architecture"])
        out.update(cost_provenance(self.cost_models()))
        return out

    def cost_models(self) -> list[CostModel]:
        """The cost models that priced this deployment: targets', fused workers', and the draft table (when a draft
        class steps by the table rather than its own ``step_ms``)."""
        models: list[CostModel] = [t.cost for t in self.targets] + [f.cost for f in self.fused]
        if self.targets:
            models += [d.cost for d in self.pool.devices if d.cls.step_ms is None]
        return list({id(m): m for m in models}.values())


def cost_provenance(models: Iterable[CostModel]) -> dict[str, Any]:
    """``synthetic``: whether any model was not a measured table (a table marked ``synthetic: true``, or a formula
    such as ``ConstantCost``); ``cost_tables``: the table files (or model class names) in use, sorted."""
    names, synthetic = set(), False
    for m in models:
        source = getattr(m, "source", "")
        names.add(str(source) if source else type(m).__name__)
        synthetic = synthetic or bool(getattr(m, "synthetic", True))
    return {"synthetic": synthetic, "cost_tables": sorted(names)}


def _events_scheduled(env: simpy.Environment) -> int:
    """Events SimPy scheduled so far (its internal event-id counter); -1 if this SimPy hides it."""
    counter = getattr(env, "_eid", None)
    try:
        return next(counter) if counter is not None else -1
    except TypeError:
        return -1


def simulate(cfg: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Run one configuration and return its summary (see ``simulator.metrics.summarise``)."""
    return Simulation(cfg, **kwargs).run()


