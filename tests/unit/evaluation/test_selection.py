"""The ``best_on_validation`` row: per category, the detector with the best validation AUROC, chosen
without reading a test label. Constructed rows and scores tables (the pipeline's columns), no Ray."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from mvtec_ray.evaluation.metrics import image_metrics
from mvtec_ray.evaluation.selection import (
    BEST_ON_VALIDATION,
    best_on_validation_rows,
    validation_metrics,
    with_best_on_validation,
    with_validation,
)
from mvtec_ray.evaluation.summary import MEAN_ROW, summarise
from mvtec_ray.report.tables import format_results_table, results_markdown, tuning_rows

N_VAL_GOOD, N_VAL_SYNTHETIC, N_TEST = 20, 20, 40


def _scores_of(category: str, detector: str, val_separation: float, test_separation: float,
               rng: np.random.Generator) -> pd.DataFrame:
    """One cell's scores: validation and test anomalies shifted by the given separations."""
    test_labels = np.r_[np.zeros(N_TEST // 2, int), np.ones(N_TEST // 2, int)]
    parts = [("val_good", np.zeros(N_VAL_GOOD, int), 0.0), ("val_synthetic", np.ones(N_VAL_SYNTHETIC, int),
                                                           val_separation),
             ("test", test_labels, test_separation)]
    frames = []
    for split, labels, shift in parts:
        score = rng.normal(0, 1, len(labels)) + shift * labels
        frames.append(pd.DataFrame({"category": category, "detector": detector, "split": split,
                                    "image_id": [f"{split}/{i}" for i in range(len(labels))],
                                    "label": labels, "score": score}))
    return pd.concat(frames, ignore_index=True)


def _rows_of(scores: pd.DataFrame, status: dict | None = None) -> pd.DataFrame:
    """The per-cell rows the fit writes: test metrics (at a fixed threshold) from the test scores."""
    status = status or {}
    rows = []
    for (category, detector), group in scores.groupby(["category", "detector"], sort=False):
        test = group[group["split"] == "test"]
        row = {"category": category, "detector": detector, "backbone": "resnet18", "error": "",
               "status": status.get((category, detector), "ok"), "n_val_good": N_VAL_GOOD, "fit_seconds": 1.0}
        row.update(image_metrics(test["label"], test["score"], 0.5))
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture
def run() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two categories. In ``bottle`` the test-best detector (lof) is not the validation-best (knn)."""
    rng = np.random.default_rng(0)
    cells = {("bottle", "knn"): (2.0, 0.3), ("bottle", "lof"): (0.5, 4.0), ("bottle", "ocsvm"): (1.0, 1.0),
             ("screw", "knn"): (0.2, 3.0), ("screw", "lof"): (2.5, 0.5), ("screw", "ocsvm"): (0.8, 0.8)}
    scores = pd.concat([_scores_of(c, d, v, t, rng) for (c, d), (v, t) in cells.items()], ignore_index=True)
    return _rows_of(scores), scores


def _choice(rows: pd.DataFrame, scores: pd.DataFrame) -> dict[str, str]:
    best = best_on_validation_rows(with_validation(rows, scores))
    return dict(zip(best["category"], best["chosen_detector"]))


def test_the_validation_best_is_chosen_where_the_test_best_differs(run):
    rows, scores = run
    by_cell = rows.set_index(["category", "detector"])
    assert by_cell.loc[("bottle", "lof"), "image_auroc"] > by_cell.loc[("bottle", "knn"), "image_auroc"]  # the trap
    validation = validation_metrics(scores).set_index(["category", "detector"])
    for (category, detector), group in scores[scores["split"].str.startswith("val")].groupby(["category", "detector"]):
        labels = (group["split"] == "val_synthetic").astype(int)
        assert validation.loc[(category, detector), "val_auroc"] == pytest.approx(roc_auc_score(labels, group["score"]))
        assert validation.loc[(category, detector), "val_ap"] == pytest.approx(
            average_precision_score(labels, group["score"]))
    expected = {c: validation.loc[c]["val_auroc"].idxmax() for c in ("bottle", "screw")}
    assert expected == {"bottle": "knn", "screw": "lof"}
    assert _choice(rows, scores) == expected

    best = best_on_validation_rows(with_validation(rows, scores)).set_index("category")
    for category, detector in expected.items():
        chosen = by_cell.loc[(category, detector)]
        row = best.loc[category]
        assert row["detector"] == BEST_ON_VALIDATION and row["status"] == "ok"
        for column in ("image_auroc", "image_ap", "image_f1", "threshold", "fit_seconds"):
            assert row[column] == chosen[column], column  # the chosen cell's test metrics, copied
        assert row["val_auroc"] == validation.loc[(category, detector), "val_auroc"]


def test_the_choice_never_reads_a_test_label_or_score(run):
    rows, scores = run
    chosen = _choice(rows, scores)
    is_test = scores["split"] == "test"
    rng = np.random.default_rng(1)
    flipped = scores.assign(label=np.where(is_test, 1 - scores["label"], scores["label"]))
    shuffled = scores.assign(label=np.where(is_test, rng.permutation(scores["label"]), scores["label"]),
                             score=np.where(is_test, rng.permutation(scores["score"]), scores["score"]))
    without_test = scores[~is_test]
    # the test metrics of the rows made to favour another detector: still the validation's choice
    favour_other = rows.assign(image_auroc=np.where(rows["detector"].isin(set(chosen.values())), 0.0, 1.0),
                               image_ap=0.0)
    for changed_scores, changed_rows in ((flipped, rows), (shuffled, rows), (without_test, rows),
                                         (scores, favour_other)):
        assert _choice(changed_rows, changed_scores) == chosen
    # the validation labels are the splits: a label column of garbage changes nothing either
    garbage = scores.assign(label=rng.integers(0, 2, len(scores)))
    pd.testing.assert_frame_equal(validation_metrics(garbage), validation_metrics(scores))
    # and the choice does follow validation: make another detector the best there and it is chosen
    boosted = scores.copy()
    other = (boosted["category"] == "bottle") & (boosted["detector"] == "ocsvm") & (boosted["split"] == "val_synthetic")
    boosted.loc[other, "score"] += 100.0
    assert _choice(rows, boosted)["bottle"] == "ocsvm"


def test_ties_go_to_validation_ap_then_to_the_cheaper_detector_in_any_row_order():
    good, synthetic = np.arange(4.0), np.arange(4.0) + 10  # perfectly separated: AUROC 1 for everyone
    frames = []
    for detector in ("patchcore", "knn", "ocsvm"):
        for split, values in (("val_good", good), ("val_synthetic", synthetic)):
            frames.append(pd.DataFrame({"category": "bottle", "detector": detector, "split": split,
                                        "label": int(split == "val_synthetic"), "score": values}))
    scores = pd.concat(frames, ignore_index=True)
    rows = pd.DataFrame({"category": "bottle", "detector": ["patchcore", "knn", "ocsvm"], "status": "ok",
                         "image_auroc": [0.9, 0.8, 0.7]})
    for seed in range(4):
        shuffled_rows = rows.sample(frac=1.0, random_state=seed)
        shuffled_scores = scores.sample(frac=1.0, random_state=seed)
        assert _choice(shuffled_rows, shuffled_scores) == {"bottle": "knn"}  # fit cost 0.2 < 1.0 < 200
    # equal AUROC (12/16 each), unequal AP: a normal above every anomaly (knn) costs more AP than an
    # anomaly below every normal (patchcore); the AP decides before the cost
    uneven = scores.copy()
    of = lambda detector, split, value: (uneven["detector"] == detector) & (uneven["split"] == split) & \
        (uneven["score"] == value)  # noqa: E731
    uneven.loc[of("knn", "val_good", 3.0), "score"] = 14.0
    uneven.loc[of("patchcore", "val_synthetic", 10.0), "score"] = -1.0
    metrics = validation_metrics(uneven).set_index("detector")
    assert metrics.loc["knn", "val_auroc"] == metrics.loc["patchcore", "val_auroc"] == pytest.approx(12 / 16)
    assert metrics.loc["patchcore", "val_ap"] > metrics.loc["knn", "val_ap"]
    assert metrics.loc["ocsvm", "val_auroc"] == 1.0
    assert _choice(rows, uneven) == {"bottle": "ocsvm"}  # the AUROC first
    assert _choice(rows[rows["detector"] != "ocsvm"], uneven) == {"bottle": "patchcore"}


def test_only_ok_cells_with_both_validation_classes_are_candidates(run):
    rows, scores = run
    # bottle's validation best fails; screw's validation best lost its synthetic anomalies
    rows = rows.assign(status=np.where((rows["category"] == "bottle") & (rows["detector"] == "knn"), "error", "ok"))
    scores = scores[~((scores["category"] == "screw") & (scores["detector"] == "lof")
                      & (scores["split"] == "val_synthetic"))]
    cells = with_validation(rows, scores)
    assert np.isnan(cells.set_index(["category", "detector"]).loc[("screw", "lof"), "val_auroc"])
    choice = _choice(rows, scores)
    assert choice["bottle"] != "knn" and choice["screw"] != "lof"
    # a category with no candidate at all says so in a row of its own
    nothing = rows.assign(status=np.where(rows["category"] == "screw", "error", rows["status"]))
    best = best_on_validation_rows(with_validation(nothing, scores)).set_index("category")
    assert best.loc["screw", "status"] == "error" and "no detector to choose" in best.loc["screw", "error"]
    assert best.loc["bottle", "status"] == "ok"


def test_the_mean_row_and_the_tables(run):
    rows, scores = run
    results = summarise(with_best_on_validation(with_validation(rows, scores)))
    per_category = results[(results["category"] != MEAN_ROW) & (results["detector"] == BEST_ON_VALIDATION)]
    mean = results[(results["category"] == MEAN_ROW) & (results["detector"] == BEST_ON_VALIDATION)].iloc[0]
    assert len(per_category) == 2 and mean["status"] == "ok"
    assert mean["image_auroc"] == pytest.approx(per_category["image_auroc"].mean())
    assert mean["val_auroc"] == pytest.approx(per_category["val_auroc"].mean())
    assert pd.isna(mean["chosen_detector"])  # knn and lof: no single name for the mean row
    assert results.loc[results["detector"] != BEST_ON_VALIDATION, "val_auroc"].notna().all()
    # one choice everywhere: the mean row names it
    same = summarise(with_best_on_validation(with_validation(rows[rows["detector"] == "ocsvm"], scores)))
    assert same.loc[(same["category"] == MEAN_ROW) & (same["detector"] == BEST_ON_VALIDATION),
                    "chosen_detector"].tolist() == ["ocsvm"]
    # with_best_on_validation replaces earlier alias rows instead of stacking them
    again = with_best_on_validation(with_best_on_validation(with_validation(rows, scores)))
    assert (again["detector"] == BEST_ON_VALIDATION).sum() == 2

    text = format_results_table(results)
    assert "best_on_validation (knn)" in text and "best_on_validation (lof)" in text
    lines = text.splitlines()
    alias = [i for i, line in enumerate(lines) if "best_on_validation" in line]
    assert alias == list(range(alias[0], alias[0] + 3))  # one block: no blank line between its rows
    assert "| bottle | best_on_validation (knn) |" in results_markdown(results)
    assert "val_auroc" in lines[0]
    assert BEST_ON_VALIDATION not in [r[0] for r in tuning_rows(results.assign(default_image_auroc=0.5))]


def test_a_row_carrying_its_validation_metrics_keeps_them_the_others_get_them_from_the_scores(run):
    rows, scores = run
    expected = validation_metrics(scores).set_index(["category", "detector"])
    # the fit cells computed theirs where they ran; a row without them (an older run) still gets them
    rows = rows.copy()
    rows["val_auroc"], rows["val_ap"] = np.nan, np.nan
    own = (rows["category"] == "bottle").to_numpy()
    rows.loc[own, "val_auroc"] = 0.123  # not what the scores say: the row's own value must be kept
    rows.loc[own, "val_ap"] = 0.456
    cells = with_validation(rows, scores).set_index(["category", "detector"])
    assert (cells.loc["bottle", "val_auroc"] == 0.123).all() and (cells.loc["bottle", "val_ap"] == 0.456).all()
    np.testing.assert_allclose(cells.loc["screw", "val_auroc"], expected.loc["screw", "val_auroc"])
    np.testing.assert_allclose(cells.loc["screw", "val_ap"], expected.loc["screw", "val_ap"])
