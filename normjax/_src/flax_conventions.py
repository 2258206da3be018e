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
:func:`normjax._src.standardize.standardize` (which the functional norms call too).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp

from normjax._src import arguments, dtypes
from normjax._src import axes as axes_lib
from normjax._src.batch_norm import batch_norm
from normjax._src.example_norms import gated_rms_norm, per_group
from normjax._src.standardize import standardize
from normjax._src.state import BatchNormState
from normjax._src.typing import Axes, AxisName, is_int

#: The dtype the layers create running statistics in, whatever ``param_dtype`` or ``force_float32_reductions``.
RUNNING_STATS_DTYPE = jnp.float32

_freeze = threading.local()


@contextlib.contextmanager
def linen_freeze_active() -> Iterator[None]:
    """Marks (per thread) that :func:`normjax.freeze_batch_norm`, which only reaches linen layers, is active."""
    depth = getattr(_freeze, "depth", 0)
    _freeze.depth = depth + 1
    try:
        yield
    finally:
        _freeze.depth = depth


def refuse_nnx_call_inside_linen_freeze(training: bool) -> None:
    """Raises when an nnx BatchNorm would update its statistics inside ``freeze_batch_norm()`` (linen only)."""
    if training and getattr(_freeze, "depth", 0):
        raise RuntimeError(
            "an nnx BatchNorm was called in training mode inside `normjax.freeze_batch_norm()`, which freezes "
            "flax.linen layers only (nnx has no method interception), so its statistics would keep updating. "
            "Freeze nnx models with `normjax.freeze_batch_norm_nnx(model)` (or `model.eval()`) instead."
        )


def layer_output_dtype(*arrays: jax.Array | None, dtype=None) -> jnp.dtype:
    """Flax's output dtype for a normalization layer: ``dtype`` if given, else the promoted dtype of ``arrays``.

    This is ``flax.linen.dtypes.canonicalize_dtype``: ``None`` entries are ignored and a non-inexact result is
    promoted to floating point, so a bfloat16 input with float32 parameters gives a float32 output. An input
    narrower than 16 bits (``float8_e4m3fn``, ``float8_e5m2``), which Flax cannot promote, counts as float32:
    its output is float32 unless ``dtype`` says otherwise.
    """
    check_input(arrays[0])
    if dtype is None:
        given = [jnp.result_type(a) for a in arrays if a is not None]
        dtype = jnp.result_type(*(jnp.float32 if dtypes.is_narrow_float(d) else d for d in given))
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    dtypes.check_float_dtype(dtype, "dtype", "the layer's output dtype")
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


def check_input(x) -> None:
    """Flax's layers take anything ``jnp.asarray`` takes; a torch tensor gets the core's message on converting it."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        arguments.check_inexact(x)


def widen(x, out_dtype) -> jax.Array:
    """``x`` in the promotion of its dtype and the output dtype: exact (a wider float, or an integer input made
    floating, as Flax accepts), so the core computes in >= float32 and rounds once, to the output dtype. An 8-bit
    float input stays as it is: the core reads it in float32."""
    x = jnp.asarray(x)
    if dtypes.is_narrow_float(x.dtype):
        return x
    return x.astype(jnp.promote_types(x.dtype, out_dtype))


def promote_exactly(args: Sequence[jax.Array | None], /, *, dtype=None) -> tuple[jax.Array | None, ...]:
    """The nnx layers' default ``promote_dtype`` hook: Flax's signature, normjax's rounding (once, at the end).

    Each array is cast to the promotion of its dtype and the layer's output dtype (:func:`layer_output_dtype` of all
    of them), which never narrows: with ``dtype=float16`` a float32 input stays float32 and the core rounds once,
    to float16, exactly as the linen layer does, so linen and nnx give bit-identical outputs. Flax's own hook,
    ``flax.nnx.nn.dtypes.promote_dtype``, first casts the input to ``dtype`` (rounding it before its statistics
    are computed); pass it as ``promote_dtype`` to reproduce Flax nnx bit for bit.
    """
    out = layer_output_dtype(*args, dtype=dtype)
    return tuple(None if a is None else widen(a, out) for a in args)


def feature_shape(shape: Sequence[int], axes: Axes, name: str) -> tuple[int, ...]:
    """The shape of a per-feature parameter: ``shape`` along the (sorted, non-negative) axes ``axes``."""
    return tuple(shape[a] for a in axes_lib.canonicalize_axes(axes, len(shape), name))


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


def check_num_features(num_features, layer: str) -> None:
    """Raises unless an nnx layer's `num_features` is a positive int."""
    if not is_int(num_features) or num_features < 1:
        raise TypeError(
            f"`num_features` of nnx {layer} must be a positive int (the size of the feature axis), got "
            f"{num_features!r}. Pass e.g. `{layer}(64, rngs=nnx.Rngs(0))` for 64 channels."
        )


