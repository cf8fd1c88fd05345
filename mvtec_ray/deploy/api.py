"""The online scoring service without its transport: request checks, scoring, JSON answers.

The Ray Serve glue (:mod:`mvtec_ray.distributed.serve`) turns HTTP requests into calls of
:class:`ScoringService`; everything here is plain Python and testable without Ray. Images go the
batch job's way: :func:`~mvtec_ray.data.images.decode_image` with the same limits, then
:class:`~mvtec_ray.deploy.loaded_models.ModelSet` (the one feature path), so a served score equals the
batch score of the same bytes.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import io
import ipaddress
import os
import posixpath
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP

import numpy as np

from mvtec_ray.config import RunConfig
from mvtec_ray.data.images import DecodeError, DecodeLimits, decode_image
from mvtec_ray.deploy.loaded_models import ModelPlan, ModelSet, Scored, plan_models
from mvtec_ray.errors import UserError
from mvtec_ray.storage import Storage

#: environment variable holding the bearer token (when no token file is given)
TOKEN_ENV = "MVTEC_RAY_TOKEN"
#: largest request body accepted, bytes (an image over it is answered 413)
MAX_BODY_BYTES = 32 * 1024 * 1024
#: largest image the service decodes, pixels (a 4000 x 4000 photo; decoding one costs up to ~8 bytes
#: per pixel, so a 171 KiB PNG bomb can no longer cost 230 MiB); lower than extraction's limit
SERVE_MAX_IMAGE_PIXELS = 16_000_000
#: decodes one replica runs at once (the rest wait): bounds a replica's decode memory whatever
#: its max_ongoing_requests
MAX_CONCURRENT_DECODES = 2
#: patch detector whose map the answer shows, in order of preference
MAP_PREFERENCE = ("patchcore", "padim")


class ApiError(Exception):
    """A request the service refuses: HTTP ``status`` and a one-line message for ``{"error": ...}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def token_digest(token: str) -> str:
    """What the service keeps of a token: its sha256 (the token itself never travels in a config)."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


def service_token_digest(token_sha256: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The digest the service checks: the one given (``token_sha256``), else that of
    ``$MVTEC_RAY_TOKEN``, else None (no token)."""
    if token_sha256:
        return token_sha256
    token = (environ.get(TOKEN_ENV) or "").strip()
    return token_digest(token) if token else None


def require_token_or_anonymous(digest: str | None, allow_anonymous: bool, where: str = "the service") -> None:
    """The rule that keeps a service from being open by accident: without a token it starts only when
    anonymous access was asked for explicitly (``allow_anonymous: true`` / ``--allow-anonymous``)."""
    if not digest and not allow_anonymous:
        raise UserError(f"{where} refuses to start without a bearer token: set {TOKEN_ENV} in the environment "
                        f"of every node (or give a token file), or allow anonymous access explicitly "
                        f"(allow_anonymous: true in the Serve args, --allow-anonymous for mvtec-ray serve)")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    host = (host or "").strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def check_token(authorization: str | None, digest: str | None) -> None:
    """Bearer token check; a service without a token digest is open (it started only with
    ``allow_anonymous``, see :func:`require_token_or_anonymous`)."""
    if not digest:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "missing bearer token (Authorization: Bearer TOKEN)")
    if not hmac.compare_digest(token_digest(given), digest):
        raise ApiError(401, "wrong bearer token")


async def read_body(chunks: AsyncIterator[bytes], max_bytes: int = MAX_BODY_BYTES,
                    declared: str | None = None) -> bytes:
    """The request body read chunk by chunk (Starlette's ``request.stream()``), answered 413 as soon
    as it passes ``max_bytes``: a chunked upload without Content-Length never fills the replica's
    memory, and a declared length over the limit is refused before anything is read."""
    if declared and declared.strip().isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"request body of {int(declared)} bytes is over the limit of {max_bytes} bytes")
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise ApiError(413, f"request body of more than {max_bytes} bytes is over the limit of {max_bytes} bytes")
        if chunk:
            parts.append(chunk)
    return b"".join(parts)


