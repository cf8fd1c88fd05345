"""The staged layout's GPU side without Ray: embed rate, PatchCore search rate and CPU decode rate.

    python benchmarks/gpu_embed.py [--device cuda] [--batch-sizes 32,64,128] [--banks 48000,200000] [--quick]

What a GPU extractor actor runs (:class:`~mvtec_ray.distributed.extraction.Extractor`):
:func:`~mvtec_ray.features.backbones.embed_images` on ``prepare_for_device(FeatureExtractor(...), device)``,
uint8 NHWC batches in, pooled vectors, patch maps and PaDiM maps back in host memory. Without Ray
(``benchmarks/extract.py`` needs it; its wheel is too large for some GPU machines) this measures
that path alone, plus:

* ``embed_img_per_s/bs=N=``: embed_images, patches and PaDiM on, host to host (pinned upload,
  fp16 autocast on CUDA, the feature maps copied back), after warm-up, the device synchronised;
* ``embed_fp32_img_per_s/bs=N=``: the same with autocast off (CUDA only);
* ``forward_gpu_only_img_per_s/bs=N=``: the model alone on a batch already on the device;
* ``knn_ms_per_image/bank=N=``: PatchCore-style exact nearest-neighbour search of an image's patch
  vectors (28x28 at 224 px) against a bank of N rows, fp16 matmul distances, chunked over the bank;
  ``knn_fp64_head_ms_per_image/bank=N=``: the export head's float64 search
  (:func:`~mvtec_ray.detectors.torch_heads.mean_nearest_distance`) for comparison;
* ``decode_img_per_s_one_core=``: :func:`~mvtec_ray.data.images.decode_image` of 900x900 PNGs to
  224 px in one process, and ``decode_img_per_s_procs=N=`` with N processes: how many CPU
  decoders one GPU actor needs.

The backbone has RANDOM weights (none are fetched): throughput does not depend on their values,
so every figure is a speed, never a quality.
"""
from __future__ import annotations

import os
import time

import common  # first: the benchmarks' shared start (sys.path)

SEED = 0


def figure(name: str, value: float, digits: int = 1) -> None:
    print(f"{name}={value:.{digits}f}", flush=True)


# -- CPU decode -----------------------------------------------------------------
def make_pngs(n: int, size: int) -> list[bytes]:
    """``n`` distinct PNGs of ``size`` px (the generated carpet-like texture plus a colour shift), as bytes."""
    import tempfile
    from pathlib import Path

    from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        generate_sample_dataset(base, categories=["carpet_like"], spec=SampleSpec(
            n_train=min(n, 4), n_test_good=1, n_test_defect_per_type=1, size=size))
        sources = sorted((base / "carpet_like" / "train" / "good").glob("*.png"))
        common.noisy_copies(sources, Path(tmp) / "copies", n, amplitude=3, per_pixel=False)
        files = sorted((Path(tmp) / "copies").glob("*.png"))
        return [f.read_bytes() for f in files]


def _decode_all(blobs: list[bytes], size: int, seconds: float) -> tuple[int, float]:
    """Decode ``blobs`` round-robin for about ``seconds``; (images, elapsed)."""
    from mvtec_ray.data.images import decode_image
    decode_image(blobs[0], size)  # imports, first-call costs
    count, started = 0, time.perf_counter()
    while True:
        decode_image(blobs[count % len(blobs)], size)
        count += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and count >= len(blobs):
            return count, elapsed


def bench_decode(args) -> float:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    made = time.perf_counter()
    blobs = make_pngs(args.decode_images, args.decode_size)
    print(f"decode: {len(blobs)} PNGs of {args.decode_size}x{args.decode_size} px, mean "
          f"{sum(map(len, blobs)) / len(blobs) / 1024:.0f} KiB, made in {time.perf_counter() - made:.1f} s; "
          f"decoded to {args.image_size} px with mvtec_ray.data.images.decode_image", flush=True)
    count, elapsed = _decode_all(blobs, args.image_size, args.decode_seconds)
    one = count / elapsed
    figure("decode_img_per_s_one_core", one)
    procs = args.decode_procs or os.cpu_count() or 1
    if procs > 1:
        # spawn: no forked copy of a process that may hold a CUDA context
        with ProcessPoolExecutor(procs, mp_context=get_context("spawn")) as pool:
            list(pool.map(_decode_all, [blobs[:2]] * procs, [args.image_size] * procs, [0.0] * procs))  # start
            results = list(pool.map(_decode_all, [blobs] * procs, [args.image_size] * procs,
                                    [args.decode_seconds] * procs))
        total = sum(c / e for c, e in results)
        figure(f"decode_img_per_s_procs={procs}", total)
        figure(f"decode_scaling_procs={procs}/one", total / one, 2)
    return one


