"""Placement (`cluster/placement.py`) and the cluster file (`cluster/config.py`).

Hypothesis draws model sizes, KV headroom, rates, copies, pins and replica capacities: a placement
either keeps every replica within its memory with every model on its number of distinct replicas
and its pins honoured, or raises a PlacementError that names a model of the config. When every
replica could hold every model at once, placement never fails.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oneiros.cluster.config import ClusterConfig, parse_cluster, plan
from oneiros.cluster.placement import (
    ModelDemand,
    PlacementError,
    ReplicaCapacity,
    copies_wanted,
    place,
)
from oneiros.cluster.report import plan_text
from oneiros.core import ConfigError

MiB = 1 << 20


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[ModelDemand], list[ReplicaCapacity], float | None]:
    n_rep = draw(st.integers(1, 5))
    replicas = [ReplicaCapacity(f"r{k}", draw(st.integers(1, 64)) * MiB) for k in range(n_rep)]
    models = []
    for k in range(draw(st.integers(1, 8))):
        w = draw(st.integers(1, 40)) * MiB // 2
        kv = int(w * draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])))
        pins = tuple(draw(st.lists(st.sampled_from([r.name for r in replicas]), max_size=2)))
        models.append(ModelDemand(f"m{k}", w, kv, draw(st.floats(0, 50)),
                                  draw(st.integers(1, 3)), pins))
    rate = draw(st.one_of(st.none(), st.floats(1, 20)))
    return models, replicas, rate


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_placement_fits_or_names_the_model(case) -> None:
    models, replicas, rate = case
    try:
        p = place(models, replicas, rate)
    except PlacementError as e:
        assert any(repr(m.name) in str(e) for m in models), str(e)
        return
    p.check(models)
    for m in models:
        assert p.copies[m.name] == copies_wanted(m, rate, len(replicas))
        assert p.copies[m.name] >= min(len(replicas), max(1, len(set(m.pins))))


@settings(max_examples=200, deadline=None)
@given(clusters())
def test_room_for_everything_everywhere_never_fails(case) -> None:
    models, replicas, rate = case
    models = [ModelDemand(m.name, m.weight_bytes, m.kv_bytes, m.rate, m.copies) for m in models]
    total = sum(m.need for m in models)
    replicas = [ReplicaCapacity(r.name, max(r.memory_bytes, total)) for r in replicas]
    place(models, replicas, rate).check(models)


def test_hot_model_is_replicated_by_rate_and_spread() -> None:
    models = [ModelDemand("hot", 10 * MiB, 5 * MiB, rate=25.0), ModelDemand("cold", 10 * MiB, 0)]
    p = place(models, [ReplicaCapacity(f"r{k}", 40 * MiB) for k in range(4)], 10.0)
    assert p.copies == {"hot": 3, "cold": 1}
    assert len(p.holders("hot")) == 3
    assert p.holders("cold") == [r.name for r in p.replicas if "hot" not in r.models]
    p.check(models)


def test_pins_are_honoured_and_bad_pins_named() -> None:
    models = [ModelDemand("a", MiB, 0, pins=("r1",)), ModelDemand("b", MiB, 0)]
    p = place(models, [ReplicaCapacity("r0", 4 * MiB), ReplicaCapacity("r1", 4 * MiB)])
    assert p.holders("a") == ["r1"] and p.holders("b") == ["r0"]
    with pytest.raises(PlacementError, match="'a' is pinned to r9"):
        place([ModelDemand("a", MiB, 0, pins=("r9",))], [ReplicaCapacity("r0", 4 * MiB)])
    with pytest.raises(PlacementError, match="'a' is pinned to replica r0 but does not fit"):
        place([ModelDemand("a", 8 * MiB, 0, pins=("r0",))], [ReplicaCapacity("r0", 4 * MiB)])


def test_a_model_too_big_for_any_replica_is_named() -> None:
    models = [ModelDemand("small", MiB, 0), ModelDemand("huge", 30 * MiB, 10 * MiB)]
    with pytest.raises(PlacementError, match=r"'huge' does not fit on any replica.*40\.0 MiB"):
        place(models, [ReplicaCapacity("r0", 32 * MiB), ReplicaCapacity("r1", 32 * MiB)])


def test_full_replicas_name_the_model_left_over() -> None:
    models = [ModelDemand(n, 3 * MiB, MiB) for n in ("a", "b", "c")]
    with pytest.raises(PlacementError, match="does not fit: it needs 4.0 MiB"):
        place(models, [ReplicaCapacity("r0", 8 * MiB), ReplicaCapacity("r1", 2 * MiB)])


def test_copies_never_exceed_replicas() -> None:
    assert copies_wanted(ModelDemand("a", 1, 0, rate=1000.0), 1.0, 3) == 3
    assert copies_wanted(ModelDemand("a", 1, 0, rate=0.0, copies=2), 1.0, 3) == 2
    assert copies_wanted(ModelDemand("a", 1, 0, rate=5.0), None, 3) == 1
    assert copies_wanted(ModelDemand("a", 1, 0, rate=20.0), 10.0, 3) == math.ceil(20 / 10)


# ---- the cluster file ---------------------------------------------------------------------------
FILE = {
    "replicas": 2, "replica_memory": "4MiB",
    "engine": {"page_bytes": 65536, "block_size": 4, "threads": 1},
    "models": {"a": "random:llama-tiny", "b": {"source": "random:qwen2-tiny", "pin": "replica-1",
                                              "kv_cache": "1MiB"}},
}


def test_cluster_file_plans_with_engine_weight_bytes() -> None:
    cluster = parse_cluster(FILE)
    assert isinstance(cluster, ClusterConfig) and cluster.threads == 1
    placement, demands = plan(cluster)
    placement.check(demands)
    d = {m.name: m for m in demands}
    assert d["a"].weight_bytes % 65536 == 0 and d["a"].kv_bytes == d["a"].weight_bytes // 2
    assert d["b"].kv_bytes == MiB and placement.holders("b") == ["replica-1"]
    config = cluster.engine_config(placement.replicas[1].models, placement.replicas[1].memory_bytes)
    assert config.memory_budget == 4 * MiB and "b" in config.models
    text = plan_text(cluster, placement, demands)
    assert "replica-1: arena 4.0 MiB" in text and "pinned replica-1" in text


@pytest.mark.parametrize("change, message", [
    ({"replica_memory": None}, "give replica_memory"),
    ({"models": {}}, "`models` must map"),
    ({"models": {"a": {"sorce": "x"}}}, "needs a source"),
    ({"engine": {"pagebytes": 1}}, "unknown settings"),
    ({"colour": "red"}, "unknown keys"),
    ({"replica_memory": "lots"}, "replica_memory must be a byte count"),
    ({"replicas": [{"name": "x", "memory": "1MiB"}, {"name": "x", "memory": "1MiB"}]},
     "replica names must differ"),
])
def test_bad_cluster_files_say_what_is_wrong(change: dict, message: str) -> None:
    data = {**FILE, **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        parse_cluster(data)


def test_the_example_file_dry_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    from oneiros.cli import main

    example = Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml"
    assert main(["serve", "--cluster", str(example), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "replica-0: arena 4.0 MiB" in out and "pinned replica-1" in out
    assert out.count("hot ") == 2  # 15 req/s over 10 per copy: two copies
    assert main(["serve", "--dry-run"]) == 2
    assert "--dry-run goes with --cluster" in capsys.readouterr().err


def test_dry_run_predicts_each_busy_replica_with_the_simulator() -> None:
    from oneiros.cluster.predict import predict

    cluster = parse_cluster({**FILE, "hardware": "h100-sxm", "rate_per_replica": 4,
                             "models": {"a": {"source": "random:llama-tiny", "rate": 6},
                                        "b": "random:qwen2-tiny"}})
    placement, demands = plan(cluster)
    assert placement.copies == {"a": 2, "b": 1}
    got = predict(cluster, placement, demands, requests=12)
    assert set(got) == {"replica-0", "replica-1"}  # `a` runs on both; `b` has no rate
    for p in got.values():
        assert p.rate == 3.0 and p.completed == 12 and p.p99_ttft_ms > 0 and p.p99_tbt_ms > 0
    text = plan_text(cluster, placement, demands, got)
    assert text.count("predicted on h100-sxm at 3 req/s") == 2
