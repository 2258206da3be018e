"""Importing the packages that only part of normjax needs, with an error that names the extra to install.

``import normjax`` needs JAX alone. The Flax layers (``normjax.linen``, ``normjax.nnx``) and the utilities that
walk Flax models need Flax, installed by the ``flax`` extra; ``normjax.equinox`` needs Equinox, installed by the
``equinox`` extra. A missing one is reported when the part that needs it is used, not when normjax is imported.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# package import name -> (the name users know it by, the pip extra of normjax that installs it)
_EXTRAS = {"flax": ("Flax", "flax"), "equinox": ("Equinox", "equinox")}


def import_optional(module: str, *, needed_by: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ImportError naming the extra that installs its package.

    Args:
      module: the module to import, e.g. ``"flax.linen"``; its top-level package must be one of the extras'.
      needed_by: what needs it, for the message, e.g. ``"normjax.linen"``.

    Returns:
      The imported module.

    Raises:
      ImportError: when the top-level package is not installed. An installed package that fails to import
        (a broken installation, an incompatible version) raises its own error unchanged.
    """
    package = module.partition(".")[0]
    name, extra = _EXTRAS[package]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != package:
            raise
        raise ImportError(
            f"{needed_by} needs {name}, which is not installed. Install it with `pip install 'normjax[{extra}]'` "
            f"(or `pip install {package}`)."
        ) from error
