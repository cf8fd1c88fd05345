"""Export one fitted model for the edge: backbone + detector head + threshold in one TorchScript or
ONNX file that needs only torch (or an ONNX runtime), not this project.

The exported module takes ``images``: a uint8 tensor ``(N, S, S, 3)``, RGB, already resized to the
models' image size ``S`` (as :func:`~mvtec_ray.data.images.decode_image` does), and returns
``(scores float64 (N,), is_anomaly bool (N,))`` with the project's convention (higher = more
anomalous, anomalous iff ``score >= threshold``). Its metadata (category, detector, threshold,
backbone, weights, image size) travels in the file (TorchScript: extra file ``mvtec_ray.json``).

A detector exports when it has a torch head (:meth:`~mvtec_ray.detectors.base.Detector.torch_head`,
defined beside each detector): those whose scoring is plain tensor algebra, knn and patchcore (the
memory bank is stored in the file; exact search, as the saved flat index does), mahalanobis, padim and
the autoencoder. The scikit-learn ones (ocsvm, iforest, lof, elliptic) have none and are refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mvtec_ray.config import RunConfig
from mvtec_ray.deploy.loaded_models import ModelSet, plan_models
from mvtec_ray.detectors.registry import available_detectors, detector_class
from mvtec_ray.errors import UserError
from mvtec_ray.storage import Storage

META_FILE = "mvtec_ray.json"


def exportable_detectors() -> list[str]:
    """The detectors that have a torch head (imports every detector's code)."""
    return [name for name in available_detectors() if detector_class(name).has_torch_head()]


class EdgeModel(nn.Module):
    """uint8 images -> (scores, is_anomaly): the project's feature path, one detector, its threshold."""

    def __init__(self, extractor: nn.Module, head: nn.Module, threshold: float, column: str):
        super().__init__()
        self.extractor = extractor
        self.head = head
        self.column = column  # the detector's feature column: "pooled", "patches" or "padim"
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float64))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, patches, padim = self.extractor(images, with_patches=self.column == "patches",
                                                with_padim=self.column == "padim")
        maps = patches if self.column == "patches" else padim if self.column == "padim" else None
        # features are stored and scored as float16
        maps = pooled if maps is None else maps.to(torch.float16)
        scores = self.head(pooled.float(), maps)
        return scores, scores >= self.threshold


def build_edge_model(model_set: ModelSet, category: str, detector: str) -> tuple[EdgeModel, dict]:
    stored = next(m for m in model_set.models[category] if m.detector.name == detector)
    if not stored.detector.has_torch_head():
        raise UserError(f"detector {detector!r} cannot be exported (it has no torch head); "
                        f"exportable: {', '.join(exportable_detectors())}")
    head = stored.detector.torch_head()
    extractor = model_set.extractor.cpu().eval()
    model = EdgeModel(extractor, head, stored.threshold, stored.detector.feature_column).eval()
    schema = stored.info["schema"]
    meta = {"category": category, "detector": detector, "threshold": stored.threshold,
            "backbone": schema["backbone"], "weights": stored.info.get("weights"),
            "weights_sha256": schema["weights_sha256"], "image_size": schema["image_size"],
            "model_version": stored.version,
            "input": f"uint8 tensor (N, {schema['image_size']}, {schema['image_size']}, 3), RGB, resized",
            "outputs": ["scores float64 (N,), higher = more anomalous", "is_anomaly bool (N,): score >= threshold"]}
    return model, meta


def export_model(config: RunConfig, models_uri: str, category: str, detector: str, fmt: str = "torchscript",
                 output: str | None = None) -> Path:
    """Write ``category``/``detector`` under ``models_uri`` as one file; return its path."""
    exportable = exportable_detectors()
    if detector not in exportable:
        raise UserError(f"detector {detector!r} cannot be exported (only tensor-algebra detectors can: "
                        f"{', '.join(exportable)})")
    if fmt not in ("torchscript", "onnx"):
        raise UserError(f"unknown export format {fmt!r} (torchscript or onnx)")
    storage = Storage(config.s3)
    plan = plan_models(config, storage, models_uri, [detector], [category])
    model, meta = build_edge_model(ModelSet.from_plan(plan, storage), category, detector)
    path = Path(output or f"{category}-{detector}.{'pt' if fmt == 'torchscript' else 'onnx'}")
    size = int(meta["image_size"])
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    with torch.no_grad():
        if fmt == "torchscript":
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={META_FILE: json.dumps(meta, indent=2)})
        else:
            try:
                torch.onnx.export(model, (example,), str(path), input_names=["images"],
                                  output_names=["scores", "is_anomaly"], dynamo=False,
                                  dynamic_axes={"images": {0: "n"}, "scores": {0: "n"}, "is_anomaly": {0: "n"}})
            except (ImportError, ModuleNotFoundError) as exc:
                raise UserError(f"ONNX export needs the onnx package ({exc}); pip install onnx") from None
            path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path
