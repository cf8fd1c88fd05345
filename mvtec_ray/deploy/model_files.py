"""Fitted models on disk or S3: one folder per (category, detector), nothing pickled.

    MODELS/<category>/<detector>/model.json    threshold, feature schema, backbone identity, versions,
                                               sha256 of every detector file
    MODELS/<category>/<detector>/...           the detector's own files (JSON, npz, faiss, skops, state_dict)
    MODELS/manifest.json                       the latest fit's models: (category, detector, status,
                                               version, fingerprint, val_auroc, val_ap) per cell
                                               (:func:`update_manifest`), and per category the served
                                               model chosen on validation (``best_on_validation``)

What is served: exactly the cells the manifest lists with status ``ok`` (:func:`served_models`),
each only as the version listed; a cell listed as failed is not served even when an older model
of it is still on disk. A fit that covers fewer cells keeps the earlier manifest's other cells when
they were fitted on the same features (see :func:`update_manifest` and docs/serving.md). A folder
without a manifest (older runs, hand-copied folders) serves every model folder found, with a warning.

``best_on_validation`` is an alias ``score`` and ``serve`` resolve per category to the detector
the manifest records as chosen (:attr:`ServedModels.best`): among the cells it serves, the one with
the highest validation AUROC (:func:`mvtec_ray.evaluation.selection.best_candidate`, the rule of
the results table's ``best_on_validation`` rows).

Loading (:func:`load_model`) refuses, with :class:`ModelMismatch` and a one-line message, a model
whose model.json is malformed or names another category/detector, whose files were changed after
saving, whose feature schema differs from what the caller expects (backbone, weights sha256, image
size, resize_to, patch_dim, pooled_dim, patch_shape, padim_shape), or that was saved with a
different major version of a package that (de)serialises its state or computes its features (see
:data:`MAJOR_MUST_MATCH`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mvtec_ray.detectors.base import Detector
from mvtec_ray.detectors.registry import load_detector
from mvtec_ray.errors import ModelMismatch, UserError
from mvtec_ray.evaluation.selection import BEST_ON_VALIDATION, as_finite, best_candidate
from mvtec_ray.storage import Storage, is_s3, join, safe_join
from mvtec_ray.versions import MODEL_PACKAGES, package_versions

log = logging.getLogger(__name__)
MODEL_FILE = "model.json"
MANIFEST = "manifest.json"
#: bump when model.json changes incompatibly; loading refuses newer formats
FORMAT_VERSION = 1
#: what must match between a model and the features it scores
SCHEMA_KEYS = ("backbone", "weights_sha256", "image_size", "patch_dim", "pooled_dim", "patch_shape",
               "padim_shape", "resize_to", "resize", "tile_size")
#: schema values of models saved before the key existed
SCHEMA_DEFAULTS = {"resize": "stretch", "tile_size": None}
#: the schema entry giving the shape of each feature column a detector can read
COLUMN_SHAPE_KEY = {"pooled": "pooled_dim", "patches": "patch_shape", "padim": "padim_shape"}
#: Version policy. A different MAJOR version of these refuses to load: they write or read the model
#: files (skops/sklearn estimators, faiss indexes, npz, torch state_dicts) or compute the features, and
#: a major release may change formats or numerics silently. A different minor version only warns
#: (scores may move slightly; refit to be sure). Other packages (ray, pyarrow, ...) are not checked.
MAJOR_MUST_MATCH = ("torch", "torchvision", "scikit-learn", "faiss", "numpy", "mvtec_ray")
_warned: set[tuple] = set()


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


def runtime_versions() -> dict[str, str]:
    """Versions of the packages that save/load detector state, in this process."""
    return package_versions(MODEL_PACKAGES)


def save_model(storage: Storage, models_uri: str, category: str, detector: Detector, threshold: float,
               threshold_rule: str, feature_metadata: dict) -> str:
    target = safe_join(models_uri, f"{category}/{detector.name}")
    info = {"format": FORMAT_VERSION, "category": category, "detector": detector.name,
            "threshold": float(threshold), "threshold_rule": threshold_rule, "input_kind": detector.input_kind,
            "schema": {k: feature_metadata.get(k, SCHEMA_DEFAULTS.get(k)) for k in SCHEMA_KEYS},
            "weights": feature_metadata.get("weights"), "pretrained": feature_metadata.get("pretrained"),
            "normalisation": feature_metadata.get("normalisation"),
            "fingerprint": feature_metadata.get("fingerprint"),
            # extraction's environment (features) and the fit's (detector state) can differ
            "versions": feature_metadata.get("versions"), "fit_versions": runtime_versions(),
            "saved_at": time.time()}
    with tempfile.TemporaryDirectory() as tmp:
        detector.save(tmp)
        files = sorted(Path(tmp).iterdir())
        info["files"] = [p.name for p in files]
        info["file_sha256"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
        info["version"] = f"{feature_metadata.get('fingerprint')}-{int(info['saved_at'])}"
        # model.json last: a folder without it is not a model (a crash mid-save leaves no half model)
        for path in files:
            storage.write_bytes(join(target, path.name), path.read_bytes())
        storage.write_bytes(join(target, MODEL_FILE), json.dumps(info, indent=2, sort_keys=True).encode())
    return target


def read_model_info(storage: Storage, models_uri: str, category: str, detector_name: str) -> dict:
    """model.json of one model, checked for structure; the detector files are not read."""
    source = safe_join(models_uri, f"{category}/{detector_name}")
    where = f"{category}/{detector_name}"
    if not storage.exists(join(source, MODEL_FILE)):
        raise UserError(f"no fitted {detector_name!r} model for category {category!r} under {models_uri}")
    try:
        info = json.loads(storage.read_bytes(join(source, MODEL_FILE)))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelMismatch(f"model {where}: {MODEL_FILE} is not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise ModelMismatch(f"model {where}: {MODEL_FILE} is not a JSON object")
    missing = [k for k in ("category", "detector", "threshold", "schema", "files", "version", "input_kind")
               if k not in info]
    if missing:
        raise ModelMismatch(f"model {where}: {MODEL_FILE} lacks {', '.join(missing)}")
    if int(info.get("format", 1)) > FORMAT_VERSION:
        raise ModelMismatch(f"model {where} has format {info['format']}, newer than this mvtec_ray reads "
                            f"({FORMAT_VERSION}); upgrade mvtec_ray")
    if (info["category"], info["detector"]) != (category, detector_name):
        raise ModelMismatch(f"model folder {where} holds a model.json for {info['category']}/{info['detector']}")
    schema = info["schema"]
    if isinstance(schema, dict):
        for key, value in SCHEMA_DEFAULTS.items():
            schema.setdefault(key, value)
    if not isinstance(schema, dict) or any(k not in schema for k in SCHEMA_KEYS):
        raise ModelMismatch(f"model {where}: schema must have {', '.join(SCHEMA_KEYS)}")
    try:
        threshold = float(info["threshold"])
    except (TypeError, ValueError):
        threshold = math.nan
    if not math.isfinite(threshold):
        raise ModelMismatch(f"model {where}: threshold {info['threshold']!r} is not a finite number")
    files = info["files"]
    if not isinstance(files, list) or not all(isinstance(n, str) for n in files):
        raise ModelMismatch(f"model {where}: 'files' must be a list of names")
    for name in files:
        if "/" in name or "\\" in name or name.startswith(".") or name == MODEL_FILE or not name:
            raise ModelMismatch(f"model {where}: refusing file name {name!r}")
    hashes = info.get("file_sha256")
    unhashed = [n for n in files if not isinstance(hashes, dict) or not isinstance(hashes.get(n), str)]
    if unhashed:
        raise ModelMismatch(f"model {where}: {MODEL_FILE} has no file_sha256 for {', '.join(unhashed[:3])}"
                            f"{' ...' if len(unhashed) > 3 else ''}, so its files cannot be checked; refit")
    return info


def check_versions(info: dict, where: str, current: dict[str, str] | None = None) -> None:
    """Apply the version policy (:data:`MAJOR_MUST_MATCH`): refuse a major mismatch, warn on a minor one."""
    current = current or runtime_versions()
    saved = {**(info.get("versions") or {}), **(info.get("fit_versions") or {})}
    for package in MAJOR_MUST_MATCH:
        have, then = current.get(package), saved.get(package)
        if not have or not then or _release(have) == _release(then):
            continue
        if _release(have)[0] != _release(then)[0]:
            raise ModelMismatch(f"model {where} was saved with {package} {then}, this environment has {have} "
                                f"(major versions differ: files or features may not match); install {package} "
                                f"{_release(then)[0]}.x or refit")
        key = (package, then, have)
        if key not in _warned:
            _warned.add(key)
            log.warning("model %s was saved with %s %s, this environment has %s: scores may differ slightly",
                        where, package, then, have)


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in str(version).split("+")[0].split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_schema(info: dict, expect: dict, where: str) -> None:
    """Refuse a model whose feature schema differs from ``expect`` (only the keys given there)."""
    schema = info["schema"]
    for key, want in expect.items():
        have = schema.get(key)
        if _norm(have) != _norm(want):
            raise ModelMismatch(f"model {where} was fitted on {key}={have!r}, but scoring uses {key}={want!r}; "
                                f"refit, or score with the model's settings")


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def load_model(storage: Storage, models_uri: str, category: str, detector_name: str,
               expect: dict | None = None, probe: bool = False) -> StoredModel:
    """Load one model, refusing anything that does not match (see the module docstring).

    ``expect``: schema values the model must have (any of :data:`SCHEMA_KEYS`). ``probe``: also score
    one blank input of the schema's shape, so a detector whose state does not fit its own schema fails
    here with one line and not later inside a scoring actor.
    """
    where = f"{category}/{detector_name}"
    info = read_model_info(storage, models_uri, category, detector_name)
    check_versions(info, where)
    if expect:
        check_schema(info, expect, where)
    source = safe_join(models_uri, where)
    hashes = info["file_sha256"]  # one per file (read_model_info)
    with tempfile.TemporaryDirectory() as tmp:
        for name in info["files"]:
            try:
                data = storage.read_bytes(join(source, name))
            except FileNotFoundError:
                raise ModelMismatch(f"model {where}: file {name} is missing") from None
            if hashlib.sha256(data).hexdigest() != hashes[name]:
                raise ModelMismatch(f"model {where}: file {name} changed after the model was saved (sha256)")
            Path(tmp, name).write_bytes(data)
        try:
            detector = load_detector(tmp)
        except Exception as exc:  # noqa: BLE001 - any loader failure means the same thing to the user
            raise ModelMismatch(f"model {where} cannot be loaded: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    if detector.name != detector_name or detector.input_kind != info["input_kind"]:
        raise ModelMismatch(f"model {where} holds a {detector.name!r} ({detector.input_kind}) detector")
    schema = info["schema"]
    # A patch detector's grid_ is (H, W, channels it keeps): PaDiM-like detectors keep fewer channels than
    # they are given, so only the spatial grid is compared here; whether the detector accepts the schema's
    # channels is what the probe checks, generically, by scoring an input of that shape.
    grid = getattr(detector, "grid_", None)
    shape_key = COLUMN_SHAPE_KEY.get(detector.feature_column, "patch_shape")
    if grid is not None and schema.get(shape_key) and list(grid) != list(schema[shape_key]):
        raise ModelMismatch(f"model {where} was fitted on patch grid {list(grid)}, but its model.json says "
                            f"{shape_key}={schema[shape_key]}")
    if probe:
        _probe(detector, schema, where)
    return StoredModel(category, detector, info)


def _probe(detector: Detector, schema: dict, where: str) -> None:
    if detector.input_kind == "patches":
        shape, dtype = schema.get(COLUMN_SHAPE_KEY.get(detector.feature_column, "patch_shape")), np.float16
    else:
        shape, dtype = [schema.get("pooled_dim")], np.float32
    if not shape or any(not isinstance(s, int) or s <= 0 for s in shape):
        raise ModelMismatch(f"model {where}: schema has no usable {detector.input_kind} shape ({shape!r})")
    try:
        scores = np.asarray(detector.score(np.zeros((1, *shape), dtype)))
    except Exception as exc:  # noqa: BLE001
        raise ModelMismatch(f"model {where} does not accept {detector.input_kind} features of shape {shape}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    if scores.shape != (1,):
        raise ModelMismatch(f"model {where} returned {scores.shape} scores for one input")


def model_folders(storage: Storage, models_uri: str) -> list[tuple[str, str]]:
    """(category, detector) pairs that have a model folder (a model.json), manifest or not."""
    pairs = []
    for info in storage.iter_files(models_uri):
        path = info.path.replace("\\", "/")
        if path.endswith("/" + MODEL_FILE):
            parts = path.split("/")
            pairs.append((parts[-3], parts[-2]))
    return sorted(pairs)


@dataclass
class ServedModels:
    """What a models folder serves: the ok cells of its manifest (or every folder without one)."""

    pairs: list[tuple[str, str]]
    #: (category, detector) -> why the manifest does not serve it (its latest fit failed)
    refused: dict[tuple[str, str], str]
    #: (category, detector) -> the version the manifest lists (empty without a manifest)
    versions: dict[tuple[str, str], str]
    #: whether the folder has a manifest
    manifest: bool
    #: category -> the detector its ``best_on_validation`` alias stands for (a served pair)
    best: dict[str, str] = field(default_factory=dict)


def read_manifest(storage: Storage, models_uri: str) -> dict | None:
    """The manifest's entries by (category, detector), or None when the folder has none.

    A malformed manifest is a one-line :class:`ModelMismatch` (it is never guessed around).
    """
    document = _read_manifest_document(storage, models_uri)
    return None if document is None else _manifest_cells(document, join(models_uri, MANIFEST))


def _read_manifest_document(storage: Storage, models_uri: str) -> dict | None:
    uri = join(models_uri, MANIFEST)
    if not storage.exists(uri):
        return None
    raw = storage.read_bytes(uri)
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelMismatch(f"{uri} is not valid JSON ({exc}); refit, or remove it to serve every model "
                            f"folder found") from None
    entries = document.get("models") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ModelMismatch(f"{uri} has no 'models' list; refit, or remove it to serve every model folder found")
    return document


def _manifest_cells(document: dict, uri: str) -> dict[tuple[str, str], dict]:
    cells: dict[tuple[str, str], dict] = {}
    for entry in document["models"]:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) and entry.get(k)
                                                  for k in ("category", "detector", "status")):
            raise ModelMismatch(f"{uri}: entry {str(entry)[:120]!r} needs category, detector and status")
        cells[(entry["category"], entry["detector"])] = entry
    return cells


def _manifest_best(document: dict, uri: str, pairs: list[tuple[str, str]]) -> dict[str, str]:
    """The manifest's ``best_on_validation`` choices (category -> detector), each a served pair."""
    recorded = document.get(BEST_ON_VALIDATION) or {}
    if not isinstance(recorded, dict):
        raise ModelMismatch(f"{uri}: '{BEST_ON_VALIDATION}' must map categories to choices; refit")
    best = {}
    for category, choice in sorted(recorded.items()):
        detector = choice.get("detector") if isinstance(choice, dict) else None
        if not isinstance(detector, str) or (category, detector) not in pairs:
            raise ModelMismatch(f"{uri}: the {BEST_ON_VALIDATION} choice of {category!r} ({str(choice)[:80]}) is not "
                                f"a model the manifest serves; refit")
        best[category] = detector
    return best


