"""Self-contained HTML report of a run's output folder.

``write_report(OUT)`` reads ``OUT/results.parquet``, ``OUT/scores.parquet`` and
``OUT/config.yaml`` and writes ``OUT/report.html`` (every figure embedded as a
base64 PNG, no external CSS/JS/fonts, so it opens offline) plus the same
figures as ``OUT/figures/*.png``. ``OUT`` is a local folder or an ``s3://`` prefix
(read and written through :class:`~mvtec_ray.storage.Storage`).

This module gathers what the page shows; the markup is ``templates/report.html.j2`` and its style
``templates/report.css`` (Jinja2, autoescaped). The tables as text are :mod:`mvtec_ray.report.tables`,
the figures :mod:`mvtec_ray.report.figures`, the run folder :mod:`mvtec_ray.report.run_folder` and
the overlay gallery :mod:`mvtec_ray.report.gallery`.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pandas as pd

from mvtec_ray.evaluation.selection import BEST_ON_VALIDATION
from mvtec_ray.report.figures import (
    Figures,
    examples_figure,
    histogram_figure,
    pair_threshold,
    pick_examples,
    reference_detector,
    roc_figure,
)
from mvtec_ray.report.gallery import write_overlay_gallery
from mvtec_ray.report.run_folder import RunFolder, read_parquet
from mvtec_ray.report.tables import (
    COUNTS,
    MEAN,
    METRICS,
    ORACLE_LABEL,
    detector_label,
    err_text,
    fmt,
    fmt_int,
    is_error,
    metric_text,
    num,
    short,
    sorted_results,
    str_or_empty,
    tuning_rows,
)
from mvtec_ray.report.templating import render, stylesheet
from mvtec_ray.storage import Storage, is_s3, join

__all__ = ["write_report"]

#: how pixel metrics are computed; shown in the report and stated in the README
PIXEL_PROTOCOL = (
    "Pixel metrics (AUROC, PRO up to 30% FPR, F1) pool every pixel of every test image. With pixel "
    "evaluation \"full\" (the default, the MVTec AD protocol) each anomaly map is upsampled (bilinear) to its "
    "ground-truth mask's own resolution, read from the mask file; with the centre-crop preprocessing "
    "(extract.resize_to) the mask is cropped to the region the model saw. \"128px\" (or another size) means "
    "maps and masks were both reduced to that square (faster; thin defects can vanish). Maps are smoothed "
    "at the model's input resolution (Gaussian, sigma 4 px at 224 px, as PatchCore and anomalib), so they "
    "do not depend on the evaluation size. The pixel threshold behind \"Pixel F1\" and the predicted masks is "
    "chosen on validation maps only (held-out normals and synthetic defects with their masks), never on "
    "test masks; the pixel F1-max beside it is an ORACLE tuned on the test masks.")

_SCORE_COLS = ["category", "detector", "split", "image_id", "input_uri", "label", "defect_type", "score",
               "threshold", "map_file", "mask_file", "pred_mask_file", "overlay_file"]


def _categories(results: pd.DataFrame, scores: pd.DataFrame) -> list[str]:
    cats = set(results["category"].astype(str)) | set(scores.get("category", pd.Series(dtype=str)).astype(str))
    cats.discard(MEAN)
    return sorted(cats)


def _detectors(results: pd.DataFrame, scores: pd.DataFrame) -> list[str]:
    return sorted(set(results["detector"].astype(str)) | set(scores.get("detector", pd.Series(dtype=str)).astype(str)))


def _fitted(detectors: list[str]) -> list[str]:
    """The detectors with scores of their own: the figures' (``best_on_validation`` repeats a chosen
    one's, so it is a column of the tables only)."""
    return [d for d in detectors if d != BEST_ON_VALIDATION]


def _auroc_colour(v: float) -> str:
    """Red at <= 0.5 through yellow to green at 1.0."""
    if not math.isfinite(v):
        return "#eeeeee"
    t = min(max((v - 0.5) / 0.5, 0.0), 1.0)
    return f"hsl({120 * t:.0f},70%,72%)"


def _unique_text(results: pd.DataFrame, col: str) -> list[str]:
    if col not in results:
        return []
    vals = results.loc[results["category"].astype(str) != MEAN, col]
    vals = [str_or_empty(v) for v in vals]
    return sorted({v for v in vals if v}) or sorted({str_or_empty(v) for v in results[col]} - {""})


