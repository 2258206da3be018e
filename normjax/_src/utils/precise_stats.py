"""Precise BatchNorm statistics: the population statistics of every BatchNorm, recomputed from N batches."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from normjax._src.optional_dependencies import import_optional
from normjax._src.typing import ArrayLike
from normjax._src.utils import _paths

KeyPath = tuple[Any, ...]  # a leaf's path, as jax.tree_util.tree_map_with_path gives it


def precise_batch_stats(
    apply_fn: Callable[[Any, Any], Any],
    variables: dict[str, Any],
    batches: Iterable[Any],
    *,
    variance: Literal["pooled", "mean"] = "pooled",
    batch_size: Callable[[Any], int] | None = None,
    return_counts: bool = False,
) -> Any:
    r"""Recomputes every BatchNorm's running statistics as population statistics over ``batches``.

    The exponential moving averages kept during training lag behind the weights and are noisy; evaluating with
    statistics recomputed from a few hundred batches with the final weights is often more accurate (fvcore's
    PreciseBN). Each batch goes through the model's own ``apply_fn`` in training mode, so every BatchNorm sees
    exactly the inputs it sees in training (same masks, same synchronization). For batch :math:`i` of size
    :math:`n_i` with batch statistics :math:`\mu_i, \sigma_i^2` of a layer:

    .. math::

        \hat\mu = \frac{\sum_i n_i \mu_i}{\sum_i n_i}, \qquad
        \hat\sigma^2_{\text{pooled}} = \frac{\sum_i n_i \left(\sigma_i^2 + (\mu_i - \hat\mu)^2\right)}{\sum_i n_i},
        \qquad \hat\sigma^2_{\text{mean}} = \frac{\sum_i n_i \sigma_i^2}{\sum_i n_i}

    ``"pooled"`` (default) is the exact variance of all the examples together, the population variance that
    evaluation should use (Wu & Johnson, 2021; fvcore's current default). ``"mean"`` averages the batch
    variances, as the running average and fvcore's first version do; it leaves out the spread of the batch
    means, so it underestimates the population variance, by more for smaller batches. The merge is Chan's
    parallel update, stable in float32. Variances are taken as the layers store them (biased for Flax; with
    ``unbiased_running_var`` the per-batch correction is kept).

    How: before each batch the running mean is set to zero and the running variance to a marker no update
    can produce (:math:`-t`, minus the smallest normal number of its dtype), so a layer with momentum :math:`m`
    stores :math:`(1 - m)\,\mu_i` and :math:`(1 - m)\,\sigma_i^2` (up to :math:`m t`, far below float32
    resolution), which are divided by :math:`1 - m` (read from the layers while tracing ``apply_fn`` once).
    Layers whose training output depends on their running statistics (Batch Renormalization) should be
    recomputed with that option off. A step counter (``batch_stats/count``, kept by Batch Renormalization's
    warm-up) is not a statistic: it is returned as it was.

    Skipped batches contribute nothing: a feature whose layer kept its running statistics for a batch (an
    empty or all-masked batch, or non-finite batch statistics with normjax's ``skip_nonfinite``) still holds
    the marker afterwards, and that batch is left out of that feature's statistics (and of its weight); so is
    a batch whose statistics are NaN or infinite (a layer that does not skip them, such as Flax's).
    A feature that no batch updated keeps its value from ``variables``, with a ``RuntimeWarning``.

    Args:
      apply_fn: ``apply_fn(variables, batch) -> batch_stats``: one training-mode forward pass returning the
        updated ``batch_stats`` collection, e.g. ``lambda v, b: model.apply(v, b, train=True,
        mutable=["batch_stats"])[1]["batch_stats"]`` (jit it for speed). Must call linen ``apply``.
      variables: the model's variables, with a ``"batch_stats"`` collection.
      batches: an iterable of inputs for ``apply_fn`` (e.g. ``itertools.islice(loader, 200)``).
      variance: ``"pooled"`` or ``"mean"``, see above.
      batch_size: ``batch_size(batch) -> int``, each batch's weight; default: the size of the leading axis of
        the batch's first leaf.
      return_counts: also return, per statistic and feature, how many batches were used.

    Returns:
      The recomputed ``batch_stats`` tree, same structure and dtypes as ``variables["batch_stats"]``; with
      ``return_counts``, the pair ``(batch_stats, counts)`` where ``counts`` has the same structure (without
      step counters) and holds the number of batches (int32, per feature) that entered each statistic.

    Example:
      >>> import flax.linen as nn, jax.numpy as jnp
      >>> import normjax
      >>> model = nn.BatchNorm(use_running_average=False)
      >>> variables = model.init(jax.random.key(0), jnp.ones((2, 1)))
      >>> apply_fn = lambda v, b: model.apply(v, b, mutable=["batch_stats"])[1]["batch_stats"]
      >>> batches = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [6.0], [8.0], [10.0]])]
      >>> stats = normjax.precise_batch_stats(apply_fn, variables, batches)
      >>> round(float(stats["mean"][0]), 4), round(float(stats["var"][0]), 4)
      (5.0, 11.6667)

      A batch the layer skips (here an empty one with normjax's layer) is left out and not counted:

      >>> from normjax import linen as njn
      >>> model = njn.BatchNorm(use_running_average=False)
      >>> apply_fn = lambda v, b: model.apply(v, b, mutable=["batch_stats"])[1]["batch_stats"]
      >>> stats, counts = normjax.precise_batch_stats(
      ...     apply_fn, variables, batches + [jnp.zeros((0, 1))], return_counts=True)
      >>> round(float(stats["mean"][0]), 4), counts["mean"].tolist()
      (5.0, [2])

    References:
      Wu & Johnson, "Rethinking 'Batch' in BatchNorm", arXiv:2105.07576, 2021. fvcore ``update_bn_stats``.
    """
    if variance not in ("pooled", "mean"):
        raise ValueError(f"`variance` must be 'pooled' or 'mean', got {variance!r}.")
    if not callable(apply_fn):
        raise TypeError(
            f"`apply_fn` must be a function `apply_fn(variables, batch) -> batch_stats`, got {type(apply_fn).__name__}."
            ' Pass e.g. `lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"])[1]["batch_stats"]`.'
        )
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        have = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(
            f"`variables` has no 'batch_stats' collection (it has {have}); precise statistics need the variables "
            "of a model with BatchNorm layers: pass e.g. `model.init(key, x)`."
        )
    if batch_size is not None and not callable(batch_size):
        raise TypeError(
            f"`batch_size` must be a function `batch_size(batch) -> int` (or None), got {batch_size!r}. Pass e.g. "
            "`batch_size=lambda batch: batch['image'].shape[0]`."
        )
    try:
        batches = iter(batches)
    except TypeError:
        raise TypeError(
            f"`batches` must be an iterable of inputs for `apply_fn`, got {type(batches).__name__}. Pass e.g. a "
            "list of arrays or `itertools.islice(loader, 200)`."
        ) from None
    batch_size = _leading_size if batch_size is None else batch_size
    stored_template = variables["batch_stats"]
    template = _without_counters(stored_template)
    markers = jax.tree_util.tree_map_with_path(_marker, template)
    marked = {**variables, "batch_stats": _with_counters(markers, stored_template)}
    total = None
    for batch in batches:
        if total is None:
            retention = _retention_tree(apply_fn, marked, batch)
            total = _empty(template)
        stored = apply_fn(marked, batch)
        if jax.tree.structure(stored) != jax.tree.structure(stored_template):
            raise ValueError(
                "`apply_fn` must return the updated 'batch_stats' collection, of the structure of "
                f"`variables['batch_stats']` ({jax.tree.structure(stored_template)}), got "
                f"{jax.tree.structure(stored)}. "
                'Return `model.apply(v, b, train=True, mutable=["batch_stats"])[1]["batch_stats"]`.'
            )
        stored = _without_counters(stored)
        stats = _batch_statistics(stored, retention)
        weight = _weight(batch_size(batch))
        total = _merge(total, _single(weight, _used(stored, markers, stats), stats))
    if total is None:
        raise ValueError("`batches` is empty: precise statistics need at least one batch.")
    result, counts = _finish(total, template, variance)
    result = _with_counters(result, stored_template)
    return (result, counts) if return_counts else result


def _has_counters(tree) -> bool:
    return any(_paths.leaf_path(path)[-1:] == ("count",) for path, _ in jax.tree_util.tree_leaves_with_path(tree))


def _without_counters(tree):
    """``tree`` without its step counters (``count`` leaves, kept by Batch Renormalization's warm-up)."""
    if not isinstance(tree, Mapping) or not _has_counters(tree):
        return tree
    return {k: _without_counters(v) for k, v in tree.items() if k != "count" or isinstance(v, Mapping)}


def _with_counters(tree, template):
    """``tree`` with the step counters of ``template`` put back where :func:`_without_counters` took them."""
    if not isinstance(template, Mapping) or not _has_counters(template):
        return tree
    return {k: _with_counters(tree[k], v) if k in tree else v for k, v in template.items()}


def _marker(key_path: KeyPath, leaf: ArrayLike) -> jax.Array:
    """What a statistic is set to before each batch: 0 for means, a negative variance no update can produce."""
    leaf = jnp.asarray(leaf)
    if _paths.leaf_path(key_path)[-1:] == ("var",) and jnp.issubdtype(leaf.dtype, jnp.floating):
        return jnp.full(leaf.shape, -jnp.finfo(leaf.dtype).tiny, leaf.dtype)
    return jnp.zeros_like(leaf)


def _used(stored: Any, markers: Any, stats: Any) -> Any:
    """Per leaf and feature: whether the batch enters the statistics of the layer holding the leaf.

    It does where the layer updated its statistics (its variance no longer holds the marker: a layer keeps its
    statistics bit for bit when it skips a feature, while an update ``m * (-t) + (1 - m) * var`` with
    ``var >= 0`` and ``m < 1`` is above ``-t``) and they are finite (a layer that does not skip non-finite
    batches, such as Flax's, stores NaN or inf there).
    """

    def used(key_path, _):
        module = _paths.leaf_path(key_path)[:-1]
        var, marker = _lookup(stored, module + ("var",)), _lookup(markers, module + ("var",))
        if var is None or marker is None:
            return None
        updated = jnp.asarray(var) != jnp.asarray(marker).astype(jnp.result_type(var))
        for name in ("mean", "var"):
            value = _lookup(stats, module + (name,))
            if value is not None:
                updated = updated & jnp.isfinite(value)
        return updated

    return jax.tree_util.tree_map_with_path(used, stored)


def _lookup(tree: Any, path: _paths.Path) -> Any:
    for name in path:
        if not isinstance(tree, Mapping) or name not in tree:
            return None
        tree = tree[name]
    return tree


def _weight(size: Any) -> jax.Array:
    if isinstance(size, bool | np.bool_) or not (
        isinstance(size, numbers.Real) or (hasattr(size, "dtype") and jnp.ndim(size) == 0)
    ):
        raise TypeError(
            f"`batch_size(batch)` must return a non-negative number (the batch's weight), got {size!r}. Return "
            "e.g. `batch['image'].shape[0]`."
        )
    if not 0 <= float(size) < math.inf:
        raise ValueError(f"`batch_size(batch)` must return a non-negative, finite number, got {size!r}.")
    return jnp.asarray(size, jnp.float32)


def _leading_size(batch: Any) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves or jnp.ndim(leaves[0]) == 0:
        raise ValueError(
            "cannot infer the batch size from a batch without a leading axis; pass `batch_size=lambda batch: ...`."
        )
    return jnp.shape(leaves[0])[0]


def _retention_tree(apply_fn: Callable[[Any, Any], Any], variables: dict[str, Any], batch: Any) -> Any:
    """``1 - momentum`` of each layer, as a tree of the structure of ``batch_stats`` (mean and var leaves)."""
    nn = import_optional("flax.linen", needed_by="normjax.precise_batch_stats")

    momenta = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and _paths.is_kind(module, ("BatchNorm",)):
            momenta[tuple(module.path)] = module.momentum
        return next_fun(*args, **kwargs)

    def traced(v, b):
        # disable_jit: a jitted `apply_fn` whose trace is cached would otherwise skip the recording.
        with jax.disable_jit(), nn.intercept_methods(record):
            return apply_fn(v, b)

    jax.eval_shape(traced, variables, batch)

    def retention(key_path, leaf):
        module_path = _paths.leaf_path(key_path)[:-1]
        if module_path not in momenta:
            raise ValueError(
                f"batch statistics at {'/'.join(module_path)!r} were not written by a BatchNorm layer during "
                "`apply_fn`; precise statistics need every 'batch_stats' entry to belong to a BatchNorm."
            )
        momentum = momenta[module_path]
        if momentum >= 1.0:
            raise ValueError(
                f"the BatchNorm at {'/'.join(module_path)!r} has momentum={momentum}: it never updates its "
                "running statistics, so its batch statistics cannot be read back."
            )
        return jnp.asarray(1.0 - momentum, jnp.result_type(leaf))

    return jax.tree_util.tree_map_with_path(retention, _without_counters(variables["batch_stats"]))


def _batch_statistics(stored: Any, retention: Any) -> Any:
    # max(., 0): the marker's trace (m * t, far below float32 resolution) cannot make a variance negative.
    def read(key_path, value, r):
        value = jnp.asarray(value).astype(jnp.float32)
        if _paths.leaf_path(key_path)[-1:] == ("var",):
            value = jnp.maximum(value, 0.0)
        return value / r.astype(jnp.float32)

    return jax.tree_util.tree_map_with_path(read, stored, retention)


def _empty(template: Any) -> Any:
    """The sufficient statistics of no batch: per leaf a weight, a batch count, a value and a between-batch sum."""

    def zeros(leaf):
        shape = jnp.shape(leaf)
        return (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(shape, jnp.float32))  # fmt: skip

    return jax.tree.map(zeros, template)


def _single(weight: jax.Array, used: Any, stats: Any) -> Any:
    """One batch's sufficient statistics: its weight and count where the layer used the batch, 0 elsewhere."""

    def single(is_used, value):
        if is_used is None:  # a statistic without a variance beside it: always taken
            is_used = jnp.ones(jnp.shape(value), bool)
        return (jnp.where(is_used, weight, 0.0), is_used.astype(jnp.int32), value, jnp.zeros(jnp.shape(value)))

    return jax.tree.map(single, used, stats, is_leaf=lambda a: a is None)


def _merge(a: Any, b: Any) -> Any:
    """Chan's parallel merge of two trees of ``(weight, batches, value, between-batch sum of squares)``, per feature.

    Mean leaves merge as weighted means and accumulate the squared deviations of the batch means; the ``var``
    leaves merge as weighted means of the within-batch variances, so both variance conventions can be read at
    the end. A side of weight 0 (no batch, or skipped batches) leaves the other unchanged: ``where``, never a
    multiplication by 0, so whatever a skipped batch stored cannot leak in.
    """

    def merge(key_path, sa, sb):
        n_a, k_a, u, between_a = sa
        n_b, k_b, v, between_b = sb
        n = n_a + n_b
        w = n_b / jnp.where(n > 0, n, 1.0)
        merged = jnp.where(n_b > 0, u + (v - u) * w, u)
        between = between_a + between_b
        if _is_mean(key_path):
            spread = (v - u) ** 2 * (n_a * w)
            between = between + jnp.where((n_a > 0) & (n_b > 0), spread, 0.0)
        return n, k_a + k_b, merged, between

    return jax.tree_util.tree_map_with_path(merge, a, b, is_leaf=lambda t: isinstance(t, tuple))


def _is_mean(key_path: KeyPath) -> bool:
    return _paths.leaf_path(key_path)[-1:] == ("mean",)


def _finish(total: Any, template: Any, variance: str) -> Any:
    def result(key_path, stats, leaf_template):
        n, _, value, _ = stats
        path = _paths.leaf_path(key_path)
        if path[-1:] == ("var",) and variance == "pooled":
            between = _lookup(total, path[:-1] + ("mean",))
            if between is not None:
                value = value + between[3] / jnp.where(n > 0, n, 1.0)
        leaf_template = jnp.asarray(leaf_template)
        return jnp.where(n > 0, value, leaf_template).astype(leaf_template.dtype)

    is_stats = lambda t: isinstance(t, tuple)  # noqa: E731
    result_tree = jax.tree_util.tree_map_with_path(result, total, template, is_leaf=is_stats)
    counts = jax.tree.map(lambda stats: stats[1], total, is_leaf=is_stats)
    unused = sorted(
        {
            "/".join(_paths.leaf_path(path)[:-1]) or "the top-level BatchNorm"
            for path, count in jax.tree_util.tree_leaves_with_path(counts)
            if not bool(jnp.all(count > 0))
        }
    )
    if unused:
        warnings.warn(
            f"precise_batch_stats: no batch updated some features of {unused} (every batch was empty, masked or "
            "non-finite there); those features keep their values from `variables` (see `return_counts=True`).",
            RuntimeWarning,
            stacklevel=3,
        )
    return result_tree, counts
