"""The static description of one call of the core, checked and made canonical once, at the public boundary.

:func:`checked_call` is the one function that checks a norm's arguments: every public norm (through
:func:`norm_spec`) and every layer (linen, nnx, and Equinox through the functions) calls it once per call, and
passes the :class:`NormSpec` it returns, with the arrays it has checked, to
:func:`normjax._src.standardize.standardize`, which validates nothing. A linen layer creates its variables in the
middle of that one check, once the axes give their shape (:class:`Variables`), so no axis is read twice. Each check
lives in :mod:`~normjax._src.arguments`, :mod:`~normjax._src.axes`, :mod:`~normjax._src.dtypes` or
:mod:`~normjax._src.device_axes`, with the message users read (``docs/guides/errors.md``).

The Flax layers accept a few inputs the functions refuse, as Flax does; ``flax_layer`` (the layer's name) selects
those conventions explicitly: Flax's output dtype rule (the promotion of the input and the parameters), a
mask of any dtype made boolean by the layer, InstanceNorm over a single value, and, during ``model.init``
(``initializing``), no synchronization and a batch of one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from normjax._src import arguments, device_axes, dtypes
from normjax._src import axes as axes_lib
from normjax._src.state import BatchNormState
from normjax._src.typing import ArrayLike, Axes, AxisIndexGroups, AxisName, DTypeLike


class NormSpec(NamedTuple):
    """The static (hashable) part of a call of the core, canonical: what to reduce, what to output.

    Attributes:
      reduction_axes: the axes each statistic is computed over, sorted, of the array the core standardizes.
      feature_axes: the axes a per-feature scale and bias run along, likewise.
      centered: subtract the mean (False: RMSNorm).
      axis_name: the device axis (or tuple of axes) the statistics are merged over, or None.
      axis_index_groups: groups of indices along ``axis_name``, as tuples, or None.
      out_dtype: the output dtype.
      layout: how XLA sees the full-size work (:mod:`normjax._src.layout`), chosen per platform by the core.
      normalized_dtype: the casting order: None, or the dtype the normalized values are rounded to first.
      scale_offset: the constant added to the scale (1.0 for a zero-centered scale).
      zero_masked_outputs: output 0 where the mask is False.
      grouping: GroupNorm's ``(channel axis, groups)``: the core standardizes ``x`` with that axis split into
        ``(groups, channels per group)``, and the axes above are those of the split view; None otherwise.
      param_shape: the shape of a per-feature scale or bias (a layer creates its own with it).
      axis_size: how many devices each statistic is merged over (``axis_name``'s size, or its groups'), read
        where the axis is bound; None without ``axis_name``.
    """

    reduction_axes: tuple[int, ...]
    feature_axes: tuple[int, ...]
    centered: bool
    axis_name: Any
    axis_index_groups: tuple[tuple[int, ...], ...] | None
    out_dtype: np.dtype
    layout: str = "generic"
    normalized_dtype: np.dtype | None = None
    scale_offset: float = 0.0
    zero_masked_outputs: bool = False
    grouping: tuple[int, int] | None = None
    param_shape: tuple[int, ...] = ()
    axis_size: int | None = None


class Variables(NamedTuple):
    """The arrays of one call that run along the features, beside ``x``: those :func:`checked_call` checks.

    Attributes:
      scale, bias: the affine parameters as the call uses them (per feature or per example), or None.
      state: BatchNorm's running statistics, checked by :func:`~normjax._src.batch_norm.batch_norm_spec`; None for
        the other norms.
    """

    scale: ArrayLike | None = None
    bias: ArrayLike | None = None
    state: BatchNormState | None = None


#: The variables of a call as a function of the shape of a per-feature parameter (the spec's ``param_shape``):
#: a linen layer creates (or reads) its own there; the functions and nnx return those they were given.
VariablesFn = Callable[[tuple[int, ...]], Variables]


class _Axes(NamedTuple):
    reduction: tuple[int, ...]  # of the view the core standardizes
    features: tuple[int, ...]  # likewise
    param_axes: tuple[int, ...]  # of x: what a per-feature parameter runs along
    what: str  # the parameters' expected shape, in words
    grouping: tuple[int, int] | None = None


def _resolve_axes(norm, shape, *, axis, reduction_axes, feature_axes, num_groups, group_size, flax_layer) -> _Axes:
    """The norm's reduction and feature axes, canonical (each axis argument is canonicalized here, once)."""
    ndim = len(shape)
    if norm == "batch_norm":
        features = axes_lib.canonicalize_axes(axis, ndim, "axis")
        return _Axes(
            axes_lib.complement(features, ndim), features, features, f"one value per feature along axis {features}"
        )
    if norm == "instance_norm":
        features, reduction = axes_lib.instance_norm_axes(ndim, feature_axes)
    elif norm == "weight_standardize":
        default = tuple(range(ndim - 1)) if reduction_axes is None else reduction_axes
        reduction = axes_lib.canonicalize_axes(default, ndim, "reduction_axes")
        features = axes_lib.complement(reduction, ndim)
    elif norm == "group_norm":
        if flax_layer:  # Flax's GroupNorm: channels last; its reduction_axes include them
            channel = ndim - 1
            groups = arguments.group_count(
                shape[channel], num_groups, group_size, norm=flax_layer, flax_word="channels"
            )
            reduction = axes_lib.flax_group_norm_reduction_axes(ndim, reduction_axes) + (ndim,)
            what = f"one value per channel of the last axis ({shape[channel]})"
        else:
            channel = axes_lib.canonicalize_channel_axis(feature_axes, ndim, "group_norm", "feature_axes")
            groups = arguments.group_count(shape[channel], num_groups, group_size)
            reduction = axes_lib.group_norm_reduction_axes(reduction_axes, ndim, channel)
            what = f"one value per channel along axis {channel}"
        return _Axes(reduction, (channel, channel + 1), (channel,), what, (channel, groups))
    else:  # layer_norm, rms_norm: the features default to the reduced axes
        reduction = axes_lib.canonicalize_axes(reduction_axes, ndim, "reduction_axes")
        features = reduction if feature_axes is None else axes_lib.canonicalize_axes(feature_axes, ndim, "feature_axes")
    return _Axes(reduction, features, features, f"the size of x's feature axes {features}")


