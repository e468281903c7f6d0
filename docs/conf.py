"""Sphinx configuration of the measureflow documentation.

Build (warnings are errors)::

    python -m sphinx -W -b html docs docs/_build/html

``MEASUREFLOW_DOCS_FAST=1`` runs every gallery script at tiny sizes (the CI test's mode); the
numbers each script checks are then looser, with tolerances that follow the sample size.
``MEASUREFLOW_DOCS_GALLERY=0`` skips executing the gallery altogether (pages keep their code).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import measureflow

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

project = "measureflow"
author = "measureflow developers"
copyright = "measureflow developers"
release = measureflow.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
    "measureflow_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "auto_gallery/*.ipynb", "auto_gallery/**/*.ipynb", "auto_gallery/**/*.zip",
                    "gallery/**/README.txt"]
root_doc = "index"

# MyST: dollar maths in prose, definition lists, anchors for the headings the pages link to.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "attrs_inline"]
myst_heading_anchors = 3
myst_dmath_double_inline = True

# The API reference: one automodule per public module, members in source order, so new public
# names appear without editing the pages.
autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
}
autodoc_typehints = "none"          # the signatures already show them; numpydoc lists parameters
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = False   # attrs classes would show attr_dict[...] expressions
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
# The docstrings are written as prose around formulas; numpydoc only structures the sections.
numpydoc_validation_checks: set[str] = set()

# No intersphinx: the build runs where only package registries are reachable, and references to
# torch or Python objects stay plain text.


def _fast() -> bool:
    return os.environ.get("MEASUREFLOW_DOCS_FAST", "0") not in ("", "0", "false", "no")


def _execute_gallery() -> bool:
    return os.environ.get("MEASUREFLOW_DOCS_GALLERY", "1") not in ("", "0", "false", "no")


sphinx_gallery_conf = {
    "examples_dirs": ["gallery"],
    "gallery_dirs": ["auto_gallery"],
    "filename_pattern": r"/plot_",
    "plot_gallery": "True" if _execute_gallery() else "False",
    # Always execute: the fast and the full mode share the output folder, so a cached fast-mode
    # page must never stand in for a full build's.
    "run_stale_examples": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "matplotlib_animations": True,
    "image_scrapers": ("matplotlib",),
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "show_memory": False,
    "capture_repr": (),
    "reset_modules": ("matplotlib",),
    "min_reported_time": 1,
}
# Every gallery script sees the mode through the environment (it runs in this process).
os.environ.setdefault("MEASUREFLOW_DOCS_FAST", "0")

html_theme = "furo"
html_title = f"measureflow {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "sidebar_hide_name": False,
    "navigation_with_keys": True,
}
html_show_sourcelink = False
pygments_style = "friendly"
pygments_dark_style = "monokai"

# Nitpicky cross-references would fail on every torch/attrs type named in a signature; unresolved
# references inside measureflow are caught by the docs test instead (it greps the build for them).
nitpicky = False
suppress_warnings = ["config.cache"]
