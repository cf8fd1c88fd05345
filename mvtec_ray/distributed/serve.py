"""Ray Serve glue of the online service: one deployment, dynamic batching, autoscaling, the web page.

One replica holds the backbone and every model of its categories (:class:`~mvtec_ray.deploy.api.ScoringService`);
concurrent requests are batched (``@serve.batch``) into one backbone pass. ``serve deploy
cluster/serve.yaml`` and KubeRay's RayService use :func:`app_builder`; ``mvtec-ray serve`` uses
:func:`run_service`.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from mvtec_ray.config import RunConfig, load_config
from mvtec_ray.deploy.api import (
    MAX_BODY_BYTES,
    MAX_CONCURRENT_DECODES,
    SERVE_MAX_IMAGE_PIXELS,
    ApiError,
    ScoringService,
    check_token,
    read_body,
    require_token_or_anonymous,
    service_token_digest,
)
from mvtec_ray.errors import UserError

log = logging.getLogger(__name__)
APP_NAME = "mvtec-ray"


class ServeArgs(BaseModel):
    """Arguments of :func:`app_builder` (``args:`` in a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    models: str
    config: str | None = Field(None, description="YAML config (S3 endpoint, decode limits); flags win")
    categories: list[str] | None = None
    detectors: list[str] | None = None
    token_sha256: str | None = Field(None, description="sha256 of the bearer token; without it each replica "
                                     "reads MVTEC_RAY_TOKEN from its environment")
    allow_anonymous: bool = Field(False, description="serve without a bearer token; without it (and without a "
                                  "token) the application refuses to start instead of being open")
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024, description="largest request body, bytes (413 over it, "
                                "counted while the body streams in)")
    max_image_pixels: int = Field(SERVE_MAX_IMAGE_PIXELS, ge=1, description="largest image decoded, pixels (413 "
                                  "over it); the lower of this and the config's extract.max_image_pixels applies")
    max_concurrent_decodes: int = Field(MAX_CONCURRENT_DECODES, ge=1, le=64, description="decodes one replica runs "
                                        "at once (the rest wait): a replica's decode memory is this x "
                                        "max_image_pixels x ~8 bytes")
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    num_cpus: float = Field(1, gt=0)
    #: GPUs per replica; None = one when the cluster has GPUs
    num_gpus: float | None = Field(None, ge=0)


def _page() -> bytes:
    return resources.files("mvtec_ray").joinpath("deploy/web/index.html").read_bytes()


@serve.deployment(name="scoring", max_ongoing_requests=32, health_check_period_s=10)
class ScoringDeployment:
    def __init__(self, models: str, config: RunConfig | None, categories: list[str] | None,
                 detectors: list[str] | None, token_sha256: str | None, max_body_bytes: int,
                 max_batch_size: int, batch_wait_timeout_s: float, threads: int, allow_anonymous: bool = False,
                 max_image_pixels: int = SERVE_MAX_IMAGE_PIXELS,
                 max_concurrent_decodes: int = MAX_CONCURRENT_DECODES):
        # this replica's own environment decides too: a node without the token never serves openly
        self.token_sha256 = service_token_digest(token_sha256)
        require_token_or_anonymous(self.token_sha256, allow_anonymous, "the scoring replica")
        import ray
        import torch

        from mvtec_ray.threads import pin_threads
        self._threads = pin_threads(threads)  # Ray pins a num_cpus=1 worker to one thread
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.service = ScoringService(models, config, categories, detectors, device=device,
                                      max_body_bytes=max_body_bytes, max_image_pixels=max_image_pixels,
                                      max_concurrent_decodes=max_concurrent_decodes)
        self.page = _page()
        self.score_batch.set_max_batch_size(max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def score_batch(self, requests: list) -> list:
        started = time.perf_counter()
        scored = await asyncio.get_running_loop().run_in_executor(None, self.service.score, requests)
        elapsed = (time.perf_counter() - started) * 1000
        return [(s, elapsed) for s in scored]

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response
        started = time.perf_counter()
        path, method = request.url.path.rstrip("/") or "/", request.method
        try:
            if path == "/" and method == "GET":
                return Response(self.page, media_type="text/html; charset=utf-8")
            if path == "/healthz" and method == "GET":
                return JSONResponse({"status": "ok", "models": len(self.service.plan.pairs)})
            if path == "/v1/models" and method == "GET":
                check_token(request.headers.get("authorization"), self.token_sha256)
                return JSONResponse(self.service.models_info())
            if path == "/v1/score":
                if method != "POST":
                    raise ApiError(405, "use POST with the image as the body or as multipart field 'file'")
                check_token(request.headers.get("authorization"), self.token_sha256)
                # streamed and counted: a chunked upload without Content-Length stops at the limit too
                body = await read_body(request.stream(), self.service.max_body_bytes,
                                       request.headers.get("content-length"))
                item = await asyncio.get_running_loop().run_in_executor(
                    None, self.service.parse, dict(request.query_params), body, request.headers.get("content-type"))
                scored, score_ms = await self.score_batch(item)
                return JSONResponse(self.service.answer(item, scored, score_ms,
                                                        (time.perf_counter() - started) * 1000))
            raise ApiError(404, f"no such endpoint: {method} {path} (GET /, /healthz, /v1/models; POST /v1/score)")
        except ApiError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)


