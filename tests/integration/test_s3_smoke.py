"""The S3 path through a real moto_server on loopback: catalog, reads and atomic writes."""
from __future__ import annotations

from mvtec_ray.data.catalog import build_catalog
from mvtec_ray.storage import Storage
from tests.helpers.s3_upload import upload_tree


def test_catalog_and_bytes_identical_over_s3(s3_server, s3_settings, small_dataset):
    upload_tree(s3_server["client"], "mvtec", small_dataset, "smoke")
    storage = Storage(s3_settings)
    remote = build_catalog("s3://mvtec/smoke", storage)
    local = build_catalog(str(small_dataset))
    assert list(remote.entries["image_id"]) == list(local.entries["image_id"])
    uri = remote.entries["uri"].iloc[0]
    assert uri.startswith("s3://mvtec/smoke/")
    local_uri = local.entries["uri"].iloc[0]
    assert storage.read_bytes(uri) == Storage().read_bytes(local_uri)
    storage.write_bytes("s3://mvtec/out/x.bin", b"abc")
    assert storage.read_bytes("s3://mvtec/out/x.bin") == b"abc"