# -- GPU embed --------------------------------------------------------------------
def embed_no_autocast(model, images, with_patches: bool, with_padim: bool):
    """:func:`embed_images` with autocast off (fp32 on CUDA): the same steps otherwise."""
    import numpy as np
    import torch
    device = model.mean.device
    tensor = torch.from_numpy(np.require(images, np.uint8, ["C", "W"]))
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    pooled, patches, padim = model(tensor, with_patches=with_patches, with_padim=with_padim)

    def half(t):
        return t.to(torch.float16).cpu().numpy() if t is not None else None
    return pooled.float().cpu().numpy(), half(patches), half(padim)


def sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_rate(call, batch: int, device: str, warmup: int, seconds: float, min_batches: int) -> float:
    """Images per second of ``call()`` (one batch of ``batch`` images) after ``warmup`` calls."""
    for _ in range(warmup):
        call()
    sync(device)
    done, started = 0, time.perf_counter()
    while True:
        call()
        done += 1
        sync(device)
        elapsed = time.perf_counter() - started
        if done >= min_batches and elapsed >= seconds:
            return done * batch / elapsed


def bench_embed(args) -> dict[int, float]:
    import numpy as np
    import torch

    from mvtec_ray.config import ExtractConfig
    from mvtec_ray.features.backbone_specs import BACKBONES
    from mvtec_ray.features.backbones import FeatureExtractor, embed_images, prepare_for_device, resolve_weights

    defaults = ExtractConfig()
    weights = resolve_weights(args.backbone, "random")
    print(f"embed: backbone {args.backbone}, weights {weights.weights_id}: RANDOM weights, the figures are "
          f"throughput only; image_size {args.image_size}, patch_dim {defaults.patch_dim} and "
          f"padim_channels {defaults.padim_channels} (ExtractConfig defaults; the backbone's "
          f"{BACKBONES[args.backbone].padim_channels}), patches and PaDiM on", flush=True)
    model = prepare_for_device(FeatureExtractor(BACKBONES[args.backbone], weights.state_dict, defaults.patch_dim,
                                                defaults.padim_channels), args.device)
    cuda = args.device.startswith("cuda")
    print("embed: embed_images runs " + ("fp16 autocast on a channels_last model (prepare_for_device); "
                                         "fp32 below = autocast off (cuDNN's default TF32 convolutions)"
                                         if cuda else "float32 on CPU"), flush=True)
    rng = np.random.default_rng(SEED)
    rates = {}
    shapes_shown = False
    for bs in args.batch_sizes:
        images = rng.integers(0, 256, size=(bs, args.image_size, args.image_size, 3), dtype=np.uint8)
        if not shapes_shown:
            pooled, patches, padim = embed_images(model, images[:1], True, True)
            print(f"embed: per image pooled {pooled.shape[1:]} {pooled.dtype}, patches {patches.shape[1:]} "
                  f"{patches.dtype}, padim {padim.shape[1:]} {padim.dtype}: "
                  f"{(patches.nbytes + padim.nbytes + pooled.nbytes) / 2**20:.2f} MiB back to the host", flush=True)
            shapes_shown = True
        rate = timed_rate(lambda: embed_images(model, images, True, True), bs, args.device, args.warmup,
                          args.seconds, args.min_batches)
        rates[bs] = rate
        figure(f"embed_img_per_s/bs={bs}", rate)
        if cuda:
            fp32 = timed_rate(lambda: embed_no_autocast(model, images, True, True), bs, args.device, args.warmup,
                              args.seconds, args.min_batches)
            figure(f"embed_fp32_img_per_s/bs={bs}", fp32)
            figure(f"embed_fp16/fp32/bs={bs}", rate / fp32, 2)
            on_device = torch.from_numpy(images).to(args.device)

            def forward_only():
                with torch.autocast("cuda", dtype=torch.float16):
                    model(on_device, with_patches=True, with_padim=True)
            figure(f"forward_gpu_only_img_per_s/bs={bs}", timed_rate(forward_only, bs, args.device, args.warmup,
                                                                     args.seconds, args.min_batches))
            print(f"cuda_peak_mem_mib/bs={bs}={torch.cuda.max_memory_allocated() / 2**20:.0f}", flush=True)
            torch.cuda.reset_peak_memory_stats()
    model = None  # free the GPU memory before the search
    if cuda:
        torch.cuda.empty_cache()
    return rates


