"""Syncing diverged per-device running statistics across replicas."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax

DEVICES = 4


def _diverged_replicas():
    """Per-device BatchNorm statistics after one step of unsynchronized training on different data."""
    model = nn.BatchNorm(use_running_average=False, momentum=0.5)
    x = jax.random.normal(jax.random.key(0), (DEVICES, 6, 3)) * jnp.arange(1.0, DEVICES + 1)[:, None, None]
    variables = model.init(jax.random.key(1), x[0])

    def step(batch):
        return model.apply(variables, batch, mutable=["batch_stats"])[1]["batch_stats"]

    return jax.pmap(step, devices=jax.devices()[:DEVICES])(x)


def test_sync_under_pmap_averages_and_agrees():
    stats = _diverged_replicas()
    assert not np.allclose(stats["var"][0], stats["var"][1])
    synced = jax.pmap(
        lambda s: normjax.sync_batch_stats(s, "devices"), axis_name="devices", devices=jax.devices()[:DEVICES]
    )(stats)
    for name in ("mean", "var"):
        expected = np.mean(np.asarray(stats[name], np.float64), axis=0)
        for replica in range(DEVICES):
            np.testing.assert_allclose(synced[name][replica], expected, rtol=1e-6)
        np.testing.assert_array_equal(synced[name][0], synced[name][DEVICES - 1])


def test_average_replicas_outside_pmap_equals_sync():
    stats = _diverged_replicas()
    synced = jax.pmap(
        lambda s: normjax.sync_batch_stats(s, "devices"), axis_name="devices", devices=jax.devices()[:DEVICES]
    )(stats)
    averaged = normjax.average_replicas(stats)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), averaged, synced)
    assert jax.tree.map(jnp.shape, averaged) == jax.tree.map(jnp.shape, stats)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="leading device axis"):
        normjax.average_replicas({"mean": jnp.array(1.0)})
    with pytest.raises(ValueError, match="average_replicas"):
        normjax.sync_batch_stats({"mean": jnp.ones(2)}, None)