class ImageDecoder:
    """:func:`~mvtec_ray.data.images.decode_image` with the service's limits, at most ``concurrency``
    decodes at a time (the other requests' threads wait): a replica's decode memory is bounded by
    ``concurrency`` x ``limits.max_pixels`` x ~8 bytes whatever its number of ongoing requests."""

    def __init__(self, image_size: int, limits: DecodeLimits, resize_to: int | None = None,
                 resize: str = "stretch", concurrency: int = MAX_CONCURRENT_DECODES):
        self.image_size, self.limits, self.resize_to, self.resize = image_size, limits, resize_to, resize
        self.slots = threading.BoundedSemaphore(max(1, int(concurrency)))

    def __call__(self, data: bytes) -> np.ndarray:
        with self.slots:
            try:
                return decode_image(data, self.image_size, self.limits, self.resize_to, self.resize)
            except DecodeError as exc:
                raise ApiError(413 if "too large" in str(exc) else 400, str(exc)) from None


def public_weights(weights_id: str | None) -> str | None:
    """A weights identity fit to show a client: ``imagenet:...`` and ``random`` as they are, a
    local or S3 file by its file name only (``file:/home/me/w.pth`` -> ``file:w.pth``)."""
    if weights_id is None:
        return None
    kind, _, rest = str(weights_id).partition(":")
    if kind == "file" and rest:
        return f"file:{posixpath.basename(rest.replace(chr(92), '/').rstrip('/'))}"
    return str(weights_id)


def image_bytes(body: bytes, content_type: str | None, max_bytes: int = MAX_BODY_BYTES) -> bytes:
    """The image in a request body: the body itself, or the multipart field ``file``."""
    if len(body) > max_bytes:
        raise ApiError(413, f"request body of {len(body)} bytes is over the limit of {max_bytes} bytes")
    content_type = content_type or ""
    if content_type.lower().startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") +
                                                      b"\r\n\r\n" + body)
        parts = list(message.iter_parts()) if message.is_multipart() else []
        for part in parts:
            if part.get_param("name", header="content-disposition") == "file":
                return part.get_payload(decode=True) or b""
        raise ApiError(400, "multipart body has no field 'file'")
    return body


@dataclass
class Request:
    """One image to score, checked and decoded."""

    image: np.ndarray
    category: str
    detectors: tuple[str, ...] | None
    want_map: bool
    decode_ms: float


