"""Arguments: trace-time checks of the arrays and values a norm is given (``x``, ``mask``, ``scale``, ``bias``,
the running state, hyperparameters, flags), and of how many values each statistic would see.

Every check here runs on shapes, dtypes and Python values only, so errors are raised while tracing, before
anything is computed, and each message names the argument, what was expected, what was got and how to fix it.
The catalogue of these errors is documented in ``docs/guides/errors.md``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normjax._src.device_axes import synchronized_size
from normjax._src.dtypes import stats_dtype
from normjax._src.typing import ArrayLike, AxisIndexGroups, AxisName, DTypeLike, is_int, type_name


def _check_array_like(value: Any, name: str) -> None:
    if isinstance(value, jax.Array | np.ndarray | np.generic) or hasattr(value, "__jax_array__"):
        return  # __jax_array__: array wrappers such as nnx.Variable
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, recognized without importing torch
        raise TypeError(
            f"`{name}` must be a JAX or NumPy array, got a PyTorch tensor ({type_name(value)}). Convert it first: "
            f"`jnp.asarray({name}.detach().cpu().numpy())`, or `jax.dlpack.from_dlpack({name})` without a copy."
        )
    raise TypeError(
        f"`{name}` must be a JAX or NumPy array, got {type_name(value)}. Wrap it first: `jnp.asarray({name})`."
    )


def check_inexact(x: Any, name: str = "x") -> None:
    """Raises a TypeError unless `x` is an array of floating-point or complex numbers."""
    _check_array_like(x, name)
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"`{name}` must be a floating-point (or complex) array, got dtype {dtype}. "
            f"Cast it first, e.g. `{name}.astype(jnp.float32)`."
        )


def check_mask(mask: Any, shape: tuple[int, ...], name: str = "mask") -> None:
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


def check_param(param: Any, expected: tuple[int, ...], name: str, what: str) -> None:
    """Raises unless `param` is None or has exactly the shape `expected`."""
    if param is None:
        return
    if isinstance(param, list | tuple):
        raise TypeError(
            f"`{name}` must be an array of shape {tuple(expected)} ({what}), got a {type(param).__name__}. "
            f"Wrap it: `jnp.asarray({name})`."
        )
    if not isinstance(param, numbers.Number):
        _check_array_like(param, name)
    _check_numeric(param, name)
    got = jnp.shape(param)
    if tuple(got) != tuple(expected):
        raise ValueError(
            f"`{name}` must have shape {tuple(expected)} ({what}), got shape {tuple(got)}. "
            f"Create it with that shape, e.g. `jnp.ones({tuple(expected)})`, or change `axis` to match it."
        )


def check_affine(param: Any, x_shape: tuple[int, ...], feature_axes: tuple[int, ...], name: str, what: str) -> None:
    """Raises unless `param` (a scale or bias) is None, per feature, or per example.

    Per feature: exactly the shape of ``x`` along the (canonical) ``feature_axes``. Per example (conditional
    normalization: AdaLN, FiLM, class-conditional BatchNorm): ``x``'s rank, broadcastable to ``x``, e.g.
    ``(B, 1, D)`` for a ``(B, T, D)`` input. Lower ranks are refused: they would be ambiguous with the first form.
    """
    if param is None:
        return
    feature_shape = tuple(x_shape[a] for a in feature_axes)
    got = jnp.shape(param) if not isinstance(param, list | tuple) else None
    if got is not None and len(got) == len(x_shape) and tuple(got) != feature_shape:
        _check_array_like(param, name)
        _check_numeric(param, name)
        try:
            broadcast = jnp.broadcast_shapes(got, tuple(x_shape))
        except ValueError:
            broadcast = None
        if broadcast == tuple(x_shape):
            return
        per_example = tuple(n if a == 0 or a in feature_axes else 1 for a, n in enumerate(x_shape))
        raise ValueError(
            f"`{name}` must have shape {feature_shape} ({what}), or x's rank and broadcast to x's shape "
            f"{tuple(x_shape)} (per example, size 1 where it does not vary, e.g. {per_example}); got shape "
            f"{tuple(got)}, which does not broadcast. Give it one of these shapes, or change `axis` to match it."
        )
    check_param(param, feature_shape, name, what)


def call_time_param(own: Any, given: Any, name: str, layer: str, flag: str) -> Any:
    """The scale (or bias) a layer's call uses: its own parameter, or the one given at call time.

    A layer with its own parameter refuses a call-time one (as Haiku's layers do) rather than guess whether to
    multiply, add or replace; conditional normalization (AdaLN, FiLM, class-conditional BatchNorm) builds the layer
    without it (``flag=False``) and passes it at each call.
    """
    if given is None:
        return own
    if own is not None:
        raise ValueError(
            f"{layer} has its own `{name}` parameter ({flag}=True), and a `{name}` was also given at call time. "
            f"To normalize with a call-time (e.g. per-example, conditional) `{name}`, build the layer with "
            f"`{flag}=False`; to combine both, compute the combination yourself and pass it."
        )
    return given


def check_gate(gate: Any, x_shape: tuple[int, ...]) -> None:
    """Raises unless `gate` is a floating-point array broadcastable to x's shape."""
    check_inexact(gate, "gate")
    try:
        broadcast = jnp.broadcast_shapes(jnp.shape(gate), tuple(x_shape))
    except ValueError:
        broadcast = None
    if broadcast != tuple(x_shape):
        raise ValueError(
            f"`gate` of shape {jnp.shape(gate)} does not broadcast to x's shape {tuple(x_shape)}. Pass the gate "
            "branch's activations, of x's shape (Mamba-2's z)."
        )


def check_scale_offset(scale_offset: Any, scale: Any) -> None:
    """Raises unless `scale_offset` is a static real number, and nonzero only when there is a `scale` to offset."""
    hint = (
        "Pass `scale_offset=1.0` for a zero-centered scale (Gemma: y = x_hat * (1 + scale)), or 0.0 (the default) "
        "for y = x_hat * scale."
    )
    value = _static_scalar(scale_offset, "scale_offset", "a Python float known at trace time", hint)
    if value is None:
        raise TypeError(
            f"`scale_offset` must be a Python float known at trace time, got a traced value. It is a property of "
            f"the parameterization (like a checkpoint's convention), not data. {hint}"
        )
    if not math.isfinite(value):
        raise ValueError(f"`scale_offset` must be finite, got {scale_offset!r}. {hint}")
    if value and scale is None:
        raise ValueError(
            f"`scale_offset`={scale_offset!r} offsets `scale`, but no `scale` was given, so the output would be "
            f"multiplied by {value!r}. Pass the (zero-centered) `scale` too, or leave `scale_offset` at 0.0. In a "
            "layer with `use_scale=False`, pass the scale at call time (`layer(x, scale=...)`)."
        )


def check_state(state: Any, feature_shape: tuple[int, ...], x_dtype: DTypeLike, what: str) -> None:
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
    count = getattr(state, "count", None)
    if count is not None and (jnp.ndim(count) != 0 or not jnp.issubdtype(jnp.result_type(count), jnp.integer)):
        raise TypeError(
            f"`state.count` must be None or an integer scalar (the number of training steps that updated the "
            f"state), got {_describe(count)}. Create the state with `normjax.init_batch_norm_state("
            f"{feature_shape})` (count 0, int32), or pass `count=None` to leave the steps uncounted."
        )
    complex_x = jnp.issubdtype(x_dtype, jnp.complexfloating)
    if complex_x and not jnp.issubdtype(jnp.result_type(state.mean), jnp.complexfloating):
        raise TypeError(
            f"`state.mean` must be complex for a complex input (x has dtype {x_dtype}), got dtype "
            f"{jnp.result_type(state.mean)}, which would drop the imaginary part of the running mean. "
            f"Use `normjax.init_batch_norm_state({feature_shape}, dtype=jnp.complex64)`."
        )


def _check_numeric(value: Any, name: str) -> None:
    """Raises unless `value` (an array or a number) holds numbers, not booleans."""
    dtype = jnp.result_type(value)
    if dtype == jnp.bool_ or not jnp.issubdtype(dtype, jnp.number):
        raise TypeError(
            f"`{name}` must hold numbers, got dtype {dtype}. Pass a floating-point array, e.g. "
            f"`{name}.astype(jnp.float32)`."
        )


def _static_scalar(value: Any, name: str, expected: str, hint: str) -> float | None:
    """The Python float of a concrete real scalar, None for a traced one; raises naming `name` for anything else.

    Booleans (Python or NumPy) are refused: ``epsilon=True`` is a bug, not 1.0.
    """
    is_real = isinstance(value, numbers.Real) or (
        hasattr(value, "dtype") and value.dtype != jnp.bool_ and jnp.issubdtype(value.dtype, jnp.number)
    )
    is_real = is_real and not isinstance(value, bool | np.bool_) and not jnp.iscomplexobj(value)
    if is_real and jnp.ndim(value) == 0:
        if isinstance(value, jax.core.Tracer):
            return None
        return float(value)
    got = f"a traced array of shape {jnp.shape(value)}" if isinstance(value, jax.core.Tracer) else f"{value!r}"
    raise TypeError(f"`{name}` must be {expected}, got {got} of type {type_name(value)}. {hint}")


def check_epsilon(epsilon: Any, x_dtype: DTypeLike | None = None) -> None:
    """Raises unless a static `epsilon` is a positive, finite number, normal in the statistics dtype of `x_dtype`.

    Why normal: an epsilon below the smallest normal number of the statistics dtype (1.2e-38 for float32)
    rounds to a subnormal or to 0 there, and ``rsqrt(0 + epsilon)`` of a constant feature is then infinite
    (subnormals are flushed to zero by XLA), giving NaN instead of 0. Traced values cannot be checked here;
    :func:`normjax.batch_norm` keeps its running state when a traced epsilon is not positive and finite.
    """
    hint = "Typical values are 1e-5 (BatchNorm) and 1e-6 (LayerNorm, GroupNorm)."
    value = _static_scalar(epsilon, "epsilon", "a positive number", hint)
    if value is None:
        return
    if not value > 0 or not math.isfinite(value):  # `not >` also rejects NaN
        raise ValueError(
            f"`epsilon` must be a positive number, and finite (it keeps 1/sqrt(var + epsilon) finite and "
            f"nonzero), got {epsilon!r}. {hint}"
        )
    if x_dtype is None:
        return
    real = jnp.finfo(stats_dtype(x_dtype)).dtype
    tiny, largest = float(jnp.finfo(real).tiny), float(jnp.finfo(real).max)
    if not tiny <= value <= largest:
        raise ValueError(
            f"`epsilon`={epsilon!r} is outside the normal range [{tiny:.3g}, {largest:.3g}] of {real}, the dtype "
            f"the statistics of this input ({jnp.dtype(x_dtype)}) are computed in: it would round to "
            f"{'a subnormal number or 0, and a constant feature would give NaN' if value < tiny else 'infinity'}. "
            f"{hint}"
        )


def check_momentum(momentum: Any) -> None:
    """Raises unless a static `momentum` lies in [0, 1] (traced values, e.g. in a vmap sweep, pass).

    :func:`normjax.batch_norm` keeps its running state when a traced momentum is outside [0, 1] or NaN.
    """
    hint = "PyTorch's momentum m corresponds to `momentum=1 - m` (torch 0.1 -> 0.9)."
    value = _static_scalar(momentum, "momentum", "a number in [0, 1]", hint)
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"`momentum` must be in [0, 1] (the weight of the old running value, Flax's convention), got "
            f"{momentum!r}. {hint}"
        )


