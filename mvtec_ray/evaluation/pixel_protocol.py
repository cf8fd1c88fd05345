"""The pixel evaluation protocol: at which resolution anomaly maps meet ground-truth masks.

* ``full`` (default, the MVTec AD protocol): every map is upsampled to its ground-truth mask's
  own resolution, read from the mask file itself (``mask_uri``); a good image's mask is empty at
  the source image's size. With the centre-crop preprocessing (``extract.resize_to``) the map
  covers the crop's region of the original, and the mask is cropped to that region.
* With ``extract.resize: pad`` the model sees the image centred in a padded square; every map
  is cropped to the image's own box (:func:`images.content_box`) before it is resized onto the
  mask, so padding never counts as a pixel, in full, reduced and validation maps alike.
* ``reduced``: maps and masks at ``pixel_eval_size`` square (masks: the stored ``image_size`` mask,
  downsampled with nearest neighbour). Faster; thin defects can vanish from the mask. Named in
  the results table (``pixel_eval = "128px"``).

Maps are smoothed at the model's input resolution (see ``detectors.patch.upsample_smooth``), so
they do not depend on the evaluation size.
Every resize of a map (bilinear) or a mask (nearest) here is :func:`mvtec_ray.evaluation.maps.resize_map`,
the one the overlays and the report use too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mvtec_ray.data.images import content_box, crop_box, decode_mask, decode_mask_png
from mvtec_ray.errors import StorageUnavailable
from mvtec_ray.evaluation.maps import resize_map
from mvtec_ray.storage import Storage


class MaskUnreadable(ValueError):
    """One image's ground-truth mask cannot be read (that image is left out, not the whole cell)."""


@dataclass(frozen=True)
class PixelProtocol:
    mode: str            # "full" | "reduced"
    reduced_size: int    # pixel_eval_size
    input_size: int      # the model's input (extract.image_size)
    resize_to: int | None = None  # extract.resize_to (centre crop), None without
    resize: str = "stretch"       # extract.resize

    @property
    def label(self) -> str:
        """The ``pixel_eval`` value of the results table."""
        return "full" if self.mode == "full" else f"{self.reduced_size}px"

    def ground_truth(self, storage: Storage, mask_uri: str, mask_png: bytes,
                     source_hw: tuple[int, int]) -> np.ndarray:
        """The bool mask the map of one image is compared with (its shape is the map's)."""
        if self.mode != "full":
            size = self.reduced_size
            if self.resize == "pad":
                top, left, h, w = content_box(*(int(v) for v in source_hw), size)
                if not mask_png:
                    return np.zeros((h, w), bool)
                return resize_map(self._content(decode_mask_png(mask_png), source_hw), (h, w), nearest=True)
            if not mask_png:
                return np.zeros((size, size), bool)
            return resize_map(decode_mask_png(mask_png), (size, size), nearest=True)
        if mask_uri:
            try:
                mask = decode_mask(storage.read_bytes(mask_uri), None)
            except StorageUnavailable as exc:  # storage down, not a bad file: the cell fails, named
                raise ValueError(f"cannot read the ground-truth mask {mask_uri}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - named, one line, in the cell's problems
                raise MaskUnreadable(f"cannot read the ground-truth mask {mask_uri} for the full-resolution "
                                 f"pixel evaluation ({type(exc).__name__}: {exc}); "
                                 f"or set evaluation.pixel_eval: reduced") from None
            height, width = mask.shape
        else:
            height, width = (int(v) for v in source_hw)
            if height <= 0 or width <= 0:
                raise ValueError("the source image's size is unknown (features of an older version); extract again")
            mask = None
        top, left, bottom, right = crop_box(height, width, self.input_size, self.resize_to)
        if mask is None:
            return np.zeros((bottom - top, right - left), bool)
        return np.ascontiguousarray(mask[top:bottom, left:right])

    def maps(self, detector, patch_scores: np.ndarray, shapes: list[tuple[int, int]],
             source_hws) -> list[np.ndarray]:
        """The maps of one batch, each at its ground truth's ``shape`` (see :meth:`ground_truth`)."""
        return self.at_truth(self.input_maps(detector, patch_scores), shapes, source_hws)

    def input_maps(self, detector, patch_scores: np.ndarray) -> np.ndarray:
        """The smoothed maps of one batch at the model's input size, ``(n, s, s)``: upsampled and
        blurred once per image; :meth:`at_truth` and :meth:`at_size` only resize them (what
        ``maps_from_patch_scores`` at any other size would do after the same blur)."""
        return detector.maps_from_patch_scores(patch_scores, (self.input_size,) * 2, self.input_size)

    def at_truth(self, input_maps: np.ndarray, shapes: list[tuple[int, int]], source_hws) -> list[np.ndarray]:
        """:meth:`input_maps` at each ground truth's ``shape``, padding removed first."""
        return [resize_map(self._content(m, hw), shape) for m, hw, shape in zip(input_maps, source_hws, shapes)]

    @staticmethod
    def at_size(input_maps: np.ndarray, size: int) -> list[np.ndarray]:
        """:meth:`input_maps` as ``size`` squares (the saved maps; padding kept)."""
        return [resize_map(m, (size, size)) for m in input_maps]

    def input_frame(self, maps: np.ndarray, masks: list[np.ndarray], source_hws) -> tuple[list, list]:
        """Validation maps and masks at the input size, as lists of 2-D arrays, padding removed."""
        if self.resize != "pad":
            return list(maps), list(masks)
        return ([self._content(m, hw) for m, hw in zip(maps, source_hws)],
                [self._content(m, hw) for m, hw in zip(masks, source_hws)])

    def _content(self, square: np.ndarray, source_hw) -> np.ndarray:
        """The image's own box of an input-size square (the whole square unless padded)."""
        if self.resize != "pad":
            return square
        top, left, h, w = content_box(*(int(v) for v in source_hw), square.shape[0])
        return square[top:top + h, left:left + w]


def maps_at(detector, patch_scores: np.ndarray, shapes: list[tuple[int, int]], input_size: int) -> list[np.ndarray]:
    """One anomaly map per image at its own ``shape`` (images of one shape go together)."""
    out: list[np.ndarray | None] = [None] * len(shapes)
    for shape in dict.fromkeys(shapes):
        index = [i for i, s in enumerate(shapes) if s == shape]
        maps = detector.maps_from_patch_scores(patch_scores[index], shape, input_size)
        for i, m in zip(index, maps):
            out[i] = m
    return out  # type: ignore[return-value]