# ---------------------------------------------------------------------------
# what each part of the page shows (the markup is in templates/report.html.j2)
# ---------------------------------------------------------------------------
def _header(results: pd.DataFrame, categories: list[str], detectors: list[str]) -> dict[str, Any]:
    weights = _unique_text(results, "weights")
    per_cat = results[(results["category"].astype(str) != MEAN) & (results["detector"] != BEST_ON_VALIDATION)]
    first = per_cat.groupby("category").max(numeric_only=True) if not per_cat.empty else per_cat

    def total(col: str) -> str:
        return fmt_int(first[col].sum()) if col in first and first[col].notna().any() else "-"

    n_err = int((per_cat.get("status", pd.Series(dtype=str)).astype(str).str.lower() == "error").sum())
    meta = [
        ("backbone", ", ".join(_unique_text(results, "backbone")) or "-"),
        ("weights", ", ".join(weights) or "-"),
        ("categories", f"{len(categories)}: " + ", ".join(categories)),
        ("detectors", f"{len(detectors)}: " + ", ".join(detectors)),
        ("runs (category × detector)", f"{len(per_cat)} ({len(per_cat) - n_err} ok, {n_err} error)"),
        ("images", f"train {total('n_train')}, val good {total('n_val_good')}, "
                   f"val synthetic {total('n_val_synthetic')}, test good {total('n_test_good')}, "
                   f"test defect {total('n_test_defect')}"),
        ("threshold rule", "; ".join(_unique_text(results, "threshold_rule")) or "-"),
    ]
    return dict(random_weights=any("random" in w.lower() for w in weights), meta=meta, oracle_label=ORACLE_LABEL)


def _pivot(results: pd.DataFrame, metric: str, title: str, detectors: list[str],
           categories: list[str]) -> dict[str, Any]:
    """A category x detector table of one metric, coloured like the AUROC."""
    idx = {(str(r["category"]), str(r["detector"])): r for _, r in results.iterrows()}
    rows = []
    for cat in categories + [MEAN]:
        if not any((cat, d) in idx for d in detectors):
            continue
        cells = []
        for det in detectors:
            r = idx.get((cat, det))
            if r is None:
                cells.append(dict(kind="missing"))
            elif is_error(r):
                cells.append(dict(kind="error", title=err_text(r)))
            else:
                v = num(r.get(metric))
                cells.append(dict(kind="value", colour=_auroc_colour(v), text=fmt(v)))
        rows.append(dict(category=cat, mean=cat == MEAN, cells=cells))
    return dict(title=title, detectors=detectors, rows=rows)


def _tuning(results: pd.DataFrame, run: RunFolder) -> dict[str, Any] | None:
    """Default vs tuned setting per detector, and the chosen setting per category when search.parquet exists."""
    rows = tuning_rows(results)
    if not rows:
        return None
    chosen_rows = None
    search_bytes = run.read("search.parquet")
    if search_bytes:
        search = pd.read_parquet(io.BytesIO(search_bytes))
        chosen = search[search["chosen"]]
        default = search[search["trial"] == 0].set_index(["category", "detector"])["val_auroc"]
        trials = search.groupby(["category", "detector"]).size()
        chosen_rows = [dict(category=r.category, detector=r.detector, params=r.params,
                            default=fmt(default.get((r.category, r.detector), math.nan)), chosen=fmt(r.val_auroc),
                            trials=int(trials.get((r.category, r.detector), 0)))
                       for r in chosen.itertuples()]
    return dict(rows=[dict(detector=d, default=fmt(a), tuned=fmt(b), change=fmt(b - a), changed=f"{c}/{n}")
                      for d, a, b, c, n in rows],
                chosen=chosen_rows)


def _metrics_table(results: pd.DataFrame) -> dict[str, Any]:
    """Every metric of every (category, detector), mean rows last per detector."""
    extra = [c for c in ("backbone", "weights", "threshold_rule")
             if c in results and results[c].astype(str).nunique() > 1]  # constant ones are in the header
    counts = [c for c in COUNTS if c in results]
    head = ["category", "detector", "status"] + extra + [long for _, _, long in METRICS] + counts
    rows = []
    for _, r in sorted_results(results).iterrows():
        row = dict(category=r["category"], detector=detector_label(r), mean=str(r["category"]) == MEAN,
                   extra=[str_or_empty(r.get(c)) for c in extra], error=None)
        if is_error(r):
            row["error"] = err_text(r, 300)
        else:
            row["status"] = str_or_empty(r.get("status")) or "ok"
            row["cells"] = [dict(text=metric_text(r, col, 1 if col == "fit_seconds" else 3),
                                  colour=_auroc_colour(num(r.get(col))) if col == "image_auroc" else None)
                             for col, _, _ in METRICS]
            row["counts"] = [fmt_int(r.get(c)) for c in counts]
        rows.append(row)
    return dict(head=head, rows=rows, span=len(METRICS) + len(counts))


def _example_scores(picked: pd.DataFrame, test: pd.DataFrame, detectors: list[str],
                    thresholds: dict[str, float], run: RunFolder) -> dict[str, Any]:
    """Each example's score under every detector, green where the detector's decision is right."""
    sub = test[test["image_id"].isin(picked["image_id"])]
    by = {(str(r["image_id"]), str(r["detector"])): num(r["score"]) for _, r in sub.iterrows()}
    dets = [d for d in detectors if any((str(i), d) in by for i in picked["image_id"])]
    rows = []
    for n, (_, r) in enumerate(picked.iterrows(), 1):
        label = int(r["label"])
        cells: list[dict[str, str] | None] = []
        for d in dets:
            s, t = by.get((str(r["image_id"]), d), math.nan), thresholds.get(d, math.nan)
            if not math.isfinite(s):
                cells.append(None)
                continue
            flagged = math.isfinite(t) and s >= t
            cells.append(dict(cls="hit" if flagged == (label == 1) else "miss",
                              title="flagged" if flagged else "passed", text=fmt(s)))
        path = str_or_empty(r.get("input_uri"))
        rows.append(dict(n=n, image_id=r["image_id"], truth="defect" if label == 1 else "good",
                         defect_type=str_or_empty(r.get("defect_type")), path=path, short_path=short(path, 48),
                         readable=run.source(path) is not None, cells=cells))
    return dict(detectors=[dict(name=d, threshold=fmt(thresholds.get(d))) for d in dets], rows=rows)


