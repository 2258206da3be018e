"""Static (trace-time) validation and canonicalization of arguments.

Every check here runs on shapes, dtypes and Python values only, so errors are raised while tracing, before
anything is computed, and each message names the argument, what was expected, what was got and how to fix it.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Axes = int | Sequence[int]
AxisName = str | Sequence[str] | None


def canonicalize_axes(axes: Axes, ndim: int, name: str) -> tuple[int, ...]:
    """Returns `axes` as a sorted tuple of non-negative ints, or raises naming `name`."""
    if isinstance(axes, numbers.Integral):
        axes = (int(axes),)
    try:
        axes = tuple(axes)
    except TypeError:
        raise TypeError(
            f"`{name}` must be an int or a sequence of ints, got {axes!r} of type {type(axes).__name__}."
        ) from None
    result = []
    for a in axes:
        if not isinstance(a, numbers.Integral):
            raise TypeError(f"`{name}` must contain ints, got {a!r} of type {type(a).__name__} in {axes!r}.")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`{name}`={axes!r} is out of range for an input of rank {ndim}: every axis must be in "
                f"[{-ndim}, {ndim - 1}]. Use negative axes (e.g. -1 for the last axis) to be rank-independent."
            )
        result.append(int(a) % ndim)
    if len(set(result)) != len(result):
        raise ValueError(f"`{name}`={axes!r} repeats an axis (canonical axes {result}); list each axis once.")
    return tuple(sorted(result))


def complement(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """The axes of a rank-`ndim` array that are not in `axes`."""
    return tuple(a for a in range(ndim) if a not in axes)


def check_inexact(x: jax.Array, name: str = "x") -> None:
    """Raises a TypeError unless `x` holds floating-point or complex numbers."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"`{name}` must be a floating-point (or complex) array, got dtype {dtype}. "
            f"Cast it first, e.g. `{name}.astype(jnp.float32)`."
        )


def stats_dtype(dtype) -> jnp.dtype:
    """The dtype statistics are computed in: float32 or wider (complex64 or wider for complex inputs)."""
    return jnp.promote_types(dtype, jnp.float32)


def check_mask(mask: jax.Array | None, shape: tuple[int, ...], name: str = "mask") -> None:
    """Raises unless `mask` is a boolean array broadcastable to `shape`."""
    if mask is None:
        return
    dtype = jnp.result_type(mask)
    if dtype != jnp.bool_:
        raise TypeError(
            f"`{name}` must be a boolean array (True = use the element), got dtype {dtype}. "
            f"Pass e.g. `{name} != 0` or `{name}.astype(bool)`."
        )
    mask_shape = jnp.shape(mask)
    try:
        broadcast = jnp.broadcast_shapes(mask_shape, shape)
    except ValueError:
        broadcast = None
    if broadcast != tuple(shape):
        raise ValueError(
            f"`{name}` of shape {mask_shape} does not broadcast to the input's shape {tuple(shape)}. "
            f"Give it the input's shape, or size-1 axes where it does not vary (e.g. shape (N, 1) for a "
            f"per-example mask on (N, C))."
        )


def check_param(param: jax.Array | None, expected: tuple[int, ...], name: str, what: str) -> None:
    """Raises unless `param` is None or has exactly the shape `expected`."""
    if param is None:
        return
    got = jnp.shape(param)
    if tuple(got) != tuple(expected):
        raise ValueError(
            f"`{name}` must have shape {tuple(expected)} ({what}), got shape {tuple(got)}. "
            f"Create it with that shape, e.g. `jnp.ones({tuple(expected)})`, or change `axis` to match it."
        )


def check_epsilon(epsilon) -> None:
    """Raises unless a static `epsilon` is a positive number (traced values are left to the user)."""
    if isinstance(epsilon, jax.core.Tracer):
        return
    if not isinstance(epsilon, numbers.Real) or not epsilon > 0:
        raise ValueError(
            f"`epsilon` must be a positive number (it keeps 1/sqrt(var + epsilon) finite), got {epsilon!r}. "
            f"Typical values are 1e-5 (BatchNorm) and 1e-6 (LayerNorm, GroupNorm)."
        )


def check_momentum(momentum) -> None:
    """Raises unless a static `momentum` lies in [0, 1] (traced values, e.g. in a vmap sweep, pass)."""
    if isinstance(momentum, jax.core.Tracer):
        return
    if not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"`momentum` must be in [0, 1] (the weight of the old running value, Flax's convention), got "
            f"{momentum!r}. PyTorch's momentum m corresponds to `momentum=1 - m` (torch 0.1 -> 0.9)."
        )


def _axis_size(axis_name: AxisName) -> int:
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    size = 1
    for n in names:
        try:
            size *= jax.lax.axis_size(n)
        except NameError:
            raise NameError(
                f"`axis_name`={axis_name!r}: the axis {n!r} is not bound here. Synchronized statistics must "
                f"run inside a transformation that binds it: `jax.pmap(f, axis_name={n!r})`, "
                f"`jax.vmap(f, axis_name={n!r})`, or `jax.shard_map(f, mesh=Mesh(devices, ({n!r},)), ...)`. "
                f"Pass `axis_name=None` for per-device statistics."
            ) from None
    return size


def check_axis_name(axis_name: AxisName, axis_index_groups) -> None:
    """Raises a clear error for an unbound `axis_name` or malformed `axis_index_groups`."""
    if axis_name is None:
        if axis_index_groups is not None:
            raise ValueError(
                "`axis_index_groups` was given without `axis_name`; groups select devices along a named axis. "
                "Pass the `axis_name` the groups refer to."
            )
        return
    size = _axis_size(axis_name)
    if axis_index_groups is None:
        return
    groups = [list(g) for g in axis_index_groups]
    flat = sorted(i for g in groups for i in g)
    sizes = {len(g) for g in groups}
    if flat != list(range(size)) or len(sizes) != 1:
        raise ValueError(
            f"`axis_index_groups`={axis_index_groups!r} must split the {size} indices of axis "
            f"{axis_name!r} into groups of equal size, each index exactly once "
            f"(e.g. {[list(range(i, i + max(size // 2, 1))) for i in range(0, size, max(size // 2, 1))]})."
        )
