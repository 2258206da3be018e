"""Equinox's normalization conventions, translated into calls of normjax's functions.

Each layer is an ``eqx.Module`` written for one example, as Equinox's are: the caller maps it over the batch
with ``jax.vmap`` (BatchNorm names that axis in ``axis_name``), the conv norms take channels first, BatchNorm's
running statistics live in an ``eqx.nn.State`` behind an ``eqx.nn.StateIndex``, and ``eqx.nn.inference_mode``
flips the ``inference`` field. The layers hold parameters and configuration only; every statistic and every
normalization is computed by :func:`normjax.batch_norm`, :func:`normjax.layer_norm`, :func:`normjax.rms_norm`,
:func:`normjax.group_norm` and :func:`normjax.instance_norm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from normjax._src import arguments
from normjax._src.batch_norm import batch_norm
from normjax._src.example_norms import gated_rms_norm, group_norm, instance_norm, layer_norm, rms_norm
from normjax._src.optional_dependencies import import_optional
from normjax._src.state import BatchNormState, init_batch_norm_state
from normjax._src.typing import AxisName

eqx = import_optional(
    "equinox", needed_by="normjax.equinox"
)  # an optional dependency: `import normjax` alone never needs it


def _param_dtype(dtype) -> jnp.dtype:
    """Equinox's parameter dtype: ``dtype``, or the default float (float32, float64 with ``jax_enable_x64``)."""
    return jnp.zeros((), dtype).dtype


def _static_flag(flag):
    """``flag`` as a Python bool when it is known at trace time, else the traced boolean itself.

    ``inference`` is an ordinary (non-static) field, as in Equinox, so ``jax.device_put`` or a plain
    ``jax.jit`` of the module turns it into an array; a concrete one is read, a traced one selects with
    ``lax.cond``.
    """
    try:
        return bool(flag)
    except jax.errors.ConcretizationTypeError:  # TracerBoolConversionError is one
        return flag


def _initial_weight(shape, dtype, scale_offset: float) -> jax.Array:
    """The weight at which ``weight + scale_offset`` is 1: ones, or zeros for a zero-centered weight."""
    return jnp.full(shape, 1.0 - scale_offset, dtype)


def _affine(layer: eqx.Module, weight, bias, flag: str) -> tuple[jax.Array | None, jax.Array | None]:
    """The ``(weight, bias)`` a call uses: the layer's own, or those given at call time (conditional norms)."""
    name = type(layer).__name__
    return (
        arguments.call_time_param(layer.weight, weight, "weight", name, flag.format("weight")),
        arguments.call_time_param(layer.bias, bias, "bias", name, flag.format("bias")),
    )


def _per_example_error(layer: str, expected: str, shape: tuple[int, ...], fix: str) -> ValueError:
    return ValueError(
        f"{layer} is applied to one example at a time and expects x of shape {expected}, got {shape}. {fix}"
    )


