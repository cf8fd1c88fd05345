"""Re-running `mvtec-ray score` into the same OUT: nothing stale, nothing lost.

The index is keyed on (uri, version, detector, model version): another detector, a refitted model
and a file replaced with the same size and mtime are scored; error rows are retried; the same job
twice scores nothing the second time. Few images: each case is about which rows a re-run writes.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mvtec_ray.distributed.scoring import run_scoring


def _config(fitted, out):
    return fitted[0].model_copy(update={"out": str(out)})


def _rows(out: Path, folder: str = "scores") -> pd.DataFrame:
    return pq.read_table(out / folder).to_pandas() if (out / folder).exists() else pd.DataFrame()


@pytest.fixture
def incoming(small_dataset, tmp_path) -> Path:
    """Two washer test images as fixed-size BMPs (same dimensions: same byte size)."""
    root = tmp_path / "in"
    (root / "washer").mkdir(parents=True)
    for i, path in enumerate(sorted((small_dataset / "washer" / "test").rglob("*.png"))[:2]):
        Image.open(path).convert("RGB").save(root / "washer" / f"{i}.bmp")
    return root


def test_a_second_detector_into_the_same_out_scores_every_image(fitted_lite0, incoming, tmp_path):
    out = tmp_path / "out"
    models = str(fitted_lite0[1])
    first = run_scoring(_config(fitted_lite0, out), models, str(incoming), detectors=["knn"])
    assert (first.scored_images, first.score_rows) == (2, 2)
    again = run_scoring(_config(fitted_lite0, out), models, str(incoming), detectors=["knn"])
    assert (again.listed, again.already_scored, again.scored_images, again.errors) == (2, 2, 0, 0)
    second = run_scoring(_config(fitted_lite0, out), models, str(incoming), detectors=["patchcore"])
    assert (second.already_scored, second.scored_images, second.score_rows) == (0, 2, 2)
    rows = _rows(out)
    assert sorted(rows.groupby("detector").size().items()) == [("knn", 2), ("patchcore", 2)]
    # both: each image lacks nothing now
    both = run_scoring(_config(fitted_lite0, out), models, str(incoming), detectors=["knn", "patchcore"])
    assert (both.already_scored, both.scored_images) == (2, 0)


def test_a_refitted_model_rescores_old_images_and_only_with_itself(fitted_lite0, incoming, tmp_path):
    from mvtec_ray.distributed.pipeline import run_fit
    from mvtec_ray.features.store import FeatureSet
    from mvtec_ray.storage import Storage
    fit_out = tmp_path / "fit"
    shutil.copytree(fitted_lite0[1], fit_out / "models")
    out = tmp_path / "out"
    detectors = ["knn", "patchcore"]
    first = run_scoring(_config(fitted_lite0, out), str(fit_out / "models"), str(incoming), detectors=detectors)
    assert first.score_rows == 4
    old = _rows(out).set_index("detector")["model_version"].to_dict()
    features = FeatureSet.open(str(fitted_lite0[1].parent / "features"))
    config = fitted_lite0[0].model_copy(update={"out": str(fit_out)})
    config = config.model_copy(update={"detectors": config.detectors.model_copy(update={"names": ["knn"]})})
    results, _ = run_fit(features, str(fit_out), config, Storage())  # `mvtec-ray fit --detectors knn`
    assert (results.loc[results["category"] == "washer", "status"] == "ok").all()
    second = run_scoring(_config(fitted_lite0, out), str(fit_out / "models"), str(incoming), detectors=detectors)
    assert (second.scored_images, second.score_rows) == (2, 2)
    rows = _rows(out)
    new = rows[rows["scored_at"] == rows["scored_at"].max()]
    assert set(new["detector"]) == {"knn"} and (new["model_version"] != old["knn"]).all()


def test_a_file_replaced_with_the_same_size_and_mtime_is_rescored(fitted_lite0, incoming, small_dataset, tmp_path):
    out = tmp_path / "out"
    models = str(fitted_lite0[1])
    run_scoring(_config(fitted_lite0, out), models, str(incoming), detectors=["knn"])
    target = incoming / "washer" / "0.bmp"
    st = target.stat()
    other = sorted((small_dataset / "washer" / "test").rglob("*.png"))[-1]
    buffer = io.BytesIO()
    Image.open(other).convert("RGB").save(buffer, format="BMP")
    assert len(buffer.getvalue()) == st.st_size  # fixed-size format: the size says nothing
    tmp = target.with_name("0.bmp.new")
    tmp.write_bytes(buffer.getvalue())
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p / rsync -t keep
    os.replace(tmp, target)
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    again = run_scoring(_config(fitted_lite0, out), models, str(incoming), detectors=["knn"])
    assert (again.already_scored, again.scored_images) == (1, 1)
    mine = _rows(out).query("input_uri == @target.as_posix()").sort_values("scored_at")
    assert len(mine) == 2 and mine["input_version"].nunique() == 2 and mine["score"].nunique() == 2


def test_an_error_row_is_retried_and_scored_once_fixed(fitted_lite0, incoming, tmp_path):
    out = tmp_path / "out"
    models = str(fitted_lite0[1])
    loose = incoming.parent / "loose"
    loose.mkdir()
    shutil.copy(incoming / "washer" / "0.bmp", loose / "x.bmp")
    # no category in the path and no --category: an error row
    first = run_scoring(_config(fitted_lite0, out), models, str(loose), detectors=["knn"])
    assert (first.scored_images, first.errors, first.known_errors) == (0, 1, 0)
    again = run_scoring(_config(fitted_lite0, out), models, str(loose), detectors=["knn"])
    assert (again.scored_images, again.errors, again.known_errors) == (0, 1, 1)  # retried, not written twice
    assert len(_rows(out, "errors")) == 1
    fixed = run_scoring(_config(fitted_lite0, out), models, str(loose), category="washer", detectors=["knn"])
    assert (fixed.scored_images, fixed.errors) == (1, 0)
    scores, errors = _rows(out), _rows(out, "errors")
    assert scores["input_version"].tolist() == errors["input_version"].tolist()  # the same file, same version
    assert scores["scored_at"].max() > errors["scored_at"].max()  # the latest outcome: scored
    assert np.isfinite(scores["score"]).all()
