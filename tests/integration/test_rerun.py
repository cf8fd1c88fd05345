"""Kill the `mvtec-ray extract` driver once shards exist; the next run completes with every
planned row exactly once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvtec_ray.config import load_config
from mvtec_ray.data.catalog import build_catalog
from mvtec_ray.errors import UserError
from mvtec_ray.features.store import SUCCESS, FeatureSet
from mvtec_ray.storage import Storage
from tests.helpers.shards import raw_shard_rows

OVERRIDES = {"extract.backbone": "efficientnet_lite0", "extract.image_size": 64, "extract.batch_size": 2,
             "extract.augment_copies": 2}


def _raw_rows(features_dir: Path) -> pd.DataFrame:
    """Every row of every shard, without the de-duplication FeatureSet's readers do."""
    return raw_shard_rows(features_dir)


def _descendants(pid: int) -> set[int]:
    """Pids below ``pid`` (from /proc; Linux)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        for child, parent in parents.items():
            if parent == current and child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_tree(proc: subprocess.Popen, children: set[int]) -> None:
    """SIGKILL the driver, then whatever it started that is still alive (by pid, ours only)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 15  # Ray's processes fate-share with the driver: give them a moment
    while time.time() < deadline and any(_alive(p) for p in children):
        time.sleep(0.2)
    for pid in children:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_killed_extraction_resumes_without_duplicates(ray_session, lite0_weights, tmp_path):
    from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset
    from mvtec_ray.distributed.extraction import run_extraction
    from mvtec_ray.features.plan import expected_row_ids, plan_work
    data, features = tmp_path / "data", tmp_path / "features"
    generate_sample_dataset(data, categories=["washer"], seed=4,
                            spec=SampleSpec(n_train=12, n_test_good=3, n_test_defect_per_type=1, size=64))
    config = load_config(None, {"data": str(data), "out": str(features), **OVERRIDES})
    catalog = build_catalog(str(data))
    planned = set(expected_row_ids(plan_work(catalog.entries, config.extract)))

    argv = [str(Path(sys.executable).with_name("mvtec-ray")), "extract", "--data", str(data), "--out", str(features),
            "--backbone", "efficientnet_lite0", "--image-size", "64", "--batch-size", "2", "--augment-copies", "2",
            "--num-cpus", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"}, start_new_session=True)
    children: set[int] = set()
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            children |= _descendants(proc.pid)
            if list(features.rglob("part-*.parquet")):
                break
            time.sleep(0.05)
    finally:
        finished = proc.poll() is not None
        _kill_tree(proc, children | _descendants(proc.pid))
    stderr = proc.stderr.read().decode(errors="replace")
    assert not finished, f"the extraction ended before it could be killed:\n{stderr[-3000:]}"
    [run_dir] = [p for p in features.iterdir() if p.is_dir()]
    assert run_dir.name == config.extract.fingerprint()
    assert not (run_dir / SUCCESS).exists(), "killed too late: the run had completed"
    with pytest.raises(UserError, match="incomplete"):
        FeatureSet.open(str(run_dir))
    partial = _raw_rows(run_dir)
    assert 0 < len(partial) < len(planned) and partial["row_id"].is_unique

    result = run_extraction(catalog, str(features), config.extract, Storage(), lite0_weights)
    assert result.skipped_existing == len(partial)
    rows = _raw_rows(run_dir)
    assert rows["row_id"].is_unique, rows[rows["row_id"].duplicated()]
    assert set(rows["row_id"]) == planned
    assert (rows["status"] == "ok").all()
    assert FeatureSet.open(str(run_dir)).success()["rows"] == len(planned)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 30), st.integers(0, 2), st.integers(0, 2**16), st.data())
def test_a_resumed_plan_finishes_exactly_the_fresh_plan(n_train, augment, seed, data):
    """Whatever subset of rows a killed run left behind, the resumed plan produces the rest of
    the uninterrupted run's rows: none twice, none missing, every image in the same split."""
    from mvtec_ray.config import ExtractConfig
    from mvtec_ray.features.plan import PLAN_COLUMNS, expected_row_ids, plan_work
    entries = pd.DataFrame(
        [{"image_id": f"c/train/good/{i:03d}.png", "split": "train", "label": 0, "defect_type": "good"}
         for i in range(n_train)] +
        [{"image_id": f"c/test/crack/{i:03d}.png", "split": "test", "label": 1, "defect_type": "crack"}
         for i in range(2)]).assign(category="c", uri="u", version="v", mask_uri="")
    config = ExtractConfig(seed=seed, augment_copies=augment)
    fresh = plan_work(entries, config)
    assert list(fresh.columns) == PLAN_COLUMNS
    planned = expected_row_ids(fresh)
    done = set(data.draw(st.lists(st.sampled_from(planned), unique=True)))
    split_of = dict(zip(fresh["image_id"], fresh["split"]))
    known = {row.split("#")[0]: split_of[row.split("#")[0]] for row in done}
    resumed = plan_work(entries, config, done, known)
    rest = expected_row_ids(resumed)
    assert len(rest) == len(set(rest)) and done.isdisjoint(rest) and done | set(rest) == set(planned)
    assert all(split_of[i] == s for i, s in zip(resumed["image_id"], resumed["split"]))

