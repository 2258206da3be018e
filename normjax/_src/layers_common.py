"""Flax's normalization-layer conventions, translated once into calls of the functional core.

``normjax.linen`` and ``normjax.nnx`` differ only in how they create and store variables. Everything else, the
same for both, is here as pure functions of arrays and static configuration:

- axes: Flax's ``axis`` / ``reduction_axes`` / ``feature_axes`` / GroupNorm's grouping, validated with clear
  errors and turned into the core's reduction and feature axes (each message starts with Flax's own sentence
  for the same mistake, so code that matches Flax's errors keeps working);
- dtypes: Flax's output dtype rule (``dtype`` if given, else the promotion of the input, scale and bias), and
  running statistics kept real, at least float32 and complex for complex inputs;
- when to synchronize: never while a linen model is being initialized, so ``model.init`` needs no bound axis;
- what to write back: the new running statistics, or nothing (evaluation, initialization).

Nothing here computes a statistic or normalizes: that is :func:`normjax.batch_norm` and
:func:`normjax._src.fused.standardize_with_moments` (which the functional norms call too).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from normjax._src import axes as axes_lib
from normjax._src.batch_norm import batch_norm
from normjax._src.fused import standardize_with_moments
from normjax._src.state import BatchNormState

#: The dtype the layers create running statistics in, whatever ``param_dtype`` or ``force_float32_reductions``.
RUNNING_STATS_DTYPE = jnp.float32


def output_dtype(*arrays: jax.Array | None, dtype=None) -> jnp.dtype:
    """Flax's output dtype for a normalization layer: ``dtype`` if given, else the promoted dtype of ``arrays``.

    This is ``flax.linen.dtypes.canonicalize_dtype``: ``None`` entries are ignored and a non-inexact result is
    promoted to floating point, so a bfloat16 input with float32 parameters gives a float32 output.
    """
    if dtype is None:
        dtype = jnp.result_type(*(a for a in arrays if a is not None))
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(
            f"`dtype` must be a floating-point or complex dtype (the layer's output dtype), got {dtype}. "
            "Pass e.g. `dtype=jnp.bfloat16`, or `dtype=None` to infer it from the input and parameters."
        )
    return dtype


def bool_mask(mask) -> jax.Array | None:
    """Flax accepts any 0/1 mask and casts it to bool (``jnp.asarray(mask, bool)``); so do the layers."""
    return None if mask is None else jnp.asarray(mask, bool)


def widen(x, out_dtype) -> jax.Array:
    """``x`` in the promotion of its dtype and the output dtype: exact (a wider float, or an integer input made
    floating, as Flax accepts), so the core computes in >= float32 and rounds once, to the output dtype."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, out_dtype))


def promote_exactly(args: Sequence[jax.Array | None], /, *, dtype=None) -> tuple[jax.Array | None, ...]:
    """The nnx layers' default ``promote_dtype`` hook: Flax's signature, normjax's rounding (once, at the end).

    Each array is cast to the promotion of its dtype and the layer's output dtype (:func:`output_dtype` of all
    of them), which never narrows: with ``dtype=float16`` a float32 input stays float32 and the core rounds once,
    to float16, exactly as the linen layer does, so linen and nnx give bit-identical outputs. Flax's own hook,
    ``flax.nnx.nn.dtypes.promote_dtype``, first casts the input to ``dtype`` (rounding it before its statistics
    are computed); pass it as ``promote_dtype`` to reproduce Flax nnx bit for bit.
    """
    out = output_dtype(*args, dtype=dtype)
    return tuple(None if a is None else widen(a, out) for a in args)


def feature_shape(shape: Sequence[int], axes: axes_lib.Axes, name: str) -> tuple[int, ...]:
    """The shape of a per-feature parameter: ``shape`` along the (sorted, non-negative) axes ``axes``."""
    return tuple(shape[a] for a in axes_lib.canonicalize_axes(axes, len(shape), name))