def check_input_features(x, axes, axes_name: str, num_features: int, layer: str) -> None:
    """Raises when the input's feature axis does not hold `num_features` elements (nnx layers fix it at build)."""
    check_input(x)
    x_shape = jnp.shape(x)
    if not is_int(axes):
        return  # several feature axes: their shapes are checked against the parameters by the core
    (axis,) = axes_lib.canonicalize_axes(axes, len(x_shape), axes_name)
    if x_shape[axis] != num_features:
        raise ValueError(
            f"nnx {layer} was built with `num_features`={num_features}, but the input has {x_shape[axis]} features "
            f"along `{axes_name}`={axes!r} (input shape {tuple(x_shape)}). Build the layer with "
            f"`num_features={x_shape[axis]}`, or check `{axes_name}`."
        )


def check_several_values(
    shape: tuple[int, ...], reduction_axes, axis_name, axis_index_groups, *, layer: str, initializing: bool
) -> None:
    """A layer's one-value-per-statistic check: the core's, but naming the layer's ``reduction_axes``.

    As in Flax: BatchNorm refuses one value per statistic (as PyTorch does); LayerNorm, RMSNorm and GroupNorm
    refuse only an empty set of reduced axes; InstanceNorm accepts both (Flax's own tests normalize (N, C) inputs
    with it: the output is then the bias).
    """
    if layer == "InstanceNorm":
        return
    if initializing and axis_name is not None:
        return  # not synchronized during init; the training call decides
    axes = axes_lib.canonicalize_axes(reduction_axes, len(shape), "reduction_axes")
    arguments.check_several_values(
        shape,
        axes,
        None if initializing else axis_name,
        None if initializing else axis_index_groups,
        layer,
        arguments.ONE_VALUE_FIX["instance_norm"]
        if layer == "InstanceNorm"
        else "Check `reduction_axes` (and `feature_axes`): they must reduce axes holding more than one element.",
        empty_only=layer != "BatchNorm",
    )


def call_affine(own: jax.Array | None, given: jax.Array | None, name: str, layer: str) -> jax.Array | None:
    """The scale (or bias) a Flax layer's call uses: its own parameter, or the one given at call time."""
    return arguments.call_time_param(own, given, name, layer, "use_scale" if name == "scale" else "use_bias")


def _running_state(mean: jax.Array, var: jax.Array, count: jax.Array | None, x_dtype) -> BatchNormState:
    """Running statistics in the form the core requires for an input of dtype ``x_dtype``.

    At least float32 (a checkpoint may hold narrower ones); ``var`` real (an nnx ``promote_dtype`` may have made
    it complex); ``mean`` complex for a complex input. The last is what linen Flax does too: its running mean
    becomes complex on the first complex batch, where nnx Flax drops the imaginary part with a FutureWarning.
    """
    stats_dtype = dtypes.stats_dtype(x_dtype)
    mean = jnp.asarray(mean)
    mean = mean.astype(jnp.promote_types(mean.dtype, stats_dtype))
    var = jnp.asarray(var)
    if jnp.iscomplexobj(var):
        var = jnp.real(var)
    var = var.astype(jnp.promote_types(var.dtype, jnp.float32))
    return BatchNormState(mean=mean, var=var, count=None if count is None else jnp.asarray(count))


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
    axis: Axes,
    axis_name: AxisName,
    axis_index_groups,
    mask,
    dtype,
    unbiased_running_var: bool,
    skip_nonfinite: bool,
    virtual_batch_size: int | None,
    renorm_clipping: tuple[float, float] | None,
    renorm_warmup_steps: int = 0,
    running_count: jax.Array | None = None,
    normalized_dtype=None,
    stats_names: tuple[str, str] = ("batch_stats/mean", "batch_stats/var"),
    stats_fix: str = "",
    scale_offset: float = 0.0,
    zero_masked_outputs: bool = False,
) -> tuple[jax.Array, BatchNormState | None]:
    """A BatchNorm layer's call: returns ``(y, new_running_stats)``, the latter ``None`` when nothing is written.

    In training during initialization the batch statistics are used without synchronization, ghost batches or
    renormalization, a batch of one is allowed, and the running statistics are left untouched (as in Flax):
    ``model.init(key, x)`` needs no bound ``axis_name`` and any init batch will do. ``stats_names`` and
    ``stats_fix`` phrase a shape mismatch of the running statistics in the layer's own terms.
    ``running_count`` is the layer's step counter, which it keeps only when ``renorm_warmup_steps`` needs one.
    """
    arguments.check_static_bool(use_running_average, "use_running_average")
    out = layer_output_dtype(x, scale, bias, dtype=dtype)
    x = widen(x, out)
    check_running_stats(
        running_mean,
        running_var,
        feature_shape(x.shape, axis, "axis"),
        stats_names,
        stats_fix
        or "The checkpoint (or `variables`) was made for an input with another number of features along `axis`; "
        "restore the matching checkpoint, or re-initialize the layer with `model.init` on this input.",
    )
    state = _running_state(running_mean, running_var, running_count, x.dtype)
    shared = dict(
        epsilon=epsilon,
        axis=axis,
        normalized_dtype=normalized_dtype,
        scale_offset=scale_offset,
        zero_masked_outputs=zero_masked_outputs,
    )
    if use_running_average:
        y, _ = batch_norm(x, state, scale, bias, training=False, mask=bool_mask(mask), **shared)
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
        renorm_warmup_steps=renorm_warmup_steps, **shared,
    )  # fmt: skip
    return y.astype(out), new_state


