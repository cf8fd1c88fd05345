"""Extraction throughput: bare PyTorch loop vs one-image-at-a-time (the original project's style)
vs the Ray Data pipeline, on the same generated MVTec-size PNGs, in one run.

    python pipelines/benchmark_extract.py [--images 300] [--size 900] [--backbone resnet50] [--batch-size 16]
        [--variants 'actors=1,torch_threads=2;...'] [--repeats N]

Speed does not depend on the weights' values: without cached ImageNet weights the backbone runs
with random weights (said in the output). Prints images/s of each and, last, ``ray/bare=<ratio>``
at steady state (cluster start and actor start-up reported separately; an untimed warm-up run
starts Ray's worker processes first). On a shared machine the wall clock moves with the others'
load, so each Ray run is compared with a bare loop run just before it, and CPU seconds per image
(all Ray processes included) are printed too.
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
    # the generator's own output stays outside the dataset root (root/data) that gets catalogued
    generate_sample_dataset(root / "_base", categories=["carpet_like"], spec=SampleSpec(
        n_train=8, n_test_good=1, n_test_defect_per_type=1, size=size))
    bases = sorted((root / "_base" / "carpet_like" / "train" / "good").glob("*.png"))
    train = root / "data" / "bench" / "train" / "good"
    train.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        pixels = np.asarray(Image.open(bases[i % len(bases)]).convert("RGB")).astype(np.int16)
        pixels = np.clip(pixels + rng.integers(-3, 4, size=(1, 1, 3)), 0, 255).astype(np.uint8)
        path = train / f"{i:04d}.png"
        Image.fromarray(pixels).save(path, compress_level=1)
        paths.append(path)
    test = root / "data" / "bench" / "test" / "good"
    test.mkdir(parents=True)
    Image.open(paths[0]).save(test / "0000.png")
    return paths


def tree_cpu_seconds() -> dict[int, float]:
    """pid -> CPU seconds of this process and all its descendants (Ray's raylet, workers, ...): on
    a shared machine, CPU per image is what the wall clock cannot tell."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, times = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
    mine, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in mine]
        mine.update(children)
        frontier.extend(children)
    return {pid: times[pid] for pid in mine if pid in times}


