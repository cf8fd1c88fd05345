"""Self-contained HTML report of a run's output folder.

``write_report(OUT)`` reads ``OUT/results.parquet``, ``OUT/scores.parquet`` and
``OUT/config.yaml`` and writes ``OUT/report.html`` (every figure embedded as a
base64 PNG, no external CSS/JS/fonts, so it opens offline) plus the same
figures as ``OUT/figures/*.png``. ``OUT`` is a local folder or an ``s3://`` prefix
(read and written through :class:`~mvtec_ray.storage.Storage`).

``format_results_table`` / ``results_markdown`` render the results for a
terminal or a GitHub comment.
"""
from __future__ import annotations

import base64
import html
import io
import math
import re
import textwrap
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

# Figure + the Agg canvas directly, never pyplot: no global figure registry
# (nothing to leak or close), no interactive backend, safe inside Ray workers.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mvtec_ray.errors import StorageError, StorageUnavailable
from mvtec_ray.storage import Storage, is_s3, join, safe_join

__all__ = ["write_report", "format_results_table", "results_markdown", "format_tuning_table"]

DPI = 90
MEAN = "mean"
ORACLE_LABEL = "F1-max (oracle, tuned on test labels)"
PIXEL_ORACLE_LABEL = "Pixel F1-max (oracle, tuned on test masks)"
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
THUMB = 192  # px, longest side of example thumbnails

# (column, short terminal header, long HTML header)
_METRICS: list[tuple[str, str, str]] = [
    ("image_auroc", "img_auroc", "Image AUROC"),
    ("image_ap", "img_ap", "Image AP"),
    ("image_f1", "f1", "F1 @ threshold"),
    ("image_precision", "prec", "Precision @ threshold"),
    ("image_recall", "recall", "Recall @ threshold"),
    ("threshold", "thr", "Threshold"),
    ("image_f1_max", "f1_max*", ORACLE_LABEL),
    ("pixel_eval", "px_eval", "Pixel evaluation"),
    ("pixel_auroc", "px_auroc", "Pixel AUROC"),
    ("pixel_pro", "px_pro", "Pixel PRO"),
    ("pixel_f1", "px_f1", "Pixel F1 @ validation threshold"),
    ("pixel_f1_max", "px_f1max*", PIXEL_ORACLE_LABEL),
    ("fit_seconds", "fit_s", "Fit (s)"),
]
#: text-valued metric columns (shown as they are, not as numbers)
_TEXT_METRICS = {"pixel_eval"}
_COUNTS = ["n_train", "n_val_good", "n_val_synthetic", "n_test_good", "n_test_defect"]
_TEXT_FOOTNOTE = ("* f1_max and px_f1max are ORACLES: thresholds tuned on the test labels / masks (upper bounds, "
                  "not deployable). px_eval: full = maps at each ground-truth mask's resolution; Npx = reduced.")


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------
def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def _fmt(v: Any, decimals: int = 3) -> str:
    f = _num(v)
    return "-" if not math.isfinite(f) else f"{f:.{decimals}f}"


def _metric_text(r: pd.Series, col: str, decimals: int = 3) -> str:
    if col in _TEXT_METRICS:
        return _str_or_empty(r.get(col)) or "-"
    return _fmt(r.get(col), decimals)


def _fmt_int(v: Any) -> str:
    f = _num(v)
    return "-" if not math.isfinite(f) else str(int(round(f)))


def _is_error(row: pd.Series) -> bool:
    return str(row.get("status", "ok")).lower() == "error"


def _err_text(row: pd.Series, n: int | None = None) -> str:
    msg = row.get("error")
    msg = "" if msg is None or (isinstance(msg, float) and math.isnan(msg)) else str(msg)
    msg = " ".join(msg.split())  # one line: tracebacks would break the table
    return msg if n is None else msg[:n]


