"""Batch scoring's re-run rules without Ray: file versions, the listing's walk, the index keyed on
(uri, version, detector, model version), error rows retried, per-image detector lists."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from mvtec_ray.config import load_config
from mvtec_ray.data.catalog import build_catalog
from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset
from mvtec_ray.deploy.listing import list_images
from mvtec_ray.deploy.score_index import error_keys, read_index
from mvtec_ray.deploy.scorer import write_score_shards
from mvtec_ray.storage import Storage

MODELS_BEFORE_MOVE = Path(__file__).resolve().parents[2] / "data" / "models_before_move" / "models"


def _replace_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """What ``cp -p`` / ``rsync -t`` do to a fixed-size file: new bytes, the old size and mtime."""
    st = path.stat()
    assert len(data) == st.st_size
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)


# -- one version function ---------------------------------------------------------------------------
def test_a_replaced_file_with_the_same_size_and_mtime_gets_a_new_version(tmp_path):
    storage = Storage()
    (tmp_path / "washer").mkdir()
    image = tmp_path / "washer" / "a.bmp"
    image.write_bytes(b"A" * 64)
    before = list_images(storage, str(tmp_path), ["washer"], None)["version"].tolist()
    _replace_keeping_size_and_mtime(image, b"B" * 64)
    after = list_images(storage, str(tmp_path), ["washer"], None)["version"].tolist()
    assert image.stat().st_size == 64 and before != after
    # in place (same inode, e.g. a tool that rewrites and resets the mtime): ctime still moves
    st = image.stat()
    with open(image, "r+b") as handle:
        handle.write(b"C" * 64)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert list_images(storage, str(tmp_path), ["washer"], None)["version"].tolist() != after


def test_catalog_manifest_and_listing_share_one_version(tmp_path):
    from mvtec_ray.data.manifest import build_manifest_catalog
    storage = Storage()
    root = tmp_path / "data"
    generate_sample_dataset(root, categories=["washer"], seed=1,
                            spec=SampleSpec(n_train=4, n_test_good=1, n_test_defect_per_type=1, size=64))
    catalog = build_catalog(str(root), storage).entries.set_index("uri")["version"]
    listing = list_images(storage, str(root), ["washer"], None).set_index("uri")["version"]
    assert len(catalog) and (listing[catalog.index] == catalog).all()
    first = catalog.index[0]
    assert catalog[first] == storage.version_of(first, pafs.LocalFileSystem().get_file_info(first))
    assert catalog[first].count("-") == 3  # size, mtime, inode, ctime
    manifest = tmp_path / "manifest.csv"
    entries = build_catalog(str(root), storage).entries
    entries.rename(columns={"uri": "path"})[["path", "image_id", "category", "split", "label"]].to_csv(manifest, index=False)
    from_manifest = build_manifest_catalog(str(manifest), storage).entries.set_index("uri")["version"]
    assert (from_manifest[catalog.index] == catalog).all()
    # S3: size + LastModified (pyarrow's listing carries no ETag)
    info = pafs.FileInfo("bucket/a.png", pafs.FileType.File, size=10, mtime_ns=2_000_000_000)
    assert storage.version_of("s3://bucket/a.png", info) == "10-2000000000"


# -- the listing walks like the catalog ------------------------------------------------------------------
def test_listing_survives_a_symlink_loop_and_reports_fifos_and_broken_links(tmp_path):
    root = tmp_path / "in"
    (root / "washer").mkdir(parents=True)
    (root / "washer" / "a.png").write_bytes(b"x")
    (root / "washer" / "b.png").write_bytes(b"y")
    (root / "washer" / "loop").symlink_to(root / "washer", target_is_directory=True)
    os.mkfifo(root / "washer" / "pipe.png")
    (root / "washer" / "gone.png").symlink_to(root / "nowhere.png")
    table = list_images(Storage(), str(root), ["washer"], None)
    problem = {Path(u).relative_to(root).as_posix(): p for u, p in zip(table["uri"], table["problem"])}
    assert problem == {
        "washer/a.png": "", "washer/b.png": "",
        "washer/loop": "folder listed already through another path (symlink loop or duplicate)",
        "washer/pipe.png": "not a regular file (fifo, socket or device)",
        "washer/gone.png": "broken symbolic link"}


# -- the index -------------------------------------------------------------------------------------------
def _score_rows(uris, version, detector, model_version, scored_at=1.0) -> dict:
    n = len(uris)
    return {"input_uri": np.asarray(uris, dtype=object), "input_version": np.full(n, version, dtype=object),
            "category": np.full(n, "washer", dtype=object), "detector": np.full(n, detector, dtype=object),
            "score": np.ones(n), "threshold": np.ones(n), "is_anomaly": np.ones(n, bool),
            "model_version": np.full(n, model_version, dtype=object), "backbone": np.full(n, "b", dtype=object),
            "weights": np.full(n, "w", dtype=object), "scored_at": np.full(n, scored_at),
            "status": np.full(n, "ok", dtype=object), "error": np.full(n, "", dtype=object),
            "first": np.ones(n, bool), "map": np.zeros((n, 4, 4), np.float16), "has_map": np.zeros(n, bool)}


def _error_rows(uris, version, error, scored_at=1.0) -> dict:
    rows = _score_rows(uris, version, "", "", scored_at)
    rows.update(status=np.full(len(uris), "error", dtype=object), error=np.full(len(uris), error, dtype=object))
    return rows


def _chunk(uris, version="v1", problem="") -> pd.DataFrame:
    return pd.DataFrame({"uri": uris, "version": version, "category": "washer", "problem": problem})


def test_index_keys_on_detector_and_model_version(tmp_path):
    storage, out = Storage(), str(tmp_path)
    write_score_shards(_score_rows(["/i/a.png", "/i/b.png"], "v1", "knn", "m1"), out, storage)
    index = read_index(storage, out)
    assert index.scored.dtype == np.uint64 and len(index.scored) == 2
    # a second detector into the same OUT: every image still needs it; knn alone: nothing to do
    todo, already = index.plan_chunk(_chunk(["/i/a.png", "/i/b.png"]), {"washer": [("knn", "m1"), ("patchcore", "p1")]})
    assert todo["detectors"].tolist() == ["patchcore", "patchcore"] and already == 0
    todo, already = index.plan_chunk(_chunk(["/i/a.png", "/i/b.png"]), {"washer": [("knn", "m1")]})
    assert len(todo) == 0 and already == 2
    # a refitted model (new version) or a changed file (new version): scored again
    assert index.plan_chunk(_chunk(["/i/a.png"]), {"washer": [("knn", "m2")]})[0]["detectors"].tolist() == ["knn"]
    assert index.plan_chunk(_chunk(["/i/a.png"], "v2"), {"washer": [("knn", "m1")]})[0]["detectors"].tolist() == \
        ["knn"]


def test_error_rows_are_retried_and_recorded_once(tmp_path):
    storage, out = Storage(), str(tmp_path)
    no_model = "no model for category 'gadget' (models exist for washer)"
    counts = write_score_shards(_error_rows(["/i/gadget/g.png"], "v1", no_model, scored_at=1.0), out, storage)
    assert counts["errors"].tolist() == [1] and counts["known_errors"].tolist() == [0]
    index = read_index(storage, out)
    assert len(index.scored) == 0 and len(index.errors) == 1
    # an error row never makes an image done: the row goes out again (retried) ...
    todo, already = index.plan_chunk(_chunk(["/i/gadget/g.png"], problem=no_model), {"washer": [("knn", "m1")]})
    assert len(todo) == 1 and already == 0
    # ... and the same error of the same file is counted but not written a second time
    counts = write_score_shards(_error_rows(["/i/gadget/g.png"], "v1", no_model, 2.0), out, storage, index.errors)
    assert counts["errors"].tolist() == [1] and counts["known_errors"].tolist() == [1]
    assert len(pq.read_table(tmp_path / "errors").to_pandas()) == 1
    # fixed (a model for it now): an ok row supersedes the error row for the same (uri, version)
    write_score_shards(_score_rows(["/i/gadget/g.png"], "v1", "knn", "m1", scored_at=3.0), out, storage)
    index = read_index(storage, out)
    assert len(index.errors) == 0 and len(index.scored) == 1
    # the latest error of a file is the one that counts: an older, different error is written again
    write_score_shards(_error_rows(["/i/x.png"], "v1", "first", 1.0), out, storage)
    write_score_shards(_error_rows(["/i/x.png"], "v1", "second", 2.0), out, storage)
    index = read_index(storage, out)
    assert np.isin(error_keys(["/i/x.png"] * 2, ["v1"] * 2, ["first", "second"]), index.errors).tolist() == \
        [False, True]


# -- the scorer: per-image detector lists, unreadable files as error rows --------------------------------------
@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    from mvtec_ray.deploy.loaded_models import plan_models
    storage = Storage()
    plan = plan_models(load_config(None, {}), storage, str(MODELS_BEFORE_MOVE))
    data = tmp_path_factory.mktemp("scorer") / "data"
    generate_sample_dataset(data, categories=["washer"], seed=5,
                            spec=SampleSpec(n_train=4, n_test_good=2, n_test_defect_per_type=1, size=64))
    return plan, sorted((data / "washer" / "test" / "good").glob("*.png"))


def _listing(paths, detectors) -> dict:
    n = len(paths)
    return {"uri": np.asarray([str(p) for p in paths], dtype=object), "version": np.full(n, "v", dtype=object),
            "category": np.full(n, "washer", dtype=object), "problem": np.full(n, "", dtype=object),
            "detectors": np.asarray(detectors, dtype=object)}


def test_scorer_scores_each_image_only_with_its_missing_detectors(planned):
    from mvtec_ray.deploy.scorer import Scorer, prepare_or_reject
    plan, images = planned
    names = sorted(d for _, d in plan.pairs)
    assert {"knn", "patchcore"} <= set(names)
    storage = Storage()
    prepared = prepare_or_reject(_listing(images[:2], ["patchcore", "knn,patchcore"]), plan.extract, storage)
    rows = Scorer(plan.selection, storage, plan.weights.state_dict, map_size=16)(prepared)
    got = sorted(zip((Path(u).name for u in rows["input_uri"]), rows["detector"]))
    assert got == sorted([(images[0].name, "patchcore"), (images[1].name, "knn"), (images[1].name, "patchcore")])


def test_an_unreadable_file_is_one_error_row_not_a_failed_batch(planned, tmp_path):
    """A guard: the scorer already made this one error row before the re-run work (checked)."""
    from mvtec_ray.deploy.scorer import Scorer, prepare_or_reject
    plan, images = planned
    storage = Storage()
    unreadable = tmp_path / "unreadable.png"
    unreadable.mkdir()  # a path that cannot be read as a file (root ignores permission bits)
    prepared = prepare_or_reject(_listing([images[0], unreadable], ["knn", "knn"]), plan.extract, storage)
    rows = Scorer(plan.selection, storage, plan.weights.state_dict, map_size=16)(prepared)
    status = dict(zip((Path(u).name for u in rows["input_uri"]), rows["status"]))
    assert status == {images[0].name: "ok", "unreadable.png": "error"}
    counts = write_score_shards(rows, str(tmp_path / "out"), storage)
    assert counts["images"].tolist() == [1] and counts["errors"].tolist() == [1]
