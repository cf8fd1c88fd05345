"""Tests for mvtec_ray.evaluation.metrics (pure numpy / sklearn, fast)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from mvtec_ray.evaluation.metrics import image_metrics
from mvtec_ray.evaluation.pixel_metrics import pixel_auroc, pro_curve, pro_score
from mvtec_ray.evaluation.summary import summarise
from mvtec_ray.evaluation.thresholds import Threshold, choose_threshold


# -- choose_threshold ------------------------------------------------------------
def test_threshold_separable_val_set_lies_between_classes_and_gives_f1_one():
    rng = np.random.default_rng(0)
    normal = rng.uniform(0.0, 1.0, 40)
    anomal = rng.uniform(2.0, 3.0, 10)
    scores = np.r_[normal, anomal]
    labels = np.r_[np.zeros(40), np.ones(10)]
    thr = choose_threshold(scores, labels)
    assert thr.rule == "val_f1_max"
    assert normal.max() < thr.value < anomal.min()
    # midpoint between the chosen score and the next lower distinct score
    assert thr.value == pytest.approx((normal.max() + anomal.min()) / 2)
    assert image_metrics(labels, scores, thr)["image_f1"] == 1.0


def test_threshold_f1_tie_goes_to_higher_threshold():
    # P = 2. Flag {4}: F1 = 2/3; flag {4,3,2,1}: F1 = 4/6 = 2/3 (tie); others lower.
    scores = np.array([4.0, 3.0, 2.0, 1.0])
    labels = np.array([1, 0, 0, 1])
    thr = choose_threshold(scores, labels)
    assert thr.value == pytest.approx(3.5)  # midpoint of 4 and the next lower score 3


def test_threshold_only_normals_uses_quantile_not_flag_everything():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=500)
    thr = choose_threshold(scores, np.zeros(500), normal_quantile=0.99)
    assert thr.rule == "normal_quantile_0.99"
    assert thr.value == pytest.approx(np.quantile(scores, 0.99))
    flagged = np.mean(scores >= thr.value)
    assert 0.0 < flagged <= 0.02  # about 1 %, certainly not everything
    assert choose_threshold(scores, np.zeros(500), 0.95).rule == "normal_quantile_0.95"


def test_reported_f1_is_at_the_validation_threshold_not_the_test_optimum():
    # validation: normals 0..3, anomalies 5, 6 -> F1 = 1 at any cut in (3, 5]: midway, 4.0
    thr = choose_threshold([0.0, 1.0, 2.0, 3.0, 5.0, 6.0], [0, 0, 0, 0, 1, 1])
    assert thr.value == pytest.approx(4.0)
    # test: normals 0, 1, 4.5; anomalies 3.5, 7, 8. At 4.0: flag 4.5, 7, 8 -> tp 2, fp 1, fn 1 -> F1 2/3.
    # The test set's own best cut would be 2.25 (flag 3.5, 4.5, 7, 8 -> F1 6/7): a metric that
    # re-tuned on test labels would report 6/7 here.
    test_scores, test_labels = np.array([0.0, 1.0, 4.5, 3.5, 7.0, 8.0]), np.array([0, 0, 0, 1, 1, 1])
    m = image_metrics(test_labels, test_scores, thr)
    assert m["threshold"] == pytest.approx(4.0)
    assert m["image_f1"] == pytest.approx(2 / 3)
    assert m["image_precision"] == pytest.approx(2 / 3) and m["image_recall"] == pytest.approx(2 / 3)
    assert m["image_f1_max"] == pytest.approx(6 / 7)  # the oracle, reported beside it
    assert m["threshold_f1_max"] == pytest.approx(2.25)
    assert choose_threshold(test_scores, test_labels).value == pytest.approx(2.25)  # what leakage would give


def test_threshold_rejects_empty_only_anomalies_and_nan():
    with pytest.raises(ValueError, match="empty"):
        choose_threshold([], [])
    with pytest.raises(ValueError, match="only anomalies"):
        choose_threshold([1.0, 2.0], [1, 1])
    with pytest.raises(ValueError, match="1 NaN"):
        choose_threshold([1.0, np.nan], [0, 1])


# -- image_metrics ---------------------------------------------------------------
LABELS = np.array([0, 0, 1, 1])
SCORES = np.array([0.1, 0.4, 0.35, 0.8])


def test_image_metrics_hand_computed():
    # pos/neg pairs: 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> AUROC 3/4
    # threshold 0.3 flags [0.4, 0.35, 0.8]: tp=2 fp=1 fn=0 -> P=2/3 R=1 F1=4/5
    # AP: ranks 0.8(pos) P=1 R=.5 ; 0.35(pos) P=2/3 R=1 -> .5*1 + .5*2/3 = 5/6
    # oracle: flag >=0.35 gives F1 4/5 (best); threshold midway to 0.1 -> 0.225
    m = image_metrics(LABELS, SCORES, 0.3)
    assert m["image_auroc"] == pytest.approx(0.75)
    assert m["image_ap"] == pytest.approx(5 / 6)
    assert m["image_precision"] == pytest.approx(2 / 3)
    assert m["image_recall"] == pytest.approx(1.0)
    assert m["image_f1"] == pytest.approx(0.8)
    assert m["image_f1_max"] == pytest.approx(0.8)
    assert m["threshold_f1_max"] == pytest.approx(0.225)
    # decision rule is score >= threshold: at exactly 0.35 the 0.35 image is flagged
    assert image_metrics(LABELS, SCORES, Threshold(0.35, "x"))["image_recall"] == 1.0
    assert image_metrics(LABELS, SCORES, 0.3500001)["image_recall"] == 0.5


def test_image_metrics_flipped_scores_and_none_threshold():
    m = image_metrics(LABELS, SCORES, None)
    flipped = image_metrics(LABELS, -SCORES, None)
    assert flipped["image_auroc"] == pytest.approx(1 - m["image_auroc"])
    for key in ("image_f1", "image_precision", "image_recall", "threshold"):
        assert np.isnan(m[key])
    assert not np.isnan(m["image_f1_max"])


def test_image_f1_max_dominates_any_threshold():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    scores = rng.normal(size=60) + labels
    m = image_metrics(labels, scores, None)
    f1s = [image_metrics(labels, scores, t)["image_f1"]
           for t in np.r_[np.unique(scores), scores.max() + 1]]
    assert m["image_f1_max"] == pytest.approx(max(f1s))
    assert image_metrics(labels, scores, m["threshold_f1_max"])["image_f1"] == \
        pytest.approx(m["image_f1_max"])


def test_image_metrics_single_class_and_nan_inputs():
    m = image_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.15)
    assert np.isnan(m["image_auroc"]) and np.isnan(m["image_ap"])
    assert np.isnan(m["image_f1_max"])
    with pytest.raises(ValueError, match="2 NaN"):
        image_metrics([0, 1, 1], [np.nan, 0.2, np.nan], 0.5)


# -- pixel metrics ---------------------------------------------------------------
def _blob_masks(n=12, h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n // 2, n):  # first half are good images with empty masks
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            masks[i, y:y + rng.integers(2, 8), x:x + rng.integers(2, 8)] = True
    return masks


def _exact_pro(maps, masks, fpr_limit):
    """Brute force: every distinct score as a threshold, per-region loops."""
    structure = np.ones((3, 3), dtype=int)
    regions = []
    for a, m in zip(maps, masks):
        lab, n = ndimage.label(m, structure=structure)
        regions += [a[lab == r] for r in range(1, n + 1)]
    normal = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    i = np.searchsorted(fprs, fpr_limit, side="right")
    y_lim = np.interp(fpr_limit, fprs[i - 1:i + 1], pros[i - 1:i + 1])
    x = np.r_[fprs[:i], fpr_limit]
    y = np.r_[pros[:i], y_lim]
    return np.trapezoid(y, x) / fpr_limit


def test_pixel_auroc_perfect_inverted_and_matches_sklearn():
    masks = _blob_masks()
    assert pixel_auroc(masks.astype(np.float32), masks) == 1.0
    assert pixel_auroc(-masks.astype(np.float32), masks) == 0.0
    rng = np.random.default_rng(4)
    maps = np.round(rng.normal(size=masks.shape) + masks, 1)  # with ties
    assert pixel_auroc(maps, masks) == pytest.approx(
        roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert np.isnan(pixel_auroc(maps, np.zeros_like(masks)))


def test_pro_perfect_map_is_one():
    masks = _blob_masks()
    assert pro_score(masks.astype(np.float32), masks) == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(5)
    # any map that separates every defect pixel from every normal pixel
    maps = masks * 2.0 + rng.uniform(0, 1, masks.shape)
    assert pro_score(maps, masks) == pytest.approx(1.0, abs=1e-6)


def test_pro_hand_computed_two_regions():
    # Two 8x7 images = 112 px. Region R1 (2x2 = 4 px) in image 0, region R2
    # (2x4 = 8 px) in image 1 -> 100 normal pixels, 10 of which score 2, the
    # rest 0. R1 scores 3 everywhere; R2 scores 3 on one half, 1 on the other.
    #   t in (2, 3]: FPR 0,    PRO (1 + 1/2) / 2 = 0.75
    #   t in (1, 2]: FPR 0.1,  PRO 0.75
    #   t in (0, 1]: FPR 0.1,  PRO 1
    #   t <= 0     : FPR 1,    PRO 1
    # Area on [0, 0.3] = 0.75 * 0.1 + 1.0 * 0.2 = 0.275 -> / 0.3 = 0.91666...
    # On [0, 0.05] the PRO is 0.75 throughout -> 0.75.
    masks = np.zeros((2, 8, 7), dtype=bool)
    maps = np.zeros((2, 8, 7))
    masks[0, 1:3, 1:3] = True
    masks[1, 3:5, 1:5] = True
    maps[0, 1:3, 1:3] = 3.0
    maps[1, 3:5, 1:3] = 3.0
    maps[1, 3:5, 3:5] = 1.0
    maps[0, 7, :] = 2.0   # 7 normal px
    maps[1, 0, :3] = 2.0  # 3 normal px
    assert (~masks).sum() == 100 and (maps[~masks] == 2.0).sum() == 10
    # the sampled vertices are exact here, whatever the number of thresholds
    for n_thr in (5, 200):
        assert pro_score(maps, masks, num_thresholds=n_thr) == pytest.approx(0.275 / 0.3, abs=1e-9)
    assert pro_score(maps, masks, fpr_limit=0.05) == pytest.approx(0.75, abs=1e-9)


def test_pro_uses_8_connectivity():
    # (0,0) touches (1,1) only diagonally: 8-connectivity -> one 4-px region of
    # which only (0,0) scores high -> PRO 1/4 up to FPR 1. (4-connectivity would
    # give two regions and PRO mean(1, 0) = 0.5.)
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 1, 1:4] = True
    maps = np.zeros((1, 6, 6))
    maps[0, 0, 0] = 2.0
    maps[0, 1, 1:4] = -1.0
    assert pro_score(maps, masks) == pytest.approx(0.25, abs=1e-9)


def test_pro_random_and_constant_maps_are_at_chance():
    masks = _blob_masks(n=16, h=48, w=48, seed=6)
    rng = np.random.default_rng(7)
    # random map: PRO(t) ~ FPR(t), the diagonal -> area ~ fpr_limit/2 -> 0.15
    random_score = pro_score(rng.uniform(size=masks.shape), masks)
    assert random_score < 0.3
    assert random_score == pytest.approx(0.15, abs=0.05)
    # constant map: one tie from (0,0) to (1,1), joined linearly (random
    # tie-breaking in expectation) -> exactly 0.3^2/2 / 0.3 = 0.15
    assert pro_score(np.full(masks.shape, 0.5), masks) == pytest.approx(0.15, abs=1e-9)


def test_pro_matches_brute_force_reference():
    masks = _blob_masks(n=6, h=16, w=16, seed=8)
    rng = np.random.default_rng(9)
    maps = np.round(rng.normal(size=masks.shape) + 1.5 * masks, 2)
    exact = _exact_pro(maps, masks, 0.3)
    n_normal = int((~masks).sum())
    # dense enough to hit every normal score -> exact vertices -> exact area
    assert pro_score(maps, masks, num_thresholds=4 * n_normal) == pytest.approx(exact, abs=1e-9)
    # default sampling: small interpolation error only
    assert pro_score(maps, masks) == pytest.approx(exact, abs=0.01)
    fpr, pro = pro_curve(maps, masks)
    assert fpr[0] == 0 and pro[0] == 0 and fpr[-1] == 1 and pro[-1] == pytest.approx(1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)


def test_pro_edge_cases():
    maps = np.zeros((2, 4, 4))
    assert np.isnan(pro_score(maps, np.zeros((2, 4, 4), dtype=bool)))
    with pytest.raises(ValueError, match="shape"):
        pro_score(maps, np.zeros((2, 4, 5), dtype=bool))
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        pro_score(bad, np.ones((2, 4, 4), dtype=bool))


# -- summarise -------------------------------------------------------------------
def test_summarise_appends_mean_of_ok_rows():
    rows = pd.DataFrame({
        "category": ["cable", "bottle", "screw", "bottle", "cable", "screw"],
        "detector": ["knn", "knn", "knn", "padim", "padim", "padim"],
        "backbone": ["resnet18"] * 6,
        "status": ["ok", "ok", "error", "ok", "ok", "ok"],
        "image_auroc": [0.9, 0.8, np.nan, 0.6, 0.7, 0.95],
        "pixel_pro": [0.5, 0.7, 0.0, 0.1, 0.2, 0.3],
        "n_test": [10, 20, 30, 10, 20, 30],
    })
    out = summarise(rows)
    assert list(out["detector"]) == ["knn"] * 4 + ["padim"] * 4
    assert list(out["category"]) == ["bottle", "cable", "screw", "mean"] * 2
    knn = out[(out.detector == "knn") & (out.category == "mean")].iloc[0]
    padim = out[(out.detector == "padim") & (out.category == "mean")].iloc[0]
    # error row (screw) excluded: its pixel_pro 0.0 would pull the mean to 0.4
    assert knn["image_auroc"] == pytest.approx(0.85)
    assert knn["pixel_pro"] == pytest.approx(0.6)
    assert knn["n_test"] == 30
    assert knn["status"] == "partial (2/3 ok)"
    assert padim["image_auroc"] == pytest.approx((0.6 + 0.7 + 0.95) / 3)
    assert padim["pixel_pro"] == pytest.approx(0.2)
    assert padim["n_test"] == 60 and padim["status"] == "ok"
    assert knn["backbone"] == padim["backbone"] == "resnet18"
    # idempotent: existing mean rows are recomputed, not averaged in
    pd.testing.assert_frame_equal(summarise(out), out)


def test_summarise_without_status_uses_all_rows():
    rows = pd.DataFrame({"category": ["a", "b"], "detector": ["d", "d"],
                         "backbone": ["x", "y"], "image_f1": [0.2, 0.4]})
    out = summarise(rows)
    mean = out.iloc[-1]
    assert mean["category"] == "mean" and mean["image_f1"] == pytest.approx(0.3)
    assert pd.isna(mean["backbone"])  # not unique -> left empty
