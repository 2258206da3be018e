"""BatchNorm with explicit running state, synchronized statistics, Batch Renormalization and Ghost BatchNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from normjax._src import arguments
from normjax._src import axes as axes_lib
from normjax._src.boundary import named_scope
from normjax._src.normalize import normalized
from normjax._src.spec import NormSpec, Variables, VariablesFn, checked_call, grouped_shape
from normjax._src.standardize import Renorm, as_feature, standardize, zero_masked
from normjax._src.state import BatchNormState, ema_update
from normjax._src.typing import ArrayLike, Axes, AxisIndexGroups, AxisName, DTypeLike


@named_scope("batch_norm")
def batch_norm(
    x: ArrayLike,
    state: BatchNormState,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    training: bool,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    axis: Axes = -1,
    axis_name: AxisName = None,
    axis_index_groups: AxisIndexGroups = None,
    mask: ArrayLike | None = None,
    unbiased_running_var: bool = False,
    skip_nonfinite: bool = True,
    allow_single_value: bool = False,
    virtual_batch_size: int | None = None,
    renorm_clipping: tuple[float, float] | None = None,
    renorm_warmup_steps: int = 0,
    dtype: DTypeLike | None = None,
    normalized_dtype: DTypeLike | None = None,
    scale_offset: float = 0.0,
    zero_masked_outputs: bool = False,
) -> tuple[jax.Array, BatchNormState]:
    r"""Batch Normalization (Ioffe & Szegedy, 2015), a pure function of the input and the running state.

    In training, each feature is standardized with the statistics of the batch (all axes but ``axis``, and
    every device of ``axis_name``) and the running statistics are updated:

    .. math::

        y = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}\,\gamma + \beta, \qquad
        \hat\mu \leftarrow m\,\hat\mu + (1 - m)\,\mu_B, \qquad
        \hat\sigma^2 \leftarrow m\,\hat\sigma^2 + (1 - m)\,\sigma_B^2 \cdot c

    with :math:`c = n/(n-1)` if ``unbiased_running_var`` (PyTorch's convention) and 1 otherwise (Flax's).
    ``momentum`` is the weight of the old value, as in Flax: PyTorch's ``momentum=0.1`` is ``momentum=0.9``.
    In evaluation (``training=False``) the running statistics are used and the state is returned unchanged.

    State safety (see the guide "Errors and what they mean"): features whose batch has no valid element (an
    empty or all-masked batch, on every device of ``axis_name``) keep their running statistics bit for bit;
    with ``skip_nonfinite`` (default) so do features whose batch mean or variance is NaN or infinite, so one
    bad batch cannot erase statistics accumulated over a long run (the output of such a batch stays
    non-finite; with ``skip_nonfinite=False`` the non-finite statistics enter the state).
    ``unbiased_running_var`` never divides by zero (no correction where a feature has one valid value). The
    statistics are computed in float32 or wider and the update runs in the state's dtype, which must be
    float32 or wider, whatever the activation dtype. Bad arguments raise at trace time, naming the argument.

    Args:
      x: the input, e.g. ``(N, C)``, ``(N, H, W, C)`` or ``(C,)`` per example under ``vmap``.
      state: the running statistics, a :class:`BatchNormState` with the feature axes' shape.
      scale: optional :math:`\gamma`, of the feature axes' shape, or per example (class-conditional BatchNorm):
        of ``x``'s rank, broadcastable to ``x``, e.g. ``(N, 1, 1, C)`` for ``(N, H, W, C)``.
      bias: optional :math:`\beta`, likewise.
      training: use batch statistics and update the state (True), or the running statistics (False).
      momentum: weight of the old running value, in [0, 1].
      epsilon: a small positive number added to the variance.
      axis: the feature axis or axes; statistics are over all the others.
      axis_name: name(s) of mapped axes over which the batch statistics are synchronized (exact for uneven
        per-device counts).
      axis_index_groups: optional groups of device indices along ``axis_name`` synchronized separately.
      mask: optional boolean array broadcastable to ``x``; False elements are ignored by the statistics, and
        one that is not finite (padding) outputs ``bias``, in evaluation too.
      unbiased_running_var: store the unbiased batch variance ``n/(n-1) * var`` in the running variance.
      skip_nonfinite: keep the old running value of a feature whose batch statistics are NaN or infinite.
      allow_single_value: allow training when each feature sees a single value (the statistics are then
        degenerate and the output is zero); refused by default, as in PyTorch.
      virtual_batch_size: Ghost BatchNorm (Hoffer et al., 2017): in training, split the batch (axis 0) into
        virtual batches of this size, each normalized with its own statistics; the running statistics receive
        their count-weighted average.
      renorm_clipping: Batch Renormalization (Ioffe, 2017): ``(r_max, d_max)``. In training the output is
        corrected towards the running statistics by :math:`r = \mathrm{clip}(\sigma_B/\hat\sigma,
        1/r_{max}, r_{max})` and :math:`d = \mathrm{clip}((\mu_B - \hat\mu)/\hat\sigma, -d_{max}, d_{max})`
        (no gradient through either): :math:`y = (\frac{x - \mu_B}{\sigma_B} r + d)\gamma + \beta`. Either
        bound may be traced, e.g. a schedule computed from ``state.count``.
      renorm_warmup_steps: Batch Renormalization's warm-up (as in the paper and CrossQ): while
        ``state.count < renorm_warmup_steps`` the training step is plain BatchNorm (:math:`r = 1, d = 0`),
        afterwards ``renorm_clipping`` applies. Needs a state with a step counter
        (:func:`init_batch_norm_state`).
      dtype: the output dtype; defaults to ``x``'s (float32 for an 8-bit float ``x``).
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once;
        a dtype rounds :math:`\hat x` to it before the affine (see the numerics guide).
      scale_offset: a constant added to ``scale`` (in float32 or wider): ``1.0`` for a zero-centered scale,
        :math:`y = \hat x\,(1 + \gamma) + \beta`, as BigGAN's class-conditional gains.
      zero_masked_outputs: output 0 where ``mask`` is False (else those positions are standardized with the
        valid elements' statistics); no effect without a mask.

    Returns:
      ``(y, new_state)``: the output and the new running statistics, whose ``count`` (when not None) grows
      by one on a training step that updated any feature.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> x = jnp.array([[0.0, 10.0], [2.0, 30.0]])
      >>> state = normjax.init_batch_norm_state(2)
      >>> y, state = normjax.batch_norm(x, state, training=True, momentum=0.9, epsilon=1e-12)
      >>> y.tolist()
      [[-1.0, -1.0], [1.0, 1.0]]
      >>> state.mean.tolist()
      [0.10000000149011612, 2.0]

    References:
      Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
      Covariate Shift", ICML 2015. Ioffe, "Batch Renormalization", NeurIPS 2017. Hoffer, Hubara & Soudry,
      "Train longer, generalize better", NeurIPS 2017.
    """
    options = dict(locals())  # every argument of this call, by name
    given = Variables(options.pop("scale"), options.pop("bias"), options.pop("state"))
    spec, _ = batch_norm_spec(options.pop("x"), lambda param_shape: given, **options)
    return run_batch_norm(spec, x, given.state, given.scale, given.bias, **options)


def batch_norm_spec(
    x, variables: VariablesFn, *, training, momentum, epsilon, axis, axis_name, axis_index_groups, mask,
    unbiased_running_var, skip_nonfinite, allow_single_value, virtual_batch_size, renorm_clipping,
    renorm_warmup_steps, dtype, normalized_dtype, scale_offset, zero_masked_outputs, flax_layer=None,
    initializing=False, num_features=None, state_names=None, state_fix="",
) -> tuple[NormSpec, Variables]:  # fmt: skip
    """Checks every argument of one BatchNorm call once: BatchNorm's own here, the core's by
    :func:`~normjax._src.spec.checked_call`, which calls ``variables`` (they include the running ``state``).

    ``flax_layer``, ``initializing`` and ``num_features`` are :func:`~normjax._src.spec.checked_call`'s (a Flax
    layer's call), whose running statistics are named ``state_names`` in a shape mismatch, with the fix
    ``state_fix``.
    """
    arguments.check_static_bool(training, "training")
    arguments.check_static_bool(unbiased_running_var, "unbiased_running_var")
    arguments.check_static_bool(skip_nonfinite, "skip_nonfinite")
    arguments.check_static_bool(allow_single_value, "allow_single_value")
    if training:
        arguments.check_ghost_batch_options(virtual_batch_size, axis_name, renorm_clipping)
    arguments.check_momentum(momentum)
    spec, call_variables = checked_call(
        "batch_norm", x, variables, epsilon=epsilon, axis=axis, mask=mask, axis_name=axis_name,
        axis_index_groups=axis_index_groups, dtype=dtype, normalized_dtype=normalized_dtype,
        scale_offset=scale_offset, zero_masked_outputs=zero_masked_outputs,
        allow_single_value=allow_single_value or virtual_batch_size is not None, training=training,
        flax_layer=flax_layer, initializing=initializing, num_features=num_features,
    )  # fmt: skip
    state = call_variables.state
    what = f"one value per feature along axis {spec.feature_axes}"
    if state_names is not None:
        arguments.check_running_stats(state.mean, state.var, spec.param_shape, state_names, state_fix)
    arguments.check_state(state, spec.param_shape, jnp.result_type(x), what)
    arguments.check_renorm_clipping(renorm_clipping)
    arguments.check_renorm_warmup(renorm_warmup_steps, renorm_clipping, getattr(state, "count", None))
    if training and virtual_batch_size is not None:
        if 0 in spec.feature_axes:
            raise ValueError(
                f"`virtual_batch_size` splits axis 0 (the batch axis), but `axis`={spec.feature_axes} makes it a "
                "feature axis. Put the batch first."
            )
        batch = jnp.shape(x)[0]
        arguments.check_virtual_batch_size(virtual_batch_size, batch)
        ghost_shape = grouped_shape(jnp.shape(x), (0, batch // virtual_batch_size))
        reduction_axes = _ghost_spec(spec).reduction_axes
        arguments.check_batch_norm_values(ghost_shape, reduction_axes, mask, None, None, allow_single_value)
    return spec, call_variables


def run_batch_norm(
    spec: NormSpec, x, state, scale, bias, *, training, momentum, epsilon, mask, unbiased_running_var,
    skip_nonfinite, virtual_batch_size, renorm_clipping, renorm_warmup_steps, **checked,
) -> tuple[jax.Array, BatchNormState]:  # fmt: skip
    """BatchNorm's output and new state for arguments :func:`batch_norm_spec` checked (``checked``: the others,
    which ``spec`` holds)."""
    ndim = jnp.ndim(x)
    if not training:
        mean = as_feature(state.mean, ndim, spec.feature_axes)
        var = as_feature(state.var, ndim, spec.feature_axes)
        y = normalized(
            x, mean, var, scale, bias, epsilon=epsilon, feature_axes=spec.feature_axes, out_dtype=spec.out_dtype,
            normalized_dtype=spec.normalized_dtype, scale_offset=spec.scale_offset, mask=mask,
        )  # fmt: skip
        if spec.zero_masked_outputs and mask is not None:
            y = zero_masked(y, jnp.broadcast_to(mask, x.shape))
        return y, state
    update = dict(momentum=momentum, epsilon=epsilon, skip_nonfinite=skip_nonfinite)
    if virtual_batch_size is not None:
        return _ghost_batch_norm(
            spec, x, state, scale, bias, mask=mask, unbiased_running_var=unbiased_running_var,
            virtual_batch_size=int(virtual_batch_size), **update,
        )  # fmt: skip
    renorm = _renorm(state, renorm_clipping, renorm_warmup_steps)
    y, stats = standardize(x, scale, bias, spec, epsilon=epsilon, mask=mask, renorm=renorm)
    squeeze = lambda a: jnp.reshape(a, spec.param_shape)  # noqa: E731
    new_state = _update_state(
        state, squeeze(stats.mean), squeeze(stats.var), squeeze(stats.count), unbiased_running_var=unbiased_running_var,
        **update,
    )  # fmt: skip
    return y, new_state


def _renorm(state: BatchNormState, renorm_clipping, warmup_steps: int) -> Renorm | None:
    """Batch Renormalization's inputs for the core; the clipping bounds may be traced (a schedule).

    During the warm-up the bounds are (1, 0), which clip r to 1 and d to 0: plain BatchNorm.
    """
    if renorm_clipping is None:
        return None
    r_max, d_max = (jnp.asarray(bound, state.var.dtype) for bound in renorm_clipping)
    if warmup_steps:
        warming_up = state.count < warmup_steps
        r_max, d_max = jnp.where(warming_up, 1, r_max), jnp.where(warming_up, 0, d_max)
    return Renorm(state.mean, state.var, r_max, d_max)


def _unbiased(var, count):
    """Bessel's correction n/(n-1), left out where n <= 1 so a single value never divides by zero."""
    return var * jnp.where(count > 1, count / jnp.maximum(count - 1, 1), 1.0)


