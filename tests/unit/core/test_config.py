"""Config: YAML in, CLI overrides on top, clear errors, no secrets in dumps."""
from __future__ import annotations

import pytest
import yaml

from mvtec_ray.config import RunConfig, S3Settings, load_config
from mvtec_ray.errors import UserError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("extract:\n  backbone: resnet18\n  batch_size: 8\ndetectors:\n  names: [knn, lof]\n")
    config = load_config(path, {"extract.batch_size": 4, "data": "/d"})
    assert config.extract.backbone == "resnet18" and config.extract.batch_size == 4
    assert config.detectors.names == ["knn", "lof"] and config.data == "/d"


@pytest.mark.parametrize("text,match", [
    ("extract: [unclosed", "invalid YAML"),
    ("- a list", "must be a mapping"),
    ("extract:\n  backbone: vgg99\n", "unknown backbone 'vgg99'"),
    ("detectors:\n  names: [knn, magic]\n", "unknown detector"),
    ("extract:\n  batch_size: 0\n", "extract.batch_size"),
    ("extrakt: {}\n", "extrakt"),
])
def test_bad_config_one_line_error(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=match) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_secrets_never_dumped(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret-value-123")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLANTED")
    config = load_config(None, {"data": "s3://b/p"})
    assert config.s3.secret_key.get_secret_value() == "planted-secret-value-123"
    dumped = config.dump_yaml()
    assert "planted-secret-value-123" not in dumped and "AKIAPLANTED" not in dumped
    assert "planted-secret-value-123" not in repr(config) and "planted-secret-value-123" not in str(config.s3)
    assert yaml.safe_load(dumped)["data"] == "s3://b/p"


def test_fingerprint_tracks_feature_settings_only():
    base = RunConfig().extract
    assert base.fingerprint() == base.model_copy(update={"batch_size": 64, "actors": 3}).fingerprint()
    assert base.fingerprint() != base.model_copy(update={"image_size": 256}).fingerprint()
    assert base.fingerprint() != base.model_copy(update={"backbone": "resnet18"}).fingerprint()


def test_s3_settings_from_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    s3 = S3Settings.from_env()
    assert s3.endpoint_url == "http://127.0.0.1:9" and s3.region == "eu-west-1"


@pytest.mark.parametrize("text,match", [
    ("extract:\n  backbone: resnet18\nextract:\n  image_size: 128\n",
     r"line 3: duplicate key 'extract' \(first at line 1\)"),
    ("detectors:\n  params:\n    knn: {k: 3, k: 5}\n", "duplicate key 'k'"),
    ("detectors:\n  params:\n    knn: {kk: 3}\n", r"detectors\.params: .*knn: unknown parameter\(s\) \['kk'\]; known: k,"),
    ("detectors:\n  params:\n    fooo: {k: 3}\n", "detectors.params: .*unknown detector 'fooo'"),
    ("search:\n  grids:\n    lof: {neighbours: [3, 5]}\n", r"search\.grids: .*lof: unknown parameter\(s\) \['neighbours'\]"),
])
def test_duplicate_keys_and_unknown_detector_params_fail_at_load(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=match) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_a_merge_key_may_still_be_overridden(tmp_path):
    """Not a duplicate: keys a merge (<<) brings in may be overridden (guards the loader against refusing too much)."""
    path = tmp_path / "c.yaml"
    path.write_text("detectors:\n  params:\n    knn: &base {k: 1, preprocess: none}\n"
                    "    lof:\n      n_neighbors: 5\n  names: [knn]\nsearch:\n  grids:\n    knn: {k: [1, 3]}\n")
    assert load_config(path).detectors.params["knn"] == {"k": 1, "preprocess": "none"}


def test_params_are_checked_without_importing_the_detectors():
    """Checked at config load, before extraction, and without torch, faiss or scikit-learn."""
    import subprocess
    import sys
    code = ("import sys\nfrom mvtec_ray.config import load_config\nfrom mvtec_ray.errors import UserError\n"
            "load_config(None, {'detectors.params': {'knn': {'k': 3}, 'patchcore': {'coreset_ratio': 0.01}}})\n"
            "try:\n    load_config(None, {'detectors.params': {'knn': {'kk': 3}}})\n    raise SystemExit('accepted')\n"
            "except UserError:\n    pass\n"
            "print(sorted(m for m in ('torch', 'faiss', 'sklearn') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

