"""The results table's summary: one row per (category, detector) plus the mean rows."""
from __future__ import annotations

import pandas as pd

#: the ``category`` of the mean rows; a name the category rule refuses
#: (:func:`mvtec_ray.data.catalog.check_category_name`), so a real category never collides with it
MEAN_ROW = "mean"


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Append one ``category == "mean"`` row per detector.

    Numeric metric columns: mean over the detector's categories with
    ``status == "ok"`` (all rows if there is no ``status`` column), NaNs
    skipped. Count columns (``n_*``): summed over the same rows. Other columns
    are copied when they hold a single value (e.g. ``backbone``), else left
    empty; ``status`` of a mean row is ``"ok"`` when every category was ok,
    ``"partial (k/n ok)"`` otherwise, and ``"no_ok_rows"`` when none was.
    Existing mean rows are recomputed. Sorted by detector, then category, with
    the mean row last for each detector.
    """
    for col in ("category", "detector"):
        if col not in rows.columns:
            raise ValueError(f"summarise needs a {col!r} column; got {list(rows.columns)}")
    base = rows[rows["category"] != MEAN_ROW].reset_index(drop=True)
    if base.empty:
        return base.copy()
    numeric = [c for c in base.columns
               if c not in ("category", "detector")
               and pd.api.types.is_numeric_dtype(base[c])
               and not pd.api.types.is_bool_dtype(base[c])]
    counts = [c for c in numeric if c.startswith("n_")]
    has_status = "status" in base.columns

    mean_rows = []
    for detector, grp in base.groupby("detector", sort=False, dropna=False):
        ok = grp[grp["status"] == "ok"] if has_status else grp
        pool = ok if len(ok) else grp
        row: dict = {}
        for c in base.columns:
            if c in numeric:
                row[c] = ok[c].sum() if c in counts else ok[c].mean()
            else:
                uniq = pool[c].dropna().unique()
                row[c] = uniq[0] if len(uniq) == 1 else None
        row["category"], row["detector"] = MEAN_ROW, detector
        if has_status:
            row["status"] = ("ok" if len(ok) == len(grp) else
                             "no_ok_rows" if len(ok) == 0 else
                             f"partial ({len(ok)}/{len(grp)} ok)")
        mean_rows.append(row)

    out = pd.concat([base, pd.DataFrame(mean_rows, columns=base.columns)],
                    ignore_index=True)
    is_mean = out["category"] == MEAN_ROW
    order = (out.assign(_mean=is_mean.astype(int), _cat=out["category"].astype(str),
                        _det=out["detector"].astype(str))
             .sort_values(["_det", "_mean", "_cat"], kind="stable").index)
    return out.loc[order].reset_index(drop=True)
