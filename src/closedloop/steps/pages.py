"""The one template engine of every page the project renders (Jinja, autoescaped, strict).

Whatever a page shows — MLflow tags and artifacts, XCom, requests, incidents — is data handed to a
template under ``templates/`` (the plugin's pages in ``closedloop/web/templates/``, the review card,
which tasks also log to MLflow, in ``closedloop/steps/templates/``) and escaped by Jinja: no HTML is
assembled in Python strings.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parents[1]
FOLDERS = (PACKAGE / "steps" / "templates", PACKAGE / "web" / "templates")


@functools.lru_cache(maxsize=1)
def environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader([str(f) for f in FOLDERS]), autoescape=True,
                              undefined=jinja2.StrictUndefined)


def render(name: str, **data: Any) -> str:
    """Template ``name`` filled with ``data`` (every value escaped)."""
    return environment().get_template(name).render(**data)


def shown(x: Any) -> str:
    """A value as a page shows it: ``-`` for nothing, 4 significant digits for a float."""
    return "-" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))
