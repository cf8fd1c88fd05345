"""One pipeline cell fitted with its validation and test maps kept (for the development-set scripts).

:func:`fit_keeping_maps` runs :func:`mvtec_ray.fit.cell.fit_category_detector` (the pipeline's own
cell, no Ray) and hands back, beside its outcome, the maps and masks the cell chose its pixel
threshold on (validation: held-out normals + synthetic defects) and the ones it evaluated on (test,
full resolution), by wrapping the two functions the cell calls for them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CapturedFit:
    outcome: object
    val_maps: list
    val_masks: list
    test_maps: list
    test_masks: list


def fit_keeping_maps(features, category: str, detector: str, storage, threads: int = 2,
                     params: dict | None = None, rule: str | None = None) -> CapturedFit:
    from mvtec_ray.config import EvaluationConfig
    from mvtec_ray.fit import cell

    captured: dict = {}
    choose, evaluate = cell.choose_pixel_threshold, cell.evaluate_pixels

    def keep_validation(val_maps, val_masks, *args, **kwargs):
        captured["val"] = (list(val_maps), list(val_masks))
        return choose(val_maps, val_masks, *args, **kwargs)

    def keep_test(maps, masks, *args, **kwargs):
        captured["test"] = (list(maps), list(masks))
        return evaluate(maps, masks, *args, **kwargs)

    evaluation = EvaluationConfig(overlays=False, **({"pixel_threshold_rule": rule} if rule else {}))
    cell.choose_pixel_threshold, cell.evaluate_pixels = keep_validation, keep_test
    try:
        outcome = cell.fit_category_detector(features, category, detector, params or {}, evaluation, None,
                                             storage, threads)
    finally:
        cell.choose_pixel_threshold, cell.evaluate_pixels = choose, evaluate
    if outcome.row["status"] != "ok":
        raise SystemExit(f"{category}/{detector}: {outcome.row['error']}")
    val, test = captured.get("val", ([], [])), captured.get("test", ([], []))
    return CapturedFit(outcome, val[0], val[1], test[0], test[1])
