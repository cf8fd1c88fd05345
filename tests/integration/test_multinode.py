"""Multi-node scheduling, placement by custom resource, and node loss (several raylets, one machine).

The cluster runs in a subprocess (tests/helpers/multinode_scenarios.py): this pytest process may
already be connected to the session's embedded Ray, and a process can join one cluster only. One subprocess,
one cluster, three phases (see the script's docstring); each test below checks one part of its verdict.
"""
from __future__ import annotations

import pytest

from mvtec_ray.evaluation.selection import BEST_ON_VALIDATION
from tests.helpers.scenario_runner import HELPERS, run_scenario

SCRIPT = HELPERS / "multinode_scenarios.py"
PAIRS = sorted(f"{c}/{d}" for c in ("grid_gray", "washer")
               for d in ("knn", "mahalanobis", "patchcore", BEST_ON_VALIDATION))


@pytest.fixture(scope="module")
def verdict(small_dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode")
    return run_scenario(SCRIPT, ["--data", str(small_dataset), "--work", str(work)], work, 720,
                        show=("kills", "events", "wall_s"))


@pytest.mark.slow
def test_every_phase_completed(verdict):
    assert verdict.get("extract_error") is None and verdict.get("fit_error") is None, verdict
    for key in ("extract", "fit", "fake_gpu_extract"):
        assert key in verdict, key


@pytest.mark.slow
def test_work_spreads_over_nodes(verdict):
    nodes = verdict["node_ids"]
    # rows per extractor node, plus the killed node that held an extractor actor: its rows may all be
    # redone elsewhere when the kill comes before any of its batches reached the driver
    killed = {k["node_id"] for k in verdict["kills"]
              if k["stage"] == "extract" and any("MapWorker" in t for t in k["running"])}
    assert len(set(verdict["extract"]["nodes"]) | killed) >= 2, (verdict["extract"]["nodes"], killed)
    assert set(verdict["extract"]["nodes"]) <= set(nodes.values())
    assert len(verdict["fit"]["nodes"]) >= 2, verdict["fit"]  # fit tasks ran on several nodes
    assert set(verdict["fit"]["nodes"]) <= set(nodes.values())


@pytest.mark.slow
def test_extractor_actors_only_on_the_fake_gpu_node(verdict):
    plan = verdict["fake_gpu_plan"]
    assert plan["resources"] == {"fake_gpu": 1.0}
    assert plan["actors"] == 1  # 2 asked, one node offers fake_gpu: capped instead of hanging
    extract = verdict["fake_gpu_extract"]
    assert extract["rows"] == extract["expected_rows"] > 0 and extract["missing"] == 0
    assert set(extract["nodes"]) == {verdict["fake_gpu_node"]}, extract["nodes"]
    assert sum(extract["nodes"].values()) == extract["rows"]


@pytest.mark.slow
def test_node_loss_during_extraction(verdict):
    kills = [k for k in verdict["kills"] if k["stage"] == "extract"]
    assert kills, "no node was killed during extraction"
    kill = kills[0]
    assert any("MapWorker" in t for t in kill["running"]), kill  # it held an extractor actor
    assert 0 < kill["rows_written"] < kill["rows_total"]
    extract = verdict["extract"]
    # every image variant exactly once, none lost, none in error
    assert extract["rows"] == extract["expected_rows"] == kill["rows_total"]
    assert extract["missing"] == extract["unexpected"] == extract["duplicates"] == extract["error_rows"] == 0
    assert sum(extract["nodes"].values()) == extract["rows"]


@pytest.mark.slow
def test_node_loss_during_fit(verdict):
    kills = [k for k in verdict["kills"] if k["stage"] == "fit"]
    assert kills, "no node was killed during the fit"
    kill = kills[0]
    assert kill["fit_tasks_running_there"] >= 1 and kill["fit_tasks_finished"] < kill["fit_tasks_total"]
    fit = verdict["fit"]
    assert fit["pairs"] == PAIRS  # every (category, detector) once
    assert all(s == "ok" for s in fit["status"].values()), fit["status"]


def test_actor_resources_option_is_validated_and_not_in_the_fingerprint():
    from mvtec_ray.config import ExtractConfig
    plain = ExtractConfig()
    placed = ExtractConfig(actor_resources={"fake_gpu": 1, "accelerator_type:A10G": 0.001})
    assert placed.fingerprint() == plain.fingerprint()  # where features are computed, not what they are
    for bad in ({"CPU": 1}, {"GPU": 1}, {"fake_gpu": 0}):
        with pytest.raises(ValueError):
            ExtractConfig(actor_resources=bad)
