"""The cluster file (YAML): replicas, models, and the engine settings every replica shares.

    device: cpu                  # cuda: one GPU per replica (num_gpus: 1)
    replicas: 2                  # or a list: [{name: gpu0, memory: 70GiB}, ...]
    replica_memory: 64MiB        # each replica's arena (its engine's --memory-budget)
    kv_headroom: 0.5             # KV room per model: this fraction of its weight bytes
    rate_per_replica: 8          # requests/s one replica serves of one model (hot: more copies)
    max_ongoing_requests: 32     # per replica; more wait in Ray Serve's queue ...
    max_queued_requests: 64      # ... of at most this many; beyond it, 429
    engine: {policy: oneiros, page_bytes: 65536, block_size: 4, threads: 1}
    faults: slow:0.01@0.2        # drills (oneiros.engine.faults) on every replica;
                                 # a replica of the list may have its own `faults`
    hardware: h100-sxm           # the dry run predicts P99 TTFT/TBT per replica on this profile
    models:
      a: random:llama-tiny
      b: {source: random:qwen2-tiny, rate: 20, copies: 2, pin: [replica-1], kv_cache: 2MiB}

`load_cluster(path) -> ClusterConfig`; `plan(cluster) -> (Placement, demands)` measures each
model's weight bytes as its engine will lay them out (pages included) and places them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oneiros.cluster.placement import ModelDemand, Placement, ReplicaCapacity, place
from oneiros.config import EngineConfig, parse_bytes
from oneiros.core import ConfigError

_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)} - {"models", "device",
                                                                        "memory_budget"}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str
    rate: float = 0.0
    copies: int = 1
    pins: tuple[str, ...] = ()
    kv_bytes: int | None = None  # None: kv_headroom x weight bytes


@dataclass(frozen=True)
class ClusterConfig:
    models: tuple[ModelEntry, ...]
    replicas: tuple[ReplicaCapacity, ...]
    device: str = "cpu"
    kv_headroom: float = 0.5
    rate_per_replica: float | None = None
    max_ongoing_requests: int = 32
    max_queued_requests: int = 64
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields
    threads: int | None = None  # torch CPU threads per replica
    replica_cpus: float = 1.0  # Ray CPUs per engine replica
    faults: dict[str, str] = field(default_factory=dict)  # replica -> fault spec (drills)
    # A simulator profile (gh200, h100-sxm, cpu, a JSON path): the dry run predicts each replica's
    # P99 TTFT/TBT at its expected rates on it.
    hardware: str | None = None

    def engine_config(self, models: list[str], memory_bytes: int) -> EngineConfig:
        sources = {m.name: m.source for m in self.models}
        return EngineConfig(models={n: sources[n] for n in models}, device=self.device,
                            memory_budget=memory_bytes, **self.engine)

    def actor_options(self) -> dict[str, Any]:
        gpus = 1 if self.device.startswith("cuda") else 0
        return {"num_cpus": self.replica_cpus, "num_gpus": gpus}


def load_cluster(path: str | Path) -> ClusterConfig:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the cluster file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"the cluster file {path} is not valid YAML: {e}") from None
    return parse_cluster(data, str(path))


def parse_cluster(data: Any, where: str = "cluster") -> ClusterConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    known = {"device", "replicas", "replica_memory", "kv_headroom", "rate_per_replica",
             "max_ongoing_requests", "max_queued_requests", "engine", "models", "replica_cpus",
             "faults", "hardware"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} (known: {sorted(known)})")
    engine = dict(data.get("engine") or {})
    threads = engine.pop("threads", None)
    bad = sorted(set(engine) - _ENGINE_FIELDS)
    if bad:
        raise ConfigError(f"{where}: engine has unknown settings {bad}")
    models = _models(data.get("models"), where)
    replicas = _replicas(data.get("replicas", 1), data.get("replica_memory"), where)
    faults = _faults(data, replicas, where)
    headroom = float(data.get("kv_headroom", 0.5))
    if headroom < 0:
        raise ConfigError(f"{where}: kv_headroom must be >= 0, got {headroom}")
    rate = data.get("rate_per_replica")
    if rate is not None and not float(rate) > 0:
        raise ConfigError(f"{where}: rate_per_replica must be positive, got {rate}")
    ongoing = int(data.get("max_ongoing_requests", 32))
    queued = int(data.get("max_queued_requests", 64))
    if ongoing < 1 or queued < 0:
        raise ConfigError(f"{where}: max_ongoing_requests >= 1 and max_queued_requests >= 0")
    return ClusterConfig(
        models, replicas, str(data.get("device", "cpu")), headroom,
        float(rate) if rate is not None else None, ongoing, queued, engine, threads,
        float(data.get("replica_cpus", 1.0)), faults,
        str(data["hardware"]) if data.get("hardware") else None,
    )


def _faults(data: dict[str, Any], replicas: tuple[ReplicaCapacity, ...],
            where: str) -> dict[str, str]:
    from oneiros.engine import faults as fault_injection

    out = {r.name: str(data["faults"]) for r in replicas} if data.get("faults") else {}
    raw = data.get("replicas")
    if isinstance(raw, list):
        for r, entry in zip(replicas, raw, strict=True):
            if isinstance(entry, dict) and entry.get("faults"):
                out[r.name] = str(entry["faults"])
    for name, spec in out.items():
        try:
            fault_injection.parse(spec)
        except ConfigError as e:
            raise ConfigError(f"{where}: faults of {name}: {e}") from None
    return out


def _bytes(value: Any, what: str) -> int:
    try:
        b = parse_bytes(value) if isinstance(value, str) else value
    except ConfigError:
        b = None
    if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
        raise ConfigError(f"{what} must be a byte count such as 64MiB or 70GiB, got {value!r}")
    return b


def _models(raw: Any, where: str) -> tuple[ModelEntry, ...]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: `models` must map names to sources (name: random:llama-tiny)")
    out = []
    for name, spec in raw.items():
        if isinstance(spec, str):
            spec = {"source": spec}
        if not isinstance(spec, dict) or "source" not in spec:
            raise ConfigError(f"{where}: model {name!r} needs a source")
        extra = sorted(set(spec) - {"source", "rate", "copies", "pin", "kv_cache"})
        if extra:
            raise ConfigError(f"{where}: model {name!r} has unknown keys {extra}")
        pins = spec.get("pin") or ()
        pins = (pins,) if isinstance(pins, str) else tuple(str(p) for p in pins)
        kv = spec.get("kv_cache")
        out.append(ModelEntry(
            str(name), str(spec["source"]), float(spec.get("rate", 0.0)),
            int(spec.get("copies", 1)), pins,
            _bytes(kv, f"model {name!r} kv_cache") if kv is not None else None,
        ))
    return tuple(out)


def _replicas(raw: Any, memory: Any, where: str) -> tuple[ReplicaCapacity, ...]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        if raw < 1:
            raise ConfigError(f"{where}: replicas must be at least 1")
        if memory is None:
            raise ConfigError(f"{where}: give replica_memory (each replica's arena, e.g. 70GiB)")
        mem = _bytes(memory, "replica_memory")
        return tuple(ReplicaCapacity(f"replica-{k}", mem) for k in range(raw))
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: replicas is a count or a list of {{name, memory}}")
    out = []
    for k, r in enumerate(raw):
        r = r if isinstance(r, dict) else {}
        mem = r.get("memory", memory)
        if mem is None:
            raise ConfigError(f"{where}: replica {k} needs a memory size (or give replica_memory)")
        out.append(ReplicaCapacity(str(r.get("name", f"replica-{k}")), _bytes(mem, "memory")))
    if len({r.name for r in out}) != len(out):
        raise ConfigError(f"{where}: replica names must differ")
    return tuple(out)


def weight_bytes(cluster: ClusterConfig, source: str) -> int:
    """Bytes the model's parameters take in an arena, pages included (as its engine lays them
    out; with the page size this model alone would choose, which a replica holding a model of
    larger KV blocks raises)."""
    import torch

    from oneiros.engine.builder import auto_page_bytes
    from oneiros.engine.executor import torch_dtype
    from oneiros.memory.weights import weight_pages
    from oneiros.models.loader import resolve
    from oneiros.models.registry import build_model

    cfg = resolve(source).config
    dtype_name = cluster.engine.get("dtype", "auto")
    if dtype_name == "auto":
        dtype_name = "bfloat16" if cluster.device.startswith("cuda") else "float32"
    dtype = torch_dtype(dtype_name)
    model = build_model(cfg, dtype, torch.device("cpu"))
    probe = EngineConfig(models={"m": source}, **cluster.engine)
    page = probe.page_bytes or auto_page_bytes(probe, [model], dtype)
    return weight_pages(model, page) * page


def demands(cluster: ClusterConfig) -> list[ModelDemand]:
    out = []
    for m in cluster.models:
        w = weight_bytes(cluster, m.source)
        kv = m.kv_bytes if m.kv_bytes is not None else int(w * cluster.kv_headroom)
        out.append(ModelDemand(m.name, w, kv, m.rate, m.copies, m.pins))
    return out


def plan(cluster: ClusterConfig) -> tuple[Placement, list[ModelDemand]]:
    d = demands(cluster)
    return place(d, list(cluster.replicas), cluster.rate_per_replica), d