def _str_or_empty(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return ""
    return str(v)


def _sorted_results(results: pd.DataFrame) -> pd.DataFrame:
    """Sorted by detector then category, the ``mean`` row last per detector."""
    df = results.copy()
    df["_is_mean"] = df["category"].astype(str) == MEAN
    df = df.sort_values(["detector", "_is_mean", "category"], kind="stable")
    return df.drop(columns="_is_mean").reset_index(drop=True)


def _categories(results: pd.DataFrame, scores: pd.DataFrame) -> list[str]:
    cats = set(results["category"].astype(str)) | set(scores.get("category", pd.Series(dtype=str)).astype(str))
    cats.discard(MEAN)
    return sorted(cats)


def _detectors(results: pd.DataFrame, scores: pd.DataFrame) -> list[str]:
    return sorted(set(results["detector"].astype(str)) | set(scores.get("detector", pd.Series(dtype=str)).astype(str)))


# ---------------------------------------------------------------------------
# terminal / markdown tables
# ---------------------------------------------------------------------------
def _table_rows(results: pd.DataFrame) -> tuple[list[str], list[list[str]], list[str | None]]:
    header = ["category", "detector"] + [short for _, short, _ in _METRICS]
    rows: list[list[str]] = []
    errors: list[str | None] = []
    for _, r in _sorted_results(results).iterrows():
        key = [str(r["category"]), str(r["detector"])]
        if _is_error(r):
            rows.append(key + [""] * len(_METRICS))
            errors.append(f"ERROR: {_err_text(r, 40)}")
        else:
            rows.append(key + [_metric_text(r, col) for col, _, _ in _METRICS])
            errors.append(None)
    return header, rows, errors


def format_results_table(results: pd.DataFrame) -> str:
    """Aligned text table: detector then category, mean rows last, 3 decimals, NaN as ``-``."""
    header, rows, errors = _table_rows(results)
    widths = [len(h) for h in header]
    for row, err in zip(rows, errors):
        for i, cell in enumerate(row[:2] if err else row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: list[str]) -> str:
        # text left-aligned, numbers right-aligned so decimals line up
        parts = [c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    prev_det = None
    for row, err in zip(rows, errors):
        if prev_det is not None and row[1] != prev_det:
            out.append("")  # blank line between detectors keeps mean rows visible
        prev_det = row[1]
        if err:
            out.append("  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]), err]).rstrip())
        else:
            out.append(line(row))
    out.append(_TEXT_FOOTNOTE)
    return "\n".join(out)


def results_markdown(results: pd.DataFrame) -> str:
    """The same table as GitHub markdown (3 decimals, NaN as ``-``)."""
    header, rows, errors = _table_rows(results)
    header = header[:2] + [long for _, _, long in _METRICS]

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join([":---", ":---"] + ["---:"] * len(_METRICS)) + "|"]
    for row, err in zip(rows, errors):
        cells = [esc(c) for c in row]
        if row[0] == MEAN:
            cells[0] = "**mean**"
        if err:
            cells[2] = esc(err)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _tuning_rows(results: pd.DataFrame) -> list[tuple[str, float, float, int, int]]:
    """Per detector (mean over ok categories): default-setting test AUROC, tuned test AUROC,
    categories whose chosen setting is not the default, categories."""
    if "default_image_auroc" not in results:
        return []
    per_cat = results[results["category"].astype(str) != MEAN]
    out = []
    for detector, group in per_cat.groupby("detector", sort=True):
        ok = group[group["status"].astype(str) == "ok"] if "status" in group else group
        default = pd.to_numeric(ok["default_image_auroc"], errors="coerce")
        tuned = pd.to_numeric(ok["image_auroc"], errors="coerce")
        changed = int(group["setting_changed"].fillna(False).astype(bool).sum()) if "setting_changed" in group else 0
        out.append((str(detector), float(default.mean()), float(tuned.mean()), changed, len(group)))
    return out


def format_tuning_table(results: pd.DataFrame) -> str:
    """Text table: per detector, test AUROC of the default setting beside the validation-tuned one."""
    rows = _tuning_rows(results)
    if not rows:
        return ""
    width = max(len("detector"), *(len(r[0]) for r in rows))
    out = [f"{'detector'.ljust(width)}  default_auroc  tuned_auroc  change  setting_changed"]
    for detector, default, tuned, changed, total in rows:
        out.append(f"{detector.ljust(width)}  {_fmt(default):>13}  {_fmt(tuned):>11}  "
                   f"{_fmt(tuned - default):>6}  {changed}/{total}")
    out.append("tuned = setting chosen by validation AUROC (held-out normals + synthetic defects); test AUROC shown.")
    return "\n".join(out)


def _tuning_html(results: pd.DataFrame, run: "_RunFolder") -> str:
    rows = _tuning_rows(results)
    if not rows:
        return ""
    body = "".join(f"<tr><th>{_esc(d)}</th><td class=\"num\">{_fmt(a)}</td><td class=\"num\">{_fmt(b)}</td>"
                   f"<td class=\"num\">{_fmt(b - a)}</td><td class=\"num\">{c}/{n}</td></tr>"
                   for d, a, b, c, n in rows)
    details = ""
    search_bytes = run.read("search.parquet")
    if search_bytes:
        search = pd.read_parquet(io.BytesIO(search_bytes))
        chosen = search[search["chosen"]]
        default = search[search["trial"] == 0].set_index(["category", "detector"])["val_auroc"]
        trials = search.groupby(["category", "detector"]).size()
        lines = "".join(
            f"<tr><td>{_esc(r.category)}</td><td>{_esc(r.detector)}</td><td><code>{_esc(r.params)}</code></td>"
            f"<td class=\"num\">{_fmt(default.get((r.category, r.detector), math.nan))}</td>"
            f"<td class=\"num\">{_fmt(r.val_auroc)}</td>"
            f"<td class=\"num\">{int(trials.get((r.category, r.detector), 0))}</td></tr>"
            for r in chosen.itertuples())
        details = ("<details><summary>chosen settings per category</summary><div class=\"scroll\"><table><thead><tr>"
                   "<th>category</th><th>detector</th><th>chosen params</th><th>val AUROC default</th>"
                   f"<th>val AUROC chosen</th><th>trials</th></tr></thead><tbody>{lines}</tbody></table></div></details>")
    return ("<h3>Default vs tuned setting (test AUROC, mean over categories)</h3>"
            "<p class=\"note\">Each detector's setting was chosen by validation AUROC (held-out normal images "
            "and synthetic defects); the test set was used only to measure the chosen and the default setting.</p>"
            "<div class=\"scroll\"><table><thead><tr><th>detector</th><th>default</th><th>tuned</th><th>change</th>"
            f"<th>setting changed (categories)</th></tr></thead><tbody>{body}</tbody></table></div>{details}")


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------
class _Figures:
    """Saves each figure to ``OUT/figures`` and keeps its base64 for the page."""

    def __init__(self, run: "_RunFolder") -> None:
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


def _roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """ROC points with ties collapsed; None without both classes."""
    ok = np.isfinite(scores)
    labels, scores = labels[ok].astype(bool), scores[ok]
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


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


def _pair_threshold(results_row: pd.Series | None, sc: pd.DataFrame) -> float:
    if "threshold" in sc and sc["threshold"].notna().any():
        return float(sc["threshold"].dropna().iloc[0])
    return _num(results_row.get("threshold")) if results_row is not None else math.nan


def _histogram_figure(cat: str, detectors: list[str], test: pd.DataFrame,
                      res_idx: dict[tuple[str, str], pd.Series]) -> Figure:
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
        if r is not None and _is_error(r):
            ax.set_title(f"{det}: ERROR", fontsize=8, color="#b00020")
            ax.text(0.5, 0.5, textwrap.fill(_err_text(r, 160) or "error", 42), ha="center", va="center",
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
        thr = _pair_threshold(r, sc)
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
        auroc = _num(r.get("image_auroc")) if r is not None else math.nan
        ax.set_title(f"{det}  AUROC {_fmt(auroc)}", fontsize=8)
        ax.set_xlabel("score (higher = more anomalous)", fontsize=7)
        if not legend_done:
            ax.legend(fontsize=6, frameon=False)
            legend_done = True
    fig.suptitle(f"{cat}: test score histograms", fontsize=10)
    return fig


def _roc_figure(categories: list[str], detectors: list[str], test: pd.DataFrame,
                res_idx: dict[tuple[str, str], pd.Series]) -> Figure:
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
            pts = _roc(g["label"].to_numpy(dtype=int), g["score"].to_numpy(dtype=float))
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


class _RunFolder:
    """A run's output folder, local or ``s3://``; source images and masks are read from local paths, or
    from S3 with the run's credentials when the run itself is on S3."""

    def __init__(self, uri, storage: Storage | None = None) -> None:
        self.uri = str(uri)
        self.storage = storage or Storage()

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    def read(self, relative: str) -> bytes | None:
        """A file of the run, or None when missing, unreadable or outside the run folder."""
        try:
            target = safe_join(self.uri, relative)
        except StorageError:
            return None
        if not is_s3(target):
            path = Path(target).resolve()  # symlinks too: nothing outside the folder is read
            if not path.is_relative_to(Path(self.uri).resolve()) or not path.is_file():
                return None
        return self._bytes_or_none(target)

    def write(self, relative: str, data: bytes) -> str:
        target = join(self.uri, relative)
        self.storage.write_bytes(target, data)
        return target

    def source(self, uri: str) -> bytes | None:
        """Bytes of an image or mask the run read, or None where it cannot be read from here."""
        if not uri:
            return None
        if is_s3(uri) and not is_s3(self.uri):
            return None  # a local report of S3 data: no credentials assumed
        if not is_s3(uri) and not Path(uri).is_file():
            return None  # e.g. "bucket/key", or a path of another machine
        return self._bytes_or_none(uri)

    def _bytes_or_none(self, uri: str) -> bytes | None:
        """The file's bytes, or None when it is missing or unreadable; a storage outage still raises."""
        try:
            return self.storage.read_bytes(uri)
        except StorageUnavailable:
            raise
        except (FileNotFoundError, StorageError):
            return None


def _load_rgb(data: bytes | None) -> np.ndarray | None:
    if not data:
        return None
    try:
        from PIL import Image
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (THUMB, THUMB))  # JPEG: decode at reduced size
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            return np.asarray(im)
    except (OSError, ValueError):
        return None


def _load_mask(data: bytes | None, shape: tuple[int, int] | None) -> np.ndarray | None:
    if not data:
        return None
    try:
        from PIL import Image
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L")
            if shape:  # match the displayed image so the two line up
                im = im.resize((shape[1], shape[0]), Image.Resampling.NEAREST)
            else:
                im.thumbnail((THUMB, THUMB))
            return np.asarray(im) > 127
    except (OSError, ValueError):
        return None


def _load_map(run: _RunFolder, rel: str) -> np.ndarray | None:
    if not rel:
        return None
    try:
        data = run.read(rel)  # safe_join: a map_file never points outside the run folder
        if data is None:
            return None
        m = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError):
        return None
    m = np.squeeze(np.asarray(m, dtype=np.float32))
    return m if m.ndim == 2 else None


def _resize_map(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if m.shape == shape:
        return m
    from PIL import Image
    return np.asarray(Image.fromarray(m, mode="F").resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def _pick_examples(test_det: pd.DataFrame, k: int) -> pd.DataFrame:
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


def _reference_detector(cat: str, detectors: list[str], test: pd.DataFrame,
                        res_idx: dict[tuple[str, str], pd.Series]) -> str | None:
    """Best image AUROC among detectors with maps, else among all: its maps and ranking drive the examples."""
    scored = set(test["detector"].astype(str))
    with_maps = set(test.loc[test["map_file"].fillna("").astype(str) != "", "detector"].astype(str))

    def auroc(det: str) -> float:
        r = res_idx.get((cat, det))
        v = _num(r.get("image_auroc")) if r is not None and not _is_error(r) else math.nan
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


def _examples_figure(cat: str, det: str, picked: pd.DataFrame, run: _RunFolder, thr: float) -> Figure:
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

    maps = [_load_map(run, _str_or_empty(r.get("map_file"))) if has_maps else None
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
        path = _str_or_empty(r.get("input_uri"))
        img = _load_rgb(run.source(path))
        label = int(r["label"])
        truth = "defect" if label == 1 else "good"
        dtype = _str_or_empty(r.get("defect_type")) or truth
        score = _num(r.get("score"))
        t = _num(r.get("threshold")) if math.isfinite(_num(r.get("threshold"))) else thr
        flagged = math.isfinite(score) and math.isfinite(t) and score >= t
        correct = flagged == (label == 1)

        place(i, 0, _fit_tile(img) if img is not None else None,
              "image not readable here\n" + _short(path, 30))
        shape = img.shape[:2] if img is not None else (m.shape if m is not None else None)
        mask = _load_mask(run.source(_str_or_empty(r.get("mask_file"))), shape)
        place(i, 1, _fit_tile(np.repeat((mask[..., None] * 255).astype(np.uint8), 3, axis=2))
              if mask is not None else None, "no mask" if label == 0 else "mask not readable")
        if has_maps:
            if m is None:
                place(i, 2, None, "no map")
            elif img is not None:
                blend = 0.55 * img.astype(np.float32) + 0.45 * colour(_resize_map(m, img.shape[:2]))
                place(i, 2, _fit_tile(blend.astype(np.uint8)))
            else:
                place(i, 2, _fit_tile(colour(m).astype(np.uint8)))

        verdict = ("flagged" if flagged else "passed") + (" ✓" if correct else " ✗")
        what = truth if dtype == truth else f"{truth}: {_short(dtype, 18)}"
        texts.append((pad, head + i * (band + THUMB) + band - 5,
                      f"#{i + 1} {what}  |  {det} {_fmt(score)} {'≥' if flagged else '<'} thr {_fmt(t)} ({verdict})",
                      dict(ha="left", va="bottom", fontsize=8, color="#1b5e20" if correct else "#b00020")))

    fig = Figure(figsize=(width / DPI, height / DPI))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest", extent=(0, width, height, 0))
    ax.set_axis_off()
    for x, y, text, kw in texts:
        ax.text(x, y, text, **kw)
    return fig


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else "…" + s[-(n - 1):]


# ---------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif;margin:0 auto;max-width:1400px;
 padding:0 18px 40px;color:#222;background:#fff}
h1{margin:18px 0 6px}h2{border-bottom:2px solid #ddd;padding-bottom:3px;margin-top:34px}
h3{margin:22px 0 6px}
.banner{background:#b00020;color:#fff;font-weight:700;font-size:1.15em;padding:12px 16px;border-radius:6px;margin:10px 0}
.meta{display:grid;grid-template-columns:max-content 1fr;gap:3px 14px;margin:8px 0}
.meta dt{font-weight:600}.meta dd{margin:0}
.note{background:#fff8e1;border-left:4px solid #f9a825;padding:6px 10px;margin:8px 0}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 7px}th{background:#f3f3f3;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.mean td{font-weight:700;border-top:2px solid #888}
.err{color:#b00020;font-weight:600}
.scroll{overflow-x:auto}
img.fig{max-width:100%;height:auto;border:1px solid #eee}
td.hit{background:#c8e6c9}td.miss{background:#ffcdd2}
details pre{background:#f6f6f6;padding:10px;overflow-x:auto;font-size:12px}
nav a{margin-right:10px}
"""


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _auroc_colour(v: float) -> str:
    """Red at <= 0.5 through yellow to green at 1.0."""
    if not math.isfinite(v):
        return "#eeeeee"
    t = min(max((v - 0.5) / 0.5, 0.0), 1.0)
    return f"hsl({120 * t:.0f},70%,72%)"


def _pivot_html(results: pd.DataFrame, metric: str, title: str, detectors: list[str],
                categories: list[str]) -> str:
    idx = {(str(r["category"]), str(r["detector"])): r for _, r in results.iterrows()}
    head = "".join(f"<th>{_esc(d)}</th>" for d in detectors)
    rows = []
    for cat in categories + [MEAN]:
        if not any((cat, d) in idx for d in detectors):
            continue
        cells = []
        for det in detectors:
            r = idx.get((cat, det))
            if r is None:
                cells.append('<td class="num">-</td>')
            elif _is_error(r):
                cells.append(f'<td class="err" title="{_esc(_err_text(r))}">ERROR</td>')
            else:
                v = _num(r.get(metric))
                cells.append(f'<td class="num" style="background:{_auroc_colour(v)}">{_fmt(v)}</td>')
        cls = ' class="mean"' if cat == MEAN else ""
        rows.append(f"<tr{cls}><th>{_esc(cat)}</th>{''.join(cells)}</tr>")
    return (f"<h3>{_esc(title)}</h3><div class=\"scroll\"><table><thead><tr><th>category \\ detector</th>"
            f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _long_table_html(results: pd.DataFrame) -> str:
    extra = [c for c in ("backbone", "weights", "threshold_rule")
             if c in results and results[c].astype(str).nunique() > 1]  # constant ones are in the header
    counts = [c for c in _COUNTS if c in results]
    head = (["category", "detector", "status"] + extra + [long for _, _, long in _METRICS] + counts)
    out = ["<div class=\"scroll\"><table><thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head)
           + "</tr></thead><tbody>"]
    for _, r in _sorted_results(results).iterrows():
        cls = ' class="mean"' if str(r["category"]) == MEAN else ""
        cells = [f"<td>{_esc(r['category'])}</td>", f"<td>{_esc(r['detector'])}</td>"]
        if _is_error(r):
            cells.append('<td class="err">error</td>')
            cells += [f"<td>{_esc(_str_or_empty(r.get(c)))}</td>" for c in extra]
            cells.append(f'<td class="err" colspan="{len(_METRICS) + len(counts)}">'
                         f"ERROR: {_esc(_err_text(r, 300))}</td>")
        else:
            cells.append(f"<td>{_esc(_str_or_empty(r.get('status')) or 'ok')}</td>")
            cells += [f"<td>{_esc(_str_or_empty(r.get(c)))}</td>" for c in extra]
            for col, _, _ in _METRICS:
                v = _num(r.get(col))
                style = f' style="background:{_auroc_colour(v)}"' if col == "image_auroc" else ""
                text = _esc(_metric_text(r, col, 1 if col == "fit_seconds" else 3))
                cells.append(f'<td class="num"{style}>{text}</td>')
            cells += [f'<td class="num">{_fmt_int(r.get(c))}</td>' for c in counts]
        out.append(f"<tr{cls}>{''.join(cells)}</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _unique_text(results: pd.DataFrame, col: str) -> list[str]:
    if col not in results:
        return []
    vals = results.loc[results["category"].astype(str) != MEAN, col]
    vals = [_str_or_empty(v) for v in vals]
    return sorted({v for v in vals if v}) or sorted({_str_or_empty(v) for v in results[col]} - {""})


def _header_html(run_name: str, results: pd.DataFrame, scores: pd.DataFrame,
                 categories: list[str], detectors: list[str]) -> str:
    weights = _unique_text(results, "weights")
    parts = [f"<h1>Anomaly detection report: {_esc(run_name)}</h1>"]
    if any("random" in w.lower() for w in weights):
        parts.append('<div class="banner" id="random-weights">⚠ WARNING: backbone weights are RANDOM '
                     "(not pretrained). These numbers do not measure the method; do not compare "
                     "them with published results.</div>")
    per_cat = results[results["category"].astype(str) != MEAN]
    first = per_cat.groupby("category").max(numeric_only=True) if not per_cat.empty else per_cat

    def total(col: str) -> str:
        return _fmt_int(first[col].sum()) if col in first and first[col].notna().any() else "-"

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
    parts.append('<dl class="meta">' + "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in meta)
                 + "</dl>")
    parts.append('<p class="note">Thresholds are chosen without test labels (rule above). '
                 f'The column "{_esc(ORACLE_LABEL)}" is an ORACLE upper bound, not a deployable result. '
                 "Scores: higher = more anomalous.</p>")
    return "".join(parts)


def _img_html(uri: str, name: str, alt: str) -> str:
    return (f'<figure><img class="fig" src="{uri}" alt="{_esc(alt)}">'
            f"<figcaption><small>figures/{_esc(name)}</small></figcaption></figure>")


def _example_scores_html(cat: str, picked: pd.DataFrame, test: pd.DataFrame, detectors: list[str],
                         thresholds: dict[str, float], run: _RunFolder) -> str:
    if picked.empty:
        return ""
    sub = test[test["image_id"].isin(picked["image_id"])]
    by = {(str(r["image_id"]), str(r["detector"])): _num(r["score"]) for _, r in sub.iterrows()}
    dets = [d for d in detectors if any((str(i), d) in by for i in picked["image_id"])]
    head = "".join(f"<th>{_esc(d)}<br><small>thr {_fmt(thresholds.get(d))}</small></th>" for d in dets)
    rows = []
    for n, (_, r) in enumerate(picked.iterrows(), 1):
        label = int(r["label"])
        cells = []
        for d in dets:
            s, t = by.get((str(r["image_id"]), d), math.nan), thresholds.get(d, math.nan)
            if not math.isfinite(s):
                cells.append('<td class="num">-</td>')
                continue
            flagged = math.isfinite(t) and s >= t
            cls = "hit" if flagged == (label == 1) else "miss"
            cells.append(f'<td class="num {cls}" title="{"flagged" if flagged else "passed"}">{_fmt(s)}</td>')
        truth = "defect" if label == 1 else "good"
        path = _str_or_empty(r.get("input_uri"))
        note = "" if run.source(path) is not None else ' <small class="err">(not readable here)</small>'
        rows.append(f"<tr><td>{n}</td><td>{_esc(r['image_id'])}</td><td>{truth}</td>"
                    f"<td>{_esc(_str_or_empty(r.get('defect_type')))}</td>"
                    f"<td title=\"{_esc(path)}\">{_esc(_short(path, 48))}{note}</td>{''.join(cells)}</tr>")
    return ("<div class=\"scroll\"><table><thead><tr><th>#</th><th>image</th><th>truth</th><th>defect type</th><th>source</th>"
            f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
            "<p><small>Green: correct decision at the detector's threshold; red: wrong "
            "(false alarm or missed defect).</small></p>")


def _read_parquet(run: _RunFolder, name: str, columns: Iterable[str]) -> pd.DataFrame:
    data = run.read(name)
    if data is not None:
        return pd.read_parquet(io.BytesIO(data))
    return pd.DataFrame(columns=list(columns))


_SCORE_COLS = ["category", "detector", "split", "image_id", "input_uri", "label", "defect_type", "score",
               "threshold", "map_file", "mask_file", "pred_mask_file", "overlay_file"]
GALLERY = "overlays/index.html"


def write_overlay_gallery(run, test: pd.DataFrame, results: pd.DataFrame) -> str | None:
    """``OUT/overlays/index.html`` (``run``: the run folder, local or ``s3://``): every test image's overlay,
    by detector and category, defects first and by decreasing score; returns its path relative to the
    run folder (None without overlays)."""
    run = run if isinstance(run, _RunFolder) else _RunFolder(run)
    files = test["overlay_file"].fillna("").astype(str)
    shown = test[(files != "") & files.map(lambda f: bool(f) and run.storage.exists(join(run.uri, f)))]
    if shown.empty:
        return None
    res_idx = {(r["category"], r["detector"]): r for _, r in results.iterrows()}
    sections, nav = [], []
    for (det, cat), group in shown.groupby(["detector", "category"], sort=True):
        anchor = f"{det}-{cat}"
        nav.append(f'<a href="#{_esc(anchor)}">{_esc(det)} / {_esc(cat)} ({len(group)})</a>')
        r = res_idx.get((cat, det))
        summary = ""
        if r is not None:
            summary = (f"pixel threshold {_fmt(r.get('pixel_threshold'), 4)} ({_esc(_str_or_empty(r.get('pixel_threshold_rule')))}); "
                       f"pixel F1 {_fmt(r.get('pixel_f1'))}, oracle F1-max {_fmt(r.get('pixel_f1_max'))}; "
                       f"pixel evaluation {_esc(_str_or_empty(r.get('pixel_eval')) or '-')}")
        cells = []
        for _, row in group.sort_values(["label", "score"], ascending=[False, False]).iterrows():
            rel = str(row["overlay_file"]).split("/", 1)[1]  # relative to overlays/
            flagged = _num(row["score"]) >= _num(row["threshold"])
            truth = "defect" if int(row["label"]) == 1 else "good"
            cells.append(f'<figure><a href="{_esc(rel)}"><img loading="lazy" src="{_esc(rel)}" alt="{_esc(row["image_id"])}"></a>'
                         f'<figcaption>{_esc(row["image_id"])}<br>{truth}, score {_fmt(row["score"], 4)} '
                         f'({"flagged" if flagged else "passed"})</figcaption></figure>')
        sections.append(f'<h2 id="{_esc(anchor)}">{_esc(det)} / {_esc(cat)}</h2><p>{summary}</p>'
                        f'<div class="gallery">{"".join(cells)}</div>')
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Overlays</title><style>"
            "body{font-family:sans-serif;margin:16px}.gallery{display:flex;flex-wrap:wrap;gap:10px}"
            "figure{margin:0;font-size:12px;max-width:100%}img{max-width:100%;border:1px solid #ddd}"
            "nav a{margin-right:12px}</style></head><body><h1>Per-image overlays</h1>"
            "<p>Panels: image (as the model saw it), ground truth (red), anomaly map, predicted outline (yellow: "
            "map &ge; the pixel threshold chosen on validation; green: ground truth). Defects first, by "
            "decreasing score. <a href=\"../report.html\">back to the report</a></p>"
            f"<nav>{' '.join(nav)}</nav>{''.join(sections)}</body></html>\n")
    run.write(GALLERY, page.encode("utf-8"))
    return GALLERY


def write_report(out_dir, max_examples: int = 4, storage: Storage | None = None) -> Path | str:
    """Write ``OUT/report.html`` and ``OUT/figures/*.png``; returns the HTML path (a URI for S3)."""
    run = _RunFolder(out_dir, storage)
    results_bytes = run.read("results.parquet")
    if results_bytes is None:
        raise FileNotFoundError(f"{join(run.uri, 'results.parquet')} not found: is {run.uri} a run output folder?")
    results = pd.read_parquet(io.BytesIO(results_bytes))
    results["category"] = results["category"].astype(str)
    results["detector"] = results["detector"].astype(str)
    scores = _read_parquet(run, "scores.parquet", _SCORE_COLS)
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
    res_idx = {(r["category"], r["detector"]): r for _, r in results.iterrows()}
    figs = _Figures(run)
    test_by_cat = {c: g for c, g in test.groupby("category", sort=False)}
    empty = test.iloc[:0]

    body = [_header_html(run.name, results, scores, categories, detectors)]
    body.append("<nav><b>Contents:</b> <a href=\"#results\">results</a> <a href=\"#roc\">ROC</a> "
                + " ".join(f'<a href="#cat-{i}">{_esc(c)}</a>' for i, c in enumerate(categories)) + "</nav>")

    body.append('<h2 id="results">Results</h2>')
    body.append(_pivot_html(results, "image_auroc", "Image AUROC (colour: red ≤ 0.5 → green = 1.0)",
                            detectors, categories))
    if "pixel_auroc" in results and pd.to_numeric(results["pixel_auroc"], errors="coerce").notna().any():
        body.append(_pivot_html(results, "pixel_auroc", "Pixel AUROC (detectors with anomaly maps)",
                                detectors, categories))
    body.append(_tuning_html(results, run))
    body.append("<h3>All metrics</h3>")
    body.append(_long_table_html(results))
    if "pixel_eval" in results and results["pixel_eval"].notna().any():
        body.append(f'<h3 id="pixel-protocol">Pixel evaluation protocol</h3><p class="note">{_esc(PIXEL_PROTOCOL)}</p>')
    if "overlay_file" in test:
        gallery = write_overlay_gallery(run, test, results)
        if gallery:
            body.append(f'<p><b>Per-image overlays</b> (image, ground truth, anomaly map, predicted outline) of '
                        f'every test image: <a href="{gallery}">{gallery}</a>, also as PNG files under '
                        f'overlays/&lt;detector&gt;/; predicted masks under pred_masks/&lt;detector&gt;/.</p>')

    body.append('<h2 id="roc">ROC curves</h2>')
    if not test.empty:
        name, uri = figs.save(_roc_figure(categories, detectors, test, res_idx), "roc_curves")
        body.append(_img_html(uri, name, "ROC curves per category"))
    else:
        body.append("<p>No test scores (scores.parquet missing or empty).</p>")

    for i, cat in enumerate(categories):
        ct = test_by_cat.get(cat, empty)
        body.append(f'<h2 id="cat-{i}">{_esc(cat)}</h2>')
        body.append("<h3>Test score histograms (dashed line: threshold)</h3>")
        name, uri = figs.save(_histogram_figure(cat, detectors, ct, res_idx), f"{cat}_histograms")
        body.append(_img_html(uri, name, f"{cat} score histograms"))
        ref = _reference_detector(cat, detectors, ct, res_idx) if not ct.empty else None
        if ref is None or max_examples <= 0:
            continue
        cur = ct[ct["detector"] == ref]
        picked = _pick_examples(cur, max_examples)
        if picked.empty:
            continue
        thresholds = {d: _pair_threshold(res_idx.get((cat, d)), g) for d, g in ct.groupby("detector")}
        body.append(f"<h3>Examples: most anomalous defects and highest-scoring good images "
                    f"(ranked by {_esc(ref)})</h3>")
        name, uri = figs.save(_examples_figure(cat, ref, picked, run, thresholds.get(ref, math.nan)),
                              f"{cat}_examples")
        body.append(_img_html(uri, name, f"{cat} example images"))
        body.append(_example_scores_html(cat, picked, ct, detectors, thresholds, run))

    cfg = run.read("config.yaml")
    cfg_text = cfg.decode(errors="replace") if cfg is not None else "(config.yaml not found)"
    body.append('<h2 id="config">Configuration</h2>')
    body.append(f"<details><summary>config.yaml</summary><pre>{_esc(cfg_text)}</pre></details>")

    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>Report: {_esc(run.name)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
    target = run.write("report.html", page.encode("utf-8"))
    return target if is_s3(target) else Path(target)
