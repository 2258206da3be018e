r"""Moments over any axes: the one place statistics are computed and the one place they cross devices.

Statistics are kept relative to a *shift* :math:`k`, a value near the data (one sample of it, or a first-pass
mean), as :class:`ShiftedMoments` ``(count, shift, offset, m2)``:

.. math::

    n = \sum_i m_i, \qquad \delta = \frac{1}{n}\sum_i m_i (x_i - k), \qquad
    M_2 = \sum_i m_i (x_i - k)^2 - n\,\delta^2 = \sum_i m_i (x_i - k - \delta)^2,

so the mean is :math:`k + \delta` and the variance :math:`M_2 / n`. Both sums read ``x`` in one pass, and
because :math:`k` lies among the data the large common offset cancels *exactly*, in :math:`x_i - k`, before
anything is squared: the relative error of :math:`M_2` is about :math:`\varepsilon\,(1 + (k - \mu)^2/\sigma^2)`
instead of the :math:`\varepsilon\,\mu^2/\sigma^2` of :math:`E[x^2] - E[x]^2`. Keeping :math:`\delta` apart
from :math:`k` also keeps the standardized values :math:`(x_i - k) - \delta` exact to rounding of their own size,
so their sum, which the derivative relies on, cancels (see :mod:`normjax._src.standardize`).

Across devices each one's statistics are merged exactly, with Chan's pairwise formula: from one collective
under ``shard_map`` (an all-gather of ``4 F`` numbers per device), from one ``psum`` of per-device slots under
``pmap`` and ``vmap``. Counts weight the means, so uneven per-device counts, masks and
devices with nothing valid are exact.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import arguments, device_axes, dtypes
from normjax._src import axes as axes_lib
from normjax._src.boundary import named_scope, renamed_keywords
from normjax._src.typing import ArrayLike, Axes, AxisIndexGroups, AxisName

# A layout's reduction (normjax._src.layout): total(fn, operands) sums fn(*operands) over the axes, keepdims.
Total = Callable[[Callable[..., jax.Array], Sequence[jax.Array]], jax.Array]

# Sums about zero are used (``about_zero_first``) only while mean^2 <= (WELL_CONDITIONED - 1) * var.
WELL_CONDITIONED = 4.0


class Moments(NamedTuple):
    """Statistics of the valid elements of an array over some axes.

    Attributes:
      mean: the mean (complex for complex inputs; zero when not centered).
      var: the biased variance, ``mean(|x - mean|^2)`` (``mean(|x|^2)`` when not centered). Always real.
      count: how many valid elements contributed, as a float array of ``mean``'s shape.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array


class ShiftedMoments(NamedTuple):
    """Statistics relative to a shift: mean ``shift + offset``, variance ``m2 / count`` (see the module doc).

    ``offset_error`` is what the rounded offset misses of the exact quotient ``sum(x - shift) / count``: zero where
    unknown (after a merge across devices) or folded into the offset (see :func:`_about_rounded_mean`). The mean
    is ``shift + offset + offset_error`` to about twice the precision, which the closed-form derivative needs (see
    :mod:`normjax._src.standardize`).
    """

    count: jax.Array
    shift: jax.Array
    offset: jax.Array
    m2: jax.Array
    offset_error: jax.Array

    def moments(self) -> Moments:
        mean = self.shift + self.offset
        return Moments(mean, self.m2 / jnp.maximum(self.count, 1), jnp.broadcast_to(self.count, self.m2.shape))


def abs_square(z: jax.Array) -> jax.Array:
    if jnp.iscomplexobj(z):
        return jnp.real(z) ** 2 + jnp.imag(z) ** 2
    return z * z


def quotient_error(numerator: jax.Array, denominator: jax.Array, quotient: jax.Array) -> jax.Array:
    """``(numerator - denominator * quotient) / denominator``: what a rounded real ``quotient`` misses.

    The product is formed exactly from halves of each factor's significand (Dekker's splitting), so the first
    partial product is within a factor 2 of the numerator and its difference exact; the others are smaller by
    a half's precision. Formed as one rounded product, ``numerator - denominator * quotient`` would be all
    rounding: the product's error is as large as the remainder it should reveal.
    """
    d_hi, d_lo = _significand_halves(jnp.broadcast_to(denominator, jnp.shape(quotient)).astype(quotient.dtype))
    q_hi, q_lo = _significand_halves(quotient)
    remainder = (((numerator - d_hi * q_hi) - d_hi * q_lo) - d_lo * q_hi) - d_lo * q_lo
    return remainder / denominator


