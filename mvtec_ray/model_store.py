"""Fitted models on disk or S3: one folder per (category, detector), nothing pickled.

    MODELS/<category>/<detector>/model.json    threshold, feature schema, backbone identity, versions
    MODELS/<category>/<detector>/...           the detector's own files (JSON, npz, faiss, skops, state_dict)
    MODELS/manifest.json                       every model with its version (written by fit)
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .detectors import Detector, load_detector
from .errors import ModelMismatch, UserError
from .storage import Storage, is_s3, join, safe_join

MODEL_FILE = "model.json"
MANIFEST = "manifest.json"
#: what must match between a model and the features it scores
SCHEMA_KEYS = ("backbone", "weights_sha256", "image_size", "patch_dim", "pooled_dim", "patch_shape")


@dataclass
class StoredModel:
    category: str
    detector: Detector
    info: dict

    @property
    def threshold(self) -> float:
        return float(self.info["threshold"])

    @property
    def version(self) -> str:
        return self.info["version"]


def save_model(storage: Storage, models_uri: str, category: str, detector: Detector, threshold: float,
               threshold_rule: str, feature_metadata: dict) -> str:
    target = safe_join(models_uri, f"{category}/{detector.name}")
    info = {"category": category, "detector": detector.name, "threshold": float(threshold),
            "threshold_rule": threshold_rule, "input_kind": detector.input_kind,
            "schema": {k: feature_metadata.get(k) for k in SCHEMA_KEYS},
            "weights": feature_metadata.get("weights"), "pretrained": feature_metadata.get("pretrained"),
            "normalisation": feature_metadata.get("normalisation"),
            "fingerprint": feature_metadata.get("fingerprint"),
            "versions": feature_metadata.get("versions"), "saved_at": time.time()}
    with tempfile.TemporaryDirectory() as tmp:
        detector.save(tmp)
        info["files"] = sorted(p.name for p in Path(tmp).iterdir())
        info["version"] = f"{feature_metadata.get('fingerprint')}-{int(info['saved_at'])}"
        Path(tmp, MODEL_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        for path in Path(tmp).iterdir():
            storage.write_bytes(join(target, path.name), path.read_bytes())
    return target


def load_model(storage: Storage, models_uri: str, category: str, detector_name: str) -> StoredModel:
    source = safe_join(models_uri, f"{category}/{detector_name}")
    if not storage.exists(join(source, MODEL_FILE)):
        raise UserError(f"no fitted {detector_name!r} model for category {category!r} under {models_uri}")
    info = json.loads(storage.read_bytes(join(source, MODEL_FILE)))
    with tempfile.TemporaryDirectory() as tmp:
        for name in info["files"]:
            if "/" in name or name.startswith("."):
                raise UserError(f"refusing model file name {name!r} in {source}")
            Path(tmp, name).write_bytes(storage.read_bytes(join(source, name)))
        detector = load_detector(tmp)
    return StoredModel(category, detector, info)


def list_models(storage: Storage, models_uri: str) -> list[tuple[str, str]]:
    """(category, detector) pairs that have a saved model."""
    pairs = []
    for info in storage.iter_files(models_uri):
        path = info.path.replace("\\", "/")
        if path.endswith("/" + MODEL_FILE):
            parts = path.split("/")
            pairs.append((parts[-3], parts[-2]))
    return sorted(pairs)


def check_compatible(model: StoredModel, feature_metadata: dict) -> None:
    """Refuse to score features that differ from those the model was fitted on."""
    expected = model.info["schema"]
    for key in SCHEMA_KEYS:
        have = feature_metadata.get(key)
        if key in expected and expected[key] != have:
            raise ModelMismatch(f"model {model.category}/{model.detector.name} was fitted on {key}={expected[key]!r}, "
                                f"but the features have {key}={have!r}; refit or extract with the model's settings")


def write_manifest(storage: Storage, models_uri: str, entries: list[dict]) -> None:
    storage.write_bytes(join(models_uri, MANIFEST), json.dumps(
        {"models": entries, "written_at": time.time(), "local": not is_s3(models_uri)}, indent=2).encode())
