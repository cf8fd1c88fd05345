"""Patch-level detectors: the shared plumbing (patch scores -> anomaly maps) and PatchCore.

Patch detectors consume maps ``(n, H, W, C)`` (``input_kind = "patches"``; the stored column
is ``feature_column``), given either as an ndarray or as a re-iterable chunk source (see
:mod:`.chunks`), and never turn the whole input into one float32 array: everything runs
chunk by chunk within ``memory_budget_mb``. Scores: higher = more anomalous; image score =
max patch score. PaDiM lives in :mod:`.padim`.
"""
from __future__ import annotations

import json
import math
import resource
import time
import warnings
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from mvtec_ray.detectors.base import Detector, load_arrays, save_arrays
from mvtec_ray.detectors.chunks import budget_bytes, iter_budget_chunks, iter_chunks
from mvtec_ray.detectors.coreset import resolve_torch_device, select_coreset
from mvtec_ray.detectors.registry import register
from mvtec_ray.detectors.torch_heads import bank_tensor, mean_nearest_distance
from mvtec_ray.errors import UserError

STATS_FILE = "fit_stats.json"


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux; it is the process peak so far, not just this fit.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def upsample_smooth(patch_scores: np.ndarray, output_size: tuple[int, int],
                    sigma: float, input_size: int | tuple[int, int] | None = None) -> np.ndarray:
    """``(n, H, W)`` patch scores -> ``(n, h, w)`` float32 anomaly maps.

    With ``input_size`` (the model's input image size): bilinear upsampling to the input size,
    a Gaussian blur with ``sigma`` in *input* pixels (reflect border, truncated at 4 sigma:
    sigma 4 at 224 px is PatchCore's and anomalib's kernel of 33), then bilinear resizing to
    ``output_size``. The map then does not depend on the size it is evaluated at. Without
    ``input_size``, ``sigma`` is in output pixels (upsample, then blur).
    """
    h, w = (int(s) for s in output_size)
    if input_size is None:
        blur_size = (h, w)
    else:
        blur_size = (int(input_size), int(input_size)) if np.isscalar(input_size) else tuple(map(int, input_size))
    n = len(patch_scores)
    out = np.empty((n, h, w), dtype=np.float32)
    step = max(1, (64 << 20) // max(1, max(h * w, blur_size[0] * blur_size[1]) * 4))  # ~64 MiB of maps per step
    for sl in iter_chunks(n, step):
        t = torch.from_numpy(np.ascontiguousarray(patch_scores[sl], dtype=np.float32))
        up = F.interpolate(t[:, None], size=blur_size, mode="bilinear", align_corners=False)[:, 0].numpy()
        if sigma and sigma > 0:
            up = gaussian_filter(up, sigma=(0, float(sigma), float(sigma)), mode="reflect",
                                 truncate=4.0)
        if blur_size != (h, w):
            up = F.interpolate(torch.from_numpy(np.ascontiguousarray(up))[:, None], size=(h, w), mode="bilinear",
                               align_corners=False)[:, 0].numpy()
        out[sl] = up
    return out


class _PatchDetector(Detector):
    """Shared plumbing: one pass computes patch scores; maps and image scores derive from it."""

    input_kind = "patches"
    feature_column = "patches"
    produces_maps = True

    def _patch_scores(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(patch scores (n, H, W) float32, image scores (n,) float64)``."""
        raise NotImplementedError

    def patch_scores(self, X: Any) -> np.ndarray:
        return self._patch_scores(X)[0]

    def patch_and_image_scores(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(patch scores (n, H, W), image scores (n,))`` from one pass; maps follow from
        :meth:`maps_from_patch_scores` at any size."""
        return self._patch_scores(X)

    def score_with_maps(self, X: Any, output_size: tuple[int, int] | None = None,
                        input_size: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Image scores and (if ``output_size``) anomaly maps from a single search.

        ``input_size``: the model's input size; ``smoothing_sigma`` is then in input pixels and
        the maps do not depend on ``output_size`` (see :func:`upsample_smooth`)."""
        patch, image = self._patch_scores(X)
        maps = None
        if output_size is not None:
            maps = self.maps_from_patch_scores(patch, output_size, input_size)
        return image, maps

    def maps_from_patch_scores(self, patch: np.ndarray, output_size: tuple[int, int],
                               input_size: int | None = None) -> np.ndarray:
        return upsample_smooth(patch, output_size, self.params["smoothing_sigma"], input_size)

    def score(self, X: Any) -> np.ndarray:
        return self.score_with_maps(X, None)[0]

    def anomaly_maps(self, X: Any, output_size: tuple[int, int], input_size: int | None = None) -> np.ndarray:
        maps = self.score_with_maps(X, output_size, input_size)[1]
        assert maps is not None
        return maps

    def _check_fitted(self) -> None:
        if getattr(self, "grid_", None) is None:
            raise RuntimeError(f"{self.name}: call fit() or load() first")

    def _save_stats(self, directory: Path) -> None:
        (directory / STATS_FILE).write_text(json.dumps(getattr(self, "fit_stats_", {}),
                                                       indent=2, sort_keys=True))

    def _load_stats(self, directory: Path) -> None:
        path = directory / STATS_FILE
        self.fit_stats_ = json.loads(path.read_text()) if path.exists() else {}


# -- PatchCore ------------------------------------------------------------------
def _faiss_gpu_count() -> int:
    if not hasattr(faiss, "StandardGpuResources"):
        return 0  # faiss-cpu build
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # pragma: no cover - broken GPU runtime
        return 0


@register
class PatchCore(_PatchDetector):
    """PatchCore (Roth et al., 2022): greedy coreset of normal patches + nearest-neighbour distance.

    Patch score: mean L2 distance to the ``k`` nearest memory-bank patches (k=1 is the
    paper). Image score: max patch score, optionally reweighted as in the paper by how
    isolated the nearest bank patch is (``reweight``, over ``reweight_neighbors``).
    """

    name = "patchcore"

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        return {
            "coreset_ratio": 0.1,
            "projection_dim": 128,       # JL projection used only for coreset selection
            "seed": 0,
            "k": 1,
            "reweight": False,
            "reweight_neighbors": 9,     # b in the paper's reweighting
            # "auto": exact below ivf_min_bank bank rows, IVF above; "flat" (exact) or "ivf"
            "index": "auto",
            "ivf_min_bank": 100_000,
            "nlist": 0,                  # IVF lists; 0 = about sqrt(bank size)
            "nprobe": 8,
            "memory_budget_mb": 1024,
            "smoothing_sigma": 4.0,      # in input-image pixels (PatchCore / anomalib: 4 at 224 px)
            "use_gpu": "auto",
            "coreset_threads": 1,        # CPU threads for the greedy loop; 0 = torch's setting
            # greedy per shard of this many patches, then merged (linear time); 0 = one greedy
            "coreset_shard_patches": 4096,
            "coreset_oversample": 1.0,   # > 1: shards keep more, a greedy over the union picks
            "coreset_ray_tasks": False,  # run the shard greedies as Ray tasks (needs Ray)
            "coreset_task_gpus": 0.0,    # GPUs each shard task asks for (distance updates on GPU)
        }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        if p["index"] not in ("auto", "flat", "ivf"):
            raise ValueError(f"patchcore: index must be 'auto', 'flat' or 'ivf', got {p['index']!r}")
        if int(p["coreset_shard_patches"]) < 0 or float(p["coreset_oversample"]) < 1:
            raise ValueError("patchcore: coreset_shard_patches must be >= 0 and coreset_oversample >= 1")
        if int(p["k"]) < 1 or int(p["reweight_neighbors"]) < 1:
            raise ValueError("patchcore: k and reweight_neighbors must be >= 1")
        resolve_torch_device(p["use_gpu"])  # validates the value
        self.grid_: tuple[int, int, int] | None = None
        self.coreset_indices_: np.ndarray | None = None
        self.fit_stats_: dict[str, Any] = {}
        self._index: Any = None          # CPU faiss index (persisted)
        self._search_index: Any = None   # same, or a GPU copy
        self._gpu_res: Any = None

    # -- fitting -------------------------------------------------------------
    def fit(self, X: Any, X_val: Any = None) -> PatchCore:
        p = self.params
        device = resolve_torch_device(p["use_gpu"])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res = select_coreset(X, ratio=float(p["coreset_ratio"]),
                             projection_dim=int(p["projection_dim"] or 0), seed=int(p["seed"]),
                             memory_budget_mb=float(p["memory_budget_mb"]), device=device,
                             threads=int(p["coreset_threads"]) or None,
                             shard_patches=int(p["coreset_shard_patches"]),
                             oversample=float(p["coreset_oversample"]), runner=self._shard_runner())
        t0 = time.perf_counter()
        self._set_index(self._build_index(res.bank))
        stats = dict(res.stats)
        stats["index_seconds"] = time.perf_counter() - t0
        stats["index"] = "ivf" if isinstance(self._index, faiss.IndexIVF) else "flat"
        stats["largest_array_bytes"] = max(stats["projected_peak_bytes"],
                                           stats["max_chunk_bytes"], stats["bank_bytes"])
        stats["peak_rss_mb"] = _peak_rss_mb()
        if device.type == "cuda":
            stats["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.grid_ = res.grid
        self.coreset_indices_ = res.indices
        self.fit_stats_ = stats
        return self

    #: runs the coreset's shard greedies when ``coreset_ray_tasks`` is on: injected by the caller
    #: (the Ray fit task gives a runner that makes each shard a Ray task); None runs them here
    shard_runner: Any = None

    def _shard_runner(self) -> Any:
        if not self.params["coreset_ray_tasks"]:
            return None
        if self.shard_runner is None:
            warnings.warn("patchcore: coreset_ray_tasks without a Ray shard runner; "
                          "running the shards in this process", RuntimeWarning, stacklevel=3)
        return self.shard_runner

    def index_kind(self, bank_rows: int) -> str:
        """``"flat"`` or ``"ivf"`` for a bank of ``bank_rows`` (``index="auto"`` switches by size)."""
        kind = self.params["index"]
        if kind == "auto":
            kind = "ivf" if bank_rows >= int(self.params["ivf_min_bank"]) else "flat"
        return kind

    def _build_index(self, bank: np.ndarray) -> Any:
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        n, dim = bank.shape
        if self.index_kind(n) == "flat":
            index = faiss.IndexFlatL2(dim)
        else:
            nlist = int(self.params["nlist"]) or int(round(math.sqrt(n)))
            nlist = max(1, min(nlist, n // 39 or 1))  # faiss wants >= 39 points per list
            quantizer = faiss.IndexFlatL2(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
            index.referenced_objects = [quantizer]  # keep the quantizer alive with the index
            index.train(bank)
        index.add(bank)
        return index

    def _set_index(self, index: Any) -> None:
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = max(1, min(int(self.params["nprobe"]), index.nlist))
            index.make_direct_map()  # reconstruct() for reweighting
        self._index = index
        self._search_index = index
        want = self.params["use_gpu"]
        if want and _faiss_gpu_count() > 0:
            self._gpu_res = faiss.StandardGpuResources()
            self._search_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
        elif want is True and _faiss_gpu_count() == 0:
            warnings.warn("patchcore: use_gpu=True but faiss has no GPU; searching on CPU",
                          RuntimeWarning, stacklevel=3)

    @property
    def bank_size(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def _bank_rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        return self._index.reconstruct_batch(ids)

    # -- scoring -------------------------------------------------------------
    def _patch_scores(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        p = self.params
        k = min(int(p["k"]), self.bank_size)
        patch_parts: list[np.ndarray] = []
        image_parts: list[np.ndarray] = []
        # float32 chunk + faiss distance tables: keep each chunk at a third of the budget
        for chunk in iter_budget_chunks(X, budget_bytes(p["memory_budget_mb"]), bytes_per_value=12):
            m, H, W, C = chunk.shape
            if C != self.grid_[2]:
                raise ValueError(f"patchcore fitted on {self.grid_[2]} channels, got {C}")
            flat = chunk.reshape(-1, C)
            D, I = self._search_index.search(flat, k)
            dist = np.sqrt(np.maximum(D, 0.0))
            patch = dist.mean(1).reshape(m, H * W).astype(np.float32)
            best = patch.argmax(1)
            image = patch[np.arange(m), best].astype(np.float64)
            if p["reweight"]:
                rows = np.arange(m) * H * W + best
                image *= self._reweight(flat[rows], dist[rows, 0], I[rows, 0])
            patch_parts.append(patch.reshape(m, H, W))
            image_parts.append(image)
        if not patch_parts:
            raise ValueError("patchcore: nothing to score (empty input)")
        return np.concatenate(patch_parts), np.concatenate(image_parts)

    def _reweight(self, feats: np.ndarray, d_star: np.ndarray, m_star: np.ndarray) -> np.ndarray:
        """Paper eq. 7: w = 1 - exp(d*) / sum_{m in N_b(m*)} exp(|f - m|), N_b includes m*."""
        b = min(int(self.params["reweight_neighbors"]), self.bank_size)
        centres = self._bank_rows(m_star)
        _, nbr = self._search_index.search(centres, b)  # neighbours of m* in the bank
        valid = (nbr >= 0) & (nbr != m_star[:, None])   # m* itself is added explicitly below
        ids = np.where(valid, nbr, 0)
        others = self._bank_rows(ids).reshape(len(feats), b, -1)
        d_other = np.sqrt(((others - feats[:, None, :]) ** 2).sum(-1, dtype=np.float64))
        d_other = np.where(valid, d_other, -np.inf)
        d_all = np.concatenate([d_star[:, None].astype(np.float64), d_other], axis=1)
        top = d_all.max(1, keepdims=True)
        log_den = top[:, 0] + np.log(np.exp(d_all - top).sum(1))
        return 1.0 - np.exp(d_star - log_den)

    # -- persistence -----------------------------------------------------------
    def _save_state(self, directory: Path) -> None:
        self._check_fitted()
        faiss.write_index(self._index, str(directory / "memory_bank.faiss"))
        save_arrays(directory / "state.npz", grid=np.asarray(self.grid_, dtype=np.int64),
                    coreset_indices=np.asarray(self.coreset_indices_, dtype=np.int64))
        self._save_stats(directory)

    def _load_state(self, directory: Path) -> None:
        arrays = load_arrays(directory / "state.npz")
        self.grid_ = tuple(int(v) for v in arrays["grid"])  # type: ignore[assignment]
        self.coreset_indices_ = arrays["coreset_indices"]
        self._set_index(faiss.read_index(str(directory / "memory_bank.faiss")))
        self._load_stats(directory)

    # -- export ----------------------------------------------------------------
    def torch_head(self) -> nn.Module:
        return PatchCoreHead(self)


class PatchCoreHead(nn.Module):
    """:class:`PatchCore`'s image score in torch: exact search of the bank, max over patches."""

    def __init__(self, detector: PatchCore):
        super().__init__()
        p = detector.params
        if p["reweight"]:
            raise UserError("patchcore with reweight=True cannot be exported (its reweighting searches the bank "
                            "again); refit with reweight=False")
        index = detector._index
        self.register_buffer("bank", bank_tensor(index))
        self.k = min(int(p["k"]), int(index.ntotal))
        self.channels = int(detector.grid_[2])

    def forward(self, pooled: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        n = patches.shape[0]
        flat = patches.float().reshape(-1, self.channels)
        return mean_nearest_distance(flat, self.bank, self.k).float().reshape(n, -1).max(1).values.double()
