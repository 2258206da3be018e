"""Agreeing on one set of running statistics across data-parallel replicas before evaluation."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from normjax._src import device_axes
from normjax._src.typing import AxisName


def sync_batch_stats(batch_stats: Any, axis_name: AxisName) -> Any:
    """The mean of each running statistic over the devices of ``axis_name``, inside ``pmap`` or ``shard_map``.

    Without synchronized BatchNorm each replica's running statistics follow its own data and diverge; before
    evaluating or checkpointing, replace them by their average so every replica holds the same values (the
    ``cross_replica_mean`` step of Flax's ImageNet example). The running variances are averaged too: each is
    an estimate of the same population variance, so their mean is the natural combined estimate. Integer
    leaves (the step ``count`` of Batch Renormalization's warm-up) take their largest value instead, so they
    stay integers.

    Args:
      batch_stats: a tree of running statistics (e.g. ``variables["batch_stats"]``), per device.
      axis_name: the name(s) of the mapped device axis.

    Returns:
      The averaged tree, identical on every device.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normjax
      >>> stats = {"bn": {"mean": jnp.arange(2.0)[:, None], "var": jnp.array([[1.0], [3.0]])}}
      >>> synced = jax.pmap(lambda s: normjax.sync_batch_stats(s, "devices"), axis_name="devices",
      ...                   devices=jax.devices()[:2])(stats)
      >>> synced["bn"]["mean"].tolist(), synced["bn"]["var"].tolist()
      ([[0.5], [0.5]], [[2.0], [2.0]])
    """
    if axis_name is None:
        raise ValueError(
            "`sync_batch_stats` needs the `axis_name` of the device axis (of pmap or shard_map), got None. "
            "Outside pmap, average replicated state with `average_replicas` instead."
        )
    device_axes.check_axis_name(axis_name, None)

    def synchronized(leaf):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.integer):
            return jax.lax.pmax(leaf, axis_name)
        return jax.lax.pmean(leaf, axis_name)

    return jax.tree.map(synchronized, batch_stats)


def average_replicas(replicated: Any) -> Any:
    """The mean over the leading (device) axis of a replicated tree, broadcast back to every replica.

    The outside-``pmap`` counterpart of :func:`sync_batch_stats`, for state replicated along a leading
    device axis (``flax.jax_utils.replicate`` style), e.g. ``state.replace(batch_stats=average_replicas(...))``.
    Integer leaves (step counters) take their largest value instead.

    Args:
      replicated: a tree whose leaves have the device axis first.

    Returns:
      A tree of the same shapes whose every replica holds the average.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> normjax.average_replicas({"mean": jnp.array([[0.0], [2.0]])})["mean"].tolist()
      [[1.0], [1.0]]
    """

    def average(leaf):
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                "`average_replicas` needs a leading device axis on every leaf, got a scalar. Pass the replicated "
                "tree (leaves of shape (devices, ...)), or use `sync_batch_stats` inside pmap."
            )
        if jnp.issubdtype(jnp.result_type(leaf), jnp.integer):
            return jnp.broadcast_to(jnp.max(leaf, axis=0, keepdims=True), jnp.shape(leaf))
        return jnp.broadcast_to(jnp.mean(leaf, axis=0, keepdims=True), jnp.shape(leaf)).astype(leaf.dtype)

    return jax.tree.map(average, replicated)
