"""BatchNorm test data shared by the BatchNorm, Batch Renorm and Ghost BatchNorm tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import reference

import normjax


def feature_shape(shape, axis):
    return tuple(shape[a] for a in reference._axes(axis, len(shape)))


def inputs(shape, axis, seed=0, mean=1.0, std=2.0):
    """x, scale, bias and a running state (not the initial one) for a batch of `shape` with features on `axis`."""
    rng = np.random.default_rng(seed)
    features = feature_shape(shape, axis)
    x = rng.normal(mean, std, shape).astype(np.float32)
    scale = rng.normal(1.0, 0.3, features).astype(np.float32)
    bias = rng.normal(0.0, 0.5, features).astype(np.float32)
    state = normjax.BatchNormState(
        mean=jnp.asarray(rng.normal(0.0, 1.0, features), jnp.float32),
        var=jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32),
    )
    return x, scale, bias, state


def ema(old, batch, momentum):
    """The float64 exponential moving average of the running statistics."""
    return momentum * np.asarray(old, np.float64) + (1 - momentum) * batch
