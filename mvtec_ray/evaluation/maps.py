"""The one resize of an anomaly map or a mask, shared by the pixel metrics, the overlays and the report.

Bilinear maps go through ``torch.nn.functional.interpolate`` (``align_corners=False``, no
antialiasing), the call the pixel protocol has always used, so the pixel metrics do not move;
masks go through Pillow's nearest neighbour, so they stay binary. torch and Pillow are imported
on use: importing this module costs nothing.
"""
from __future__ import annotations

import numpy as np


def resize_map(array: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """``array`` (2-D) at ``shape`` (height, width).

    ``nearest=False``: an anomaly map, float32, bilinear (a map of that shape already comes back
    as contiguous float32). ``nearest=True``: a mask, bool, nearest neighbour.
    """
    shape = (int(shape[0]), int(shape[1]))
    if nearest:
        mask = np.asarray(array, dtype=bool)
        if mask.shape == shape:
            return mask
        from PIL import Image
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
        return np.asarray(resized) > 127
    values = np.ascontiguousarray(array, dtype=np.float32)
    if values.shape == shape:
        return values
    import torch
    t = torch.from_numpy(values)[None, None]
    return torch.nn.functional.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()
