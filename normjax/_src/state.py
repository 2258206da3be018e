"""Running statistics of BatchNorm: the state pytree and its update rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import arguments, dtypes
from normjax._src.typing import ArrayLike, DTypeLike


class BatchNormState(NamedTuple):
    """Running (population) statistics of a BatchNorm, threaded explicitly through training.

    A pytree, so it can be jitted, vmapped (a stack of states for an ensemble), checkpointed and sharded.

    Attributes:
      mean: the running mean, one value per feature; float32 by default.
      var: the running variance, one value per feature; float32 by default.
      count: the number of training steps that updated the state, an int32 scalar (Optax's ``count``,
        PyTorch's ``num_batches_tracked``): a step whose batch left every feature's statistics unchanged (empty,
        all masked, or not finite) does not count. :func:`init_batch_norm_state` starts it at 0; ``None``
        (the default of the constructor) leaves the steps uncounted. Batch Renormalization's warm-up
        (``renorm_warmup_steps``) reads it, and a schedule of ``renorm_clipping`` may be computed from it.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array | None = None


def init_batch_norm_state(features: int | Sequence[int], dtype: DTypeLike = jnp.float32) -> BatchNormState:
    """The initial running statistics: mean 0 and variance 1 for each feature.

    Args:
      features: the number of features, or the shape of the feature axes (e.g. ``(C,)``).
      dtype: the statistics dtype; keep float32 (or wider) even for low-precision activations. A complex dtype
        (for complex inputs) gives a complex ``mean`` and a real ``var`` of the same precision.

    Returns:
      A :class:`BatchNormState` whose step ``count`` is 0 (int32).

    Example:
      >>> import normjax
      >>> state = normjax.init_batch_norm_state(3)
      >>> state.mean, state.var
      (Array([0., 0., 0.], dtype=float32), Array([1., 1., 1.], dtype=float32))
      >>> state.count
      Array(0, dtype=int32)
    """
    shape = arguments.check_features(features)  # a NumPy integer (e.g. from np.prod) is a size too
    dtypes.check_float_dtype(dtype, "dtype", "the dtype of the running statistics")
    if dtype is None or jnp.finfo(dtype).bits < 32:
        raise TypeError(
            f"`dtype` must be float32 or wider (or complex64 or wider), got {jnp.dtype(dtype)}: running statistics "
            "in a narrower type stop updating (a step of weight 1 - momentum falls below its resolution). Keep "
            "`dtype=jnp.float32` whatever the activation dtype; the statistics are computed in float32 anyway."
        )
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    var_dtype = jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else dtype  # var is real
    count = jnp.zeros((), jnp.int32)
    return BatchNormState(mean=jnp.zeros(shape, dtype), var=jnp.ones(shape, var_dtype), count=count)


def ema_update(
    state: BatchNormState,
    mean: jax.Array,
    var: jax.Array,
    keep: jax.Array,
    *,
    momentum: ArrayLike,
    epsilon: ArrayLike | None = None,
) -> BatchNormState:
    """``new = momentum * old + (1 - momentum) * batch`` where ``keep`` is False; the old value elsewhere.

    The update is computed in the state's dtype so the running statistics never drift to a lower precision.
    Static hyperparameters are validated before tracing; a traced ``momentum`` outside [0, 1] (or NaN) or a
    traced ``epsilon`` that is not positive and finite keeps the whole state, as a non-finite batch does.
    The step ``count`` (if the state has one) grows by one when any feature was updated.
    """
    keep = keep | invalid_hyperparameters(momentum, epsilon)

    def update(old, new):
        blended = (momentum * old + (1.0 - momentum) * new.astype(old.dtype)).astype(old.dtype)
        return jnp.where(keep, _sharded_like(old, blended), blended)

    count = state.count
    if count is not None:
        count = jnp.asarray(count)
        count = count + jnp.any(~keep).astype(count.dtype)
    return BatchNormState(mean=update(state.mean, mean), var=update(state.var, var), count=count)


def _sharded_like(a: jax.Array, like: jax.Array) -> jax.Array:
    """``a`` with ``like``'s explicit sharding: the running state follows the sharding of the new statistics (as in
    Flax), and under explicit mesh axes ``jnp.where`` requires both branches sharded alike."""
    sharding, target = jax.typeof(a).sharding, jax.typeof(like).sharding
    explicit = getattr(target, "spec", None) is not None and any(entry is not None for entry in target.spec)
    return jax.sharding.reshard(a, target) if explicit and sharding != target else a


def invalid_hyperparameters(momentum: ArrayLike, epsilon: ArrayLike | None = None) -> jax.Array:
    """True when ``momentum`` is outside [0, 1] or NaN, or ``epsilon`` is not positive and finite (a 0-d bool).

    Static values were already refused by the argument checks, so this only ever fires for traced ones (e.g. a
    hyperparameter sweep under ``vmap``); it is a constant for static ones, which XLA folds away.
    """
    momentum = jnp.asarray(momentum)
    invalid = ~((momentum >= 0) & (momentum <= 1))  # comparisons with NaN are False
    if epsilon is not None:
        epsilon = jnp.asarray(epsilon)
        invalid = invalid | ~((epsilon > 0) & jnp.isfinite(epsilon))
    return invalid
