"""Sphinx configuration of the documentation (MyST Markdown). Built strictly: `make docs`."""

project = "airflow-closedloop"
author = "the airflow-closedloop developers"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "generate.py"]
root_doc = "index"
myst_heading_anchors = 3  # `page.md#a-heading` links are checked like page links
myst_enable_extensions = ["deflist"]
nitpicky = True
html_theme = "alabaster"
html_title = "airflow-closedloop"
html_show_sourcelink = False
suppress_warnings: list[str] = []
