"""``OUT/overlays/index.html``: the gallery of every test image's overlay (:mod:`mvtec_ray.report.overlays`).

By detector and category, defects first and by decreasing score, linked from the report; the page
is ``templates/gallery.html.j2``.
"""
from __future__ import annotations

import pandas as pd

from mvtec_ray.report.run_folder import RunFolder
from mvtec_ray.report.tables import fmt, num, str_or_empty
from mvtec_ray.report.templating import render

GALLERY = "overlays/index.html"


def write_overlay_gallery(run, test: pd.DataFrame, results: pd.DataFrame) -> str | None:
    """``OUT/overlays/index.html`` (``run``: the run folder, local or ``s3://``): every test image's overlay,
    by detector and category, defects first and by decreasing score; returns its path relative to the
    run folder (None without overlays)."""
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    files = test["overlay_file"].fillna("").astype(str)
    shown = test[(files != "") & files.map(lambda f: bool(f) and run.exists(f))]
    if shown.empty:
        return None
    res_idx = {(r["category"], r["detector"]): r for _, r in results.iterrows()}
    sections = []
    for (det, cat), group in shown.groupby(["detector", "category"], sort=True):
        r = res_idx.get((cat, det))
        summary = None
        if r is not None:
            summary = dict(threshold=fmt(r.get("pixel_threshold"), 4), rule=str_or_empty(r.get("pixel_threshold_rule")),
                           f1=fmt(r.get("pixel_f1")), f1_max=fmt(r.get("pixel_f1_max")),
                           pixel_eval=str_or_empty(r.get("pixel_eval")) or "-")
        images = []
        for _, row in group.sort_values(["label", "score"], ascending=[False, False]).iterrows():
            flagged = num(row["score"]) >= num(row["threshold"])
            images.append(dict(file=str(row["overlay_file"]).split("/", 1)[1],  # relative to overlays/
                               image_id=row["image_id"], truth="defect" if int(row["label"]) == 1 else "good",
                               score=fmt(row["score"], 4), verdict="flagged" if flagged else "passed"))
        sections.append(dict(anchor=f"{det}-{cat}", detector=det, category=cat, summary=summary, images=images))
    run.write(GALLERY, render("gallery.html.j2", sections=sections).encode("utf-8"))
    return GALLERY
