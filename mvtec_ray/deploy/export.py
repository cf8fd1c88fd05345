"""Export one fitted model for the edge: backbone + detector head + threshold in one TorchScript or
ONNX file that needs only torch (or an ONNX runtime), not this project.

The exported module takes ``images``: a uint8 tensor ``(N, S, S, 3)``, RGB, already resized to the
models' image size ``S`` (as :func:`~mvtec_ray.data.images.decode_image` does), and returns
``(scores float64 (N,), is_anomaly bool (N,))`` with the project's convention (higher = more
anomalous, anomalous iff ``score >= threshold``). Its metadata (category, detector, threshold,
backbone, weights, image size) travels in the file (TorchScript: extra file ``mvtec_ray.json``).

Detectors whose scoring is plain tensor algebra export: knn and patchcore (the memory bank is
stored in the file; exact search, as the saved flat index does), mahalanobis, padim and the
autoencoder. The scikit-learn ones (ocsvm, iforest, lof, elliptic) are refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mvtec_ray.config import RunConfig
from mvtec_ray.deploy.loaded_models import ModelSet, plan_models
from mvtec_ray.detectors.preprocess import Preprocessor
from mvtec_ray.errors import UserError
from mvtec_ray.storage import Storage

EXPORTABLE = ("knn", "patchcore", "mahalanobis", "padim", "autoencoder")
META_FILE = "mvtec_ray.json"


class _Affine(nn.Module):
    """A fitted :class:`Preprocessor`: ``((x - mean) / scale) @ components.T`` in float64, out float32."""

    def __init__(self, pre: Preprocessor | None):
        super().__init__()
        self.active = pre is not None and pre.mode != "none"
        d = pre.n_features_in if pre is not None else 0
        mean = pre.mean if self.active else np.zeros(d)
        scale = pre.scale if self.active else np.ones(d)
        comps = pre.components if self.active and pre.is_pca else np.eye(d)
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, np.float64)))
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale, np.float64)))
        self.register_buffer("components_t", torch.as_tensor(np.asarray(comps, np.float64).T.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        return (((x.double() - self.mean) / self.scale) @ self.components_t).float()


def _nearest(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Mean L2 distance to the k nearest rows of ``bank`` (float64, like faiss's flat index but exact)."""
    q = queries.double()
    d2 = (q * q).sum(1, keepdim=True) + (bank * bank).sum(1)[None, :] - 2.0 * (q @ bank.t())
    smallest = torch.topk(d2, k, dim=1, largest=False).values
    return smallest.clamp_min(0).sqrt().mean(1)


class KNNHead(nn.Module):
    def __init__(self, detector):
        super().__init__()
        self.pre = _Affine(detector.preprocessor)
        index = detector.index_
        self.register_buffer("bank", torch.as_tensor(index.reconstruct_n(0, index.ntotal).astype(np.float64)))
        self.k = min(int(detector.params["k"]), int(index.ntotal))

    def forward(self, pooled: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        return _nearest(self.pre(pooled), self.bank, self.k)


class MahalanobisHead(nn.Module):
    def __init__(self, detector):
        super().__init__()
        self.pre = _Affine(detector.preprocessor)
        self.register_buffer("mean", torch.as_tensor(np.asarray(detector.mean_, np.float64)))
        self.register_buffer("precision", torch.as_tensor(np.asarray(detector.precision_, np.float64)))

    def forward(self, pooled: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        diff = self.pre(pooled).double() - self.mean
        return ((diff @ self.precision) * diff).sum(1).clamp_min(0).sqrt()


class AutoencoderHead(nn.Module):
    def __init__(self, detector):
        super().__init__()
        self.pre = _Affine(detector.preprocessor)
        self.scaler = _Affine(detector._scaler)
        self.net = detector.model_.eval()

    def forward(self, pooled: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        x = self.scaler(self.pre(pooled)).float()
        return ((self.net(x) - x) ** 2).mean(1).double()


class PatchCoreHead(nn.Module):
    def __init__(self, detector):
        super().__init__()
        p = detector.params
        if p["reweight"]:
            raise UserError("patchcore with reweight=True cannot be exported (its reweighting searches the bank "
                            "again); refit with reweight=False")
        index = detector._index
        self.register_buffer("bank", torch.as_tensor(index.reconstruct_n(0, index.ntotal).astype(np.float64)))
        self.k = min(int(p["k"]), int(index.ntotal))
        self.channels = int(detector.grid_[2])

    def forward(self, pooled: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        n = patches.shape[0]
        flat = patches.float().reshape(-1, self.channels)
        return _nearest(flat, self.bank, self.k).float().reshape(n, -1).max(1).values.double()


class PaDiMHead(nn.Module):
    def __init__(self, detector):
        super().__init__()
        self.register_buffer("channels", torch.as_tensor(np.asarray(detector.channels_, np.int64)))
        self.register_buffer("mean", torch.as_tensor(np.asarray(detector.mean_, np.float32)))
        self.register_buffer("inv_cov", torch.as_tensor(np.asarray(detector.inv_cov_, np.float32)))

    def forward(self, pooled: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        n = patches.shape[0]
        x = patches.index_select(3, self.channels).float().reshape(n, -1, self.mean.shape[1]).transpose(0, 1)
        delta = x - self.mean[:, None, :]
        md2 = (torch.bmm(delta, self.inv_cov) * delta).sum(-1)
        return md2.clamp_min(0).sqrt().t().reshape(n, -1).max(1).values.double()


HEADS = {"knn": KNNHead, "mahalanobis": MahalanobisHead, "autoencoder": AutoencoderHead,
         "patchcore": PatchCoreHead, "padim": PaDiMHead}


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
    if detector not in HEADS:
        raise UserError(f"detector {detector!r} cannot be exported (scikit-learn model); exportable: "
                        f"{', '.join(EXPORTABLE)}")
    head = HEADS[detector](stored.detector)
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
    if detector not in EXPORTABLE:
        raise UserError(f"detector {detector!r} cannot be exported (only tensor-algebra detectors can: "
                        f"{', '.join(EXPORTABLE)})")
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
