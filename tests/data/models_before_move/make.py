"""How ``models/`` and ``expected.json`` here were made: with mvtec-ray 0.1.0 as it was before the
house-plan move (commit 077931f, the flat module layout), every built-in detector fitted on features
of 16 generated washer images (EfficientNet-Lite0, 64 px), then the fit-time scores of 6 held-out
images recorded. It runs only against that layout (``PYTHONPATH=<checkout of 077931f>``);
tests/integration/test_models_before_move.py checks today's code loads and scores these folders.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from mvtec_ray.backbones import resolve_weights
from mvtec_ray.catalog import build_catalog
from mvtec_ray.config import EvaluationConfig, ExtractConfig
from mvtec_ray.extract import ExtractionWorker, expected_row_ids, extraction_metadata, plan_work, probe_feature_shapes
from mvtec_ray.features import EXTRACT_META, FeatureSet
from mvtec_ray.fitting import fit_category_detector
from mvtec_ray.sample_data import SampleSpec, generate_sample_dataset
from mvtec_ray.storage import Storage, join

HERE = Path(__file__).resolve().parent
#: every built-in detector but mahalanobis (its 1280 x 1280 covariance is 13 MB; its npz format is PaDiM's),
#: the large ones made small so the folder stays a few hundred KB
DETECTORS = {"ocsvm": {}, "iforest": {"n_estimators": 5}, "lof": {}, "elliptic": {}, "knn": {},
             "autoencoder": {"max_epochs": 3, "hidden": 16, "bottleneck": 8}, "padim": {}, "patchcore": {}}


def main(work: str) -> None:
    storage = Storage()
    data = Path(work) / "data"
    generate_sample_dataset(data, categories=["washer"], seed=5,
                            spec=SampleSpec(n_train=16, n_test_good=3, n_test_defect_per_type=1, size=64))
    config = ExtractConfig(backbone="efficientnet_lite0", image_size=64, patch_dim=16, padim_channels=8,
                           augment_copies=0, synthetic_per_image=1, batch_size=8)
    weights = resolve_weights(config.backbone, config.weights)
    catalog = build_catalog(str(data), storage, ["washer"])
    out = join(str(Path(work) / "features"), config.fingerprint())
    metadata = extraction_metadata(config, weights, probe_feature_shapes(config, weights))
    storage.write_bytes(join(out, EXTRACT_META), json.dumps(metadata).encode())
    plan = plan_work(catalog.entries, config)
    worker = ExtractionWorker(config, storage, out, metadata, weights.state_dict, threads=1)
    worker({k: plan[k].to_numpy(dtype=object) for k in plan.columns})
    assert len(FeatureSet(out, storage).read(columns=["row_id"])) == len(expected_row_ids(plan))
    features = FeatureSet.open(out, storage, require_complete=False)
    pooled = features.load_pooled("washer")
    run = str(Path(work) / "run")
    expected = {}
    for name, params in DETECTORS.items():
        outcome = fit_category_detector(features, "washer", name, params, EvaluationConfig(pixel_eval_size=32),
                                        run, storage, 1, pooled if name not in ("padim", "patchcore") else None)
        assert outcome.row["status"] == "ok", outcome.row
        test = outcome.scores[outcome.scores["split"] == "test"]
        expected[name] = dict(zip(test["input_uri"].map(lambda u: Path(u).relative_to(data).as_posix()),
                                  test["score"].astype(float)))
    shutil.copytree(Path(run) / "models" / "washer", HERE / "models" / "washer")
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
