"""The adaptive simulation budget: further rounds of the catalog with fresh seeds until the
confidence gates are decided or ``max_episodes`` is spent (real simulator, real trained policy that
was never shown hard braking: it never collides cutting in and always collides in hard braking)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
import yaml

from closedloop.driving.labels import expert_acceleration
from closedloop.driving.logs import synthesize_drive_logs
from closedloop.driving.policy import train_policy
from closedloop.driving.simulator import run_catalog, summarize
from closedloop.errors import SpecError
from closedloop.runtime.context import RunContext
from closedloop.spec import GateSpec, load_spec
from closedloop.steps.catalog import expand_catalog, next_round
from closedloop.steps.gates import undecided
from closedloop.steps.simulation import budget_of, simulate_until_decided, simulation_key
from tests.conftest import SHIPPED_ADAPTIVE, scratch_project, template_text


@pytest.fixture(scope="module")
def model():
    raw = synthesize_drive_logs(sources=["fleet-eu"], window_start=date(2026, 11, 1), window_end=date(2026, 11, 5),
                                scenarios=["cruise", "cut_in", "stop_and_go"], episodes_per_day=1, seed=3)
    return train_policy(expert_acceleration(raw, version="2", smoothing_window=5), max_iter=30)


@pytest.fixture(scope="module")
def catalog(project):
    return yaml.safe_load((project / "include" / "scenarios" / "standard.yaml").read_text())


def budget(max_episodes: int, *gates: dict) -> dict:
    return {"max_episodes": max_episodes, "summarize": "closedloop.driving.simulator:summarize", "gates": list(gates)}


def sim(metrics: dict) -> dict:
    return {f"sim.{k}": v for k, v in metrics.items()}


def test_rounds_continue_the_episodes_with_fresh_ids_and_seeds(catalog):
    rounds = [expand_catalog(next_round(catalog, r)) for r in range(3)]
    ids = [e["id"] for part in rounds for e in part]
    seeds = {(e["id"].split("#")[0], e["seed"]) for part in rounds for e in part}
    assert len(ids) == len(set(ids)) == 3 * len(rounds[0]) and len(seeds) == len(ids)
    assert expand_catalog(next_round(catalog, 0)) == expand_catalog(catalog)
    # round r of an entry is what the entry with r+1 times its repeats would simulate after the first r
    longer = {**catalog, "scenarios": [{**e, "repeats": 3 * e["repeats"]} for e in catalog["scenarios"]]}
    assert sorted(ids) == sorted(e["id"] for e in expand_catalog(longer))


def test_an_open_gate_gets_more_rounds_until_its_bound_decides(model, catalog):
    gate = {"metric": "sim.cut_in.collision_rate", "max": 0.05, "confidence": 0.95}
    out = simulate_until_decided(run_catalog, model, catalog, budget(5000, gate))
    a = out["adaptive"]
    assert a["stopped"] == "decided" and a["undecided"] == [] and a["rounds"] > 1
    assert a["episodes"] == a["rounds"] * 26 == len(out["episodes"]) == out["metrics"]["episodes"]
    # the same numbers as simulating those rounds directly, aggregated once
    direct = [e for r in range(a["rounds"]) for e in run_catalog(model, next_round(catalog, r))["episodes"]]
    assert out["episodes"] == direct and out["metrics"] == summarize(direct)
    # it stopped at the first round where the bound decided, not later
    gates = [GateSpec(**gate)]
    assert undecided(gates, sim(out["metrics"])) == []
    assert undecided(gates, sim(summarize(direct[:-26]))) == ["sim.cut_in.collision_rate"]
    assert out["metrics"]["cut_in.collisions"] == 0


def test_a_rate_surely_over_its_bound_stops_at_once(model, catalog):
    gate = {"metric": "sim.hard_braking.collision_rate", "max": 0.05, "confidence": 0.95}
    out = simulate_until_decided(run_catalog, model, catalog, budget(5000, gate))
    assert out["adaptive"] == {"rounds": 1, "episodes": 26, "max_episodes": 5000, "stopped": "a gate failed for sure",
                               "undecided": [], "failed": ["sim.hard_braking.collision_rate"]}
    assert out["metrics"]["hard_braking.collision_rate"] == 1.0  # 8 in 8: the lower bound is far above 5 %


def test_the_budget_bounds_the_episodes_and_says_what_stayed_open(model, catalog):
    gate = {"metric": "sim.cut_in.collision_rate", "max": 0.001, "confidence": 0.95}  # needs ~3,000 episodes
    out = simulate_until_decided(run_catalog, model, catalog, budget(100, gate))
    assert out["adaptive"] == {"rounds": 3, "episodes": 78, "max_episodes": 100, "stopped": "budget spent",
                               "undecided": ["sim.cut_in.collision_rate"], "failed": []}  # a 4th round would be 104


def test_an_undecided_gate_is_not_waited_for_once_another_has_failed_for_sure(model, catalog):
    """The release is rejected whatever more episodes show: the budget is not spent on it."""
    gates = [{"metric": "sim.hard_braking.collision_rate", "max": 0.05, "confidence": 0.95},
             {"metric": "sim.cut_in.collision_rate", "max": 0.001, "confidence": 0.95}]
    out = simulate_until_decided(run_catalog, model, catalog, {**budget(5000, gates[0]), "gates": gates})
    assert out["adaptive"]["rounds"] == 1 and out["adaptive"]["stopped"] == "a gate failed for sure"
    assert out["adaptive"]["undecided"] == ["sim.cut_in.collision_rate"]


def test_rounds_simulated_in_batches_give_the_metrics_of_one_round_at_a_time(model, catalog, monkeypatch):
    """Several rounds per simulator call, taken round by round: the same stopping round and the same
    metrics as simulating each round on its own."""
    import closedloop.steps.simulation as sim_mod

    gate = {"metric": "sim.cut_in.collision_rate", "max": 0.05, "confidence": 0.95}
    batched = simulate_until_decided(run_catalog, model, catalog, budget(5000, gate))
    monkeypatch.setattr(sim_mod, "ROUNDS_PER_CALL", 1)
    one_by_one = simulate_until_decided(run_catalog, model, catalog, budget(5000, gate))
    assert batched["adaptive"] == one_by_one["adaptive"] and batched["metrics"] == one_by_one["metrics"]
    assert [e["id"] for e in batched["episodes"]] == [e["id"] for e in one_by_one["episodes"]]


def test_without_a_budget_the_catalog_runs_once(model, catalog):
    out = simulate_until_decided(run_catalog, model, catalog, None)
    assert "adaptive" not in out and len(out["episodes"]) == 26


def loaded_with(tmp_path, project, extra: dict, **options):
    path = scratch_project(tmp_path) / "include" / "pipelines" / "acc_longitudinal.yaml"
    path.write_text(template_text(project, **extra, **options))
    return load_spec(path)


ADAPTIVE = {SHIPPED_ADAPTIVE: "  adaptive: {max_episodes: 2000}\n"}


def test_the_template_refuses_a_budget_nothing_waits_for(tmp_path, project):
    with pytest.raises(SpecError, match="no gate judges a 'sim.\\*' rate with 'confidence'"):
        loaded_with(tmp_path / "a", project, {"    confidence: 0.95 ": "    method: wilson ",
                                               "    confidence: 0.95\n": "    method: wilson\n"})
    with pytest.raises(SpecError, match="max_episodes"):
        loaded_with(tmp_path / "c", project, {SHIPPED_ADAPTIVE: "  adaptive: {max_episodes: 0}\n"})


@pytest.mark.parametrize("shards,together", [("{by: scenario_type}", True), ("{count: 3}", False)])
def test_rounds_fan_out_over_shards_with_the_unsharded_adaptive_metrics(tmp_path, project, model, shards, together):
    """simulation.adaptive with shards. Together (each shard job a thread with the job's heartbeat):
    every shard simulates its part of each round, in lockstep, until the rounds all shards have decide.
    One after the other (no free slot for a sibling, as under dag.test): each shard does round 0 and
    stops, and the merge simulates the rounds still needed. Either way the merge takes exactly the rounds
    one unsharded job takes — the same episodes, metrics and stopping round."""
    import threading

    from closedloop.steps.catalog import next_round
    from closedloop.steps.simulation import (
        ROUNDS_PER_CALL,
        Shard,
        _beat,
        job_spec,
        rounds_of,
        shard_names,
        simulate_shard_rounds,
        take_rounds,
        whole_catalog,
    )

    gate = {"metric": "sim.cut_in.collision_rate", "max": 0.05, "confidence": 0.95}
    loaded = loaded_with(tmp_path / "t", project, {
        SHIPPED_ADAPTIVE: f"  adaptive: {{max_episodes: 5000}}\n  shards: {shards}\n"}, gates="lax")
    loaded.spec.gates[:] = [GateSpec(**gate)]  # the one gate the unsharded reference waits for
    ctx = RunContext(pipeline=loaded.spec.name, template_digest="", dag_id="d", run_id="r",
                     data_root=str(tmp_path / "data"))
    whole = whole_catalog(loaded, ctx)
    plain = {k: v for k, v in whole.items() if k != "regression"}
    n = len(shard_names(loaded))
    specs = [job_spec(loaded, ctx, {"model_uri": "runs:/x/model"}, Shard(i, n)) for i in range(n)]
    results, stops = [None] * n, [threading.Event() for _ in range(n)]
    for spec in specs:  # launch() makes each job's folder before the job starts beating
        Path(spec["adaptive"]["siblings"][0]).parent.mkdir(parents=True, exist_ok=True)
        for sibling in spec["adaptive"]["siblings"]:
            Path(sibling).mkdir(exist_ok=True)

    def shard(i: int) -> None:
        if together:
            threading.Thread(target=_beat, args=(specs[i]["adaptive"]["siblings"][i], stops[i]), daemon=True).start()
        results[i] = simulate_shard_rounds(run_catalog, model, specs[i]["catalog"], specs[i]["adaptive"])
        stops[i].set()

    if together:
        threads = [threading.Thread(target=shard, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    else:
        for i in range(n):
            shard(i)
    records = {e["id"]: e for r in results for e in r["episodes"]}
    continued: list[int] = []

    def more(first_round: int, count: int) -> list[dict]:
        continued.append(first_round)
        return run_catalog(model, rounds_of(plain, first_round, count))["episodes"]

    merged = take_rounds(specs[0]["adaptive"], whole, records, more)
    alone = simulate_until_decided(run_catalog, model, plain, budget(5000, gate))
    assert alone["adaptive"]["rounds"] > 1 and merged["adaptive"] == alone["adaptive"]
    assert [e["id"] for e in merged["episodes"]] == [e["id"] for e in alone["episodes"]]
    assert merged["episodes"] == alone["episodes"] and merged["metrics"] == alone["metrics"]
    if together:  # the shards did every round taken; together no further past the decision than one job's batch
        assert continued == [] and all(r["adaptive"]["rounds"] >= alone["adaptive"]["rounds"] for r in results)
        assert sum(len(r["episodes"]) for r in results) <= alone["adaptive"]["episodes"] + ROUNDS_PER_CALL * 26
    else:  # alone, a shard wastes nothing: round 0, then the merge goes on from round 1
        assert [r["adaptive"]["rounds"] for r in results] == [1] * n and continued[0] == 1
        assert sum(len(r["episodes"]) for r in results) == len(expand_catalog(next_round(plain, 0)))


def test_a_merge_missing_a_round_the_budget_takes_is_refused(tmp_path, project, model, catalog):
    from closedloop.steps.simulation import take_rounds

    gate = {"metric": "sim.cut_in.collision_rate", "max": 0.05, "confidence": 0.95}
    alone = simulate_until_decided(run_catalog, model, catalog, budget(5000, gate))
    records = {e["id"]: e for e in alone["episodes"][:-1]}  # the last round lacks one episode
    assert take_rounds(budget(5000, gate), catalog, records) is None


def test_the_budget_is_in_the_simulations_cache_key_and_its_docs(tmp_path, project):
    from closedloop.spec.describe import describe

    plain = loaded_with(tmp_path / "plain", project, {SHIPPED_ADAPTIVE: ""})
    small = loaded_with(tmp_path / "small", project, ADAPTIVE)
    large = loaded_with(tmp_path / "large", project, {**ADAPTIVE, "max_episodes: 2000": "max_episodes: 4000"})
    assert budget_of(plain) is None and budget_of(small)["gates"][0]["metric"] == "sim.collision_rate"
    trained = {"cache_key": "k", "model_uri": "models:/m/1"}
    keys = set()
    for loaded in (plain, small, large):
        ctx = RunContext(pipeline=loaded.spec.name, template_digest="", dag_id="d", run_id="r",
                         data_root=str(tmp_path / "data"))
        keys.add(simulation_key(loaded, ctx, trained))
    assert len(keys) == 3
    assert "adaptive budget" in describe(small) and "at most 2,000 episodes" in describe(small)
