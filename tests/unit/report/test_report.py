"""Tests for the report (mvtec_ray.report.html, tables, figures) on small fake run folders (same schema as the pipeline writes)."""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mvtec_ray.report.html import write_report
from mvtec_ray.report.tables import ORACLE_LABEL, format_results_table, results_markdown

CATEGORIES = ["bottle", "screw"]
DETECTORS = ["gaussian", "knn", "patchcore"]
MAP_DETECTORS = {"patchcore"}
ERROR_PAIRS = {("screw", "gaussian")}
RANDOM = "RANDOM (not pretrained)"


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def make_fake_run(out: Path, *, weights: str = "imagenet", categories=CATEGORIES, detectors=DETECTORS,
                  map_detectors=MAP_DETECTORS, error_pairs=ERROR_PAIRS, n_good: int = 6, n_defect: int = 6,
                  img_size: int = 48, s3_image: bool = True, seed: int = 0) -> Path:
    """Writes results.parquet, scores.parquet, config.yaml, .npy maps and real PNG images/masks."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    data = out.parent / f"{out.name}_data"
    results, scores = [], []
    for ci, cat in enumerate(categories):
        images = []  # (image_id, path, label, defect_type, mask_file)
        for i in range(n_good + n_defect):
            label = int(i >= n_good)
            dtype = "good" if not label else ("scratch" if i % 2 else "crack")
            folder = data / cat / "test" / dtype
            folder.mkdir(parents=True, exist_ok=True)
            arr = np.full((img_size, img_size, 3), (60 + 20 * ci, 90, 140), np.uint8)
            arr += rng.integers(0, 30, arr.shape, dtype=np.uint8)
            mask_file = ""
            if label:
                y0 = int(rng.integers(4, img_size // 2))
                arr[y0:y0 + 10, 8:20] = (230, 40, 40)
                mask = np.zeros((img_size, img_size), np.uint8)
                mask[y0:y0 + 10, 8:20] = 255
                mfolder = data / cat / "ground_truth" / dtype
                mfolder.mkdir(parents=True, exist_ok=True)
                mask_file = str(mfolder / f"{i:03d}_mask.png")
                Image.fromarray(mask).save(mask_file)
            path = folder / f"{i:03d}.png"
            Image.fromarray(arr).save(path)
            # one S3-style "bucket/key" path: not readable locally, must give a placeholder
            p = f"mvtec-bucket/{cat}/test/{dtype}/{i:03d}.png" if (s3_image and i == n_good + n_defect - 1) else str(path)
            images.append((f"{cat}_{i:03d}", p, label, dtype, mask_file))
        labels = np.array([im[2] for im in images])
        for di, det in enumerate(detectors):
            base = {"category": cat, "detector": det, "backbone": "resnet18", "weights": weights,
                    "threshold_rule": "p99 of val_good scores", "n_train": 20, "n_val_good": 5,
                    "n_val_synthetic": 5, "n_test_good": n_good, "n_test_defect": n_defect}
            if (cat, det) in error_pairs:
                results.append({**base, "status": "error", "error": "CUDA out of memory while fitting "
                                "the covariance matrix of a very long error message", "fit_seconds": math.nan})
                continue
            s = rng.normal(0, 1, len(images)) + labels * (1.0 + di)
            thr = float(np.quantile(s[labels == 0], 0.9))
            pred = s >= thr
            tp = int((pred & (labels == 1)).sum())
            prec = tp / max(int(pred.sum()), 1)
            rec = tp / n_defect
            has_maps = det in map_detectors
            results.append({**base, "status": "ok", "error": "", "image_auroc": _auroc(labels, s),
                            "image_ap": 0.8 + 0.01 * di, "image_f1": 2 * prec * rec / max(prec + rec, 1e-9),
                            "image_precision": prec, "image_recall": rec, "threshold": thr,
                            "image_f1_max": 0.95, "pixel_auroc": 0.9 if has_maps else math.nan,
                            "pixel_pro": 0.8 if has_maps else math.nan, "fit_seconds": 1.5 + di})
            for (image_id, p, label, dtype, mask_file), score in zip(images, s):
                map_file = None
                if has_maps:
                    rel = Path("maps") / cat / det / f"{image_id}.npy"
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    amap = rng.random((16, 16)).astype(np.float16) + np.float16(score)
                    np.save(out / rel, amap)
                    map_file = rel.as_posix()
                scores.append({"category": cat, "detector": det, "split": "test", "image_id": image_id,
                               "input_uri": p, "label": label, "defect_type": dtype, "score": float(score),
                               "threshold": thr, "map_file": map_file if map_file else ("" if di % 2 else None),
                               "mask_file": mask_file})
            for j in range(3):  # validation rows must not leak into the test figures
                scores.append({"category": cat, "detector": det, "split": "val_good", "image_id": f"v{j}",
                               "input_uri": "", "label": 0, "defect_type": "good", "score": 100.0,
                               "threshold": thr, "map_file": "", "mask_file": ""})
    res = pd.DataFrame(results)
    metric_cols = ["image_auroc", "image_ap", "image_f1", "image_precision", "image_recall", "threshold",
                   "image_f1_max", "pixel_auroc", "pixel_pro", "fit_seconds"]
    for det in detectors:
        ok = res[(res["detector"] == det) & (res["status"] == "ok")]
        mean = {"category": "mean", "detector": det, "backbone": "resnet18", "weights": weights,
                "status": "ok", "error": "", "threshold_rule": "p99 of val_good scores"}
        mean.update({c: ok[c].mean() for c in metric_cols})
        results.append(mean)
    res = pd.DataFrame(results)
    res.to_parquet(out / "results.parquet")
    pd.DataFrame(scores).to_parquet(out / "scores.parquet")
    (out / "config.yaml").write_text(f"backbone: resnet18\nweights: {weights}\ndetectors: [{', '.join(detectors)}]\n"
                                     "<b>not html</b>\n")
    return out


@pytest.fixture(scope="module")
def random_run(tmp_path_factory) -> tuple[Path, Path]:
    out = make_fake_run(tmp_path_factory.mktemp("random") / "run", weights=RANDOM)
    return out, write_report(out)


def test_write_report_contents(random_run):
    out, html_path = random_run
    assert html_path == out / "report.html" and html_path.is_file()
    page = html_path.read_text(encoding="utf-8")
    for name in CATEGORIES + DETECTORS:
        assert name in page
    res = pd.read_parquet(out / "results.parquet")
    auroc = res[(res.category == "bottle") & (res.detector == "knn")]["image_auroc"].iloc[0]
    assert f"{auroc:.3f}" in page
    assert ORACLE_LABEL in page
    assert 'id="random-weights"' in page and "RANDOM" in page
    assert "ERROR" in page and "CUDA out of memory" in page
    assert "<details>" in page and "&lt;b&gt;not html&lt;/b&gt;" in page  # config shown as text
    assert "p99 of val_good scores" in page
    # self-contained: no external resources
    assert not re.search(r"""(src|href)=["'](https?:|//)""", page)
    assert "<script" not in page and "<link" not in page

    figures = sorted((out / "figures").glob("*.png"))
    # ROC + per category: histograms + examples
    assert len(figures) == 1 + 2 * len(CATEGORIES)
    for f in figures:
        with Image.open(f) as im:
            im.verify()
        with Image.open(f) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    assert page.count("data:image/png;base64,") >= len(figures)


