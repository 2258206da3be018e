"""How the core's reductions and elementwise sums are laid out for a backend: the one backend-specific module.

The core (:mod:`normjax._src.standardize`) writes every full-size computation as one of two forms, and a layout
decides how XLA sees it:

- ``total(fn, operands)``: ``sum(fn(*operands))`` over the reduction axes, keepdims;
- ``combine(terms)``: ``sum(fn(*operands) for fn, operands in terms)``, an array of the input's shape.

Operands are full-size arrays (the input's shape) or small ones that broadcast against it (statistics,
parameters). :class:`Generic` states them plainly; the GPU and TPU layouts refine it, and it runs under explicit
sharding, where shardings are part of the types and only reductions and broadcasts keep them. XLA's GPU and TPU
compilers fuse sibling reductions over the same input into one kernel that reads it once (checked in their
deviceless compiles, ``benchmarks/accelerators.py``).

:class:`XlaCpu` is chosen for the CPU platform (``jax.lax.platform_dependent``, resolved when the program is
lowered, so a program compiled for a GPU never contains it). Measured with ``benchmarks/run.py``: XLA:CPU runs
reductions as library fusions that absorb an elementwise producer only when they are its sole consumer, and its
common-subexpression pass merges identical broadcasts; so an ``x - shift`` shared by two reductions, or a tangent
term shared by the backward's reductions, is written out as a full-size temporary and read back. Here every
reduction and full-size term but one is built on a private reshaped view (:func:`_viewer`), so none is shared
and no temporary is written. One reduction and one term stay in the plain shape: two sibling reductions of one
input on distinct views crash XLA:CPU's runtime (jax 0.10.2), and the term that stays plain is the fusion that
adds the others.

XLA:CPU also reduces ``x`` and ``x * x`` about twice as fast as ``x - shift`` and its square (a broadcast operand
slows its reduction loops), so its statistics are first summed about zero (``about_zero_first``) and summed
again about the sample shift only when those sums are not accurate: when ``mean^2 > 3 var`` for some statistic
(see :func:`normjax._src.moments.shifted_moments`). GPU and TPU read ``x`` once either way and skip that test.

Layouts also choose the form in which the full-size passes subtract the mean ``shift + offset``
(``subtracted_mean``; see :mod:`normjax._src.standardize`). :class:`XlaTpu` is chosen for the TPU platform.
:class:`XlaGpu`, chosen for CUDA GPUs, sums a reduction to few statistics over a few thousand rows in two stages,
so XLA's GPU compiler fuses ``x - shift`` into it rather than writing it out.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp


class Generic:
    """Plain ``jnp``: every expression in the input's own shape.

    The full-size passes subtract the mean as ``hi``, rounded to one float as Flax's output subtracts it, then its
    rounding error ``lo``: ``(x - hi) - lo``. Why ``lo`` too: XLA forms ``hi = shift + s1 * (1 / n)`` again in
    every fusion that reads it, and XLA:CPU (which runs this layout under explicit sharding) contracts it into a
    fused multiply-add in some and not in others; ``hi`` alone could then differ by an ulp of
    the mean (1e-3 at a mean of 1e4) between the forward's output and the one the backward recomputes: 3e4x Flax's
    gradient error upstream of a BatchNorm, on a quarter of random batches. XLA's GPU compiler sees ``x - hi``
    and the statistics' ``x - shift`` as distinct expressions; a common ``x - shift`` (:class:`XlaTpu`'s form) is
    written to memory by the GPU compiler when the backward also reads it (BatchNorm NC bfloat16, GroupNorm and
    InstanceNorm float32: 1.06-1.29x Flax's bytes in the deviceless H100 compiles of
    ``benchmarks/accelerators.py``).
    """

    name = "generic"
    about_zero_first = False
    shift_by_reduction = False
    subtracted_mean = "hi, lo"

    def __init__(self, shape: tuple[int, ...], reduction_axes: tuple[int, ...], vary, *, first_tag: int = 1):
        del first_tag  # only XlaCpu's views are numbered
        self.shape = tuple(shape)
        self.reduction_axes = reduction_axes
        self.vary = vary

    def _small(self, a):
        return a if jnp.shape(a) == self.shape else self.vary(a)

    def total(self, fn, operands) -> jax.Array:
        values = fn(*(self._small(a) for a in operands))
        return jnp.sum(values, self.reduction_axes, keepdims=True)

    def combine(self, terms) -> jax.Array:
        return sum(fn(*(self._small(a) for a in operands)) for fn, operands in terms)


class XlaCpu(Generic):
    """Each reduction and each full-size term on its own view, so XLA:CPU fuses it and shares nothing."""

    name = "xla_cpu"
    about_zero_first = True
    # The statistics come about the mean rounded to one float (moments' about_zero_first), as stored arrays: the
    # output subtracts that shift, as Flax's subtracts its mean (hi, once merged across devices), and the
    # derivative corrects by the offset. With (x - hi) - lo, GroupNorm's forward+backward took twice the time
    # (benchmarks/run.py shapes), and one more add on the statistics cost 5-8 % of BatchNorm NC's: XLA:CPU
    # evaluates the small arrays an elementwise loop reads again in every element.
    subtracted_mean = "shift"

    def __init__(self, shape, reduction_axes, vary, *, first_tag: int = 1):
        super().__init__(shape, reduction_axes, vary)
        self._tags = itertools.count(first_tag)
        self._plain_taken = False

    def total(self, fn, operands) -> jax.Array:
        axes, ndim = self.reduction_axes, len(self.shape)
        if axes == tuple(range(ndim - len(axes), ndim)):
            # Innermost reductions (LayerNorm, RMSNorm) already run as one library fusion per row.
            return super().total(fn, operands)
        trailing = _trailing_reduced(axes, ndim)
        if not self._plain_taken:
            # One reduction per program stays in the plain shape (staged): two sibling reductions of the same
            # input on distinct views crash XLA:CPU's runtime (jax 0.10.2; an InstanceNorm of (359, 8, 8, 16)).
            self._plain_taken = True
            return _staged_sum(fn(*(self._small(a) for a in operands)), axes, trailing)
        pattern = tuple(1 if a in axes and a not in trailing else n for a, n in enumerate(self.shape))
        view, view_shape, kept = _viewer(self.shape, pattern, next(self._tags), self.vary)
        values = fn(*(view(a) for a in operands))
        view_axes = tuple(a for a in range(len(view_shape)) if a not in kept)
        partial = jnp.reshape(jnp.sum(values, view_axes), pattern)
        return jnp.sum(partial, trailing, keepdims=True) if trailing else partial

    def combine(self, terms) -> jax.Array:
        pattern = tuple(1 if a in self.reduction_axes else n for a, n in enumerate(self.shape))
        result, plain_taken = [], False
        for fn, operands in terms:
            small = [jnp.shape(a) for a in operands if jnp.shape(a) != self.shape]
            outer_product = bool(small) and jnp.broadcast_shapes(*small) == self.shape
            full = len(small) < len(operands)
            if not full and not outer_product:  # small: broadcast where it is added
                result.append(fn(*(self._small(a) for a in operands)))
            elif full and not outer_product and not plain_taken:
                # One full-size term (BatchNorm's dx * s * gamma) stays plain: the elementwise pass that adds the
                # terms is its fusion. A per-row by per-feature product (LayerNorm's s * gamma) never does: in the
                # plain shape XLA:CPU writes the full-size outer product out before the fusion reads it.
                plain_taken = True
                result.append(fn(*(self._small(a) for a in operands)))
            else:
                view, _, _ = _viewer(self.shape, pattern, next(self._tags), self.vary)
                result.append(jnp.reshape(fn(*(view(a) for a in operands)), self.shape))
        return sum(result)


class XlaTpu(Generic):
    """Generic, but the full-size passes subtract the shift and the offset, ``(x - shift) - offset``.

    Why (deviceless v5e compiles, ``benchmarks/accelerators.py``): to subtract ``hi = shift + offset``, XLA's
    TPU compiler forms ``hi`` in a small kernel of its own, in the layout of the slice that gave the shift,
    beside the one that forms the inverse standard deviation, and again in the backward. With the shift and
    the offset subtracted where ``x`` is read, the small per-statistic work needs no shift and fuses like
    Flax's: 1 to 9 kernels fewer per norm and mode (LayerNorm forward+backward 14 to 10, GroupNorm 41 to 32;
    BatchNorm NC has one more), the same bytes, and no temporary (LayerNorm's backward had one of 0.4 MB).

    The shift is taken by a reduction (``shift_by_reduction``; see :func:`normjax._src.moments.sample_shift`):
    the compiler tiles a ``(1, C)`` slice apart from the ``(C,)`` statistics, and each small computation that read
    both became a kernel of its own. Reduced, the shift is in the statistics' tiling: 1 to 3 kernels fewer
    (BatchNorm NC forward 12 to 9 and forward+backward 20 to 17, LayerNorm 7 to 6, InstanceNorm 8 to 7).
    """

    name = "xla_tpu"
    subtracted_mean = "shift, offset"
    shift_by_reduction = True


# Measured on the deviceless H100 compiles (jax 0.10.2): a column reduction with at least this many outputs
# fuses an elementwise producer that has a broadcast operand; one over at least this many rows is split in two
# stages by XLA itself; a first stage of 8 to 256 rows per group costs 25 % to under 1 % in partial sums.
GPU_FUSED_OUTPUTS = 4096
GPU_SPLIT_ROWS = 8192
GPU_ROWS_PER_GROUP = range(8, 257)


def _gpu_row_groups(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(first, last, rows_per_group)`` when the reduced axes are one block ``[first, last)`` followed by kept
    axes and :class:`XlaGpu` should stage it; None when XLA's own reduction reads ``x`` once."""
    if not axes or axes != tuple(range(axes[0], axes[-1] + 1)) or axes[-1] == len(shape) - 1:
        return None
    first, last = axes[0], axes[-1] + 1
    rows = math.prod(shape[first:last])
    outputs = math.prod(shape) // max(rows, 1)
    if outputs >= GPU_FUSED_OUTPUTS or rows >= GPU_SPLIT_ROWS:
        return None
    fitting = [g for g in GPU_ROWS_PER_GROUP if rows % g == 0 and (rows // g) * outputs >= GPU_FUSED_OUTPUTS]
    return (first, last, max(fitting)) if fitting else None


class XlaGpu(Generic):
    """Generic, but a reduction to few statistics over few rows is summed in two stages.

    Why (deviceless H100 compiles, ``benchmarks/accelerators.py``): XLA's GPU compiler runs a column reduction
    with fewer than :data:`GPU_FUSED_OUTPUTS` outputs over fewer than :data:`GPU_SPLIT_ROWS` rows in one stage,
    and then fuses no elementwise producer that has a second operand into it: ``x - shift`` is written to memory
    and read back, three times the bytes of ``sum(x)`` (BatchNorm NC (4096, 1024): 1.67x Flax's forward). Summed
    first over groups of rows, the first stage has enough outputs to fuse its producer; an optimization barrier
    keeps XLA from merging the two stages back. From :data:`GPU_SPLIT_ROWS` rows XLA splits the reduction itself.
    """

    name = "xla_gpu"

    def total(self, fn, operands) -> jax.Array:
        values = fn(*(self._small(a) for a in operands))
        staging = _gpu_row_groups(self.shape, self.reduction_axes)
        if staging is None:
            return jnp.sum(values, self.reduction_axes, keepdims=True)
        first, last, rows_per_group = staging
        rows = math.prod(self.shape[first:last])
        grouped = (*self.shape[:first], rows // rows_per_group, rows_per_group, *self.shape[last:])
        partial = jax.lax.optimization_barrier(jnp.sum(jnp.reshape(values, grouped), first + 1))
        kept = tuple(1 if a in self.reduction_axes else n for a, n in enumerate(self.shape))
        return jnp.reshape(jnp.sum(partial, first), kept)


LAYOUTS = {layout.name: layout for layout in (Generic, XlaCpu, XlaTpu, XlaGpu)}


def _staged_sum(values, axes: tuple[int, ...], trailing: tuple[int, ...]) -> jax.Array:
    """``jnp.sum(values, axes, keepdims=True)``, the trailing reduced axes last (see :func:`_trailing_reduced`)."""
    if trailing:
        # On a view whose axes after the leading ones are merged: were the two sums on one shape, XLA would
        # merge them back into the slow single reduction.
        shape, leading = jnp.shape(values), tuple(a for a in axes if a not in trailing)
        split = max(leading) + 1
        partial = jnp.sum(jnp.reshape(values, shape[:split] + (math.prod(shape[split:]),)), leading)
        values = jnp.reshape(partial, tuple(1 if a in leading else n for a, n in enumerate(shape)))
        axes = trailing
    return jnp.sum(values, axes, keepdims=True)


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


def _viewer(shape: tuple[int, ...], pattern: tuple[int, ...], tag: int, vary):
    """Puts arrays on a private view of ``shape``: ``tag`` leading unit axes, adjacent axes of one role merged.

    Expressions built on views of distinct shapes (a distinct ``tag`` per use) cannot be merged by CSE, so each
    fuses into its own reduction or term and no temporary is written. Axes are merged by their role in
    ``pattern`` (size 1: reduced; else kept). Full-size arrays are reshaped onto the view; small ones are
    squeezed to their non-unit merged axes, marked device-varying by ``vary`` at that size, and broadcast with
    ``broadcast_in_dim``, so transposed reductions also reduce the unit axes (XLA:CPU's reductions are very slow
    when they keep a unit axis).
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
        if jnp.shape(a) == tuple(shape):
            return jnp.reshape(a, view_shape)
        a = jnp.reshape(a, (1,) * (len(shape) - jnp.ndim(a)) + jnp.shape(a))
        mixed = [i for g in groups if len({a.shape[i] == 1 for i in g if shape[i] != 1}) > 1 for i in g]
        if mixed:  # a group partly broadcast: make it whole
            a = jnp.broadcast_to(a, tuple(shape[i] if i in mixed else n for i, n in enumerate(a.shape)))
        full = [k for k, g in enumerate(groups) if any(a.shape[i] != 1 for i in g)]
        squeezed = vary(jnp.reshape(a, tuple(view_shape[tag + k] for k in full)))
        return jax.lax.broadcast_in_dim(squeezed, view_shape, tuple(tag + k for k in full))

    kept = tuple(tag + k for k, g in enumerate(groups) if pattern[g[0]] != 1)
    return to_view, view_shape, kept
