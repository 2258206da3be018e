r"""The core every norm, mode and layer goes through: statistics, standardization and affine, with their derivative.

:func:`standardize` computes the moments of ``x`` over the reduction axes (:mod:`normjax._src.moments`: one
pass about a shift that lies among the data, merged exactly across devices, in one collective under ``shard_map``) and

.. math::

    \hat x = (x - \mu)\,s, \qquad s = (\sigma^2 + \epsilon)^{-1/2}, \qquad y = \hat x\,(\gamma + c) + \beta,

as one ``jax.custom_jvp`` whose tangent is the closed form of the BatchNorm paper:

.. math::

    \dot{\hat x} = s\,\bigl(\dot x - \overline{m \dot x}\bigr) - \tfrac12 s^3 (\dot\sigma^2 + \dot\epsilon)
    (x - \mu), \qquad \dot\sigma^2 = 2\,\overline{m (x - \mu) \dot x}

where :math:`\overline{\,\cdot\,}` is the (masked, cross-device) mean over the reduction axes and :math:`m` the
mask. :math:`\gamma` and :math:`\beta` are per feature or per example (any array of ``x``'s rank that broadcasts to
it), and :math:`c` is the static ``scale_offset`` (1 for a zero-centered scale, added in the statistics dtype so it
is exact for narrow parameters). Reverse mode is JAX's transpose of this linear map, the textbook backward
:math:`\bar x = s\,(g' - \overline{m g'} - \hat x\,\overline{m \hat x g'})` with :math:`g' = (\gamma + c) \bar y`:
two reductions and one elementwise pass. Written as a JVP the rule also serves ``jax.jvp``, ``jacfwd``, higher
orders, ``vmap`` and collectives. The mean is kept to about twice float precision, as this device's shift and
offset or ``hi`` (their sum rounded) and ``lo``, plus the offset's division error; the output subtracts one or
both of the pair (the layout's choice: one form suits XLA's GPU compiler, another its TPU compiler, a third
XLA:CPU), and the rule's projection corrects by the rest, so the backward's components along the reduced axes
cancel to rounding of their own size even at a large mean (a mean off by ``delta`` would leave a residual of
``n * delta``, which a weight upstream of the norm multiplies by the mean).

Masked-out elements never enter arithmetic whose result is kept: they are selected away (never multiplied by
zero), their :math:`\hat x` is 0, so their output is :math:`\beta`, and no derivative reads them.

How XLA sees the full-size work is the layout's business (:mod:`normjax._src.layout`), chosen per platform when
the program is lowered; complex inputs are differentiated by JAX through the same forward.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import dtypes
from normjax._src import layout as layout_lib
from normjax._src.moments import (
    Moments,
    merge_across_devices,
    psum,
    shifted_moments,
    without_unit_axes,
)
from normjax._src.spec import NormSpec, grouped_shape


class Renorm(NamedTuple):
    """Batch Renormalization's inputs: the running statistics and the clipping bounds (arrays; may be traced)."""

    running_mean: jax.Array
    running_var: jax.Array
    r_max: jax.Array
    d_max: jax.Array


def as_feature(param: jax.Array, ndim: int, feature_axes: tuple[int, ...]) -> jax.Array:
    """Reshapes a parameter of the feature axes' shape so it broadcasts against a rank-``ndim`` array."""
    shape = [1] * ndim
    for a, size in zip(feature_axes, jnp.shape(param), strict=True):
        shape[a] = size
    return jnp.reshape(param, shape)


def as_affine(param: jax.Array | None, ndim: int, feature_axes: tuple[int, ...]) -> jax.Array | None:
    """A scale or bias as an array that broadcasts against a rank-``ndim`` input: per feature (the feature axes'
    shape, reshaped by :func:`as_feature`) or per example (already of the input's rank); None stays None."""
    if param is None or jnp.ndim(param) == ndim:
        return param
    return as_feature(param, ndim, feature_axes)


def offset_scale(gamma: jax.Array | None, scale_offset: float, dtype) -> jax.Array | None:
    """``gamma + scale_offset`` in ``dtype`` or wider (the statistics dtype), so the offset is exact for a bfloat16
    ``gamma``; ``gamma`` unchanged when the offset is 0."""
    if gamma is None or not scale_offset:
        return gamma
    wide = dtypes.promote_types(gamma.dtype, dtype)
    return gamma.astype(wide) + jnp.asarray(scale_offset, jnp.finfo(dtype).dtype)