def check_static_bool(value: Any, name: str) -> None:
    """Raises unless `value` is a Python (or NumPy) bool known at trace time, e.g. ``training``."""
    if isinstance(value, bool | np.bool_):
        return
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"`{name}` must be a Python bool known at trace time, got a traced value ({value.aval.str_short()}). "
            f"It selects the code path, so it cannot be traced: mark it static "
            f"(`jax.jit(f, static_argnames='{name}')`) or branch outside the jitted function."
        )
    if hasattr(value, "dtype") and jnp.ndim(value) == 0 and jnp.result_type(value) == jnp.bool_:
        return  # a concrete 0-d boolean array
    raise TypeError(
        f"`{name}` must be a Python bool known at trace time, got {value!r} of type {type_name(value)}. "
        f"Pass `{name}=True` or `{name}=False`."
    )


def check_renorm_clipping(renorm_clipping: Any) -> None:
    """Raises unless `renorm_clipping` is None or a pair ``(r_max, d_max)`` with r_max >= 1 and d_max >= 0.

    Each bound may be traced (Batch Renormalization ramps them up during training): traced bounds are checked
    for being real scalars only.
    """
    if renorm_clipping is None:
        return
    hint = (
        f"got {renorm_clipping!r}. The paper ramps up to (3.0, 5.0); (1.0, 0.0) is plain BatchNorm. The bounds "
        "may be traced scalars, so a schedule can pass them to a jitted step."
    )
    expected = "`renorm_clipping` must be a pair (r_max, d_max) with r_max >= 1 and d_max >= 0"
    if isinstance(renorm_clipping, str | bytes) or not isinstance(renorm_clipping, Sequence):
        raise ValueError(f"{expected}, {hint}")
    if len(renorm_clipping) != 2:
        raise ValueError(f"{expected}, {hint}")
    r_max, d_max = renorm_clipping
    try:
        r = _static_scalar(r_max, "renorm_clipping", "a pair of real scalars (r_max, d_max)", "")
        d = _static_scalar(d_max, "renorm_clipping", "a pair of real scalars (r_max, d_max)", "")
    except TypeError:
        raise ValueError(f"{expected}, {hint}") from None
    if (r is not None and not (1.0 <= r < math.inf)) or (d is not None and not (0.0 <= d < math.inf)):
        raise ValueError(f"{expected} (and finite), {hint}")