def _significand_halves(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(hi, a - hi)``, ``hi`` rounded to half of ``a``'s significand bits (float32: 12 of 24), so a product of
    two halves is exact and ``a - hi`` is too."""
    info = jnp.finfo(a.dtype)
    hi = jax.lax.reduce_precision(a, exponent_bits=info.nexp, mantissa_bits=(info.nmant + 1) // 2 - 1)
    return hi, a - hi


def without_unit_axes(a: jax.Array) -> jax.Array:
    return jnp.reshape(a, tuple(d for d in jnp.shape(a) if d != 1))


def static_size(shape: tuple[int, ...], reduce_axes: tuple[int, ...]) -> int:
    size = 1
    for a in reduce_axes:
        size *= shape[a]
    return size


def _is_sharded(x: jax.Array, axes: tuple[int, ...]) -> bool:
    """Whether ``x``'s type shards any of ``axes`` over a mesh (explicit sharding); slicing those is refused."""
    spec = getattr(jax.typeof(x).sharding, "spec", None)
    return spec is not None and any(a < len(spec) and spec[a] is not None for a in axes)


def sample_shift(x: jax.Array, axes: tuple[int, ...], *, by_reduction: bool = False) -> jax.Array | None:
    """A value among ``x``'s per statistic (its first element along ``axes``), keepdims; None where it cannot be sliced.

    Its only job is to lie among the data, so the common offset cancels in ``x - shift``. Under explicit
    sharding a slice along a sharded axis is not expressible without a collective: the caller then shifts by a
    first-pass mean instead.

    ``by_reduction``: the largest of the first two elements along each reduced axis (along the leading ones for
    GroupNorm's channels within a group, and of every channel of the group), taken by a reduction, so it comes
    out in the layout of the statistics (see :class:`normjax._src.layout.XlaTpu`).
    """
    if _is_sharded(x, axes):
        return None
    if any(x.shape[a] == 0 for a in axes):  # nothing to cancel
        return jnp.zeros(tuple(1 if a in axes else n for a, n in enumerate(x.shape)), x.dtype)
    limits = tuple(1 if a in axes else n for a, n in enumerate(x.shape))
    last_kept = max((a for a in range(x.ndim) if a not in axes), default=-1)
    leading = tuple(a for a in axes if a < last_kept)
    trailing = tuple(a for a in axes if a > last_kept)
    contiguous = leading == tuple(range(leading[0], leading[-1] + 1)) if leading else False
    if not (contiguous and trailing) or _is_sharded(x, tuple(range(x.ndim))):
        if by_reduction:
            first_two = tuple(min(2, n) if a in axes else n for a, n in enumerate(x.shape))
            block = jax.lax.slice(x, (0,) * x.ndim, first_two)
            return jax.lax.stop_gradient(jnp.max(block, axes, keepdims=True))
        return jax.lax.stop_gradient(jax.lax.slice(x, (0,) * x.ndim, limits))
    # Reduced axes on both sides of a kept one (GroupNorm's channels within a group): a strided slice of x would
    # make XLA's TPU compiler copy all of x into another layout. So the first elements along the leading reduced
    # axes, a contiguous block, are sliced from a view that keeps x's minor axis whole, then the block's first
    # element (or largest value) along the trailing reduced axes.
    first, last = leading[0], leading[-1] + 1
    view = jnp.reshape(x, (math.prod(x.shape[:first]), math.prod(x.shape[first:last]), math.prod(x.shape[last:])))
    rows = min(2, view.shape[1]) if by_reduction else 1
    block = jnp.reshape(view[:, :rows, :], x.shape[:first] + (rows,) + x.shape[last:])
    if by_reduction:
        block_axes = (first,) + tuple(a - (last - first) + 1 for a in trailing)
        return jax.lax.stop_gradient(jnp.reshape(jnp.max(block, block_axes), limits))
    block = jnp.reshape(block, tuple(1 if a in leading else n for a, n in enumerate(x.shape)))
    return jax.lax.stop_gradient(jax.lax.slice(block, (0,) * x.ndim, limits))


def shifted_moments(
    x: jax.Array,
    axes: tuple[int, ...],
    *,
    mask: jax.Array | None,
    centered: bool,
    total: Total,
    sample_from: jax.Array | None = None,
    about_zero_first: bool = False,
    shift_by_reduction: bool = False,
) -> ShiftedMoments:
    """One device's statistics of ``x`` (in its statistics dtype) over ``axes``, keepdims.

    ``sample_from``: ``x`` before its cast to the statistics dtype, if any; the shift is sliced from it, so XLA
    does not write out the cast input for the slice (seen in the GPU and TPU compiles of bfloat16 inputs).
    ``shift_by_reduction``: how the shift is taken (see :func:`sample_shift`), the layout's choice.

    ``total(fn, operands)`` sums ``fn(*operands)`` over ``axes`` (keepdims): a layout's reduction (see
    :mod:`normjax._src.layout`). Masked-out elements are selected away before any arithmetic, so NaN or inf
    padding never reaches a statistic.
    """
    real = jnp.finfo(x.dtype).dtype
    small = tuple(1 if a in axes else n for a, n in enumerate(x.shape))
    if mask is None:
        count = jnp.full((1,) * x.ndim, static_size(x.shape, axes), real)
    else:
        count = jnp.sum(mask, axes, keepdims=True, dtype=real)

    def valid(values, m=None):
        return values if m is None else jnp.where(m, values, jnp.zeros((), values.dtype))

    operands = (x,) if mask is None else (x, mask)
    if not centered:
        m2 = total(lambda x, m=None: valid(abs_square(x), m), operands)
        zero = jnp.zeros(small, x.dtype)
        return ShiftedMoments(count, zero, zero, m2, zero)

    def sums(shift):
        """The sums of ``x - shift`` and of its square over ``axes``; of ``x`` and its square for ``shift`` None."""
        if shift is None:
            return (
                total(lambda x, m=None: valid(x, m), operands),
                total(lambda x, m=None: valid(abs_square(x), m), operands),
            )
        shifted = (x, shift) + operands[1:]
        return (
            total(lambda x, k, m=None: valid(x - k, m), shifted),
            total(lambda x, k, m=None: valid(abs_square(x - k), m), shifted),
        )

    def about(shift, s1, s2):
        n = jnp.maximum(count, 1)
        offset = s1 / n
        m2 = jnp.maximum(s2 - jnp.real(s1 * jnp.conj(offset)), 0)
        # Complex inputs are differentiated by JAX through the forward, which needs no error of the offset.
        error = jnp.zeros_like(offset) if jnp.iscomplexobj(x) else quotient_error(s1, n, offset)
        return ShiftedMoments(count, shift, offset, m2, error)

    sampled = x if sample_from is None else sample_from
    shift = None if mask is not None else sample_shift(sampled, axes, by_reduction=shift_by_reduction)
    shift = None if shift is None else shift.astype(x.dtype)
    if shift is None:  # a masked sample could be padding (NaN): shift by the mean of the valid elements
        shift = jax.lax.stop_gradient(total(lambda x, m=None: valid(x, m), operands) / jnp.maximum(count, 1))
    if not about_zero_first:
        return about(shift, *sums(shift))
    if mask is not None or jnp.iscomplexobj(x):
        return _about_rounded_mean(about(shift, *sums(shift)))
    s1, s2 = sums(None)
    unshifted = about(jnp.zeros_like(shift), s1, s2)
    # The relative rounding error of M2 from sums about zero is about eps * s2 / M2 = eps * (1 + mean^2 / var): at
    # most WELL_CONDITIONED * eps where this holds, against the shifted sums' 2 eps. Otherwise (a large mean, a
    # constant feature, a non-finite value) the sums are taken again about the sample.
    well_conditioned = for_every_member(jnp.all(s2 <= WELL_CONDITIONED * unshifted.m2))
    rounded = jax.lax.cond(
        well_conditioned,
        lambda: _about_rounded_mean(unshifted)[:4],
        lambda: _about_rounded_mean(about(shift, *sums(shift)))[:4],
    )
    return ShiftedMoments(*rounded, jnp.zeros_like(rounded[2]))


def _about_rounded_mean(moments: ShiftedMoments) -> ShiftedMoments:
    """The same statistics about the mean rounded to one float: shift ``fl(shift + offset)``, offset the rest
    (Fast2Sum), the offset's division error included.

    XLA:CPU's form (``about_zero_first``). Its statistics leave the branch as stored arrays, and XLA:CPU evaluates
    the small arrays an elementwise loop reads again in every element: there the output subtracts the shift
    and the derivative reads the offset, with no arithmetic on them left in its loops.
    """
    hi = moments.shift + moments.offset
    rest = ((moments.shift - hi) + moments.offset) + moments.offset_error
    rest = jnp.where(jnp.isfinite(hi), rest, jnp.zeros_like(rest))  # an infinite mean stays one (inf - inf is NaN)
    return moments._replace(shift=hi, offset=rest, offset_error=jnp.zeros_like(rest))


@jax.custom_batching.custom_vmap
def for_every_member(condition: jax.Array) -> jax.Array:
    """``condition``; under ``vmap``, whether it holds for every member of the batch, unbatched.

    Why: ``lax.cond`` with a batched predicate becomes a ``select`` that runs both branches (measured 1.2-1.3x
    the time of the slower branch alone for vmapped norms on XLA:CPU). With one predicate for the whole batch it
    stays a branch, and each member takes the accurate branch whenever any member needs it.
    """
    return condition


@for_every_member.def_vmap
def _for_every_member_batched(axis_size, in_batched, condition):
    del axis_size
    return (jnp.all(condition) if in_batched[0] else condition), False


@contextlib.contextmanager
def _grouped_collectives_explained(axis_name: AxisName, axis_index_groups: AxisIndexGroups) -> Iterator[None]:
    """Turns JAX's bare error for grouped collectives outside pmap into one that says what to do instead."""
    try:
        yield
    except NotImplementedError:
        if axis_index_groups is None:
            raise
        raise NotImplementedError(
            f"`axis_index_groups` is only supported by JAX under `jax.pmap`, not under the transformation that "
            f"binds `axis_name`={axis_name!r} (shard_map or vmap). For the same sub-group statistics split the "
            "axis in two: under shard_map build the mesh with shape (groups, per_group) and pass "
            "`axis_name='per_group'`; under vmap nest two vmaps and pass the inner axis name."
        ) from None


def psum(tree: Any, axis_name: AxisName, axis_index_groups: AxisIndexGroups) -> Any:
    """``lax.psum`` of a tree of (keepdims) statistics, all-reduced without their unit axes.

    Why squeezed: XLA:CPU fuses a reduction with the reshape after it, and its library reductions are several
    times slower when their result keeps unit axes (``(1, 1, 1, C)`` rather than ``(C,)``); an all-reduce of the
    keepdims shape would pin that shape onto every reduction feeding it.
    """
    if axis_name is None:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    with _grouped_collectives_explained(axis_name, axis_index_groups):
        summed = jax.lax.psum([without_unit_axes(a) for a in leaves], axis_name, axis_index_groups=axis_index_groups)
    return treedef.unflatten([jnp.reshape(s, jnp.shape(a)) for s, a in zip(summed, leaves, strict=True)])


def _names(axis_name: AxisName) -> tuple[Hashable, ...]:
    return tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)


