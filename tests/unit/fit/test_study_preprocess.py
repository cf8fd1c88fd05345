"""The preprocessing study chooses on validation AUROC and only reports test AUROC."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "study_preprocess.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study_preprocess", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scores(val_scores, val_labels, test_scores, test_labels) -> pd.DataFrame:
    rows = [{"category": "a", "detector": "knn", "split": "val_good" if y == 0 else "val_synthetic", "label": y,
             "score": s} for s, y in zip(val_scores, val_labels)]
    rows += [{"category": "a", "detector": "knn", "split": "test", "label": y, "score": s}
             for s, y in zip(test_scores, test_labels)]
    return pd.DataFrame(rows)


def test_validation_auroc_reads_validation_rows_only(study):
    # validation: 3 of 4 (normal, synthetic) pairs ordered -> 0.75
    val_scores, val_labels = [0.1, 0.5, 0.4, 0.9], [0, 0, 1, 1]
    base = study.validation_auroc(_scores(val_scores, val_labels, [0.2, 0.8], [0, 1]))
    flipped = study.validation_auroc(_scores(val_scores, val_labels, [0.2, 0.8], [1, 0]))
    assert base["val_auroc"].tolist() == flipped["val_auroc"].tolist() == [pytest.approx(0.75)]


def test_choice_follows_validation_even_when_test_disagrees(study):
    cells = pd.DataFrame([
        # standard wins on validation, none wins on test: the choice must be standard
        {"detector": "elliptic", "category": c, "preprocess": m, "val_auroc": v, "image_auroc": t}
        for c in ("a", "b") for m, v, t in (("none", 0.80, 0.99), ("standard", 0.95, 0.70), ("pca95", 0.85, 0.90))
    ] + [
        # a gain within the margin keeps none
        {"detector": "knn", "category": c, "preprocess": m, "val_auroc": v, "image_auroc": t}
        for c in ("a", "b") for m, v, t in (("none", 0.900, 0.80), ("standard", 0.905, 0.95), ("pca95", 0.7, 0.99))
    ])
    chosen = study.choose_modes(cells, margin=0.01).set_index("detector")
    assert chosen.loc["elliptic", "chosen"] == "standard"
    assert chosen.loc["knn", "chosen"] == "none"
    assert chosen.loc["elliptic", "test_none"] == pytest.approx(0.99)  # test reported beside it
    assert chosen.loc["elliptic", "val_standard"] == pytest.approx(0.95)
    # the test column never moves the choice
    shuffled = cells.assign(image_auroc=np.random.default_rng(0).permutation(cells["image_auroc"].to_numpy()))
    assert study.choose_modes(shuffled, margin=0.01)["chosen"].tolist() == chosen["chosen"].tolist()


def test_the_study_is_not_a_job_entry_point():
    root = SCRIPT.parents[1]
    assert SCRIPT.is_file() and not (root / "pipelines" / "study_preprocess.py").exists()
