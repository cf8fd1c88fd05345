"""Label-free pixel-threshold rules against the oracle, on an extracted features folder.

    python benchmarks/pixel_rules.py --features OUT/features/<fingerprint> [--category bottle]
        [--detectors patchcore,padim] [--rules f1,normal:0.99,normal:0.995,normal:0.999]

Each patch detector is fitted once (:func:`mvtec_ray.fit.cell.fit_category_detector`, the pipeline's
own cell); its validation maps and masks (held-out normals + synthetic defects) and its test maps and
ground truths (full resolution) are kept. Every rule then chooses its pixel threshold from the
validation maps alone (:func:`mvtec_ray.evaluation.thresholds.choose_pixel_threshold`); its pixel F1 on
the test masks is printed beside the oracle F1-max (the best threshold found *with* the test masks)
and the gap between the two. Choose a rule on a development set by that gap; report test beside it.

Prints ``px_f1/<detector>/<rule>=``, ``px_f1_oracle/<detector>=`` and ``gap/<detector>/<rule>=``.
"""
from __future__ import annotations

import common  # first: the benchmarks' shared start (sys.path, Ray's environment)
from measure import emit


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--features", required=True, help="a features folder (OUT/features/<fingerprint>)")
    parser.add_argument("--category", default=None, help="default: the first category")
    parser.add_argument("--detectors", default="patchcore,padim")
    parser.add_argument("--rules", default="f1,normal:0.99,normal:0.995,normal:0.999,normal:0.9995")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from captured_fit import fit_keeping_maps

    from mvtec_ray.evaluation import thresholds
    from mvtec_ray.evaluation.pixel_metrics import pixel_f1, pixel_f1_max
    from mvtec_ray.features.store import FeatureSet
    from mvtec_ray.storage import Storage

    storage = Storage()
    features = FeatureSet.open(args.features, storage)
    category = args.category or features.categories()[0]
    rules = args.rules.split(",")
    for rule in rules:
        thresholds.parse_pixel_threshold_rule(rule)
    common.print_load()
    for detector in args.detectors.split(","):
        fit = fit_keeping_maps(features, category, detector, storage, args.threads)
        oracle = pixel_f1_max(fit.test_maps, fit.test_masks)
        emit(**{f"px_f1_oracle/{detector}": oracle}, digits=3)
        emit(**{f"image_auroc/{detector}": fit.outcome.row["image_auroc"]}, digits=3)
        emit(**{f"pixel_auroc/{detector}": fit.outcome.row["pixel_auroc"]}, digits=3)
        for rule in rules:
            chosen = thresholds.choose_pixel_threshold(fit.val_maps, fit.val_masks, 0.99, rule)
            f1 = pixel_f1(fit.test_maps, fit.test_masks, chosen.value)["pixel_f1"]
            emit(**{f"px_f1/{detector}/{rule}": f1}, digits=3)
            emit(**{f"gap/{detector}/{rule}": oracle - f1}, digits=3)


if __name__ == "__main__":
    main()
