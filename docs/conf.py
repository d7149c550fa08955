"""Sphinx configuration for the pycoe docs (builds offline, with -W)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import pycoe

project = "pycoe"
author = "The pycoe developers"
copyright = "2026, The pycoe developers"
release = pycoe.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
]

# No CDN is reachable: MathJax 3 (Apache-2.0, see _static/MATHJAX-LICENSE.txt) ships with the docs.
mathjax_path = "tex-svg.js"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Type hints mention torch types for which no inventory exists offline.
nitpicky = False

templates_path = []
exclude_patterns = ["_build"]
html_static_path = ["_static"]
html_theme = "furo"
html_title = f"pycoe {release}"


def _skip_undocumented_torch_overrides(app, what, name, obj, skip, options):
    """Hide overrides of ``nn.Module`` methods that have no docstring of their own (e.g. ``extra_repr``):
    autodoc would otherwise show torch's inherited boilerplate ("you should re-implement this method")."""
    import torch

    if hasattr(torch.nn.Module, name) and getattr(obj, "__doc__", None) is None:
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_undocumented_torch_overrides)
