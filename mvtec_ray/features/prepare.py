"""Source rows -> variant rows: decode once, augment, draw synthetic defects (pure; runs inside Ray Data actors)."""
from __future__ import annotations

import numpy as np

from mvtec_ray.config import ExtractConfig, params_json
from mvtec_ray.data.augmentation import apply_augmentation, sample_augmentation
from mvtec_ray.data.images import (
    DecodeError,
    DecodeLimits,
    content_box,
    decode_image,
    decode_mask,
    encode_mask_png,
    image_dimensions,
    read_image_file,
)
from mvtec_ray.data.synthetic import make_synthetic_anomaly, row_rng
from mvtec_ray.errors import StorageAccessDenied, StorageUnavailable
from mvtec_ray.storage import Storage


def _synthetic_on_content(image: np.ndarray, kind: str, rng: np.random.Generator, config: ExtractConfig,
                          source_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, dict]:
    """A synthetic defect drawn on the image itself, never on the padding of ``resize: pad``."""
    top, left, h, w = content_box(*source_hw, config.image_size) if config.resize == "pad" else (0, 0, 0, 0)
    if min(h, w) < 16:  # not padded, or a sliver too thin to draw on
        return make_synthetic_anomaly(image, kind, rng)
    inner, inner_mask, params = make_synthetic_anomaly(image[top:top + h, left:left + w], kind, rng)
    pixels, mask = image.copy(), np.zeros(image.shape[:2], bool)
    pixels[top:top + h, left:left + w], mask[top:top + h, left:left + w] = inner, inner_mask
    return pixels, mask, {**params, "content_box": [top, left, h, w]}


def prepare_batch(batch: dict[str, np.ndarray], config: ExtractConfig, storage: Storage) -> dict[str, np.ndarray]:
    """Source rows -> variant rows: decode once, then augment / draw synthetic defects.

    A source that cannot be read or decoded yields one error row per variant, never nothing.
    """
    size = config.image_size
    limits = DecodeLimits(config.max_image_pixels, config.min_image_side)
    out: dict[str, list] = {k: [] for k in ("row_id", "image_id", "source_uri", "source_version", "category",
                                            "split", "label", "defect_type", "mask_uri", "variant", "aug_params", "status",
                                            "error", "mask_png", "with_patches", "image", "source_height",
                                            "source_width")}
    blank = np.zeros((size, size, 3), np.uint8)
    for i in range(len(batch["image_id"])):
        image_id, uri = str(batch["image_id"][i]), str(batch["uri"][i])
        variants = str(batch["variants"][i]).split(",")
        base_split, label = str(batch["split"][i]), int(batch["label"][i])
        image, mask, error, source_hw = None, None, "", (0, 0)
        try:
            listed = int(batch["size_bytes"][i]) if "size_bytes" in batch else -1
            data = read_image_file(storage, uri, config.max_file_bytes, listed if listed >= 0 else None)
            image = decode_image(data, size, limits, config.resize_to, config.resize)
            source_hw = image_dimensions(data, limits)
            if label == 1 and batch["mask_uri"][i]:
                mask_data = read_image_file(storage, str(batch["mask_uri"][i]), config.max_file_bytes, what="mask")
                mask = decode_mask(mask_data, size, resize_to=config.resize_to, resize=config.resize,
                                   image_hw=source_hw)
        except DecodeError as exc:
            error = str(exc)
        except FileNotFoundError:
            error = "file disappeared before it could be read"
        except (StorageUnavailable, StorageAccessDenied):
            # storage down or credentials refused (403, expired token), not a bad image: fail the run
            # (resumable) rather than record an error row per image
            raise
        except Exception as exc:  # noqa: BLE001 - recorded per row, the run goes on
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        for variant in variants:
            split, row_label, defect_type, params, pixels, row_mask = base_split, label, str(batch["defect_type"][i]), {}, image, mask
            if error == "" and variant.startswith("aug"):
                params = sample_augmentation(row_rng(config.seed, image_id, variant), config.augmentations)
                pixels = apply_augmentation(image, params)
            elif error == "" and variant.startswith("syn"):
                rng = row_rng(config.seed, image_id, variant)
                kind = config.synthetic_kinds[int(rng.integers(len(config.synthetic_kinds)))]
                pixels, row_mask, params = _synthetic_on_content(image, kind, rng, config, source_hw)
                split, row_label, defect_type = "val_synthetic", 1, f"synthetic_{kind}"
            elif variant.startswith("syn"):
                split, row_label = "val_synthetic", 1
            out["row_id"].append(f"{image_id}#{variant}")
            out["image_id"].append(image_id)
            out["source_uri"].append(uri)
            out["source_version"].append(str(batch["version"][i]))
            out["category"].append(str(batch["category"][i]))
            out["split"].append(split)
            out["label"].append(row_label)
            out["defect_type"].append(defect_type)
            out["mask_uri"].append(str(batch["mask_uri"][i]) if split == "test" else "")
            out["variant"].append(variant)
            out["aug_params"].append(params_json(params) if params else "")
            out["status"].append("error" if error else "ok")
            out["error"].append(error)
            out["mask_png"].append(encode_mask_png(row_mask) if row_mask is not None else b"")
            out["with_patches"].append(config.patch_maps == "all" or
                                       (config.patch_maps == "originals" and not variant.startswith("aug")))
            out["image"].append(pixels if pixels is not None else blank)
            out["source_height"].append(source_hw[0])
            out["source_width"].append(source_hw[1])
    result = {key: np.asarray(values, dtype=object) for key, values in out.items()
              if key not in ("image", "label", "with_patches", "source_height", "source_width")}
    result["image"] = np.stack(out["image"]) if out["image"] else np.zeros((0, size, size, 3), np.uint8)
    result["label"] = np.asarray(out["label"], dtype=np.int8)
    result["with_patches"] = np.asarray(out["with_patches"], dtype=bool)
    for key in ("source_height", "source_width"):
        result[key] = np.asarray(out[key], dtype=np.int32)
    return result
