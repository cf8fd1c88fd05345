"""The report's matplotlib figures: score histograms, ROC curves and the examples grid.

Each figure is drawn on a :class:`~matplotlib.figure.Figure` with the Agg canvas directly, never
pyplot: no global figure registry (nothing to leak or close), no interactive backend, safe inside
Ray workers. :class:`Figures` saves each one as ``OUT/figures/<name>.png`` and hands back its
base64 data URI for the page.
"""
from __future__ import annotations

import base64
import io
import math
import re
import textwrap
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mvtec_ray.evaluation.maps import resize_map
from mvtec_ray.report.run_folder import THUMB, RunFolder, load_map, load_mask, load_rgb
from mvtec_ray.report.tables import err_text, fmt, is_error, num, short, str_or_empty

DPI = 90


class Figures:
    """Saves each figure to ``OUT/figures`` and keeps its base64 for the page."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run
        self.used: set[str] = set()
        self.count = 0

    def _name(self, stem: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "figure"
        name, i = base, 1
        while name in self.used:  # two categories sanitising to the same name
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name + ".png"

    def save(self, fig: Figure, stem: str) -> tuple[str, str]:
        """Returns (file name, data URI)."""
        FigureCanvasAgg(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
        data = buf.getvalue()
        name = self._name(stem)
        self.run.write(f"figures/{name}", data)
        self.count += 1
        return name, "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(FPR, TPR) from (0, 0), one point per distinct finite score; None without both classes."""
    ok = np.isfinite(scores)
    labels, scores = labels[ok].astype(bool), scores[ok]
    if labels.all() or not labels.any():
        return None
    from sklearn.metrics import roc_curve  # here, not at the top: the tables stay light
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return fpr, tpr


def pair_threshold(results_row: pd.Series | None, sc: pd.DataFrame) -> float:
    """The image threshold of one (category, detector): from its scores, else from its results row."""
    if "threshold" in sc and sc["threshold"].notna().any():
        return float(sc["threshold"].dropna().iloc[0])
    return num(results_row.get("threshold")) if results_row is not None else math.nan


def _fixed_grid(rows: int, cols: int, cell_w: float, cell_h: float, *, left: float, right: float,
                top: float, bottom: float, gap_w: float, gap_h: float) -> tuple[Figure, np.ndarray]:
    """Figure with margins and gaps in inches: constrained/tight layout cost more than the drawing."""
    width = left + right + cols * cell_w + (cols - 1) * gap_w
    height = top + bottom + rows * cell_h + (rows - 1) * gap_h
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=dict(
        left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
        wspace=gap_w / cell_w, hspace=gap_h / cell_h))
    return fig, axes


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(n, max_cols))
    return math.ceil(max(n, 1) / cols), cols