class BatchNorm(eqx.nn.StatefulLayer):
    r"""Batch Normalization (Ioffe & Szegedy, 2015) for Equinox, synchronized over ``axis_name``.

    .. math::

        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta, \qquad
        \hat\mu \leftarrow m\,\hat\mu + (1 - m)\,\mu_B, \qquad
        \hat\sigma^2 \leftarrow m\,\hat\sigma^2 + (1 - m)\,\sigma_B^2

    In training, :math:`\mu, \sigma^2` are the batch statistics :math:`\mu_B, \sigma_B^2` of each channel over
    the spatial axes and every example of the mapped axes named by ``axis_name``, and the running statistics
    are updated; in inference they are the running statistics, and the state is returned unchanged.

    Called like :class:`equinox.nn.BatchNorm`, per example under ``jax.vmap(..., axis_name=...)`` (or
    ``pmap``/``shard_map``), with ``x`` of shape ``(input_size, *spatial)``, returning ``(y, state)``; it
    computes the same training outputs and running statistics as Equinox's ``mode="batch"``. The differences
    are where Equinox's layer is wrong:

    - there is one mode, the batch statistics in training; ``mode="ema"`` (normalizing with running statistics
      while training, Equinox's default) is refused;
    - the running statistics start at mean 0 and variance 1 and are used as they are in inference, as in Flax
      and PyTorch (Equinox divides them by :math:`1 - m^t`, which is right for the mean but, for a variance
      that starts at 1, adds :math:`m^t / (1 - m^t)`: 99 after one step with ``momentum=0.99``);
    - statistics are computed in float32 or wider whatever the input dtype, and the running statistics are
      kept in at least float32;
    - synchronized statistics are exact for uneven counts: ``mask=False`` leaves an example (or any element)
      out of the statistics, e.g. the padding of a ragged last batch;
    - ``axis_name`` is a static field, so every leaf of the module is a JAX type (``jax.device_put`` and
      ``jax.jit`` of the module work), and ``inference`` may be a traced boolean.

    Args:
      input_size: the number of channels, ``x.shape[0]``.
      axis_name: the name(s) of the mapped axes the batch statistics are computed over: the ``jax.vmap`` axis
        of the per-example call, and any ``pmap``/``shard_map`` device axes (e.g. ``("devices", "batch")``).
      eps: a small positive number added to the variance.
      channelwise_affine: learn a per-channel scale ``weight`` (:math:`\gamma`) and shift ``bias``
        (:math:`\beta`).
      momentum: weight of the old running value in the update, in [0, 1] (PyTorch's 0.1 is 0.9 here).
      inference: use the running statistics (True) or the batch statistics (False); set by
        :func:`equinox.nn.inference_mode`, overridden by the call's ``inference``.
      dtype: the dtype of ``weight`` and ``bias`` (default float32, or float64 with ``jax_enable_x64``); the
        running statistics use it too, but at least float32.
      mode: ``"batch"``, the only mode (accepted for compatibility with Equinox's argument).
      renorm_clipping: Batch Renormalization (Ioffe, 2017): ``(r_max, d_max)`` corrects the training output
        towards the running statistics (see :func:`normjax.batch_norm`).
      renorm_warmup_steps: train as plain BatchNorm for this many updating steps before ``renorm_clipping``
        applies (CrossQ: 100000); the state's :class:`normjax.BatchNormState` then carries a step ``count``,
        which it holds only in that case (``count=None`` otherwise).
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once, to
        ``x``'s dtype (float32 for an 8-bit float ``x``); a dtype rounds the normalized values to it before the
        affine, which then runs in the promotion of it and ``dtype`` (HF Llama: the input dtype; see the
        numerics guide).
      scale_offset: a constant :math:`c` added to ``weight`` in float32 or wider, :math:`\gamma + c`: ``1.0``
        for a zero-centered weight (Gemma's :math:`1 + \gamma`). The ``weight`` starts at :math:`1 - c` (zeros
        for ``1.0``), so the layer starts as the identity affine whatever the offset.
      zero_masked_outputs: output 0 where the call's ``mask`` is False (in training and inference); no effect
        without a mask.

    Example:
      >>> import equinox as eqx, jax, jax.numpy as jnp
      >>> import normjax.equinox as nqx
      >>> bn, state = eqx.nn.make_with_state(nqx.BatchNorm)(2, "batch", momentum=0.9)
      >>> batch_bn = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = batch_bn(jnp.array([[0.0, 10.0], [2.0, 30.0]]), state)
      >>> y.round(3).tolist()
      [[-1.0, -1.0], [1.0, 1.0]]
      >>> state.get(bn.state_index).mean.tolist()
      [0.10000000149011612, 2.0]

    References:
      Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
      Covariate Shift", ICML 2015.
    """

    weight: jax.Array | None
    bias: jax.Array | None
    state_index: eqx.nn.StateIndex[BatchNormState]
    inference: bool
    input_size: int = eqx.field(static=True)
    axis_name: AxisName = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    mode: Literal["batch"] = eqx.field(static=True)
    renorm_clipping: tuple[float, float] | None = eqx.field(static=True)
    renorm_warmup_steps: int = eqx.field(static=True)
    normalized_dtype: object = eqx.field(static=True)
    scale_offset: float = eqx.field(static=True)
    zero_masked_outputs: bool = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: AxisName,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype=None,
        mode: Literal["batch"] = "batch",
        *,
        renorm_clipping: tuple[float, float] | None = None,
        renorm_warmup_steps: int = 0,
        normalized_dtype=None,
        scale_offset: float = 0.0,
        zero_masked_outputs: bool = False,
    ):
        if mode != "batch":
            raise ValueError(
                f"BatchNorm got mode={mode!r}; normjax's BatchNorm has one mode, 'batch': batch statistics in "
                "training, running statistics in inference. Equinox's 'ema' mode normalizes with the running "
                "statistics while training, which makes training unstable; drop `mode` or pass mode='batch'."
            )
        dtype = _param_dtype(dtype)
        self.weight = _initial_weight((input_size,), dtype, scale_offset) if channelwise_affine else None
        self.bias = jnp.zeros((input_size,), dtype) if channelwise_affine else None
        running = init_batch_norm_state(input_size, jnp.promote_types(dtype, jnp.float32))
        self.state_index = eqx.nn.StateIndex(running if renorm_warmup_steps else running._replace(count=None))
        self.inference = inference
        self.input_size = input_size
        # static, so hashable: a list of names (Equinox accepts any sequence) becomes a tuple
        self.axis_name = tuple(axis_name) if isinstance(axis_name, list) else axis_name
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.mode = mode
        self.renorm_clipping = None if renorm_clipping is None else tuple(renorm_clipping)
        self.renorm_warmup_steps = renorm_warmup_steps
        self.normalized_dtype = normalized_dtype
        self.scale_offset = scale_offset
        self.zero_masked_outputs = zero_masked_outputs

    @jax.named_scope("normjax.equinox.BatchNorm")
    def __call__(
        self,
        x: jax.Array,
        state: eqx.nn.State,
        *,
        key: jax.Array | None = None,
        inference: bool | None = None,
        mask: jax.Array | None = None,
        weight: jax.Array | None = None,
        bias: jax.Array | None = None,
    ) -> tuple[jax.Array, eqx.nn.State]:
        r"""Normalizes one example; returns ``(y, state)`` with the running statistics updated in training.

        Args:
          x: one example, shape ``(input_size, *spatial)``.
          state: the :class:`equinox.nn.State` holding the running statistics (``state.get(self.state_index)``
            is a :class:`normjax.BatchNormState`).
          key: ignored; accepted as by every Equinox layer.
          inference: overrides ``self.inference`` when not None.
          mask: optional boolean broadcastable to ``x``; False elements are left out of the batch statistics
            (a scalar False leaves the whole example out, e.g. padding). In inference it only matters with
            ``zero_masked_outputs``.
          weight: a call-time :math:`\gamma` (conditional normalization: AdaLN, FiLM, class-conditional gains), of
            shape ``(input_size,)`` or broadcastable to ``x``; only for a layer built without one.
          bias: a call-time :math:`\beta`, likewise.

        Returns:
          ``(y, state)``: ``y`` of ``x``'s shape and dtype, and the new state.
        """
        del key
        if jnp.ndim(x) == 0 or x.shape[0] != self.input_size:
            raise _per_example_error(
                "BatchNorm",
                f"({self.input_size}, *spatial) (channels first)",
                jnp.shape(x),
                "Map it over the batch with `jax.vmap(bn, axis_name=...)`, and put the channels first.",
            )
        inference = _static_flag(self.inference if inference is None else inference)
        running = state.get(self.state_index)
        weight, bias = _affine(self, weight, bias, "channelwise_affine")

        def normalize(training: bool) -> tuple[jax.Array, BatchNormState]:
            return batch_norm(
                x, running, weight, bias, training=training, momentum=self.momentum, epsilon=self.eps,
                axis=0, axis_name=self.axis_name, mask=None if mask is None else jnp.asarray(mask, bool),
                renorm_clipping=self.renorm_clipping, renorm_warmup_steps=self.renorm_warmup_steps,
                normalized_dtype=self.normalized_dtype, scale_offset=self.scale_offset,
                zero_masked_outputs=self.zero_masked_outputs,
            )  # fmt: skip

        if isinstance(inference, bool):
            y, new_running = normalize(training=not inference)
            if inference:
                return y, state
        else:
            y, new_running = jax.lax.cond(inference, lambda: normalize(False), lambda: normalize(True))
        return y, state.set(self.state_index, new_running)


