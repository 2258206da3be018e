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
from normjax._src.batch_norm import batch_norm_spec, run_batch_norm
from normjax._src.example_norms import per_example
from normjax._src.spec import Variables, VariablesFn, checked_call
from normjax._src.state import BatchNormState
from normjax._src.typing import is_int

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


def bool_mask(mask) -> jax.Array | None:
    """Flax accepts any 0/1 mask and casts it to bool (``jnp.asarray(mask, bool)``); so do the layers."""
    return None if mask is None else jnp.asarray(mask, bool)


def check_input(x) -> None:
    """Flax's layers take anything ``jnp.asarray`` takes; a torch tensor gets the core's message on converting it.

    Each layer's call runs it first, before anything reads ``x`` (nnx's ``promote_dtype`` included).
    """
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

    Each array is cast to the promotion of its dtype and the layer's output dtype
    (:func:`~normjax._src.dtypes.promoted_dtype` of all of them), which never narrows: with ``dtype=float16`` a
    float32 input stays float32 and the core rounds once, to float16, exactly as the linen layer does, so linen
    and nnx give bit-identical outputs. Flax's own hook,
    ``flax.nnx.nn.dtypes.promote_dtype``, first casts the input to ``dtype`` (rounding it before its statistics
    are computed); pass it as ``promote_dtype`` to reproduce Flax nnx bit for bit.
    """
    out = dtypes.promoted_dtype(*args, dtype=dtype)
    return tuple(None if a is None else widen(a, out) for a in args)


def check_num_features(num_features, layer: str) -> None:
    """Raises unless an nnx layer's `num_features` is a positive int."""
    if not is_int(num_features) or num_features < 1:
        raise TypeError(
            f"`num_features` of nnx {layer} must be a positive int (the size of the feature axis), got "
            f"{num_features!r}. Pass e.g. `{layer}(64, rngs=nnx.Rngs(0))` for 64 channels."
        )


def call_affine(own: jax.Array | None, given: jax.Array | None, name: str, layer: str) -> jax.Array | None:
    """The scale (or bias) a Flax layer's call uses: its own parameter, or the one given at call time."""
    return arguments.call_time_param(own, given, name, layer, "use_scale" if name == "scale" else "use_bias")


def held(scale: jax.Array | None, bias: jax.Array | None = None, state: BatchNormState | None = None) -> VariablesFn:
    """The variables of an nnx layer, which holds them already (made for ``num_features``, which the spec checks
    against the input): the same whatever the shape asked for."""
    return lambda param_shape: Variables(scale, bias, state)


def _running_state(state: BatchNormState, x_dtype) -> BatchNormState:
    """Running statistics in the form the core requires for an input of dtype ``x_dtype``.

    At least float32 (a checkpoint may hold narrower ones); ``var`` real (an nnx ``promote_dtype`` may have made
    it complex); ``mean`` complex for a complex input. The last is what linen Flax does too: its running mean
    becomes complex on the first complex batch, where nnx Flax drops the imaginary part with a FutureWarning.
    """
    stats_dtype = dtypes.stats_dtype(x_dtype)
    mean = jnp.asarray(state.mean)
    mean = mean.astype(jnp.promote_types(mean.dtype, stats_dtype))
    var = jnp.asarray(state.var)
    if jnp.iscomplexobj(var):
        var = jnp.real(var)
    var = var.astype(jnp.promote_types(var.dtype, jnp.float32))
    return BatchNormState(mean=mean, var=var, count=None if state.count is None else jnp.asarray(state.count))


_STATS_FIX = (
    "The checkpoint (or `variables`) was made for an input with another number of features along `axis`; "
    "restore the matching checkpoint, or re-initialize the layer with `model.init` on this input."
)


def apply_batch_norm(
    x: jax.Array,
    variables: VariablesFn,
    *,
    use_running_average: bool,
    initializing: bool,
    stats_names: tuple[str, str] = ("batch_stats/mean", "batch_stats/var"),
    stats_fix: str = _STATS_FIX,
    num_features: int | None = None,
    mask=None,
    **options,
) -> tuple[jax.Array, BatchNormState | None]:
    """A BatchNorm layer's call: returns ``(y, new_running_stats)``, the latter ``None`` when nothing is written.

    ``variables`` gives the layer's :class:`~normjax._src.spec.Variables` for the parameters' shape: its scale
    and bias, and its running statistics as a :class:`BatchNormState` (``count`` is the layer's step counter,
    which it keeps only when ``renorm_warmup_steps`` needs one). ``options`` are the layer's attributes under
    :func:`normjax.batch_norm`'s names; the layer has checked ``use_running_average`` (a static bool). In
    training during initialization the batch statistics are used without synchronization, ghost batches or
    renormalization, a batch of one is allowed, and the running statistics are left untouched (as in Flax):
    ``model.init(key, x)`` needs no bound ``axis_name`` and any init batch will do. ``stats_names`` and
    ``stats_fix`` phrase a shape mismatch of the running statistics in the layer's own terms.
    """
    if initializing:
        options.update(virtual_batch_size=None, renorm_clipping=None, renorm_warmup_steps=0)
    x_dtype = jnp.result_type(x)
    options.update(training=not use_running_average, mask=bool_mask(mask), allow_single_value=False)
    spec, found = batch_norm_spec(
        x, lambda shape: _with_running_state(variables(shape), x_dtype), **options, flax_layer="BatchNorm",
        initializing=initializing, num_features=num_features, state_names=stats_names, state_fix=stats_fix,
    )  # fmt: skip
    x = widen(x, spec.out_dtype)
    state = _running_state(found.state, x.dtype)  # in the widened input's terms
    y, new_state = run_batch_norm(spec, x, state, found.scale, found.bias, **options)
    return y, None if use_running_average or initializing else new_state


def _with_running_state(variables: Variables, x_dtype) -> Variables:
    """``variables`` with their running statistics in the core's form (:func:`_running_state`)."""
    return variables._replace(state=_running_state(variables.state, x_dtype))


def apply_per_example(
    norm: str,
    layer: str,
    x: jax.Array,
    variables: VariablesFn,
    *,
    epsilon: float,
    initializing: bool = False,
    mask=None,
    gate: jax.Array | None = None,
    norm_before_gate: bool = True,
    **options,
) -> jax.Array:
    """A LayerNorm, RMSNorm (optionally gated), GroupNorm or InstanceNorm layer's call: Flax's axes and dtypes.

    ``norm`` is the function the layer is a layer of, ``variables`` gives the layer's scale and bias for their
    shape (:class:`~normjax._src.spec.Variables`) and ``options`` are its attributes under that function's
    names. During initialization the statistics are not synchronized, so ``model.init`` needs no bound
    ``axis_name`` (initialization only needs the parameters' shapes).
    """
    norm = "gated_rms_norm" if gate is not None else norm
    mask = bool_mask(mask)
    spec, found = checked_call(
        norm, x, variables, epsilon=epsilon, mask=mask, gate=gate, norm_before_gate=norm_before_gate,
        flax_layer=layer, initializing=initializing, **options,
    )  # fmt: skip
    return per_example(
        spec, widen(x, spec.out_dtype), found.scale, found.bias, epsilon=epsilon, mask=mask, gate=gate,
        norm_before_gate=norm_before_gate,
    )  # fmt: skip
