"""Export for the edge: one TorchScript file scores like the project, without the project installed."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mvtec_ray.config import RunConfig
from mvtec_ray.data.images import decode_image
from mvtec_ray.deploy.export import build_edge_model, export_model, exportable_detectors
from mvtec_ray.deploy.loaded_models import ModelSet, plan_models
from mvtec_ray.detectors.registry import load_detector
from mvtec_ray.errors import ModelMismatch, UserError
from mvtec_ray.storage import Storage

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def washer_images(small_dataset):
    """Decoded test images (good and defects), as the scorers see them."""
    paths = sorted((small_dataset / "washer" / "test").rglob("*.png"))[::3][:5]
    return np.stack([decode_image(p.read_bytes(), 224) for p in paths])


def _project_scores(models_dir: Path, detector: str, images: np.ndarray) -> tuple[np.ndarray, float]:
    plan = plan_models(RunConfig(), Storage(), str(models_dir), [detector], ["washer"])
    model_set = ModelSet.from_plan(plan, Storage())
    scored = model_set.score(images, ["washer"] * len(images))
    return np.asarray([row[0].score for row in scored]), scored[0][0].model.threshold


def _run_without_project(script: str, cwd: Path) -> dict:
    """Run ``script`` in a fresh interpreter where importing mvtec_ray fails."""
    code = "import sys; sys.modules['mvtec_ray'] = None\n" + textwrap.dedent(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_torchscript_scores_equal_the_projects(fitted_lite0, washer_images, tmp_path):
    _, models_dir = fitted_lite0
    np.save(tmp_path / "images.npy", washer_images)
    expected = {}
    for detector in ("knn", "patchcore", "mahalanobis", "autoencoder"):
        path = export_model(RunConfig(), str(models_dir), "washer", detector, "torchscript",
                            str(tmp_path / f"{detector}.pt"))
        expected[detector] = _project_scores(models_dir, detector, washer_images)
        assert path.stat().st_size > 1_000_000  # the backbone is inside
    got = _run_without_project("""
        import json, numpy as np, torch
        images = torch.from_numpy(np.load("images.npy"))
        out = {}
        for name in ("knn", "patchcore", "mahalanobis", "autoencoder"):
            extra = {"mvtec_ray.json": ""}
            model = torch.jit.load(name + ".pt", _extra_files=extra)
            scores, flags = model(images)
            out[name] = {"scores": scores.tolist(), "flags": flags.tolist(), "meta": json.loads(extra["mvtec_ray.json"])}
        print(json.dumps(out))
    """, tmp_path)
    for detector, (scores, threshold) in expected.items():
        result = got[detector]
        # float32 through a whole backbone in another process (other thread count, summation order):
        # the autoencoder's error sums 1,280 squared differences, seen 2e-5 apart
        assert result["scores"] == pytest.approx(scores.tolist(), rel=1e-4), detector
        assert result["flags"] == [bool(s >= threshold) for s in result["scores"]]
        meta = result["meta"]
        assert (meta["category"], meta["detector"], meta["image_size"]) == ("washer", detector, 224)
        assert meta["threshold"] == pytest.approx(threshold) and meta["backbone"] == "efficientnet_lite0"
    assert np.ptp(got["patchcore"]["scores"]) > 0  # scores that differ per image: a real comparison


def test_padim_head_scores_equal_the_detector(fitted_lite0, washer_images):
    """PaDiM's head against the detector itself (loaded directly from its files)."""
    from mvtec_ray.features.backbone_specs import BACKBONES
    from mvtec_ray.features.backbones import (
        FeatureExtractor,
        embed_images,
        resolve_weights,
    )
    _, models_dir = fitted_lite0
    detector = load_detector(models_dir / "washer" / "padim")
    weights = resolve_weights("efficientnet_lite0", "imagenet")
    extractor = FeatureExtractor(BACKBONES["efficientnet_lite0"], weights.state_dict,
                                 padim_channels=detector.grid_[2])
    _, _, maps = embed_images(extractor, washer_images, False, True)  # PaDiM's own column
    head = detector.torch_head()
    with torch.no_grad():
        got = head(torch.zeros(1), torch.from_numpy(maps)).numpy()
    assert got == pytest.approx(detector.score(maps), rel=1e-5)


def test_refusals_are_one_line_errors(fitted_lite0, tmp_path):
    _, models_dir = fitted_lite0
    assert set(exportable_detectors()) == {"knn", "patchcore", "mahalanobis", "padim", "autoencoder"}
    for detector in ("ocsvm", "iforest", "lof", "elliptic"):
        with pytest.raises(UserError, match=f"detector '{detector}' cannot be exported"):
            export_model(RunConfig(), str(models_dir), "washer", detector, "torchscript", str(tmp_path / "x.pt"))
    with pytest.raises(UserError, match="no model for categories"):
        export_model(RunConfig(), str(models_dir), "bottle", "knn", "torchscript", str(tmp_path / "x.pt"))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "mvtec_ray", "export", "--models", str(models_dir), "--category",
                          "washer", "--detector", "ocsvm", "--output", str(tmp_path / "x.pt")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "cannot be exported" in out.stderr and not (tmp_path / "x.pt").exists()


def test_export_command_writes_torchscript(fitted_lite0, tmp_path):
    _, models_dir = fitted_lite0
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    target = tmp_path / "washer-knn.pt"
    out = subprocess.run([sys.executable, "-m", "mvtec_ray", "export", "--models", str(models_dir), "--category",
                          "washer", "--detector", "knn", "--format", "torchscript", "--output", str(target)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"wrote {target}"
    scores, flags = torch.jit.load(str(target))(torch.zeros((1, 224, 224, 3), dtype=torch.uint8))
    assert scores.dtype == torch.float64 and flags.dtype == torch.bool and scores.shape == (1,)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                    reason="onnx and onnxruntime are not installed")
def test_onnx_scores_equal_the_projects(fitted_lite0, washer_images, tmp_path):
    import onnxruntime
    _, models_dir = fitted_lite0
    path = export_model(RunConfig(), str(models_dir), "washer", "knn", "onnx", str(tmp_path / "knn.onnx"))
    session = onnxruntime.InferenceSession(str(path))
    scores, _ = session.run(None, {"images": washer_images})
    expected, _ = _project_scores(models_dir, "knn", washer_images)
    assert scores.tolist() == pytest.approx(expected.tolist(), rel=1e-4)


def test_padim_export_when_the_store_loads_it(fitted_lite0, washer_images, tmp_path):
    """Full export of PaDiM; needs a model store that accepts PaDiM's reduced channel grid."""
    _, models_dir = fitted_lite0
    try:
        plan = plan_models(RunConfig(), Storage(), str(models_dir), ["padim"], ["washer"])
    except ModelMismatch as exc:
        pytest.skip(f"the model store refuses this PaDiM model: {exc}")
    model_set = ModelSet.from_plan(plan, Storage())
    model, _ = build_edge_model(model_set, "washer", "padim")
    with torch.no_grad():
        scores, _ = torch.jit.trace(model, torch.zeros((2, 224, 224, 3), dtype=torch.uint8),
                                    check_trace=False)(torch.from_numpy(washer_images))
    expected = [row[0].score for row in model_set.score(washer_images, ["washer"] * len(washer_images))]
    assert scores.tolist() == pytest.approx(expected, rel=1e-5)
