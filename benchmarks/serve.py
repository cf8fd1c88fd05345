"""Online scoring under a bounded load on loopback, next to in-process scoring of the same images.

    python benchmarks/serve.py --models runs/demo/models --images runs/sample-data/washer/test \\
        --category washer [--requests 500] [--clients 1,8] [--detectors knn,patchcore]

Starts the service on an embedded local Ray (HTTP on a free 127.0.0.1 port), sends ``--requests``
POST /v1/score requests per client count, then decodes and scores the same images one at a time in
this process with the same code (``ModelSet``). Prints ``name=value`` lines: p50/p99 latency (ms) and requests/s
per client count, the bare in-process images/s, and ``serve_rps/bare`` (the best served rate over
the bare rate). Every loop is bounded by the request count; the service is stopped at the end.
"""
from __future__ import annotations

import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common  # first: the benchmarks' shared start (sys.path, Ray's environment)
from measure import emit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(url: str, bodies: list[bytes], query: str, n: int, clients: int) -> dict:
    import requests
    session_per_thread: dict[int, requests.Session] = {}

    def one(i: int) -> float:
        import threading
        session = session_per_thread.setdefault(threading.get_ident(), requests.Session())
        started = time.perf_counter()
        answer = session.post(f"{url}v1/score?{query}", data=bodies[i % len(bodies)],
                              headers={"Content-Type": "image/png"}, timeout=120)
        answer.raise_for_status()
        return (time.perf_counter() - started) * 1000

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(one, range(n)))
    seconds = time.perf_counter() - started
    return {"p50_ms": statistics.median(latencies), "p99_ms": latencies[min(n - 1, int(0.99 * n))],
            "rps": n / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--models", required=True)
    parser.add_argument("--images", required=True, help="folder of images of one category")
    parser.add_argument("--category", required=True)
    parser.add_argument("--detectors", help="comma-separated (default: all fitted)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--num-cpus", type=int, default=None)
    args = parser.parse_args(argv)

    from ray import serve

    from mvtec_ray.config import RayConfig, RunConfig
    from mvtec_ray.data.images import decode_image
    from mvtec_ray.deploy.loaded_models import ModelSet, plan_models
    from mvtec_ray.distributed.cluster import connect
    from mvtec_ray.distributed.serve import ServeArgs, start
    from mvtec_ray.storage import Storage

    detectors = [d for d in (args.detectors or "").split(",") if d] or None
    paths = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:64]
    bodies = [p.read_bytes() for p in paths]
    query = f"category={args.category}" + (f"&detectors={','.join(detectors)}" if detectors else "")
    config = RunConfig(ray=RayConfig(num_cpus=args.num_cpus))
    connect(config.ray)
    url = start(ServeArgs(models=args.models, detectors=detectors, categories=[args.category], max_replicas=1),
                config, "127.0.0.1", _free_port())
    try:
        _load(url, bodies, query, min(16, args.requests), 1)  # warm-up
        best = 0.0
        for clients in (int(c) for c in args.clients.split(",")):
            result = _load(url, bodies, query, args.requests, clients)
            best = max(best, result["rps"])
            emit(**{f"serve_{key}_c{clients}": value for key, value in result.items()}, digits=2)
    finally:
        serve.shutdown()

    # the same images scored in this process, one at a time, by the same code
    from mvtec_ray.threads import pin_threads
    _blas_limit = pin_threads(max(1, args.num_cpus or os.cpu_count() or 1))  # the BLAS limit holds while it lives
    plan = plan_models(config, Storage(), args.models, detectors, [args.category])
    model_set = ModelSet.from_plan(plan, Storage())
    size, limits = plan.extract.image_size, plan.decode_limits
    model_set.score(decode_image(bodies[0], size, limits)[None], [args.category])
    started = time.perf_counter()
    for i in range(args.requests):  # decode + score, as each request does
        model_set.score(decode_image(bodies[i % len(bodies)], size, limits)[None], [args.category])
    bare = args.requests / (time.perf_counter() - started)
    emit(bare_rps=bare, digits=2)
    emit(**{"serve_rps/bare": best / bare}, digits=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