class LayerNorm(eqx.Module):
    r"""Layer Normalization (Ba, Kiros & Hinton, 2016) over a whole example, as :class:`equinox.nn.LayerNorm`.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\,\gamma + \beta

    with the statistics over every element of ``x`` (to normalize over the last axes only, ``jax.vmap`` over
    the others) and :math:`\gamma, \beta` of ``x``'s shape. Same arguments and results as Equinox's layer.

    Args:
      shape: the shape of one input.
      eps: a small positive number added to the variance.
      use_weight: learn an elementwise scale ``weight``.
      use_bias: learn an elementwise shift ``bias``.
      dtype: the dtype of ``weight`` and ``bias`` (default float32, or float64 with ``jax_enable_x64``).
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once, to
        ``x``'s dtype (float32 for an 8-bit float ``x``); a dtype rounds the normalized values to it before the
        affine, which then runs in the promotion of it and ``dtype`` (HF Llama: the input dtype; see the
        numerics guide).
      elementwise_affine: Equinox's deprecated alias setting both ``use_weight`` and ``use_bias``.
      scale_offset: a constant :math:`c` added to ``weight`` in float32 or wider, :math:`\gamma + c`: ``1.0``
        for a zero-centered weight (Gemma's :math:`1 + \gamma`). The ``weight`` starts at :math:`1 - c` (zeros
        for ``1.0``), so the layer starts as the identity affine whatever the offset.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax.equinox as nqx
      >>> nqx.LayerNorm(2, eps=1e-12)(jnp.array([1.0, 3.0])).tolist()
      [-1.0, 1.0]

    References:
      Ba, Kiros & Hinton, "Layer Normalization", arXiv:1607.06450, 2016.
    """

    shape: tuple[int, ...] = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    normalized_dtype: object = eqx.field(static=True)
    use_weight: bool = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    scale_offset: float = eqx.field(static=True)
    weight: jax.Array | None
    bias: jax.Array | None

    def __init__(
        self,
        shape: int | Sequence[int],
        eps: float = 1e-5,
        use_weight: bool = True,
        use_bias: bool = True,
        dtype=None,
        *,
        elementwise_affine: bool | None = None,
        normalized_dtype=None,
        scale_offset: float = 0.0,
    ):
        if elementwise_affine is not None:
            use_weight = use_bias = elementwise_affine
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.eps = eps
        self.normalized_dtype = normalized_dtype
        self.use_weight = use_weight
        self.use_bias = use_bias
        self.scale_offset = scale_offset
        dtype = _param_dtype(dtype)
        self.weight = _initial_weight(self.shape, dtype, scale_offset) if use_weight else None
        self.bias = jnp.zeros(self.shape, dtype) if use_bias else None

    @jax.named_scope("normjax.equinox.LayerNorm")
    def __call__(
        self,
        x: jax.Array,
        state: eqx.nn.State | None = None,
        *,
        key: jax.Array | None = None,
        weight: jax.Array | None = None,
        bias: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, eqx.nn.State]:
        r"""Normalizes one example of shape ``shape``; returns ``y`` (and ``state`` unchanged, if given).

        Args:
          x: one example, of shape ``shape``.
          state: passed through unchanged, if given.
          key: ignored; accepted as by every Equinox layer.
          weight: a call-time :math:`\gamma` (conditional normalization: AdaLN, FiLM, class-conditional gains), of
            the shape of the layer's own; only for a layer built without one.
          bias: a call-time :math:`\beta`, likewise.
        """
        del key
        if jnp.shape(x) != self.shape:
            raise _per_example_error(
                "LayerNorm", f"shape={self.shape}", jnp.shape(x), "Apply it per example with `jax.vmap(layer)(x)`."
            )
        weight, bias = _affine(self, weight, bias, "use_{}")
        y = layer_norm(
            x, weight, bias, reduction_axes=tuple(range(x.ndim)), epsilon=self.eps,
            normalized_dtype=self.normalized_dtype, scale_offset=self.scale_offset,
        )  # fmt: skip
        return y if state is None else (y, state)


