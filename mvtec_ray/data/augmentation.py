"""Augmentation of training images (torchvision v2), with the parameters recorded per row."""
from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF


def sample_augmentation(rng: np.random.Generator, ops: list[str]) -> dict:
    """Draw concrete transform parameters (recorded with the row)."""
    params: dict = {}
    if "hflip" in ops and rng.random() < 0.5:
        params["hflip"] = True
    if "vflip" in ops and rng.random() < 0.5:
        params["vflip"] = True
    if "rot90" in ops:
        params["rot90"] = int(rng.integers(0, 4))
    if "affine" in ops:
        params["affine"] = {"scale": round(float(rng.uniform(0.9, 1.1)), 4),
                            "translate": [int(rng.integers(-8, 9)), int(rng.integers(-8, 9))]}
    if "blur" in ops and rng.random() < 0.3:
        params["blur_sigma"] = round(float(rng.uniform(0.3, 1.2)), 4)
    if "noise" in ops and rng.random() < 0.3:
        params["noise_std"] = round(float(rng.uniform(1.0, 6.0)), 4)
        params["noise_seed"] = int(rng.integers(0, 2**31 - 1))
    if "color" in ops:
        params["brightness"] = round(float(rng.uniform(0.9, 1.1)), 4)
        params["contrast"] = round(float(rng.uniform(0.9, 1.1)), 4)
    return params


def apply_augmentation(image: np.ndarray, params: dict) -> np.ndarray:
    """Apply recorded parameters with torchvision.transforms.v2 (uint8 HWC in and out)."""
    # writable and contiguous (a copy only when needed): torch warns on read-only arrays
    tensor = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
    if params.get("hflip"):
        tensor = TF.horizontal_flip(tensor)
    if params.get("vflip"):
        tensor = TF.vertical_flip(tensor)
    if params.get("rot90"):
        tensor = torch.rot90(tensor, k=params["rot90"], dims=(1, 2))
    if "affine" in params:
        a = params["affine"]
        tensor = TF.affine(tensor, angle=0.0, translate=a["translate"], scale=a["scale"], shear=[0.0, 0.0],
                           interpolation=TF.InterpolationMode.BILINEAR)
    if "blur_sigma" in params:
        sigma = params["blur_sigma"]
        kernel = max(3, int(2 * math.ceil(3 * sigma) + 1))
        tensor = TF.gaussian_blur(tensor, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
    if "brightness" in params:
        tensor = TF.adjust_brightness(tensor, params["brightness"])
    if "contrast" in params:
        tensor = TF.adjust_contrast(tensor, params["contrast"])
    out = tensor.permute(1, 2, 0).numpy()
    if "noise_std" in params:
        noise = np.random.default_rng(params["noise_seed"]).normal(0.0, params["noise_std"], out.shape)
        out = np.clip(out.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)