def check_renorm_warmup(renorm_warmup_steps: Any, renorm_clipping: Any, count: Any) -> None:
    """Raises unless `renorm_warmup_steps` is a non-negative int, used with `renorm_clipping` and a step counter."""
    if not is_int(renorm_warmup_steps) or renorm_warmup_steps < 0:
        raise TypeError(
            f"`renorm_warmup_steps` must be a non-negative int (the number of training steps of plain BatchNorm "
            f"before Batch Renormalization starts), got {renorm_warmup_steps!r} of type "
            f"{type_name(renorm_warmup_steps)}. Pass e.g. `renorm_warmup_steps=100_000` (CrossQ), or 0 for none."
        )
    if renorm_warmup_steps == 0:
        return
    if renorm_clipping is None:
        raise ValueError(
            f"`renorm_warmup_steps`={renorm_warmup_steps} warms up Batch Renormalization, but `renorm_clipping` "
            "is None. Pass the clipping that follows the warm-up, e.g. `renorm_clipping=(3.0, 5.0)`, or "
            "`renorm_warmup_steps=0`."
        )
    if count is None:
        raise ValueError(
            f"`renorm_warmup_steps`={renorm_warmup_steps} counts training steps in `state.count`, but the state "
            "has no counter (`state.count` is None). Create the state with `normjax.init_batch_norm_state(...)` "
            "(count 0), or add one: `state._replace(count=jnp.zeros((), jnp.int32))`."
        )


