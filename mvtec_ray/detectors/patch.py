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
from mvtec_ray.detectors.chunks import budget_bytes, iter_budget_chunks, iter_chunks, iter_raw_chunks
from mvtec_ray.detectors.coreset import gather_rows, n_images_hint, resolve_torch_device, select_coreset
from mvtec_ray.detectors.ivf_search import DecodedLists, decoded_exact_search, ivf_blas_search, ivf_exact_search
from mvtec_ray.detectors.registry import register
from mvtec_ray.detectors.torch_heads import bank_tensor, mean_nearest_distance
from mvtec_ray.errors import UserError

STATS_FILE = "fit_stats.json"
#: queries per probed list from which the list-by-list matrix products beat faiss's scan (measured,
#: 784-patch images, 194 lists, nprobe 4: 16 / 9.6 / 8.0 ms per image at 1 / 2 / 3 images, faiss
#: 11 / 9.3 / 9.3): a single served image keeps faiss's search
BLAS_MIN_QUERIES_PER_LIST = 40


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


def refine_image_maxima(bounds: np.ndarray, exact_scores: Any, first_step: int = 2) -> tuple[np.ndarray, int]:
    """Each row's exact maximum from upper bounds, re-checking as few entries as the bounds allow.

    ``bounds`` ``(m, P)``: an upper bound of each patch score (an IVF search's distances: the
    neighbours it finds are bank rows, so no nearer than the true ones). ``exact_scores(flat_ids)``
    returns the exact scores of entries ``flat_ids`` (indices into ``bounds.ravel()``). Per row,
    entries are re-checked in decreasing bound order until the next bound is no more than the
    largest exact score found: no entry left can exceed it. Re-checked entries of ``bounds`` are
    overwritten with their exact scores (in place). Returns (column of each row's maximum, entries
    re-checked).
    """
    m, P = bounds.shape
    order = np.argsort(-bounds, axis=1, kind="stable")
    sorted_bounds = np.take_along_axis(bounds, order, axis=1)  # the original bounds, decreasing
    best = np.full(m, -np.inf)
    best_col = order[:, 0].copy()
    done = np.zeros(m, np.int64)
    active = np.arange(m)
    step, checked = max(1, int(first_step)), 0
    while active.size:
        pos = done[active, None] + np.arange(step)[None, :]
        valid = pos < P
        pos = np.minimum(pos, P - 1)
        rows = np.broadcast_to(active[:, None], pos.shape)
        valid &= sorted_bounds[rows, pos] > best[active, None]
        r, c = rows[valid], order[rows[valid], pos[valid]]
        exact = np.asarray(exact_scores(r * P + c), dtype=bounds.dtype)
        checked += len(r)
        bounds[r, c] = exact
        # the largest exact score per row among this round's entries
        gain = np.full(m, -np.inf)
        np.maximum.at(gain, r, exact.astype(np.float64))
        better = gain > best
        if better.any():
            hit = exact.astype(np.float64) >= gain[r]
            best_col[r[hit & better[r]]] = c[hit & better[r]]
        best = np.maximum(best, gain)
        done[active] += step
        left = done[active] < P
        active = active[left]
        active = active[sorted_bounds[active, done[active]] > best[active]]
        step *= 2  # few rows need more; doubling keeps the rounds logarithmic
    return best_col, checked


