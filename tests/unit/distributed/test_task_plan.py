"""The fit stage's task plan: every (category, detector) cell exactly once, the cheap built-in pooled
detectors of a category in one task, the rest one task each, longest first."""
from __future__ import annotations

from mvtec_ray.detectors.registry import builtin_names, fit_cost
from mvtec_ray.distributed.pipeline import GROUPED_FIT_COST, _task_plan


def test_every_cell_once_cheap_ones_share_a_task_longest_first():
    categories = ["bottle", "screw", "tile"]
    names = builtin_names() + ["my_plugin"]  # a detector outside the table: its cost is unknown
    plan = _task_plan(categories, names)
    cells = [(category, name) for category, group in plan for name in group]
    assert sorted(cells) == sorted((c, n) for c in categories for n in names)
    cheap = {n for n in builtin_names("pooled") if fit_cost(n) <= GROUPED_FIT_COST}
    assert cheap == {"ocsvm", "iforest", "lof", "elliptic", "knn"}
    grouped = [group for _, group in plan if len(group) > 1]
    assert len(grouped) == len(categories) and all(set(group) == cheap for group in grouped)
    assert all(len(group) == 1 for _, group in plan if not set(group) <= cheap)  # plugins, patches: alone
    costs = [sum(fit_cost(n) for n in group) for _, group in plan]
    assert costs == sorted(costs, reverse=True)
    assert plan[0][1] == ["patchcore"]


def test_a_single_cheap_detector_is_its_own_task():
    assert _task_plan(["bottle"], ["knn", "autoencoder"]) == [("bottle", ["autoencoder"]), ("bottle", ["knn"])]
