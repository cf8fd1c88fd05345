"""A driver that plans and schedules fits never imports torch, torchvision, scikit-learn or faiss
(~4 s and ~0.5 GB on a small machine); the detectors' kinds are known without their code."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mvtec_ray.detectors.registry import (
    BUILTIN_INPUT_KINDS,
    REGISTRY,
    _load_builtin,
    available_detectors,
    input_kind,
)

ROOT = Path(__file__).resolve().parents[3]
HEAVY = ("torch", "torchvision", "sklearn", "faiss")


def test_builtin_kinds_match_the_detector_classes():
    _load_builtin()
    assert set(BUILTIN_INPUT_KINDS) == set(REGISTRY) == set(available_detectors())
    for name, cls in REGISTRY.items():
        assert input_kind(name) == cls.input_kind, name


def test_the_fit_driver_path_imports_no_heavy_library(tmp_path):
    code = f"""
import sys
from mvtec_ray.config import load_config
from mvtec_ray.distributed.cluster import connect
from mvtec_ray.distributed.pipeline import run_fit, run_pipeline
from mvtec_ray.distributed.fit import fit_task
from mvtec_ray.fit.cell import FitOutcome
from mvtec_ray.evaluation.summary import summarise
from mvtec_ray.cli import build_parser
config = load_config(None, {{"detectors.names": sorted({sorted(BUILTIN_INPUT_KINDS)!r})}})
print(",".join(m for m in {HEAVY!r} if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported by the driver: {out.stdout.strip()}"


def test_metadata_versions_are_plain_strings(lite0_weights):
    """torch's version is a str subclass whose unpickling imports torch: metadata carrying it made
    Ray Data's stats actor (which receives the operators' arguments) import torch, ~0.5 GB."""
    import pickle

    from mvtec_ray.config import ExtractConfig
    from mvtec_ray.deploy.model_files import runtime_versions
    from mvtec_ray.features.store import extraction_metadata
    metadata = extraction_metadata(ExtractConfig(backbone="efficientnet_lite0"), lite0_weights, {})
    for versions in (metadata["versions"], runtime_versions()):
        assert all(type(v) is str for v in versions.values()), versions
        assert b"torch.torch_version" not in pickle.dumps(versions)
