"""Flax nnx layers, drop-in for ``flax.nnx``'s: Flax's variables and constructors, normjax's core.

Each layer has the constructor of Flax's layer of the same name (same arguments, order and defaults, the same
``rngs`` draws) and the same ``nnx.Param`` / ``nnx.BatchStat`` attributes, so ``nnx.state`` trees and
checkpoints move both ways. Calls go through :mod:`normjax._src.flax_conventions`, the translation linen uses
too; there is no arithmetic here. The one deliberate difference from Flax nnx is the default ``promote_dtype``
(:func:`normjax._src.flax_conventions.promote_exactly`): it never rounds the input to a narrower ``dtype`` before
the statistics, so an nnx layer and its linen twin give the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import initializers
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn

from normjax._src import arguments
from normjax._src import flax_conventions as common
from normjax._src.state import BatchNormState

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})
# Flax's defaults, made once (a call in a signature default is evaluated once anyway).
_ZEROS_INIT = initializers.zeros_init()
_ONES_INIT = initializers.ones_init()


_STATS_FIX = (
    "The layer's `num_features` (or a restored `nnx.state`) does not match the input: build the layer with "
    "`num_features` equal to the input's size along `axis`, or restore a state saved for this layer."
)


def _param(use: bool, init: Initializer, num_features: int, param_dtype, rngs: nnx.Rngs, metadata):
    """An ``nnx.Param`` of shape ``(num_features,)``, drawing one ``rngs.params()`` key as Flax does, or None."""
    if not use:
        return nnx.data(None)
    return nnx.Param(init(rngs.params(), (num_features,), param_dtype), **metadata)


def _value(variable) -> jax.Array | None:
    return None if variable is None else variable[...]


def _affine(layer: nnx.Module, scale: jax.Array | None, bias: jax.Array | None):
    """The ``(scale, bias)`` a call uses: the layer's own parameters, or those given at call time."""
    name = type(layer).__name__
    return (
        common.call_affine(_value(layer.scale), scale, "scale", name),
        common.call_affine(_value(layer.bias), bias, "bias", name),
    )