def _figure(figs: Figures, fig, stem: str, alt: str) -> dict[str, str]:
    name, uri = figs.save(fig, stem)
    return dict(name=name, uri=uri, alt=alt)


def write_report(out_dir, max_examples: int = 4, storage: Storage | None = None) -> Path | str:
    """Write ``OUT/report.html`` and ``OUT/figures/*.png``; returns the HTML path (a URI for S3)."""
    run = RunFolder(out_dir, storage)
    results_bytes = run.read("results.parquet")
    if results_bytes is None:
        raise FileNotFoundError(f"{join(run.uri, 'results.parquet')} not found: is {run.uri} a run output folder?")
    results = pd.read_parquet(io.BytesIO(results_bytes))
    results["category"] = results["category"].astype(str)
    results["detector"] = results["detector"].astype(str)
    scores = read_parquet(run, "scores.parquet", _SCORE_COLS)
    if "input_uri" not in scores and "path" in scores:  # runs written before the column was renamed
        scores = scores.rename(columns={"path": "input_uri"})
    for col in _SCORE_COLS:
        if col not in scores:
            scores[col] = None
    scores["category"] = scores["category"].astype(str)
    scores["detector"] = scores["detector"].astype(str)
    scores["map_file"] = scores["map_file"].fillna("").astype(str)
    test = scores[scores["split"].astype(str) == "test"].copy()
    test["label"] = pd.to_numeric(test["label"], errors="coerce").fillna(0).astype(int)
    test["score"] = pd.to_numeric(test["score"], errors="coerce").astype(float)

    categories = _categories(results, scores)
    detectors = _detectors(results, scores)
    fitted = _fitted(detectors)
    res_idx = {(r["category"], r["detector"]): r for _, r in results.iterrows()}
    figs = Figures(run)
    test_by_cat = {c: g for c, g in test.groupby("category", sort=False)}
    empty = test.iloc[:0]

    pivots = [_pivot(results, "image_auroc", "Image AUROC (colour: red ≤ 0.5 → green = 1.0)", detectors, categories)]
    if "pixel_auroc" in results and pd.to_numeric(results["pixel_auroc"], errors="coerce").notna().any():
        pivots.append(_pivot(results, "pixel_auroc", "Pixel AUROC (detectors with anomaly maps)",
                             detectors, categories))
    if "val_auroc" in results and pd.to_numeric(results["val_auroc"], errors="coerce").notna().any():
        pivots.append(_pivot(results, "val_auroc", f"Validation AUROC (held-out normals vs synthetic defects; "
                                                   f"{BEST_ON_VALIDATION} takes the highest)", detectors, categories))
    tuning = _tuning(results, run)
    show_protocol = "pixel_eval" in results and results["pixel_eval"].notna().any()
    gallery = write_overlay_gallery(run, test, results) if "overlay_file" in test else None
    roc = (_figure(figs, roc_figure(categories, fitted, test, res_idx), "roc_curves", "ROC curves per category")
           if not test.empty else None)

    sections = []
    for i, cat in enumerate(categories):
        ct = test_by_cat.get(cat, empty)
        section: dict[str, Any] = dict(index=i, category=cat, examples=None)
        section["histograms"] = _figure(figs, histogram_figure(cat, fitted, ct, res_idx), f"{cat}_histograms",
                                        f"{cat} score histograms")
        sections.append(section)
        ref = reference_detector(cat, fitted, ct, res_idx) if not ct.empty else None
        if ref is None or max_examples <= 0:
            continue
        picked = pick_examples(ct[ct["detector"] == ref], max_examples)
        if picked.empty:
            continue
        thresholds = {d: pair_threshold(res_idx.get((cat, d)), g) for d, g in ct.groupby("detector")}
        figure = _figure(figs, examples_figure(cat, ref, picked, run, thresholds.get(ref, math.nan)),
                         f"{cat}_examples", f"{cat} example images")
        section["examples"] = dict(reference=ref, figure=figure,
                                   **_example_scores(picked, ct, fitted, thresholds, run))

    cfg = run.read("config.yaml")
    page = render("report.html.j2", css=stylesheet("report.css"), run_name=run.name,
                  **_header(results, categories, fitted), pivots=pivots, tuning=tuning,
                  metrics=_metrics_table(results), pixel_protocol=PIXEL_PROTOCOL if show_protocol else None,
                  gallery=gallery, roc=roc, sections=sections,
                  config_text=cfg.decode(errors="replace") if cfg is not None else "(config.yaml not found)")
    target = run.write("report.html", page.encode("utf-8"))
    return target if is_s3(target) else Path(target)
