"""The mean rows' name cannot be a category: the category rule refuses it, so a real category
named ``mean`` is refused in one line instead of vanishing from the results (the summary drops and
recomputes rows of that name)."""
from __future__ import annotations

import pytest

from mvtec_ray.data.catalog import check_category_name
from mvtec_ray.errors import UserError
from mvtec_ray.evaluation.summary import MEAN_ROW
from mvtec_ray.features.store import EXTRACT_META, FeatureSet
from mvtec_ray.report.tables import MEAN
from mvtec_ray.storage import Storage


def test_the_mean_rows_name_is_refused_as_a_category():
    assert MEAN == MEAN_ROW  # one name for the summary and the tables
    with pytest.raises(UserError, match=f"category {MEAN_ROW!r}: .*reserved"):
        check_category_name(MEAN_ROW)


def test_features_with_a_mean_category_are_refused_before_fitting(tmp_path):
    """An extraction made before the rule: its 'mean' folder would be fitted, then dropped by summarise."""
    (tmp_path / EXTRACT_META).write_text("{}")
    for name in ("bottle", "mean", "_tmp"):
        (tmp_path / name / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="category 'mean'") as info:
        FeatureSet(str(tmp_path), Storage()).categories()
    assert "\n" not in str(info.value)
    (tmp_path / "mean" / "train").rmdir()
    (tmp_path / "mean").rmdir()
    assert FeatureSet(str(tmp_path), Storage()).categories() == ["bottle"]

