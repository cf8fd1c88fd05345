"""kNN memory bank on pooled vectors (faiss flat L2 index), as in SPADE / PatchCore."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mvtec_ray.detectors.base import as_float32
from mvtec_ray.detectors.chunks import iter_chunks
from mvtec_ray.detectors.pooled_base import SCORE_CHUNK, PooledDetector
from mvtec_ray.detectors.registry import register
from mvtec_ray.detectors.torch_heads import PreprocessorModule, bank_tensor, mean_nearest_distance


@register
class KNNDetector(PooledDetector):
    """Mean Euclidean distance to the ``k`` nearest training vectors."""

    name = "knn"
    # raw features as in SPADE / PatchCore
    default_preprocess = "none"
    INDEX_FILE: ClassVar[str] = "index.faiss"
    uses_faiss = True

    @classmethod
    def _own_params(cls) -> dict[str, Any]:
        return {"k": 1}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if int(self.params["k"]) < 1:
            raise ValueError(f"{self.name}: k must be >= 1")
        self.index_: Any = None

    def _fit(self, Z: np.ndarray, Z_val: np.ndarray | None) -> None:
        import faiss
        self.index_ = faiss.IndexFlatL2(Z.shape[1])
        self.index_.add(as_float32(Z))

    def _score(self, Z: np.ndarray) -> np.ndarray:
        k = min(int(self.params["k"]), self.index_.ntotal)
        Z = as_float32(Z)
        out = np.empty(len(Z), dtype=np.float64)
        for sl in iter_chunks(len(Z), SCORE_CHUNK):
            sq, _ = self.index_.search(Z[sl], k)
            # faiss returns squared L2; round-off can make it slightly negative
            out[sl] = np.sqrt(np.maximum(sq.astype(np.float64), 0.0)).mean(axis=1)
        return out

    def _save_model(self, directory: Path) -> None:
        import faiss
        faiss.write_index(self.index_, str(directory / self.INDEX_FILE))

    def _load_model(self, directory: Path) -> None:
        import faiss
        index = faiss.read_index(str(directory / self.INDEX_FILE))
        if not isinstance(index, faiss.IndexFlatL2) or index.d != self._pre.n_features_out:
            raise TypeError(f"{directory / self.INDEX_FILE} is not a flat L2 index "
                            f"of dim {self._pre.n_features_out}")
        self.index_ = index

    def torch_head(self) -> nn.Module:
        return KNNHead(self)


class KNNHead(nn.Module):
    """:class:`KNNDetector`'s scoring in torch: exact search of the bank (as the flat index does)."""

    def __init__(self, detector: KNNDetector):
        super().__init__()
        self.pre = PreprocessorModule(detector.preprocessor)
        index = detector.index_
        self.register_buffer("bank", bank_tensor(index))
        self.k = min(int(detector.params["k"]), int(index.ntotal))

    def forward(self, pooled: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        return mean_nearest_distance(self.pre(pooled), self.bank, self.k)