def build_app(args: ServeArgs, config: RunConfig | None = None):
    """The Serve application for ``args`` (``config`` overrides ``args.config``)."""
    import ray
    # refused here, before anything is deployed, when neither a token nor allow_anonymous is given
    require_token_or_anonymous(service_token_digest(args.token_sha256), args.allow_anonymous,
                               "the mvtec-ray Serve application")
    if config is None:
        config = load_config(args.config) if args.config else RunConfig()
    gpus = args.num_gpus
    if gpus is None:
        gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    deployment = ScoringDeployment.options(
        autoscaling_config={"min_replicas": args.min_replicas, "initial_replicas": max(args.min_replicas, 1),
                            "max_replicas": max(args.max_replicas, args.min_replicas, 1),
                            "target_ongoing_requests": args.target_ongoing_requests},
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": gpus})
    return deployment.bind(args.models, config, args.categories, args.detectors, args.token_sha256,
                           args.max_body_bytes, args.max_batch_size, args.batch_wait_timeout_s,
                           max(1, int(args.num_cpus)), args.allow_anonymous, args.max_image_pixels,
                           args.max_concurrent_decodes)


def app_builder(args: dict[str, Any]):
    """Entry for ``serve deploy`` / ``serve run`` (import path ``mvtec_ray.distributed.serve:app_builder``)."""
    return build_app(ServeArgs(**args))


def start(args: ServeArgs, config: RunConfig, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Start Serve's HTTP proxy on ``host:port`` and deploy the application; return its URL once ready."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args, config), name=APP_NAME, route_prefix="/", blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{port}/"


def run_service(args: ServeArgs, config: RunConfig, host: str, port: int) -> int:
    """``mvtec-ray serve``: start, print the URL, serve until Ctrl-C or SIGTERM, then stop cleanly."""
    import ray

    from mvtec_ray.deploy.loaded_models import plan_models
    from mvtec_ray.distributed.cluster import connect
    from mvtec_ray.storage import Storage, printable_text
    # every model checked here first: a bad folder is one line, not a replica crash loop
    plan_models(config, Storage(config.s3), args.models, args.detectors, args.categories)
    connect(config.ray)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            url = start(args, config, host, port)
        except RuntimeError as exc:
            raise UserError(f"the service did not start: {str(exc).splitlines()[0][:300]}") from None
        print(printable_text(f"serving {args.models} at {url} (Ctrl-C to stop)"), flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping", flush=True)
    finally:
        try:
            serve.delete(APP_NAME)
            if not config.ray.address:
                serve.shutdown()  # our own embedded Ray; on a cluster, other applications stay up
        except Exception as exc:  # noqa: BLE001 - stopping anyway
            log.warning("stopping Serve: %s", exc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ray.shutdown()
    return 0
