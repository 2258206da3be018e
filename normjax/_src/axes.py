"""Static (trace-time) validation and canonicalization of arguments.

Every check here runs on shapes, dtypes and Python values only, so errors are raised while tracing, before
anything is computed, and each message names the argument, what was expected, what was got and how to fix it.
The catalogue of these errors is documented in ``docs/guides/errors.md``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Axes = int | Sequence[int]
AxisName = str | Sequence[str] | None


def _is_int(value) -> bool:
    """True for Python and NumPy integers, False for bools (``axis=True`` is a bug, not axis 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def canonicalize_axes(axes: Axes, ndim: int, name: str) -> tuple[int, ...]:
    """Returns `axes` as a sorted tuple of non-negative ints, or raises naming `name`."""
    if _is_int(axes):
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
        if not _is_int(a):
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


def canonicalize_channel_axis(axis: int, ndim: int, norm: str, name: str = "axis") -> int:
    """Returns the single channel axis of a per-example norm (batch on axis 0) as a non-negative int.

    Raises naming `name` if `axis` is not a single int, is out of range, or selects axis 0 (the batch axis).
    """
    if not _is_int(axis):
        raise TypeError(
            f"`{name}` of {norm} must be a single int (the channel axis), got {axis!r}. Pass the channel axis, "
            f"e.g. `{name}=-1` for NHWC or `{name}=1` for NCHW; the other non-batch axes are reduced automatically."
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


def _check_array_like(value, name: str) -> None:
    if isinstance(value, list | tuple) or not hasattr(value, "dtype"):
        raise TypeError(
            f"`{name}` must be a JAX or NumPy array, got {type(value).__name__}. Wrap it first: `jnp.asarray({name})`."
        )


def check_inexact(x: jax.Array, name: str = "x") -> None:
    """Raises a TypeError unless `x` is an array of floating-point or complex numbers."""
    _check_array_like(x, name)
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"`{name}` must be a floating-point (or complex) array, got dtype {dtype}. "
            f"Cast it first, e.g. `{name}.astype(jnp.float32)`."
        )


def stats_dtype(dtype) -> jnp.dtype:
    """The dtype statistics are computed in: float32 or wider (complex64 or wider for complex inputs).

    Canonicalized, so a NumPy float64 input with x64 disabled computes in float32 without a truncation warning.
    """
    return jax.dtypes.canonicalize_dtype(jnp.promote_types(dtype, jnp.float32))


def output_dtype(x: jax.Array, dtype=None) -> jnp.dtype:
    """The dtype of a norm's output: ``dtype`` if given, else ``x``'s, as JAX represents it (x64 or not)."""
    return jax.dtypes.canonicalize_dtype(x.dtype if dtype is None else dtype)


def check_mask(mask: jax.Array | None, shape: tuple[int, ...], name: str = "mask") -> None:
    """Raises unless `mask` is a boolean array broadcastable to `shape`."""
    if mask is None:
        return
    if isinstance(mask, list | tuple):
        raise TypeError(f"`{name}` must be a boolean array, got {type(mask).__name__}. Wrap it: `jnp.asarray({name})`.")
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
    if isinstance(param, list | tuple):
        raise TypeError(
            f"`{name}` must be an array of shape {tuple(expected)} ({what}), got a {type(param).__name__}. "
            f"Wrap it: `jnp.asarray({name})`."
        )
    got = jnp.shape(param)
    if tuple(got) != tuple(expected):
        raise ValueError(
            f"`{name}` must have shape {tuple(expected)} ({what}), got shape {tuple(got)}. "
            f"Create it with that shape, e.g. `jnp.ones({tuple(expected)})`, or change `axis` to match it."
        )


def check_state(state, feature_shape: tuple[int, ...], x_dtype, what: str) -> None:
    """Raises unless `state` holds running statistics usable for an input of dtype `x_dtype`.

    `state.mean` and `state.var` must have the feature shape and a floating dtype of at least 32 bits (an EMA
    in bfloat16 or float16 silently stops moving: with momentum 0.99 each update is below their resolution);
    `state.var` must be real, and `state.mean` must be complex when `x` is (so no imaginary part is dropped).
    """
    if not (hasattr(state, "mean") and hasattr(state, "var")):
        raise TypeError(
            f"`state` must be a BatchNormState (running `mean` and `var`), got {type(state).__name__}. "
            f"Create one with `normjax.init_batch_norm_state({feature_shape})` or "
            "`normjax.BatchNormState(mean=..., var=...)`."
        )
    fix = f"Create the state with `normjax.init_batch_norm_state({feature_shape}, dtype=jnp.float32)`"
    for name, value in (("state.mean", state.mean), ("state.var", state.var)):
        check_param(value, feature_shape, name, what)
        dtype = jnp.result_type(value)
        if not jnp.issubdtype(dtype, jnp.inexact) or jnp.finfo(dtype).bits < 32:
            raise TypeError(
                f"`{name}` must be float32 or wider, got dtype {dtype}: running statistics in a narrower type "
                f"stop updating (a step of weight 1 - momentum falls below its resolution). {fix} whatever the "
                "activation dtype; the statistics are computed in float32 anyway."
            )
    if jnp.issubdtype(jnp.result_type(state.var), jnp.complexfloating):
        raise TypeError(
            f"`state.var` must be real (the variance of |x|), got dtype {jnp.result_type(state.var)}. "
            f"Use `normjax.init_batch_norm_state({feature_shape}, dtype=jnp.complex64)`, which keeps `var` real."
        )
    complex_x = jnp.issubdtype(x_dtype, jnp.complexfloating)
    if complex_x and not jnp.issubdtype(jnp.result_type(state.mean), jnp.complexfloating):
        raise TypeError(
            f"`state.mean` must be complex for a complex input (x has dtype {x_dtype}), got dtype "
            f"{jnp.result_type(state.mean)}, which would drop the imaginary part of the running mean. "
            f"Use `normjax.init_batch_norm_state({feature_shape}, dtype=jnp.complex64)`."
        )


def _static_scalar(value, name: str, expected: str, hint: str) -> float | None:
    """The Python float of a concrete scalar, None for a traced one; raises naming `name` for anything else."""
    if isinstance(value, jax.core.Tracer):
        return None
    scalar_like = isinstance(value, numbers.Real) or hasattr(value, "dtype")
    if scalar_like and not isinstance(value, bool) and jnp.ndim(value) == 0:
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise TypeError(f"`{name}` must be {expected}, got {value!r} of type {type(value).__name__}. {hint}")


def check_epsilon(epsilon) -> None:
    """Raises unless a static `epsilon` is a positive number (traced values are left to the user)."""
    hint = "Typical values are 1e-5 (BatchNorm) and 1e-6 (LayerNorm, GroupNorm)."
    value = _static_scalar(epsilon, "epsilon", "a positive number", hint)
    if value is not None and not value > 0:  # `not >` also rejects NaN
        raise ValueError(
            f"`epsilon` must be a positive number (it keeps 1/sqrt(var + epsilon) finite), got {epsilon!r}. {hint}"
        )


def check_momentum(momentum) -> None:
    """Raises unless a static `momentum` lies in [0, 1] (traced values, e.g. in a vmap sweep, pass)."""
    hint = "PyTorch's momentum m corresponds to `momentum=1 - m` (torch 0.1 -> 0.9)."
    value = _static_scalar(momentum, "momentum", "a number in [0, 1]", hint)
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"`momentum` must be in [0, 1] (the weight of the old running value, Flax's convention), got "
            f"{momentum!r}. {hint}"
        )