def _float16_exact(bank: np.ndarray) -> bool:
    """Whether float16 holds every value of ``bank`` exactly (the feature store's patches do)."""
    step = max(1, (16 << 20) // max(1, bank.shape[1] * 4))  # ~16 MiB of rows at a time
    with np.errstate(over="ignore"):
        return all(np.array_equal(bank[sl].astype(np.float16).astype(np.float32), bank[sl])
                   for sl in iter_chunks(len(bank), step))


def _count_patches(X: Any) -> int:
    """Patches in ``X`` (maps ``(n, H, W, C)`` or a chunk source), without a pass when its image
    count is known."""
    hint, total = n_images_hint(X), 0
    for chunk in iter_raw_chunks(X):
        per_image = chunk.shape[1] * chunk.shape[2]
        if hint is not None:
            return hint * per_image
        total += len(chunk) * per_image
    return total


@register
class PatchCore(_PatchDetector):
    """PatchCore (Roth et al., 2022): greedy coreset of normal patches + nearest-neighbour distance.

    Patch score: mean L2 distance to the ``k`` nearest memory-bank patches (k=1 is the
    paper). Image score: max patch score, optionally reweighted as in the paper by how
    isolated the nearest bank patch is (``reweight``, over ``reweight_neighbors``).

    Search: exact (``IndexFlatL2``) for small banks, IVF from ``ivf_min_bank`` rows (``index``).
    With IVF the patch scores are upper bounds (the neighbours found are bank rows), and each
    image's maximum is re-checked exactly (:func:`refine_image_maxima`), so the image scores,
    and so image AUROC, equal exact search's whatever ``nprobe``; ``nprobe`` then sets only how
    close the maps' patch scores are and the cost. ``nprobe: "auto"`` picks it at fit time by
    measured accuracy (:meth:`_choose_nprobe`): the fewest lists, up to ``nprobe_max``, for which
    ``nprobe_target`` of held-out patches, and of the hardest tenth of them, get a patch score
    within ``NPROBE_TOLERANCE`` of the exact one.
    """

    name = "patchcore"
    #: relative patch-score error that counts as right when choosing ``nprobe`` (relative to the
    #: median exact score for patches nearer than it: rounding dominates near-duplicates)
    NPROBE_TOLERANCE = 0.01
    #: held-out patches the choice is measured on, and the share of them (largest exact score)
    #: that must meet the target too: the far patches make the image maxima
    NPROBE_QUERIES = 4000
    NPROBE_HARD_FRACTION = 0.1

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
            "ivf_min_bank": 20_000,
            "nlist": 0,                  # IVF lists; 0 = about sqrt(bank size)
            "nprobe": "auto",            # IVF lists searched per patch: "auto" (chosen at fit) or an int
            "nprobe_target": 0.99,       # "auto": share of held-out patches scored within 1% of exact
            "nprobe_max": 8,             # "auto" never searches more lists (bounds the scoring cost)
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
        if p["nprobe"] != "auto" and (isinstance(p["nprobe"], (bool, str)) or int(p["nprobe"]) < 1):
            raise ValueError(f"patchcore: nprobe must be 'auto' or an int >= 1, got {p['nprobe']!r}")
        if not 0 < float(p["nprobe_target"]) <= 1 or int(p["nprobe_max"]) < 1:
            raise ValueError("patchcore: nprobe_target must be in (0, 1] and nprobe_max >= 1")
        resolve_torch_device(p["use_gpu"])  # validates the value
        self.grid_: tuple[int, int, int] | None = None
        self.coreset_indices_: np.ndarray | None = None
        self.fit_stats_: dict[str, Any] = {}
        self._index: Any = None          # CPU faiss index (persisted)
        self._search_index: Any = None   # same, or a GPU copy
        self._gpu_res: Any = None
        self._decoded: DecodedLists | None = None  # IVF lists decoded for search and re-checks
        #: patches the last scoring call searched, and (IVF) re-checked exactly
        self.search_stats_: dict[str, int] = {}

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
        index = self._build_index(res.bank)
        stats = dict(res.stats)
        stats["index_seconds"] = time.perf_counter() - t0
        stats["index"] = "ivf" if isinstance(index, faiss.IndexIVF) else "flat"
        if isinstance(index, faiss.IndexIVF):
            stats["nlist"] = int(index.nlist)
            stats["ivf_storage"] = "float32" if isinstance(index, faiss.IndexIVFFlat) else "float16"
            if p["nprobe"] == "auto":
                t0 = time.perf_counter()
                queries, source = self._held_out_patches(X, X_val, res)
                stats.update(self._choose_nprobe(index, res.bank, queries), nprobe_queries_from=source,
                             nprobe_seconds=time.perf_counter() - t0)
            else:
                stats["nprobe"] = max(1, min(int(p["nprobe"]), index.nlist))
        stats["largest_array_bytes"] = max(stats["projected_peak_bytes"],
                                           stats["max_chunk_bytes"], stats["bank_bytes"])
        stats["peak_rss_mb"] = _peak_rss_mb()
        if device.type == "cuda":
            stats["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.grid_ = res.grid
        self.coreset_indices_ = res.indices
        self.fit_stats_ = stats
        self._set_index(index)
        return self

    def _held_out_patches(self, X: Any, X_val: Any, res: Any) -> tuple[np.ndarray, str]:
        """Up to ``NPROBE_QUERIES`` patches, float32 ``(n, C)``, not in the bank, drawn with the seed:
        from ``X_val`` when given (held-out normals), else training patches outside the coreset."""
        rng = np.random.default_rng(int(self.params["seed"]))
        max_bytes = budget_bytes(self.params["memory_budget_mb"])
        channels = res.grid[2]
        if X_val is not None:
            source, data = "X_val", X_val
            pool = np.arange(_count_patches(X_val))
        else:
            source, data = "train_not_in_coreset", X
            outside = np.ones(int(res.stats["n_patches"]), bool)
            outside[res.indices] = False
            pool = np.flatnonzero(outside)
        picked = np.sort(rng.choice(pool, min(self.NPROBE_QUERIES, len(pool)), replace=False))
        if not len(picked):
            return np.zeros((0, channels), np.float32), source
        return gather_rows(data, picked, channels, max_bytes), source

    def _choose_nprobe(self, index: Any, bank: np.ndarray, queries: np.ndarray) -> dict[str, Any]:
        """The fewest IVF lists (1, 2, 4, ... up to ``nprobe_max``) for which ``nprobe_target`` of
        ``queries``, and of their hardest tenth (largest exact score), get a patch score within
        ``NPROBE_TOLERANCE`` of the exact one; ``nprobe_max`` if none does. Returns fit stats."""
        p = self.params
        target, cap = float(p["nprobe_target"]), max(1, min(int(p["nprobe_max"]), index.nlist))
        if not len(queries):
            return {"nprobe": cap, "nprobe_recall": None, "nprobe_recall_hard": None,
                    "nprobe_target_met": False, "nprobe_queries": 0, "nprobe_tried": {}}
        k = min(int(p["k"]), len(bank))
        exact = np.sqrt(np.maximum(faiss.knn(queries, bank, k)[0], 0.0)).mean(1)
        allowed = self.NPROBE_TOLERANCE * np.maximum(exact, np.median(exact))
        hard = exact >= np.quantile(exact, 1.0 - self.NPROBE_HARD_FRACTION)
        tried: dict[str, list[float]] = {}
        candidates = sorted({min(2 ** i, cap) for i in range(cap.bit_length() + 1)})
        for nprobe in candidates:
            D, _ = index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
            within = np.sqrt(np.maximum(D, 0.0)).mean(1) - exact <= allowed
            recall, recall_hard = float(within.mean()), float(within[hard].mean())
            tried[str(nprobe)] = [round(recall, 4), round(recall_hard, 4)]
            if recall >= target and recall_hard >= target:
                break
        return {"nprobe": int(nprobe), "nprobe_recall": recall, "nprobe_recall_hard": recall_hard,
                "nprobe_target_met": bool(recall >= target and recall_hard >= target),
                "nprobe_queries": int(len(queries)), "nprobe_tried": tried}

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
            if _float16_exact(bank):
                # the feature store's float16 values: stored as they are, half the bytes each
                # search reads, same distances (raw vectors, not residuals)
                index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                                      faiss.METRIC_L2, False)
            else:
                index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
            index.referenced_objects = [quantizer]  # keep the quantizer alive with the index
            index.train(bank)
        index.add(bank)
        return index

    def _nprobe(self, index: Any) -> int:
        """IVF lists searched per patch: the ``nprobe`` given, or the one chosen at fit ("auto")."""
        nprobe = self.params["nprobe"]
        if nprobe == "auto":
            nprobe = self.fit_stats_.get("nprobe", self.params["nprobe_max"])
        return max(1, min(int(nprobe), index.nlist))

    def _set_index(self, index: Any) -> None:
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = self._nprobe(index)
            index.make_direct_map()  # reconstruct() for reweighting
        self._index = index
        self._search_index = index
        self._decoded = None
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

    @property
    def _approximate(self) -> bool:
        """IVF searching fewer than all its lists (all of them: every distance is exact)."""
        return isinstance(self._index, faiss.IndexIVF) and self._index.nprobe < self._index.nlist

    def _exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-NN (squared L2, ids) whatever the index."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not self._approximate:
            return self._search_index.search(queries, k)
        lists = self._decoded_lists()
        if lists is None:
            return ivf_exact_search(self._index, queries, k)
        return decoded_exact_search(lists, queries, k)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The scoring search: the index's own, or (CPU IVF whose decoded lists fit the budget, a
        batch that probes each list often enough) the same lists searched by matrix products
        (:func:`ivf_blas_search`, faster)."""
        index = self._index
        if (self._approximate and self._search_index is index
                and len(queries) * index.nprobe >= BLAS_MIN_QUERIES_PER_LIST * index.nlist):
            lists = self._decoded_lists()
            if lists is not None:
                return ivf_blas_search(index, lists, queries, k, index.nprobe)
        return self._search_index.search(queries, k)

    def _decoded_lists(self) -> DecodedLists | None:
        """The IVF bank decoded once to float32 for the scoring search and the exact re-checks
        when a quarter of ``memory_budget_mb`` holds it (decoding every list again per call
        costs more than the search); None above that."""
        if self._decoded is None:
            index = self._index
            if DecodedLists.nbytes_for(index) > budget_bytes(self.params["memory_budget_mb"]) // 4:
                return None
            self._decoded = DecodedLists.of(index)
        return self._decoded

    # -- scoring -------------------------------------------------------------
    def _patch_scores(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        p = self.params
        k = min(int(p["k"]), self.bank_size)
        patch_parts: list[np.ndarray] = []
        image_parts: list[np.ndarray] = []
        self.search_stats_ = {"patches": 0, "rechecked": 0}
        # float32 chunk + faiss distance tables: keep each chunk at a third of the budget
        for chunk in iter_budget_chunks(X, budget_bytes(p["memory_budget_mb"]), bytes_per_value=12):
            m, H, W, C = chunk.shape
            if C != self.grid_[2]:
                raise ValueError(f"patchcore fitted on {self.grid_[2]} channels, got {C}")
            flat = chunk.reshape(-1, C)
            D, I = self._search(flat, k)
            dist = np.sqrt(np.maximum(D, 0.0))
            self.search_stats_["patches"] += len(flat)
            if self._approximate:
                best = self._exact_maxima(flat, dist, I, m)
            else:
                best = dist.mean(1).reshape(m, H * W).argmax(1)
            patch = dist.mean(1).reshape(m, H * W).astype(np.float32)
            image = patch[np.arange(m), best].astype(np.float64)
            if p["reweight"]:
                rows = np.arange(m) * H * W + best
                image *= self._reweight(flat[rows], dist[rows, 0], I[rows, 0])
            patch_parts.append(patch.reshape(m, H, W))
            image_parts.append(image)
        if not patch_parts:
            raise ValueError("patchcore: nothing to score (empty input)")
        return np.concatenate(patch_parts), np.concatenate(image_parts)

    def _exact_maxima(self, flat: np.ndarray, dist: np.ndarray, I: np.ndarray, m: int) -> np.ndarray:
        """IVF: each image's exact maximum patch (its column), from the search's upper bounds.
        Re-checked patches get their exact distances and neighbours in ``dist`` / ``I`` (in place)."""
        k = dist.shape[1]

        def recheck(rows: np.ndarray) -> np.ndarray:
            D, ids = self._exact_search(flat[rows], k)
            dist[rows], I[rows] = np.sqrt(np.maximum(D, 0.0)), ids
            return dist[rows].mean(1)

        short = np.flatnonzero((I < 0).any(1))  # the lists searched held fewer than k rows
        if len(short):
            recheck(short)
        bounds = dist.mean(1).reshape(m, -1).astype(np.float32)
        best, rechecked = refine_image_maxima(bounds, recheck)
        self.search_stats_["rechecked"] += rechecked + len(short)
        return best

    def _reweight(self, feats: np.ndarray, d_star: np.ndarray, m_star: np.ndarray) -> np.ndarray:
        """Paper eq. 7: w = 1 - exp(d*) / sum_{m in N_b(m*)} exp(|f - m|), N_b includes m*."""
        b = min(int(self.params["reweight_neighbors"]), self.bank_size)
        centres = self._bank_rows(m_star)
        _, nbr = self._exact_search(centres, b)  # neighbours of m* in the bank
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
        self._load_stats(directory)  # first: holds the nprobe chosen at fit ("auto")
        self._set_index(faiss.read_index(str(directory / "memory_bank.faiss")))

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