class RMSNorm(eqx.Module):
    r"""Root Mean Square Layer Normalization (Zhang & Sennrich, 2019) over a whole example, as
    :class:`equinox.nn.RMSNorm`.

    .. math::

        y = \frac{x}{\sqrt{\frac{1}{n}\sum_i x_i^2 + \epsilon}}\,\gamma + \beta

    over every element of ``x``, with :math:`\gamma, \beta` of ``x``'s shape. Same arguments and results as
    Equinox's layer (which has the optional shift :math:`\beta` too).

    Args:
      shape: the shape of one input.
      eps: a small positive number added to the mean square.
      use_weight: learn an elementwise scale ``weight``.
      use_bias: learn an elementwise shift ``bias``.
      dtype: the dtype of ``weight`` and ``bias`` (default float32, or float64 with ``jax_enable_x64``).
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once, to
        ``x``'s dtype (float32 for an 8-bit float ``x``); a dtype rounds the normalized values to it before the
        affine, which then runs in the promotion of it and ``dtype`` (HF Llama: the input dtype; see the
        numerics guide).
      scale_offset: a constant :math:`c` added to ``weight`` in float32 or wider, :math:`\gamma + c`: ``1.0``
        for a zero-centered weight (Gemma's :math:`1 + \gamma`). The ``weight`` starts at :math:`1 - c` (zeros
        for ``1.0``), so the layer starts as the identity affine whatever the offset.
      norm_before_gate: with a call-time ``gate`` :math:`z`, normalize then gate (True, Qwen3-Next), or gate then
        normalize (False, Mamba-2); see :func:`normjax.gated_rms_norm`.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax.equinox as nqx
      >>> nqx.RMSNorm(2, eps=1e-12)(jnp.array([3.0, -3.0])).tolist()
      [1.0, -1.0]

    References:
      Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """

    shape: tuple[int, ...] = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    normalized_dtype: object = eqx.field(static=True)
    use_weight: bool = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    scale_offset: float = eqx.field(static=True)
    norm_before_gate: bool = eqx.field(static=True)
    weight: jax.Array | None
    bias: jax.Array | None

    def __init__(
        self,
        shape: int | Sequence[int],
        eps: float = 1e-5,
        use_weight: bool = True,
        use_bias: bool = True,
        dtype=None,
        *,
        normalized_dtype=None,
        scale_offset: float = 0.0,
        norm_before_gate: bool = True,
    ):
        self.norm_before_gate = norm_before_gate
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.eps = eps
        self.normalized_dtype = normalized_dtype
        self.use_weight = use_weight
        self.use_bias = use_bias
        self.scale_offset = scale_offset
        dtype = _param_dtype(dtype)
        self.weight = _initial_weight(self.shape, dtype, scale_offset) if use_weight else None
        self.bias = jnp.zeros(self.shape, dtype) if use_bias else None

    @jax.named_scope("normjax.equinox.RMSNorm")
    def __call__(
        self,
        x: jax.Array,
        state: eqx.nn.State | None = None,
        *,
        key: jax.Array | None = None,
        weight: jax.Array | None = None,
        bias: jax.Array | None = None,
        gate: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, eqx.nn.State]:
        r"""Normalizes one example of shape ``shape``; returns ``y`` (and ``state`` unchanged, if given).

        Args:
          x: one example, of shape ``shape``.
          state: passed through unchanged, if given.
          key: ignored; accepted as by every Equinox layer.
          weight: a call-time :math:`\gamma` (conditional normalization: AdaLN, FiLM, class-conditional gains), of
            the shape of the layer's own; only for a layer built without one.
          bias: a call-time :math:`\beta`, likewise.
          gate: optional gate :math:`z` of ``x``'s shape: gated RMSNorm (see ``norm_before_gate``).
        """
        del key
        if jnp.shape(x) != self.shape:
            raise _per_example_error(
                "RMSNorm", f"shape={self.shape}", jnp.shape(x), "Apply it per example with `jax.vmap(layer)(x)`."
            )
        weight, bias = _affine(self, weight, bias, "use_{}")
        options = dict(
            reduction_axes=tuple(range(x.ndim)),
            epsilon=self.eps,
            normalized_dtype=self.normalized_dtype,
            scale_offset=self.scale_offset,
        )
        if gate is None:
            y = rms_norm(x, weight, bias, **options)
        else:
            y = gated_rms_norm(x, gate, weight, bias, norm_before_gate=self.norm_before_gate, **options)
        return y if state is None else (y, state)