def check_virtual_batch_size(virtual_batch_size: Any, batch: int) -> None:
    """Raises unless `virtual_batch_size` is a positive int (Python or NumPy) dividing the batch size."""
    divisors = [d for d in range(1, batch + 1) if batch % d == 0] if batch else []
    if not is_int(virtual_batch_size):
        raise TypeError(
            f"`virtual_batch_size` must be an int, got {virtual_batch_size!r} of type "
            f"{type_name(virtual_batch_size)}. Choose a divisor of the batch size {batch} (axis 0 of x): "
            f"{divisors}."
        )
    if virtual_batch_size < 1 or (batch % virtual_batch_size if batch else False):
        raise ValueError(
            f"`virtual_batch_size`={virtual_batch_size!r} must be a positive int that divides the batch size "
            f"{batch} (axis 0 of x). Choose a divisor of {batch}: {divisors}, or pad the batch and mask the "
            "padding."
        )


def check_features(features: Any, name: str = "features") -> tuple[int, ...]:
    """The shape of per-feature statistics from a count or a shape; raises naming `name` for anything else."""
    fix = f"Pass the number of features, e.g. `{name}=64`, or the feature axes' shape, e.g. `{name}=(8, 64)`."
    if is_int(features):
        shape = (int(features),)
    elif isinstance(features, Sequence) and not isinstance(features, str | bytes):
        if not all(is_int(f) for f in features):
            raise TypeError(f"`{name}` must be a sequence of ints, got {features!r}. {fix}")
        shape = tuple(int(f) for f in features)
    else:
        raise TypeError(
            f"`{name}` must be an int or a sequence of ints, got {features!r} of type {type_name(features)}. {fix}"
        )
    if any(f < 0 for f in shape):
        raise ValueError(f"`{name}` must not be negative, got {features!r}. {fix}")
    return shape


