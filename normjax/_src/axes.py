"""Axes: the axis arguments of the norms (``axis``, ``reduction_axes``, ``feature_axes``) made canonical.

Each function returns sorted, non-negative axes or raises while tracing, naming the argument, what was expected,
what was got and how to fix it (the catalogue is ``docs/guides/errors.md``).
"""

from __future__ import annotations

from normjax._src.typing import Axes, is_int


def canonicalize_axes(axes: Axes, ndim: int, name: str) -> tuple[int, ...]:
    """Returns `axes` as a sorted tuple of non-negative ints, or raises naming `name`."""
    if is_int(axes):
        axes = (int(axes),)
    try:
        if isinstance(axes, str | bytes):  # iterable, but its characters are not axes
            raise TypeError
        axes = tuple(axes)
    except TypeError:
        raise TypeError(
            f"`{name}` must be an int or a sequence of ints, got {axes!r} of type {type(axes).__name__}. "
            f"Pass e.g. `{name}=-1` or `{name}=(1, 2)`."
        ) from None
    result = []
    for a in axes:
        if not is_int(a):
            raise TypeError(
                f"`{name}` must contain ints, got {a!r} of type {type(a).__name__} in {axes!r}. "
                f"Pass axis indices, e.g. `{name}=-1` or `{name}=(1, 2)`."
            )
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`{name}`={axes!r} is out of range for an input of rank {ndim}: every axis must be in "
                f"[{-ndim}, {ndim - 1}]. Use negative axes (e.g. -1 for the last axis) to be rank-independent."
            )
        result.append(int(a) % ndim)
    if len(set(result)) != len(result):
        raise ValueError(f"`{name}`={axes!r} repeats an axis (canonical axes {result}); list each axis once.")
    return tuple(sorted(result))


def canonicalize_channel_axis(axis: Axes, ndim: int, norm: str, name: str = "feature_axes") -> int:
    """Returns the single channel axis of a per-example norm (batch on axis 0) as a non-negative int.

    Raises naming `name` if `axis` is not a single int, is out of range, or selects axis 0 (the batch axis).
    """
    if isinstance(axis, tuple | list) and len(axis) == 1:
        (axis,) = axis
    if not is_int(axis):
        raise TypeError(
            f"`{name}` of {norm} must be a single int or a tuple of one (the channel axis), got {axis!r}. Pass the "
            f"channel axis, e.g. `{name}=-1` for NHWC or `{name}=1` for NCHW; the other non-batch axes are reduced "
            "automatically."
        )
    (channel_axis,) = canonicalize_axes(axis, ndim, name)
    if channel_axis == 0:
        raise ValueError(
            f"`{name}`={axis!r} selects axis 0 of a rank-{ndim} input, but {norm} treats axis 0 as the "
            f"batch axis. Put the batch first and pass the channel axis (e.g. -1 for NHWC, 1 for NCHW); for a "
            f"single example add a batch axis with `x[None]`."
        )
    return channel_axis


def complement(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """The axes of a rank-`ndim` array that are not in `axes`."""
    return tuple(a for a in range(ndim) if a not in axes)


def group_norm_reduction_axes(reduction_axes: Axes | None, ndim: int, channel_axis: int) -> tuple[int, ...]:
    """GroupNorm's ``reduction_axes`` on the grouped view (the channel axis split into ``(groups, channels per
    group)``): the channel axis becomes the axis of the channels within a group, the axes after it shift by one."""
    if reduction_axes is None:
        reduction_axes = tuple(range(1, ndim))
    axes = canonicalize_axes(reduction_axes, ndim, "reduction_axes")
    if channel_axis not in axes:
        raise ValueError(
            f"`reduction_axes`={reduction_axes!r} of group_norm must include the channel axis {channel_axis} "
            f"(`feature_axes`): the channels of a group are always reduced together; input rank {ndim}. Pass "
            f"`reduction_axes={tuple(sorted(axes + (channel_axis,)))}`."
        )
    return tuple(a + (a >= channel_axis) for a in axes)


def instance_norm_axes(ndim: int, feature_axes: Axes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """InstanceNorm's axes, Flax's: ``(feature_axes, reduction_axes)``, reducing every axis but 0 and the
    features."""
    features = canonicalize_axes(feature_axes, ndim, "feature_axes")
    if 0 in features:
        raise ValueError(
            "The channel axes cannot include the leading dimension as this is assumed to be the batch axis. "
            f"`feature_axes`={feature_axes!r} includes axis 0 of the rank-{ndim} input. Put the batch first and "
            "pass the channel axes (e.g. -1 for NHWC); for a single example add a batch axis with `x[None]`."
        )
    return features, complement((0,) + features, ndim)


def flax_group_norm_reduction_axes(ndim: int, reduction_axes: Axes | None) -> tuple[int, ...]:
    """Flax's GroupNorm ``reduction_axes`` (default: all but the batch axis) without the channel axis."""
    if reduction_axes is None:
        reduction_axes = tuple(range(1, ndim - 1)) + (ndim - 1,)
    axes = canonicalize_axes(reduction_axes, ndim, "reduction_axes")
    if ndim - 1 not in axes:
        raise ValueError(
            "The reduction axes must include the final dimension as this is assumed to be the feature axis. "
            f"`reduction_axes`={reduction_axes!r} must include the last axis, GroupNorm's channel axis (the "
            f"channels of a group are always reduced together); input rank {ndim}. Add -1, e.g. "
            f"`reduction_axes={tuple(a - ndim for a in axes) + (-1,)}`."
        )
    return axes[:-1]
