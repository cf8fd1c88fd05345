"""One test image whose mask or source file cannot be read any more (permissions changed since
extraction, replaced by a folder, ...) is a recorded problem of that image, not a failed cell."""
from __future__ import annotations

import shutil

from mvtec_ray.config import EvaluationConfig
from mvtec_ray.fit.cell import fit_category_detector
from mvtec_ray.storage import Storage
from tests.helpers.pixel_store import CATEGORY, write_pixel_store


def _unreadable(path) -> None:
    path.unlink()
    path.mkdir()  # reading it fails with an OS error even as root, who ignores permission bits


def test_an_unreadable_mask_or_image_leaves_that_image_out(tmp_path):
    features, mask_files = write_pixel_store(tmp_path / "store")
    clean = fit_category_detector(features, CATEGORY, "patchcore", {"projection_dim": 0, "coreset_ratio": 0.5},
                                  EvaluationConfig(), str(tmp_path / "clean"), Storage()).row
    assert clean["status"] == "ok" and not clean.get("problems")
    _unreadable(mask_files[0])
    source = tmp_path / "store" / "images" / "test_000.png"
    _unreadable(source)
    outcome = fit_category_detector(features, CATEGORY, "patchcore", {"projection_dim": 0, "coreset_ratio": 0.5},
                                    EvaluationConfig(), str(tmp_path / "out"), Storage())
    row = outcome.row
    assert row["status"] == "ok", row["error"]
    assert "left out of the pixel metrics" in row["problems"] and mask_files[0].name in row["problems"]
    assert f"overlay of {source} skipped" in row["problems"]
    assert 0 <= row["pixel_auroc"] <= 1 and row["image_auroc"] == clean["image_auroc"]
    overlays = {f for f in outcome.scores["overlay_file"] if f}
    assert len(overlays) == len(outcome.scores[outcome.scores["split"] == "test"]) - 1  # the unreadable mask's
    shutil.rmtree(tmp_path / "out")