def zero_masked(y: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``y`` with 0 at masked-out positions (selected, so no gradient reaches them); ``y`` without a mask."""
    return y if mask is None else jnp.where(mask, y, jnp.zeros((), y.dtype))


def per_group(param: jax.Array | None, ndim: int, channel_axis: int, groups: int) -> jax.Array | None:
    """GroupNorm's scale or bias on the grouped view, the channel axis split into ``(groups, channels per group)``.

    Per channel ``(C,)`` becomes ``(groups, C // groups)``; per example (of the input's rank ``ndim``) the channel
    axis is split in place, or becomes two unit axes where it is broadcast.
    """
    if param is None:
        return None
    shape = jnp.shape(param)
    if len(shape) != ndim:
        return jnp.reshape(param, (groups, shape[0] // groups))
    channels = shape[channel_axis]
    split = (groups, channels // groups) if channels != 1 else (1, 1)
    return jnp.reshape(param, shape[:channel_axis] + split + shape[channel_axis + 1 :])


def standardize(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    spec: NormSpec,
    *,
    epsilon,
    mask: jax.Array | None = None,
    renorm: Renorm | None = None,
) -> tuple[jax.Array, Moments]:
    """``(y, moments)``: ``x`` standardized as ``spec`` says, with arguments :func:`~normjax._src.spec.norm_spec`
    checked (nothing is checked here).

    ``moments`` are keepdims (of GroupNorm's grouped view for a ``spec.grouping``). ``scale`` and ``bias`` are
    per feature or per example (see :func:`as_affine`); ``spec.scale_offset`` is added to ``scale`` (in the
    statistics dtype, before the casting order applies). With ``renorm``, Batch Renormalization's ``r`` and ``d``
    (constants in the derivative) fold into the affine. With ``spec.zero_masked_outputs`` the output is 0 where
    ``mask`` is False.
    """
    shape = jnp.shape(x)
    if mask is not None:
        mask = jnp.broadcast_to(mask, shape)
    if spec.grouping is not None:
        channel, groups = spec.grouping
        grouped = grouped_shape(shape, spec.grouping)
        x, mask = (None if a is None else jnp.reshape(a, grouped) for a in (x, mask))
        scale, bias = (per_group(p, len(shape), channel, groups) for p in (scale, bias))
    epsilon = jnp.asarray(epsilon, jnp.finfo(dtypes.stats_dtype(x.dtype)).dtype)
    operands = (x, scale, bias, mask, epsilon, renorm)
    if jnp.iscomplexobj(x) or any(p is not None and jnp.iscomplexobj(p) for p in (scale, bias)):
        y, mean, var, count = _forward(spec, *operands)[:4]  # not holomorphic: JAX differentiates the forward
    else:
        layout = "generic" if _explicitly_sharded(x) else PER_PLATFORM
        y, mean, var, count = _standardize(spec._replace(layout=layout), *operands)
    if spec.zero_masked_outputs:
        y = zero_masked(y, mask)
    return jnp.reshape(y, shape), Moments(mean, var, count)


def _explicitly_sharded(x: jax.Array) -> bool:
    """Whether ``x``'s type carries a sharding (explicit mesh axes): then only the generic layout applies."""
    spec = getattr(jax.typeof(x).sharding, "spec", None)
    return spec is not None and any(entry is not None for entry in spec)


def _varying_fn(spec: NormSpec, like):
    """Marks small arrays device-varying over the axes ``like`` varies over, at their squeezed size.

    Why: under ``shard_map`` (and ``pmap``) a device-invariant value, such as a statistic after its collective,
    that meets a device-varying array is marked varying where they meet, and the transpose of that mark is an
    all-reduce. Left to broadcasting, the mark may land on a keepdims ``(1, ..., C)`` or full-size array and the
    backward all-reduces that. Marked here, before any broadcast, it is ``(C,)``. Outside ``shard_map`` (vmap's
    named axes, no axis) nothing is marked.
    """
    if spec.axis_name is None:
        return _identity
    varying = jax.typeof(like).mat.varying

    def vary(a):
        missing = tuple(name for name in varying if name not in jax.typeof(a).mat.varying)
        if not missing:
            return a
        return jnp.reshape(jax.lax.pcast(without_unit_axes(a), missing, to="varying"), jnp.shape(a))

    return vary


def _identity(a):
    return a


# The layout of the platform the program is lowered for (``spec.layout``; see :func:`_in_layout`).
PER_PLATFORM = "per_platform"


def _in_layout(spec: NormSpec, xf, piece, *operands, first_tag: int = 1):
    """``piece(layout, *operands)`` with ``spec.layout``, or, for :data:`PER_PLATFORM`, the layout of the platform
    the program is lowered for: ``jax.lax.platform_dependent`` (resolved at lowering; visible to jit's cache).

    Why per piece, with the collectives between pieces rather than inside a branch: JAX (0.10.2) traces a
    ``custom_jvp`` rule again when it is linearized inside ``lax.scan`` under ``vmap``, and there a collective
    over vmap's named axis inside a branch of ``platform_dependent`` finds the axis unbound. So each piece holds
    only one device's full-size work, and every norm gets its platform's layout in every sharding mode.
    ``first_tag``: the first of :class:`~normjax._src.layout.XlaCpu`'s private views, so two pieces of one rule
    do not share one.
    """
    shape, vary = xf.shape, _varying_fn(spec, xf)

    def run(name, *operands):
        layout = layout_lib.LAYOUTS[name](shape, spec.reduction_axes, vary, first_tag=first_tag)
        return piece(layout, *operands)

    if spec.layout != PER_PLATFORM:
        return run(spec.layout, *operands)
    return jax.lax.platform_dependent(
        *operands,
        cpu=functools.partial(run, "xla_cpu"),
        tpu=functools.partial(run, "xla_tpu"),
        cuda=functools.partial(run, "xla_gpu"),
        default=functools.partial(run, "generic"),
    )


def _renorm_factors(spec: NormSpec, ndim, moments: Moments, epsilon, renorm):
    """Batch Renormalization's ``(r, d)``, broadcastable: ``(x̂ r + d) γ + β``; ``(None, None)`` without it."""
    if renorm is None:
        return None, None
    feature = functools.partial(as_feature, ndim=ndim, feature_axes=spec.feature_axes)
    running_std = jnp.sqrt(feature(renorm.running_var) + epsilon)
    r = jnp.clip(jnp.sqrt(moments.var + epsilon) / running_std, 1.0 / renorm.r_max, renorm.r_max)
    d = jnp.clip((moments.mean - feature(renorm.running_mean)) / running_std, -renorm.d_max, renorm.d_max)
    return r, d


def _affine(gamma, beta, r, d):
    """The effective ``(scale, bias)`` with Batch Renormalization's r and d folded in; None for "absent"."""
    if r is None:
        return gamma, beta
    scaled_d = d if gamma is None else gamma * d
    return (r if gamma is None else gamma * r), (scaled_d if beta is None else beta + scaled_d)


def _select(mask, values):
    return values if mask is None else jnp.where(mask, values, jnp.zeros((), values.dtype))


def _deviation(x, mean, residual=None, *, mask=None):
    """``x - mean``, or ``(x - mean) - residual``; 0 where masked out: what the statistics see."""
    return _select(mask, x - mean if residual is None else (x - mean) - residual)


def _output_deviation(x, mean, mask=None, residual=None):
    """``x - mean`` for the output: also masked-out positions, as in Flax, unless they hold NaN or inf (then 0).

    With ``residual``, the mean is ``mean + residual`` (an exact sum of two floats) and both are subtracted.
    """
    deviation = x - mean if residual is None else (x - mean) - residual
    return _select(None if mask is None else mask | jnp.isfinite(x), deviation)


def standardized_output(x, mean, inv_std, gamma=None, beta=None, mask=None, normalized_dtype=None, residual=None):
    r"""The one definition of a norm's output, ``(x - mean) * inv_std * gamma + beta``, and its casting order.

    ``normalized_dtype=None``: the affine runs in the statistics dtype as ``(x - mean) * (inv_std * gamma) +
    beta`` (Flax's order; one full-size product for BatchNorm) and the caller rounds once, to the output dtype.
    ``normalized_dtype=D``: :math:`\hat x = (x - \mu)\,s` is formed first and rounded to ``D``, then
    multiplied by ``gamma`` and shifted by ``beta`` in the promotion of ``D`` and their dtypes: HF Llama's
    ``weight * x_hat.to(input_dtype)`` with ``D`` the input dtype, T5's with ``D`` the weight's (half) dtype,
    and PyTorch's ``rms_norm`` / Transformer Engine / HF Gemma's ``x_hat * weight`` in float32 with ``D =
    float32``.

    ``gamma`` and ``beta`` are the effective parameters, per feature or per example (broadcastable to ``x``):
    ``gamma`` already holds the ``scale_offset`` (added in the statistics dtype by :func:`offset_scale`, so with
    ``D = float32`` a zero-centered bfloat16 scale gives Gemma's ``x_hat * (1 + weight.float())`` bit for bit)
    and both hold Batch Renormalization's ``r`` and ``d`` (``gamma r``, ``beta + gamma d``).

    Masked-out positions are standardized like the others (with the valid elements' statistics, as Flax does),
    except that a non-finite one outputs ``beta``: padding may hold anything without reaching any result or
    derivative. ``zero_masked_outputs`` (:func:`zero_masked`) then selects 0 there, after the rounding to the
    output dtype. With ``residual`` the mean is ``mean + residual``, subtracted as ``(x - mean) - residual``.
    """
    deviation = _output_deviation(x, mean, mask, residual)
    if normalized_dtype is None:
        multiplier = inv_std if gamma is None else inv_std * gamma
        y = deviation * multiplier
        return y if beta is None else y + beta
    params = tuple(p for p in (gamma, beta) if p is not None)
    affine_dtype = dtypes.promote_types(normalized_dtype, *(p.dtype for p in params))
    y = (deviation * inv_std).astype(normalized_dtype).astype(affine_dtype)
    if gamma is not None:
        y = y * gamma.astype(affine_dtype)
    return y if beta is None else y + beta.astype(affine_dtype)


def _nan_if_overflowed(t):
    """``t``, or NaN where it overflowed to inf, so the outputs are NaN there rather than ``x * rsqrt(inf) = 0``.

    A variance or mean square overflows for finite inputs (float32 values around 1e19 and beyond). ``rem(t,
    max)`` is exactly ``t`` for every finite ``t`` below the largest float and NaN for inf; being one operation
    on one operand, it keeps XLA's GPU normalization fusion (RMSNorm's whole forward) one kernel, which a select
    or a second use of ``t`` would split in three.
    """
    return jax.lax.rem(t, jnp.asarray(jnp.finfo(t.dtype).max, t.dtype))


def _forward(spec: NormSpec, x, scale, bias, mask, epsilon, renorm):
    """The primal computation; also returns what the tangent rule reuses."""
    xf = x.astype(dtypes.stats_dtype(x.dtype))

    def local_moments(layout, xf, x, mask):
        return shifted_moments(
            xf,
            spec.reduction_axes,
            mask=mask,
            centered=spec.centered,
            total=layout.total,
            sample_from=x,
            about_zero_first=layout.about_zero_first,
            shift_by_reduction=layout.shift_by_reduction,
        )

    local = _in_layout(spec, xf, local_moments, xf, x, mask)
    own, common = merge_across_devices(
        local, spec.axis_name, spec.axis_index_groups, size=spec.axis_size, centered=spec.centered
    )
    moments = common.moments()
    inv_std = jax.lax.rsqrt(_nan_if_overflowed(moments.var + epsilon))
    r, d = _renorm_factors(spec, x.ndim, moments, epsilon, renorm)
    gamma = offset_scale(as_affine(scale, x.ndim, spec.feature_axes), spec.scale_offset, inv_std.dtype)
    gamma, beta = _affine(gamma, as_affine(bias, x.ndim, spec.feature_axes), r, d)
    merged = spec.axis_name is not None

    def output(layout, xf, own, inv_std, gamma, beta, mask):
        center = _mean_as_two_floats(layout, own, merged)
        return standardized_output(xf, center.mean, inv_std, gamma, beta, mask, spec.normalized_dtype, center.residual)

    y = _in_layout(spec, xf, output, xf, own, inv_std, gamma, beta, mask)
    return y.astype(spec.out_dtype), moments.mean, moments.var, moments.count, (xf, own, inv_std, gamma, r, d)


class _Center(NamedTuple):
    """This device's mean as the full-size passes subtract it: ``x - mean``, or ``(x - mean) - residual``; and
    ``correction``, what that misses of the exact mean, which the derivative adds."""

    mean: jax.Array
    residual: jax.Array | None
    correction: jax.Array

    def subtracted(self) -> tuple[jax.Array, ...]:
        return (self.mean,) if self.residual is None else (self.mean, self.residual)


def _mean_as_two_floats(layout: layout_lib.Generic, own, merged: bool) -> _Center:
    """The mean ``shift + offset + offset_error`` in the form the layout subtracts (see :mod:`normjax._src.layout`).

    ``"shift, offset"``: the shift and the offset themselves (``x - shift`` is exact for ``x`` near the shift).
    ``"hi, lo"``: their float sum ``hi`` and its rounding error ``lo`` (Fast2Sum). ``"shift"``: the shift alone
    (the statistics are then about the mean rounded to one float), or ``hi`` alone once ``merged`` across
    devices (the offset is then the way from this device's shift to the common mean). The derivative corrects by
    the rest, always including the offset's division error.
    """
    if layout.subtracted_mean == "shift, offset":
        return _Center(own.shift, own.offset, own.offset_error)
    if layout.subtracted_mean == "shift" and not merged:
        return _Center(own.shift, None, own.offset + own.offset_error)
    hi = own.shift + own.offset
    lo = (own.shift - hi) + own.offset
    if layout.subtracted_mean == "shift":
        return _Center(hi, None, lo + own.offset_error)
    return _Center(hi, lo, own.offset_error)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _standardize(spec: NormSpec, x, scale, bias, mask, epsilon, renorm):
    return _forward(spec, x, scale, bias, mask, epsilon, renorm)[:4]


@_standardize.defjvp
def _standardize_jvp(spec: NormSpec, primals, tangents):
    x, scale, bias, mask, epsilon, renorm = primals
    dx, dscale, dbias, _, depsilon, _ = tangents
    y, mean, var, count, (xf, own, inv_std, gamma, r, d) = _forward(spec, *primals)
    merged = spec.axis_name is not None
    ndim = x.ndim
    n = jnp.maximum(count, 1)
    dxf = dx.astype(xf.dtype)
    if spec.centered:
        dx_sum, projection = _in_layout(spec, xf, functools.partial(_projection, merged), dxf, xf, own, mask)
        dx_sum, projection = psum((dx_sum, projection), spec.axis_name, spec.axis_index_groups)
        dmean = dx_sum / n
    else:
        projection = psum(
            _in_layout(spec, xf, _uncentered_projection, dxf, xf, mask), spec.axis_name, spec.axis_index_groups
        )
        dmean = jnp.zeros_like(mean)
    dvar = 2.0 * projection / n
    # d(inv_std) = -1/2 inv_std^3 (d var + d epsilon); epsilon's tangent is a symbolic zero unless it is traced.
    dinv_std = -0.5 * inv_std * inv_std * inv_std * (dvar + depsilon)

    # The offset is a constant: gamma's tangent is scale's, per feature or per example; JAX's transpose of the
    # broadcast sums the cotangent over exactly the axes the parameter was broadcast along.
    dgamma = None if scale is None else as_affine(dscale, ndim, spec.feature_axes)
    dbeta = None if bias is None else as_affine(dbias, ndim, spec.feature_axes)
    if r is not None and dgamma is not None:  # (x̂ r + d) γ + β, with r and d constants in the derivative
        dgamma, dbeta = dgamma * r, dgamma * d if dbeta is None else dbeta + dgamma * d
    g = jnp.ones((), xf.dtype) if gamma is None else gamma
    # The projection's piece used XLA:CPU's first private view (see _in_layout).
    dy = _in_layout(
        spec, xf, functools.partial(_output_tangent, merged), dxf, xf, own, mask,
        (dmean, inv_std, dinv_std), (g, dgamma, dbeta), first_tag=2,
    )  # fmt: skip
    return (y, mean, var, count), (dy.astype(y.dtype), dmean, dvar, jnp.zeros_like(count))


def _projection(merged: bool, layout: layout_lib.Generic, dxf, xf, own, mask):
    """This device's ``(sum(m dx), sum(m (x - mean) dx))``, the latter corrected by the rest of the mean.

    ``sum(m (x - mean) dx)``: the deviations as the output forms them sum to n times the rest of the mean (lo
    where the output subtracts hi alone, and the offset's division error), not to zero. Corrected by it, the
    backward's components along the reduced axes sum to zero to rounding of their own size, even at a large
    mean (where a weight upstream of the norm multiplies that sum by the mean).
    """
    center = _mean_as_two_floats(layout, own, merged)
    subtracted = center.subtracted()  # the mean as the output subtracts it: one or two arrays
    m = () if mask is None else (mask,)
    dx_sum = layout.total(lambda dx, m=None: _select(m, dx), (dxf, *m))

    def weighted_deviation(dx, x, *operands):
        mean, rest = operands[: len(subtracted)], operands[len(subtracted) :]
        return _deviation(x, *mean, mask=rest[0] if rest else None) * dx

    projection = layout.total(weighted_deviation, (dxf, xf, *subtracted, *m))
    return dx_sum, projection - center.correction * dx_sum


def _uncentered_projection(layout: layout_lib.Generic, dxf, xf, mask):
    """This device's ``sum(m x dx)`` (RMSNorm's)."""
    m = () if mask is None else (mask,)
    return layout.total(lambda dx, x, m=None: _select(m, x) * dx, (dxf, xf, *m))


def _output_tangent(merged: bool, layout: layout_lib.Generic, dxf, xf, own, mask, per_statistic, per_feature):
    """``dy = (dx - dmean) s γ + (x - mean) (ds γ + s dγ) + dβ``, its full-size terms built by the layout.

    ``per_statistic = (dmean, s, ds)``, ``per_feature = (γ, dγ, dβ)`` (``dγ``, ``dβ`` may be None).
    """
    dmean, inv_std, dinv_std = per_statistic
    g, dgamma, dbeta = per_feature
    subtracted = _mean_as_two_floats(layout, own, merged).subtracted()
    m = () if mask is None else (mask,)

    def deviation_term(fn, factors):
        """The term ``fn(x - mean, *factors)``, with x - mean formed as the output forms it."""

        def term(x, *operands):
            mean, rest = operands[: len(subtracted)], operands[len(subtracted) :]
            mask_operand, factors = (rest[0], rest[1:]) if m else (None, rest)
            return fn(_output_deviation(x, mean[0], mask_operand, *mean[1:]), *factors)

        return term, (xf, *subtracted, *m, *factors)

    small = jnp.broadcast_shapes(*(jnp.shape(a) for a in per_statistic + per_feature if a is not None)) != xf.shape
    if small:
        # BatchNorm, InstanceNorm, GroupNorm: every coefficient folds into a small array first, so each full-size
        # array meets one coefficient and the transposed (backward) rule reduces full-size arrays only twice:
        # sum(g) and sum(g * (x - mean)).
        gain = inv_std * g
        slope = dinv_std * g if dgamma is None else dinv_std * g + inv_std * dgamma
        shift = -dmean * gain
        if mask is None:
            if dbeta is not None and jnp.broadcast_shapes(jnp.shape(shift), jnp.shape(dbeta)) != xf.shape:
                # beta's cotangent is then the small sum of the shift's (InstanceNorm, GroupNorm: over the
                # batch), not a second full-size reduction of the output's cotangent.
                shift, dbeta = shift + dbeta, None
            terms = [(lambda dx, a: dx * a, (dxf, gain)), (lambda c: c, (shift,))]
        else:  # constant (beta) where a masked-out position is not finite
            terms = [(lambda dx, a, c, x, m: _select(m | jnp.isfinite(x), dx * a + c), (dxf, gain, shift, xf, mask))]
        terms.append(deviation_term(lambda deviation, a: deviation * a, (slope,)))
    else:
        # LayerNorm, RMSNorm: per-row statistics times per-feature parameters span x; no coefficient is small.
        if mask is None:
            terms = [
                (lambda dx, s, g: dx * s * g, (dxf, inv_std, g)),
                (lambda dm, s, g: -(dm * s) * g, (dmean, inv_std, g)),
            ]
        else:  # constant (beta) where a masked-out position is not finite
            terms = [
                (
                    lambda dx, dm, s, g, x, m: _select(m | jnp.isfinite(x), dx - dm) * s * g,
                    (dxf, dmean, inv_std, g, xf, mask),
                )
            ]
        terms.append(deviation_term(lambda deviation, ds, g: deviation * ds * g, (dinv_std, g)))
        if dgamma is not None:
            terms.append(deviation_term(lambda deviation, s, dg: deviation * s * dg, (inv_std, dgamma)))
    if dbeta is not None:
        terms.append((lambda db: db, (dbeta,)))
    return layout.combine(terms)