def _update_state(state, mean, var, count, *, momentum, epsilon, unbiased_running_var, skip_nonfinite):
    if unbiased_running_var:
        var = _unbiased(var, count)
    keep = count == 0
    if skip_nonfinite:
        keep = keep | ~(jnp.isfinite(mean) & jnp.isfinite(var))
    return ema_update(state, mean, var, keep, momentum=momentum, epsilon=epsilon)


def _ghost_spec(spec: NormSpec) -> NormSpec:
    """Ghost BatchNorm's spec: axis 0 split into (virtual batches, examples), statistics per virtual batch."""
    features = tuple(a + 1 for a in spec.feature_axes)
    reduction = axes_lib.complement((0,) + features, len(spec.reduction_axes) + len(features) + 1)
    return spec._replace(reduction_axes=reduction, feature_axes=features, axis_name=None, axis_index_groups=None)


def _ghost_batch_norm(
    spec, x, state, scale, bias, *, momentum, epsilon, mask, unbiased_running_var, skip_nonfinite, virtual_batch_size
):
    ghosts = x.shape[0] // virtual_batch_size
    grouped_shape = (ghosts, virtual_batch_size) + x.shape[1:]
    xg = jnp.reshape(x, grouped_shape)
    mask_g = None if mask is None else jnp.reshape(jnp.broadcast_to(mask, x.shape), grouped_shape)
    y, stats = standardize(
        xg, _ghost_param(scale, grouped_shape), _ghost_param(bias, grouped_shape),
        _ghost_spec(spec), epsilon=epsilon, mask=mask_g,
    )  # fmt: skip

    # The running statistics see the count-weighted average of the virtual batches' statistics.
    weights = stats.count / jnp.maximum(jnp.sum(stats.count, axis=0, keepdims=True), 1)
    feature_shape = jnp.shape(state.mean)
    average = lambda a: jnp.reshape(jnp.sum(a * weights, axis=0), feature_shape)  # noqa: E731
    count = jnp.reshape(jnp.sum(stats.count, axis=0), feature_shape)
    var = _unbiased(stats.var, stats.count) if unbiased_running_var else stats.var
    new_state = _update_state(
        state,
        average(stats.mean),
        average(var),
        count,
        momentum=momentum,
        epsilon=epsilon,
        unbiased_running_var=False,
        skip_nonfinite=skip_nonfinite,
    )
    return jnp.reshape(y, x.shape), new_state


def _ghost_param(param, grouped_shape):
    """A per-example scale or bias split like ``x`` into (virtual batches, examples); per feature unchanged."""
    if param is None or jnp.ndim(param) != len(grouped_shape) - 1:
        return param
    rest = jnp.shape(param)[1:]
    return jnp.reshape(jnp.broadcast_to(param, (grouped_shape[0] * grouped_shape[1],) + rest), grouped_shape[:2] + rest)
