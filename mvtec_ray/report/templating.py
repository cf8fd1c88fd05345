"""The Jinja2 environment of the report's pages: templates and CSS under ``mvtec_ray/report/templates/``.

``autoescape=True``: every value a template prints is HTML-escaped (run names, categories, detector
names, errors, paths and the config all come from the run), so nothing from a run becomes markup.
"""
from __future__ import annotations

from functools import lru_cache

import jinja2
from markupsafe import Markup


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("mvtec_ray.report", "templates"), autoescape=True,
                              trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def render(template: str, **context) -> str:
    """``templates/<template>`` rendered with ``context``, ending in one newline."""
    return environment().get_template(template).render(**context).rstrip("\n") + "\n"


def stylesheet(name: str) -> Markup:
    """``templates/<name>`` (a CSS file) as it is, for a ``<style>`` element: never parsed nor escaped."""
    source, _, _ = environment().loader.get_source(environment(), name)
    return Markup(source.strip("\n"))