# -- GPU nearest-neighbour search (PatchCore scoring proxy) -------------------------
def nearest_sq_fp16(queries, bank, bank_sq, chunk: int):
    """Squared L2 distance of each query row to its nearest ``bank`` row: fp16 matmuls, fp32 minima."""
    import torch
    best = torch.full((queries.shape[0],), float("inf"), device=queries.device)
    for start in range(0, bank.shape[0], chunk):
        dots = queries @ bank[start:start + chunk].T  # fp16 tensor-core matmul
        part = (bank_sq[start:start + chunk][None, :] - 2.0 * dots.float()).amin(1)
        best = torch.minimum(best, part)
    return (best + queries.float().pow(2).sum(1)).clamp_min(0)


def bench_knn(args) -> None:
    import torch

    from mvtec_ray.detectors.torch_heads import mean_nearest_distance
    gen = torch.Generator(device=args.device).manual_seed(SEED)
    dim, per_image = args.patch_channels, args.grid * args.grid
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    print(f"knn: {per_image} patch vectors per image ({args.grid}x{args.grid}), {dim}-d (ResNet50 layer2+layer3), "
          f"{args.knn_images} images per query batch, bank chunks of {args.knn_chunk} rows, {dtype} matmuls; "
          f"random vectors (speed only)", flush=True)
    for rows in args.banks:
        bank = torch.randn(rows, dim, device=args.device, generator=gen).to(dtype)
        bank_sq = bank.float().pow(2).sum(1)
        queries = torch.randn(args.knn_images * per_image, dim, device=args.device, generator=gen).to(dtype)

        def search():
            d2 = nearest_sq_fp16(queries, bank, bank_sq, args.knn_chunk)
            return d2.sqrt().reshape(args.knn_images, per_image).amax(1)  # image score: max patch score
        rate = timed_rate(search, args.knn_images, args.device, args.warmup, args.seconds, args.min_batches)
        figure(f"knn_ms_per_image/bank={rows}", 1000.0 / rate, 3)
        # the export head's exact float64 search on one image, and how far fp16 is from it
        one = queries[:per_image]
        bank64 = bank.double()
        exact = mean_nearest_distance(one, bank64, 1)
        approx = nearest_sq_fp16(one, bank, bank_sq, args.knn_chunk).sqrt().double()
        print(f"knn_fp16_max_rel_err/bank={rows}={((approx - exact).abs() / exact).max().item():.2e}", flush=True)
        head = timed_rate(lambda: mean_nearest_distance(one, bank64, 1), 1, args.device, 1,
                          min(args.seconds, 2.0), 2)
        figure(f"knn_fp64_head_ms_per_image/bank={rows}", 1000.0 / head, 2)
        bank = bank64 = bank_sq = queries = None  # free before the next bank
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def stage(name: str, skip: set[str], run, args):
    """``run(args)``, unless skipped; a failure is printed and the other stages still run."""
    if name in skip:
        return None
    try:
        return run(args)
    except Exception:  # noqa: BLE001 - one broken stage must not lose the others' figures
        import traceback
        traceback.print_exc()
        print(f"stage_failed={name}", flush=True)
        return None


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-sizes", default="32,64,128")
    p.add_argument("--banks", default="48000,200000")
    p.add_argument("--seconds", type=float, default=4.0, help="timed seconds per figure (at least)")
    p.add_argument("--min-batches", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--knn-images", type=int, default=16)
    p.add_argument("--knn-chunk", type=int, default=32768)
    p.add_argument("--decode-images", type=int, default=32)
    p.add_argument("--decode-size", type=int, default=900)
    p.add_argument("--decode-seconds", type=float, default=4.0)
    p.add_argument("--decode-procs", type=int, default=0, help="decoder processes (0: every CPU)")
    p.add_argument("--skip", default="", help="comma list of decode,embed,knn")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    args = p.parse_args()
    if args.quick:
        args.batch_sizes, args.banks, args.seconds, args.min_batches, args.warmup = "2", "2000", 0.0, 1, 1
        args.knn_images, args.knn_chunk, args.decode_images, args.decode_size = 2, 1500, 3, 300
        args.decode_seconds, args.decode_procs = 0.2, 2
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.banks = [int(b) for b in args.banks.split(",") if b]
    args.grid, args.patch_channels = args.image_size // 8, 512 + 1024  # ResNet50's stride-8 grid, layer2+layer3
    skip = set(args.skip.split(","))

    import torch
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
          + f", {os.cpu_count()} CPUs", flush=True)
    started = time.perf_counter()
    decode_rate = stage("decode", skip, bench_decode, args)
    embed_rates = stage("embed", skip, bench_embed, args)
    if decode_rate and embed_rates:
        for bs, rate in embed_rates.items():  # one-core decoders that keep one GPU actor busy
            figure(f"decoders_per_gpu_actor/bs={bs}", rate / decode_rate)
    stage("knn", skip, bench_knn, args)
    print(f"total_s={time.perf_counter() - started:.1f}", flush=True)


if __name__ == "__main__":
    main()
