"""Fitted models ready to score images: what the batch ``score`` job and the online service share.

:func:`plan_models` checks a models folder once (one feature schema, the backbone weights the
models were fitted with, the features' real shapes, a probe of every model) and says how to
compute their features; :class:`ModelSet` holds the backbone and every model of some categories
and scores uint8 images through the one feature path (:func:`~mvtec_ray.features.backbones.embed_images`).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from mvtec_ray.config import ExtractConfig, RunConfig
from mvtec_ray.data.images import DecodeLimits
from mvtec_ray.deploy.model_files import (
    MANIFEST,
    MODEL_FILE,
    SCHEMA_KEYS,
    ServedModels,
    StoredModel,
    check_schema,
    load_model,
    read_model_info,
    served_models,
)
from mvtec_ray.errors import ModelMismatch, UserError
from mvtec_ray.evaluation.selection import BEST_ON_VALIDATION
from mvtec_ray.features.backbone_specs import BACKBONES
from mvtec_ray.features.backbones import (
    RANDOM_WEIGHTS_ID,
    FeatureExtractor,
    ResolvedWeights,
    embed_images,
    prepare_for_device,
    resolve_weights,
)
from mvtec_ray.storage import Storage, join, safe_join

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSelection:
    """Which models to load and how their features are computed: the small part of a
    :class:`ModelPlan` that every scoring actor or replica receives (the weights travel apart)."""

    models_uri: str
    pairs: list[tuple[str, str]]
    backbone: str
    patch_dim: int | None = None
    padim_channels: int | None = None
    #: the model's input size: anomaly maps are smoothed at it (as at fit time)
    input_size: int | None = None
    #: feature schema the models must match (measured on a blank image)
    expect: dict | None = None
    #: "category/detector" -> model version at planning time (a model replaced since is refused)
    versions: dict | None = None
    #: tiles of this side embedded and stitched (``extract.tile_size``); None = the whole image
    tile_size: int | None = None


@dataclass
class ModelPlan:
    """What a scorer needs: the models, their shared schema, the weights and the extraction settings."""

    models_uri: str
    pairs: list[tuple[str, str]]
    schema: dict
    weights: ResolvedWeights
    #: extraction settings of the models' features (decode limits from the caller's config)
    extract: ExtractConfig
    #: feature schema the models must match (measured on a blank image)
    expect: dict
    #: "category/detector" -> model version at planning time
    versions: dict[str, str]

    @property
    def categories(self) -> list[str]:
        return sorted({c for c, _ in self.pairs})

    @property
    def selection(self) -> ModelSelection:
        return ModelSelection(self.models_uri, self.pairs, self.schema["backbone"], self.schema.get("patch_dim"),
                              self.extract.padim_channels, self.extract.image_size, self.expect, self.versions,
                              self.extract.tile_size)

    @property
    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(self.extract.max_image_pixels, self.extract.min_image_side)


def check_models(storage: Storage, models_uri: str, pairs: list[tuple[str, str]], config: RunConfig) -> dict:
    """Refuse models that do not fit each other or what the caller asked for; return the shared schema.

    Every model must share one feature schema. Settings given explicitly in ``config.extract``
    (backbone, image_size, patch_dim) must equal the models'.
    """
    infos = {(c, d): read_model_info(storage, models_uri, c, d) for c, d in pairs}
    (c0, d0), reference = next(iter(infos.items()))
    schema = reference["schema"]
    for (c, d), info in infos.items():
        for key in SCHEMA_KEYS:
            if info["schema"].get(key) != schema.get(key):
                raise ModelMismatch(f"models under {models_uri} were fitted on different features ({c}/{d}: "
                                    f"{key}={info['schema'].get(key)!r}, {c0}/{d0}: {key}={schema.get(key)!r}); "
                                    f"score them separately")
    requested = {k: getattr(config.extract, k) for k in ("backbone", "image_size", "patch_dim")
                 if k in config.extract.model_fields_set}
    if requested:
        check_schema(reference, requested, f"{c0}/{d0}")
    return {"schema": schema, "weights": reference["weights"]}


def plan_models(config: RunConfig, storage: Storage, models_uri: str, detectors: Sequence[str] | None = None,
                categories: Sequence[str] | None = None) -> ModelPlan:
    """Check the models under ``models_uri`` (optionally only some detectors and categories).

    Refuses, in one line, an empty selection, models fitted on different features, weights that
    differ from the fit's, and any model that does not load or score a blank input of its schema.
    Models are loaded one at a time: the caller never holds them all here.

    ``best_on_validation`` among ``detectors`` stands, in each category, for the detector the
    manifest records as chosen there (:attr:`~mvtec_ray.deploy.model_files.ServedModels.best`): the
    plan holds that real (category, detector) pair, so scores name the detector that computed them.
    """
    from mvtec_ray.features.backbones import probe_feature_shapes
    served = served_models(storage, models_uri)
    pairs, refused = served.pairs, served.refused
    if not pairs:
        if refused:
            raise ModelMismatch(f"no model under {models_uri} is served: {_refusals(refused)}; fix and refit")
        raise UserError(f"no fitted models under {models_uri} (run 'mvtec-ray fit' or 'run' first)")
    wanted = list(detectors or sorted({d for _, d in pairs} | {d for _, d in refused}))
    best = _best_on_validation(served, models_uri, categories) if BEST_ON_VALIDATION in wanted else {}
    asked = {cell: why for cell, why in refused.items() if cell[1] in wanted and (not categories or cell[0] in categories)}
    pairs = [(c, d) for c, d in pairs if d in wanted or best.get(c) == d]
    if not pairs:
        if asked:
            raise ModelMismatch(f"none of the detectors {wanted} is served under {models_uri}: {_refusals(asked)}")
        raise UserError(f"none of the detectors {wanted} has a fitted model under {models_uri}")
    if categories:
        missing = sorted(set(categories) - {c for c, _ in pairs})
        if missing:
            failed = {cell: why for cell, why in asked.items() if cell[0] in missing}
            if failed:
                raise ModelMismatch(f"no model served for categories {missing}: {_refusals(failed)}")
            raise UserError(f"no model for categories {missing}; models exist for "
                            f"{', '.join(sorted({c for c, _ in pairs}))}")
        pairs = [(c, d) for c, d in pairs if c in categories]
    if detectors and categories and asked:
        # an explicit selection (export, serve --detectors --categories) names a cell that is not served
        raise ModelMismatch(f"not served under {models_uri}: {_refusals(asked)}")
    if asked:
        log.warning("not served (listed as failed in %s/%s): %s", models_uri, MANIFEST, _refusals(asked))
    if served.manifest:
        for c, d in pairs:
            if not storage.exists(join(safe_join(models_uri, f"{c}/{d}"), MODEL_FILE)):
                raise ModelMismatch(f"{MANIFEST} under {models_uri} lists model {c}/{d}, but its folder has no "
                                    f"{MODEL_FILE} (deleted or not copied); restore it or refit")
    shared = check_models(storage, models_uri, pairs, config)
    schema = shared["schema"]
    if "weights" in config.extract.model_fields_set:
        weights_arg = config.extract.weights  # e.g. the same file at another path on this machine
    elif shared["weights"] == RANDOM_WEIGHTS_ID:
        weights_arg = "random"
    else:
        kind, _, rest = str(shared["weights"]).partition(":")
        weights_arg = "imagenet" if kind == "imagenet" else rest
    weights = resolve_weights(schema["backbone"], weights_arg, storage)
    if weights.sha256 != schema["weights_sha256"]:
        raise ModelMismatch(f"backbone weights differ from the ones the models were fitted with "
                            f"(sha256 {weights.sha256[:12]} != {str(schema['weights_sha256'])[:12]})")
    padim_shape = schema.get("padim_shape")
    extract_cfg = config.extract.model_copy(update={
        "backbone": schema["backbone"], "image_size": schema["image_size"], "patch_dim": schema.get("patch_dim"),
        "resize_to": schema.get("resize_to"), "resize": schema["resize"], "tile_size": schema.get("tile_size"),
        "padim_channels": int(padim_shape[-1]) if padim_shape else 0,
        "holdout_fraction": 0.0, "synthetic_per_image": 0, "augment_copies": 0})
    # the features the scorer will compute, measured: a model.json edited to claim otherwise is refused
    expect = {"backbone": weights.backbone, "weights_sha256": weights.sha256, "image_size": extract_cfg.image_size,
              "patch_dim": extract_cfg.patch_dim, "resize_to": extract_cfg.resize_to,
              "resize": extract_cfg.resize, "tile_size": extract_cfg.tile_size,
              **probe_feature_shapes(extract_cfg, weights)}
    versions = {}
    for c, d in pairs:
        version = load_model(storage, models_uri, c, d, expect=expect, probe=True).version
        listed = served.versions.get((c, d))
        if listed is not None and version != listed:
            raise ModelMismatch(f"model {c}/{d} on disk is version {version}, but {MANIFEST} lists {listed} (replaced "
                                f"after the latest fit: a fit still running, or a copied folder); refit or restore it")
        versions[f"{c}/{d}"] = version
    return ModelPlan(models_uri, pairs, schema, weights, extract_cfg, expect, versions)


def _best_on_validation(served: ServedModels, models_uri: str, categories: Sequence[str] | None) -> dict[str, str]:
    """category -> the detector ``best_on_validation`` stands for; refuses a folder (or asked-for
    categories) with no recorded choice."""
    if not served.best:
        raise UserError(f"{models_uri} records no {BEST_ON_VALIDATION} choice (its {MANIFEST} is from a fit "
                        f"before the choice was recorded, or no category had a detector with a validation AUROC); "
                        f"refit, or name the detectors")
    with_models = {c for c, _ in served.pairs}
    without = sorted((set(categories or with_models) & with_models) - set(served.best))
    if categories and without:
        raise UserError(f"no {BEST_ON_VALIDATION} choice recorded for categories {without} under {models_uri} "
                        f"(no detector there had a validation AUROC); name the detectors")
    if without:
        log.warning("%s: no %s choice for categories %s (no detector there had a validation AUROC); their images "
                    "get no %s score", models_uri, BEST_ON_VALIDATION, without, BEST_ON_VALIDATION)
    log.info("%s: %s", BEST_ON_VALIDATION, ", ".join(f"{c} -> {d}" for c, d in sorted(served.best.items())))
    return served.best


def _refusals(refused: dict[tuple[str, str], str], most: int = 5) -> str:
    items = [f"{c}/{d}: {why}" for (c, d), why in sorted(refused.items())]
    return "; ".join(items[:most]) + (f" (and {len(items) - most} more)" if len(items) > most else "")


class Scored(NamedTuple):
    model: StoredModel
    score: float
    #: anomaly map (map_size x map_size, float16) of a patch detector when maps were asked for
    map: np.ndarray | None


class ModelSet:
    """The backbone and every model of some categories, loaded once (per actor or replica)."""

    def __init__(self, selection: ModelSelection, storage: Storage, weights: dict | None, device: str = "cpu"):
        spec = BACKBONES[selection.backbone]
        self.extractor = prepare_for_device(
            FeatureExtractor(spec, weights, selection.patch_dim, selection.padim_channels, selection.tile_size),
            device)
        self.input_size = selection.input_size
        self.models: dict[str, list[StoredModel]] = {}
        versions = selection.versions or {}
        for category, name in selection.pairs:
            model = load_model(storage, selection.models_uri, category, name, expect=selection.expect)
            if versions.get(f"{category}/{name}") not in (None, model.version):
                raise ModelMismatch(f"model {category}/{name} was replaced while the scorer started; start again")
            self.models.setdefault(category, []).append(model)

    @classmethod
    def from_plan(cls, plan: ModelPlan, storage: Storage, device: str = "cpu") -> ModelSet:
        return cls(plan.selection, storage, plan.weights.state_dict, device)

    def score(self, images: np.ndarray, categories: Sequence[str], map_size: int | None = None,
              detectors: Sequence[Sequence[str] | None] | None = None) -> list[list[Scored]]:
        """Score uint8 NHWC images, each with the models of its category (or only ``detectors[i]``).

        One backbone pass for the batch and one detector call per (category, model), not per image.
        Patch detectors also give maps at ``map_size`` when it is set.
        """
        results: list[list[Scored]] = [[] for _ in range(len(images))]
        if not len(images):
            return results
        categories = np.asarray(categories).astype(str)
        columns = {m.detector.feature_column for c in np.unique(categories) for m in self.models[c]}
        features = dict(zip(("pooled", "patches", "padim"),
                            embed_images(self.extractor, images, "patches" in columns, "padim" in columns)))
        for category in np.unique(categories):
            rows = np.flatnonzero(categories == category)
            for model in self.models[category]:
                mine = rows if detectors is None else np.asarray(
                    [r for r in rows if detectors[r] is None or model.detector.name in detectors[r]], dtype=int)
                if not len(mine):
                    continue
                scores, maps = self._score(model, features, mine, map_size)
                for j, r in enumerate(mine):
                    results[r].append(Scored(model, float(scores[j]), None if maps is None else maps[j]))
        return results

    def _score(self, model: StoredModel, features: dict, index, map_size: int | None):
        detector = model.detector
        X = features[detector.feature_column][index]
        if detector.input_kind != "patches" or map_size is None:
            return detector.score(X), None
        size = (map_size, map_size)
        if hasattr(detector, "score_with_maps"):
            scores, maps = detector.score_with_maps(X, size, self.input_size)
        else:
            scores, maps = detector.score(X), detector.anomaly_maps(X, size)
        return scores, maps.astype(np.float16)