class GroupNorm(eqx.Module):
    r"""Group Normalization (Wu & He, 2018) of one channels-first example, as :class:`equinox.nn.GroupNorm`.

    The channels (axis 0 of ``x``, shape ``(channels, *spatial)``) are split into ``groups`` contiguous groups;
    each group is standardized over its channels and the spatial axes, then the per-channel affine is applied:

    .. math::

        y_{g} = \frac{x_{g} - \mathrm{E}[x_{g}]}{\sqrt{\mathrm{Var}[x_{g}] + \epsilon}}\,\gamma + \beta

    One group is LayerNorm over channels and space; one channel per group is :class:`InstanceNorm`. Same
    arguments and results as Equinox's layer.

    Args:
      groups: the number of groups; must divide the number of channels.
      channels: the number of channels; needed when ``channelwise_affine``.
      eps: a small positive number added to the variance.
      channelwise_affine: learn a per-channel scale ``weight`` and shift ``bias``.
      dtype: the dtype of ``weight`` and ``bias`` (default float32, or float64 with ``jax_enable_x64``).
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once, to
        ``x``'s dtype (float32 for an 8-bit float ``x``); a dtype rounds the normalized values to it before the
        affine, which then runs in the promotion of it and ``dtype`` (HF Llama: the input dtype; see the
        numerics guide).
      scale_offset: a constant :math:`c` added to ``weight`` in float32 or wider, :math:`\gamma + c`: ``1.0``
        for a zero-centered weight (Gemma's :math:`1 + \gamma`). The ``weight`` starts at :math:`1 - c` (zeros
        for ``1.0``), so the layer starts as the identity affine whatever the offset.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax.equinox as nqx
      >>> nqx.GroupNorm(2, 4, eps=1e-12)(jnp.array([1.0, 3.0, 10.0, 30.0])).tolist()
      [-1.0, 1.0, -1.0, 1.0]

    References:
      Wu & He, "Group Normalization", ECCV 2018.
    """

    groups: int = eqx.field(static=True)
    channels: int | None = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    normalized_dtype: object = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    scale_offset: float = eqx.field(static=True)
    weight: jax.Array | None
    bias: jax.Array | None

    def __init__(
        self,
        groups: int,
        channels: int | None = None,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        dtype=None,
        *,
        normalized_dtype=None,
        scale_offset: float = 0.0,
    ):
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"GroupNorm got groups={groups!r}; pass a positive int number of groups.")
        if channels is not None and channels % groups:
            raise ValueError(
                f"GroupNorm got groups={groups} and channels={channels}: the groups must divide the channels. "
                f"Choose groups among the divisors of {channels}."
            )
        if channels is None and channelwise_affine:
            raise ValueError(
                "GroupNorm needs `channels` to create its per-channel weight and bias (channelwise_affine=True); "
                "pass channels=..., or channelwise_affine=False."
            )
        self.groups = groups
        self.channels = channels
        self.eps = eps
        self.normalized_dtype = normalized_dtype
        self.channelwise_affine = channelwise_affine
        self.scale_offset = scale_offset
        dtype = _param_dtype(dtype)
        self.weight = _initial_weight((channels,), dtype, scale_offset) if channelwise_affine else None
        self.bias = jnp.zeros((channels,), dtype) if channelwise_affine else None

    @jax.named_scope("normjax.equinox.GroupNorm")
    def __call__(
        self,
        x: jax.Array,
        state: eqx.nn.State | None = None,
        *,
        key: jax.Array | None = None,
        weight: jax.Array | None = None,
        bias: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, eqx.nn.State]:
        r"""Normalizes one example ``(channels, *spatial)``; returns ``y`` (and ``state`` unchanged, if given).

        Args:
          x: one example, ``(channels, *spatial)``.
          state: passed through unchanged, if given.
          key: ignored; accepted as by every Equinox layer.
          weight: a call-time :math:`\gamma` (conditional normalization: AdaLN, FiLM, class-conditional gains), shape
            ``(channels,)``; only for a layer built without one.
          bias: a call-time :math:`\beta`, likewise.
        """
        del key
        channels = "channels" if self.channels is None else self.channels
        if jnp.ndim(x) == 0 or (self.channels is not None and x.shape[0] != self.channels):
            raise _per_example_error(
                "GroupNorm",
                f"({channels}, *spatial) (channels first)",
                jnp.shape(x),
                "Map it over the batch with `jax.vmap(layer)(x)`, and put the channels first.",
            )
        weight, bias = _affine(self, weight, bias, "channelwise_affine")
        y = group_norm(
            x[None], weight, bias, num_groups=self.groups, feature_axes=1, epsilon=self.eps,
            normalized_dtype=self.normalized_dtype, scale_offset=self.scale_offset,
        )[0]  # fmt: skip
        return y if state is None else (y, state)