def _describe(value: Any) -> str:
    """`value`'s dtype and shape, or its type when it is not an array."""
    try:
        return f"dtype {jnp.result_type(value)} and shape {jnp.shape(value)}"
    except TypeError:
        return f"{value!r} of type {type_name(value)}"


def check_moment_array(value: Any, name: str, x_shape: tuple[int, ...], real: bool = False) -> None:
    """Raises unless `value` (a mean or variance given to normalize) is a number or array broadcasting to x."""
    if (
        value is None
        or isinstance(value, str | bytes | list | tuple)
        or not (isinstance(value, numbers.Number) or isinstance(value, jax.Array | np.ndarray | np.generic))
    ):
        raise TypeError(
            f"`{name}` must be a number or an array broadcastable to x's shape {tuple(x_shape)}, got "
            f"{type_name(value)}. Pass e.g. `normjax.moments(x, axes, keepdims=True).{name}`."
        )
    _check_numeric(value, name)
    if real and jnp.iscomplexobj(value):
        raise TypeError(
            f"`{name}` must be real (the variance of |x| is real), got dtype {jnp.result_type(value)}. "
            f"Pass `jnp.abs(...) ** 2` statistics, e.g. `normjax.moments(x, axes, keepdims=True).var`."
        )
    shape = jnp.shape(value)
    try:
        broadcast = jnp.broadcast_shapes(shape, tuple(x_shape))
    except ValueError:
        broadcast = None
    if broadcast != tuple(x_shape):
        raise ValueError(
            f"`{name}` of shape {shape} does not broadcast to x's shape {tuple(x_shape)} without changing it. "
            f"Give it x's rank with size-1 reduced axes, e.g. `normjax.moments(x, axes, keepdims=True).{name}`."
        )