def process_name(pid: int) -> str:
    """A short label: Ray sets worker titles to ray::<task or actor>."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            words = handle.read().split(b"\0")
    except OSError:
        return "?"
    if pid == os.getpid():
        return "driver"
    text = words[0].decode(errors="replace")
    if text.startswith("ray::"):
        return text.split(" ")[0]
    names = [os.path.basename(w.decode(errors="replace")) for w in words[:3] if w]
    return next((n for n in names if n.endswith(".py") or n in ("raylet", "gcs_server")), names[0] if names else "?")


class Timeline(list):
    """run_extraction's progress list, also adding up CPU seconds between written batches
    (per process, so workers that exit in between do not subtract their past)."""

    def __init__(self):
        super().__init__()
        self.cpu: list[float] = []
        self.by_process: dict[str, float] = {}  # steady-state CPU seconds per process title
        self._last: dict[int, float] = {}
        self.started = 0

    def append(self, item) -> None:
        now = tree_cpu_seconds()
        used = {pid: max(0.0, t - self._last.get(pid, 0.0)) for pid, t in now.items()}
        if self.cpu:
            for pid, seconds in used.items():
                if seconds:
                    name = process_name(pid)
                    self.by_process[name] = self.by_process.get(name, 0.0) + seconds
                if pid not in self._last:  # a process started since the last batch (Ray worker churn)
                    self.by_process["(new processes)"] = self.by_process.get("(new processes)", 0.0) + seconds
                    self.started += 1
        self.cpu.append((self.cpu[-1] + sum(used.values())) if self.cpu else 0.0)
        self._last = now
        super().append(item)


def bare_loop(paths, model, batch_size: int, image_size: int) -> tuple[float, float]:
    """(images/s, CPU seconds per image)."""
    import torch
    from mvtec_ray.images import decode_image
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(paths), batch_size):
        batch = np.stack([decode_image(p.read_bytes(), image_size) for p in paths[i:i + batch_size]])
        model(torch.from_numpy(batch))
    return len(paths) / (time.perf_counter() - started), (time.process_time() - cpu) / len(paths)


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


def parse_variants(text: str) -> list[dict]:
    """``"actors=2,torch_threads=1;batch_size=32"`` -> ExtractConfig overrides per variant ("" = defaults)."""
    import json
    variants = []
    for chunk in text.split(";"):
        overrides = {}
        for item in filter(None, (part.strip() for part in chunk.split(","))):
            key, _, value = item.partition("=")
            try:
                overrides[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                overrides[key.strip()] = value.strip()
        variants.append(overrides)
    return variants


def ray_run(root: Path, catalog, config, weights, run: int) -> tuple[float, float, float, float, float]:
    """(end-to-end img/s, seconds, seconds to the first written batch, steady-state img/s,
    steady-state CPU seconds per image over all Ray processes and the driver)."""
    from mvtec_ray.extract import run_extraction
    from mvtec_ray.storage import Storage
    timeline = Timeline()
    result = run_extraction(catalog, str(root / f"features-{run}"), config, Storage(), weights, progress=timeline)
    total_rows = sum(n for _, n in timeline)
    first_time, first_rows = timeline[0]
    steady = (total_rows - first_rows) / max(1e-9, timeline[-1][0] - first_time)
    cpu = (timeline.cpu[-1] - timeline.cpu[0]) / max(1, total_rows - first_rows)
    rows = max(1, total_rows - first_rows)
    top = sorted(timeline.by_process.items(), key=lambda kv: -kv[1])[:8]
    print(f"    steady state: {timeline.started} processes started; CPU-s/img by process: "
          + ", ".join(f"{name} {sec / rows:.3f}" for name, sec in top))
    return total_rows / result.seconds, result.seconds, first_time, steady, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=900)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed-style-images", type=int, default=60, help="images for the slow one-at-a-time loop")
    parser.add_argument("--variants", default="", help="ExtractConfig overrides to compare, ';' between variants, "
                        "e.g. 'actors=1,torch_threads=2;actors=2,torch_threads=1' ('' = the defaults)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (bare loop, each variant)")
    parser.add_argument("--stats", action="store_true", help="print Ray Data's per-operator stats of each run")
    args = parser.parse_args()
    if args.stats:
        import logging
        logging.basicConfig(format="%(message)s")
        logging.getLogger("mvtec_ray.extract").setLevel(logging.DEBUG)
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
    variants = parse_variants(args.variants)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        paths = make_images(root, args.images, args.size)
        print(f"generated {len(paths)} PNGs of {args.size}x{args.size} in {time.perf_counter() - started:.1f}s")
        model(torch.zeros((2, args.image_size, args.image_size, 3), dtype=torch.uint8))  # warm-up

        seed = None
        if args.seed_style_images:
            seed = seed_style(paths[:args.seed_style_images], model, args.image_size)
            print(f"one image at a time ({args.seed_style_images} images): {seed:.2f} img/s")

        from mvtec_ray.catalog import build_catalog
        from mvtec_ray.config import ExtractConfig, RayConfig
        from mvtec_ray.extract import cluster_plan
        from mvtec_ray.pipeline import connect
        from mvtec_ray.storage import Storage
        started = time.perf_counter()
        connect(RayConfig())
        print(f"ray start: {time.perf_counter() - started:.1f}s")
        catalog = build_catalog(str(root / "data"), Storage())
        # "env.NAME=value" sets a driver environment variable for that variant (experiments)
        configs = [ExtractConfig(**{"backbone": args.backbone, "weights": "imagenet" if weights.pretrained else "random",
                                    "image_size": args.image_size, "batch_size": args.batch_size,
                                    "holdout_fraction": 0.0, "synthetic_per_image": 0,
                                    **{k: v for k, v in overrides.items() if not k.startswith("env.")}})
                   for overrides in variants]
        # warm-up (not timed): start Ray's worker processes and their imports, as on a running cluster
        from dataclasses import replace
        started = time.perf_counter()
        ray_run(root, replace(catalog, entries=catalog.entries.iloc[:2 * args.batch_size]), configs[0], weights, -1)
        print(f"warm-up run ({2 * args.batch_size} images): {time.perf_counter() - started:.1f}s")
        ratios: dict[int, list[float]] = {i: [] for i in range(len(configs))}
        run = 0
        for repeat in range(args.repeats):
            for i, (overrides, config) in enumerate(zip(variants, configs)):
                # bare right before each Ray run: the machine is shared, so compare neighbours only
                bare, bare_cpu = bare_loop(paths, model, args.batch_size, args.image_size)
                print(f"[{repeat}] bare loop (batch {args.batch_size}, {args.threads} threads): {bare:.2f} img/s, "
                      f"{bare_cpu:.3f} CPU-s/img")
                env = {k[4:]: str(v) for k, v in overrides.items() if k.startswith("env.")}
                saved = {k: os.environ.get(k) for k in env}
                os.environ.update(env)
                try:
                    end_to_end, seconds, first, steady, ray_cpu = ray_run(root, catalog, config, weights, run)
                finally:
                    for k, v in saved.items():
                        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
                run += 1
                label = ",".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
                print(f"[{repeat}] ray data pipeline ({label}; plan {cluster_plan(config)}): {end_to_end:.2f} img/s "
                      f"end to end ({seconds:.1f}s, of which {first:.1f}s until the first batch was written: "
                      f"actor start-up and pipeline fill), {steady:.2f} img/s at steady state, "
                      f"{ray_cpu:.3f} CPU-s/img, ray/bare={steady / bare:.2f}")
                ratios[i].append(steady / bare)
        if seed is not None:
            print(f"one-at-a-time/bare={seed / bare:.2f}")
        for i, overrides in enumerate(variants):
            label = ",".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
            values = ", ".join(f"{r:.2f}" for r in ratios[i])
            print(f"variant {label}: ray/bare per round {values}; median {float(np.median(ratios[i])):.2f}")
        print(f"ray/bare={float(np.median(ratios[0])):.2f}")


if __name__ == "__main__":
    main()
