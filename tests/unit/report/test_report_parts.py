"""The report's parts: the one map resize, the ROC points, escaping through the templates, light tables."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvtec_ray.evaluation.maps import resize_map
from mvtec_ray.report.figures import roc_points
from mvtec_ray.report.html import write_report
from tests.unit.report.test_report import make_fake_run

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("src, dst", [((16, 16), (48, 48)), ((900, 700), (224, 224)), ((40, 60), (100, 30))])
def test_resize_map_is_torch_bilinear_and_pillow_nearest(src, dst):
    rng = np.random.default_rng(0)
    amap = rng.random(src).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(amap)[None, None], size=dst, mode="bilinear",
                                               align_corners=False)[0, 0].numpy()
    out = resize_map(amap, dst)
    assert out.dtype == np.float32 and out.shape == dst and np.array_equal(out, expected)
    mask = rng.random(src) > 0.7
    small = resize_map(mask, dst, nearest=True)
    assert small.dtype == bool and small.shape == dst
    pillow = Image.fromarray(mask.astype(np.uint8) * 255).resize(dst[::-1], Image.Resampling.NEAREST)
    assert np.array_equal(small, np.asarray(pillow) > 127)  # the masks' resize of the pixel protocol


def test_resize_map_at_its_own_shape_is_the_same_values():
    amap = np.arange(12, dtype=np.float64).reshape(3, 4)
    out = resize_map(amap, (3, 4))
    assert out.dtype == np.float32 and out.flags.c_contiguous and np.array_equal(out, amap)
    mask = np.eye(3, dtype=bool)
    assert resize_map(mask, (3, 3), nearest=True) is mask


def _roc_by_hand(labels: np.ndarray, scores: np.ndarray):
    """The report's ROC maths before scikit-learn: ties collapsed, from (0, 0)."""
    ok = np.isfinite(scores)
    labels, scores = labels[ok].astype(bool), scores[ok]
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def test_roc_points_are_the_same_curve_as_before():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)  # many ties
    scores[[5, 17]] = np.nan
    ours, before = roc_points(labels, scores), _roc_by_hand(labels, scores)
    assert np.array_equal(ours[0], before[0]) and np.array_equal(ours[1], before[1])
    assert roc_points(np.ones(4, int), np.arange(4.0)) is None
    assert roc_points(np.array([0, 1]), np.array([np.nan, 1.0])) is None


def test_every_string_of_the_run_is_escaped(tmp_path):
    hostile = '<img src=x onerror="alert(1)">'
    out = make_fake_run(tmp_path / "run<em>", categories=["cat'&"], detectors=["knn", "patchcore"], n_good=3,
                        n_defect=3, error_pairs=set())
    import pandas as pd
    res = pd.read_parquet(out / "results.parquet")
    res["backbone"] = hostile
    res.loc[0, ["status", "error"]] = ["error", "<script>alert(2)</script>"]
    res.to_parquet(out / "results.parquet")
    page = write_report(out).read_text(encoding="utf-8")
    assert "<img src=x" not in page and "<script" not in page and "<em>" not in page
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page and "&lt;script&gt;alert(2)" in page
    assert "run&lt;em&gt;" in page and "cat&#39;&amp;" in page
    assert "body{font-family:system-ui,-apple-system,'Segoe UI'" in page  # the CSS as written, not escaped


def test_the_tables_import_neither_matplotlib_nor_scikit_learn():
    code = ("import sys, mvtec_ray.report.tables, mvtec_ray.report.outputs, mvtec_ray.evaluation.maps; "
            "print(','.join(m for m in ('matplotlib', 'sklearn', 'torch', 'jinja2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
