"""Flax linen layers, drop-in for ``flax.linen``'s: Flax's variables, normjax's core.

Each layer creates exactly the variables Flax's layer of the same name creates (``params/{scale,bias}``,
``batch_stats/{mean,var}``, same shapes and dtypes), so checkpoints move both ways, and hands the arrays to
:mod:`normjax._src.flax_conventions`, which calls the functional core. There is no arithmetic here.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

from normjax._src import arguments
from normjax._src import flax_conventions as common
from normjax._src.spec import Variables, VariablesFn
from normjax._src.state import BatchNormState


class BatchNorm(nn.Module):
    r"""Batch Normalization (Ioffe & Szegedy, 2015), a drop-in for :class:`flax.linen.BatchNorm`.

    .. math::

        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    with the batch statistics (over every axis but ``axis``, and every device of ``axis_name``) in training
    and the running statistics ``batch_stats/{mean,var}`` in evaluation. Training updates them as
    ``running = momentum * running + (1 - momentum) * batch``; apply with ``mutable=['batch_stats']``.

    Same attributes, defaults, variables and outputs as Flax's exact variant (``use_fast_variance=False``),
    plus normjax's guarantees: the variance is stable for inputs with a large mean; synchronized statistics
    are exact for uneven per-device counts (masks); a feature whose batch is empty (all masked) or not
    finite keeps its running statistics; ``model.init`` never synchronizes (no bound ``axis_name`` needed) and
    accepts a batch of one. Running statistics are created in float32 whatever ``param_dtype``; for complex
    inputs the running mean becomes complex on the first training step (as in Flax linen) and the variance is
    that of ``|x|``.

    ``use_fast_variance`` and ``force_float32_reductions`` are accepted for compatibility and have no effect:
    statistics are always computed in float32 or wider with the stable (shifted, no-cancellation) variance (Flax's
    ``use_fast_variance=False`` variant).

    Attributes:
      use_running_average: use the running statistics (True) or the batch statistics (False); may instead be
        given at call time.
      axis: the feature axis (or axes); statistics are over all the others.
      momentum: weight of the old running value in the update, in [0, 1] (PyTorch's 0.1 is 0.9 here).
      epsilon: a small float added to the variance.
      dtype: the output dtype (default: promoted from the input, scale and bias, as in Flax).
      param_dtype: the dtype of ``scale`` and ``bias``.
      use_bias: add a learned bias :math:`\beta`.
      use_scale: multiply by a learned scale :math:`\gamma`.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      axis_name: name(s) of a mapped axis (``pmap``, ``shard_map``, ``vmap``) over which batch statistics
        are synchronized.
      axis_index_groups: groups of indices along ``axis_name`` synchronized separately.
      use_fast_variance: accepted for Flax compatibility; ignored (see above).
      force_float32_reductions: accepted for Flax compatibility; ignored (see above).
      unbiased_running_var: store the unbiased batch variance ``n / (n - 1) * var`` in the running variance
        (PyTorch's convention); Flax stores the biased one (the default).
      skip_nonfinite: keep the running value of a feature whose batch statistics are NaN or infinite.
      virtual_batch_size: Ghost BatchNorm (Hoffer et al., 2017): in training, normalize each block of this
        many examples (axis 0) with its own statistics; must divide the batch size.
      renorm_clipping: Batch Renormalization (Ioffe, 2017): ``(r_max, d_max)`` corrects the training output
        towards the running statistics.
      renorm_warmup_steps: train as plain BatchNorm for this many updating steps before ``renorm_clipping``
        applies (CrossQ: 100000). The layer then keeps its step counter in ``batch_stats/count`` (an int32
        scalar), a variable created only in that case, so plain checkpoints stay exactly Flax's.
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once, to
        ``dtype``; a dtype rounds the normalized values to it before the affine, which then runs in the
        promotion of it and ``param_dtype`` (HF Llama: the input dtype; see the numerics guide).
      scale_offset: a constant :math:`c` added to ``scale`` in float32 or wider, :math:`\gamma + c`: ``1.0``
        for a zero-centered scale (Gemma's :math:`1 + \gamma`). The stored ``scale`` is then :math:`\gamma`:
        initialize it at :math:`1 - c` (``scale_init=nn.initializers.zeros`` for ``1.0``) for an identity start.
      zero_masked_outputs: output 0 where ``mask`` is False; no effect without a mask.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normjax import linen as njn
      >>> bn = njn.BatchNorm(use_running_average=False, momentum=0.9)
      >>> x = jnp.array([[0.0, 10.0], [2.0, 30.0]])
      >>> variables = bn.init(jax.random.key(0), x)
      >>> jax.tree.map(jnp.shape, variables)
      {'batch_stats': {'mean': (2,), 'var': (2,)}, 'params': {'bias': (2,), 'scale': (2,)}}
      >>> y, updates = bn.apply(variables, x, mutable=['batch_stats'])
      >>> updates['batch_stats']['mean'].tolist()
      [0.10000000149011612, 2.0]

    References:
      Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
      Covariate Shift", ICML 2015. Ioffe, "Batch Renormalization", NeurIPS 2017. Hoffer, Hubara & Soudry,
      "Train longer, generalize better", NeurIPS 2017.
    """

    use_running_average: bool | None = None
    axis: int | Axes = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    unbiased_running_var: bool = False
    skip_nonfinite: bool = True
    virtual_batch_size: int | None = None
    renorm_clipping: tuple[float, float] | None = None
    renorm_warmup_steps: int = 0
    normalized_dtype: Dtype | None = None
    scale_offset: float = 0.0
    zero_masked_outputs: bool = False

    @nn.compact
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
          use_running_average: overrides the attribute of the same name; exactly one of the two must be set.
          mask: optional array broadcastable to ``x``, True (or 1) where an element enters the statistics.
          scale: a call-time :math:`\gamma` (conditional normalization: AdaLN, FiLM), per feature or per example
            (of ``x``'s rank, broadcastable to ``x``, e.g. ``(B, 1, D)``); only with ``use_scale=False``.
          bias: a call-time :math:`\beta`, likewise; only with ``use_bias=False``.

        Returns:
          The normalized input, of ``x``'s shape.
        """
        common.check_input(x)
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        arguments.check_static_bool(use_running_average, "use_running_average")
        running: list[nn.Variable] = []  # batch_stats/{mean,var} (and count), created from the spec's shape

        def variables(shape: tuple[int, ...]) -> Variables:
            running.extend(_running_stats(self, shape))  # before params/{scale,bias}, as in Flax
            affine = _affine(self, scale, bias)(shape)
            return affine._replace(state=BatchNormState(*(variable.value for variable in running)))

        y, new_state = common.apply_batch_norm(
            x, variables, use_running_average=use_running_average, initializing=self.is_initializing(),
            momentum=self.momentum, epsilon=self.epsilon, axis=self.axis,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, mask=mask, dtype=self.dtype,
            unbiased_running_var=self.unbiased_running_var, skip_nonfinite=self.skip_nonfinite,
            virtual_batch_size=self.virtual_batch_size, renorm_clipping=self.renorm_clipping,
            renorm_warmup_steps=self.renorm_warmup_steps, normalized_dtype=self.normalized_dtype,
            scale_offset=self.scale_offset, zero_masked_outputs=self.zero_masked_outputs,
        )  # fmt: skip
        if new_state is not None:
            for variable, value in zip(running, new_state, strict=False):  # a count only with its variable
                variable.value = value
        return y


def _running_stats(module: nn.Module, shape: tuple[int, ...]) -> list[nn.Variable]:
    """Creates (or reads) ``batch_stats/mean`` and ``batch_stats/var`` as Flax does, and ``batch_stats/count``
    when ``renorm_warmup_steps`` needs a step counter."""
    stats_dtype = common.RUNNING_STATS_DTYPE
    running = [
        module.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), shape),
        module.variable("batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), shape),
    ]
    if module.renorm_warmup_steps:
        running.append(module.variable("batch_stats", "count", jnp.zeros, (), jnp.int32))
    return running


def _affine(module: nn.Module, scale: jax.Array | None, bias: jax.Array | None) -> VariablesFn:
    """The layer's scale and bias for their shape: creates (or reads) ``params/scale`` and ``params/bias`` as Flax
    does, in that order (a layer without ``use_bias`` has no bias); or takes the call's."""
    layer = type(module).__name__

    def variables(shape: tuple[int, ...]) -> Variables:
        use_bias = getattr(module, "use_bias", False)  # RMSNorm has no bias
        own_scale = module.param("scale", module.scale_init, shape, module.param_dtype) if module.use_scale else None
        own_bias = module.param("bias", module.bias_init, shape, module.param_dtype) if use_bias else None
        return Variables(
            common.call_affine(own_scale, scale, "scale", layer), common.call_affine(own_bias, bias, "bias", layer)
        )

    return variables


class LayerNorm(nn.Module):
    r"""Layer Normalization (Ba et al., 2016), a drop-in for :class:`flax.linen.LayerNorm`.

    .. math::

        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta, \qquad
        \mu, \sigma^2 \text{ over } \texttt{reduction\_axes} \text{ of each example}

    with ``scale`` and ``bias`` of the shape of ``x`` along ``feature_axes``. Statistics are computed in
    float32 or wider with the stable (shifted, no-cancellation) variance; during ``init`` they are not synchronized over
    ``axis_name``.

    ``use_fast_variance`` and ``force_float32_reductions`` are accepted for compatibility and have no effect:
    statistics are always computed in float32 or wider with the stable (shifted, no-cancellation) variance (Flax's
    ``use_fast_variance=False`` variant).

    Attributes:
      epsilon: a small float added to the variance.
      dtype: the output dtype (default: promoted from the input, scale and bias, as in Flax).
      param_dtype: the dtype of ``scale`` and ``bias``.
      use_bias: add a learned bias :math:`\beta`.
      use_scale: multiply by a learned scale :math:`\gamma`.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      reduction_axes: the axes the statistics are computed over.
      feature_axes: the axes ``scale`` and ``bias`` run along.
      axis_name: name(s) of a mapped axis over which the statistics are also computed (a model split across
        devices).
      axis_index_groups: groups of indices along ``axis_name``.
      use_fast_variance: accepted for Flax compatibility; ignored.
      force_float32_reductions: accepted for Flax compatibility; ignored.
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once, to
        ``dtype``; a dtype rounds the normalized values to it before the affine, which then runs in the
        promotion of it and ``param_dtype`` (HF Llama: the input dtype; see the numerics guide).
      scale_offset: a constant :math:`c` added to ``scale`` in float32 or wider, :math:`\gamma + c`: ``1.0``
        for a zero-centered scale (Gemma's :math:`1 + \gamma`). The stored ``scale`` is then :math:`\gamma`:
        initialize it at :math:`1 - c` (``scale_init=nn.initializers.zeros`` for ``1.0``) for an identity start.
      zero_masked_outputs: output 0 where ``mask`` is False; no effect without a mask.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normjax import linen as njn
      >>> x = jnp.array([[1.0, 3.0], [10.0, 30.0]])
      >>> ln = njn.LayerNorm(epsilon=1e-12)
      >>> ln.apply(ln.init(jax.random.key(0), x), x).tolist()
      [[-1.0, 1.0], [-1.0, 1.0]]

    References:
      Ba, Kiros & Hinton, "Layer Normalization", arXiv:1607.06450, 2016.
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    normalized_dtype: Dtype | None = None
    scale_offset: float = 0.0
    zero_masked_outputs: bool = False

    @nn.compact
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
        return common.apply_per_example(
            "layer_norm", "LayerNorm", x, _affine(self, scale, bias), reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes, epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=self.dtype, initializing=self.is_initializing(),
            normalized_dtype=self.normalized_dtype,
            scale_offset=self.scale_offset, zero_masked_outputs=self.zero_masked_outputs,
        )  # fmt: skip


class RMSNorm(nn.Module):
    r"""Root Mean Square Layer Normalization (Zhang & Sennrich, 2019), a drop-in for :class:`flax.linen.RMSNorm`.

    .. math::

        y = \frac{x}{\sqrt{\frac{1}{n}\sum_i |x_i|^2 + \epsilon}}\,\gamma

    over ``reduction_axes`` of each example, with ``scale`` of the shape of ``x`` along ``feature_axes``.
    During ``init`` the statistics are not synchronized over ``axis_name``.

    ``use_fast_variance`` and ``force_float32_reductions`` are accepted for compatibility and have no effect:
    statistics are always computed in float32 or wider with the stable (shifted, no-cancellation) variance (Flax's
    ``use_fast_variance=False`` variant).

    Attributes:
      epsilon: a small float added to the mean square.
      dtype: the output dtype (default: promoted from the input and scale, as in Flax).
      param_dtype: the dtype of ``scale``.
      use_scale: multiply by a learned scale :math:`\gamma`.
      scale_init: initializer of the scale.
      reduction_axes: the axes the statistics are computed over.
      feature_axes: the axes ``scale`` runs along.
      axis_name: name(s) of a mapped axis over which the statistics are also computed.
      axis_index_groups: groups of indices along ``axis_name``.
      use_fast_variance: accepted for Flax compatibility; ignored.
      force_float32_reductions: accepted for Flax compatibility; ignored.
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once, to
        ``dtype``; a dtype rounds the normalized values to it before the affine, which then runs in the
        promotion of it and ``param_dtype`` (HF Llama: the input dtype; see the numerics guide).
      scale_offset: a constant :math:`c` added to ``scale`` in float32 or wider, :math:`\gamma + c`: ``1.0``
        for a zero-centered scale (Gemma's :math:`1 + \gamma`). The stored ``scale`` is then :math:`\gamma`:
        initialize it at :math:`1 - c` (``scale_init=nn.initializers.zeros`` for ``1.0``) for an identity start.
      zero_masked_outputs: output 0 where ``mask`` is False; no effect without a mask.
      norm_before_gate: with a call-time ``gate`` :math:`z`, normalize then gate,
        :math:`\mathrm{RMSNorm}(x)\,\gamma\,\mathrm{silu}(z)` (True, Qwen3-Next), or gate then normalize,
        :math:`\mathrm{RMSNorm}(x\,\mathrm{silu}(z))\,\gamma` (False, Mamba-2); see :func:`normjax.gated_rms_norm`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normjax import linen as njn
      >>> x = jnp.array([[3.0, -3.0]])
      >>> rms = njn.RMSNorm(epsilon=1e-12)
      >>> rms.apply(rms.init(jax.random.key(0), x), x).tolist()
      [[1.0, -1.0]]

    References:
      Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    normalized_dtype: Dtype | None = None
    scale_offset: float = 0.0
    zero_masked_outputs: bool = False
    norm_before_gate: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
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
        return common.apply_per_example(
            "rms_norm", "RMSNorm", x, _affine(self, scale, None),
            reduction_axes=self.reduction_axes, feature_axes=self.feature_axes, epsilon=self.epsilon, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, dtype=self.dtype,
            initializing=self.is_initializing(), normalized_dtype=self.normalized_dtype, scale_offset=self.scale_offset,
            zero_masked_outputs=self.zero_masked_outputs, gate=gate, norm_before_gate=self.norm_before_gate,
        )  # fmt: skip


class GroupNorm(nn.Module):
    r"""Group Normalization (Wu & He, 2018), a drop-in for :class:`flax.linen.GroupNorm`.

    The channels (last axis) are split into ``num_groups`` contiguous groups; each group of each example is
    standardized over its channels and the other ``reduction_axes`` (default: every axis but the batch axis
    0), then a per-channel affine is applied. ``num_groups=1`` is LayerNorm over all non-batch axes;
    ``group_size=1`` is InstanceNorm. During ``init`` the statistics are not synchronized over ``axis_name``.

    ``use_fast_variance`` and ``force_float32_reductions`` are accepted for compatibility and have no effect:
    statistics are always computed in float32 or wider with the stable (shifted, no-cancellation) variance (Flax's
    ``use_fast_variance=False`` variant).

    Attributes:
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
        Default: all but axis 0. Give it explicitly when the input has extra leading (batch) axes.
      axis_name: name(s) of a mapped axis over which the statistics are also computed.
      axis_index_groups: groups of indices along ``axis_name``.
      use_fast_variance: accepted for Flax compatibility; ignored.
      force_float32_reductions: accepted for Flax compatibility; ignored.
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once, to
        ``dtype``; a dtype rounds the normalized values to it before the affine, which then runs in the
        promotion of it and ``param_dtype`` (HF Llama: the input dtype; see the numerics guide).
      scale_offset: a constant :math:`c` added to ``scale`` in float32 or wider, :math:`\gamma + c`: ``1.0``
        for a zero-centered scale (Gemma's :math:`1 + \gamma`). The stored ``scale`` is then :math:`\gamma`:
        initialize it at :math:`1 - c` (``scale_init=nn.initializers.zeros`` for ``1.0``) for an identity start.
      zero_masked_outputs: output 0 where ``mask`` is False; no effect without a mask.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normjax import linen as njn
      >>> x = jnp.array([[1.0, 3.0, 10.0, 30.0]])
      >>> gn = njn.GroupNorm(num_groups=2, epsilon=1e-12)
      >>> gn.apply(gn.init(jax.random.key(0), x), x).tolist()
      [[-1.0, 1.0, -1.0, 1.0]]

    References:
      Wu & He, "Group Normalization", ECCV 2018.
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes | None = None
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    normalized_dtype: Dtype | None = None
    scale_offset: float = 0.0
    zero_masked_outputs: bool = False

    @nn.compact
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
        return common.apply_per_example(
            "group_norm", "GroupNorm", x, _affine(self, scale, bias), num_groups=self.num_groups,
            group_size=self.group_size, reduction_axes=self.reduction_axes, epsilon=self.epsilon, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, dtype=self.dtype,
            initializing=self.is_initializing(), normalized_dtype=self.normalized_dtype,
            scale_offset=self.scale_offset, zero_masked_outputs=self.zero_masked_outputs,
        )  # fmt: skip


class InstanceNorm(nn.Module):
    r"""Instance Normalization (Ulyanov et al., 2016), a drop-in for :class:`flax.linen.InstanceNorm`.

    .. math::

        y_{n,c} = \frac{x_{n,c} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}}\,\gamma_c + \beta_c

    with the statistics over every axis but the batch axis 0 and ``feature_axes``. During ``init`` the
    statistics are not synchronized over ``axis_name``.

    ``use_fast_variance`` and ``force_float32_reductions`` are accepted for compatibility and have no effect:
    statistics are always computed in float32 or wider with the stable (shifted, no-cancellation) variance (Flax's
    ``use_fast_variance=False`` variant).

    Attributes:
      epsilon: a small float added to the variance.
      dtype: the output dtype (default: promoted from the input, scale and bias, as in Flax).
      param_dtype: the dtype of ``scale`` and ``bias``.
      use_bias: add a learned bias :math:`\beta`.
      use_scale: multiply by a learned scale :math:`\gamma`.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      feature_axes: the channel axes (not 0); ``scale`` and ``bias`` have their shape.
      axis_name: name(s) of a mapped axis over which the statistics are also computed.
      axis_index_groups: groups of indices along ``axis_name``.
      use_fast_variance: accepted for Flax compatibility; ignored.
      force_float32_reductions: accepted for Flax compatibility; ignored.
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once, to
        ``dtype``; a dtype rounds the normalized values to it before the affine, which then runs in the
        promotion of it and ``param_dtype`` (HF Llama: the input dtype; see the numerics guide).
      scale_offset: a constant :math:`c` added to ``scale`` in float32 or wider, :math:`\gamma + c`: ``1.0``
        for a zero-centered scale (Gemma's :math:`1 + \gamma`). The stored ``scale`` is then :math:`\gamma`:
        initialize it at :math:`1 - c` (``scale_init=nn.initializers.zeros`` for ``1.0``) for an identity start.
      zero_masked_outputs: output 0 where ``mask`` is False; no effect without a mask.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normjax import linen as njn
      >>> x = jnp.array([[[1.0, 10.0], [3.0, 30.0]]])  # (N=1, L=2, C=2)
      >>> inorm = njn.InstanceNorm(epsilon=1e-12)
      >>> inorm.apply(inorm.init(jax.random.key(0), x), x).tolist()
      [[[-1.0, -1.0], [1.0, 1.0]]]

    References:
      Ulyanov, Vedaldi & Lempitsky, "Instance Normalization: The Missing Ingredient for Fast Stylization",
      arXiv:1607.08022, 2016.
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    normalized_dtype: Dtype | None = None
    scale_offset: float = 0.0
    zero_masked_outputs: bool = False

    @nn.compact
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
        return common.apply_per_example(
            "instance_norm", "InstanceNorm", x, _affine(self, scale, bias), feature_axes=self.feature_axes,
            epsilon=self.epsilon, mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=self.dtype, initializing=self.is_initializing(), normalized_dtype=self.normalized_dtype,
            scale_offset=self.scale_offset, zero_masked_outputs=self.zero_masked_outputs,
        )  # fmt: skip
