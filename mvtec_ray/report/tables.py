"""The results as text: the terminal table, the GitHub markdown table and the tuning table.

Also the value formatting the HTML report shares (3 decimals, NaN as ``-``, one-line errors) and the
labels of the ORACLE columns. Light on purpose: pandas only (no matplotlib, no scikit-learn), so a
driver that prints or writes ``results.md`` stays light (``tests/unit/fit/test_light_driver.py``).
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from mvtec_ray.evaluation.selection import BEST_ON_VALIDATION
from mvtec_ray.evaluation.summary import MEAN_ROW as MEAN

ORACLE_LABEL = "F1-max (oracle, tuned on test labels)"
PIXEL_ORACLE_LABEL = "Pixel F1-max (oracle, tuned on test masks)"

#: (column, short terminal header, long HTML/markdown header)
METRICS: list[tuple[str, str, str]] = [
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
    ("val_auroc", "val_auroc", "Validation AUROC (chooses best_on_validation)"),
    ("fit_seconds", "fit_s", "Fit (s)"),
]
#: text-valued metric columns (shown as they are, not as numbers)
_TEXT_METRICS = {"pixel_eval"}
#: image counts per split, shown after the metrics
COUNTS = ["n_train", "n_val_good", "n_val_synthetic", "n_test_good", "n_test_defect"]
_TEXT_FOOTNOTE = ("* f1_max and px_f1max are ORACLES: thresholds tuned on the test labels / masks (upper bounds, "
                  "not deployable). px_eval: full = maps at each ground-truth mask's resolution; Npx = reduced.")


# ---------------------------------------------------------------------------
# value formatting (shared with the figures and the HTML page)
# ---------------------------------------------------------------------------
def num(v: Any) -> float:
    """``v`` as a float, NaN where it is not a number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def fmt(v: Any, decimals: int = 3) -> str:
    f = num(v)
    return "-" if not math.isfinite(f) else f"{f:.{decimals}f}"


def fmt_int(v: Any) -> str:
    f = num(v)
    return "-" if not math.isfinite(f) else str(int(round(f)))


def str_or_empty(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return ""
    return str(v)


def metric_text(r: pd.Series, col: str, decimals: int = 3) -> str:
    if col in _TEXT_METRICS:
        return str_or_empty(r.get(col)) or "-"
    return fmt(r.get(col), decimals)


def is_error(row: pd.Series) -> bool:
    return str(row.get("status", "ok")).lower() == "error"


def err_text(row: pd.Series, n: int | None = None) -> str:
    """The row's error on one line (tracebacks would break a table), its first ``n`` characters."""
    msg = row.get("error")
    msg = "" if msg is None or (isinstance(msg, float) and math.isnan(msg)) else str(msg)
    msg = " ".join(msg.split())
    return msg if n is None else msg[:n]


def short(s: str, n: int) -> str:
    """``s`` cut to its last ``n`` characters, ``…`` in front when cut."""
    return s if len(s) <= n else "…" + s[-(n - 1):]


def detector_label(row: pd.Series) -> str:
    """The detector cell: ``best_on_validation (patchcore)`` names the choice (a mean row only when
    every category chose the same detector)."""
    detector = str(row["detector"])
    chosen = str_or_empty(row.get("chosen_detector")) if detector == BEST_ON_VALIDATION else ""
    return f"{detector} ({chosen})" if chosen else detector


def sorted_results(results: pd.DataFrame) -> pd.DataFrame:
    """Sorted by detector then category, the ``mean`` row last per detector."""
    df = results.copy()
    df["_is_mean"] = df["category"].astype(str) == MEAN
    df = df.sort_values(["detector", "_is_mean", "category"], kind="stable")
    return df.drop(columns="_is_mean").reset_index(drop=True)


# ---------------------------------------------------------------------------
# terminal / markdown tables
# ---------------------------------------------------------------------------
def _table_rows(results: pd.DataFrame) -> tuple[list[str], list[list[str]], list[str | None], list[str]]:
    """Header, cells, each row's error (or None) and each row's detector (its group)."""
    header = ["category", "detector"] + [short_name for _, short_name, _ in METRICS]
    rows: list[list[str]] = []
    errors: list[str | None] = []
    ordered = sorted_results(results)
    for _, r in ordered.iterrows():
        key = [str(r["category"]), detector_label(r)]
        if is_error(r):
            rows.append(key + [""] * len(METRICS))
            errors.append(f"ERROR: {err_text(r, 40)}")
        else:
            rows.append(key + [metric_text(r, col) for col, _, _ in METRICS])
            errors.append(None)
    return header, rows, errors, ordered["detector"].astype(str).tolist()


def format_results_table(results: pd.DataFrame) -> str:
    """Aligned text table: detector then category, mean rows last, 3 decimals, NaN as ``-``."""
    header, rows, errors, groups = _table_rows(results)
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
    for row, err, detector in zip(rows, errors, groups):
        if prev_det is not None and detector != prev_det:
            out.append("")  # blank line between detectors keeps mean rows visible
        prev_det = detector
        if err:
            out.append("  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]), err]).rstrip())
        else:
            out.append(line(row))
    out.append(_TEXT_FOOTNOTE)
    return "\n".join(out)


def results_markdown(results: pd.DataFrame) -> str:
    """The same table as GitHub markdown (3 decimals, NaN as ``-``)."""
    header, rows, errors, _ = _table_rows(results)
    header = header[:2] + [long for _, _, long in METRICS]

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join([":---", ":---"] + ["---:"] * len(METRICS)) + "|"]
    for row, err in zip(rows, errors):
        cells = [esc(c) for c in row]
        if row[0] == MEAN:
            cells[0] = "**mean**"
        if err:
            cells[2] = esc(err)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def tuning_rows(results: pd.DataFrame) -> list[tuple[str, float, float, int, int]]:
    """Per detector (mean over ok categories): default-setting test AUROC, tuned test AUROC,
    categories whose chosen setting is not the default, categories."""
    if "default_image_auroc" not in results:
        return []
    # the alias row is a choice between detectors, not a setting of one
    per_cat = results[(results["category"].astype(str) != MEAN) & (results["detector"] != BEST_ON_VALIDATION)]
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
    rows = tuning_rows(results)
    if not rows:
        return ""
    width = max(len("detector"), *(len(r[0]) for r in rows))
    out = [f"{'detector'.ljust(width)}  default_auroc  tuned_auroc  change  setting_changed"]
    for detector, default, tuned, changed, total in rows:
        out.append(f"{detector.ljust(width)}  {fmt(default):>13}  {fmt(tuned):>11}  "
                   f"{fmt(tuned - default):>6}  {changed}/{total}")
    out.append("tuned = setting chosen by validation AUROC (held-out normals + synthetic defects); test AUROC shown.")
    return "\n".join(out)
