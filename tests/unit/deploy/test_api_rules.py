"""The HTTP API's rules without Ray: the streamed body limit, the token rule, the decode limits and
the weights a client is shown."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from mvtec_ray.data.images import DecodeLimits
from mvtec_ray.deploy import api
from mvtec_ray.deploy.api import (
    TOKEN_ENV,
    ApiError,
    ImageDecoder,
    is_loopback,
    public_weights,
    read_body,
    require_token_or_anonymous,
    service_token_digest,
    token_digest,
)
from mvtec_ray.errors import UserError
from tests.helpers.bad_files import encode, huge_png, sample_rgb


class FakeStream:
    """Starlette's ``request.stream()`` for a chunked upload: chunks, then b"" (no Content-Length)."""

    def __init__(self, chunk: bytes, count: int):
        self.chunk, self.count, self.sent = chunk, count, 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.sent > self.count:
            raise StopAsyncIteration
        self.sent += 1
        return self.chunk if self.sent <= self.count else b""


def test_chunked_body_stops_at_the_limit_without_reading_the_rest():
    stream = FakeStream(b"\0" * 65536, count=200 * 16)  # a 200 MiB chunked upload
    with pytest.raises(ApiError) as caught:
        asyncio.run(read_body(stream, max_bytes=1024 * 1024))
    assert caught.value.status == 413 and "over the limit" in str(caught.value)
    assert stream.sent == 17  # 16 chunks fit in 1 MiB: the 17th is over, nothing after it is read


def test_declared_length_over_the_limit_is_refused_before_reading():
    stream = FakeStream(b"x", count=1)
    with pytest.raises(ApiError) as caught:
        asyncio.run(read_body(stream, max_bytes=1000, declared="5000"))
    assert caught.value.status == 413 and stream.sent == 0


def test_a_body_within_the_limit_is_read_whole():
    assert asyncio.run(read_body(FakeStream(b"abc", count=3), max_bytes=9)) == b"abcabcabc"
    assert asyncio.run(read_body(FakeStream(b"abc", count=3), max_bytes=9, declared="bogus")) == b"abcabcabc"


def test_no_token_is_refused_unless_anonymous_is_explicit():
    with pytest.raises(UserError, match=TOKEN_ENV):
        require_token_or_anonymous(None, allow_anonymous=False)
    require_token_or_anonymous(None, allow_anonymous=True)
    require_token_or_anonymous(token_digest("s3cret"), allow_anonymous=False)


def test_the_token_comes_from_the_args_else_the_environment():
    assert service_token_digest("abc", {}) == "abc"
    assert service_token_digest(None, {TOKEN_ENV: " s3cret\n"}) == token_digest("s3cret")
    assert service_token_digest(None, {TOKEN_ENV: "  "}) is None
    assert service_token_digest(None, {}) is None


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True),
                                            ("::1", True), ("[::1]", True), ("0.0.0.0", False), ("", False),
                                            ("10.0.0.5", False), ("::", False), ("myhost", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_models_answer_does_not_reveal_local_weight_paths():
    assert public_weights("file:/home/alice/secret-project/weights/resnet50.pth") == "file:resnet50.pth"
    assert public_weights("file:s3://bucket/private/prefix/w.pth") == "file:w.pth"
    assert public_weights("file:C:\\Users\\bob\\w.pth") == "file:w.pth"
    assert public_weights("imagenet:resnet50-11ad3fa6.pth") == "imagenet:resnet50-11ad3fa6.pth"
    assert public_weights("random") == "random" and public_weights(None) is None


def test_decoder_pixel_limit_is_a_413():
    decoder = ImageDecoder(32, DecodeLimits(max_pixels=1_000_000))
    with pytest.raises(ApiError) as caught:
        decoder(huge_png(2000, 1000))  # 2 M pixels: refused from its header, nothing decoded
    assert caught.value.status == 413 and "too large" in str(caught.value)
    with pytest.raises(ApiError) as caught:
        decoder(b"not an image at all")
    assert caught.value.status == 400
    assert decoder(encode(sample_rgb(), "PNG")).shape == (32, 32, 3)


def test_decoder_runs_at_most_its_concurrency_at_once(monkeypatch):
    running, peak, lock = [0], [0], threading.Lock()

    def slow_decode(*args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return np.zeros((32, 32, 3), np.uint8)

    monkeypatch.setattr(api, "decode_image", slow_decode)
    decoder = ImageDecoder(32, DecodeLimits(), concurrency=2)
    threads = [threading.Thread(target=decoder, args=(b"x",)) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2


def test_serve_pixel_limit_is_below_the_batch_limit():
    assert api.SERVE_MAX_IMAGE_PIXELS < DecodeLimits().max_pixels
