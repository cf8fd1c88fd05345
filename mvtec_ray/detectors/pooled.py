"""Detectors on pooled feature vectors ``X`` of shape ``(n_images, dim)``.

Every ``score`` is float64 of shape ``(n,)`` with higher = more anomalous;
sklearn's ``score_samples`` (higher = more normal) is negated for that.

All detectors take the common parameters ``preprocess`` (see
:mod:`.preprocess`), ``pca_variance`` (used by ``preprocess="pca"``) and
``n_threads`` (``None`` leaves the caller's thread settings alone).

Default ``preprocess`` per detector is chosen on VALIDATION AUROC (held-out normals vs synthetic
defects, the images the threshold is chosen on; test AUROC only reported beside it) by
``benchmarks/study_preprocess.py``: efficientnet_lite0 pooled features (1280-d) of the built-in
dataset, 3 categories x 3 seeds (40 train images each); a mode other than ``none`` is chosen when
its mean validation AUROC is more than 0.01 higher. Measured (validation / test):
``standard`` for ``elliptic`` (0.810 / 0.876 -> 0.910 / 0.968) and ``lof`` (0.903 / 0.963 ->
0.920 / 0.974); ``none`` for the rest (``standard`` is equal or lower on validation for ocsvm,
iforest, knn, autoencoder, mahalanobis); ``pca95`` was never higher on validation
(0.06 to 0.12 lower; equal for elliptic, which reduces dimension itself). Re-measure on real MVTec features before trusting these.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np

from mvtec_ray.detectors.base import (
    Detector,
    as_float32,
    iter_chunks,
    load_arrays,
    save_arrays,
)
from mvtec_ray.detectors.preprocess import PREPROCESS_MODES, Preprocessor
from mvtec_ray.detectors.registry import register

PREPROCESS_FILE = "preprocess.npz"
_SCORE_CHUNK = 4096


class PooledDetector(Detector):
    """Shared plumbing: input checks, preprocessing, thread limits, persistence."""

    input_kind: ClassVar[str] = "pooled"
    #: per-detector default for ``preprocess``
    default_preprocess: ClassVar[str] = "none"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.params["preprocess"] not in PREPROCESS_MODES:
            raise ValueError(f"{self.name}: preprocess must be one of {PREPROCESS_MODES}, "
                             f"got {self.params['preprocess']!r}")
        if not 0.0 < float(self.params["pca_variance"]) <= 1.0:
            raise ValueError(f"{self.name}: pca_variance must be in (0, 1]")
        n_threads = self.params["n_threads"]
        if n_threads is not None and int(n_threads) < 1:
            raise ValueError(f"{self.name}: n_threads must be None or >= 1")
        self._pre: Preprocessor | None = None

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        return {"preprocess": cls.default_preprocess, "pca_variance": 0.95,
                "n_threads": None, **cls._own_params()}

    @classmethod
    def _own_params(cls) -> dict[str, Any]:
        return {}

    # -- the public interface ----------------------------------------------
    def fit(self, X: np.ndarray, X_val: np.ndarray | None = None) -> "PooledDetector":
        X = self._check_input(X, min_rows=2)
        with self._thread_limits():
            self._pre = Preprocessor(self.params["preprocess"],
                                     self.params["pca_variance"]).fit(X)
            Z = self._pre.transform(X)
            Z_val = None
            if X_val is not None and len(X_val):
                Z_val = self._pre.transform(self._check_input(X_val, X.shape[1]))
            self._fit(Z, Z_val)
        return self

    def score(self, X: np.ndarray) -> np.ndarray:
        if self._pre is None:
            raise RuntimeError(f"{self.name}: fit or load before score")
        X = self._check_input(X, self._pre.n_features_in, min_rows=0)
        if len(X) == 0:
            return np.zeros(0, dtype=np.float64)
        with self._thread_limits():
            scores = self._score(self._pre.transform(X))
        return np.asarray(scores, dtype=np.float64).reshape(len(X))

    @property
    def preprocessor(self) -> Preprocessor | None:
        return self._pre

    # -- what subclasses implement -------------------------------------------
    def _fit(self, Z: np.ndarray, Z_val: np.ndarray | None) -> None:
        raise NotImplementedError

    def _score(self, Z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _save_model(self, directory: Path) -> None:
        raise NotImplementedError

    def _load_model(self, directory: Path) -> None:
        raise NotImplementedError

    # -- persistence -------------------------------------------------------
    def _save_state(self, directory: Path) -> None:
        if self._pre is None:
            raise RuntimeError(f"{self.name}: fit before save")
        self._pre.save(directory / PREPROCESS_FILE)
        self._save_model(directory)

    def _load_state(self, directory: Path) -> None:
        self._pre = Preprocessor.load(directory / PREPROCESS_FILE)
        self._load_model(directory)

    # -- helpers -------------------------------------------------------------
    def _check_input(self, X: np.ndarray, dim: int | None = None, min_rows: int = 1) -> np.ndarray:
        X = as_float32(X)
        if X.ndim != 2:
            raise ValueError(f"{self.name}: expected (n, dim) pooled features, got shape {X.shape}")
        if dim is not None and X.shape[1] != dim:
            raise ValueError(f"{self.name}: expected dim {dim}, got {X.shape[1]}")
        if len(X) < min_rows:
            raise ValueError(f"{self.name}: needs at least {min_rows} rows, got {len(X)}")
        if not np.isfinite(X).all():
            raise ValueError(f"{self.name}: features contain NaN or inf")
        return X

    @contextlib.contextmanager
    def _thread_limits(self) -> Iterator[None]:
        n_threads = self.params["n_threads"]
        if n_threads is None:
            yield
            return
        from threadpoolctl import threadpool_limits
        with threadpool_limits(limits=int(n_threads)):
            yield


# --------------------------------------------------------------------------
# sklearn estimators, persisted with skops and an explicit allow-list
# --------------------------------------------------------------------------
class SklearnDetector(PooledDetector):
    MODEL_FILE: ClassVar[str] = "model.skops"
    #: the estimator class expected in the model file
    estimator_class: ClassVar[type]
    #: exactly the non-default types ``skops.io.get_untrusted_types`` reports for it
    trusted_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.estimator_: Any = None

    def _build(self, Z: np.ndarray) -> Any:
        raise NotImplementedError

    def _fit(self, Z: np.ndarray, Z_val: np.ndarray | None) -> None:
        self.estimator_ = self._build(Z).fit(Z)

    def _score(self, Z: np.ndarray) -> np.ndarray:
        # sklearn: higher = more normal; ours: higher = more anomalous
        return -self.estimator_.score_samples(Z)

    def _save_model(self, directory: Path) -> None:
        import skops.io as sio
        sio.dump(self.estimator_, directory / self.MODEL_FILE)

    def _load_model(self, directory: Path) -> None:
        import skops.io as sio
        path = directory / self.MODEL_FILE
        # skops raises UntrustedTypesFoundException for any type outside its
        # defaults and this list; its defaults include every sklearn
        # estimator, hence the class check after loading.
        est = sio.load(path, trusted=list(self.trusted_types))
        if type(est) is not self.estimator_class:
            raise TypeError(f"{path} holds a {type(est).__name__}, "
                            f"expected {self.estimator_class.__name__}")
        self.estimator_ = est


def _sklearn_classes() -> dict[str, type]:
    from sklearn.covariance import EllipticEnvelope
    from sklearn.ensemble import IsolationForest
    from sklearn.neighbors import LocalOutlierFactor
    from sklearn.svm import OneClassSVM
    return {"ocsvm": OneClassSVM, "iforest": IsolationForest,
            "lof": LocalOutlierFactor, "elliptic": EllipticEnvelope}


_SK = _sklearn_classes()


@register
class OCSVMDetector(SklearnDetector):
    name = "ocsvm"
    # measured: standardising cost ~0.03 AUROC (see module docstring)
    default_preprocess = "none"
    estimator_class = _SK["ocsvm"]
    trusted_types = ()

    @classmethod
    def _own_params(cls) -> dict[str, Any]:
        return {"nu": 0.1, "gamma": "scale"}

    def _build(self, Z: np.ndarray) -> Any:
        return self.estimator_class(kernel="rbf", nu=float(self.params["nu"]),
                                    gamma=self.params["gamma"])


@register
class IsolationForestDetector(SklearnDetector):
    name = "iforest"
    # axis-aligned splits are invariant to per-feature scaling
    default_preprocess = "none"
    estimator_class = _SK["iforest"]
    trusted_types = ("sklearn.tree._tree.Tree",)

    @classmethod
    def _own_params(cls) -> dict[str, Any]:
        return {"n_estimators": 200, "max_samples": "auto", "random_state": 0}

    def _build(self, Z: np.ndarray) -> Any:
        return self.estimator_class(n_estimators=int(self.params["n_estimators"]),
                                    max_samples=self.params["max_samples"],
                                    random_state=self.params["random_state"])


@register
class LOFDetector(SklearnDetector):
    name = "lof"
    # chosen on validation AUROC (module docstring): local densities of standardised features
    default_preprocess = "standard"
    estimator_class = _SK["lof"]
    # algorithm="auto" picks a KD-tree / ball tree on low-dim inputs (e.g. after PCA)
    trusted_types = ("sklearn.metrics._dist_metrics.EuclideanDistance64",
                     "sklearn.neighbors._ball_tree.BallTree",
                     "sklearn.neighbors._kd_tree.KDTree")

    @classmethod
    def _own_params(cls) -> dict[str, Any]:
        return {"n_neighbors": 20}

    def _build(self, Z: np.ndarray) -> Any:
        k = max(1, min(int(self.params["n_neighbors"]), len(Z) - 1))
        return self.estimator_class(n_neighbors=k, novelty=True, metric="euclidean")


@register
class EllipticEnvelopeDetector(SklearnDetector):
    """Robust Gaussian (Minimum Covariance Determinant), really fitted.

    MCD needs many more samples than dimensions and its cost explodes with
    dimension (n=1000, d=64 takes ~30 s), so the features are first projected
    internally onto their top ``min(max_dim, (n - 1) // 2, d)`` principal
    components; this projection is stored next to the model.
    """

    name = "elliptic"
    # measured: +0.03 AUROC, the internal top-PC projection is scale-sensitive
    default_preprocess = "standard"
    estimator_class = _SK["elliptic"]
    trusted_types = ()
    PROJECTION_FILE: ClassVar[str] = "elliptic_projection.npz"

    @classmethod
    def _own_params(cls) -> dict[str, Any]:
        return {"support_fraction": None, "contamination": 0.1, "random_state": 0,
                "max_dim": 32}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._proj: Preprocessor | None = None

    def _build(self, Z: np.ndarray) -> Any:
        return self.estimator_class(support_fraction=self.params["support_fraction"],
                                    contamination=float(self.params["contamination"]),
                                    random_state=self.params["random_state"])

    def _fit(self, Z: np.ndarray, Z_val: np.ndarray | None) -> None:
        n, d = Z.shape
        k = max(1, min(int(self.params["max_dim"]), (n - 1) // 2, d))
        self._proj = Preprocessor("pca", variance=1.0, max_components=k).fit(Z)
        Y = self._proj.transform(Z)
        self.estimator_ = self._build(Y).fit(Y)

    def _score(self, Z: np.ndarray) -> np.ndarray:
        # -score_samples = squared robust Mahalanobis distance
        return -self.estimator_.score_samples(self._proj.transform(Z))

    def _save_model(self, directory: Path) -> None:
        self._proj.save(directory / self.PROJECTION_FILE)
        super()._save_model(directory)

    def _load_model(self, directory: Path) -> None:
        self._proj = Preprocessor.load(directory / self.PROJECTION_FILE)
        super()._load_model(directory)


# --------------------------------------------------------------------------
# kNN memory bank (faiss)
# --------------------------------------------------------------------------
@register
class KNNDetector(PooledDetector):
    """Mean Euclidean distance to the ``k`` nearest training vectors."""

    name = "knn"
    # raw features as in SPADE / PatchCore
    default_preprocess = "none"
    INDEX_FILE: ClassVar[str] = "index.faiss"

    @classmethod
    def _own_params(cls) -> dict[str, Any]:
        return {"k": 1}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if int(self.params["k"]) < 1:
            raise ValueError(f"{self.name}: k must be >= 1")
        self.index_: Any = None

    @contextlib.contextmanager
    def _thread_limits(self) -> Iterator[None]:
        with super()._thread_limits():
            n_threads = self.params["n_threads"]
            if n_threads is None:
                yield
                return
            import faiss
            before = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(int(n_threads))
            try:
                yield
            finally:
                faiss.omp_set_num_threads(before)

    def _fit(self, Z: np.ndarray, Z_val: np.ndarray | None) -> None:
        import faiss
        self.index_ = faiss.IndexFlatL2(Z.shape[1])
        self.index_.add(as_float32(Z))

    def _score(self, Z: np.ndarray) -> np.ndarray:
        k = min(int(self.params["k"]), self.index_.ntotal)
        Z = as_float32(Z)
        out = np.empty(len(Z), dtype=np.float64)
        for sl in iter_chunks(len(Z), _SCORE_CHUNK):
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


# --------------------------------------------------------------------------
# Gaussian with shrinkage covariance (Rippel et al., 2020)
# --------------------------------------------------------------------------
@register
class MahalanobisDetector(PooledDetector):
    """Mahalanobis distance under a Ledoit-Wolf shrunk covariance."""

    name = "mahalanobis"
    # affine-invariant up to the shrinkage, and Rippel et al. fit raw features
    default_preprocess = "none"
    STATE_FILE: ClassVar[str] = "gaussian.npz"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.mean_: np.ndarray | None = None
        self.precision_: np.ndarray | None = None

    def _fit(self, Z: np.ndarray, Z_val: np.ndarray | None) -> None:
        from scipy import linalg
        from sklearn.covariance import LedoitWolf
        lw = LedoitWolf(store_precision=False).fit(Z.astype(np.float64))
        cov = lw.covariance_
        # The shrunk covariance is positive definite unless the data are
        # constant: Cholesky inverts it ~10x faster than sklearn's pinvh.
        try:
            precision = linalg.cho_solve(linalg.cho_factor(cov), np.eye(len(cov)))
            precision = (precision + precision.T) / 2
        except linalg.LinAlgError:
            precision = linalg.pinvh(cov)
        self.mean_ = lw.location_
        self.precision_ = precision

    def _score(self, Z: np.ndarray) -> np.ndarray:
        out = np.empty(len(Z), dtype=np.float64)
        for sl in iter_chunks(len(Z), _SCORE_CHUNK):
            diff = Z[sl].astype(np.float64) - self.mean_
            out[sl] = np.einsum("ij,ij->i", diff @ self.precision_, diff)
        return np.sqrt(np.maximum(out, 0.0))

    def _save_model(self, directory: Path) -> None:
        save_arrays(directory / self.STATE_FILE, mean=self.mean_, precision=self.precision_)

    def _load_model(self, directory: Path) -> None:
        a = load_arrays(directory / self.STATE_FILE)
        self.mean_, self.precision_ = a["mean"], a["precision"]


# --------------------------------------------------------------------------
# Autoencoder on features
# --------------------------------------------------------------------------
def _build_autoencoder(dim: int, hidden: int, bottleneck: int):
    import torch.nn as nn
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.ReLU(),
        nn.Linear(hidden, bottleneck),  # linear code: a ReLU here can kill units
        nn.Linear(bottleneck, hidden), nn.ReLU(),
        nn.Linear(hidden, dim),
    )


@register
class AutoencoderDetector(PooledDetector):
    """MLP autoencoder; score = mean squared reconstruction error.

    Always standardises its (preprocessed) input internally, so
    ``preprocess="none"`` is the default. Uses whatever torch thread count the
    caller set.
    """

    name = "autoencoder"
    default_preprocess = "none"
    MODEL_FILE: ClassVar[str] = "autoencoder.pt"
    SCALER_FILE: ClassVar[str] = "autoencoder_scaler.npz"

    @classmethod
    def _own_params(cls) -> dict[str, Any]:
        return {"hidden": 256, "bottleneck": 32, "lr": 1e-3, "batch_size": 64,
                "max_epochs": 200, "patience": 10, "val_fraction": 0.1, "seed": 0}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        for key in ("hidden", "bottleneck", "batch_size", "max_epochs"):
            if int(self.params[key]) < 1:
                raise ValueError(f"{self.name}: {key} must be >= 1")
        self._scaler: Preprocessor | None = None
        self.model_: Any = None
        #: training summary: epochs run, best monitored loss, what was monitored
        self.fit_info_: dict[str, Any] = {}

    def _fit(self, Z: np.ndarray, Z_val: np.ndarray | None) -> None:
        import torch

        p = self.params
        seed = int(p["seed"])
        monitor = "val"
        if Z_val is None:
            # seeded hold-out of the training normals for early stopping (the fit stage passes no
            # X_val: its validation images choose the threshold and must stay unseen)
            monitor = "train"
            n_val = int(round(float(p["val_fraction"]) * len(Z)))
            if n_val >= 1 and len(Z) - n_val >= 1:
                perm = np.random.default_rng(seed).permutation(len(Z))
                Z_val, Z = Z[perm[:n_val]], Z[perm[n_val:]]
                monitor = f"train_holdout_{n_val}"
        self._scaler = Preprocessor("standard").fit(Z)
        train = torch.from_numpy(self._scaler.transform(Z))
        val = None if Z_val is None else torch.from_numpy(self._scaler.transform(Z_val))

        # fork_rng: seed init and shuffling without touching the caller's RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _build_autoencoder(train.shape[1], int(p["hidden"]), int(p["bottleneck"]))
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(model.parameters(), lr=float(p["lr"]))
            bs = int(p["batch_size"])
            best, best_state, bad, epoch = float("inf"), None, 0, 0
            for epoch in range(1, int(p["max_epochs"]) + 1):
                model.train()
                total = 0.0
                for idx in torch.randperm(len(train), generator=gen).split(bs):
                    batch = train[idx]
                    loss = torch.mean((model(batch) - batch) ** 2)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                monitored = total / len(train) if val is None else self._loss(model, val)
                if monitored < best:
                    best, best_state, bad = monitored, copy.deepcopy(model.state_dict()), 0
                else:
                    bad += 1
                    if bad >= int(p["patience"]):
                        break
        if best_state is not None:  # None only if every loss was NaN
            model.load_state_dict(best_state)
        model.eval()
        self.model_ = model
        self.fit_info_ = {"epochs": epoch, "best_loss": best, "monitor": monitor}

    @staticmethod
    def _loss(model, data) -> float:
        import torch
        model.eval()
        with torch.no_grad():
            return float(torch.mean((model(data) - data) ** 2))

    def _score(self, Z: np.ndarray) -> np.ndarray:
        import torch
        S = self._scaler.transform(Z)
        out = np.empty(len(S), dtype=np.float64)
        self.model_.eval()
        with torch.no_grad():
            for sl in iter_chunks(len(S), _SCORE_CHUNK):
                x = torch.from_numpy(S[sl])
                out[sl] = torch.mean((self.model_(x) - x) ** 2, dim=1).double().numpy()
        return out

    def _save_model(self, directory: Path) -> None:
        import torch
        self._scaler.save(directory / self.SCALER_FILE)
        torch.save(self.model_.state_dict(), directory / self.MODEL_FILE)

    def _load_model(self, directory: Path) -> None:
        import torch
        self._scaler = Preprocessor.load(directory / self.SCALER_FILE)
        state = torch.load(directory / self.MODEL_FILE, map_location="cpu", weights_only=True)
        model = _build_autoencoder(self._scaler.n_features_in, int(self.params["hidden"]),
                                   int(self.params["bottleneck"]))
        model.load_state_dict(state)
        model.eval()
        self.model_ = model


#: names of the detectors this module registers
POOLED_DETECTORS = ("ocsvm", "iforest", "lof", "elliptic", "knn", "autoencoder", "mahalanobis")

__all__ = ["PooledDetector", "SklearnDetector", "OCSVMDetector", "IsolationForestDetector",
           "LOFDetector", "EllipticEnvelopeDetector", "KNNDetector", "MahalanobisDetector",
           "AutoencoderDetector", "POOLED_DETECTORS"]