def check_static_bool(value, name: str) -> None:
    """Raises unless `value` is a Python (or NumPy) bool known at trace time, e.g. ``training``."""
    if isinstance(value, bool) or (
        hasattr(value, "dtype")
        and not isinstance(value, jax.core.Tracer)
        and jnp.ndim(value) == 0
        and jnp.result_type(value) == jnp.bool_
    ):
        return
    raise TypeError(
        f"`{name}` must be a Python bool known at trace time, got {value!r}. It selects the code path, so it "
        f"cannot be traced: mark it static (`jax.jit(f, static_argnames='{name}')`) or branch outside the jitted "
        "function."
    )


def check_renorm_clipping(renorm_clipping) -> None:
    """Raises unless `renorm_clipping` is None or a pair ``(r_max, d_max)`` with r_max >= 1 and d_max >= 0."""
    if renorm_clipping is None:
        return
    try:
        r_max, d_max = renorm_clipping
        valid = float(r_max) >= 1.0 and float(d_max) >= 0.0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(
            f"`renorm_clipping` must be a pair (r_max, d_max) with r_max >= 1 and d_max >= 0, got "
            f"{renorm_clipping!r}. The paper ramps up to (3.0, 5.0); (1.0, 0.0) is plain BatchNorm."
        )


def check_groups(channels: int, num_groups: int | None, group_size: int | None) -> int:
    """Returns the number of groups of GroupNorm, or raises naming `num_groups` / `group_size`."""
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"group_norm needs exactly one of `num_groups` and `group_size`, got num_groups={num_groups!r} and "
            f"group_size={group_size!r}. Pass one, e.g. `num_groups=32` (the paper's default) or `group_size=16`."
        )
    name, value = ("num_groups", num_groups) if num_groups is not None else ("group_size", group_size)
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    if not _is_int(value) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive int, got {value!r}. For {channels} channels choose a divisor of "
            f"{channels}: {divisors}."
        )
    if channels % value:
        raise ValueError(
            f"`{name}`={value} does not divide the {channels} channels. Choose a divisor of {channels}: {divisors}."
        )
    return int(num_groups) if num_groups is not None else channels // int(group_size)


