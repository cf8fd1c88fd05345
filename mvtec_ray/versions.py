"""Versions of the packages a run depends on, read without importing them.

A package's own ``__version__`` is used once it is imported, else its installed distribution's
(importing scikit-learn just to read its version cost a scoring driver ~1 s). Values are plain
``str``: torch's version is a ``str`` subclass whose unpickling imports torch in every process the
value reaches (Ray Data's stats actor included).
"""
from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version

#: package name -> (module name, distribution names to try)
KNOWN = {
    "torch": ("torch", ("torch",)),
    "torchvision": ("torchvision", ("torchvision",)),
    "scikit-learn": ("sklearn", ("scikit-learn",)),
    "faiss": ("faiss", ("faiss-cpu", "faiss-gpu", "faiss")),
    "ray": ("ray", ("ray",)),
    "pyarrow": ("pyarrow", ("pyarrow",)),
    "numpy": ("numpy", ("numpy",)),
}
#: the packages whose versions decide whether a saved model still loads
MODEL_PACKAGES = ("torch", "torchvision", "scikit-learn", "faiss", "numpy")
#: the packages recorded beside extracted features
FEATURE_PACKAGES = ("torch", "torchvision", "ray", "pyarrow", "scikit-learn", "numpy")


def package_versions(packages=MODEL_PACKAGES, with_python: bool = False) -> dict[str, str]:
    """``{"mvtec_ray": ..., package: version}`` for each of ``packages`` that is installed."""
    from mvtec_ray import __version__
    versions = {"mvtec_ray": __version__}
    for package in packages:
        module, distributions = KNOWN[package]
        loaded = sys.modules.get(module)
        if loaded is not None and getattr(loaded, "__version__", None):
            versions[package] = loaded.__version__
            continue
        for distribution in distributions:
            try:
                versions[package] = version(distribution)
                break
            except PackageNotFoundError:
                continue
    if with_python:
        versions["python"] = platform.python_version()
    return {k: str(v) for k, v in versions.items()}