def choose_best(entries: list[dict]) -> dict[str, dict]:
    """Per category, the ok entry with the best validation AUROC (the ``best_on_validation`` rule)."""
    by_category: dict[str, list[dict]] = {}
    for entry in entries:
        if entry.get("status") == "ok":
            by_category.setdefault(entry["category"], []).append(entry)
    chosen = {}
    for category, candidates in sorted(by_category.items()):
        best = best_candidate(candidates)
        if best is not None:
            chosen[category] = {key: best.get(key) for key in ("detector", "val_auroc", "val_ap", "version")}
    return chosen


def served_models(storage: Storage, models_uri: str) -> ServedModels:
    """The (category, detector) pairs ``score``, ``serve`` and ``export`` load (module docstring)."""
    document = _read_manifest_document(storage, models_uri)
    if document is None:
        pairs = model_folders(storage, models_uri)
        if pairs and ("no-manifest", models_uri) not in _warned:
            _warned.add(("no-manifest", models_uri))
            log.warning("%s has no %s (an older run or a hand-copied folder): serving every model folder "
                        "found (%d); a fit writes the manifest that says which are current",
                        models_uri, MANIFEST, len(pairs))
        return ServedModels(pairs, {}, {}, manifest=False)
    uri = join(models_uri, MANIFEST)
    cells = _manifest_cells(document, uri)
    pairs = sorted(cell for cell, entry in cells.items() if entry["status"] == "ok")
    refused = {cell: f"its latest fit ended with status {entry['status']!r}"
               + (f" ({' '.join(str(entry['error']).split())[:200]})" if entry.get("error") else "")
               for cell, entry in sorted(cells.items()) if entry["status"] != "ok"}
    versions = {cell: cells[cell]["version"] for cell in pairs if isinstance(cells[cell].get("version"), str)}
    return ServedModels(pairs, refused, versions, manifest=True, best=_manifest_best(document, uri, pairs))