def _axis_names(axis_name: AxisName) -> tuple:
    """The names in `axis_name`: a tuple or list of names, or one name of any hashable type (as JAX allows)."""
    return tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)


def _axis_size(axis_name: AxisName) -> int:
    size = 1
    for n in _axis_names(axis_name):
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


def _index_groups(axis_index_groups) -> list[list[int]] | None:
    """`axis_index_groups` as lists of ints, or None when it is not a sequence of int sequences."""
    try:
        groups = [list(g) for g in axis_index_groups]
    except TypeError:
        return None
    if not all(_is_int(i) for g in groups for i in g):
        return None
    return [[int(i) for i in g] for g in groups]


def check_axis_name(axis_name: AxisName, axis_index_groups) -> None:
    """Raises a clear error for an unbound `axis_name` or malformed `axis_index_groups`."""
    if axis_name is None:
        if axis_index_groups is not None:
            raise ValueError(
                "`axis_index_groups` was given without `axis_name`; groups select devices along a named axis. "
                "Pass the `axis_name` the groups refer to."
            )
        return
    if not _axis_names(axis_name):
        raise ValueError(
            f"`axis_name`={axis_name!r} names no axis. Pass the name given to pmap/vmap/shard_map, e.g. "
            "`axis_name='batch'`, or `axis_name=None` for per-device statistics."
        )
    size = _axis_size(axis_name)
    if axis_index_groups is None:
        return
    groups = _index_groups(axis_index_groups)
    half = max(size // 2, 1)
    if groups is None or sorted(i for g in groups for i in g) != list(range(size)) or len(set(map(len, groups))) != 1:
        raise ValueError(
            f"`axis_index_groups`={axis_index_groups!r} must split the {size} indices of axis "
            f"{axis_name!r} into groups of equal size, each index exactly once "
            f"(e.g. {[list(range(i, i + half)) for i in range(0, size, half)]})."
        )
