r"""The fast path: moments and normalization in one differentiable rule that XLA fuses well.

:func:`standardize_with_moments` computes exactly what :func:`normjax.moments` followed by
:func:`normjax.normalize` computes (two-pass, stable, masked, exact across devices), but as one
``jax.custom_jvp`` whose tangent rule is the closed form of the BatchNorm paper:

.. math::

    \hat x = (x - \mu)\,s, \qquad s = (\sigma^2 + \epsilon)^{-1/2}, \qquad
    \dot{\hat x} = s\,\bigl(\dot x - \overline{m \dot x} - \hat x\,\overline{m \hat x \dot x}\bigr)

where :math:`\overline{\,\cdot\,}` is the (masked, cross-device) mean over the reduction axes. Reverse mode is
JAX's transpose of this linear map, i.e. the textbook backward
:math:`\bar x = s\,(g' - m\,\overline{g'} - m\,\hat x\,\overline{g' \hat x})` with :math:`g' = \gamma\,\bar y`, and
it needs only ``x``, the mean and ``s`` from the forward. Written as a JVP (not a VJP) the rule also serves
``jax.jvp``, ``jacfwd``, higher-order derivatives, ``vmap`` and collectives, like the plain code.

Why it is faster on XLA:CPU (read from the optimized HLO, ``jax.jit(f).lower(...).compile().as_text()``, and
measured with ``benchmarks/run.py``): XLA:CPU runs reductions as library ("ynn") fusions that absorb an
elementwise producer only when they are its sole consumer, and its CSE pass merges identical broadcasts; so the
``x - mean`` (or ``g * scale``) shared by the variance, the output and the backward reductions of the plain
code is written out as a full-size temporary and re-read. Here each reduction builds its operand on a private
reshaped view (:func:`_viewer`), so none is shared: the forward is two reductions over ``x`` and one
elementwise pass; the backward of BatchNorm, InstanceNorm and GroupNorm is two reductions (``sum(g)``,
``sum(g * (x - mean))``) and one elementwise pass, with every other term folded into small coefficients;
LayerNorm and RMSNorm need four (two per row, two per feature). GroupNorm on channels-last data reduces each
group's few channels innermost, which XLA:CPU does about ten times slower than a copy; its full-size reductions
are therefore per channel, and the channels of a group are summed on the small result (:func:`_trailing_reduced`).

Cases the rule does not cover (complex inputs, a traced ``epsilon``) take the reference path, which remains
the definition of the result; :func:`reference_path` forces it, so the tests can compare the two.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import axes as axes_lib
from normjax._src.moments import Moments, _psum, _static_size, _without_unit_axes, moments
from normjax._src.normalize import _broadcastable, normalize

_state = threading.local()


@contextlib.contextmanager
def reference_path():
    """Within this context (at trace time), norms use the plain moments + normalize code: the reference."""
    previous = getattr(_state, "reference", False)
    _state.reference = True
    try:
        yield
    finally:
        _state.reference = previous


class _Config(NamedTuple):
    """The static (hashable) part of a call."""

    reduction_axes: tuple[int, ...]
    feature_axes: tuple[int, ...]
    epsilon: float
    centered: bool
    axis_name: object
    axis_index_groups: object
    out_dtype: object


def standardize_with_moments(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    reduction_axes: axes_lib.Axes,
    feature_axes: axes_lib.Axes,
    epsilon: float,
    mask: jax.Array | None = None,
    centered: bool = True,
    axis_name: axes_lib.AxisName = None,
    axis_index_groups=None,
    dtype=None,
) -> tuple[jax.Array, Moments]:
    """``normalize(x, *moments(x, reduction_axes, keepdims=True)[:2], scale, bias)`` and the moments (keepdims).

    Validates like the reference functions, then takes the fused rule when it applies.
    """
    axes_lib.check_inexact(x)
    axes_lib.check_epsilon(epsilon, x.dtype)
    ndim = jnp.ndim(x)
    reduce_axes = axes_lib.canonicalize_axes(reduction_axes, ndim, "reduction_axes")
    features = axes_lib.canonicalize_axes(feature_axes, ndim, "feature_axes")
    feature_shape = tuple(x.shape[a] for a in features)
    axes_lib.check_param(scale, feature_shape, "scale", f"the size of x's feature axes {features}")
    axes_lib.check_param(bias, feature_shape, "bias", f"the size of x's feature axes {features}")
    axes_lib.check_mask(mask, jnp.shape(x))
    axes_lib.check_axis_name(axis_name, axis_index_groups)
    axes_lib.check_static_bool(centered, "centered")  # argument check (axes.py)
    axes_lib.check_float_dtype(dtype)  # argument check (axes.py)
    out_dtype = axes_lib.output_dtype(x, dtype)
    axes_lib.check_real_output(out_dtype, scale=scale, bias=bias)  # argument check (axes.py)

    fast = (
        not getattr(_state, "reference", False)
        and not jnp.iscomplexobj(x)
        and not any(p is not None and jnp.iscomplexobj(p) for p in (scale, bias))
        and isinstance(epsilon, numbers.Real)
    )
    if not fast:
        stats = moments(
            x,
            reduce_axes,
            mask=mask,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            keepdims=True,
            centered=centered,
        )
        y = normalize(x, stats.mean, stats.var, scale, bias, epsilon=epsilon, feature_axes=features, dtype=dtype)
        return y, stats

    groups = None if axis_index_groups is None else tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    names = axis_name if axis_name is None or isinstance(axis_name, str) else tuple(axis_name)
    config = _Config(reduce_axes, features, float(epsilon), bool(centered), names, groups, out_dtype)
    if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape)
    y, mean, var, count = _fused(config, x, scale, bias, mask)
    return y, Moments(mean, var, count)


def _sum(values, config):
    return _staged_sum(values, config.reduction_axes)


def _trailing_reduced(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """The reduced axes after the last kept one, when some reduced axis precedes it (GroupNorm, channels last).

    Why: XLA:CPU reduces a short innermost axis that follows a kept one (the ``C/G`` channels of each group)
    about ten times slower than it copies the array. Such reductions are staged: first over the leading reduced
    axes only (the contiguous per-channel reduction of BatchNorm and InstanceNorm), then over these trailing
    axes on that small partial result.
    """
    last_kept = max((a for a in range(ndim) if a not in axes), default=-1)
    trailing = tuple(a for a in axes if a > last_kept)
    return trailing if any(a < last_kept for a in axes) else ()


def _staged_sum(values, axes: tuple[int, ...]):
    """``jnp.sum(values, axes, keepdims=True)``, the trailing reduced axes last (see :func:`_trailing_reduced`)."""
    trailing = _trailing_reduced(axes, jnp.ndim(values))
    if trailing:
        # On a view whose axes after the leading ones are merged: were the two sums on one shape, XLA would
        # merge them back into the slow single reduction.
        shape, leading = jnp.shape(values), tuple(a for a in axes if a not in trailing)
        split = max(leading) + 1
        partial = jnp.sum(jnp.reshape(values, shape[:split] + (math.prod(shape[split:]),)), leading)
        values = jnp.reshape(partial, tuple(1 if a in leading else n for a, n in enumerate(shape)))
        axes = trailing
    return jnp.sum(values, axes, keepdims=True)


def _viewer(shape: tuple[int, ...], pattern: tuple[int, ...], tag: int, vary=None):
    """Puts arrays on a private view of ``shape``: ``tag`` leading unit axes, adjacent axes of one role merged.

    Why: XLA:CPU fuses an elementwise producer into a reduction only when the reduction is its only consumer,
    and its common-subexpression pass merges identical broadcasts. So ``x - mean`` in the variance, the
    output and each backward reduction would become one shared instruction, written out as a full-size
    temporary (what makes naive two-pass slow). Expressions built on views of distinct shapes (a distinct
    ``tag`` per use) cannot be merged, so each fuses into its own reduction and no temporary is written.

    Axes are merged by their role in ``pattern`` (size 1: reduced by the expression's transpose; else kept).
    Full-size arrays are reshaped onto the view; small ones are squeezed to their non-unit merged axes and
    broadcast with ``broadcast_in_dim``, so transposed reductions also reduce the unit axes (XLA:CPU's
    reductions are very slow when they keep a unit axis). Under synchronized statistics, ``vary`` (see
    :func:`_varying_fn`) marks each squeezed small array device-varying before it is broadcast.
    """
    groups, previous = [], None
    for axis in range(len(shape)):
        reduced = pattern[axis] == 1
        if reduced == previous:
            groups[-1].append(axis)
        else:
            groups.append([axis])
        previous = reduced
    view_shape = (1,) * tag + tuple(math.prod(shape[i] for i in g) for g in groups)

    def to_view(a):
        if a.shape == tuple(shape):
            return jnp.reshape(a, view_shape)
        if any(len({a.shape[i] == 1 for i in g}) > 1 for g in groups):
            a = jnp.broadcast_to(a, jnp.broadcast_shapes(a.shape, pattern))
        full = [k for k, g in enumerate(groups) if a.shape[g[0]] != 1]
        squeezed = jnp.reshape(a, tuple(view_shape[tag + k] for k in full))
        if vary is not None:
            squeezed = vary(squeezed)
        return jax.lax.broadcast_in_dim(squeezed, view_shape, tuple(tag + k for k in full))

    kept = tuple(tag + k for k, g in enumerate(groups) if pattern[g[0]] != 1)
    return to_view, view_shape, kept


def _sum_of_squared_deviations(config: _Config, xf, mean, mask):
    """``sum(m (x - mean)^2)`` over the reduction axes, on a private view of ``x`` (see :func:`_viewer`).

    Trailing reduced axes (see :func:`_trailing_reduced`) are kept by the full-size reduction and summed after it.

    When the reduction axes are the innermost ones (LayerNorm), the deviation is instead the very ``x - mean``
    of the output: XLA:CPU then runs the whole forward as one library fusion that reads each row once for the
    deviation and reuses it (as Flax's two-pass code does), about 1.4x faster than recomputing it on a view.
    Reductions over leading axes (BatchNorm, InstanceNorm) keep the view: shared, the deviation would be
    written out as a full-size temporary between separate fusions.
    """
    ndim = xf.ndim
    if config.reduction_axes == tuple(range(ndim - len(config.reduction_axes), ndim)):
        deviation = _centered(config, xf, mean)
        squares = deviation * deviation
        if mask is not None:
            squares = jnp.where(mask, squares, jnp.zeros((), xf.dtype))
        return jnp.sum(squares, config.reduction_axes, keepdims=True)
    trailing = _trailing_reduced(config.reduction_axes, xf.ndim)
    pattern = tuple(xf.shape[a] if a in trailing else n for a, n in enumerate(mean.shape))
    view, view_shape, kept = _viewer(xf.shape, pattern, tag=1, vary=_varying_fn(config, xf))
    deviation = view(xf) - view(mean)
    squares = deviation * deviation
    if mask is not None:
        squares = jnp.where(view(mask), squares, jnp.zeros((), xf.dtype))
    view_axes = tuple(a for a in range(len(view_shape)) if a not in kept)
    partial = jnp.reshape(jnp.sum(squares, view_axes), pattern)
    return jnp.sum(partial, trailing, keepdims=True) if trailing else partial


def _psum_fn(config: _Config):
    return functools.partial(_psum, axis_name=config.axis_name, axis_index_groups=config.axis_index_groups)


def _varying_fn(config: _Config, like):
    """Marks small arrays device-varying over the axes ``like`` varies over, at their squeezed size.

    Why: under ``shard_map`` (and ``pmap``) a device-invariant value, such as a statistic after its ``psum``, that
    meets a device-varying array is marked varying where they meet, and the transpose of that mark is an
    all-reduce. Left to broadcasting, the mark lands on a keepdims ``(1, ..., C)`` or full-size array; the
    backward's all-reduce then pins that shape onto the reductions that feed it (about ten times slower on
    XLA:CPU, see :func:`_viewer`), or all-reduces the whole array. Marked here, before any broadcast, it is
    ``(C,)``. Outside ``shard_map`` (vmap's named axes, no axis) nothing is marked.
    """
    if config.axis_name is None:
        return _identity
    varying = jax.typeof(like).mat.varying

    def vary(a):
        missing = tuple(name for name in varying if name not in jax.typeof(a).mat.varying)
        if not missing:
            return a
        return jnp.reshape(jax.lax.pcast(_without_unit_axes(a), missing, to="varying"), a.shape)

    return vary


def _forward(config: _Config, x, scale, bias, mask):
    """The primal computation; returns (y, mean, var, count, xf, inv_std) for the tangent rule to reuse."""
    dtype = axes_lib.stats_dtype(x.dtype)
    xf = x.astype(dtype)
    if mask is None:
        count = jnp.full((1,) * x.ndim, _static_size(x.shape, config.reduction_axes), dtype)
        valid = xf
    else:
        count = _sum(mask.astype(dtype), config)
        valid = jnp.where(mask, xf, jnp.zeros((), dtype))
    psum = _psum_fn(config)
    if config.centered:
        # Two plain sums, not one variadic reduce: XLA:CPU keeps plain sums on its fast reduction path.
        total, count = psum((_sum(valid, config), count))
        mean = total / jnp.maximum(count, 1)
        m2 = psum(_sum_of_squared_deviations(config, xf, mean, mask))
    else:
        m2, count = psum((_sum(valid * valid, config), count))
        mean = jnp.zeros(m2.shape, dtype)
    var = m2 / jnp.maximum(count, 1)
    inv_std = jax.lax.rsqrt(var + config.epsilon)
    multiplier = inv_std if scale is None else inv_std * _broadcastable(scale, x.ndim, config.feature_axes)
    y = _centered(config, xf, mean) * multiplier
    if bias is not None:
        y = y + _broadcastable(bias, x.ndim, config.feature_axes)
    count = jnp.broadcast_to(count, var.shape)
    return y.astype(config.out_dtype), mean, var, count, xf, inv_std


def _identity(a):
    return a


def _centered(config: _Config, xf, mean):
    return xf - mean if config.centered else xf


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _fused(config: _Config, x, scale, bias, mask):
    return _forward(config, x, scale, bias, mask)[:4]


@_fused.defjvp
def _fused_jvp(config: _Config, primals, tangents):
    x, scale, bias, mask = primals
    dx, dscale, dbias, _ = tangents
    y, mean, var, count, xf, inv_std = _forward(config, x, scale, bias, mask)
    psum = _psum_fn(config)
    vary = _varying_fn(config, xf)
    ndim = x.ndim
    n = jnp.maximum(count, 1)
    dxf = dx.astype(xf.dtype)
    valid_dx = dxf if mask is None else jnp.where(mask, dxf, jnp.zeros((), dxf.dtype))
    dmean = psum(_sum(valid_dx, config)) / n if config.centered else jnp.zeros_like(mean)
    # S = sum(m (x - mean) dx): d(var) = 2 S / n, and the projection of the tangent onto x-hat is inv_std^3 S / n.
    valid_deviation = _centered(config, xf, mean)
    if mask is not None:  # masked-out elements may hold NaN or inf: select, never multiply by zero
        valid_deviation = jnp.where(mask, valid_deviation, jnp.zeros((), xf.dtype))
    projection = psum(_sum(valid_deviation * dxf, config))
    dvar = 2.0 * projection / n
    coefficient = inv_std * inv_std * inv_std * projection / n
    as_feature = functools.partial(_broadcastable, ndim=ndim, feature_axes=config.feature_axes)
    if set(config.reduction_axes) - set(config.feature_axes):
        # BatchNorm, InstanceNorm, GroupNorm: some reduction axes (batch, space) carry neither statistics nor
        # features, so every per-element coefficient folds into a small array of the statistics' and features'
        # broadcast shape, and the transposed (backward) rule reduces the full-size arrays only twice, over
        # those axes: sum(g) and sum(g * (x - mean)); everything after that runs on small arrays.
        gain = inv_std if scale is None else inv_std * as_feature(scale)
        slope = -gain * inv_std * inv_std * projection / n
        offset = -gain * dmean
        if scale is not None:
            slope = slope + inv_std * as_feature(dscale)
        if bias is not None:
            offset = offset + as_feature(dbias)
        view, _, _ = _viewer(x.shape, slope.shape, tag=2, vary=vary)
        dy = dxf * gain + jnp.reshape(_centered(config, view(xf), view(mean)) * view(slope), x.shape) + vary(offset)
    else:
        # LayerNorm, RMSNorm: statistics and features together span x, so no coefficient is small. Each term
        # whose transpose is a reduction lives on its own view (see _viewer).
        scale_b = jnp.ones((1,) * ndim, xf.dtype) if scale is None else as_feature(scale)
        per_row, _, _ = _viewer(x.shape, mean.shape, tag=2, vary=vary)
        per_feature, _, _ = _viewer(x.shape, scale_b.shape, tag=3, vary=vary)
        per_row_2, _, _ = _viewer(x.shape, mean.shape, tag=4, vary=vary)
        per_row_3, _, _ = _viewer(x.shape, mean.shape, tag=5, vary=vary)
        # Signs sit on the small factors: a full-size negation would be shared by two reductions. Each product
        # of a per-row and a per-feature factor is built on a view too: in the plain shape XLA:CPU writes their
        # full-size outer product out before the backward's library fusion reads it.
        dy = jnp.reshape(per_row_3(dxf) * per_row_3(inv_std) * per_row_3(scale_b), x.shape)
        dy = dy + jnp.reshape(per_row(-inv_std * dmean) * per_row(scale_b), x.shape)
        dy = dy + jnp.reshape(
            _centered(config, per_row_2(xf), per_row_2(mean)) * per_row_2(-coefficient) * per_row_2(scale_b), x.shape
        )
        if scale is not None:
            dev = _centered(config, per_feature(xf), per_feature(mean))
            dy = dy + jnp.reshape(dev * per_feature(inv_std) * per_feature(as_feature(dscale)), x.shape)
        if bias is not None:
            dy = dy + vary(as_feature(dbias))
    return (y, mean, var, count), (dy.astype(y.dtype), dmean, dvar, jnp.zeros_like(count))