def _running_state(mean: jax.Array, var: jax.Array, x_dtype) -> BatchNormState:
    """Running statistics in the form the core requires for an input of dtype ``x_dtype``.

    At least float32 (a checkpoint may hold narrower ones); ``var`` real (an nnx ``promote_dtype`` may have made
    it complex); ``mean`` complex for a complex input. The last is what linen Flax does too: its running mean
    becomes complex on the first complex batch, where nnx Flax drops the imaginary part with a FutureWarning.
    """
    stats_dtype = jnp.promote_types(x_dtype, jnp.float32)
    mean = jnp.asarray(mean)
    mean = mean.astype(jnp.promote_types(mean.dtype, stats_dtype))
    var = jnp.asarray(var)
    if jnp.iscomplexobj(var):
        var = jnp.real(var)
    var = var.astype(jnp.promote_types(var.dtype, jnp.float32))
    return BatchNormState(mean=mean, var=var)


def apply_batch_norm(
    x: jax.Array,
    running_mean: jax.Array,
    running_var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    use_running_average: bool,
    initializing: bool,
    momentum: float,
    epsilon: float,
    axis: axes_lib.Axes,
    axis_name: axes_lib.AxisName,
    axis_index_groups,
    mask,
    dtype,
    unbiased_running_var: bool,
    skip_nonfinite: bool,
    virtual_batch_size: int | None,
    renorm_clipping: tuple[float, float] | None,
) -> tuple[jax.Array, BatchNormState | None]:
    """A BatchNorm layer's call: returns ``(y, new_running_stats)``, the latter ``None`` when nothing is written.

    In training during initialization the batch statistics are used without synchronization, ghost batches or
    renormalization, a batch of one is allowed, and the running statistics are left untouched (as in Flax):
    ``model.init(key, x)`` needs no bound ``axis_name`` and any init batch will do.
    """
    out = output_dtype(x, scale, bias, dtype=dtype)
    x = widen(x, out)
    state = _running_state(running_mean, running_var, x.dtype)
    shared = dict(epsilon=epsilon, axis=axis)
    if use_running_average:
        y, _ = batch_norm(x, state, scale, bias, training=False, **shared)
        return y.astype(out), None
    if initializing:
        y, _ = batch_norm(
            x, state, scale, bias, training=True, momentum=momentum, mask=bool_mask(mask), allow_single_value=True,
            **shared,
        )  # fmt: skip
        return y.astype(out), None
    y, new_state = batch_norm(
        x, state, scale, bias, training=True, momentum=momentum, axis_name=axis_name,
        axis_index_groups=axis_index_groups, mask=bool_mask(mask), unbiased_running_var=unbiased_running_var,
        skip_nonfinite=skip_nonfinite, virtual_batch_size=virtual_batch_size, renorm_clipping=renorm_clipping,
        **shared,
    )  # fmt: skip
    return y.astype(out), new_state


def apply_standardize(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    reduction_axes: axes_lib.Axes,
    feature_axes: axes_lib.Axes,
    epsilon: float,
    mask,
    axis_name: axes_lib.AxisName,
    axis_index_groups,
    dtype,
    initializing: bool = False,
    centered: bool = True,
) -> jax.Array:
    """LayerNorm / RMSNorm (``centered=False``) / InstanceNorm: per-example statistics, Flax's axes and dtypes.

    During initialization the statistics are not synchronized, so ``model.init`` needs no bound ``axis_name``
    (initialization only needs the parameters' shapes).
    """
    sync = not initializing
    out = output_dtype(x, scale, bias, dtype=dtype)
    return standardize_with_moments(
        widen(x, out),
        scale,
        bias,
        reduction_axes=reduction_axes,
        feature_axes=feature_axes,
        epsilon=epsilon,
        mask=bool_mask(mask),
        centered=centered,
        axis_name=axis_name if sync else None,
        axis_index_groups=axis_index_groups if sync else None,
        dtype=out,
    )[0]