def on_device_axes(axis_name: AxisName, like: jax.Array) -> bool:
    """Whether every name of ``axis_name`` is a ``shard_map`` device axis (``like``'s type varies over it)."""
    return all(name in jax.typeof(like).mat.varying for name in _names(axis_name))


def _gather(a: jax.Array, axis_name: AxisName, axis_index_groups: AxisIndexGroups) -> jax.Array:
    """``all_gather`` of ``a`` over every name of ``axis_name`` (device axes of ``shard_map``), devices along one
    leading axis, device-invariant so merged statistics can leave the ``shard_map`` replicated. Several names are
    gathered one after the other."""
    names = _names(axis_name)
    for name in reversed(names):
        groups = axis_index_groups if len(names) == 1 else None
        a = jax.lax.all_gather(a, name, axis_index_groups=groups, to="invarying")
    return jnp.reshape(a, (-1,) + a.shape[len(names) :])


def _gather_by_psum(a: jax.Array, axis_name: AxisName, axis_index_groups: AxisIndexGroups, size: int) -> jax.Array:
    """The all-gather of :func:`_gather` as one ``psum``, for ``vmap`` and ``pmap`` axes: each device writes ``a``
    into its own slot of zeros, and a sum of zeros and one value is that value exactly.

    Why not ``all_gather``: JAX (0.10.2) traces a ``custom_jvp`` rule again, without vmap's named axes, when the
    rule is linearized inside ``lax.scan``; ``all_gather`` and ``axis_size`` fail there, ``psum`` and
    ``axis_index`` do not. So ``size``, the number of devices per group, is given (static, read where the axis is
    bound: :func:`normjax._src.device_axes.synchronized_size`).
    """
    index = jax.lax.axis_index(axis_name)
    if axis_index_groups is None:
        slot = index
    else:  # the slot is the device's place within its group
        places = {device: place for group in axis_index_groups for place, device in enumerate(group)}
        slot = jnp.asarray([places[device] for device in range(len(places))])[index]
    own_slot = jnp.reshape(jnp.arange(size) == slot, (size,) + (1,) * a.ndim)
    slots = jnp.where(own_slot, a[None], jnp.zeros((), a.dtype))
    return psum(slots, axis_name, axis_index_groups)


