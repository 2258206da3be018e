"""Bit-exact comparison: equality that distinguishes -0.0 from 0.0 and compares NaN payloads."""

from __future__ import annotations

import jax
import numpy as np


def bits(a) -> np.ndarray:
    """The raw bit patterns of ``a``."""
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def assert_bit_exact(got, want) -> None:
    """``got`` and ``want`` (arrays or trees of them) have the same structure, dtypes and bits."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        np.testing.assert_array_equal(bits(g), bits(w))
