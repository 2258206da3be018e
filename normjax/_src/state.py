"""Running statistics of BatchNorm: the state pytree and its update rule."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp


class BatchNormState(NamedTuple):
    """Running (population) statistics of a BatchNorm, threaded explicitly through training.

    A pytree, so it can be jitted, vmapped (a stack of states for an ensemble), checkpointed and sharded.

    Attributes:
      mean: the running mean, one value per feature; float32 by default.
      var: the running variance, one value per feature; float32 by default.
    """

    mean: jax.Array
    var: jax.Array


def init_batch_norm_state(features: int | Sequence[int], dtype=jnp.float32) -> BatchNormState:
    """The initial running statistics: mean 0 and variance 1 for each feature.

    Args:
      features: the number of features, or the shape of the feature axes (e.g. ``(C,)``).
      dtype: the statistics dtype; keep float32 (or wider) even for low-precision activations. A complex dtype
        (for complex inputs) gives a complex ``mean`` and a real ``var`` of the same precision.

    Returns:
      A :class:`BatchNormState`.

    Example:
      >>> import normjax
      >>> normjax.init_batch_norm_state(3)
      BatchNormState(mean=Array([0., 0., 0.], dtype=float32), var=Array([1., 1., 1.], dtype=float32))
    """
    # numbers.Integral: a NumPy integer (e.g. from np.prod or an array's shape arithmetic) is a size too.
    shape = (int(features),) if isinstance(features, numbers.Integral) else tuple(int(f) for f in features)
    var_dtype = jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else dtype  # var is real
    return BatchNormState(mean=jnp.zeros(shape, dtype), var=jnp.ones(shape, var_dtype))


def ema_update(
    state: BatchNormState,
    mean: jax.Array,
    var: jax.Array,
    keep: jax.Array,
    *,
    momentum: float,
) -> BatchNormState:
    """``new = momentum * old + (1 - momentum) * batch`` where ``keep`` is False; the old value elsewhere.

    The update is computed in the state's dtype so the running statistics never drift to a lower precision.
    """

    def update(old, new):
        blended = momentum * old + (1.0 - momentum) * new.astype(old.dtype)
        return jnp.where(keep, old, blended.astype(old.dtype))

    return BatchNormState(mean=update(state.mean, mean), var=update(state.var, var))
