"""Moments over any axes: the one place statistics are computed and the one place a collective happens."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import axes as axes_lib


class Moments(NamedTuple):
    """Statistics of the valid elements of an array over some axes.

    Attributes:
      mean: the mean (complex for complex inputs; zero when not centered).
      var: the biased variance, ``mean(|x - mean|^2)`` (``mean(|x|^2)`` when not centered). Always real.
      count: how many valid elements contributed, as a float array of ``mean``'s shape.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array


def _abs_square(z: jax.Array) -> jax.Array:
    if jnp.iscomplexobj(z):
        return jnp.real(z) ** 2 + jnp.imag(z) ** 2
    return z * z


def _without_unit_axes(a: jax.Array) -> jax.Array:
    return jnp.reshape(a, tuple(d for d in jnp.shape(a) if d != 1))


def _psum(tree, axis_name, axis_index_groups):
    """``lax.psum`` of a tree of (keepdims) statistics, all-reduced without their unit axes.

    Why squeezed: XLA:CPU fuses a reduction with the reshape after it, and its library reductions are several
    times slower when their result keeps unit axes (``(1, 1, 1, C)`` rather than ``(C,)``); an all-reduce of the
    keepdims shape would pin that shape onto every reduction feeding it.
    """
    if axis_name is None:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    try:
        summed = jax.lax.psum([_without_unit_axes(a) for a in leaves], axis_name, axis_index_groups=axis_index_groups)
        return treedef.unflatten([jnp.reshape(s, jnp.shape(a)) for s, a in zip(summed, leaves, strict=True)])
    except NotImplementedError:
        if axis_index_groups is None:
            raise
        # JAX implements grouped collectives only under pmap; say what to do instead of a bare error.
        raise NotImplementedError(
            f"`axis_index_groups` is only supported by JAX under `jax.pmap`, not under the transformation that "
            f"binds `axis_name`={axis_name!r} (shard_map or vmap). For the same sub-group statistics split the "
            "axis in two: under shard_map build the mesh with shape (groups, per_group) and pass "
            "`axis_name='per_group'`; under vmap nest two vmaps and pass the inner axis name."
        ) from None


def moments(
    x: jax.Array,
    axes: axes_lib.Axes,
    *,
    mask: jax.Array | None = None,
    axis_name: axes_lib.AxisName = None,
    axis_index_groups=None,
    keepdims: bool = False,
    centered: bool = True,
) -> Moments:
    r"""Mean, biased variance and count of ``x`` over ``axes``, stable and exact across devices.

    .. math::

        n = \sum_i m_i, \qquad \mu = \frac{1}{n}\sum_i m_i x_i, \qquad
        \sigma^2 = \frac{1}{n}\sum_i m_i \lvert x_i - \mu \rvert^2

    where :math:`m_i \in \{0, 1\}` is the mask and the sums also run over every device of ``axis_name``.
    The variance is computed in two passes around the *global* mean, so it does not suffer the catastrophic
    cancellation of :math:`E[x^2] - E[x]^2` for inputs whose mean is large relative to their spread.
    Reductions run in float32 or wider whatever the input dtype (bfloat16 and float16 give float32 moments).

    With ``axis_name`` the statistics are those of the concatenation of every device's valid elements, exact
    for uneven per-device counts (a device with no valid element contributes nothing). This takes two
    all-reduce rounds: ``(sum, count)`` and then the sum of squared deviations from the global mean, i.e.
    ``3 * F`` numbers in the statistics dtype per device per call for ``F`` statistics (``2 * F + 1`` without a
    mask; one round of ``F + 1``, or ``2 * F`` with a mask, when ``centered=False``). Differentiating adds
    all-reduces of ``2 * F`` numbers (``F`` when ``centered=False``) in the backward pass. See the
    synchronization guide (``docs/guides/sync.md``).

    Args:
      x: a floating-point or complex array.
      axes: the axes to reduce (int or tuple; may be empty when ``axis_name`` does all the reducing).
      mask: optional boolean array broadcastable to ``x``; ``False`` elements contribute nothing whatever they
        hold (NaN, inf).
      axis_name: optional name (or tuple of names) of a mapped axis (``pmap``, ``shard_map``, ``vmap``) over
        which to also reduce.
      axis_index_groups: optional groups of indices along ``axis_name`` that are reduced separately.
      keepdims: keep the reduced axes as size-1 axes, so the moments broadcast against ``x``.
      centered: if False, ``mean`` is zero and ``var`` is the mean square (for RMSNorm).

    Returns:
      ``Moments(mean, var, count)``.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> x = jnp.array([[1e4 + 1.0, 1.0], [1e4 - 1.0, 3.0]])
      >>> m = normjax.moments(x, axes=0)
      >>> m.mean.tolist(), m.var.tolist(), m.count.tolist()
      ([10000.0, 2.0], [1.0, 1.0], [2.0, 2.0])
    """
    axes_lib.check_inexact(x)
    reduce_axes = axes_lib.canonicalize_axes(axes, jnp.ndim(x), "axes")
    axes_lib.check_mask(mask, jnp.shape(x))
    axes_lib.check_axis_name(axis_name, axis_index_groups)
    axes_lib.check_static_bool(keepdims, "keepdims")  # argument check (axes.py)
    axes_lib.check_static_bool(centered, "centered")  # argument check (axes.py)

    dtype = axes_lib.stats_dtype(x.dtype)
    real_dtype = jnp.finfo(dtype).dtype
    x = x.astype(dtype)
    if mask is None:
        count = jnp.asarray(_static_size(x.shape, reduce_axes), real_dtype)
    else:
        mask = jnp.broadcast_to(mask, x.shape)
        x = jnp.where(mask, x, jnp.zeros((), dtype))
        count = jnp.sum(mask, reduce_axes, keepdims=True, dtype=real_dtype)

    def total(values):
        return jnp.sum(values, reduce_axes, keepdims=True)

    if centered:
        sums, count = _psum((total(x), count), axis_name, axis_index_groups)
        mean = sums / jnp.maximum(count, 1)
        deviations = _abs_square(x - mean)
        if mask is not None:
            deviations = jnp.where(mask, deviations, jnp.zeros((), real_dtype))
        m2 = _psum(total(deviations), axis_name, axis_index_groups)
    else:
        m2, count = _psum((total(_abs_square(x)), count), axis_name, axis_index_groups)
        mean = jnp.zeros(m2.shape, dtype)
    var = m2 / jnp.maximum(count, 1)
    count = jnp.broadcast_to(count, var.shape)
    if not keepdims:
        mean, var, count = (jnp.squeeze(a, reduce_axes) for a in (mean, var, count))
    return Moments(mean, var, count)


def _static_size(shape: tuple[int, ...], reduce_axes: tuple[int, ...]) -> int:
    size = 1
    for a in reduce_axes:
        size *= shape[a]
    return size
