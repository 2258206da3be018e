"""Standardization and the affine transform: the one place normalized outputs are computed."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from normjax._src import arguments, dtypes
from normjax._src import axes as axes_lib
from normjax._src.boundary import named_scope
from normjax._src.standardize import as_affine, offset_scale, standardized_output
from normjax._src.typing import ArrayLike, Axes, DTypeLike


@named_scope("normalize")
def normalize(
    x: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    epsilon: float = 1e-5,
    feature_axes: Axes = -1,
    dtype: DTypeLike | None = None,
    normalized_dtype: DTypeLike | None = None,
    scale_offset: float = 0.0,
    mask: ArrayLike | None = None,
) -> jax.Array:
    r"""Standardizes ``x`` with given moments and applies an optional affine transform.

    .. math::

        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot (\gamma + c) + \beta

    The arithmetic runs in float32 or wider; the result is cast to ``dtype`` (default: ``x``'s dtype, float32
    for 8-bit float inputs).

    Args:
      x: the input.
      mean: the mean, broadcastable to ``x`` (e.g. :func:`normjax.moments` with ``keepdims=True``).
      var: the variance, broadcastable to ``x``.
      scale: optional :math:`\gamma`, of shape ``[x.shape[a] for a in feature_axes]``, or per example: of
        ``x``'s rank, broadcastable to ``x`` (e.g. ``(B, 1, D)`` for a ``(B, T, D)`` input).
      bias: optional :math:`\beta`, likewise.
      epsilon: a small positive number added to the variance.
      feature_axes: the axes of ``x`` that ``scale`` and ``bias`` run along.
      dtype: the output dtype; defaults to ``x.dtype`` (float32 for an 8-bit float ``x``).
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once;
        a dtype rounds :math:`\hat x` to it before the affine, which then runs in the promotion of it and the
        parameters' dtypes (HF Llama: the input dtype; see the numerics guide).
      scale_offset: :math:`c`, added to ``scale`` in float32 or wider: 1.0 for a zero-centered scale.
      mask: optional boolean array broadcastable to ``x``: a masked-out position that is not finite (padding)
        outputs ``bias`` and reaches no derivative, as in the norms; the others are standardized.

    Returns:
      The normalized array, of ``x``'s shape.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
      >>> m = normjax.moments(x, reduction_axes=0, keepdims=True)
      >>> normjax.normalize(x, m.mean, m.var, epsilon=1e-12).tolist()
      [[-1.0, -1.0], [1.0, 1.0]]
    """
    arguments.check_inexact(x)
    arguments.check_epsilon(epsilon, x.dtype)
    ndim = jnp.ndim(x)
    feature_axes = axes_lib.canonicalize_axes(feature_axes, ndim, "feature_axes")
    what = f"the size of x's feature axes {feature_axes}"
    arguments.check_affine(scale, x.shape, feature_axes, "scale", what)
    arguments.check_affine(bias, x.shape, feature_axes, "bias", what)
    arguments.check_scale_offset(scale_offset, scale)
    arguments.check_mask(mask, x.shape)
    arguments.check_moment_array(mean, "mean", x.shape)
    arguments.check_moment_array(var, "var", x.shape, real=True)
    dtypes.check_float_dtype(dtype)
    dtypes.check_normalized_dtype(normalized_dtype, x.dtype)
    out_dtype = dtypes.output_dtype(x, dtype)
    dtypes.check_real_output(out_dtype, mean=mean, scale=scale, bias=bias)

    if normalized_dtype is not None:
        normalized_dtype = jax.dtypes.canonicalize_dtype(normalized_dtype)
    return normalized(
        x, mean, var, scale, bias, epsilon=epsilon, feature_axes=feature_axes, out_dtype=out_dtype,
        normalized_dtype=normalized_dtype, scale_offset=scale_offset, mask=mask,
    )  # fmt: skip


def normalized(x, mean, var, scale, bias, *, epsilon, feature_axes, out_dtype, normalized_dtype, scale_offset, mask):
    """:func:`normalize`'s output for checked, canonical arguments (also BatchNorm's evaluation)."""
    ndim = jnp.ndim(x)
    compute_dtype = dtypes.stats_dtype(dtypes.promote_types(x.dtype, jnp.result_type(mean)))
    inv_std = jax.lax.rsqrt(jnp.asarray(var, jnp.finfo(compute_dtype).dtype) + epsilon)
    gamma = offset_scale(as_affine(scale, ndim, feature_axes), scale_offset, inv_std.dtype)
    beta = as_affine(bias, ndim, feature_axes)
    mask = None if mask is None else jnp.broadcast_to(mask, x.shape)
    y = standardized_output(x.astype(compute_dtype), mean, inv_std, gamma, beta, mask, normalized_dtype)
    return y.astype(out_dtype)
