"""Scoring: model store refusals, S3 in and out, categories, --rescore, the CLI, bounded driver state."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from mvtec_ray.config import load_config
from mvtec_ray.deploy.listing import iter_listing, list_images
from mvtec_ray.deploy.model_files import check_versions, load_model, runtime_versions
from mvtec_ray.deploy.score_index import input_hashes, read_index, score_keys
from mvtec_ray.deploy.scorer import write_score_shards
from mvtec_ray.distributed.scoring import run_scoring
from mvtec_ray.errors import ModelMismatch, UserError
from mvtec_ray.storage import Storage
from tests.helpers.s3_upload import upload_tree

DETECTORS = ["knn", "patchcore"]


@pytest.fixture(scope="module")
def fitted(ray_session, small_dataset, tmp_path_factory):
    """knn + patchcore fitted on the washer category only (grid_gray then has no model)."""
    from mvtec_ray.distributed.pipeline import run_pipeline
    out = tmp_path_factory.mktemp("fit")
    config = load_config(None, {"data": str(small_dataset), "out": str(out), "categories": ["washer"],
                                "extract.backbone": "efficientnet_lite0", "detectors.names": DETECTORS})
    run_pipeline(config)
    return config, out / "models"


def _config(fitted, out, **extract):
    config = fitted[0].model_copy(update={"out": str(out)})
    for key, value in extract.items():
        config = config.model_copy(update={"extract": config.extract.model_copy(update={key: value})})
        config.extract.model_fields_set.add(key)
    return config


def _incoming(small_dataset, root: Path, n: int = 4) -> Path:
    """n washer test images under root/washer, plus files that cannot be scored."""
    (root / "washer").mkdir(parents=True)
    for _i, path in enumerate(sorted((small_dataset / "washer" / "test").rglob("*.png"))[:n]):
        shutil.copy(path, root / "washer" / f"{path.parent.name}_{path.name}")
    (root / "grid_gray").mkdir()
    shutil.copy(next((small_dataset / "grid_gray" / "test" / "good").glob("*.png")), root / "grid_gray" / "g.png")
    shutil.copy(next((small_dataset / "washer" / "test" / "good").glob("*.png")), root / "loose.png")
    (root / "notes.txt").write_text("not an image")
    return root


def _copy_models(fitted, tmp_path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(fitted[1], target)
    return target


def _edit(models: Path, fn, detectors=DETECTORS) -> None:
    for name in detectors:
        path = models / "washer" / name / "model.json"
        info = json.loads(path.read_text())
        fn(info)
        path.write_text(json.dumps(info))


# -- model store: refusals, all before any Ray work ------------------------------------
@pytest.mark.parametrize("tamper, expected", [
    (lambda i: i["schema"].update(image_size=256), "patch_shape"),        # features would be 32x32
    (lambda i: i["schema"].update(patch_dim=64), "patch_shape"),          # features would have 64 channels
    (lambda i: i["schema"].update(image_size=256, patch_shape=[32, 32, 152], padim_shape=[64, 64, 100]), "patch grid"),
    (lambda i: i["schema"].update(pooled_dim=640), "pooled_dim"),
    (lambda i: i["schema"].update(backbone="efficientnet_lite2"), "backbone='efficientnet_lite2'"),
    (lambda i: i["schema"].update(weights_sha256="0" * 64), "weights differ"),
    (lambda i: i.update(category="screw"), "holds a model.json for screw"),
    (lambda i: i.update(threshold="high"), "threshold"),
    (lambda i: i.update(files=["../x"]), "refusing file name"),
    (lambda i: i.update(fit_versions={**i["fit_versions"], "scikit-learn": "2.0.0"}), "major versions differ"),
    (lambda i: i.update(fit_versions={**i["fit_versions"], "faiss": "0.9.0"}), "faiss"),
], ids=["image_size", "patch_dim", "image_size+patch_shape", "pooled_dim", "backbone", "weights", "category",
        "threshold", "file_name", "sklearn_major", "faiss_major"])
def test_tampered_model_json_is_refused(fitted, tmp_path, tamper, expected):
    models = _copy_models(fitted, tmp_path)
    _edit(models, tamper)
    with pytest.raises(ModelMismatch) as info:
        run_scoring(_config(fitted, tmp_path / "out"), str(models), str(tmp_path), detectors=DETECTORS)
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert not (tmp_path / "out").exists()


def test_one_tampered_model_among_good_ones_is_refused(fitted, tmp_path):
    models = _copy_models(fitted, tmp_path)
    _edit(models, lambda i: i["schema"].update(image_size=320), detectors=["knn"])
    with pytest.raises(ModelMismatch, match="different features .*image_size"):
        run_scoring(_config(fitted, tmp_path / "out"), str(models), str(tmp_path), detectors=DETECTORS)


def test_requested_settings_must_match_the_models(fitted, tmp_path):
    models = str(fitted[1])
    with pytest.raises(ModelMismatch, match="backbone='efficientnet_lite0', but scoring uses backbone='resnet18'"):
        run_scoring(_config(fitted, tmp_path / "o", backbone="resnet18"), models, str(tmp_path))
    with pytest.raises(ModelMismatch, match="image_size=224, but scoring uses image_size=256"):
        run_scoring(_config(fitted, tmp_path / "o", image_size=256), models, str(tmp_path))
    with pytest.raises(UserError, match="no model for category 'zipper'"):
        run_scoring(_config(fitted, tmp_path / "o"), models, str(tmp_path), category="zipper")


def test_changed_or_foreign_model_files_are_refused(fitted, tmp_path):
    models = _copy_models(fitted, tmp_path)
    storage = Storage()
    bank = models / "washer" / "patchcore" / "memory_bank.faiss"
    bank.write_bytes(bank.read_bytes() + b"\0")
    with pytest.raises(ModelMismatch, match="memory_bank.faiss changed after the model was saved"):
        load_model(storage, str(models), "washer", "patchcore")
    # a knn folder holding patchcore's files: the loader says so, nothing is unpickled
    shutil.rmtree(models / "washer" / "knn")
    shutil.copytree(fitted[1] / "washer" / "patchcore", models / "washer" / "knn")
    _edit(models, lambda i: i.update(detector="knn"), detectors=["knn"])
    with pytest.raises(ModelMismatch, match="holds a 'patchcore'"):
        load_model(storage, str(models), "washer", "knn")
    (models / "washer" / "knn" / "model.json").write_text("{not json")
    with pytest.raises(ModelMismatch, match="not valid JSON"):
        load_model(storage, str(models), "washer", "knn")


def test_version_policy_refuses_major_warns_minor(caplog):
    current = runtime_versions()
    assert {"torch", "scikit-learn", "numpy", "faiss"} <= set(current)
    major, minor = current["scikit-learn"].split(".")[:2]
    check_versions({"fit_versions": dict(current)}, "c/d", current)
    with caplog.at_level(logging.WARNING, logger="mvtec_ray.deploy.model_files"):
        check_versions({"fit_versions": {"scikit-learn": f"{major}.{int(minor) + 1}.0"}}, "c/d", current)
    assert "scores may differ slightly" in caplog.text
    with pytest.raises(ModelMismatch, match="scikit-learn"):
        check_versions({"fit_versions": {"scikit-learn": f"{int(major) + 1}.0.0"}}, "c/d", current)
    check_versions({}, "c/d", current)  # models without versions load (nothing to compare)


# -- listing, categories, bounded driver state (no Ray) --------------------------------------
def test_listing_categories_from_flag_or_path(small_dataset, tmp_path):
    root = _incoming(small_dataset, tmp_path / "in", n=2)
    (root / "washer" / "ground_truth").mkdir()
    (root / "washer" / "ground_truth" / "m.png").write_bytes(b"x")
    (root / "washer" / ".hidden.png").write_bytes(b"x")
    table = list_images(Storage(), str(root), ["washer"], None).set_index("uri")
    problem = {Path(u).relative_to(root).as_posix(): p for u, p in table["problem"].items()}
    category = {Path(u).relative_to(root).as_posix(): c for u, c in table["category"].items()}
    assert [k for k, p in problem.items() if not p] == sorted(k for k in problem if k.startswith("washer/")
                                                             and k.count("/") == 1 and ".hidden" not in k)
    assert problem["grid_gray/g.png"].startswith("no model for category 'grid_gray'")
    assert category["grid_gray/g.png"] == "grid_gray"
    assert problem["loose.png"].startswith("no category in the path and no --category")
    assert problem["notes.txt"].startswith("not an image file")
    assert problem["washer/ground_truth/m.png"].startswith("defect mask")
    assert problem["washer/.hidden.png"] == "hidden file"
    forced = list_images(Storage(), str(root), ["washer"], "washer")
    assert set(forced["category"]) == {"washer"}
    assert set(forced.loc[forced["uri"].str.endswith(".png") & ~forced["uri"].str.contains("ground_truth|hidden"),
                          "problem"]) == {""}
    chunks = list(iter_listing(Storage(), str(root), ["washer"], None, chunk=2))
    assert max(len(c) for c in chunks) == 2 and sum(len(c) for c in chunks) == len(table)


def test_scored_index_is_compact_hashes(tmp_path):
    import pyarrow as pa
    (tmp_path / "scores").mkdir()
    for i in range(3):
        table = pa.table({"input_uri": [f"/x/{i}.png"] * 2, "input_version": ["1-2"] * 2, "detector": ["a", "b"]})
        table = table.append_column("model_version", pa.array(["m"] * 2)).append_column("scored_at", pa.array([1.0] * 2))
        pq.write_table(table, str(tmp_path / "scores" / f"part-{i}.parquet"))
    index = read_index(Storage(), str(tmp_path)).scored
    assert index.dtype == np.uint64 and len(index) == 6  # one 8-byte entry per (image, model), not a string
    keys = score_keys(["/x/1.png"] * 3, ["1-2", "9-9", "1-2"], ["a", "a", "c"], ["m"] * 3)
    assert np.isin(keys, index).tolist() == [True, False, False]
    assert input_hashes(["/x/1.png"], ["1-2"]).dtype == np.uint64


def test_writer_returns_counts_not_rows(tmp_path):
    n = 6
    batch = {"input_uri": np.asarray([f"u{i // 2}" for i in range(n)], dtype=object),
             "input_version": np.full(n, "v", dtype=object), "category": np.full(n, "washer", dtype=object),
             "detector": np.asarray(["knn", "patchcore"] * 3, dtype=object), "score": np.arange(n, dtype=float),
             "threshold": np.ones(n), "is_anomaly": np.zeros(n, bool), "model_version": np.full(n, "m", dtype=object),
             "backbone": np.full(n, "b", dtype=object), "weights": np.full(n, "w", dtype=object),
             "scored_at": np.zeros(n), "status": np.asarray(["ok"] * 4 + ["error"] * 2, dtype=object),
             "error": np.asarray(["", "", "", "", "bad", "bad"], dtype=object),
             "first": np.asarray([True, False] * 3), "map": np.zeros((n, 4, 4), np.float16),
             "has_map": np.asarray([False, True] * 3)}
    counts = write_score_shards(batch, str(tmp_path), Storage())
    assert {k: list(v) for k, v in counts.items()} == {"category": ["washer"], "images": [2], "rows": [4],
                                                        "errors": [2], "known_errors": [0]}
    assert len(pq.read_table(tmp_path / "scores").to_pandas()) == 4


# -- through Ray ------------------------------------------------------------------------------
def _scores(uri: str, storage: Storage | None = None) -> pd.DataFrame:
    if storage is None:
        return pq.read_table(uri).to_pandas()
    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs).to_pandas()


def _by_name(table: pd.DataFrame, root: Path) -> pd.DataFrame:
    return table.set_index(table["input_uri"].map(lambda u: Path(u).relative_to(root).as_posix()))


def test_categories_unknowns_and_rescore(fitted, small_dataset, tmp_path):
    root = _incoming(small_dataset, tmp_path / "in", n=3)
    out = tmp_path / "out"
    first = run_scoring(_config(fitted, out), str(fitted[1]), str(root), detectors=DETECTORS)
    assert (first.listed, first.scored_images, first.score_rows, first.errors) == (6, 3, 6, 3)
    assert first.by_category == {"washer": 3}
    # batched scoring in the actor gives the fit's own test scores
    fit = pd.read_parquet(fitted[1].parent / "scores.parquet")
    fit = fit[fit["split"] == "test"]
    fit = fit.assign(name="washer/" + fit["image_id"].str.split("/").str[2:].str.join("_"))
    merged = _by_name(_scores(str(out / "scores")), root).reset_index(names="name").merge(fit, on=["name", "detector"])
    assert len(merged) == 6
    np.testing.assert_allclose(merged["score_x"], merged["score_y"], rtol=1e-4, atol=1e-5)
    errors = _by_name(_scores(str(out / "errors")), root)
    assert errors.loc["grid_gray/g.png", "error"].startswith("no model for category 'grid_gray'")
    assert errors.loc["grid_gray/g.png", "category"] == "grid_gray"
    assert errors.loc["loose.png", "error"].startswith("no category in the path")
    assert errors.loc["notes.txt", "error"].startswith("not an image file")

    again = run_scoring(_config(fitted, out), str(fitted[1]), str(root), detectors=DETECTORS)
    # error rows are tried again (and not written twice); scored images are not
    assert (again.listed, again.already_scored, again.scored_images, again.errors, again.known_errors) == \
        (6, 3, 0, 3, 3)
    before = _scores(str(out / "scores"))["scored_at"].max()
    forced = run_scoring(_config(fitted, out), str(fitted[1]), str(root), detectors=DETECTORS, rescore=True)
    assert (forced.already_scored, forced.scored_images, forced.errors) == (0, 3, 3)
    scores = _scores(str(out / "scores"))
    latest = scores.sort_values("scored_at").groupby(["input_uri", "detector"]).tail(1)
    assert len(latest) == 6 and (latest["scored_at"] > before).all()

    # a folder that names no category (errors without --category: see the listing test) is scored with it
    flat = tmp_path / "flat"
    shutil.copytree(root / "washer", flat)
    forced_category = run_scoring(_config(fitted, tmp_path / "o2"), str(fitted[1]), str(flat), category="washer",
                                  detectors=["knn"])
    assert (forced_category.scored_images, forced_category.errors) == (3, 0)
    by_flag = _by_name(_scores(str(tmp_path / "o2" / "scores")), flat)["score"]
    by_path = _by_name(latest[latest["detector"] == "knn"], root / "washer")["score"]
    np.testing.assert_allclose(by_flag.sort_index(), by_path.sort_index(), rtol=1e-6)


def test_s3_models_images_and_output(fitted, small_dataset, tmp_path, s3_server, s3_settings):
    root = _incoming(small_dataset, tmp_path / "in", n=4)
    client = s3_server["client"]
    upload_tree(client, "mvtec", fitted[1], "scoring/models")
    upload_tree(client, "mvtec", root, "scoring/incoming")
    config = _config(fitted, "s3://mvtec/scoring/out").model_copy(update={"s3": s3_settings})
    remote = run_scoring(config, "s3://mvtec/scoring/models", "s3://mvtec/scoring/incoming", detectors=DETECTORS)
    local = run_scoring(_config(fitted, tmp_path / "local"), str(fitted[1]), str(root), detectors=DETECTORS)
    assert (remote.listed, remote.scored_images, remote.score_rows, remote.errors) == \
        (local.listed, local.scored_images, local.score_rows, local.errors) == (7, 4, 8, 3)

    # read back with plain pyarrow, not through the project's Storage
    fs = pafs.S3FileSystem(access_key=s3_server["aws_access_key_id"], secret_key=s3_server["aws_secret_access_key"],
                           region="us-east-1", endpoint_override=s3_server["endpoint"].split("://")[1],
                           scheme="http")
    remote_scores = pq.read_table("mvtec/scoring/out/scores", filesystem=fs).to_pandas()
    remote_errors = pq.read_table("mvtec/scoring/out/errors", filesystem=fs).to_pandas()
    local_scores = _scores(str(tmp_path / "local" / "scores"))
    assert remote_scores["input_uri"].str.startswith("s3://mvtec/scoring/incoming/").all()
    key = lambda t, base: t.assign(name=t["input_uri"].str.replace(base, "", regex=False))  # noqa: E731
    merged = key(remote_scores, "s3://mvtec/scoring/incoming/").merge(
        key(local_scores, str(root) + "/"), on=["name", "detector"], suffixes=("_s3", "_local"))
    assert len(merged) == len(remote_scores) == len(local_scores) == 8
    np.testing.assert_allclose(merged["score_s3"], merged["score_local"], rtol=1e-6, atol=1e-7)
    assert (merged["is_anomaly_s3"] == merged["is_anomaly_local"]).all()
    assert sorted(remote_errors["input_uri"].str.rsplit("/", n=1).str[-1]) == ["g.png", "loose.png", "notes.txt"]
    again = run_scoring(config, "s3://mvtec/scoring/models", "s3://mvtec/scoring/incoming", detectors=DETECTORS)
    assert (again.already_scored, again.scored_images, again.known_errors) == (4, 0, 3)


def test_cli_score_end_to_end(fitted, small_dataset, tmp_path, ray_session):
    root = _incoming(small_dataset, tmp_path / "in", n=2)
    cli = Path(sys.executable).with_name("mvtec-ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    address = ray_session.get_runtime_context().gcs_address  # reuse the session's cluster: no second Ray
    args = [str(cli), "score", "--models", str(fitted[1]), "--images", str(root), "--out", str(tmp_path / "out"),
            "--detectors", "knn", "--address", address]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"scored 2 new images (2 rows) into {tmp_path / 'out'}/scores; 3 errors")
    assert "0 of 5 listed were already scored" in summary and "[washer: 2]" in summary
    models = _copy_models(fitted, tmp_path)
    _edit(models, lambda i: i["schema"].update(patch_dim=64), detectors=["knn"])
    args[args.index("--models") + 1] = str(models)
    refused = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and refused.stderr.startswith("mvtec-ray score: error: model ")
