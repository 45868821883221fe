"""Sharded simulation: the shards partition the catalog exactly, and merging their episodes gives
the metrics of the unsharded simulation for the same seeds (real simulator, real trained policy)."""

from __future__ import annotations

import json
from datetime import date

import pytest
import yaml

from closedloop.driving.labels import expert_acceleration
from closedloop.driving.logs import synthesize_drive_logs
from closedloop.driving.policy import train_policy
from closedloop.driving.simulator import run_catalog, summarize
from closedloop.spec import load_spec
from closedloop.steps.catalog import expand_catalog
from closedloop.steps.simulation import Shard, shard_catalog, shard_names
from tests.conftest import scratch_project, template_text


@pytest.fixture(scope="module")
def catalog(project):
    whole = yaml.safe_load((project / "include" / "scenarios" / "standard.yaml").read_text())
    regression = {"id": "incident-INC-7", "incident": "INC-7", "type": "hard_braking", "params": {"decel": 9.0},
                  "seed": 4242, "repeats": 3, "safety_critical": True}
    return {**whole, "scenarios": [*whole["scenarios"], regression]}


def loaded_with(tmp_path, project, shards: str):
    path = scratch_project(tmp_path) / "include" / "pipelines" / "acc_longitudinal.yaml"
    path.write_text(template_text(project, **{"scenario_set: standard": f"scenario_set: standard\n  shards: {shards}"}))
    return load_spec(path)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 29, 31])
def test_count_shards_partition_the_episodes_keeping_ids_and_seeds(tmp_path, project, catalog, count):
    loaded = loaded_with(tmp_path, project, f"{{count: {count}}}")
    whole = expand_catalog(catalog)
    parts = [expand_catalog(shard_catalog(loaded, catalog, Shard(i, count))) for i in range(count)]
    assert [e for part in parts for e in part] == whole  # in order, each episode once, same id/seed/params
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1  # balanced


def test_type_shards_are_one_per_scenario_type(tmp_path, project, catalog):
    loaded = loaded_with(tmp_path, project, "{by: scenario_type}")
    names = shard_names(loaded)
    assert names == ["cruise", "cut_in", "hard_braking", "stop_and_go"]
    parts = [expand_catalog(shard_catalog(loaded, catalog, Shard(i, len(names)))) for i in range(len(names))]
    assert [{e["type"] for e in p} for p in parts] == [{n} for n in names]
    assert sorted(e["id"] for p in parts for e in p) == sorted(e["id"] for e in expand_catalog(catalog))
    assert "incident-INC-7#2" in {e["id"] for e in parts[2]}  # a regression scenario goes with its type


def test_a_shard_that_no_longer_exists_is_refused_by_name(tmp_path, project, catalog):
    from closedloop.errors import PermanentError

    loaded = loaded_with(tmp_path, project, "{count: 3}")
    with pytest.raises(PermanentError, match="now has 3 shards"):
        shard_catalog(loaded, catalog, Shard(1, 4))
    with pytest.raises(ValueError, match="shard 4 of 4"):
        Shard(4, 4)


def test_merged_shards_give_the_unsharded_metrics_for_the_same_seeds(tmp_path, project, catalog):
    raw = synthesize_drive_logs(sources=["fleet-eu"], window_start=date(2026, 11, 1), window_end=date(2026, 11, 5),
                                scenarios=["cruise", "cut_in", "stop_and_go"], episodes_per_day=1, seed=3)
    model = train_policy(expert_acceleration(raw, version="2", smoothing_window=5), max_iter=30)
    whole = run_catalog(model, catalog)
    for shards in ("{count: 4}", "{by: scenario_type}"):
        loaded = loaded_with(tmp_path / shards.strip("{}").replace(" ", "").replace(":", "_"), project, shards)
        n = len(shard_names(loaded))
        episodes = [e for i in reversed(range(n))  # shards finish in any order
                    for e in run_catalog(model, shard_catalog(loaded, catalog, Shard(i, n)))["episodes"]]
        order = [e["id"] for e in expand_catalog(catalog)]
        merged = sorted(episodes, key=lambda e: order.index(e["id"]))
        assert merged == whole["episodes"]
        assert json.dumps(summarize(merged), sort_keys=True) == json.dumps(whole["metrics"], sort_keys=True)
    assert whole["metrics"]["regression.episodes"] == 3  # the incident's scenario, counted on its own
    assert whole["metrics"]["regression.collisions"] == sum(e["collision"] for e in whole["episodes"]
                                                            if e.get("incident") == "INC-7")
