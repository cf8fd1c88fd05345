"""The false-alarm budget rule: at most that fraction of held-out normal images is flagged."""
from __future__ import annotations

import numpy as np
import pytest

from mvtec_ray.config import load_config
from mvtec_ray.errors import UserError
from mvtec_ray.evaluation.thresholds import (
    choose_fpr_threshold,
    parse_threshold_rule,
    threshold_for_rule,
)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rate", [0.01, 0.05, 0.1, 0.25, 0.5])
def test_false_alarms_within_budget_and_tight(seed, rate):
    rng = np.random.default_rng(seed)
    n_normal = int(rng.integers(5, 300))
    normal = rng.normal(size=n_normal).round(int(rng.integers(1, 4)))  # rounding makes ties
    anomalies = rng.normal(2.0, 1.0, size=20)
    scores = np.r_[normal, anomalies]
    labels = np.r_[np.zeros(n_normal), np.ones(20)]
    threshold = choose_fpr_threshold(scores, labels, rate)
    flagged = int((normal >= threshold.value).sum())
    assert flagged <= rate * n_normal
    assert threshold.rule == f"val_fpr_{rate:g}"
    # tight: the next lower normal score as threshold would break the budget
    lower = normal[normal < threshold.value]
    if lower.size:
        assert (normal >= lower.max()).sum() > rate * n_normal


def test_small_budget_flags_no_normal():
    normal = np.array([0.1, 0.2, 0.3, 0.3])
    threshold = choose_fpr_threshold(normal, np.zeros(4), 0.01)
    assert threshold.value > 0.3 and not (normal >= threshold.value).any()


def test_rule_parsing_and_dispatch():
    assert parse_threshold_rule("F1") == ("f1", None)
    assert parse_threshold_rule("fpr:0.01") == ("fpr", 0.01)
    for bad in ("fpr:0", "fpr:1.5", "fpr:x", "youden"):
        with pytest.raises(ValueError):
            parse_threshold_rule(bad)
    scores, labels = np.r_[np.arange(10.0), 20.0], np.r_[np.zeros(10), 1]
    assert threshold_for_rule(scores, labels, "f1").rule == "val_f1_max"
    assert threshold_for_rule(scores, labels, "fpr:0.2").value == pytest.approx(7.5)
    with pytest.raises(ValueError, match="needs held-out normal"):
        choose_fpr_threshold([1.0, 2.0], [1, 1], 0.1)


def test_config_rejects_a_bad_rule_in_one_line():
    assert load_config(None, {"evaluation.threshold_rule": "fpr:0.05"}).evaluation.threshold_rule == "fpr:0.05"
    with pytest.raises(UserError, match="evaluation.threshold_rule: .*false-alarm rate") as info:
        load_config(None, {"evaluation.threshold_rule": "fpr:2"})
    assert "\n" not in str(info.value)
