"""Precise BatchNorm statistics: the population statistics of every BatchNorm, recomputed from N batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from normjax._src.utils import _paths


def precise_batch_stats(
    apply_fn: Callable[[Any, Any], Any],
    variables: dict[str, Any],
    batches: Iterable[Any],
    *,
    variance: Literal["pooled", "mean"] = "pooled",
    batch_size: Callable[[Any], int] | None = None,
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

    How: before each batch the running statistics are set to zero, so a layer with momentum :math:`m` stores
    :math:`(1 - m)\,\mu_i` and :math:`(1 - m)\,\sigma_i^2`, which are divided by :math:`1 - m` (read from the
    layers while tracing ``apply_fn`` once). Layers whose training output depends on their running statistics
    (Batch Renormalization) should be recomputed with that option off.

    Args:
      apply_fn: ``apply_fn(variables, batch) -> batch_stats``: one training-mode forward pass returning the
        updated ``batch_stats`` collection, e.g. ``lambda v, b: model.apply(v, b, train=True,
        mutable=["batch_stats"])[1]["batch_stats"]`` (jit it for speed). Must call linen ``apply``.
      variables: the model's variables, with a ``"batch_stats"`` collection.
      batches: an iterable of inputs for ``apply_fn`` (e.g. ``itertools.islice(loader, 200)``).
      variance: ``"pooled"`` or ``"mean"``, see above.
      batch_size: ``batch_size(batch) -> int``, each batch's weight; default: the size of the leading axis of
        the batch's first leaf.

    Returns:
      The recomputed ``batch_stats`` tree, same structure and dtypes as ``variables["batch_stats"]``.

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

    References:
      Wu & Johnson, "Rethinking 'Batch' in BatchNorm", arXiv:2105.07576, 2021. fvcore ``update_bn_stats``.
    """
    if variance not in ("pooled", "mean"):
        raise ValueError(f"`variance` must be 'pooled' or 'mean', got {variance!r}.")
    if "batch_stats" not in variables:
        raise ValueError(
            f"`variables` has no 'batch_stats' collection (it has {sorted(variables)}); precise statistics need "
            "a model with BatchNorm layers."
        )
    batch_size = _leading_size if batch_size is None else batch_size
    zeroed = {**variables, "batch_stats": jax.tree.map(jnp.zeros_like, variables["batch_stats"])}
    total = None
    for batch in batches:
        if total is None:
            retention = _retention_tree(apply_fn, zeroed, batch)
        stored = apply_fn(zeroed, batch)
        count = jnp.asarray(batch_size(batch), jnp.float32)
        stats = _batch_statistics(stored, retention)
        total = _single(count, stats) if total is None else _merge(total, _single(count, stats))
    if total is None:
        raise ValueError("`batches` is empty: precise statistics need at least one batch.")
    return _finish(total, variables["batch_stats"], variance)


def _leading_size(batch) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves or jnp.ndim(leaves[0]) == 0:
        raise ValueError(
            "cannot infer the batch size from a batch without a leading axis; pass `batch_size=lambda batch: ...`."
        )
    return jnp.shape(leaves[0])[0]


def _retention_tree(apply_fn, variables, batch):
    """``1 - momentum`` of each layer, as a tree of the structure of ``batch_stats`` (mean and var leaves)."""
    import flax.linen as nn

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

    return jax.tree_util.tree_map_with_path(retention, variables["batch_stats"])


def _batch_statistics(stored, retention):
    return jax.tree.map(lambda s, r: s.astype(jnp.float32) / r.astype(jnp.float32), stored, retention)


def _single(count, stats):
    """(count, per-leaf tree): the sufficient statistics of one batch for Chan's merge."""
    return count, stats, jax.tree.map(jnp.zeros_like, stats)


def _merge(a, b):
    """Chan's parallel merge of ``(n, mean-and-var tree, between-batch sum of squares tree)``.

    Mean leaves merge as weighted means; the ``var`` leaves merge as weighted means of the within-batch
    variances, and the squared deviations of the batch means are accumulated separately so that both variance
    conventions can be read at the end.
    """
    n_a, x_a, between_a = a
    n_b, x_b, between_b = b
    n = n_a + n_b
    w = n_b / n
    merged = jax.tree.map(lambda u, v: u + (v - u) * w, x_a, x_b)
    between = jax.tree_util.tree_map_with_path(
        lambda path, ba, bb, u, v: ba + bb + (v - u) ** 2 * (n_a * n_b / n) if _is_mean(path) else ba + bb,
        between_a,
        between_b,
        x_a,
        x_b,
    )
    return n, merged, between


def _is_mean(key_path) -> bool:
    return _paths.leaf_path(key_path)[-1:] == ("mean",)


def _finish(total, template, variance):
    n, merged, between = total

    def result(key_path, value, leaf_template):
        path = _paths.leaf_path(key_path)
        if path[-1:] == ("var",) and variance == "pooled":
            value = value + _lookup_mean_between(between, path) / n
        return value.astype(jnp.result_type(leaf_template))

    return jax.tree_util.tree_map_with_path(result, merged, template)


def _lookup_mean_between(between, var_path):
    node = between
    for name in var_path[:-1]:
        node = node[name]
    return node["mean"]