def instance_norm_axes(ndim: int, feature_axes: axes_lib.Axes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Flax's InstanceNorm axes: ``(feature_axes, reduction_axes)``, reducing every axis but 0 and the features."""
    features = axes_lib.canonicalize_axes(feature_axes, ndim, "feature_axes")
    if 0 in features:
        raise ValueError(
            "The channel axes cannot include the leading dimension as this is assumed to be the batch axis. "
            f"`feature_axes`={feature_axes!r} includes axis 0 of the rank-{ndim} input. Put the batch first and "
            "pass the channel axes (e.g. -1 for NHWC); for a single example add a batch axis with `x[None]`."
        )
    return features, axes_lib.complement((0,) + features, ndim)


def group_count(channels: int, num_groups: int | None, group_size: int | None, channels_word="channels") -> int:
    """The number of groups of a GroupNorm layer, validated as Flax does (exactly one of the two is given).

    ``channels_word`` is the word of Flax's message for a group size that does not divide: "channels" in linen,
    "features" in nnx.
    """
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            "Either `num_groups` or `group_size` should be specified. If `group_size` is to be specified, pass "
            "`num_groups=None` as argument to override the default `num_groups` value of 32. "
            f"GroupNorm got num_groups={num_groups!r} and group_size={group_size!r}; give exactly one."
        )
    try:
        return axes_lib.check_groups(channels, num_groups, group_size)
    except ValueError as error:
        if num_groups is not None:
            flax_sentence = f"Number of groups ({num_groups}) does not divide the number of channels ({channels})."
        else:
            flax_sentence = f"Number of {channels_word} ({channels}) is not multiple of the group size ({group_size})."
        raise ValueError(f"{flax_sentence} {error}") from None


def _group_reduction_axes(ndim: int, reduction_axes: axes_lib.Axes | None) -> tuple[int, ...]:
    """Flax's GroupNorm ``reduction_axes`` (default: all but the batch axis) without the channel axis."""
    if reduction_axes is None:
        reduction_axes = tuple(range(1, ndim - 1)) + (ndim - 1,)
    axes = axes_lib.canonicalize_axes(reduction_axes, ndim, "reduction_axes")
    if ndim - 1 not in axes:
        raise ValueError(
            "The reduction axes must include the final dimension as this is assumed to be the feature axis. "
            f"`reduction_axes`={reduction_axes!r} must include the last axis, GroupNorm's channel axis (the "
            f"channels of a group are always reduced together); input rank {ndim}. Add -1, e.g. "
            f"`reduction_axes={tuple(a - ndim for a in axes) + (-1,)}`."
        )
    return axes[:-1]


def apply_group_norm(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    num_groups: int | None,
    group_size: int | None,
    reduction_axes: axes_lib.Axes | None,
    epsilon: float,
    mask,
    axis_name: axes_lib.AxisName,
    axis_index_groups,
    dtype,
    initializing: bool = False,
) -> jax.Array:
    """Flax's GroupNorm: channels (last axis) split into contiguous groups, statistics over each group and
    ``reduction_axes``; a per-channel affine.

    Flax defines GroupNorm as standardizing ``x.reshape(..., groups, group_size)`` over ``reduction_axes`` and
    the group's channels, which is exactly :func:`standardize_with_moments` on that view.
    """
    out = output_dtype(x, scale, bias, dtype=dtype)
    x = widen(x, out)
    ndim = x.ndim
    channels = x.shape[-1]
    groups = group_count(channels, num_groups, group_size)
    spatial = _group_reduction_axes(ndim, reduction_axes)
    per_channel = f"one value per channel of the last axis ({channels})"
    axes_lib.check_param(scale, (channels,), "scale", per_channel)
    axes_lib.check_param(bias, (channels,), "bias", per_channel)
    mask = bool_mask(mask)
    if mask is not None:
        axes_lib.check_mask(mask, x.shape)
        mask = jnp.broadcast_to(mask, x.shape)
    grouped_shape = x.shape[:-1] + (groups, channels // groups)
    regroup = lambda a: None if a is None else jnp.reshape(a, grouped_shape)  # noqa: E731
    per_group = lambda p: None if p is None else jnp.reshape(p, grouped_shape[-2:])  # noqa: E731
    sync = not initializing
    y = standardize_with_moments(
        regroup(x),
        per_group(scale),
        per_group(bias),
        reduction_axes=spatial + (ndim,),
        feature_axes=(ndim - 1, ndim),
        epsilon=epsilon,
        mask=regroup(mask),
        axis_name=axis_name if sync else None,
        axis_index_groups=axis_index_groups if sync else None,
        dtype=out,
    )[0]
    return jnp.reshape(y, x.shape)