class BatchNorm(nnx.Module):
    r"""Batch Normalization (Ioffe & Szegedy, 2015), a drop-in for :class:`flax.nnx.BatchNorm`.

    .. math::

        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    with the batch statistics in training (``.train()``, or ``use_running_average=False``) and the running
    statistics ``mean`` / ``var`` (``nnx.BatchStat``) in evaluation (``.eval()``). Training updates them as
    ``running = momentum * running + (1 - momentum) * batch``.

    Same constructor, attributes and outputs as Flax's exact variant (``use_fast_variance=False``), plus
    normjax's guarantees: a stable variance, exact synchronized statistics over ``axis_name`` for uneven
    per-device counts, and running statistics that survive empty (all-masked) or non-finite batches. For
    complex inputs the running mean becomes complex on the first training step (Flax nnx instead drops its
    imaginary part with a FutureWarning) and the variance is that of ``|x|``.

    ``use_fast_variance`` is accepted for compatibility and has no effect: statistics are always computed in
    float32 or wider with the stable (shifted, no-cancellation) variance.

    Args:
      num_features: the number of features (the size of ``axis``).
      use_running_average: use the running statistics (True) or the batch statistics (False); the call-time
        argument takes precedence. Set by ``.train()`` / ``.eval()`` / ``nnx.view``.
      axis: the feature axis; statistics are over all the others.
      momentum: weight of the old running value in the update, in [0, 1] (PyTorch's 0.1 is 0.9 here).
      epsilon: a small float added to the variance.
      dtype: the output dtype (default: promoted from the input, statistics, scale and bias, as in Flax).
      param_dtype: the dtype of ``scale`` and ``bias``.
      use_bias: add a learned bias :math:`\beta`.
      use_scale: multiply by a learned scale :math:`\gamma`.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      axis_name: name(s) of a mapped axis (``nnx.vmap``, ``shard_map``, ``pmap``) over which batch statistics
        are synchronized.
      axis_index_groups: groups of indices along ``axis_name`` synchronized separately.
      use_fast_variance: accepted for Flax compatibility; ignored.
      promote_dtype: Flax's hook applied to ``(x, mean, var, scale, bias)`` with ``dtype=dtype`` before
        normalizing; the running statistics are updated in their own dtype. The default casts nothing to a
        narrower dtype, so the output is rounded once and equals the linen layer's bit for bit; Flax's default
        (``flax.nnx.nn.dtypes.promote_dtype``) rounds ``x`` and the statistics to ``dtype`` first.
      rngs: the random number generators (one ``params`` draw per created parameter, as in Flax).
      bias_metadata: metadata of the bias ``nnx.Param``.
      scale_metadata: metadata of the scale ``nnx.Param``.
      unbiased_running_var: store the unbiased batch variance ``n / (n - 1) * var`` in the running variance
        (PyTorch's convention); Flax stores the biased one (the default).
      skip_nonfinite: keep the running value of a feature whose batch statistics are NaN or infinite.
      virtual_batch_size: Ghost BatchNorm (Hoffer et al., 2017): in training, normalize each block of this
        many examples (axis 0) with its own statistics; must divide the batch size.
      renorm_clipping: Batch Renormalization (Ioffe, 2017): ``(r_max, d_max)`` corrects the training output
        towards the running statistics.
      renorm_warmup_steps: train as plain BatchNorm for this many updating steps before ``renorm_clipping``
        applies (CrossQ: 100000). The layer then keeps its step counter in ``count`` (an int32
        ``nnx.BatchStat``), created only in that case (``None`` otherwise), as the linen layer's
        ``batch_stats/count``.
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once, to
        ``dtype``; a dtype rounds the normalized values to it before the affine, which then runs in the
        promotion of it and ``param_dtype`` (HF Llama: the input dtype; see the numerics guide).
      scale_offset: a constant :math:`c` added to ``scale`` in float32 or wider, :math:`\gamma + c`: ``1.0``
        for a zero-centered scale (Gemma's :math:`1 + \gamma`). The stored ``scale`` is then :math:`\gamma`:
        initialize it at :math:`1 - c` (``scale_init=nnx.initializers.zeros_init()`` for ``1.0``) for an identity
        start.
      zero_masked_outputs: output 0 where ``mask`` is False; no effect without a mask.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normjax import nnx as njx
      >>> bn = njx.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
      >>> y = bn(jnp.array([[0.0, 10.0], [2.0, 30.0]]))
      >>> bn.mean[...].tolist()
      [0.10000000149011612, 2.0]
      >>> bn.eval()
      >>> bn.use_running_average
      True

    References:
      Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
      Covariate Shift", ICML 2015. Ioffe, "Batch Renormalization", NeurIPS 2017. Hoffer, Hubara & Soudry,
      "Train longer, generalize better", NeurIPS 2017.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _ZEROS_INIT,
        scale_init: Initializer = _ONES_INIT,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = common.promote_exactly,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        unbiased_running_var: bool = False,
        skip_nonfinite: bool = True,
        virtual_batch_size: int | None = None,
        renorm_clipping: tuple[float, float] | None = None,
        renorm_warmup_steps: int = 0,
        normalized_dtype: Dtype | None = None,
        scale_offset: float = 0.0,
        zero_masked_outputs: bool = False,
    ):
        common.check_num_features(num_features, "BatchNorm")
        feature_shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(feature_shape, common.RUNNING_STATS_DTYPE))
        self.var = nnx.BatchStat(jnp.ones(feature_shape, common.RUNNING_STATS_DTYPE))
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32)) if renorm_warmup_steps else None
        self.scale = _param(use_scale, scale_init, num_features, param_dtype, rngs, scale_metadata)
        self.bias = _param(use_bias, bias_init, num_features, param_dtype, rngs, bias_metadata)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.unbiased_running_var = unbiased_running_var
        self.skip_nonfinite = skip_nonfinite
        self.virtual_batch_size = virtual_batch_size
        self.renorm_clipping = renorm_clipping
        self.renorm_warmup_steps = renorm_warmup_steps
        self.normalized_dtype = normalized_dtype
        self.scale_offset = scale_offset
        self.zero_masked_outputs = zero_masked_outputs

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
        scale: jax.Array | None = None,
        bias: jax.Array | None = None,
    ):
        r"""Normalizes ``x`` with batch statistics (training) or running statistics (evaluation).

        Args:
          x: the input.
          use_running_average: overrides the attribute of the same name for this call.
          mask: optional array broadcastable to ``x``, True (or 1) where an element enters the statistics.
          scale: a call-time :math:`\gamma` (conditional normalization: AdaLN, FiLM), per feature or per example
            (of ``x``'s rank, broadcastable to ``x``, e.g. ``(B, 1, D)``); only with ``use_scale=False``.
          bias: a call-time :math:`\beta`, likewise; only with ``use_bias=False``.

        Returns:
          The normalized input, of ``x``'s shape.
        """
        common.check_input(x)
        use_running_average = first_from(
            use_running_average,
            self.use_running_average,
            error_msg=(
                "No `use_running_average` argument was provided to BatchNorm. Pass it to the constructor, to the "
                "call (`bn(x, use_running_average=True)`), or set it with `model.train()` / `model.eval()`."
            ),
        )
        arguments.check_static_bool(use_running_average, "use_running_average")
        common.refuse_nnx_call_inside_linen_freeze(not use_running_average)
        running_mean, running_var = self.mean[...], self.var[...]
        scale, bias = _affine(self, scale, bias)
        x, mean, var, scale, bias = self.promote_dtype((x, running_mean, running_var, scale, bias), dtype=self.dtype)
        if use_running_average:
            # Evaluation normalizes with the statistics as promoted; training updates them in their own dtype.
            running_mean, running_var = mean, var
        running = BatchNormState(running_mean, running_var, None if self.count is None else self.count[...])
        y, new_state = common.apply_batch_norm(
            x, common.held(scale, bias, running), use_running_average=use_running_average,
            initializing=False, momentum=self.momentum, epsilon=self.epsilon, axis=self.axis,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, mask=mask, dtype=self.dtype,
            unbiased_running_var=self.unbiased_running_var, skip_nonfinite=self.skip_nonfinite,
            virtual_batch_size=self.virtual_batch_size, renorm_clipping=self.renorm_clipping,
            renorm_warmup_steps=self.renorm_warmup_steps, normalized_dtype=self.normalized_dtype,
            stats_names=("mean", "var"), stats_fix=_STATS_FIX,
            num_features=self.num_features,
            scale_offset=self.scale_offset, zero_masked_outputs=self.zero_masked_outputs,
        )  # fmt: skip
        if new_state is not None:
            # Running statistics are not trained (as in Flax); `set_value` lets a real mean become complex.
            self.mean.set_value(jax.lax.stop_gradient(new_state.mean))
            self.var.set_value(jax.lax.stop_gradient(new_state.var))
            if self.count is not None:
                self.count.set_value(new_state.count)
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``: sets ``use_running_average`` when given.

        Args:
          use_running_average: use the running statistics (True) or the batch statistics (False).
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class LayerNorm(nnx.Module):
    r"""Layer Normalization (Ba et al., 2016), a drop-in for :class:`flax.nnx.LayerNorm`.

    .. math::

        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta, \qquad
        \mu, \sigma^2 \text{ over } \texttt{reduction\_axes} \text{ of each example}

    Statistics are computed in float32 or wider with the stable (shifted, no-cancellation) variance, which reads
    the input once like Flax's fast variance; ``use_fast_variance`` is accepted for compatibility and has no effect.

    Args:
      num_features: the number of features (``scale`` and ``bias`` have shape ``(num_features,)``).
      epsilon: a small float added to the variance.
      dtype: the output dtype (default: promoted from the input, scale and bias, as in Flax).
      param_dtype: the dtype of ``scale`` and ``bias``.
      use_bias: add a learned bias :math:`\beta`.
      use_scale: multiply by a learned scale :math:`\gamma`.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      reduction_axes: the axes the statistics are computed over.
      feature_axes: the axis ``scale`` and ``bias`` run along.
      axis_name: name(s) of a mapped axis over which the statistics are also computed.
      axis_index_groups: groups of indices along ``axis_name``.
      use_fast_variance: accepted for Flax compatibility; ignored.
      promote_dtype: Flax's hook applied to ``(x, scale, bias)`` with ``dtype=dtype`` before normalizing. The
        default casts nothing to a narrower dtype, so the output is rounded once and equals the linen layer's
        bit for bit; Flax's default (``flax.nnx.nn.dtypes.promote_dtype``) rounds ``x`` to ``dtype`` first.
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once, to
        ``dtype``; a dtype rounds the normalized values to it before the affine, which then runs in the
        promotion of it and ``param_dtype`` (HF Llama: the input dtype; see the numerics guide).
      rngs: the random number generators (one ``params`` draw per created parameter, as in Flax).
      bias_metadata: metadata of the bias ``nnx.Param``.
      scale_metadata: metadata of the scale ``nnx.Param``.
      scale_offset: a constant :math:`c` added to ``scale`` in float32 or wider, :math:`\gamma + c`: ``1.0``
        for a zero-centered scale (Gemma's :math:`1 + \gamma`). The stored ``scale`` is then :math:`\gamma`:
        initialize it at :math:`1 - c` (``scale_init=nnx.initializers.zeros_init()`` for ``1.0``) for an identity
        start.
      zero_masked_outputs: output 0 where ``mask`` is False; no effect without a mask.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normjax import nnx as njx
      >>> ln = njx.LayerNorm(2, epsilon=1e-12, rngs=nnx.Rngs(0))
      >>> ln(jnp.array([[1.0, 3.0], [10.0, 30.0]])).tolist()
      [[-1.0, 1.0], [-1.0, 1.0]]

    References:
      Ba, Kiros & Hinton, "Layer Normalization", arXiv:1607.06450, 2016.
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _ZEROS_INIT,
        scale_init: Initializer = _ONES_INIT,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = common.promote_exactly,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        normalized_dtype: Dtype | None = None,
        scale_offset: float = 0.0,
        zero_masked_outputs: bool = False,
    ):
        common.check_num_features(num_features, "LayerNorm")
        self.scale = _param(use_scale, scale_init, num_features, param_dtype, rngs, scale_metadata)
        self.bias = _param(use_bias, bias_init, num_features, param_dtype, rngs, bias_metadata)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.normalized_dtype = normalized_dtype
        self.scale_offset = scale_offset
        self.zero_masked_outputs = zero_masked_outputs

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        scale: jax.Array | None = None,
        bias: jax.Array | None = None,
    ):
        r"""Normalizes each example of ``x`` over ``reduction_axes``.

        Args:
          x: the input.
          mask: optional array broadcastable to ``x``, True (or 1) where an element enters the statistics.
          scale: a call-time :math:`\gamma` (conditional normalization: AdaLN, FiLM), per feature or per example
            (of ``x``'s rank, broadcastable to ``x``, e.g. ``(B, 1, D)``); only with ``use_scale=False``.
          bias: a call-time :math:`\beta`, likewise; only with ``use_bias=False``.

        Returns:
          The normalized input, of ``x``'s shape.
        """
        common.check_input(x)
        x, scale, bias = self.promote_dtype((x, *_affine(self, scale, bias)), dtype=self.dtype)
        return common.apply_per_example(
            "layer_norm", "LayerNorm", x, common.held(scale, bias), reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes, epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=self.dtype, normalized_dtype=self.normalized_dtype,
            scale_offset=self.scale_offset, num_features=self.num_features,
            zero_masked_outputs=self.zero_masked_outputs,
        )  # fmt: skip


