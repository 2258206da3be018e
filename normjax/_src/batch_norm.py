"""BatchNorm with explicit running state, synchronized statistics, Batch Renormalization and Ghost BatchNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from normjax._src import arguments, device_axes, dtypes
from normjax._src import axes as axes_lib
from normjax._src.boundary import named_scope
from normjax._src.normalize import normalize
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
    arguments.check_inexact(x)
    arguments.check_static_bool(training, "training")
    # -- argument checks --
    arguments.check_static_bool(unbiased_running_var, "unbiased_running_var")
    arguments.check_static_bool(skip_nonfinite, "skip_nonfinite")
    arguments.check_static_bool(allow_single_value, "allow_single_value")
    if training:  # evaluation does not synchronize, so it needs no bound axis
        arguments.check_ghost_batch_options(virtual_batch_size, axis_name, renorm_clipping)
        device_axes.check_axis_name(axis_name, axis_index_groups)
    dtypes.check_real_output(dtypes.output_dtype(x, dtype), scale=scale, bias=bias)
    # -- end of argument checks --
    arguments.check_momentum(momentum)
    arguments.check_epsilon(epsilon, x.dtype)
    ndim = jnp.ndim(x)
    feature_axes = axes_lib.canonicalize_axes(axis, ndim, "axis")
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    what = f"one value per feature along axis {feature_axes}"
    arguments.check_affine(scale, x.shape, feature_axes, "scale", what)
    arguments.check_affine(bias, x.shape, feature_axes, "bias", what)
    arguments.check_scale_offset(scale_offset, scale)
    arguments.check_static_bool(zero_masked_outputs, "zero_masked_outputs")
    arguments.check_state(state, feature_shape, x.dtype, what)
    arguments.check_mask(mask, jnp.shape(x))
    arguments.check_renorm_clipping(renorm_clipping)
    arguments.check_renorm_warmup(renorm_warmup_steps, renorm_clipping, getattr(state, "count", None))
    casting = dict(dtype=dtype, normalized_dtype=normalized_dtype)

    if not training:
        mean = as_feature(state.mean, ndim, feature_axes)
        var = as_feature(state.var, ndim, feature_axes)
        y = normalize(
            x, mean, var, scale, bias, epsilon=epsilon, feature_axes=feature_axes, scale_offset=scale_offset, mask=mask,
            **casting,
        )  # fmt: skip
        if zero_masked_outputs and mask is not None:
            y = zero_masked(y, jnp.broadcast_to(mask, x.shape))
        return y, state

    if virtual_batch_size is not None:
        return _ghost_batch_norm(
            x, state, scale, bias, feature_axes=feature_axes, momentum=momentum, epsilon=epsilon,
            axis_name=axis_name, mask=mask, unbiased_running_var=unbiased_running_var,
            skip_nonfinite=skip_nonfinite, allow_single_value=allow_single_value,
            virtual_batch_size=virtual_batch_size, renorm_clipping=renorm_clipping, scale_offset=scale_offset,
            zero_masked_outputs=zero_masked_outputs, **casting,
        )  # fmt: skip

    reduction_axes = axes_lib.complement(feature_axes, ndim)
    arguments.check_batch_norm_values(x.shape, reduction_axes, mask, axis_name, axis_index_groups, allow_single_value)
    y, stats = standardize(
        x, scale, bias, reduction_axes=reduction_axes, feature_axes=feature_axes, epsilon=epsilon, mask=mask,
        axis_name=axis_name, axis_index_groups=axis_index_groups,
        renorm=_renorm(state, renorm_clipping, renorm_warmup_steps), scale_offset=scale_offset,
        zero_masked_outputs=zero_masked_outputs, **casting,
    )  # fmt: skip
    squeeze = lambda a: jnp.reshape(a, feature_shape)  # noqa: E731
    new_state = _update_state(
        state,
        squeeze(stats.mean),
        squeeze(stats.var),
        squeeze(stats.count),
        momentum=momentum,
        epsilon=epsilon,
        unbiased_running_var=unbiased_running_var,
        skip_nonfinite=skip_nonfinite,
    )
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


def _ghost_batch_norm(
    x, state, scale, bias, *, feature_axes, momentum, epsilon, axis_name, mask, unbiased_running_var,
    skip_nonfinite, allow_single_value, virtual_batch_size, renorm_clipping, dtype, normalized_dtype, scale_offset,
    zero_masked_outputs,
):  # fmt: skip
    if 0 in feature_axes:
        raise ValueError(
            f"`virtual_batch_size` splits axis 0 (the batch axis), but `axis`={feature_axes} makes it a feature "
            "axis. Put the batch first."
        )
    batch = x.shape[0]
    arguments.check_virtual_batch_size(virtual_batch_size, batch)
    virtual_batch_size = int(virtual_batch_size)
    ghosts = batch // virtual_batch_size
    grouped_shape = (ghosts, virtual_batch_size) + x.shape[1:]
    xg = jnp.reshape(x, grouped_shape)
    mask_g = None if mask is None else jnp.reshape(jnp.broadcast_to(mask, x.shape), grouped_shape)
    # Axis 0 now indexes virtual batches; statistics are per virtual batch and feature.
    grouped_features = tuple(a + 1 for a in feature_axes)
    reduction_axes = axes_lib.complement((0,) + grouped_features, xg.ndim)
    arguments.check_batch_norm_values(xg.shape, reduction_axes, mask_g, None, None, allow_single_value)
    y, stats = standardize(
        xg, _ghost_param(scale, grouped_shape), _ghost_param(bias, grouped_shape), reduction_axes=reduction_axes,
        feature_axes=grouped_features, epsilon=epsilon, mask=mask_g, dtype=dtype, normalized_dtype=normalized_dtype,
        scale_offset=scale_offset, zero_masked_outputs=zero_masked_outputs,
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