class InstanceNorm(eqx.Module):
    r"""Instance Normalization (Ulyanov, Vedaldi & Lempitsky, 2016) of one channels-first example.

    .. math::

        y_{c} = \frac{x_{c} - \mathrm{E}[x_{c}]}{\sqrt{\mathrm{Var}[x_{c}] + \epsilon}}\,\gamma_c + \beta_c

    with the statistics of each channel over the spatial axes of ``x`` (shape ``(channels, *spatial)``).
    Equinox has no InstanceNorm; this one follows its :class:`equinox.nn.GroupNorm` conventions and equals
    ``GroupNorm(groups=channels, channels=channels)``.

    Args:
      channels: the number of channels, ``x.shape[0]``.
      eps: a small positive number added to the variance.
      channelwise_affine: learn a per-channel scale ``weight`` and shift ``bias``.
      dtype: the dtype of ``weight`` and ``bias`` (default float32, or float64 with ``jax_enable_x64``).
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once, to
        ``x``'s dtype (float32 for an 8-bit float ``x``); a dtype rounds the normalized values to it before the
        affine, which then runs in the promotion of it and ``dtype`` (HF Llama: the input dtype; see the
        numerics guide).
      scale_offset: a constant :math:`c` added to ``weight`` in float32 or wider, :math:`\gamma + c`: ``1.0``
        for a zero-centered weight (Gemma's :math:`1 + \gamma`). The ``weight`` starts at :math:`1 - c` (zeros
        for ``1.0``), so the layer starts as the identity affine whatever the offset.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax.equinox as nqx
      >>> nqx.InstanceNorm(2, eps=1e-12)(jnp.array([[1.0, 3.0], [10.0, 30.0]])).tolist()
      [[-1.0, 1.0], [-1.0, 1.0]]

    References:
      Ulyanov, Vedaldi & Lempitsky, "Instance Normalization: The Missing Ingredient for Fast Stylization",
      arXiv:1607.08022, 2016.
    """

    channels: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    normalized_dtype: object = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    scale_offset: float = eqx.field(static=True)
    weight: jax.Array | None
    bias: jax.Array | None

    def __init__(
        self,
        channels: int,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        dtype=None,
        *,
        normalized_dtype=None,
        scale_offset: float = 0.0,
    ):
        self.channels = channels
        self.eps = eps
        self.normalized_dtype = normalized_dtype
        self.channelwise_affine = channelwise_affine
        self.scale_offset = scale_offset
        dtype = _param_dtype(dtype)
        self.weight = _initial_weight((channels,), dtype, scale_offset) if channelwise_affine else None
        self.bias = jnp.zeros((channels,), dtype) if channelwise_affine else None

    @jax.named_scope("normjax.equinox.InstanceNorm")
    def __call__(
        self,
        x: jax.Array,
        state: eqx.nn.State | None = None,
        *,
        key: jax.Array | None = None,
        weight: jax.Array | None = None,
        bias: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, eqx.nn.State]:
        r"""Normalizes one example ``(channels, *spatial)``; returns ``y`` (and ``state`` unchanged, if given).

        Args:
          x: one example, ``(channels, *spatial)``.
          state: passed through unchanged, if given.
          key: ignored; accepted as by every Equinox layer.
          weight: a call-time :math:`\gamma` (conditional normalization: AdaLN, FiLM, class-conditional gains), shape
            ``(channels,)``; only for a layer built without one.
          bias: a call-time :math:`\beta`, likewise.
        """
        del key
        if jnp.ndim(x) < 2 or x.shape[0] != self.channels:
            raise _per_example_error(
                "InstanceNorm",
                f"({self.channels}, *spatial) with at least one spatial axis (channels first)",
                jnp.shape(x),
                "Map it over the batch with `jax.vmap(layer)(x)`; each channel is normalized over its spatial "
                "axes, so a single value per channel has nothing to normalize over.",
            )
        weight, bias = _affine(self, weight, bias, "channelwise_affine")
        y = instance_norm(
            x[None], weight, bias, feature_axes=1, epsilon=self.eps, normalized_dtype=self.normalized_dtype,
            scale_offset=self.scale_offset,
        )[0]  # fmt: skip
        return y if state is None else (y, state)
