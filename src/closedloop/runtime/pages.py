"""The one template engine of every page the project renders (Jinja, autoescaped, strict).

Whatever a page shows — MLflow tags and artifacts, XCom, requests, incidents — is data handed to a
template under ``templates/`` (the plugin's pages in ``closedloop/web/templates/``, the review card,
which tasks also log to MLflow, in ``closedloop/steps/templates/``) and escaped by Jinja: no HTML is
assembled in Python strings.
"""

from __future__ import annotations

import functools
import re
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


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


def quoted(text: object, limit: int = 2000) -> str:
    """Text a person wrote, as a Markdown block quote with every markup character escaped: no line of it
    can pass for one the pipeline wrote (a heading, a list item, a link, a "Production now:" line)."""
    value = "" if text is None else (", ".join(map(str, text)) if isinstance(text, list) else str(text))
    value = value[:limit] + ("…" if len(value) > limit else "")
    lines = value.replace("\r", "").split("\n") or [""]
    return "\n".join("> " + _MD_SPECIAL.sub(r"\\\1", line) for line in lines)


def shown(x: Any) -> str:
    """A value as a page shows it: ``-`` for nothing, 4 significant digits for a float."""
    return "-" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))