def apply_standardize(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    reduction_axes: Axes,
    feature_axes: Axes,
    epsilon: float,
    mask,
    axis_name: AxisName,
    axis_index_groups,
    dtype,
    initializing: bool = False,
    centered: bool = True,
    layer: str = "LayerNorm",
    normalized_dtype=None,
    scale_offset: float = 0.0,
    zero_masked_outputs: bool = False,
    gate: jax.Array | None = None,
    norm_before_gate: bool = True,
) -> jax.Array:
    """LayerNorm / RMSNorm (``centered=False``, optionally gated) / InstanceNorm: per-example statistics, Flax's
    axes and dtypes.

    During initialization the statistics are not synchronized, so ``model.init`` needs no bound ``axis_name``
    (initialization only needs the parameters' shapes).
    """
    sync = not initializing
    out = layer_output_dtype(x, scale, bias, gate, dtype=dtype)
    x = widen(x, out)
    check_several_values(x.shape, reduction_axes, axis_name, axis_index_groups, layer=layer, initializing=initializing)
    if gate is not None:
        return gated_rms_norm(
            x, gate, scale, norm_before_gate=norm_before_gate, reduction_axes=reduction_axes,
            epsilon=epsilon,
            mask=bool_mask(mask), feature_axes=feature_axes, axis_name=axis_name if sync else None,
            axis_index_groups=axis_index_groups if sync else None, dtype=out, normalized_dtype=normalized_dtype,
            scale_offset=scale_offset, zero_masked_outputs=zero_masked_outputs,
        )  # fmt: skip
    return standardize(
        x,
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
        normalized_dtype=normalized_dtype,
        scale_offset=scale_offset,
        zero_masked_outputs=zero_masked_outputs,
    )[0]


def apply_group_norm(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    num_groups: int | None,
    group_size: int | None,
    reduction_axes: Axes | None,
    epsilon: float,
    mask,
    axis_name: AxisName,
    axis_index_groups,
    dtype,
    initializing: bool = False,
    normalized_dtype=None,
    scale_offset: float = 0.0,
    zero_masked_outputs: bool = False,
) -> jax.Array:
    """Flax's GroupNorm: channels (last axis) split into contiguous groups, statistics over each group and
    ``reduction_axes``; a per-channel affine.

    Flax defines GroupNorm as standardizing ``x.reshape(..., groups, group_size)`` over ``reduction_axes`` and
    the group's channels, which is exactly :func:`standardize` on that view.
    """
    out = layer_output_dtype(x, scale, bias, dtype=dtype)
    x = widen(x, out)
    ndim = x.ndim
    channels = x.shape[-1]
    groups = arguments.group_count(channels, num_groups, group_size, norm="GroupNorm", flax_word="channels")
    spatial = axes_lib.flax_group_norm_reduction_axes(ndim, reduction_axes)
    per_channel = f"one value per channel of the last axis ({channels})"
    arguments.check_affine(scale, x.shape, (ndim - 1,), "scale", per_channel)
    arguments.check_affine(bias, x.shape, (ndim - 1,), "bias", per_channel)
    mask = bool_mask(mask)
    if mask is not None:
        arguments.check_mask(mask, x.shape)
        mask = jnp.broadcast_to(mask, x.shape)
    grouped_shape = x.shape[:-1] + (groups, channels // groups)
    check_several_values(
        grouped_shape, spatial + (ndim,), axis_name, axis_index_groups, layer="GroupNorm", initializing=initializing
    )
    regroup = lambda a: None if a is None else jnp.reshape(a, grouped_shape)  # noqa: E731
    sync = not initializing
    y = standardize(
        regroup(x),
        per_group(scale, ndim, ndim - 1, groups),
        per_group(bias, ndim, ndim - 1, groups),
        reduction_axes=spatial + (ndim,),
        feature_axes=(ndim - 1, ndim),
        epsilon=epsilon,
        mask=regroup(mask),
        axis_name=axis_name if sync else None,
        axis_index_groups=axis_index_groups if sync else None,
        dtype=out,
        normalized_dtype=normalized_dtype,
        scale_offset=scale_offset,
        zero_masked_outputs=zero_masked_outputs,
    )[0]
    return jnp.reshape(y, x.shape)
