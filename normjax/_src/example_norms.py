"""LayerNorm, RMSNorm, GroupNorm and InstanceNorm: the norms whose statistics are per example."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from normjax._src import dtypes
from normjax._src.boundary import named_scope, renamed_keywords
from normjax._src.spec import NormSpec, norm_spec
from normjax._src.standardize import standardize
from normjax._src.typing import ArrayLike, Axes, AxisIndexGroups, AxisName, DTypeLike


@renamed_keywords(axis="reduction_axes")
@named_scope("layer_norm")
def layer_norm(
    x: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    reduction_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: ArrayLike | None = None,
    feature_axes: Axes | None = None,
    axis_name: AxisName = None,
    axis_index_groups: AxisIndexGroups = None,
    dtype: DTypeLike | None = None,
    normalized_dtype: DTypeLike | None = None,
    scale_offset: float = 0.0,
    zero_masked_outputs: bool = False,
) -> jax.Array:
    r"""Layer Normalization (Ba, Kiros & Hinton, 2016): standardize each example over ``reduction_axes``.

    .. math::

        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta, \qquad
        \mu, \sigma^2 \text{ over the axes } \texttt{reduction\_axes} \text{ of each example}

    Args:
      x: the input, e.g. ``(N, T, D)``.
      scale: optional :math:`\gamma`, of the shape of ``x`` along ``feature_axes``, or per example:
        of ``x``'s rank, broadcastable to ``x`` (e.g. ``(N, 1, D)`` for ``(N, T, D)``: AdaLN, FiLM).
      bias: optional :math:`\beta`, likewise.
      reduction_axes: the normalized axis or axes.
      epsilon: a small positive number added to the variance.
      mask: optional boolean array broadcastable to ``x``; False elements are ignored by the statistics.
      feature_axes: the axes ``scale`` and ``bias`` run along; defaults to ``reduction_axes``.
      axis_name: optional mapped axis over which the statistics are also reduced.
      axis_index_groups: optional groups along ``axis_name``.
      dtype: the output dtype; defaults to ``x``'s (float32 for an 8-bit float ``x``).
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once;
        a dtype rounds :math:`\hat x` to it before the affine, which then runs in the promotion of it and the
        parameters' dtypes (HF Llama: the input dtype; see the numerics guide).
      scale_offset: a constant :math:`c` added to ``scale`` in float32 or wider, :math:`\gamma + c`:
        ``1.0`` for a zero-centered scale (Gemma's :math:`1 + \gamma`, with ``scale`` initialized at 0).
      zero_masked_outputs: output 0 where ``mask`` is False (else those positions are standardized with the
        valid elements' statistics, as in Flax); no effect without a mask.

    Returns:
      The normalized array, in ``dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> normjax.layer_norm(jnp.array([[1.0, 3.0], [10.0, 30.0]]), epsilon=1e-12).tolist()
      [[-1.0, 1.0], [-1.0, 1.0]]

    References:
      Ba, Kiros & Hinton, "Layer Normalization", arXiv:1607.06450, 2016.
    """
    return _per_example("layer_norm", **locals())  # every argument of this call, by name


@renamed_keywords(axis="reduction_axes")
@named_scope("rms_norm")
def rms_norm(
    x: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    reduction_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: ArrayLike | None = None,
    feature_axes: Axes | None = None,
    axis_name: AxisName = None,
    axis_index_groups: AxisIndexGroups = None,
    dtype: DTypeLike | None = None,
    normalized_dtype: DTypeLike | None = None,
    scale_offset: float = 0.0,
    zero_masked_outputs: bool = False,
) -> jax.Array:
    r"""Root Mean Square Layer Normalization (Zhang & Sennrich, 2019): rescale without centering.

    .. math::

        y = \frac{x}{\sqrt{\frac{1}{n}\sum_i x_i^2 + \epsilon}}\,\gamma + \beta

    Args:
      x: the input.
      scale: optional :math:`\gamma`, of the shape of ``x`` along ``feature_axes``, or per example:
        of ``x``'s rank, broadcastable to ``x`` (e.g. ``(N, 1, D)`` for ``(N, T, D)``: AdaLN, FiLM).
      bias: optional :math:`\beta` (Equinox's RMSNorm has one; most others do not), likewise.
      reduction_axes: the normalized axis or axes.
      epsilon: a small positive number added to the mean square.
      mask: optional boolean array broadcastable to ``x``.
      feature_axes: the axes ``scale`` and ``bias`` run along; defaults to ``reduction_axes``.
      axis_name: optional mapped axis over which the statistics are also reduced.
      axis_index_groups: optional groups along ``axis_name``.
      dtype: the output dtype; defaults to ``x``'s (float32 for an 8-bit float ``x``).
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once;
        a dtype rounds :math:`\hat x` to it before the affine, which then runs in the promotion of it and the
        parameters' dtypes (HF Llama: the input dtype; see the numerics guide).
      scale_offset: a constant :math:`c` added to ``scale`` in float32 or wider, :math:`\gamma + c`:
        ``1.0`` for a zero-centered scale (Gemma's :math:`1 + \gamma`, with ``scale`` initialized at 0).
      zero_masked_outputs: output 0 where ``mask`` is False (else those positions are standardized with the
        valid elements' statistics, as in Flax); no effect without a mask.

    Returns:
      The normalized array, in ``dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> normjax.rms_norm(jnp.array([[3.0, -3.0]]), epsilon=1e-12).tolist()
      [[1.0, -1.0]]

    References:
      Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """
    return _per_example("rms_norm", **locals())  # every argument of this call, by name


@renamed_keywords(axis="reduction_axes")
@named_scope("gated_rms_norm")
def gated_rms_norm(
    x: ArrayLike,
    gate: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    norm_before_gate: bool = True,
    reduction_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: ArrayLike | None = None,
    feature_axes: Axes | None = None,
    axis_name: AxisName = None,
    axis_index_groups: AxisIndexGroups = None,
    dtype: DTypeLike | None = None,
    normalized_dtype: DTypeLike | None = None,
    scale_offset: float = 0.0,
    zero_masked_outputs: bool = False,
) -> jax.Array:
    r"""Gated RMSNorm (Mamba-2, Qwen3-Next): :func:`rms_norm` and a SiLU gate, in either order.

    .. math::

        \text{norm\_before\_gate:}\quad y = \bigl(\mathrm{RMSNorm}(x)\,\gamma + \beta\bigr) \cdot
        \mathrm{silu}(z), \qquad
        \text{otherwise:}\quad y = \mathrm{RMSNorm}\bigl(x \cdot \mathrm{silu}(z)\bigr)\,\gamma + \beta

    Qwen3-Next's ``RMSNormGated`` normalizes, then gates (``norm_before_gate=True``, the default, as in
    ``mamba_ssm``'s ``RMSNorm``, whose reference places the bias as above); Mamba-2's mixer gates, then
    normalizes (``norm_before_gate=False``). The gate, the product and the normalization run in float32 or wider;
    the output is rounded once, to ``dtype``. With ``normalized_dtype=x.dtype`` and ``norm_before_gate=True`` the
    order is Qwen3-Next's: ``weight * x_hat.to(input_dtype)``, then the gate in float32.

    Args:
      x: the input, e.g. ``(N, T, D)``.
      gate: :math:`z`, of ``x``'s shape (or broadcastable to it), any floating dtype.
      scale: optional :math:`\gamma`, of the shape of ``x`` along ``feature_axes``, or per example (see
        :func:`rms_norm`).
      bias: optional :math:`\beta`, likewise.
      norm_before_gate: normalize then gate (True), or gate then normalize (False).
      reduction_axes: the normalized axis or axes.
      epsilon: a small positive number added to the mean square.
      mask: optional boolean array broadcastable to ``x``; False elements are left out of the statistics.
      feature_axes: the axes ``scale`` runs along; defaults to ``reduction_axes``.
      axis_name: optional mapped axis over which the statistics are also reduced.
      axis_index_groups: optional groups along ``axis_name``.
      dtype: the output dtype; defaults to ``x``'s (float32 for an 8-bit float ``x``).
      normalized_dtype: the casting order of the normalization (see :func:`rms_norm`); None (default) computes
        the affine in float32.
      scale_offset: a constant added to ``scale`` (``1.0`` for a zero-centered scale).
      zero_masked_outputs: output 0 where ``mask`` is False; no effect without a mask.

    Returns:
      The gated, normalized array, in ``dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> x, z = jnp.array([[3.0, -3.0]]), jnp.array([[0.0, 40.0]])
      >>> normjax.gated_rms_norm(x, z, epsilon=1e-12).tolist()  # silu(0) = 0, silu(40) = 40
      [[0.0, -40.0]]

    References:
      Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State
      Space Duality" (Mamba-2), ICML 2024. Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """
    return _per_example("gated_rms_norm", **locals())  # every argument of this call, by name


@renamed_keywords(axis="feature_axes")
@named_scope("group_norm")
def group_norm(
    x: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    num_groups: int | None = None,
    group_size: int | None = None,
    feature_axes: Axes = -1,
    reduction_axes: Axes | None = None,
    epsilon: float = 1e-6,
    mask: ArrayLike | None = None,
    axis_name: AxisName = None,
    axis_index_groups: AxisIndexGroups = None,
    dtype: DTypeLike | None = None,
    normalized_dtype: DTypeLike | None = None,
    scale_offset: float = 0.0,
    zero_masked_outputs: bool = False,
) -> jax.Array:
    r"""Group Normalization (Wu & He, 2018): standardize groups of contiguous channels of each example.

    The channels along ``feature_axes`` are split into ``num_groups`` contiguous blocks (as in PyTorch and
    Flax); each block is standardized over its channels and ``reduction_axes`` (by default every other non-batch
    axis; axis 0 is the batch), then the per-channel affine is applied. One group is LayerNorm over channels
    and spatial axes; one channel per group is InstanceNorm.

    Args:
      x: the input with the batch on axis 0, e.g. ``(N, H, W, C)`` or ``(N, C, H, W)`` with ``feature_axes=1``.
      scale: optional per-channel :math:`\gamma`, shape ``(C,)``, or per example: of ``x``'s rank,
        broadcastable to ``x`` (e.g. ``(N, 1, 1, C)``).
      bias: optional :math:`\beta`, likewise.
      num_groups: the number of groups; give exactly one of ``num_groups`` and ``group_size``.
      group_size: the number of channels per group.
      feature_axes: the channel axis (an int, or a tuple of one).
      reduction_axes: the axes each group is standardized over, Flax's GroupNorm's: they must include the
        channel axis; default every axis but the batch axis 0.
      epsilon: a small positive number added to the variance.
      mask: optional boolean array broadcastable to ``x``.
      axis_name: optional mapped axis over which the statistics are also reduced.
      axis_index_groups: optional groups along ``axis_name``.
      dtype: the output dtype; defaults to ``x``'s (float32 for an 8-bit float ``x``).
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once;
        a dtype rounds :math:`\hat x` to it before the affine, which then runs in the promotion of it and the
        parameters' dtypes (HF Llama: the input dtype; see the numerics guide).
      scale_offset: a constant :math:`c` added to ``scale`` in float32 or wider, :math:`\gamma + c`:
        ``1.0`` for a zero-centered scale (Gemma's :math:`1 + \gamma`, with ``scale`` initialized at 0).
      zero_masked_outputs: output 0 where ``mask`` is False (else those positions are standardized with the
        valid elements' statistics, as in Flax); no effect without a mask.

    Returns:
      The normalized array, in ``dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> x = jnp.array([[1.0, 3.0, 10.0, 30.0]])
      >>> normjax.group_norm(x, num_groups=2, epsilon=1e-12).tolist()
      [[-1.0, 1.0, -1.0, 1.0]]

    References:
      Wu & He, "Group Normalization", ECCV 2018.
    """
    return _per_example("group_norm", **locals())  # every argument of this call, by name


@renamed_keywords(axis="feature_axes")
@named_scope("instance_norm")
def instance_norm(
    x: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: ArrayLike | None = None,
    axis_name: AxisName = None,
    axis_index_groups: AxisIndexGroups = None,
    dtype: DTypeLike | None = None,
    normalized_dtype: DTypeLike | None = None,
    scale_offset: float = 0.0,
    zero_masked_outputs: bool = False,
) -> jax.Array:
    r"""Instance Normalization (Ulyanov, Vedaldi & Lempitsky, 2016): per example and channel, over space.

    .. math::

        y_{n,c} = \frac{x_{n,c} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}}\,\gamma_c + \beta_c

    with the statistics over every axis but the batch (axis 0) and the channel axes ``feature_axes``.

    Args:
      x: the input with the batch on axis 0, e.g. ``(N, H, W, C)``.
      scale: optional per-channel :math:`\gamma`, shape ``(C,)``, or per example: of ``x``'s rank,
        broadcastable to ``x`` (e.g. ``(N, 1, 1, C)``).
      bias: optional :math:`\beta`, likewise.
      feature_axes: the channel axis or axes (Flax's InstanceNorm's), never the batch axis 0.
      epsilon: a small positive number added to the variance.
      mask: optional boolean array broadcastable to ``x``.
      axis_name: optional mapped axis over which the statistics are also reduced.
      axis_index_groups: optional groups along ``axis_name``.
      dtype: the output dtype; defaults to ``x``'s (float32 for an 8-bit float ``x``).
      normalized_dtype: the casting order: None (default) computes the affine in float32 and rounds once;
        a dtype rounds :math:`\hat x` to it before the affine, which then runs in the promotion of it and the
        parameters' dtypes (HF Llama: the input dtype; see the numerics guide).
      scale_offset: a constant :math:`c` added to ``scale`` in float32 or wider, :math:`\gamma + c`:
        ``1.0`` for a zero-centered scale (Gemma's :math:`1 + \gamma`, with ``scale`` initialized at 0).
      zero_masked_outputs: output 0 where ``mask`` is False (else those positions are standardized with the
        valid elements' statistics, as in Flax); no effect without a mask.

    Returns:
      The normalized array, in ``dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> x = jnp.array([[[1.0, 10.0], [3.0, 30.0]]])  # (N=1, L=2, C=2)
      >>> normjax.instance_norm(x, epsilon=1e-12).tolist()
      [[[-1.0, -1.0], [1.0, 1.0]]]

    References:
      Ulyanov, Vedaldi & Lempitsky, "Instance Normalization: The Missing Ingredient for Fast Stylization",
      arXiv:1607.08022, 2016.
    """
    return _per_example("instance_norm", **locals())  # every argument of this call, by name


def _per_example(
    norm: str, x, scale=None, bias=None, *, epsilon, mask=None, gate=None, norm_before_gate=True, **options
):
    """A per-example norm's call: its arguments checked once (:func:`norm_spec`), then :func:`per_example`."""
    spec = norm_spec(
        norm, x, scale, bias, epsilon=epsilon, mask=mask, gate=gate, norm_before_gate=norm_before_gate, **options
    )
    return per_example(spec, x, scale, bias, epsilon=epsilon, mask=mask, gate=gate, norm_before_gate=norm_before_gate)


def per_example(spec: NormSpec, x, scale, bias, *, epsilon, mask=None, gate=None, norm_before_gate=True) -> jax.Array:
    """The output of a per-example norm whose arguments :func:`norm_spec` checked (the functions' and the layers').

    With a ``gate`` (gated RMSNorm), the gate, the product and the normalization run in float32 or wider and the
    output is rounded once, to ``spec.out_dtype``.
    """
    if gate is None:
        return standardize(x, scale, bias, spec, epsilon=epsilon, mask=mask)[0]
    wide = dtypes.stats_dtype(dtypes.promote_types(x.dtype, jnp.result_type(gate)))
    silu = jax.nn.silu(jnp.asarray(gate).astype(wide))
    if norm_before_gate:
        y = standardize(x, scale, bias, spec._replace(out_dtype=wide), epsilon=epsilon, mask=mask)[0]
        return (y * silu).astype(spec.out_dtype)
    return standardize(x.astype(wide) * silu, scale, bias, spec, epsilon=epsilon, mask=mask)[0]
