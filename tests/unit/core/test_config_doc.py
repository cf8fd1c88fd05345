"""docs/configuration.md is rendered from the config model (mvtec_ray/config_doc.py) and must be current."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mvtec_ray.config_doc import COMMAND, PAGE, iter_fields, render

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


def test_configuration_page_is_current():
    page = ROOT / PAGE
    assert page.is_file(), f"{PAGE} is missing; write it with `{COMMAND}`"
    assert page.read_text(encoding="utf-8") == render(), (
        f"{PAGE} differs from the config model's field descriptions; regenerate it with `{COMMAND}`")


def test_every_field_has_a_description():
    fields = list(iter_fields())
    assert len(fields) > 40  # the walk reaches the nested models
    missing = [name for name, field in fields if not (field.description or "").strip()]
    assert missing == [], f"config fields without a description (add a docstring under the field): {missing}"


def test_every_field_is_on_the_page():
    text = render()
    assert [name for name, _ in iter_fields() if f"| `{name}` |" not in text] == []


def test_the_renderer_imports_neither_torch_nor_ray():
    code = ("import sys, mvtec_ray.config_doc as d; d.render(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'torchvision', 'sklearn')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