def list_models(storage: Storage, models_uri: str) -> list[tuple[str, str]]:
    """(category, detector) pairs that are served (:func:`served_models`)."""
    return served_models(storage, models_uri).pairs


def write_manifest(storage: Storage, models_uri: str, entries: list[dict], fingerprint: str | None = None,
                   best: dict[str, dict] | None = None) -> None:
    storage.write_bytes(join(models_uri, MANIFEST), json.dumps(
        {"format": FORMAT_VERSION, "models": entries, "fingerprint": fingerprint, "written_at": time.time(),
         "local": not is_s3(models_uri), BEST_ON_VALIDATION: best or {}}, indent=2).encode())


def update_manifest(storage: Storage, models_uri: str, fitted: list[dict], fingerprint: str | None) -> list[dict]:
    """Write the manifest after a fit; return its entries.

    ``fitted``: this fit's cells (category, detector, status[, error, val_auroc, val_ap]). Each is
    listed as it ended; an ok one with the version its model.json now holds (a model that cannot be
    read is listed as an error) and its validation AUROC and AP when finite. A failed cell is listed as failed, so an older model of it left on disk is not
    served. Cells of the earlier manifest (or, without one, the model folders found) that this fit
    did not cover are kept when their model is still the one listed and was fitted on the same
    features (``fingerprint``); other earlier models are dropped from the manifest (a warning
    names them; their folders stay on disk). Then, per category, the listed ok cell with the best
    validation AUROC is recorded as its ``best_on_validation`` choice (:func:`choose_best`); an earlier
    cell kept from a manifest without validation metrics is no candidate.
    """
    now = time.time()
    entries: dict[tuple[str, str], dict] = {}
    for cell in fitted:
        key = (str(cell["category"]), str(cell["detector"]))
        entry = {"category": key[0], "detector": key[1], "status": str(cell.get("status") or "error"),
                 "fitted_at": now, "fingerprint": fingerprint}
        if entry["status"] != "ok" and cell.get("error"):
            entry["error"] = " ".join(str(cell["error"]).split())[:300]
        for metric in ("val_auroc", "val_ap"):  # what the best_on_validation choice compares
            if as_finite(cell.get(metric)) is not None:
                entry[metric] = as_finite(cell[metric])
        if entry["status"] == "ok":
            try:
                entry["version"] = read_model_info(storage, models_uri, *key)["version"]
            except UserError as exc:  # ModelMismatch included
                entry.update(status="error", error=f"model not saved or unreadable: {exc}"[:300])
        entries[key] = entry
    try:
        earlier = read_manifest(storage, models_uri)
    except ModelMismatch as exc:
        log.warning("ignoring the earlier manifest: %s", exc)
        earlier = {}
    if earlier is None:  # a folder from before manifests: its models as if listed ok
        earlier = {pair: {"category": pair[0], "detector": pair[1], "status": "ok"}
                   for pair in model_folders(storage, models_uri)}
    dropped = []
    for key, entry in sorted(earlier.items()):
        if key in entries:
            continue
        if entry.get("status") != "ok":
            entries[key] = entry  # still failed: listed, not served
            continue
        try:
            info = read_model_info(storage, models_uri, *key)
        except UserError:
            dropped.append(f"{key[0]}/{key[1]} (model missing or unreadable)")
            continue
        if entry.get("version") not in (None, info["version"]):
            dropped.append(f"{key[0]}/{key[1]} (its model was replaced since it was listed)")
        elif fingerprint is not None and info.get("fingerprint") != fingerprint:
            dropped.append(f"{key[0]}/{key[1]} (fitted on other features: {info.get('fingerprint')})")
        else:
            entries[key] = {**entry, "version": info["version"], "fingerprint": info.get("fingerprint"),
                            "fitted_at": entry.get("fitted_at", info.get("saved_at"))}
    if dropped:
        log.warning("%d earlier model(s) under %s are no longer served: %s", len(dropped), models_uri,
                    "; ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else ""))
    listed = [entries[key] for key in sorted(entries)]
    write_manifest(storage, models_uri, listed, fingerprint, choose_best(listed))
    return listed