def merge_across_devices(
    local: ShiftedMoments,
    axis_name: AxisName,
    axis_index_groups: AxisIndexGroups,
    *,
    size: int | None,
    centered: bool = True,
) -> tuple[ShiftedMoments, ShiftedMoments]:
    r"""The statistics of every device's valid elements together: one all-gather on ``shard_map`` device axes.

    Each device gathers every device's ``(count, shift, offset, m2)`` and merges them with Chan's formula about
    a common reference, device 0's shift :math:`k_0`:

    .. math::

        \delta_j = (k_j - k_0) + \delta_j^{local}, \quad n = \sum_j n_j, \quad
        \delta = \frac{1}{n}\sum_j n_j \delta_j, \quad M_2 = \sum_j M_{2,j} + \sum_j n_j (\delta_j - \delta)^2.

    Returns ``(own, common)``: the merged statistics relative to this device's own shift (offset
    :math:`(k_0 - k_i) + \delta`), with which local data is standardized exactly to rounding of its own size,
    and relative to :math:`k_0`, computed in the same order everywhere so the mean and variance it gives are
    bit-identical on every device. Uncentered statistics (zero shift) need only a ``psum``.
    """
    if axis_name is None:
        return local, local
    small_shape = local.m2.shape
    dtype = local.shift.dtype
    if not centered:
        count, m2 = psum((local.count, local.m2), axis_name, axis_index_groups)
        merged = local._replace(count=count, m2=m2)
        return merged, merged
    gathered_moments = (local.count, local.shift, local.offset, local.m2)
    stacked = jnp.stack([without_unit_axes(jnp.broadcast_to(a, small_shape)).astype(dtype) for a in gathered_moments])
    with _grouped_collectives_explained(axis_name, axis_index_groups):
        if on_device_axes(axis_name, local.shift):
            gathered = _gather(stacked, axis_name, axis_index_groups)
        else:
            gathered = _gather_by_psum(stacked, axis_name, axis_index_groups, size)
    real = local.m2.dtype
    counts, shifts, offsets, m2s = (gathered[:, i] for i in range(4))
    counts, m2s = jnp.real(counts).astype(real), jnp.real(m2s).astype(real)
    reference = shifts[:1]
    deltas = (shifts - reference) + offsets
    count = jnp.sum(counts, 0, keepdims=True)
    offset = jnp.sum(counts * deltas, 0, keepdims=True) / jnp.maximum(count, 1)
    m2 = jnp.sum(m2s, 0, keepdims=True) + jnp.sum(counts * abs_square(deltas - offset), 0, keepdims=True)
    reshape = lambda a: jnp.reshape(a, small_shape)  # noqa: E731
    untracked = jnp.zeros(small_shape, dtype)  # the merged offset's rounding error is not tracked
    common = ShiftedMoments(reshape(count), reshape(reference), reshape(offset), reshape(m2), untracked)
    own = common._replace(shift=local.shift, offset=(common.shift - local.shift) + common.offset)
    return own, common


