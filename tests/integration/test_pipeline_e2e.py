"""End to end through a real local Ray: extract -> fit every detector -> table -> score new images.

The run and the scoring jobs go through the command line (``mvtec_ray.cli.main``, in this process so
they share the session's Ray) with the default detectors, as a user would type them.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mvtec_ray.cli import main
from mvtec_ray.config import DetectorsConfig, load_config
from mvtec_ray.distributed.scoring import run_scoring
from mvtec_ray.evaluation.selection import BEST_ON_VALIDATION

ALL = ["ocsvm", "iforest", "lof", "elliptic", "knn", "autoencoder", "mahalanobis", "padim", "patchcore"]


@pytest.fixture(scope="module")
def demo_run(ray_session, small_dataset, tmp_path_factory):
    """`mvtec-ray run` with the default detectors (every detector of the zoo)."""
    assert sorted(DetectorsConfig().names) == sorted(ALL)
    out = tmp_path_factory.mktemp("run")
    assert main(["run", "--data", str(small_dataset), "--out", str(out), "--backbone", "efficientnet_lite0"]) == 0
    config = load_config(None, {"data": str(small_dataset), "out": str(out), "extract.backbone": "efficientnet_lite0"})
    outputs = SimpleNamespace(results=pd.read_parquet(out / "results.parquet"),
                              scores=pd.read_parquet(out / "scores.parquet"))
    return config, outputs, out


@pytest.fixture(scope="module")
def incoming(demo_run, small_dataset, tmp_path_factory) -> Path:
    """Every category's test images, as <category>/test/<type>/<file> (the layout's image ids)."""
    root = tmp_path_factory.mktemp("incoming")
    for category in ("grid_gray", "washer"):
        shutil.copytree(small_dataset / category / "test", root / category / "test")
    return root


def _relative(frame: pd.DataFrame, root: Path) -> pd.Series:
    return frame["input_uri"].map(lambda u: Path(u).relative_to(root).as_posix())


def test_score_every_default_model_gives_the_fit_time_test_scores(demo_run, incoming, small_dataset, tmp_path,
                                                                   capsys):
    _, outputs, out = demo_run
    scored = tmp_path / "scored"
    assert main(["score", "--models", str(out / "models"), "--images", str(incoming), "--out", str(scored)]) == 0
    assert "scored 20 new images (180 rows)" in capsys.readouterr().out
    table = pq.read_table(scored / "scores").to_pandas()
    table = table.assign(image_id=_relative(table, incoming))
    fitted = outputs.scores[outputs.scores["split"] == "test"]
    # one column name for the image's location in both tables
    assert {"input_uri", "image_id"} <= set(fitted.columns) and "path" not in fitted.columns
    assert (fitted["input_uri"] == fitted["image_id"].map(lambda i: str(small_dataset / i))).all()
    merged = table.merge(fitted, on=["image_id", "detector"], suffixes=("_scored", "_fit"), validate="one_to_one")
    assert len(merged) == len(fitted) == len(table) == 20 * len(ALL)
    assert sorted(merged["detector"].unique()) == sorted(ALL)
    for detector, rows in merged.groupby("detector"):
        np.testing.assert_allclose(rows["score_scored"], rows["score_fit"], rtol=1e-4, atol=1e-5,
                                   err_msg=f"{detector}: scoring differs from the fit's test scores")
        assert (rows["threshold_scored"] == rows["threshold_fit"]).all(), detector
    assert set(zip(merged["category_scored"], merged["detector"])) == {(c, d) for c in ("grid_gray", "washer")
                                                                       for d in ALL}


def test_score_categories_keeps_only_those_models_and_images(demo_run, incoming, tmp_path, capsys):
    _, _, out = demo_run
    scored = tmp_path / "only_washer"
    args = ["score", "--models", str(out / "models"), "--images", str(incoming), "--out", str(scored),
            "--detectors", "knn", "--categories", "washer"]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert "scored 10 new images (10 rows)" in summary and "10 of other categories left out" in summary
    table = pq.read_table(scored / "scores").to_pandas()
    assert set(table["category"]) == {"washer"} and len(table) == 10
    assert not (scored / "errors").exists()  # left out, not failed: a later job still scores them
    assert main(args[:-1] + ["zipper"]) == 2
    assert "no model for categories ['zipper']" in capsys.readouterr().err


def test_table_has_every_detector_and_category(demo_run):
    _, outputs, out = demo_run
    results = pd.read_parquet(out / "results.parquet")
    per_cat = results[results["category"] != "mean"]
    assert sorted(per_cat["category"].unique()) == ["grid_gray", "washer"]
    every = [*ALL, BEST_ON_VALIDATION]  # and the deployable choice per category
    assert set(zip(per_cat["category"], per_cat["detector"])) == {(c, d) for c in ("grid_gray", "washer") for d in every}
    assert sorted(results.loc[results["category"] == "mean", "detector"]) == sorted(every)
    errors = per_cat[per_cat["status"] != "ok"]
    assert errors.empty, errors[["category", "detector", "error"]].to_string()
    for column in ["backbone", "image_auroc", "image_f1", "image_f1_max", "threshold", "n_train", "n_test_good",
                   "n_test_defect"]:
        assert column in results.columns
    assert (per_cat["backbone"] == "efficientnet_lite0").all()
    assert per_cat["weights"].str.startswith("imagenet").all()
    assert (per_cat["n_test_defect"] == 6).all() and (per_cat["n_test_good"] == 4).all()
    for name in ["config.yaml", "results.csv", "results.md", "scores.parquet", "errors.parquet", "report.html"]:
        assert (out / name).is_file(), name


def test_pretrained_detectors_beat_chance(demo_run):
    _, outputs, _ = demo_run
    mean = outputs.results[outputs.results["category"] == "mean"].set_index("detector")
    # the strongest detectors must be well above chance with real pretrained weights
    assert mean.loc["patchcore", "image_auroc"] > 0.85, mean["image_auroc"]
    assert mean.loc["knn", "image_auroc"] > 0.7, mean["image_auroc"]
    assert (mean["image_auroc"] > 0.5).sum() >= 7, mean["image_auroc"]
    assert mean.loc["patchcore", "pixel_auroc"] > 0.85
    # the threshold came from validation data; the oracle F1 is never below it
    per_cat = outputs.results[outputs.results["category"] != "mean"]
    assert (per_cat["image_f1_max"] >= per_cat["image_f1"] - 1e-9).all()
    assert set(per_cat["threshold_rule"]) == {"val_f1_max"}


def test_score_matches_fit_and_is_incremental(demo_run, small_dataset, tmp_path):
    config, outputs, out = demo_run
    images = tmp_path / "incoming" / "washer"
    shutil.copytree(small_dataset / "washer" / "test", images)
    score_config = config.model_copy(update={"out": str(tmp_path / "scored")})
    first = run_scoring(score_config, models_uri=str(out / "models"), images_uri=str(tmp_path / "incoming"),
                        detectors=["knn", "patchcore"])
    assert first.scored_images == 10 and first.errors == 0
    table = pq.read_table(tmp_path / "scored" / "scores").to_pandas()
    assert len(table) == 20
    fitted = outputs.scores[(outputs.scores["split"] == "test") & (outputs.scores["category"] == "washer")]
    fitted = fitted.assign(name=fitted["image_id"].str.split("/", n=2).str[2])
    table = table.assign(name=table["input_uri"].str.split("/washer/").str[-1])
    merged = table.merge(fitted, left_on=["name", "detector"], right_on=["name", "detector"])
    assert len(merged) == 20
    np.testing.assert_allclose(merged["score_x"], merged["score_y"], rtol=1e-4, atol=1e-5)
    assert (merged["is_anomaly"] == (merged["score_x"] >= merged["threshold_x"])).all()
    assert table.loc[table["detector"] == "patchcore", "anomaly_map"].notna().all()

    again = run_scoring(score_config, models_uri=str(out / "models"), images_uri=str(tmp_path / "incoming"),
                        detectors=["knn", "patchcore"])
    assert again.scored_images == 0 and again.already_scored == 10
    shutil.copy(next(images.rglob("*.png")), images / "new_one.png")
    (images / "broken.png").write_bytes(b"not a png")
    third = run_scoring(score_config, models_uri=str(out / "models"), images_uri=str(tmp_path / "incoming"),
                        detectors=["knn", "patchcore"])
    assert third.scored_images == 1 and third.errors == 1 and third.already_scored == 10
    errors = pq.read_table(tmp_path / "scored" / "errors").to_pandas()
    assert errors["input_uri"].str.endswith("broken.png").all() and errors["error"].str.contains("image").all()
