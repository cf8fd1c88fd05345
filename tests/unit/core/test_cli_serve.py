"""``mvtec-ray serve``'s token rule (checked before Ray is imported or connected) and the one
printer of the command line (terminal controls in names are shown escaped)."""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mvtec_ray import cli
from mvtec_ray.deploy.api import TOKEN_ENV, token_digest

ROOT = Path(__file__).resolve().parents[3]


def test_serve_on_a_public_address_without_token_is_refused_before_ray(tmp_path):
    code = ("import sys\nfrom mvtec_ray.cli import main\n"
            f"rc = main(['serve', '--models', {str(tmp_path)!r}, '--host', '0.0.0.0'])\n"
            "print('rc', rc, 'ray imported' if 'ray' in sys.modules else 'no ray')\n")
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert "rc 2 no ray" in out.stdout, (out.stdout, out.stderr[-2000:])
    assert "refusing to serve on 0.0.0.0 without a token" in out.stderr
    assert "--allow-anonymous" in out.stderr


@pytest.fixture
def fake_serve(monkeypatch):
    """``mvtec_ray.distributed.serve`` replaced: what the command would start, without Ray."""
    calls = []

    class ServeArgs:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    def run_service(args, config, host, port):
        calls.append((args, host))
        return 0

    module = types.ModuleType("mvtec_ray.distributed.serve")
    module.ServeArgs, module.run_service = ServeArgs, run_service
    monkeypatch.setitem(sys.modules, "mvtec_ray.distributed.serve", module)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    return calls


def test_serve_with_allow_anonymous_or_a_token_or_on_loopback_starts(fake_serve, tmp_path, monkeypatch):
    assert cli.main(["serve", "--models", str(tmp_path), "--host", "0.0.0.0", "--allow-anonymous"]) == 0
    assert fake_serve[-1][0].allow_anonymous is True and fake_serve[-1][0].token_sha256 is None
    assert cli.main(["serve", "--models", str(tmp_path)]) == 0  # loopback: anonymous by default
    assert fake_serve[-1][0].allow_anonymous is True and fake_serve[-1][1] == "127.0.0.1"
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    assert cli.main(["serve", "--models", str(tmp_path), "--host", "0.0.0.0", "--max-image-pixels", "1000"]) == 0
    args = fake_serve[-1][0]
    assert args.token_sha256 == token_digest("s3cret") and args.allow_anonymous is False
    assert args.max_image_pixels == 1000


def test_serve_refusal_in_process(fake_serve, tmp_path, capsys):
    assert cli.main(["serve", "--models", str(tmp_path), "--host", "10.1.2.3"]) == 2
    assert not fake_serve
    assert "refusing to serve on 10.1.2.3" in capsys.readouterr().err


def test_terminal_controls_in_names_are_printed_escaped(capsys):
    cli.echo("error: data/\x1b[2J\x1b]0;pwned\x07cat\u202egnp.exe: bad")
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b[2J" in out and "\\u202e" in out
    cli.echo("two\nlines\tand a tab")
    assert capsys.readouterr().out == "two\nlines\tand a tab\n"


def test_extraction_errors_and_user_errors_are_printed_escaped(capsys, tmp_path):
    import pandas as pd
    class Extraction(types.SimpleNamespace):
        def __getattr__(self, name):  # counters this test does not set
            return 0

    extraction = Extraction(
        counts=pd.DataFrame({"status": ["ok"], "rows": [3]}), features_dir="f", skipped_existing=0, seconds=1.0,
        errors=pd.DataFrame({"source_uri": ["x/\x1b[31mred.png"], "error": ["corrupt \x1b[0m"]}))
    cli._print_extraction(extraction)  # noqa: SLF001
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[31mred.png" in out
    # a user error naming a file: the one error line is escaped too
    assert cli.main(["report", str(tmp_path / "run\x1b[2J")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "run\\x1b[2J" in err
