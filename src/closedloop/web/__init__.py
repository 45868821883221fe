"""The plugin's web side: the FastAPI app (:mod:`.app`), its pages, and their templates as files."""

from __future__ import annotations


def template(name: str) -> str:
    """A page of the plugin, from ``web/templates/`` (files, not Python strings)."""
    from importlib.resources import files

    return files("closedloop.web").joinpath("templates", name).read_text(encoding="utf-8")
