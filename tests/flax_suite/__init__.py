"""Flax 0.12.8's own normalization tests, run against normjax's layers.

The two modules here are Flax's test code, vendored (see each file's header). Their only change is the import
of ``linen`` / ``nnx``: it points at the two namespaces below, which are ``flax.linen`` and ``flax.nnx`` with
the five normalization layers (``BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``InstanceNorm``)
replaced by normjax's. Everything else a test uses (``Dense``, ``Linear``, ``Module``, ``SpectralNorm``,
``WeightNorm``, initializers, ...) is Flax's own, so a Flax test that wraps a norm layer (e.g. BatchNorm inside
``SpectralNorm``) runs normjax's layer inside Flax's wrapper.

Namespaces rather than a patch of ``flax.linen`` itself: the tests build some layers while their class is
defined (``parameterized.parameters(nn.LayerNorm(...))``), so a patch would have to be active at import and
would then leak into every other test of the session that compares against Flax's layers.
"""

from __future__ import annotations

import types

import flax.linen
import flax.nnx

import normjax.linen
import normjax.nnx

NORM_LAYERS = ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")


class _Swapped(types.ModuleType):
    """A module whose attributes are ``base``'s, except the norm layers, which are ``layers``'."""

    def __init__(self, name: str, base: types.ModuleType, layers: types.ModuleType):
        super().__init__(name, f"{base.__name__} with normjax's {', '.join(NORM_LAYERS)}")
        self._base = base
        for layer in NORM_LAYERS:
            setattr(self, layer, getattr(layers, layer))

    def __getattr__(self, name: str):
        return getattr(self._base, name)


linen = _Swapped("flax_suite.linen", flax.linen, normjax.linen)
nnx = _Swapped("flax_suite.nnx", flax.nnx, normjax.nnx)