class ScoringService:
    """Loaded models plus the rules of the HTTP API (see the README's "Online scoring")."""

    def __init__(self, models_uri: str, config: RunConfig | None = None, categories: Sequence[str] | None = None,
                 detectors: Sequence[str] | None = None, device: str = "cpu", max_body_bytes: int = MAX_BODY_BYTES,
                 max_image_pixels: int = SERVE_MAX_IMAGE_PIXELS, max_concurrent_decodes: int = MAX_CONCURRENT_DECODES):
        config = config or RunConfig()
        storage = Storage(config.s3)
        self.plan: ModelPlan = plan_models(config, storage, models_uri, detectors, categories)
        self.model_set = ModelSet.from_plan(self.plan, storage, device=device)
        self.max_body_bytes = max_body_bytes
        self.image_size = int(self.plan.extract.image_size)
        batch = self.plan.decode_limits  # the batch job's; the service's pixel limit is lower
        self.limits = DecodeLimits(min(batch.max_pixels, int(max_image_pixels)), batch.min_side)
        self.decoder = ImageDecoder(self.image_size, self.limits, self.plan.extract.resize_to,
                                    self.plan.extract.resize, max_concurrent_decodes)

    # -- answers ----------------------------------------------------------------
    def models_info(self) -> dict:
        schema = self.plan.schema
        return {"backbone": schema["backbone"], "weights": public_weights(self.plan.weights.weights_id),
                "weights_sha256": self.plan.weights.sha256,
                "image_size": self.image_size,
                "categories": [{"category": c, "detectors": [
                    {"detector": m.detector.name, "threshold": m.threshold, "input_kind": m.detector.input_kind,
                     "produces_maps": m.detector.input_kind == "patches", "backbone": m.info["schema"]["backbone"],
                     "weights": public_weights(m.info.get("weights")), "fitted_at": _iso(m.info.get("saved_at")),
                     "version": m.version} for m in models]}
                    for c, models in sorted(self.model_set.models.items())]}

    def parse(self, query: dict[str, str], body: bytes, content_type: str | None) -> Request:
        """Query and body -> a decoded image to score, or :class:`ApiError` (400/404/413)."""
        category = (query.get("category") or "").strip()
        served = sorted(self.model_set.models)
        if not category:
            if len(served) != 1:
                raise ApiError(400, f"query parameter 'category' is required (one of {', '.join(served)})")
            category = served[0]
        if category not in self.model_set.models:
            raise ApiError(404, f"unknown category {category!r}; served: {', '.join(served)}")
        detectors = None
        if query.get("detectors"):
            detectors = tuple(d.strip() for d in query["detectors"].split(",") if d.strip())
            known = [m.detector.name for m in self.model_set.models[category]]
            unknown = [d for d in detectors if d not in known]
            if unknown:
                raise ApiError(404, f"unknown detector(s) {', '.join(unknown)} for {category!r}; "
                                    f"served: {', '.join(known)}")
        want_map = (query.get("map") or "0").lower() in ("1", "true", "yes")
        started = time.perf_counter()
        image = self.decoder(image_bytes(body, content_type, self.max_body_bytes))
        return Request(image, category, detectors, want_map, (time.perf_counter() - started) * 1000)

    def score(self, requests: Sequence[Request]) -> list[list[Scored]]:
        """Score a batch of requests with one backbone pass."""
        images = np.stack([r.image for r in requests])
        map_size = self.image_size if any(r.want_map for r in requests) else None
        return self.model_set.score(images, [r.category for r in requests], map_size,
                                    [r.detectors for r in requests])

    def answer(self, request: Request, scored: list[Scored], score_ms: float, total_ms: float) -> dict:
        results = [{"detector": s.model.detector.name, "score": s.score, "threshold": s.model.threshold,
                    "is_anomaly": bool(s.score >= s.model.threshold)} for s in scored]
        votes = sum(r["is_anomaly"] for r in results)
        out = {"category": request.category, "results": results,
               # the page's verdict: a majority of the detectors (ties count as anomalous)
               "verdict": "anomalous" if 2 * votes >= len(results) and votes else "normal",
               "anomalous_votes": votes,
               "timing_ms": {"decode": round(request.decode_ms, 2), "score": round(score_ms, 2),
                             "total": round(total_ms, 2)}}
        if request.want_map:
            maps = {s.model.detector.name: s for s in scored if s.map is not None}
            name = next((n for n in MAP_PREFERENCE if n in maps), next(iter(maps), None))
            if name:
                chosen = maps[name]
                out["map_detector"] = name
                out["map_png"] = base64.b64encode(overlay_png(request.image, chosen.map,
                                                              chosen.model.threshold)).decode()
        return out


def overlay_png(image: np.ndarray, anomaly_map: np.ndarray, threshold: float) -> bytes:
    """The anomaly map in colour over the (resized) image: transparent where scores are low,
    opaque red-yellow at and above the threshold."""
    from matplotlib import colormaps
    from PIL import Image
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.shape != image.shape[:2]:
        amap = np.asarray(Image.fromarray(amap).resize(image.shape[1::-1], Image.Resampling.BILINEAR))
    low = float(np.min(amap))
    high = max(float(threshold), float(np.max(amap)), low + 1e-6)
    level = np.clip((amap - low) / (high - low), 0.0, 1.0)
    colour = colormaps["inferno"](level)[..., :3] * 255.0
    alpha = (np.clip((amap - low) / max(float(threshold) - low, 1e-6), 0.0, 1.0) * 0.6)[..., None]
    blended = image.astype(np.float32) * (1.0 - alpha) + colour * alpha
    buffer = io.BytesIO()
    Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _iso(seconds) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(seconds)))