def group_count(
    channels: int, num_groups: Any, group_size: Any, *, norm: str = "group_norm", flax_word: str | None = None
) -> int:
    """The number of groups of GroupNorm from exactly one of `num_groups` and `group_size`, or raises naming them.

    ``norm`` names the function or layer in the message. A Flax layer passes ``flax_word``, the word of Flax's own
    message for a group size that does not divide ("channels" in linen, "features" in nnx): each message then
    starts with Flax's sentence for the same mistake, so code that matches Flax's errors keeps working.
    """
    if (num_groups is None) == (group_size is None):
        flax_sentence = (
            "Either `num_groups` or `group_size` should be specified. If `group_size` is to be specified, pass "
            "`num_groups=None` as argument to override the default `num_groups` value of 32. "
        )
        raise ValueError(
            f"{flax_sentence if flax_word else ''}{norm} needs exactly one of `num_groups` and `group_size`, got "
            f"num_groups={num_groups!r} and group_size={group_size!r}. Pass one, e.g. `num_groups=32` (the paper's "
            "default) or `group_size=16`."
        )
    name, value = ("num_groups", num_groups) if num_groups is not None else ("group_size", group_size)
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    if not is_int(value) or value < 1 or channels % value:
        if not flax_word:
            flax_sentence = ""
        elif num_groups is not None:
            flax_sentence = f"Number of groups ({num_groups}) does not divide the number of channels ({channels}). "
        else:
            flax_sentence = f"Number of {flax_word} ({channels}) is not multiple of the group size ({group_size}). "
        if not is_int(value) or value < 1:
            problem = f"`{name}` must be a positive int, got {value!r}. For {channels} channels choose"
        else:
            problem = f"`{name}`={value} does not divide the {channels} channels. Choose"
        raise ValueError(f"{flax_sentence}{problem} a divisor of {channels}: {divisors}.")
    return int(num_groups) if num_groups is not None else channels // int(group_size)


def check_several_values(
    shape: tuple[int, ...],
    reduction_axes: tuple[int, ...],
    axis_name: AxisName,
    axis_index_groups: AxisIndexGroups,
    norm: str,
    fix: str,
    empty_only: bool = False,
) -> None:
    """Raises when each statistic of `norm` would see exactly one value (its output would be 0, or ±1 for RMS).

    The count is static: the reduced axes of `shape` times the devices of `axis_name`. A mask can only lower it,
    so it is not needed here. Zero values (an empty input) are not refused: there is nothing to normalize.
    With `empty_only` only an empty set of reduced axes counts (LayerNorm and RMSNorm over size-1 axes are
    accepted, as in PyTorch and Flax); otherwise any single value does (as PyTorch's GroupNorm and
    InstanceNorm refuse it).
    """
    per_device = 1
    for a in reduction_axes:
        per_device *= shape[a]
    if per_device != 1 or (empty_only and reduction_axes):
        return
    devices = synchronized_size(axis_name, axis_index_groups)
    if devices != 1:
        return
    over = f"axes {reduction_axes}" if reduction_axes else "no axis"
    synced = f", on the single device of `axis_name`={axis_name!r}" if axis_name is not None else ""
    raise ValueError(
        f"{norm} would compute each statistic from a single value (input shape {tuple(shape)}, statistics over "
        f"{over}{synced}): the variance is 0 and the output would be degenerate (0, or the bias). {fix}"
    )


def check_batch_norm_values(
    shape: tuple[int, ...], reduction_axes: tuple[int, ...], mask: ArrayLike | None, axis_name: AxisName,
    axis_index_groups: AxisIndexGroups, allow_single_value: bool,
) -> None:  # fmt: skip
    """Raises when BatchNorm in training would see one value per feature, known at trace time.

    Known when there is no mask (a mask decides the count at run time) and the devices of `axis_name` (static
    under pmap, vmap and shard_map) do not add values: a batch of one under ``vmap(..., axis_name=)`` of size
    one is refused like a batch of one without synchronization.
    """
    if allow_single_value or mask is not None:
        return
    per_device = 1
    for a in reduction_axes:
        per_device *= shape[a]
    devices = synchronized_size(axis_name, axis_index_groups)
    if per_device != 1 or devices != 1:
        return
    every_axis = "" if reduction_axes else " (`axis` makes every axis a feature axis, the batch axis too)"
    synced = f", on the single device of `axis_name`={axis_name!r}" if axis_name is not None else ""
    raise ValueError(
        f"batch_norm in training got one value per feature (input shape {tuple(shape)}, statistics over "
        f"axes {reduction_axes}{every_axis}{synced}): the batch variance is 0 and the output would be all zeros. "
        "Train with more than one example per feature, synchronize over devices with `axis_name=...`, or "
        "pass `allow_single_value=True` (the Flax layers do so during initialization)."
    )


