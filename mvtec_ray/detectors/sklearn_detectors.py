"""The four scikit-learn estimator wrappers on pooled vectors (ocsvm, iforest, lof, elliptic),
persisted with skops and an explicit allow-list of trusted types. sklearn's ``score_samples``
(higher = more normal) is negated. Their default ``preprocess`` is measured in :mod:`.pooled_base`.
They have no torch head (:meth:`~mvtec_ray.detectors.base.Detector.torch_head`): not exportable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mvtec_ray.detectors.pooled_base import PooledDetector
from mvtec_ray.detectors.preprocess import Preprocessor
from mvtec_ray.detectors.registry import register


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