def test_no_banner_for_pretrained(tmp_path):
    out = make_fake_run(tmp_path / "run", weights="imagenet", categories=["bottle"], n_good=4, n_defect=4)
    page = write_report(out, max_examples=8).read_text(encoding="utf-8")  # every test image
    assert 'id="random-weights"' not in page and "RANDOM" not in page
    assert "(not readable here)" in page and "mvtec-bucket/" in page  # S3 image: placeholder, no crash
    assert "imagenet" in page and ORACLE_LABEL in page


def test_missing_scores_and_config(tmp_path):
    out = make_fake_run(tmp_path / "run", categories=["bottle"], n_good=3, n_defect=3)
    (out / "scores.parquet").unlink()
    (out / "config.yaml").unlink()
    page = write_report(out).read_text(encoding="utf-8")
    assert "bottle" in page and "config.yaml not found" in page
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nowhere")


def test_format_results_table(random_run):
    out, _ = random_run
    res = pd.read_parquet(out / "results.parquet").sample(frac=1.0, random_state=3)  # order must not matter
    text = format_results_table(res)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    body = [ln for ln in lines[2:] if ln.split()[0] in set(CATEGORIES) | {"mean"}]
    # detector order, mean row last per detector
    dets = [ln.split()[1] for ln in body]
    assert dets == sorted(dets)
    for det in DETECTORS:
        rows = [ln.split()[0] for ln in body if ln.split()[1] == det]
        assert rows[-1] == "mean" and "mean" not in rows[:-1]
    numbers = re.findall(r"-?\d+\.\d+", "\n".join(body))
    assert numbers and all(len(n.split(".")[1]) == 3 for n in numbers)
    err = [ln for ln in body if ln.split()[:2] == ["screw", "gaussian"]][0]
    assert "ERROR: CUDA out of memory while fitting the co" in err
    assert "covariance" not in err  # first 40 chars only
    knn_bottle = [ln for ln in body if ln.split()[:2] == ["bottle", "knn"]][0]
    assert knn_bottle.split()[-3:-1] == ["-", "-"]  # NaN pixel metrics
    # aligned: every non-error row has the same length as the header
    width = len(lines[0])
    assert all(len(ln) == width for ln in body if "ERROR" not in ln)
    assert "oracle" in text.lower()


def test_results_markdown(random_run):
    out, _ = random_run
    md = results_markdown(pd.read_parquet(out / "results.parquet"))
    rows = md.strip().splitlines()
    assert rows[0].startswith("| category | detector |") and ORACLE_LABEL in rows[0]
    assert set(rows[1]) <= set("|:-")
    n_cols = rows[0].count("|")
    assert all(r.count("|") - r.count("\\|") == n_cols for r in rows)
    assert any("ERROR: CUDA" in r for r in rows)
    assert re.search(r"\| 0\.\d{3} \|", md)


# --------------------------------------------------------------------------
# real headless browser
# --------------------------------------------------------------------------
def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    msg = "chromium not found on PATH: install it with `apt-get install -y chromium` (Debian)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_report_in_headless_chromium(random_run, tmp_path):
    exe = _chromium()
    out, html_path = random_run
    url = html_path.resolve().as_uri()
    dom = _run_chromium(exe, tmp_path / "profile1", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<table" in dom.stdout and "bottle" in dom.stdout and "patchcore" in dom.stdout
    n_figs = len(list((out / "figures").glob("*.png")))
    assert dom.stdout.count('src="data:image/png;base64,') >= n_figs

    shot = tmp_path / "shot.png"
    res = _run_chromium(exe, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    keep = os.environ.get("REPORT_SCREENSHOT")  # lets a developer look at the page
    if keep:
        shutil.copy(shot, keep)
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        rgb = np.asarray(im.convert("RGB"))
    colours = np.unique(rgb.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 50, "screenshot looks blank"
    # the red RANDOM banner is at the top of the page
    top = rgb[:300].reshape(-1, 3).astype(int)
    assert ((top[:, 0] > 150) & (top[:, 1] < 60) & (top[:, 2] < 80)).sum() > 2000
