"""Extraction throughput: bare PyTorch loop vs one-image-at-a-time (the original project's style)
vs the Ray Data pipeline, on the same generated MVTec-size PNGs, in one run.

    python pipelines/benchmark_extract.py [--images 300] [--size 900] [--backbone resnet50] [--batch-size 16]

Speed does not depend on the weights' values: without cached ImageNet weights the backbone runs
with random weights (said in the output). Prints images/s of each and, last, ``ray/bare=<ratio>``
at steady state (cluster start and actor start-up reported separately).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def make_images(root: Path, n: int, size: int) -> list[Path]:
    from PIL import Image
    from mvtec_ray.sample_data import SampleSpec, generate_sample_dataset
    generate_sample_dataset(root / "_base", categories=["carpet_like"], spec=SampleSpec(
        n_train=8, n_test_good=1, n_test_defect_per_type=1, size=size))
    bases = sorted((root / "_base" / "carpet_like" / "train" / "good").glob("*.png"))
    train = root / "bench" / "train" / "good"
    train.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        pixels = np.asarray(Image.open(bases[i % len(bases)]).convert("RGB")).astype(np.int16)
        pixels = np.clip(pixels + rng.integers(-3, 4, size=(1, 1, 3)), 0, 255).astype(np.uint8)
        path = train / f"{i:04d}.png"
        Image.fromarray(pixels).save(path, compress_level=1)
        paths.append(path)
    test = root / "bench" / "test" / "good"
    test.mkdir(parents=True)
    Image.open(paths[0]).save(test / "0000.png")
    return paths


def bare_loop(paths, model, batch_size: int, image_size: int) -> float:
    import torch
    from mvtec_ray.images import decode_image
    started = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        batch = np.stack([decode_image(p.read_bytes(), image_size) for p in paths[i:i + batch_size]])
        model(torch.from_numpy(batch))
    return len(paths) / (time.perf_counter() - started)


def seed_style(paths, model, image_size: int) -> float:
    """One image per forward pass, decoded with PIL and torchvision transforms, as the original did."""
    import torch
    from PIL import Image
    from torchvision import transforms
    transform = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.PILToTensor()])
    started = time.perf_counter()
    for path in paths:
        tensor = transform(Image.open(path).convert("RGB")).permute(1, 2, 0).unsqueeze(0)
        model(tensor)
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=900)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed-style-images", type=int, default=60, help="images for the slow one-at-a-time loop")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import torch
    from mvtec_ray.backbones import BACKBONES, FeatureExtractor, resolve_weights
    from mvtec_ray.errors import WeightsUnavailable
    try:
        weights = resolve_weights(args.backbone, "imagenet")
    except WeightsUnavailable:
        weights = resolve_weights(args.backbone, "random")
    print(f"backbone {args.backbone}, weights {weights.weights_id} (speed does not depend on the weights' values)")
    torch.set_num_threads(args.threads)
    model = FeatureExtractor(BACKBONES[args.backbone], weights.state_dict)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        paths = make_images(root, args.images, args.size)
        print(f"generated {len(paths)} PNGs of {args.size}x{args.size} in {time.perf_counter() - started:.1f}s")
        model(torch.zeros((2, args.image_size, args.image_size, 3), dtype=torch.uint8))  # warm-up

        bare = bare_loop(paths, model, args.batch_size, args.image_size)
        print(f"bare loop (batch {args.batch_size}, {args.threads} threads): {bare:.2f} img/s")
        seed = seed_style(paths[:args.seed_style_images], model, args.image_size)
        print(f"one image at a time ({args.seed_style_images} images): {seed:.2f} img/s")

        from mvtec_ray.catalog import build_catalog
        from mvtec_ray.config import ExtractConfig, RayConfig
        from mvtec_ray.extract import run_extraction
        from mvtec_ray.pipeline import connect
        from mvtec_ray.storage import Storage
        started = time.perf_counter()
        connect(RayConfig())
        print(f"ray start: {time.perf_counter() - started:.1f}s")
        config = ExtractConfig(backbone=args.backbone, weights="random" if not weights.pretrained else "imagenet",
                               image_size=args.image_size, batch_size=args.batch_size, holdout_fraction=0.0,
                               synthetic_per_image=0)
        catalog = build_catalog(str(root), Storage())
        timeline: list[tuple[float, int]] = []
        result = run_extraction(catalog, str(root / "features"), config, Storage(), weights, progress=timeline)
        total_rows = sum(n for _, n in timeline)
        first_time, first_rows = timeline[0]
        steady = (total_rows - first_rows) / max(1e-9, timeline[-1][0] - first_time)
        end_to_end = total_rows / result.seconds
        print(f"ray data pipeline: {end_to_end:.2f} img/s end to end ({result.seconds:.1f}s, of which "
              f"{first_time:.1f}s until the first batch was written: actor start-up and pipeline fill), "
              f"{steady:.2f} img/s at steady state")
        print(f"one-at-a-time/bare={seed / bare:.2f}")
        print(f"ray/bare={steady / bare:.2f}")


if __name__ == "__main__":
    main()