class RMSNorm(nnx.Module):
    r"""Root Mean Square Layer Normalization (Zhang & Sennrich, 2019), a drop-in for :class:`flax.nnx.RMSNorm`.

    .. math::

        y = \frac{x}{\sqrt{\frac{1}{n}\sum_i |x_i|^2 + \epsilon}}\,\gamma

    over ``reduction_axes`` of each example. ``use_fast_variance`` is accepted for compatibility and has no
    effect.

    Args:
      num_features: the number of features (``scale`` has shape ``(num_features,)``).
      epsilon: a small float added to the mean square.
      dtype: the output dtype (default: promoted from the input and scale, as in Flax).
      param_dtype: the dtype of ``scale``.
      use_scale: multiply by a learned scale :math:`\gamma`.
      scale_init: initializer of the scale.
      reduction_axes: the axes the statistics are computed over.
      feature_axes: the axis ``scale`` runs along.
      axis_name: name(s) of a mapped axis over which the statistics are also computed.
      axis_index_groups: groups of indices along ``axis_name``.
      use_fast_variance: accepted for Flax compatibility; ignored.
      promote_dtype: Flax's hook applied to ``(x, scale)`` with ``dtype=dtype`` before normalizing. The default
        casts nothing to a narrower dtype, so the output is rounded once and equals the linen layer's bit for
        bit; Flax's default (``flax.nnx.nn.dtypes.promote_dtype``) rounds ``x`` to ``dtype`` first.
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once, to
        ``dtype``; a dtype rounds the normalized values to it before the affine, which then runs in the
        promotion of it and ``param_dtype`` (HF Llama: the input dtype; see the numerics guide).
      rngs: the random number generators (one ``params`` draw for the scale, as in Flax).
      scale_metadata: metadata of the scale ``nnx.Param``.
      scale_offset: a constant :math:`c` added to ``scale`` in float32 or wider, :math:`\gamma + c`: ``1.0``
        for a zero-centered scale (Gemma's :math:`1 + \gamma`). The stored ``scale`` is then :math:`\gamma`:
        initialize it at :math:`1 - c` (``scale_init=nnx.initializers.zeros_init()`` for ``1.0``) for an identity
        start.
      zero_masked_outputs: output 0 where ``mask`` is False; no effect without a mask.
      norm_before_gate: with a call-time ``gate`` :math:`z`, normalize then gate,
        :math:`\mathrm{RMSNorm}(x)\,\gamma\,\mathrm{silu}(z)` (True, Qwen3-Next), or gate then normalize,
        :math:`\mathrm{RMSNorm}(x\,\mathrm{silu}(z))\,\gamma` (False, Mamba-2); see :func:`normjax.gated_rms_norm`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normjax import nnx as njx
      >>> rms = njx.RMSNorm(2, epsilon=1e-12, rngs=nnx.Rngs(0))
      >>> rms(jnp.array([[3.0, -3.0]])).tolist()
      [[1.0, -1.0]]

    References:
      Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_scale: bool = True,
        scale_init: Initializer = initializers.ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = common.promote_exactly,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        normalized_dtype: Dtype | None = None,
        scale_offset: float = 0.0,
        zero_masked_outputs: bool = False,
        norm_before_gate: bool = True,
    ):
        common.check_num_features(num_features, "RMSNorm")
        self.scale = _param(use_scale, scale_init, num_features, param_dtype, rngs, scale_metadata)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.normalized_dtype = normalized_dtype
        self.scale_offset = scale_offset
        self.zero_masked_outputs = zero_masked_outputs
        self.norm_before_gate = norm_before_gate

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        scale: jax.Array | None = None,
        gate: jax.Array | None = None,
    ):
        r"""Rescales each example of ``x`` by its root mean square over ``reduction_axes``.

        Args:
          x: the input.
          mask: optional array broadcastable to ``x``, True (or 1) where an element enters the statistics.
          scale: a call-time :math:`\gamma` (conditional normalization: AdaLN, FiLM), per feature or per example
            (of ``x``'s rank, broadcastable to ``x``, e.g. ``(B, 1, D)``); only with ``use_scale=False``.
          gate: optional gate :math:`z` of ``x``'s shape: gated RMSNorm (see ``norm_before_gate``).

        Returns:
          The normalized input, of ``x``'s shape.
        """
        common.check_input(x)
        scale = common.call_affine(_value(self.scale), scale, "scale", "RMSNorm")
        if gate is None:
            x, scale = self.promote_dtype((x, scale), dtype=self.dtype)
        else:
            x, scale, gate = self.promote_dtype((x, scale, gate), dtype=self.dtype)
        return common.apply_per_example(
            "rms_norm", "RMSNorm", x, common.held(scale), reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes, epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=self.dtype, normalized_dtype=self.normalized_dtype,
            num_features=self.num_features,
            scale_offset=self.scale_offset, zero_masked_outputs=self.zero_masked_outputs, gate=gate,
            norm_before_gate=self.norm_before_gate,
        )  # fmt: skip


class GroupNorm(nnx.Module):
    r"""Group Normalization (Wu & He, 2018), a drop-in for :class:`flax.nnx.GroupNorm`.

    The channels (last axis) are split into ``num_groups`` contiguous groups; each group of each example is
    standardized over its channels and the other ``reduction_axes`` (default: every axis but the batch axis
    0), then a per-channel affine is applied. ``use_fast_variance`` is accepted for compatibility and has no
    effect.

    Args:
      num_features: the number of channels.
      num_groups: the number of groups (default 32, the paper's); pass ``num_groups=None`` to use
        ``group_size``.
      group_size: the number of channels per group.
      epsilon: a small float added to the variance.
      dtype: the output dtype (default: promoted from the input, scale and bias, as in Flax).
      param_dtype: the dtype of ``scale`` and ``bias``.
      use_bias: add a learned bias :math:`\beta`.
      use_scale: multiply by a learned scale :math:`\gamma`.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      reduction_axes: the axes the statistics are computed over; must include the last (channel) axis.
      axis_name: name(s) of a mapped axis over which the statistics are also computed.
      axis_index_groups: groups of indices along ``axis_name``.
      use_fast_variance: accepted for Flax compatibility; ignored.
      promote_dtype: Flax's hook applied to ``(x, scale, bias)`` with ``dtype=dtype`` before normalizing. The
        default casts nothing to a narrower dtype, so the output is rounded once and equals the linen layer's
        bit for bit; Flax's default (``flax.nnx.nn.dtypes.promote_dtype``) rounds ``x`` to ``dtype`` first.
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once, to
        ``dtype``; a dtype rounds the normalized values to it before the affine, which then runs in the
        promotion of it and ``param_dtype`` (HF Llama: the input dtype; see the numerics guide).
      rngs: the random number generators (one ``params`` draw per created parameter, as in Flax).
      bias_metadata: metadata of the bias ``nnx.Param``.
      scale_metadata: metadata of the scale ``nnx.Param``.
      scale_offset: a constant :math:`c` added to ``scale`` in float32 or wider, :math:`\gamma + c`: ``1.0``
        for a zero-centered scale (Gemma's :math:`1 + \gamma`). The stored ``scale`` is then :math:`\gamma`:
        initialize it at :math:`1 - c` (``scale_init=nnx.initializers.zeros_init()`` for ``1.0``) for an identity
        start.
      zero_masked_outputs: output 0 where ``mask`` is False; no effect without a mask.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normjax import nnx as njx
      >>> gn = njx.GroupNorm(4, num_groups=2, epsilon=1e-12, rngs=nnx.Rngs(0))
      >>> gn(jnp.array([[1.0, 3.0, 10.0, 30.0]])).tolist()
      [[-1.0, 1.0, -1.0, 1.0]]

    References:
      Wu & He, "Group Normalization", ECCV 2018.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _ZEROS_INIT,
        scale_init: Initializer = _ONES_INIT,
        reduction_axes: Axes | None = None,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = common.promote_exactly,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        normalized_dtype: Dtype | None = None,
        scale_offset: float = 0.0,
        zero_masked_outputs: bool = False,
    ):
        common.check_num_features(num_features, "GroupNorm")
        self.feature_axis = -1
        self.num_groups = arguments.group_count(
            num_features, num_groups, group_size, norm="GroupNorm", flax_word="features"
        )
        self.group_size = num_features // self.num_groups
        self.scale = _param(use_scale, scale_init, num_features, param_dtype, rngs, scale_metadata)
        self.bias = _param(use_bias, bias_init, num_features, param_dtype, rngs, bias_metadata)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.normalized_dtype = normalized_dtype
        self.scale_offset = scale_offset
        self.zero_masked_outputs = zero_masked_outputs

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        scale: jax.Array | None = None,
        bias: jax.Array | None = None,
    ):
        r"""Normalizes groups of channels of each example of ``x``.

        Args:
          x: the input, channels last, e.g. ``(N, H, W, C)``.
          mask: optional array broadcastable to ``x``, True (or 1) where an element enters the statistics.
          scale: a call-time :math:`\gamma` (conditional normalization: AdaLN, FiLM), per feature or per example
            (of ``x``'s rank, broadcastable to ``x``, e.g. ``(B, 1, D)``); only with ``use_scale=False``.
          bias: a call-time :math:`\beta`, likewise; only with ``use_bias=False``.

        Returns:
          The normalized input, of ``x``'s shape.
        """
        common.check_input(x)
        x, scale, bias = self.promote_dtype((x, *_affine(self, scale, bias)), dtype=self.dtype)
        return common.apply_per_example(
            "group_norm", "GroupNorm", x, common.held(scale, bias), num_groups=self.num_groups, group_size=None,
            reduction_axes=self.reduction_axes, num_features=self.num_features,
            epsilon=self.epsilon, mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=self.dtype, normalized_dtype=self.normalized_dtype, scale_offset=self.scale_offset,
            zero_masked_outputs=self.zero_masked_outputs,
        )  # fmt: skip


class InstanceNorm(nnx.Module):
    r"""Instance Normalization (Ulyanov et al., 2016), a drop-in for :class:`flax.nnx.InstanceNorm`.

    .. math::

        y_{n,c} = \frac{x_{n,c} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}}\,\gamma_c + \beta_c

    with the statistics over every axis but the batch axis 0 and ``feature_axes``. ``use_fast_variance`` is
    accepted for compatibility and has no effect.

    Args:
      num_features: the number of channels (``scale`` and ``bias`` have shape ``(num_features,)``).
      epsilon: a small float added to the variance.
      dtype: the output dtype (default: promoted from the input, scale and bias, as in Flax).
      param_dtype: the dtype of ``scale`` and ``bias``.
      use_bias: add a learned bias :math:`\beta`.
      use_scale: multiply by a learned scale :math:`\gamma`.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      feature_axes: the channel axis (not 0).
      axis_name: name(s) of a mapped axis over which the statistics are also computed.
      axis_index_groups: groups of indices along ``axis_name``.
      use_fast_variance: accepted for Flax compatibility; ignored.
      promote_dtype: Flax's hook applied to ``(x, scale, bias)`` with ``dtype=dtype`` before normalizing. The
        default casts nothing to a narrower dtype, so the output is rounded once and equals the linen layer's
        bit for bit; Flax's default (``flax.nnx.nn.dtypes.promote_dtype``) rounds ``x`` to ``dtype`` first.
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once, to
        ``dtype``; a dtype rounds the normalized values to it before the affine, which then runs in the
        promotion of it and ``param_dtype`` (HF Llama: the input dtype; see the numerics guide).
      rngs: the random number generators (one ``params`` draw per created parameter, as in Flax).
      bias_metadata: metadata of the bias ``nnx.Param``.
      scale_metadata: metadata of the scale ``nnx.Param``.
      scale_offset: a constant :math:`c` added to ``scale`` in float32 or wider, :math:`\gamma + c`: ``1.0``
        for a zero-centered scale (Gemma's :math:`1 + \gamma`). The stored ``scale`` is then :math:`\gamma`:
        initialize it at :math:`1 - c` (``scale_init=nnx.initializers.zeros_init()`` for ``1.0``) for an identity
        start.
      zero_masked_outputs: output 0 where ``mask`` is False; no effect without a mask.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normjax import nnx as njx
      >>> inorm = njx.InstanceNorm(2, epsilon=1e-12, rngs=nnx.Rngs(0))
      >>> inorm(jnp.array([[[1.0, 10.0], [3.0, 30.0]]])).tolist()
      [[[-1.0, -1.0], [1.0, 1.0]]]

    References:
      Ulyanov, Vedaldi & Lempitsky, "Instance Normalization: The Missing Ingredient for Fast Stylization",
      arXiv:1607.08022, 2016.
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros,
        scale_init: Initializer = initializers.ones,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = common.promote_exactly,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        normalized_dtype: Dtype | None = None,
        scale_offset: float = 0.0,
        zero_masked_outputs: bool = False,
    ):
        common.check_num_features(num_features, "InstanceNorm")
        self.scale = _param(use_scale, scale_init, num_features, param_dtype, rngs, scale_metadata)
        self.bias = _param(use_bias, bias_init, num_features, param_dtype, rngs, bias_metadata)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.normalized_dtype = normalized_dtype
        self.scale_offset = scale_offset
        self.zero_masked_outputs = zero_masked_outputs

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        scale: jax.Array | None = None,
        bias: jax.Array | None = None,
    ):
        r"""Normalizes each example and channel of ``x`` over its other axes.

        Args:
          x: the input, batch first, e.g. ``(N, H, W, C)``.
          mask: optional array broadcastable to ``x``, True (or 1) where an element enters the statistics.
          scale: a call-time :math:`\gamma` (conditional normalization: AdaLN, FiLM), per feature or per example
            (of ``x``'s rank, broadcastable to ``x``, e.g. ``(B, 1, D)``); only with ``use_scale=False``.
          bias: a call-time :math:`\beta`, likewise; only with ``use_bias=False``.

        Returns:
          The normalized input, of ``x``'s shape.
        """
        common.check_input(x)
        x, scale, bias = self.promote_dtype((x, *_affine(self, scale, bias)), dtype=self.dtype)
        return common.apply_per_example(
            "instance_norm", "InstanceNorm", x, common.held(scale, bias), feature_axes=self.feature_axes,
            epsilon=self.epsilon, mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=self.dtype, normalized_dtype=self.normalized_dtype, num_features=self.num_features,
            scale_offset=self.scale_offset, zero_masked_outputs=self.zero_masked_outputs,
        )  # fmt: skip
