"""Sphinx configuration for the normjax documentation.

Build (warnings are errors):  python -m sphinx -W --keep-going -b html docs docs/_build/html   (or `make docs`)
The build needs no network, and neither do the built pages (MathJax is copied next to them). Cross-links into the JAX, Flax and Optax docs (intersphinx) download their
inventories, so they are only enabled with NORMJAX_DOCS_INTERSPHINX=1.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # document the checkout, not an installed copy

import normjax  # noqa: E402

project = "normjax"
author = "the normjax authors"
copyright = "2026, the normjax authors"
release = normjax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
    "sphinx-mathjax-offline",  # serves MathJax 3 from _static/mathjax: math renders with no network
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "**/_build", "Thumbs.db", ".DS_Store"]

# MyST: $...$ math, ::: fences, heading anchors for cross-page links like [text](numerics.md#section).
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc / autosummary / napoleon: Google-style docstrings; defaults shown as written in the source.
autosummary_generate = False  # the API pages list their objects explicitly (see docs/api/)
autodoc_typehints = "description"  # keeps signatures short (the Flax layers have many typed fields)
autodoc_typehints_description_target = "documented"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
# Flax's type aliases by their public names, not the unions of private jax._src types they expand to.
autodoc_type_aliases = {alias: f"flax.typing.{alias}" for alias in ("Array", "Axes", "Dtype", "Initializer")}
autodoc_type_aliases |= {name: f"normjax.{name}" for name in ("BatchNormState", "Moments")}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Examples are tested by pytest, not by Sphinx's doctest builder: docstrings by `--doctest-modules` (with the
# test suite's 8 simulated devices, which some examples need), README and guides by tests/test_docs.py.

intersphinx_mapping = {}
if os.environ.get("NORMJAX_DOCS_INTERSPHINX") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "jax": ("https://docs.jax.dev/en/latest/", None),
        "flax": ("https://flax.readthedocs.io/en/latest/", None),
        "optax": ("https://optax.readthedocs.io/en/latest/", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
    }
intersphinx_timeout = 10

html_theme = "furo"
html_title = f"normjax {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]

# The copy button copies code without the ">>> " and "... " prompts (and without doctest output) or "$ ".
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = True


# The Flax layers' generated __init__ shows default values by their repr; show them as written in the source,
# and leave out the `parent` field every linen module has (Flax sets it; users never pass it).
_SIGNATURE_REWRITES = (
    (re.compile(r",\s*parent=<flax\.linen\.module\._Sentinel object>"), ""),
    (re.compile(r"<class 'jax\.numpy\.(\w+)'>"), r"jnp.\1"),
    (re.compile(r"<function (zeros|ones)>"), r"initializers.\1"),
)


def _clean_signature(app, what, name, obj, options, signature, return_annotation):
    if signature:
        for pattern, replacement in _SIGNATURE_REWRITES:
            signature = pattern.sub(replacement, signature)
    return signature, return_annotation


def setup(app):
    app.connect("autodoc-process-signature", _clean_signature)
