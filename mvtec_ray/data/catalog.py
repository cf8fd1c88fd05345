"""Dataset root (local or s3://) -> manifest table, validated before any Ray work starts.

MVTec AD layout::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<good|defect_type>/*.png
    <root>/<category>/ground_truth/<defect_type>/<name>_mask.png

Every file under the root is accounted for: an image row in ``entries``, a used mask, or a
row in ``skipped`` with its reason (hidden files, other extensions, other folders, broken
symlinks, fifos, symlink loops, names that are not UTF-8; symlinks to files and folders are
otherwise followed). Layout problems that make a category unusable raise
:class:`CatalogError` with a one-line message.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import pandas as pd

from mvtec_ray.errors import CatalogError
from mvtec_ray.evaluation.summary import MEAN_ROW
from mvtec_ray.storage import Storage, is_s3

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
ENTRY_COLUMNS = ["image_id", "uri", "category", "split", "label", "defect_type", "mask_uri",
                 "size_bytes", "version"]
SKIPPED_COLUMNS = ["uri", "category", "reason"]
#: the longest category name: it is a folder name in the features, models, maps and overlays
MAX_CATEGORY_LENGTH = 128


def category_name_problem(name: object) -> str:
    """Why ``name`` cannot be a category (empty string: it can). The one rule for dataset folders,
    manifests and the stores that build paths from a category:

    one path component (no ``/`` or ``\\``, not ``.`` or ``..``), non-empty, at most
    :data:`MAX_CATEGORY_LENGTH` characters, no control characters or surrounding spaces, not starting
    with ``.`` (hidden) or ``_`` (the stores' own files, e.g. ``_extract.json``), and not ``mean``
    (the results' mean rows, :data:`~mvtec_ray.evaluation.summary.MEAN_ROW`).
    """
    if not isinstance(name, str) or not name:
        return "a category name must not be empty"
    if "/" in name or "\\" in name:
        return "a category name must not contain '/' or '\\'"
    if name in (".", ".."):
        return "a category name must not be '.' or '..'"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "a category name must not contain control characters"
    if name != name.strip():
        return "a category name must not start or end with a space"
    if len(name) > MAX_CATEGORY_LENGTH:
        return f"a category name must have at most {MAX_CATEGORY_LENGTH} characters"
    if name[0] in "._":
        return "a category name must not start with '.' or '_' (hidden files; the stores' own files)"
    if name == MEAN_ROW:
        return f"{MEAN_ROW!r} is reserved for the results' mean rows; rename the category"
    return ""


def check_category_name(name: object, where: str = "") -> str:
    """``name`` if it is a valid category (:func:`category_name_problem`), else a one-line
    :class:`CatalogError` naming the value (and ``where`` it came from)."""
    problem = category_name_problem(name)
    if problem:
        raise CatalogError(f"{where + ': ' if where else ''}category {name!r}: {problem}")
    return name


@dataclass
class Catalog:
    root: str
    entries: pd.DataFrame
    skipped: pd.DataFrame
    warnings: list[str] = field(default_factory=list)

    @property
    def categories(self) -> list[str]:
        return sorted(self.entries["category"].unique())

    def summary(self) -> pd.DataFrame:
        df = self.entries
        return (df.assign(kind=df["split"] + "/" + df["label"].map({0: "good", 1: "defect"}))
                .pivot_table(index="category", columns="kind", values="image_id", aggfunc="count",
                             fill_value=0))


def build_catalog(root: str, storage: Storage | None = None,
                  categories: list[str] | None = None) -> Catalog:
    storage = storage or Storage()
    root = str(root).rstrip("/") if is_s3(str(root)) else str(root)
    storage.check_reachable(root)
    if not storage.is_dir(root):
        raise CatalogError(f"dataset root is not a folder: {root}")
    _, root_path = storage.resolve(root)
    infos, special = storage.walk(root)
    by_category: dict[str, list] = {}
    top_level_files, special_rows = [], []
    for info in sorted(infos, key=lambda i: i.path):
        parts = _relative_parts(info.path, root_path)
        if len(parts) < 2:
            top_level_files.append(info.path)
            continue
        by_category.setdefault(parts[0], []).append((parts[1:], info))
    for path, reason in sorted(special):
        parts = _relative_parts(path, root_path)
        special_rows.append((storage.uri_of(root, path), parts[0] if len(parts) > 1 else "", reason))
    found = sorted(c for c in by_category if not c.startswith("."))
    if not found:
        raise CatalogError(f"no categories under {root}: expected <category>/train/good/*.png")
    if categories:
        missing = sorted(set(categories) - set(found))
        if missing:
            raise CatalogError(f"categories not found under {root}: {', '.join(missing)} "
                               f"(found: {', '.join(found)})")
        found = [c for c in found if c in categories]
    for category in found:  # hidden folders are skipped above; every folder used must be a valid name
        check_category_name(category, f"folder {storage.uri_of(root, posixpath.join(root_path, category))}")

    rows, skipped, warnings = [], list(special_rows), []
    for path in top_level_files:
        skipped.append((storage.uri_of(root, path), "", "file at the dataset root"))
    for hidden in sorted(c for c in by_category if c.startswith(".")):
        for _, info in by_category[hidden]:
            skipped.append((storage.uri_of(root, info.path), "", "hidden folder"))
    for category in sorted(set(by_category) - set(found) - {c for c in by_category if c.startswith(".")}):
        for _, info in by_category[category]:
            skipped.append((storage.uri_of(root, info.path), category, "category not selected"))

    for category in found:
        cat_rows, cat_skipped = _catalog_category(root, category, by_category[category], storage)
        splits = {r["split"] for r in cat_rows}
        if not any(r["split"] == "train" for r in cat_rows):
            raise CatalogError(f"category {category!r} has no images in train/good")
        if "test" not in splits:
            raise CatalogError(f"category {category!r} has no images in test/ (expected test/good and test/<defect>)")
        for row in cat_rows:
            if row["label"] == 1 and not row["mask_uri"]:
                warnings.append(f"{category}: defect image without a mask: {row['image_id']}")
        rows.extend(cat_rows)
        skipped.extend(cat_skipped)

    entries = pd.DataFrame(rows, columns=ENTRY_COLUMNS).sort_values("image_id", ignore_index=True)
    skipped_df = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)
    for _, row in skipped_df.iterrows():
        if row["reason"] not in ("category not selected",):
            warnings.append(f"skipped {row['uri']}: {row['reason']}")
    return Catalog(root=root, entries=entries, skipped=skipped_df, warnings=warnings)


def _relative_parts(path: str, root_path: str) -> list[str]:
    return posixpath.relpath(path.replace("\\", "/"), root_path.replace("\\", "/")).split("/")


def _catalog_category(root: str, category: str, files: list, storage: Storage):
    rows, skipped, masks = [], [], {}
    candidates = []
    for parts, info in files:
        uri = storage.uri_of(root, info.path)
        name = parts[-1]
        if any(p.startswith(".") for p in parts):
            skipped.append((uri, category, "hidden file"))
            continue
        ext = posixpath.splitext(name)[1].lower()
        if parts[0] == "ground_truth":
            if len(parts) == 3 and ext in IMAGE_EXTENSIONS:
                stem = posixpath.splitext(name)[0]
                stem = stem[:-5] if stem.endswith("_mask") else stem
                if (parts[1], stem) in masks:  # e.g. 000_mask.png beside 000.png: keep the first, account for both
                    skipped.append((uri, category, f"second mask for the same image (first: {masks[(parts[1], stem)]})"))
                else:
                    masks[(parts[1], stem)] = uri
            else:
                skipped.append((uri, category, "not a mask file (expected ground_truth/<defect>/<name>_mask.png)"))
            continue
        if ext not in IMAGE_EXTENSIONS:
            skipped.append((uri, category, f"not an image file (extension {ext or 'none'})"))
            continue
        if len(parts) != 3 or parts[0] not in ("train", "test") or (parts[0] == "train" and parts[1] != "good"):
            skipped.append((uri, category, "not in the MVTec layout (expected train/good/* or test/<type>/*)"))
            continue
        candidates.append((parts, uri, info))
    used_masks = set()
    for parts, uri, info in candidates:
        split, defect_type, name = parts
        stem = posixpath.splitext(name)[0]
        label = 0 if defect_type == "good" else 1
        mask_uri = ""
        if label:
            mask_uri = masks.get((defect_type, stem), "")
            used_masks.add((defect_type, stem))
        version = storage.version_of(root, info)
        rows.append({"image_id": f"{category}/{split}/{defect_type}/{name}", "uri": uri,
                     "category": category, "split": split, "label": label,
                     "defect_type": defect_type, "mask_uri": mask_uri,
                     "size_bytes": int(info.size or 0), "version": version})
    for key, uri in masks.items():
        if key not in used_masks:
            skipped.append((uri, category, "mask without a matching test image"))
    return rows, skipped