def grouped_shape(shape: tuple[int, ...], grouping: tuple[int, int] | None) -> tuple[int, ...]:
    """``shape`` with GroupNorm's channel axis split into ``(groups, channels per group)``; unchanged without."""
    if grouping is None:
        return tuple(shape)
    channel, groups = grouping
    return shape[:channel] + (groups, shape[channel] // groups) + shape[channel + 1 :]


def _check_value_counts(norm, flax_layer, shape, reduction, axis_name, axis_index_groups, mask, allow_single_value):
    """Refuses a statistic of a single value, statically known, with the fix that suits the function or layer."""
    if norm == "batch_norm":
        if not allow_single_value:  # (Ghost BatchNorm's virtual batches are counted by batch_norm_spec)
            arguments.check_batch_norm_values(shape, reduction, mask, axis_name, axis_index_groups, False)
    elif flax_layer is None:
        arguments.check_norm_values(
            "rms_norm" if norm == "gated_rms_norm" else norm, shape, reduction, axis_name, axis_index_groups
        )
    elif flax_layer != "InstanceNorm":  # Flax normalizes (N, C) with it: the output is the bias
        arguments.check_several_values(
            shape, reduction, axis_name, axis_index_groups, flax_layer,
            "Check `reduction_axes` (and `feature_axes`): they must reduce axes holding more than one element.",
            empty_only=True,
        )  # fmt: skip


def norm_spec(
    norm: str, x: ArrayLike, scale: ArrayLike | None = None, bias: ArrayLike | None = None, **options: Any
) -> NormSpec:
    """The functions' :func:`checked_call`: checks every argument of one call of ``norm``, ``scale`` and ``bias``
    given, and returns the core's :class:`NormSpec`. ``options`` are :func:`checked_call`'s."""
    spec, _ = checked_call(norm, x, lambda param_shape: Variables(scale, bias), **options)
    return spec


def checked_call(
    norm: str,
    x: ArrayLike,
    variables: VariablesFn,
    *,
    epsilon: Any,
    axis: Axes | None = None,
    reduction_axes: Axes | None = None,
    feature_axes: Axes | None = None,
    num_groups: int | None = None,
    group_size: int | None = None,
    mask: ArrayLike | None = None,
    axis_name: AxisName = None,
    axis_index_groups: AxisIndexGroups = None,
    dtype: DTypeLike | None = None,
    normalized_dtype: DTypeLike | None = None,
    scale_offset: float = 0.0,
    zero_masked_outputs: bool = False,
    gate: ArrayLike | None = None,
    norm_before_gate: bool = True,
    allow_single_value: bool = False,
    training: bool = True,
    flax_layer: str | None = None,
    initializing: bool = False,
    num_features: int | None = None,
) -> tuple[NormSpec, Variables]:
    """Checks every static argument of one call of ``norm`` once: returns the core's :class:`NormSpec` and the
    call's :class:`Variables`, whose ``scale`` and ``bias`` it has checked.

    The axes are made canonical first; ``variables`` is then called once with the shape of a per-feature
    parameter, so a linen layer creates its variables from the same canonical axes the core uses.

    Args:
      norm: the function's name (``"layer_norm"``, ``"rms_norm"``, ``"gated_rms_norm"``, ``"group_norm"``,
        ``"instance_norm"``, ``"batch_norm"``, ``"weight_standardize"``); a layer gives its function's.
      x: the input (a layer's, before it is widened to the output dtype).
      variables: the call's :class:`Variables` as a function of the parameters' shape (:data:`VariablesFn`).
      epsilon, ...: the norm's arguments, under their public names (``axis`` is BatchNorm's feature axis).
      gate, norm_before_gate: gated RMSNorm's gate and order.
      allow_single_value: BatchNorm's opt-in for one value per feature.
      training: False for BatchNorm's evaluation, which uses the running statistics: no synchronization.
      flax_layer: the Flax layer whose conventions apply (its name, for the messages), or None for the
        functions'.
      initializing: a Flax layer inside ``model.init``: no synchronization, and any batch will do.
      num_features: the feature size an nnx layer was built for, checked against ``x``'s feature axis.
    """
    if flax_layer is None:  # a Flax layer takes what jnp.asarray takes (its call refused a torch tensor)
        arguments.check_inexact(x, "kernel" if norm == "weight_standardize" else "x")
    shape = tuple(jnp.shape(x))
    if norm == "gated_rms_norm":
        arguments.check_gate(gate, shape)
        arguments.check_static_bool(norm_before_gate, "norm_before_gate")
    if num_features is not None:
        name, given = {"batch_norm": ("axis", axis), "group_norm": ("axis", -1)}.get(
            norm, ("feature_axes", feature_axes)
        )
        arguments.check_input_features(shape, name, given, num_features, flax_layer)
    found = _resolve_axes(
        norm, shape, axis=axis, reduction_axes=reduction_axes, feature_axes=feature_axes, num_groups=num_groups,
        group_size=group_size, flax_layer=flax_layer,
    )  # fmt: skip
    param_shape = tuple(shape[a] for a in found.param_axes)
    call_variables = variables(param_shape)
    scale, bias = call_variables.scale, call_variables.bias
    arguments.check_mask(mask, shape)
    synchronized = training and not initializing  # model.init and evaluation need no bound axis
    if synchronized:
        device_axes.check_axis_name(axis_name, axis_index_groups)
    if training and not (initializing and axis_name is not None):
        _check_value_counts(
            norm, flax_layer, grouped_shape(shape, found.grouping), found.reduction,
            axis_name if synchronized else None, axis_index_groups if synchronized else None, mask,
            allow_single_value or initializing,
        )  # fmt: skip
    if not synchronized:
        axis_name, axis_index_groups = None, None
    arguments.check_epsilon(epsilon, jnp.result_type(x))
    for param, name in ((scale, "scale"), (bias, "bias")):
        arguments.check_affine(param, shape, found.param_axes, name, found.what)
    arguments.check_scale_offset(scale_offset, scale)
    arguments.check_static_bool(zero_masked_outputs, "zero_masked_outputs")
    dtypes.check_normalized_dtype(normalized_dtype, jnp.result_type(x))
    if flax_layer is None:
        dtypes.check_float_dtype(dtype)
        out_dtype = dtypes.output_dtype(x, dtype)
    else:
        out_dtype = dtypes.layer_output_dtype(x, scale, bias, gate, dtype=dtype)
    dtypes.check_real_output(out_dtype, scale=scale, bias=bias)
    spec = NormSpec(
        reduction_axes=found.reduction,
        feature_axes=found.features,
        centered=norm not in ("rms_norm", "gated_rms_norm"),
        axis_name=axis_name if axis_name is None or isinstance(axis_name, str) else tuple(axis_name),
        axis_index_groups=None
        if axis_index_groups is None
        else tuple(tuple(int(i) for i in g) for g in axis_index_groups),
        out_dtype=out_dtype,
        normalized_dtype=None if normalized_dtype is None else jax.dtypes.canonicalize_dtype(normalized_dtype),
        scale_offset=float(scale_offset),
        zero_masked_outputs=bool(zero_masked_outputs),
        grouping=found.grouping,
        param_shape=param_shape,
        axis_size=None if axis_name is None else device_axes.synchronized_size(axis_name, axis_index_groups),
    )
    return spec, call_variables
