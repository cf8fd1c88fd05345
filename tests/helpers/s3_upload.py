"""Putting local files on the test S3 endpoint (moto_server)."""
from __future__ import annotations


def upload_tree(client, bucket: str, root, prefix: str) -> None:
    """Copy a local folder to s3://bucket/prefix (used by the S3 tests)."""
    from pathlib import Path
    root = Path(root)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")
