"""LayerNorm, RMSNorm, GroupNorm and InstanceNorm: the norms whose statistics are per example."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from normjax._src import axes as axes_lib
from normjax._src.standardize import standardize


def layer_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: axes_lib.Axes = -1,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    feature_axes: axes_lib.Axes | None = None,
    axis_name: axes_lib.AxisName = None,
    axis_index_groups=None,
    dtype=None,
    normalized_dtype=None,
) -> jax.Array:
    r"""Layer Normalization (Ba, Kiros & Hinton, 2016): standardize each example over ``axis``.

    .. math::

        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta, \qquad
        \mu, \sigma^2 \text{ over the axes } \texttt{axis} \text{ of each example}

    Args:
      x: the input, e.g. ``(N, T, D)``.
      scale: optional :math:`\gamma`, of the shape of ``x`` along ``feature_axes``.
      bias: optional :math:`\beta`, likewise.
      axis: the normalized axis or axes.
      epsilon: a small positive number added to the variance.
      mask: optional boolean array broadcastable to ``x``; False elements are ignored by the statistics.
      feature_axes: the axes ``scale`` and ``bias`` run along; defaults to ``axis``.
      axis_name: optional mapped axis over which the statistics are also reduced.
      axis_index_groups: optional groups along ``axis_name``.
      dtype: the output dtype; defaults to ``x``'s (float32 for an 8-bit float ``x``).
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once;
        a dtype rounds :math:`\hat x` to it before the affine, which then runs in the promotion of it and the
        parameters' dtypes (HF Llama: the input dtype; see the numerics guide).

    Returns:
      The normalized array, in ``dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> normjax.layer_norm(jnp.array([[1.0, 3.0], [10.0, 30.0]]), epsilon=1e-12).tolist()
      [[-1.0, 1.0], [-1.0, 1.0]]

    References:
      Ba, Kiros & Hinton, "Layer Normalization", arXiv:1607.06450, 2016.
    """
    axes_lib.check_inexact(x)
    axis = axes_lib.canonicalize_axes(axis, jnp.ndim(x), "axis")  # so errors name `axis`, not the core's `axes`
    axes_lib.check_norm_values("layer_norm", x.shape, axis, axis_name, axis_index_groups)  # argument check (axes.py)
    return standardize(
        x,
        scale,
        bias,
        reduction_axes=axis,
        feature_axes=axis if feature_axes is None else feature_axes,
        epsilon=epsilon,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        dtype=dtype,
        normalized_dtype=normalized_dtype,
    )[0]


def rms_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    *,
    axis: axes_lib.Axes = -1,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    feature_axes: axes_lib.Axes | None = None,
    axis_name: axes_lib.AxisName = None,
    axis_index_groups=None,
    dtype=None,
    normalized_dtype=None,
) -> jax.Array:
    r"""Root Mean Square Layer Normalization (Zhang & Sennrich, 2019): rescale without centering.

    .. math::

        y = \frac{x}{\sqrt{\frac{1}{n}\sum_i x_i^2 + \epsilon}}\,\gamma

    Args:
      x: the input.
      scale: optional :math:`\gamma`, of the shape of ``x`` along ``feature_axes``.
      axis: the normalized axis or axes.
      epsilon: a small positive number added to the mean square.
      mask: optional boolean array broadcastable to ``x``.
      feature_axes: the axes ``scale`` runs along; defaults to ``axis``.
      axis_name: optional mapped axis over which the statistics are also reduced.
      axis_index_groups: optional groups along ``axis_name``.
      dtype: the output dtype; defaults to ``x``'s (float32 for an 8-bit float ``x``).
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once;
        a dtype rounds :math:`\hat x` to it before the affine, which then runs in the promotion of it and the
        parameters' dtypes (HF Llama: the input dtype; see the numerics guide).

    Returns:
      The normalized array, in ``dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> normjax.rms_norm(jnp.array([[3.0, -3.0]]), epsilon=1e-12).tolist()
      [[1.0, -1.0]]

    References:
      Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """
    axes_lib.check_inexact(x)
    axis = axes_lib.canonicalize_axes(axis, jnp.ndim(x), "axis")  # so errors name `axis`, not the core's `axes`
    axes_lib.check_norm_values("rms_norm", x.shape, axis, axis_name, axis_index_groups)  # argument check (axes.py)
    return standardize(
        x,
        scale,
        None,
        reduction_axes=axis,
        feature_axes=axis if feature_axes is None else feature_axes,
        epsilon=epsilon,
        mask=mask,
        centered=False,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        dtype=dtype,
        normalized_dtype=normalized_dtype,
    )[0]


def group_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    num_groups: int | None = None,
    group_size: int | None = None,
    axis: int = -1,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    axis_name: axes_lib.AxisName = None,
    axis_index_groups=None,
    dtype=None,
    normalized_dtype=None,
) -> jax.Array:
    r"""Group Normalization (Wu & He, 2018): standardize groups of contiguous channels of each example.

    The channels along ``axis`` are split into ``num_groups`` contiguous blocks (as in PyTorch and Flax); each
    block is standardized over its channels and every other non-batch axis (axis 0 is the batch), then the
    per-channel affine is applied. One group is LayerNorm over channels and spatial axes; one channel per
    group is InstanceNorm.

    Args:
      x: the input with the batch on axis 0, e.g. ``(N, H, W, C)`` or ``(N, C, H, W)`` with ``axis=1``.
      scale: optional per-channel :math:`\gamma`, shape ``(C,)``.
      bias: optional per-channel :math:`\beta`, shape ``(C,)``.
      num_groups: the number of groups; give exactly one of ``num_groups`` and ``group_size``.
      group_size: the number of channels per group.
      axis: the channel axis.
      epsilon: a small positive number added to the variance.
      mask: optional boolean array broadcastable to ``x``.
      axis_name: optional mapped axis over which the statistics are also reduced.
      axis_index_groups: optional groups along ``axis_name``.
      dtype: the output dtype; defaults to ``x``'s (float32 for an 8-bit float ``x``).
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once;
        a dtype rounds :math:`\hat x` to it before the affine, which then runs in the promotion of it and the
        parameters' dtypes (HF Llama: the input dtype; see the numerics guide).

    Returns:
      The normalized array, in ``dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> x = jnp.array([[1.0, 3.0, 10.0, 30.0]])
      >>> normjax.group_norm(x, num_groups=2, epsilon=1e-12).tolist()
      [[-1.0, 1.0, -1.0, 1.0]]

    References:
      Wu & He, "Group Normalization", ECCV 2018.
    """
    axes_lib.check_inexact(x)
    ndim = jnp.ndim(x)
    channel_axis = axes_lib.canonicalize_channel_axis(axis, ndim, "group_norm")
    channels = x.shape[channel_axis]
    groups = axes_lib.check_groups(channels, num_groups, group_size)
    if mask is not None:
        axes_lib.check_mask(mask, x.shape)
        mask = jnp.broadcast_to(mask, x.shape)
    grouped_shape = x.shape[:channel_axis] + (groups, channels // groups) + x.shape[channel_axis + 1 :]
    regroup = lambda a: None if a is None else jnp.reshape(a, grouped_shape)  # noqa: E731
    grouped_reduction = axes_lib.complement((0, channel_axis), len(grouped_shape))
    axes_lib.check_norm_values("group_norm", grouped_shape, grouped_reduction, axis_name, axis_index_groups)
    axes_lib.check_param(scale, (channels,), "scale", f"one value per channel along axis {channel_axis}")
    axes_lib.check_param(bias, (channels,), "bias", f"one value per channel along axis {channel_axis}")
    per_group = lambda p: None if p is None else jnp.reshape(p, (groups, channels // groups))  # noqa: E731
    y = standardize(
        regroup(x),
        per_group(scale),
        per_group(bias),
        reduction_axes=axes_lib.complement((0, channel_axis), len(grouped_shape)),
        feature_axes=(channel_axis, channel_axis + 1),
        epsilon=epsilon,
        mask=regroup(mask),
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        dtype=dtype,
        normalized_dtype=normalized_dtype,
    )[0]
    return jnp.reshape(y, x.shape)


def instance_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: int = -1,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    axis_name: axes_lib.AxisName = None,
    axis_index_groups=None,
    dtype=None,
    normalized_dtype=None,
) -> jax.Array:
    r"""Instance Normalization (Ulyanov, Vedaldi & Lempitsky, 2016): per example and channel, over space.

    .. math::

        y_{n,c} = \frac{x_{n,c} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}}\,\gamma_c + \beta_c

    with the statistics over every axis but the batch (axis 0) and the channel axis.

    Args:
      x: the input with the batch on axis 0, e.g. ``(N, H, W, C)``.
      scale: optional per-channel :math:`\gamma`, shape ``(C,)``.
      bias: optional per-channel :math:`\beta`, shape ``(C,)``.
      axis: the channel axis.
      epsilon: a small positive number added to the variance.
      mask: optional boolean array broadcastable to ``x``.
      axis_name: optional mapped axis over which the statistics are also reduced.
      axis_index_groups: optional groups along ``axis_name``.
      dtype: the output dtype; defaults to ``x``'s (float32 for an 8-bit float ``x``).
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once;
        a dtype rounds :math:`\hat x` to it before the affine, which then runs in the promotion of it and the
        parameters' dtypes (HF Llama: the input dtype; see the numerics guide).

    Returns:
      The normalized array, in ``dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> x = jnp.array([[[1.0, 10.0], [3.0, 30.0]]])  # (N=1, L=2, C=2)
      >>> normjax.instance_norm(x, epsilon=1e-12).tolist()
      [[[-1.0, -1.0], [1.0, 1.0]]]

    References:
      Ulyanov, Vedaldi & Lempitsky, "Instance Normalization: The Missing Ingredient for Fast Stylization",
      arXiv:1607.08022, 2016.
    """
    axes_lib.check_inexact(x)
    ndim = jnp.ndim(x)
    channel_axis = axes_lib.canonicalize_channel_axis(axis, ndim, "instance_norm")
    reduction_axes = axes_lib.complement((0, channel_axis), ndim)
    axes_lib.check_norm_values("instance_norm", x.shape, reduction_axes, axis_name, axis_index_groups)  # (axes.py)
    return standardize(
        x,
        scale,
        bias,
        reduction_axes=reduction_axes,
        feature_axes=channel_axis,
        epsilon=epsilon,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        dtype=dtype,
        normalized_dtype=normalized_dtype,
    )[0]