def plain_total(axes: tuple[int, ...]) -> Total:
    """The layout-free reduction: ``sum(fn(*operands), axes, keepdims=True)``."""
    return lambda fn, operands: jnp.sum(fn(*operands), axes, keepdims=True)


@renamed_keywords(axes="reduction_axes")
@named_scope("moments")
def moments(
    x: ArrayLike,
    reduction_axes: Axes,
    *,
    mask: ArrayLike | None = None,
    axis_name: AxisName = None,
    axis_index_groups: AxisIndexGroups = None,
    keepdims: bool = False,
    centered: bool = True,
) -> Moments:
    r"""Mean, biased variance and count of ``x`` over ``reduction_axes``, stable and exact across devices.

    .. math::

        n = \sum_i m_i, \qquad \mu = \frac{1}{n}\sum_i m_i x_i, \qquad
        \sigma^2 = \frac{1}{n}\sum_i m_i \lvert x_i - \mu \rvert^2

    where :math:`m_i \in \{0, 1\}` is the mask and the sums also run over every device of ``axis_name``.
    The sums are taken about a shift that lies among the data (one sample of it; the mean of the valid elements
    when there is a mask), so they do not suffer the catastrophic cancellation of :math:`E[x^2] - E[x]^2` for
    inputs whose mean is large relative to their spread, and need one pass over ``x`` without a mask.
    Reductions run in float32 or wider whatever the input dtype (bfloat16 and float16 give float32 moments).

    With ``axis_name`` the statistics are those of the concatenation of every device's valid elements, exact
    for uneven per-device counts (a device with no valid element contributes nothing), merged with Chan's formula
    from one all-gather of ``4 * F`` numbers per device for ``F`` statistics under ``shard_map`` (one ``psum`` of
    ``4 * F`` numbers in each device's own slot under ``pmap`` and ``vmap``; a ``psum`` of ``2 * F`` when
    ``centered=False``). See the synchronization guide (``docs/guides/sync.md``).

    Args:
      x: a floating-point or complex array.
      reduction_axes: the axes to reduce (int or tuple; may be empty when ``axis_name`` does all the reducing).
      mask: optional boolean array broadcastable to ``x``; ``False`` elements contribute nothing whatever they
        hold (NaN, inf).
      axis_name: optional name (or tuple of names) of a mapped axis (``pmap``, ``shard_map``, ``vmap``) over
        which to also reduce.
      axis_index_groups: optional groups of indices along ``axis_name`` that are reduced separately.
      keepdims: keep the reduced axes as size-1 axes, so the moments broadcast against ``x``.
      centered: if False, ``mean`` is zero and ``var`` is the mean square (for RMSNorm).

    Returns:
      ``Moments(mean, var, count)``.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> x = jnp.array([[1e4 + 1.0, 1.0], [1e4 - 1.0, 3.0]])
      >>> m = normjax.moments(x, reduction_axes=0)
      >>> m.mean.tolist(), m.var.tolist(), m.count.tolist()
      ([10000.0, 2.0], [1.0, 1.0], [2.0, 2.0])
    """
    arguments.check_inexact(x)
    reduce_axes = axes_lib.canonicalize_axes(reduction_axes, jnp.ndim(x), "reduction_axes")
    arguments.check_mask(mask, jnp.shape(x))
    device_axes.check_axis_name(axis_name, axis_index_groups)
    arguments.check_static_bool(keepdims, "keepdims")
    arguments.check_static_bool(centered, "centered")
    x = jnp.asarray(x)
    x = x.astype(dtypes.stats_dtype(x.dtype))
    if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape)
    local = shifted_moments(x, reduce_axes, mask=mask, centered=centered, total=plain_total(reduce_axes))
    size = device_axes.synchronized_size(axis_name, axis_index_groups)
    result = merge_across_devices(local, axis_name, axis_index_groups, size=size, centered=centered)[1].moments()
    if not keepdims:
        result = Moments(*(jnp.squeeze(a, reduce_axes) for a in result))
    return result
