"""Flax 0.12.8's own normalization tests pass with normjax's layers in place of Flax's.

The test classes are Flax's, vendored in ``tests/flax_suite/`` (see its ``__init__``): ``NormalizationTest``
of ``tests/linen/linen_test.py`` and ``TestLinenConsistency`` of ``tests/nnx/nn/normalization_test.py``, with
``linen`` / ``nnx`` pointing at Flax's modules with normjax's BatchNorm, LayerNorm, RMSNorm, GroupNorm and
InstanceNorm swapped in. pytest collects the two classes imported here, unchanged and in full.
"""

import flax.linen
import flax.nnx
import pytest
from flax_suite import NORM_LAYERS, linen, nnx
from flax_suite.linen_normalization import NormalizationTest
from flax_suite.nnx_normalization import TestLinenConsistency

import normjax.linen
import normjax.nnx

__all__ = ["NormalizationTest", "TestLinenConsistency"]  # collected by pytest as unittest classes


@pytest.mark.parametrize("layer", NORM_LAYERS)
def test_the_suite_runs_normjax_layers_and_flax_everything_else(layer):
    assert getattr(linen, layer) is getattr(normjax.linen, layer) is not getattr(flax.linen, layer)
    assert getattr(nnx, layer) is getattr(normjax.nnx, layer) is not getattr(flax.nnx, layer)
    assert (linen.Dense, linen.SpectralNorm, nnx.Linear, nnx.Rngs) == (
        flax.linen.Dense,
        flax.linen.SpectralNorm,
        flax.nnx.Linear,
        flax.nnx.Rngs,
    )
