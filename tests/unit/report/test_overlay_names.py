"""Overlay file names never collide: one per image id."""
from __future__ import annotations

from mvtec_ray.report.overlays import overlay_name


def test_same_stem_other_extension_or_flattened_path_gets_its_own_overlay():
    ids = ["washer/test/crack/x.png", "washer/test/crack/x.jpg", "washer/test/crack/x",
           "washer/test__crack/x.png", "washer__test/crack/x.png"]
    names = [overlay_name("patchcore", i) for i in ids]
    assert len(set(names)) == len(ids), names
    assert all(n.startswith("overlays/patchcore/washer__test__crack__x-") and n.endswith(".png") for n in names)
    assert overlay_name("patchcore", ids[0]) == overlay_name("patchcore", ids[0])  # stable
