"""The sharded coreset as Ray tasks on a 3-node local cluster (run in a subprocess, see
tests/helpers/coreset_split_scenario.py): same coreset as in one process, covering radius within
2x of the single greedy, shards spread over nodes."""
from __future__ import annotations

import pytest

from tests.helpers.scenario_runner import HELPERS, run_scenario

SCRIPT = HELPERS / "coreset_split_scenario.py"


@pytest.fixture(scope="module")
def verdict(tmp_path_factory):
    work = tmp_path_factory.mktemp("coreset_split")
    return run_scenario(SCRIPT, [], work, 400)


@pytest.mark.slow
def test_split_coreset_equals_the_in_process_sharded_coreset(verdict):
    assert verdict["n_shards"] == 5
    assert verdict["split_equals_in_process"] and verdict["bank_equals"], verdict
    assert verdict["n_split"] == verdict["n_single"]


@pytest.mark.slow
def test_split_coreset_covers_within_twice_the_single_greedy(verdict):
    assert 0 < verdict["radius_split"] <= 2 * verdict["radius_single"], verdict


@pytest.mark.slow
def test_shard_tasks_spread_over_nodes(verdict):
    nodes = verdict["shard_nodes"]
    assert len(nodes) == verdict["n_shards"]
    assert set(nodes) <= set(verdict["node_ids"].values())
    assert len(set(nodes)) >= 2, nodes


@pytest.mark.slow
def test_patchcore_option_runs_the_shards_as_tasks(verdict):
    assert verdict["detector_shards"] == 5
    assert verdict["detector_indices_equal"] and verdict["detector_scores_equal"], verdict