ONE_VALUE_FIX = {
    "weight_standardize": (
        "Pass the filter's input axes as `reduction_axes` (default: every axis but the last, the output features)."
    ),
    "layer_norm": "`reduction_axes=()` reduces nothing: pass the axes to normalize over, e.g. `reduction_axes=-1`.",
    "rms_norm": "`reduction_axes=()` reduces nothing: pass the axes to normalize over, e.g. `reduction_axes=-1`.",
    "group_norm": (
        "Use fewer groups (`num_groups`) or a larger `group_size`, or an input with spatial axes (e.g. (N, H, W, "
        "C)); for an (N, C) input with one channel per group use layer_norm or batch_norm."
    ),
    "instance_norm": (
        "InstanceNorm reduces the axes other than the batch (axis 0) and the channel `feature_axes`, so it needs "
        "spatial axes with more than one element (e.g. (N, H, W, C)), as in PyTorch; for an (N, C) input use "
        "layer_norm or batch_norm."
    ),
}


def check_norm_values(
    norm: str,
    shape: tuple[int, ...],
    reduction_axes: tuple[int, ...],
    axis_name: AxisName,
    axis_index_groups: AxisIndexGroups,
) -> None:
    """:func:`check_several_values` for the per-example norms, with the fix that suits each."""
    empty_only = norm in ("layer_norm", "rms_norm")
    check_several_values(shape, reduction_axes, axis_name, axis_index_groups, norm, ONE_VALUE_FIX[norm], empty_only)


def check_ghost_batch_options(virtual_batch_size: int | None, axis_name: AxisName, renorm_clipping: Any) -> None:
    """Raises when Ghost BatchNorm (`virtual_batch_size`) is combined with an option it cannot serve."""
    if virtual_batch_size is None:
        return
    if axis_name is not None:
        raise ValueError(
            "`virtual_batch_size` splits each device's local batch into virtual batches normalized on their own, "
            "so it cannot be combined with `axis_name`. For virtual batches that span devices use "
            "`axis_name` with `axis_index_groups` instead."
        )
    if renorm_clipping is not None:
        raise ValueError(
            "`renorm_clipping` and `virtual_batch_size` cannot be combined; choose one (pass None for the other)."
        )


def check_input_features(shape: tuple[int, ...], name: str, given: Any, num_features: int, layer: str) -> None:
    """Raises when an nnx layer's input does not hold `num_features` along its single feature axis `given`.

    Several feature axes are checked against the parameters' shapes, and an axis out of range by the axes' own
    check, instead.
    """
    if not is_int(given) or not -len(shape) <= given < len(shape) or shape[given] == num_features:
        return
    got = shape[given]
    raise ValueError(
        f"nnx {layer} was built with `num_features`={num_features}, but the input has {got} features "
        f"along `{name}`={given!r} (input shape {tuple(shape)}). Build the layer with "
        f"`num_features={got}`, or check `{name}`."
    )


def check_running_stats(mean, var, shape: tuple[int, ...], names: tuple[str, str], fix: str) -> None:
    """Raises, naming the layer's variables, when the running statistics do not have the feature shape.

    A layer's running statistics come from its own initialization or from a checkpoint; a mismatch means the
    checkpoint (or the layer's construction) was for another input size, which the core's `state` message
    would not say.
    """
    for name, value in zip(names, (mean, var), strict=True):
        got = jnp.shape(value)
        if tuple(got) != tuple(shape):
            raise ValueError(
                f"the running statistic `{name}` has shape {tuple(got)}, but this input needs {tuple(shape)} (one "
                f"value per feature). {fix}"
            )
