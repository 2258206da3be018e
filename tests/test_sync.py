"""Synchronized statistics across devices against a float64 reference of the GLOBAL batch.

Every way JAX code is parallelized: ``pmap``, ``shard_map`` over a ``Mesh`` inside ``jit``, ``vmap`` with
``axis_name`` on per-example code, tuples of axis names (2-D meshes, ``pmap(vmap(...))``), and plain ``jit`` of
sharded arrays with no ``axis_name``. The data cases cover uneven per-device counts (the Flax probe's 8, 1, 1, 1),
a device without a valid row, masked-out positions holding NaN, and a large offset (mean 1e4, std 1).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import normjax

DEVICES = 8
ROWS = 8  # rows per device
C = 3
MOMENTUM = 0.9
SCALE = jnp.array([1.0, 1.5, 0.5])
BIAS = jnp.array([0.1, -0.2, 0.3])
STATE = normjax.BatchNormState(mean=jnp.array([0.5, -1.0, 2.0]), var=jnp.array([1.0, 2.0, 0.5]))


def _counts(name):
    """Valid rows per device for each data case (None: no mask at all)."""
    return {
        "full": None,
        "uneven": (8, 1, 1, 1, 3, 2, 5, 8),
        "zero_device": (0, 8, 0, 2, 1, 0, 7, 3),
        "offset": (8, 1, 1, 1, 8, 4, 0, 6),
    }[name]


def _data(name, seed=0):
    """A global batch ``(DEVICES * ROWS, C)`` and its row mask ``(DEVICES * ROWS, 1)`` (or None)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(DEVICES * ROWS, C)) * np.array([1.0, 3.0, 0.5]) + np.array([2.0, -1.0, 0.0])
    if name == "offset":
        x = 1e4 + rng.normal(size=x.shape)
    x = x.astype(np.float32)
    counts = _counts(name)
    if counts is None:
        return x, None
    mask = np.concatenate([np.arange(ROWS) < c for c in counts])[:, None]
    return np.where(mask, x, np.nan).astype(np.float32), mask  # masked rows must not matter, even as NaN


def _tolerances(name):
    if name == "offset":
        # float32 cannot hold a mean of 1e4 better than ~5e-4 (half an ulp), single device or not; the
        # variance, computed around the global mean, stays exact to float32 rounding.
        return {"mean_rtol": 3e-7, "var_rtol": 2e-5, "y_atol": 2e-3}
    return {"mean_rtol": 1e-6, "var_rtol": 2e-5, "y_atol": 2e-5}


def _bn(x, mask, axis_name, **kwargs):
    return normjax.batch_norm(
        x, STATE, SCALE, BIAS, training=True, momentum=MOMENTUM, axis_name=axis_name, mask=mask, **kwargs
    )


def _split(a, *lead):
    return None if a is None else a.reshape(*lead, -1, *a.shape[1:])


def _stack_state(state, n):
    return jax.tree.map(lambda a: jnp.reshape(a, (n, C)), state)


# Each runner maps the global batch onto DEVICES "devices" and returns the global output (DEVICES * ROWS, C) and
# the new running state of every device, stacked (devices, C).


def run_pmap(x, mask):
    f = jax.pmap(lambda x, m: _bn(x, m, "i"), axis_name="i")
    y, state = f(_split(x, DEVICES), _split(mask, DEVICES))
    return y.reshape(x.shape), state


def _mesh(*shape_and_names):
    *shape, names = shape_and_names
    return Mesh(np.array(jax.devices()[:DEVICES]).reshape(shape), names)


def run_shard_map(x, mask):
    def local(x, m):
        y, state = _bn(x, m, "d")
        return y, jax.tree.map(lambda a: a[None], state)

    f = jax.shard_map(local, mesh=_mesh(DEVICES, ("d",)), in_specs=P("d"), out_specs=P("d"))
    return jax.jit(f)(x, mask)


