"""Nothing is unpickled from storage, no path escapes its root, no secret reaches logs or outputs."""
from __future__ import annotations

import ast
import json
import stat
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import mvtec_ray
from mvtec_ray.errors import StorageError, UserError
from mvtec_ray.storage import Storage, safe_join

PACKAGE = Path(mvtec_ray.__file__).parent

# dotted call names that deserialise arbitrary objects
FORBIDDEN_CALLS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads",
                   "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
                   "marshal.load", "marshal.loads", "shelve.open", "pandas.read_pickle", "yaml.load",
                   "yaml.unsafe_load", "yaml.full_load", "eval", "exec", "ray.cloudpickle.loads"}


def _violations(source: str, filename: str) -> list[str]:
    """Unsafe loads in one module; import aliases are resolved (np -> numpy, sio -> skops.io)."""
    tree = ast.parse(source, filename)
    alias: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(expr) -> str:
        if isinstance(expr, ast.Name):
            return alias.get(expr.id, expr.id)
        if isinstance(expr, ast.Attribute):
            return f"{dotted(expr.value)}.{expr.attr}"
        return "?"

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name in ("pickle", "cPickle", "dill", "joblib") for a in node.names):
            found.append(f"{filename}:{node.lineno}: imports a pickle module")
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}

        def const(key):
            value = keywords.get(key)
            return value.value if isinstance(value, ast.Constant) else "<not a constant>"
        where = f"{filename}:{node.lineno}: {name}"
        if name in FORBIDDEN_CALLS:
            found.append(f"{where} deserialises arbitrary objects")
        if const("allow_pickle") is True:
            found.append(f"{where} with allow_pickle=True")
        if name == "torch.load" and const("weights_only") is not True:
            found.append(f"{where} without weights_only=True")
        if name == "numpy.load" and const("allow_pickle") is not False:
            found.append(f"{where} without allow_pickle=False")
        if name in ("skops.io.load", "skops.io.loads") and ("trusted" not in keywords or const("trusted") is True):
            found.append(f"{where} without an explicit trusted list")
    return found


def test_scanner_catches_unsafe_loads():
    bad = """
import pickle, joblib
import numpy as np
import torch
import skops.io as sio
from yaml import load
pickle.loads(b"")
np.load("x.npy")
np.load("x.npy", allow_pickle=True)
torch.load("m.pt")
torch.load("m.pt", weights_only=False)
sio.load("m.skops", trusted=True)
joblib.load("m.joblib")
load("x")
"""
    flagged = {int(v.split(":")[1]) for v in _violations(bad, "bad.py")}
    assert flagged == {2, *range(7, 15)}, _violations(bad, "bad.py")  # the import and every call
    good = "import numpy as np\nimport torch\nnp.load('x', allow_pickle=False)\ntorch.load('m', weights_only=True)\n"
    assert _violations(good, "good.py") == []


