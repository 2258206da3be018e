"""Every norm gives the same result eagerly, under jit, vmap and pmap, and never retraces for the same shapes."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj

DEVICES = jax.local_device_count()
EXAMPLE = (4, 3, 6)  # one example for the norms below: (N, L, C)
STATE = nj.BatchNormState(mean=jnp.linspace(-1.0, 1.0, 6), var=jnp.linspace(0.5, 2.0, 6))
SCALE, BIAS = jnp.linspace(0.5, 1.5, 6), jnp.linspace(-1.0, 1.0, 6)

NORMS = {
    "batch_norm-train": lambda x: nj.batch_norm(x, STATE, SCALE, BIAS, training=True, momentum=0.9),
    "batch_norm-eval": lambda x: nj.batch_norm(x, STATE, SCALE, BIAS, training=False),
    "batch_norm-masked": lambda x: nj.batch_norm(x, STATE, training=True, mask=x > 0.0),
    "batch_norm-ghost": lambda x: nj.batch_norm(x, STATE, training=True, virtual_batch_size=2),
    "batch_norm-renorm": lambda x: nj.batch_norm(x, STATE, training=True, renorm_clipping=(2.0, 1.0)),
    "layer_norm": lambda x: nj.layer_norm(x, SCALE, BIAS),
    "rms_norm": lambda x: nj.rms_norm(x, SCALE, reduction_axes=(-2, -1), feature_axes=-1),
    "group_norm": lambda x: nj.group_norm(x, SCALE, BIAS, num_groups=3),
    "instance_norm": lambda x: nj.instance_norm(x, SCALE, BIAS, mask=x < 1.5),
    "moments": lambda x: nj.moments(x, (0, 1)),
    "normalize": lambda x: nj.normalize(x, 0.5, 2.0, SCALE, BIAS),
}


def stack_of_examples(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0.5, 1.0, (DEVICES, *EXAMPLE)), jnp.float32)


def assert_trees_close(got, want):
    # Same structure, shapes and dtypes; fusion under jit may reorder float32 operations: a few ulps, nothing more.
    chex.assert_trees_all_close(got, want, rtol=2e-6, atol=2e-6, strict=True)


def all_norms(x):
    return {name: fn(x) for name, fn in NORMS.items()}


@pytest.fixture(scope="module")
def results():
    """Every norm on every example: eagerly, jitted per example, under vmap and under pmap (one program each)."""
    xs = stack_of_examples()
    jitted = jax.jit(all_norms)
    per_example = [jitted(x) for x in xs]
    return {
        # Eager (op by op) is slow to run, so it is compared on one example, and the jitted function on all.
        "eager": all_norms(xs[0]),
        "jit": per_example[0],
        "stacked": jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_example),
        # vmap runs under jit: un-jitted vmap is op-by-op too, and takes the same batching rules.
        "vmap": jax.jit(jax.vmap(all_norms))(xs),
        "pmap": jax.pmap(all_norms)(xs),
    }


@pytest.mark.parametrize("name", NORMS.keys())
def test_eager_jit_vmap_and_pmap_agree(results, name):
    assert_trees_close(results["jit"][name], results["eager"][name])
    for transform in ("vmap", "pmap"):
        assert_trees_close(results[transform][name], results["stacked"][name])


def counting(fn):
    """`fn` with a Python side effect that runs once per trace, never per call of the compiled function."""
    traces = []

    def traced(*args, **kwargs):
        traces.append(None)
        return fn(*args, **kwargs)

    return traced, traces


def test_no_retracing_for_repeated_calls_with_the_same_shapes():
    counted = {name: counting(fn) for name, fn in NORMS.items()}
    jitted = jax.jit(lambda x: {name: fn(x) for name, (fn, _) in counted.items()})
    for seed in range(3):
        jax.block_until_ready(jitted(stack_of_examples(seed)[0]))
    assert {name: len(traces) for name, (_, traces) in counted.items()} == dict.fromkeys(NORMS, 1)


def test_a_training_loop_threading_the_state_compiles_once():
    # The new state has exactly the old one's shapes, dtypes and weak types, so feeding it back hits the cache;
    # momentum and epsilon passed as arguments are traced, so changing them does not recompile either.
    def step(state, x, momentum, epsilon):
        return nj.batch_norm(x, state, training=True, momentum=momentum, epsilon=epsilon)

    step, traces = counting(step)
    jitted = jax.jit(step)
    state = nj.init_batch_norm_state(6)
    for seed, momentum in enumerate([0.9, 0.99, 0.999]):
        _, state = jitted(state, stack_of_examples(seed)[0], momentum, 1e-5 * (seed + 1))
    assert state.mean.dtype == jnp.float32 and not state.mean.weak_type
    assert len(traces) == 1


def test_a_new_shape_compiles_once_more_and_only_once():
    fn, traces = counting(NORMS["layer_norm"])
    jitted = jax.jit(fn)
    for _ in range(2):
        jitted(jnp.ones((2, 6)))
        jitted(jnp.ones((5, 6)))
    assert len(traces) == 2


def test_sync_batch_norm_under_pmap_matches_the_global_batch():
    # With axis_name the per-device batches form one batch: the result equals normalizing the concatenation.
    xs = stack_of_examples()
    y, state = jax.pmap(lambda x: nj.batch_norm(x, STATE, training=True, axis_name="d"), axis_name="d")(xs)
    train = jax.jit(lambda x: nj.batch_norm(x, STATE, training=True))
    y_global, state_global = train(jnp.reshape(xs, (-1, *EXAMPLE[1:])))
    np.testing.assert_allclose(jnp.reshape(y, y_global.shape), y_global, rtol=1e-5, atol=1e-5)
    for d in range(DEVICES):
        np.testing.assert_allclose(state.mean[d], state_global.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.var[d], state_global.var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "norm",
    [
        lambda x: nj.moments(x, 0).var,
        lambda x: nj.normalize(x, 0.0, 1.0),
        lambda x: nj.layer_norm(x),
        lambda x: nj.rms_norm(x),
        lambda x: nj.group_norm(x, num_groups=1),
        lambda x: nj.batch_norm(x, nj.init_batch_norm_state(3), training=True)[0],
        lambda x: nj.batch_norm(x, nj.init_batch_norm_state(3), training=False)[0],
    ],
    ids=["moments", "normalize", "layer_norm", "rms_norm", "group_norm", "batch_norm_train", "batch_norm_eval"],
)
def test_numpy_float64_input_without_x64_computes_in_float32_silently(norm):
    # NumPy arrays default to float64; with x64 off JAX stores them as float32, and so must every norm, without
    # the "requested dtype float64 ... truncated" warning (the suite turns warnings into errors).
    x = np.random.default_rng(0).normal(size=(4, 3))
    assert not jax.config.jax_enable_x64
    y = norm(x)
    assert y.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y)))