def run_shard_map_2d(x, mask):
    """A hosts x devices mesh, synchronized over both axes with a tuple axis_name."""
    names = ("hosts", "devices")

    def local(x, m):
        y, state = _bn(x, m, names)
        return y, jax.tree.map(lambda a: a[None], state)

    f = jax.shard_map(local, mesh=_mesh(2, DEVICES // 2, names), in_specs=P(names), out_specs=P(names))
    return jax.jit(f)(x, mask)


def run_vmap(x, mask):
    """Per-example code, as Equinox users write it: each call sees x of shape (C,) and no batch axis."""
    per_example = lambda x, m: _bn(x, m, "batch")  # noqa: E731
    y, state = jax.vmap(per_example, axis_name="batch")(x, None if mask is None else mask[:, 0])
    return y, state


def run_pmap_of_vmap(x, mask):
    """An ensemble-style vmap inside a device pmap, synchronized over both with axis_name=('p', 'v')."""
    per_example = lambda x, m: _bn(x, m, ("p", "v"))  # noqa: E731
    f = jax.pmap(jax.vmap(per_example, axis_name="v"), axis_name="p")
    y, state = f(_split(x, DEVICES), None if mask is None else _split(mask[:, 0], DEVICES))
    return y.reshape(x.shape), _stack_state(state, DEVICES * ROWS)


def run_jit_sharded(x, mask):
    """No axis_name at all: jit of arrays sharded over the mesh computes global statistics by itself."""
    sharding = NamedSharding(_mesh(DEVICES, ("d",)), P("d"))
    x, mask = jax.device_put((x, mask), sharding)
    f = jax.jit(lambda x, m: _bn(x, m, None))
    assert "all-reduce" in f.lower(x, mask).compile().as_text()  # really computed across the 8 devices
    y, state = f(x, mask)
    assert y.sharding.is_equivalent_to(sharding, y.ndim)
    return y, _stack_state(state, 1)


RUNNERS = {
    "pmap": run_pmap,
    "shard_map": run_shard_map,
    "shard_map_2d": run_shard_map_2d,
    "vmap": run_vmap,
    "pmap_of_vmap": run_pmap_of_vmap,
    "jit_sharded": run_jit_sharded,
}
CASES = ["full", "uneven", "zero_device", "offset"]


def _assert_matches_global(y, state, x, mask, tol):
    """y equals the global batch's float64 BatchNorm at valid rows; every device holds the same exact state."""
    want_y, mean, var, _ = reference.batch_norm_train(x, SCALE, BIAS, mask=mask, epsilon=1e-5)
    valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    np.testing.assert_allclose(np.asarray(y)[valid], want_y[valid], rtol=0, atol=tol["y_atol"])
    state_mean, state_var = np.asarray(state.mean), np.asarray(state.var)
    for a in (state_mean, state_var):  # bit-identical on every device: running averages cannot drift apart
        np.testing.assert_array_equal(a, np.broadcast_to(a[0], a.shape))
    want_mean = MOMENTUM * np.asarray(STATE.mean, np.float64) + (1 - MOMENTUM) * mean
    want_var = MOMENTUM * np.asarray(STATE.var, np.float64) + (1 - MOMENTUM) * var
    np.testing.assert_allclose(state_mean[0], want_mean, rtol=tol["mean_rtol"], atol=1e-6)
    np.testing.assert_allclose(state_var[0], want_var, rtol=tol["var_rtol"])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("runner", list(RUNNERS))
def test_batch_norm_equals_global_batch(runner, case):
    x, mask = _data(case)
    y, state = RUNNERS[runner](jnp.asarray(x), None if mask is None else jnp.asarray(mask))
    _assert_matches_global(y, state, x, mask, _tolerances(case))


def _probe_4_devices():
    """The issue's Flax probe: 4 devices holding 8, 1, 1 and 1 valid rows."""
    x = np.zeros((4, 8, 1), np.float32)
    x[0] = 1.0
    x[1:, 0, 0] = [20.0, 30.0, 40.0]
    mask = np.zeros((4, 8, 1), bool)
    mask[0] = True
    mask[1:, 0, 0] = True
    return x, mask


def test_uneven_counts_are_weighted_by_count_not_by_device():
    x, mask = _probe_4_devices()
    f = jax.pmap(lambda x, m: normjax.moments(x, 0, mask=m, axis_name="i"), axis_name="i", devices=jax.devices()[:4])
    got = f(x, mask)
    valid = x[mask]
    np.testing.assert_allclose(got.mean[:, 0], valid.mean(), rtol=1e-6)  # (8 + 90) / 11 = 8.909...
    np.testing.assert_allclose(got.var[:, 0], valid.var(), rtol=1e-6)
    np.testing.assert_array_equal(got.count[:, 0], 11.0)
    equal_weight_mean = np.mean([x[d][mask[d]].mean() for d in range(4)])  # what averaging device means gives
    assert abs(equal_weight_mean - valid.mean()) > 10  # 22.75 vs 8.91: the error this design avoids


_PMAP_MOMENTS = jax.pmap(lambda x, m: normjax.moments(x, 0, mask=m, axis_name="i"), axis_name="i")


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    counts=st.lists(st.integers(0, ROWS), min_size=DEVICES, max_size=DEVICES),
    offset=st.sampled_from([0.0, -3.0, 1e2, 1e4]),
    spread=st.floats(0.5, 10.0),
    seed=st.integers(0, 2**16),
)
def test_any_split_of_valid_rows_gives_the_global_moments(counts, offset, spread, seed):
    """One compiled program, many splits: per-device counts from 0 to all rows, offsets up to 1e4."""
    rng = np.random.default_rng(seed)
    x = (offset + spread * rng.normal(size=(DEVICES * ROWS, C))).astype(np.float32)
    mask = np.concatenate([np.arange(ROWS) < c for c in counts])[:, None]
    got = _PMAP_MOMENTS(_split(x, DEVICES), _split(mask, DEVICES))
    mean, var, count = (a[0] for a in reference.moments(x, 0, mask))
    np.testing.assert_array_equal(got.count, np.broadcast_to(count, got.count.shape))
    np.testing.assert_allclose(got.mean, np.broadcast_to(mean, got.mean.shape), rtol=5e-7, atol=1e-5 * spread)
    np.testing.assert_allclose(got.var, np.broadcast_to(var, got.var.shape), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("runner", ["pmap", "shard_map", "vmap"])
def test_all_masked_everywhere_keeps_the_running_state(runner):
    x, _ = _data("full")
    y, state = RUNNERS[runner](jnp.asarray(x), jnp.zeros((DEVICES * ROWS, 1), bool))
    assert np.all(np.isfinite(np.asarray(y)))
    np.testing.assert_array_equal(np.asarray(state.mean), np.broadcast_to(STATE.mean, state.mean.shape))
    np.testing.assert_array_equal(np.asarray(state.var), np.broadcast_to(STATE.var, state.var.shape))


def test_conv_shaped_input_under_shard_map():
    """NHWC activations, one valid-pixel mask per image, statistics over (N, H, W) of the global batch."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(DEVICES * 2, 3, 2, C)).astype(np.float32)
    mask = rng.random((DEVICES * 2, 3, 2, 1)) < 0.6
    f = jax.jit(
        jax.shard_map(
            lambda x, m: normjax.batch_norm(x, STATE, SCALE, BIAS, training=True, mask=m, axis_name="d")[0],
            mesh=_mesh(DEVICES, ("d",)),
            in_specs=P("d"),
            out_specs=P("d"),
        )
    )
    want, *_ = reference.batch_norm_train(x, SCALE, BIAS, mask=mask, epsilon=1e-5)
    valid = np.broadcast_to(mask, x.shape)
    np.testing.assert_allclose(np.asarray(f(x, mask))[valid], want[valid], atol=2e-5)


# Sub-group synchronization ("ghost" batches spanning a few devices).

GROUPINGS = {
    "pairs": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "halves": [[0, 1, 2, 3], [4, 5, 6, 7]],
    "strided": [[0, 2, 4, 6], [1, 3, 5, 7]],
}


def _assert_groups_match(y, state, x, mask, groups):
    tol = _tolerances("uneven")
    xs, ms, ys = _split(x, DEVICES), _split(mask, DEVICES), np.asarray(_split(y, DEVICES))
    for group in groups:
        group_state = jax.tree.map(lambda a: np.asarray(a)[group], state)  # noqa: B023
        _assert_matches_global(
            ys[group].reshape(-1, C), group_state, xs[group].reshape(-1, C), ms[group].reshape(-1, 1), tol
        )


@pytest.mark.parametrize("grouping", list(GROUPINGS))
def test_axis_index_groups_under_pmap(grouping):
    x, mask = _data("uneven")
    groups = GROUPINGS[grouping]
    f = jax.pmap(lambda x, m: _bn(x, m, "i", axis_index_groups=groups), axis_name="i")
    y, state = f(_split(x, DEVICES), _split(mask, DEVICES))
    _assert_groups_match(y.reshape(x.shape), state, x, mask, groups)


@pytest.mark.parametrize("per_group", [2, 4])
def test_two_level_mesh_is_the_shard_map_equivalent_of_groups(per_group):
    """shard_map has no axis_index_groups: a (groups, per_group) mesh synchronized over 'per_group' is the same."""
    x, mask = _data("uneven")
    names = ("groups", "per_group")

    def local(x, m):
        y, state = _bn(x, m, "per_group")
        return y, jax.tree.map(lambda a: a[None], state)

    mesh = _mesh(DEVICES // per_group, per_group, names)
    y, state = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(names), out_specs=P(names)))(x, mask)
    groups = np.arange(DEVICES).reshape(-1, per_group).tolist()
    _assert_groups_match(y, state, x, mask, groups)
    # ... and bit-for-bit what pmap's axis_index_groups gives for the same grouping.
    y_pmap, state_pmap = jax.pmap(lambda x, m: _bn(x, m, "i", axis_index_groups=groups), axis_name="i")(
        _split(x, DEVICES), _split(mask, DEVICES)
    )
    np.testing.assert_allclose(y, y_pmap.reshape(x.shape), rtol=0, atol=1e-6)
    np.testing.assert_allclose(state.var, state_pmap.var, rtol=1e-6)


# Gradients: the gradient of the synchronized computation is the gradient of the global one.

WEIGHTS = jnp.asarray(np.random.default_rng(7).normal(size=(DEVICES * ROWS, C)).astype(np.float32))


def _global_loss(x, scale, bias, mask):
    y, _ = normjax.batch_norm(x, STATE, scale, bias, training=True, mask=mask)
    return jnp.sum(jnp.where(mask, jnp.sin(y) * WEIGHTS, 0.0))


def _pmap_loss(x, scale, bias, mask):
    def local(x, w, m):
        y, _ = normjax.batch_norm(x, STATE, scale, bias, training=True, mask=m, axis_name="i")
        return jnp.sum(jnp.where(m, jnp.sin(y) * w, 0.0))

    return jnp.sum(jax.pmap(local, axis_name="i")(*(_split(a, DEVICES) for a in (x, WEIGHTS, mask))))


def _shard_map_loss(x, scale, bias, mask):
    def local(x, scale, bias, w, m):
        y, _ = normjax.batch_norm(x, STATE, scale, bias, training=True, mask=m, axis_name="d")
        return jax.lax.psum(jnp.sum(jnp.where(m, jnp.sin(y) * w, 0.0)), "d")

    specs = (P("d"), P(), P(), P("d"), P("d"))
    f = jax.shard_map(local, mesh=_mesh(DEVICES, ("d",)), in_specs=specs, out_specs=P())
    return f(x, scale, bias, WEIGHTS, mask)


def _vmap_loss(x, scale, bias, mask):
    def per_example(x, w, m):
        y, _ = normjax.batch_norm(x, STATE, scale, bias, training=True, mask=m, axis_name="b")
        return jnp.sum(jnp.where(m, jnp.sin(y) * w, 0.0))

    return jnp.sum(jax.vmap(per_example, axis_name="b")(x, WEIGHTS, mask[:, 0]))


@pytest.mark.parametrize("case", ["uneven", "zero_device"])
@pytest.mark.parametrize("loss", [_pmap_loss, _shard_map_loss, _vmap_loss], ids=["pmap", "shard_map", "vmap"])
def test_gradients_equal_global_gradients(loss, case):
    x, mask = _data(case)
    x = np.where(mask, x, 0.0).astype(np.float32)  # masked NaN rows output NaN; 0 * NaN would reach d/dscale
    args = (jnp.asarray(x), SCALE, BIAS, jnp.asarray(mask))
    want = jax.grad(_global_loss, argnums=(0, 1, 2))(*args)
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(got[0])[~mask[:, 0]] == 0)  # masked rows get no gradient


def test_per_device_gradients_inside_shard_map():
    """grad taken inside shard_map (the usual data-parallel train step) gives each device its global-gradient rows."""
    x, mask = _data("uneven", seed=1)
    x = np.where(mask, x, 0.0).astype(np.float32)

    def local(x, w, m):
        def loss(x):
            y, _ = normjax.batch_norm(x, STATE, SCALE, BIAS, training=True, mask=m, axis_name="d")
            return jnp.sum(jnp.where(m, jnp.sin(y) * w, 0.0))

        return jax.grad(loss)(x)

    f = jax.shard_map(local, mesh=_mesh(DEVICES, ("d",)), in_specs=P("d"), out_specs=P("d"))
    got = jax.jit(f)(x, WEIGHTS, mask)
    want = jax.grad(_global_loss)(jnp.asarray(x), SCALE, BIAS, jnp.asarray(mask))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# Running statistics over several synchronized steps.


@pytest.mark.parametrize("runner", ["pmap", "shard_map"])
def test_running_statistics_identical_on_every_device_over_steps(runner):
    def step(x, m, state):
        return normjax.batch_norm(x, state, training=True, momentum=MOMENTUM, mask=m, axis_name="d")

    if runner == "pmap":
        f = jax.pmap(step, axis_name="d")
        states = jax.tree.map(lambda a: jnp.broadcast_to(a, (DEVICES, C)), STATE)
        split = lambda a: _split(a, DEVICES)  # noqa: E731
    else:
        f = jax.jit(
            jax.shard_map(step, mesh=_mesh(DEVICES, ("d",)), in_specs=(P("d"), P("d"), P()), out_specs=(P("d"), P()))
        )
        states, split = STATE, lambda a: a  # noqa: E731
    want_mean, want_var = np.asarray(STATE.mean, np.float64), np.asarray(STATE.var, np.float64)
    for seed, case in enumerate(["uneven", "zero_device", "full", "uneven"]):
        x, mask = _data(case, seed=seed)
        mask = np.ones((DEVICES * ROWS, 1), bool) if mask is None else mask
        _, states = f(split(x), split(mask), states)
        _, mean, var, _ = reference.batch_norm_train(x, mask=mask)
        want_mean = MOMENTUM * want_mean + (1 - MOMENTUM) * mean
        want_var = MOMENTUM * want_var + (1 - MOMENTUM) * var
        got_mean, got_var = (np.asarray(a).reshape(-1, C) for a in (states.mean, states.var))
        for a in (got_mean, got_var):
            np.testing.assert_array_equal(a, np.broadcast_to(a[0], a.shape))
        if runner == "shard_map":  # replicated (P()) output: every device's buffer, not just the gathered one
            for a in (states.mean, states.var):
                shards = [np.asarray(s.data) for s in a.addressable_shards]
                assert len(shards) == DEVICES and all(np.array_equal(s, shards[0]) for s in shards)
        np.testing.assert_allclose(got_mean[0], want_mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got_var[0], want_var, rtol=2e-5)


# Siblings pass axis_name through: statistics over an axis sharded across devices.


def _sharded_sibling(norm, x, spec):
    f = jax.shard_map(
        functools.partial(norm, axis_name="d"), mesh=_mesh(DEVICES, ("d",)), in_specs=spec, out_specs=spec
    )
    return np.asarray(jax.jit(f)(x))


def test_layer_norm_and_rms_norm_with_features_sharded_across_devices():
    x = np.random.default_rng(4).normal(size=(5, DEVICES * 2)).astype(np.float32) + 3.0
    got = _sharded_sibling(lambda x, axis_name: normjax.layer_norm(x, axis_name=axis_name), x, P(None, "d"))
    np.testing.assert_allclose(got, reference.layer_norm(x), atol=2e-5)
    got = _sharded_sibling(lambda x, axis_name: normjax.rms_norm(x, axis_name=axis_name), x, P(None, "d"))
    np.testing.assert_allclose(got, reference.rms_norm(x), atol=2e-5)


def test_group_norm_and_instance_norm_with_space_sharded_across_devices():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, DEVICES * 3, 4)).astype(np.float32) * np.array([1.0, 2.0, 0.5, 3.0], np.float32)
    mask = rng.random((2, DEVICES * 3, 1)) < 0.7

    def group(x, m, axis_name):
        return normjax.group_norm(x, num_groups=2, mask=m, axis_name=axis_name)

    f = jax.shard_map(
        functools.partial(group, axis_name="d"),
        mesh=_mesh(DEVICES, ("d",)),
        in_specs=P(None, "d"),
        out_specs=P(None, "d"),
    )
    valid = np.broadcast_to(mask, x.shape)
    want = reference.group_norm(x, num_groups=2, mask=mask)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(x, mask))[valid], want[valid], atol=2e-5)
    got = _sharded_sibling(lambda x, axis_name: normjax.instance_norm(x, axis_name=axis_name), x, P(None, "d"))
    np.testing.assert_allclose(got, reference.instance_norm(x), atol=2e-5)


# Errors.


@pytest.mark.parametrize(
    "call",
    [
        lambda x: normjax.moments(x, 0, axis_name="batch"),
        lambda x: normjax.batch_norm(x, STATE, training=True, axis_name="batch"),
        lambda x: normjax.layer_norm(x, axis_name=("batch",)),
        lambda x: normjax.group_norm(x, num_groups=1, axis_name="batch"),
    ],
    ids=["moments", "batch_norm", "layer_norm", "group_norm"],
)
def test_unbound_axis_name_says_how_to_bind_it(call):
    with pytest.raises(NameError) as info:
        jax.jit(call)(jnp.ones((4, C)))
    message = str(info.value)
    assert "`axis_name`" in message and "'batch'" in message
    assert "jax.pmap(f, axis_name='batch')" in message and "jax.vmap" in message and "shard_map" in message


def test_partly_bound_tuple_axis_name_names_the_missing_axis():
    f = jax.pmap(lambda x: normjax.moments(x, 0, axis_name=("i", "hosts")), axis_name="i")
    with pytest.raises(NameError, match=r"the axis 'hosts' is not bound"):
        f(jnp.ones((DEVICES, 2, C)))


@pytest.mark.parametrize(
    "groups",
    [
        [[0, 1, 2], [3, 4, 5, 6, 7]],  # unequal sizes
        [[0, 1, 2, 3], [4, 5, 6, 6]],  # an index twice, one missing
        [[0, 1, 2, 3]],  # not covering the axis
        [[0, 1, 2, 3], [4, 5, 6, 7, 8]],  # out of range
        [[0, 1], [2, 3], [4, 5], [6, "7"]],  # not ints
        4,  # not a sequence of sequences
    ],
)
def test_malformed_axis_index_groups(groups):
    f = jax.pmap(lambda x: normjax.moments(x, 0, axis_name="i", axis_index_groups=groups), axis_name="i")
    with pytest.raises(ValueError, match=r"`axis_index_groups`=.* must split the 8 indices of axis 'i'") as info:
        f(jnp.ones((DEVICES, 2, C)))
    assert "[[0, 1, 2, 3], [4, 5, 6, 7]]" in str(info.value)  # a valid example to copy


def test_axis_index_groups_without_axis_name():
    with pytest.raises(ValueError, match=r"`axis_index_groups` was given without `axis_name`"):
        normjax.moments(jnp.ones((4, C)), 0, axis_index_groups=[[0, 1]])


def test_axis_index_groups_under_shard_map_points_to_the_two_level_mesh():
    local = lambda x: normjax.moments(x, 0, axis_name="d", axis_index_groups=GROUPINGS["halves"]).mean[None]  # noqa: E731
    f = jax.shard_map(local, mesh=_mesh(DEVICES, ("d",)), in_specs=P("d"), out_specs=P("d"))
    with pytest.raises(
        NotImplementedError, match=r"`axis_index_groups` is only supported by JAX under `jax.pmap`"
    ) as info:
        jax.jit(f)(jnp.ones((DEVICES * 2, C)))
    assert "(groups, per_group)" in str(info.value) and "axis_name='per_group'" in str(info.value)