def test_nothing_is_unpickled_from_storage():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += _violations(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert found == [], "\n".join(found)


# -- paths ---------------------------------------------------------------------------
@pytest.mark.parametrize("relative", ["../x", "a/../../x", "/etc/passwd", "..", "a/b/../../..", "..\\x",
                                      "a\\..\\..\\x", "a/\x00/b", "./../x"])
@pytest.mark.parametrize("base", ["/srv/out", "s3://bucket/out"])
def test_safe_join_refuses_escapes(base, relative):
    with pytest.raises(StorageError, match="escapes"):
        safe_join(base, relative)


@pytest.mark.parametrize("relative,expected", [("a/b.npy", "a/b.npy"), ("a/../b", "b"), ("./c", "c"),
                                               ("a..b/c", "a..b/c"), ("..a", "..a")])
def test_safe_join_keeps_inside_names(relative, expected):
    assert safe_join("s3://bucket/out", relative) == f"s3://bucket/out/{expected}"
    assert safe_join("/srv/out", relative) == f"/srv/out/{expected}"


@pytest.mark.parametrize("image_id", ["../../../../tmp/evil", "cat/test/good/../../../../x.png", "..", "/abs/x",
                                      "a\\..\\..\\b", "cat/test/good/..", "cat/./../.."])
def test_anomaly_map_names_stay_under_out(tmp_path, image_id):
    from mvtec_ray.fit.cell import _save_map
    out = tmp_path / "out"
    relative = _save_map(Storage(), str(out), "patchcore", image_id, np.zeros((4, 4), np.float32))
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 1
    assert written[0].resolve().is_relative_to((out / "maps" / "patchcore").resolve()), written
    assert written[0] == out / relative


def test_model_store_refuses_names_that_escape(tmp_path):
    from mvtec_ray.deploy.model_files import (
        MODEL_FILE,
        SCHEMA_KEYS,
        load_model,
        read_model_info,
    )
    models = tmp_path / "models"
    with pytest.raises(StorageError, match="escapes"):
        load_model(Storage(), str(models), "../../etc", "knn")
    folder = models / "widget" / "knn"
    folder.mkdir(parents=True)
    info = {"category": "widget", "detector": "knn", "threshold": 1.0, "version": "v", "input_kind": "pooled",
            "schema": {k: None for k in SCHEMA_KEYS}}
    for name in ("../../../outside.bin", "..", ".hidden", "sub/../../x", "a\\..\\b"):
        (folder / MODEL_FILE).write_text(json.dumps({**info, "files": [name]}))
        with pytest.raises(UserError, match="refusing file name"):
            read_model_info(Storage(), str(models), "widget", "knn")
    assert not (tmp_path / "outside.bin").exists()


# -- secrets ---------------------------------------------------------------------------
def _files_containing(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in sorted(root.rglob("*")):
        try:
            if not stat.S_ISREG(path.lstat().st_mode):
                continue
            data = path.read_bytes()
        except OSError:
            continue
        hits += [f"{path}: {needle[:12]!r}..." for needle in needles if needle in data]
    return hits


def test_secret_never_reaches_logs_config_or_outputs(ray_session, s3_server, tmp_path, capfd):
    """A unique S3 secret key and session token are used for a whole run (data read from S3);
    then every output file, the driver's logs and Ray's session folder are searched for them."""
    import logging

    from mvtec_ray.config import S3Settings, load_config
    from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset
    from mvtec_ray.distributed.pipeline import run_pipeline
    from mvtec_ray.report.html import write_report
    from tests.helpers.s3_upload import upload_tree
    secret, token = f"secret-{uuid.uuid4().hex}", f"token-{uuid.uuid4().hex}"
    generate_sample_dataset(tmp_path / "data", categories=["washer"], seed=6,
                            spec=SampleSpec(n_train=6, n_test_good=2, n_test_defect_per_type=1, size=64))
    upload_tree(s3_server["client"], "mvtec", tmp_path / "data", "secret-run")
    out = tmp_path / "out"
    config = load_config(None, {"data": "s3://mvtec/secret-run", "out": str(out),
                                "extract.backbone": "efficientnet_lite0", "extract.image_size": 64,
                                "detectors.names": ["knn"]})
    config.s3 = S3Settings(endpoint_url=s3_server["endpoint"], region="us-east-1",
                           access_key=s3_server["aws_access_key_id"], secret_key=secret, session_token=token)
    assert secret not in repr(config) and secret not in config.dump_yaml()
    assert secret not in json.dumps(config.model_dump(mode="json"))
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))
    handler, root_logger = Keep(logging.DEBUG), logging.getLogger()
    old_level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    try:
        outputs = run_pipeline(config)
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(old_level)
    assert records, "nothing was logged: the log check would prove nothing"
    assert outputs.extraction.errors.empty and (out / "config.yaml").is_file()
    write_report(out)
    time.sleep(2)  # let the workers' log lines reach the session folder

    needles = [secret.encode(), token.encode()]
    (tmp_path / "control.bin").write_bytes(b"x" + needles[0] + b"y")  # the search does find a planted copy
    assert len(_files_containing(tmp_path, needles)) == 1
    assert _files_containing(out, needles) == []
    session = Path(ray_session._private.worker._global_node.get_session_dir_path())
    assert list(session.rglob("*.log")) or list(session.rglob("*.out")), f"no Ray logs under {session}"
    assert _files_containing(session, needles) == []
    captured = capfd.readouterr()
    for text in ("\n".join(records), captured.out, captured.err):
        assert secret not in text and token not in text