def histogram_figure(cat: str, detectors: list[str], test: pd.DataFrame,
                     res_idx: dict[tuple[str, str], pd.Series]) -> Figure:
    """One panel per detector: the test scores of good and defect images, the threshold dashed."""
    rows, cols = _grid(len(detectors), 5)
    fig, axes = _fixed_grid(rows, cols, 2.45, 1.6, left=0.35, right=0.1, top=0.55, bottom=0.45,
                            gap_w=0.4, gap_h=0.75)
    axes = axes.ravel()
    for ax in axes[len(detectors):]:
        ax.set_visible(False)
    legend_done = False
    for ax, det in zip(axes, detectors):
        r = res_idx.get((cat, det))
        sc = test[test["detector"] == det]
        ax.tick_params(labelsize=7)
        if r is not None and is_error(r):
            ax.set_title(f"{det}: ERROR", fontsize=8, color="#b00020")
            ax.text(0.5, 0.5, textwrap.fill(err_text(r, 160) or "error", 42), ha="center", va="center",
                    fontsize=6, transform=ax.transAxes)
            ax.set_xticks([]), ax.set_yticks([])
            continue
        s = sc["score"].to_numpy(dtype=float)
        y = sc["label"].to_numpy(dtype=int)
        fin = np.isfinite(s)
        if not fin.any():
            ax.set_title(det, fontsize=8)
            ax.text(0.5, 0.5, "no test scores", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            continue
        thr = pair_threshold(r, sc)
        rng = s[fin]
        if math.isfinite(thr):
            rng = np.r_[rng, thr]
        lo, hi = float(rng.min()), float(rng.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
        # stairs draws one polygon per class; hist draws one patch per bar (slow at this scale)
        for cls, colour, name in ((0, "#2e7d32", "good"), (1, "#c62828", "defect")):
            counts, _ = np.histogram(s[fin & (y == cls)], bins=bins)
            ax.stairs(counts, bins, fill=True, color=colour, alpha=0.55, label=name)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(4, integer=True))
        if math.isfinite(thr):
            ax.axvline(thr, color="black", linestyle="--", linewidth=1.2, label="threshold")
        auroc = num(r.get("image_auroc")) if r is not None else math.nan
        ax.set_title(f"{det}  AUROC {fmt(auroc)}", fontsize=8)
        ax.set_xlabel("score (higher = more anomalous)", fontsize=7)
        if not legend_done:
            ax.legend(fontsize=6, frameon=False)
            legend_done = True
    fig.suptitle(f"{cat}: test score histograms", fontsize=10)
    return fig


def roc_figure(categories: list[str], detectors: list[str], test: pd.DataFrame,
               res_idx: dict[tuple[str, str], pd.Series]) -> Figure:
    """One panel per category, one curve per detector, on the test split."""
    rows, cols = _grid(len(categories), 5)
    n_leg_rows = math.ceil(len(detectors) / 8)
    fig, axes = _fixed_grid(rows, cols, 2.0, 2.0, left=0.5, right=0.1, top=0.55,
                            bottom=0.5 + 0.2 * n_leg_rows, gap_w=0.45, gap_h=0.6)
    axes = axes.ravel()
    for ax in axes[len(categories):]:
        ax.set_visible(False)
    palette = [f"C{i % 10}" for i in range(len(detectors))]
    styles = ["-", "--", ":", "-."]
    handles: dict[str, Any] = {}
    by_pair = {k: g for k, g in test.groupby(["category", "detector"], sort=False)}
    for ax, cat in zip(axes, categories):
        ax.plot([0, 1], [0, 1], color="#bbbbbb", linewidth=0.8)
        for i, det in enumerate(detectors):
            g = by_pair.get((cat, det))
            if g is None:
                continue
            pts = roc_points(g["label"].to_numpy(dtype=int), g["score"].to_numpy(dtype=float))
            if pts is None:
                continue
            (line,) = ax.plot(pts[0], pts[1], color=palette[i], linestyle=styles[(i // 10) % 4],
                              linewidth=1.1, drawstyle="default")
            handles.setdefault(det, line)
        ax.set_title(cat, fontsize=8)
        ax.set_xlim(-0.01, 1), ax.set_ylim(0, 1.02)  # curves at AUROC 1 stay visible on the frame
        ax.set_xticks([0, 0.5, 1]), ax.set_yticks([0, 0.5, 1])
        ax.set_xlabel("false positive rate", fontsize=6, labelpad=1)
        ax.set_ylabel("true positive rate", fontsize=6, labelpad=1)
        ax.tick_params(labelsize=6)
        ax.set_aspect("equal")
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
                   ncol=min(len(handles), 8), fontsize=7, frameon=False)
    fig.suptitle("ROC curves (test split)", fontsize=10)
    return fig


def pick_examples(test_det: pd.DataFrame, k: int) -> pd.DataFrame:
    """Most anomalous defects and the highest-scoring good images (the likely false alarms)."""
    if k <= 0 or test_det.empty:
        return test_det.iloc[:0]
    ranked = test_det.assign(_s=test_det["score"].astype(float).fillna(-np.inf)).sort_values(
        ["_s", "image_id"], ascending=[False, True], kind="stable")
    defects, goods = ranked[ranked["label"] == 1], ranked[ranked["label"] == 0]
    n_def = min(len(defects), math.ceil(k / 2))
    n_good = min(len(goods), k - n_def)
    n_def = min(len(defects), k - n_good)  # fill from defects when goods run short
    return pd.concat([defects.head(n_def), goods.head(n_good)]).drop(columns="_s")


def reference_detector(cat: str, detectors: list[str], test: pd.DataFrame,
                       res_idx: dict[tuple[str, str], pd.Series]) -> str | None:
    """Best image AUROC among detectors with maps, else among all: its maps and ranking drive the examples."""
    scored = set(test["detector"].astype(str))
    with_maps = set(test.loc[test["map_file"].fillna("").astype(str) != "", "detector"].astype(str))

    def auroc(det: str) -> float:
        r = res_idx.get((cat, det))
        v = num(r.get("image_auroc")) if r is not None and not is_error(r) else math.nan
        return v if math.isfinite(v) else -1.0

    for pool in (with_maps, scored):
        cands = [d for d in detectors if d in pool]
        if cands:
            return max(cands, key=lambda d: (auroc(d), d))
    return None


def _fit_tile(arr: np.ndarray) -> np.ndarray:
    """Scale an (h, w, 3) uint8 array to fit, centred on a white THUMB x THUMB tile."""
    tile = np.full((THUMB, THUMB, 3), 255, np.uint8)
    h, w = arr.shape[:2]
    if max(h, w) != THUMB:
        from PIL import Image
        f = THUMB / max(h, w)
        size = (max(1, round(w * f)), max(1, round(h * f)))
        # nearest when enlarging keeps small masks/maps crisp
        arr = np.asarray(Image.fromarray(arr).resize(
            size, Image.Resampling.BILINEAR if f < 1 else Image.Resampling.NEAREST))
    h, w = arr.shape[:2]
    y0, x0 = (THUMB - h) // 2, (THUMB - w) // 2
    tile[y0:y0 + h, x0:x0 + w] = arr
    return tile


def examples_figure(cat: str, det: str, picked: pd.DataFrame, run: RunFolder, thr: float) -> Figure:
    """Rows of image / mask / map-overlay tiles, composed in numpy and drawn in ONE axes:
    a dozen small axes per category would cost more than everything else in the report."""
    from matplotlib import colormaps
    jet = colormaps["jet"]
    has_maps = picked["map_file"].fillna("").astype(str).ne("").any()
    titles = ["image", "ground-truth mask"] + ([f"{det} anomaly map"] if has_maps else [])
    n, cols = len(picked), len(titles)
    pad, band, head = 8, 22, 30  # px: gap, per-row title band, figure header
    width = cols * THUMB + (cols + 1) * pad
    height = head + n * (band + THUMB) + pad
    canvas = np.full((height, width, 3), 255, np.uint8)
    texts: list[tuple[float, float, str, dict[str, Any]]] = []

    maps = [load_map(run, str_or_empty(r.get("map_file"))) if has_maps else None
            for _, r in picked.iterrows()]
    # one colour range for all maps of the figure so overlays compare across rows
    vals = np.concatenate([m[np.isfinite(m)].ravel() for m in maps if m is not None] or [np.zeros(0)])
    vmin, vmax = (np.percentile(vals, [1, 99.5]) if vals.size else (0.0, 1.0))
    if vmax <= vmin:
        vmax = vmin + 1e-6

    def colour(m: np.ndarray) -> np.ndarray:
        norm = np.clip((np.nan_to_num(m, nan=vmin) - vmin) / (vmax - vmin), 0.0, 1.0)
        return (jet(norm)[..., :3] * 255).astype(np.float32)

    def place(row: int, col: int, tile: np.ndarray | None, placeholder: str = "") -> None:
        y0, x0 = head + row * (band + THUMB) + band, pad + col * (THUMB + pad)
        if tile is None:
            canvas[y0:y0 + THUMB, x0:x0 + THUMB] = 236
            texts.append((x0 + THUMB / 2, y0 + THUMB / 2, placeholder,
                          dict(ha="center", va="center", fontsize=7, color="#444444")))
        else:
            canvas[y0:y0 + THUMB, x0:x0 + THUMB] = tile

    for col, title in enumerate(titles):
        texts.append((pad + col * (THUMB + pad) + THUMB / 2, head - 6, title,
                      dict(ha="center", va="bottom", fontsize=8, weight="bold")))
    for i, ((_, r), m) in enumerate(zip(picked.iterrows(), maps)):
        path = str_or_empty(r.get("input_uri"))
        img = load_rgb(run.source(path))
        label = int(r["label"])
        truth = "defect" if label == 1 else "good"
        dtype = str_or_empty(r.get("defect_type")) or truth
        score = num(r.get("score"))
        t = num(r.get("threshold")) if math.isfinite(num(r.get("threshold"))) else thr
        flagged = math.isfinite(score) and math.isfinite(t) and score >= t
        correct = flagged == (label == 1)

        place(i, 0, _fit_tile(img) if img is not None else None,
              "image not readable here\n" + short(path, 30))
        shape = img.shape[:2] if img is not None else (m.shape if m is not None else None)
        mask = load_mask(run.source(str_or_empty(r.get("mask_file"))), shape)
        place(i, 1, _fit_tile(np.repeat((mask[..., None] * 255).astype(np.uint8), 3, axis=2))
              if mask is not None else None, "no mask" if label == 0 else "mask not readable")
        if has_maps:
            if m is None:
                place(i, 2, None, "no map")
            elif img is not None:
                blend = 0.55 * img.astype(np.float32) + 0.45 * colour(resize_map(m, img.shape[:2]))
                place(i, 2, _fit_tile(blend.astype(np.uint8)))
            else:
                place(i, 2, _fit_tile(colour(m).astype(np.uint8)))

        verdict = ("flagged" if flagged else "passed") + (" ✓" if correct else " ✗")
        what = truth if dtype == truth else f"{truth}: {short(dtype, 18)}"
        texts.append((pad, head + i * (band + THUMB) + band - 5,
                      f"#{i + 1} {what}  |  {det} {fmt(score)} {'≥' if flagged else '<'} thr {fmt(t)} ({verdict})",
                      dict(ha="left", va="bottom", fontsize=8, color="#1b5e20" if correct else "#b00020")))

    fig = Figure(figsize=(width / DPI, height / DPI))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest", extent=(0, width, height, 0))
    ax.set_axis_off()
    for x, y, text, kw in texts:
        ax.text(x, y, text, **kw)
    return fig
