"""Input settings (resolution, tiling, backbone) compared on a real category: chosen on validation, test beside.

    python benchmarks/dev_set.py --features NAME=OUT/features/<fp>,NAME2=... [--category bottle]
        [--detectors patchcore,padim]

Each features folder is one setting, extracted beforehand (e.g. ``mvtec-ray extract --image-size 448
--tile-size 224``). On each, every patch detector is fitted once by the pipeline's own cell
(:func:`benchmarks.captured_fit.fit_keeping_maps`) and measured twice:

* validation (what a choice may read): the held-out normals and the synthetic defects drawn on them,
  image AUROC from the cell's validation scores, pixel AUROC and PRO from the validation maps and the
  synthetic masks;
* test (reported beside, never used to choose): image AUROC, pixel AUROC, PRO and pixel F1 at the
  label-free threshold, with the oracle F1-max (tuned on the test masks) labelled as such.

Prints ``<figure>/<setting>/<detector>=`` lines (``val_image_auroc``, ``val_pixel_auroc``, ``val_pro``,
``test_image_auroc``, ``test_image_f1`` (at the validation threshold), ``test_pixel_auroc``, ``test_pro``, ``test_px_f1``, ``test_px_f1_oracle``,
``fit_s``, ``score_s``, ``patch_grid``), then ``chosen/<detector>=<setting>``: the highest mean of the
validation pixel AUROC and PRO (ties: the earlier setting, so list the cheaper first), and a markdown table.
"""
from __future__ import annotations

import common  # first: the benchmarks' shared start (sys.path, Ray's environment)
from measure import emit


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--features", required=True, help="NAME=FOLDER,... one features folder per setting")
    parser.add_argument("--category", default=None, help="default: the first category")
    parser.add_argument("--detectors", default="patchcore,padim")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from captured_fit import fit_keeping_maps

    from mvtec_ray.evaluation.pixel_metrics import evaluate_pixels, pixel_f1_max
    from mvtec_ray.evaluation.selection import validation_metrics
    from mvtec_ray.features.store import FeatureSet
    from mvtec_ray.storage import Storage

    storage = Storage()
    settings = dict(item.split("=", 1) for item in args.features.split(","))
    common.print_load()
    table, best = [], {}
    for name, folder in settings.items():
        features = FeatureSet.open(folder, storage)
        category = args.category or features.categories()[0]
        grid = features.metadata().get("patch_shape", ["?"])[0]
        for detector in args.detectors.split(","):
            fit = fit_keeping_maps(features, category, detector, storage, args.threads)
            row = fit.outcome.row
            val_image = validation_metrics(fit.outcome.scores)["val_auroc"].iloc[0]
            val_pixels = evaluate_pixels(fit.val_maps, fit.val_masks)
            figures = {"val_image_auroc": float(val_image),
                       "val_pixel_auroc": val_pixels["pixel_auroc"], "val_pro": val_pixels["pixel_pro"],
                       "test_image_auroc": row["image_auroc"], "test_image_f1": row["image_f1"],
                       "test_pixel_auroc": row["pixel_auroc"],
                       "test_pro": row["pixel_pro"], "test_px_f1": row["pixel_f1"],
                       "test_px_f1_oracle": pixel_f1_max(fit.test_maps, fit.test_masks),
                       "fit_s": row["fit_seconds"], "score_s": row.get("score_seconds", float("nan"))}
            emit(**{f"{key}/{name}/{detector}": value for key, value in figures.items()}, digits=3)
            emit(**{f"patch_grid/{name}/{detector}": grid})
            table.append({"setting": name, "detector": detector, **figures})
            merit = (figures["val_pixel_auroc"] + figures["val_pro"]) / 2
            if detector not in best or merit > best[detector][1]:
                best[detector] = (name, merit)
    for detector, (name, _) in best.items():
        emit(**{f"chosen/{detector}": name})
    columns = list(table[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for entry in table:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in entry.values()) + " |")


if __name__ == "__main__":
    main()
