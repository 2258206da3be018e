"""Batch Renormalization as trained in practice: the step counter, the warm-up and traced clipping schedules.

The oracle is the float64 NumPy Batch Renormalization of ``tests/reference.py`` (Ioffe 2017, Algorithm 1); the
warm-up is checked bit for bit against plain BatchNorm, and the counter everywhere the state goes.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bitwise import assert_bit_exact
from flax import nnx, serialization
from jax.sharding import PartitionSpec as P

import normjax
import normjax.equinox as nqx
import normjax.linen as njn
import normjax.nnx as njx
from tests import reference

C = 3
EPS = 1e-3
MOMENTUM = 0.9


def _batch(seed, n=8):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n, C)) * [1.0, 2.0, 0.5] + [0.5, 1.0, -2.0], jnp.float32)


def _far_state():
    """Running statistics far from the batches', so Batch Renormalization visibly corrects towards them."""
    return normjax.init_batch_norm_state(C)._replace(mean=jnp.array([3.0, -2.0, 1.0]), var=jnp.array([9.0, 0.1, 4.0]))


def _train(x, state, **kwargs):
    return normjax.batch_norm(x, state, training=True, momentum=MOMENTUM, epsilon=EPS, **kwargs)


# -- the counter --


def test_count_counts_only_steps_that_updated_the_state():
    state = normjax.init_batch_norm_state(C)
    assert state.count.dtype == jnp.int32 and int(state.count) == 0
    _, state = _train(_batch(0), state)
    assert int(state.count) == 1
    _, same = normjax.batch_norm(_batch(1), state, training=False)
    assert same.count is state.count
    skipped = {
        "empty": dict(x=jnp.zeros((0, C))),
        "all masked": dict(x=_batch(2), mask=jnp.zeros((8, 1), bool)),
        "not finite": dict(x=_batch(3).at[0].set(jnp.nan)),
    }
    for name, call in skipped.items():
        _, after = _train(call.pop("x"), state, **call)
        assert int(after.count) == 1, name
    _, after = _train(_batch(4).at[0, 1].set(jnp.inf), state)  # one feature updated: the step counts
    assert int(after.count) == 2
    _, after = _train(_batch(5), state, virtual_batch_size=4)  # Ghost BatchNorm: one step, however many ghosts
    assert int(after.count) == 2
    # A traced momentum outside [0, 1] keeps the whole state, the counter included.
    _, after = jax.jit(lambda m: normjax.batch_norm(_batch(6), state, training=True, momentum=m))(1.5)
    assert int(after.count) == 1


def test_uncounted_state_stays_uncounted():
    state = normjax.BatchNormState(jnp.zeros(C), jnp.ones(C))
    _, new = _train(_batch(0), state, renorm_clipping=(3.0, 5.0))
    assert new.count is None and len(jax.tree.leaves(new)) == 2


# -- traced clipping: a schedule under jit --


def _paper_schedule(count):
    """The paper's relaxation, from a step counter: r_max 1 -> 3 and d_max 0 -> 5 (here over 4 and 6 steps)."""
    count = jnp.asarray(count, jnp.float32)
    return 1.0 + 2.0 * jnp.clip(count / 4, 0, 1), 5.0 * jnp.clip(count / 6, 0, 1)


def test_traced_schedule_under_jit_matches_float64():
    scale, bias = jnp.array([1.5, 0.5, -1.0]), jnp.array([0.1, -0.2, 0.3])

    traces = []

    @jax.jit
    def step(x, state):
        traces.append(None)  # runs once per trace
        return _train(x, state, scale=scale, bias=bias, renorm_clipping=_paper_schedule(state.count))

    state = _far_state()
    for i in range(8):
        x = _batch(10 + i)
        r_max, d_max = (float(v) for v in _paper_schedule(i))
        want, r, d = reference.batch_renorm_train(
            x, state.mean, state.var, scale, bias, r_max=r_max, d_max=d_max, epsilon=EPS
        )
        y, state = step(x, state)
        np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
        assert int(state.count) == i + 1
        if i == 0:
            np.testing.assert_array_equal(r, 1.0)  # r_max = 1, d_max = 0: plain BatchNorm
    assert len(traces) == 1  # the bounds are traced: one compilation for the whole schedule
    assert np.any(r != 1) and np.any(d != 0)  # the last steps renormalize


# -- the warm-up --


def test_warmup_is_plain_batch_norm_then_renorm_bit_for_bit():
    scale, bias = jnp.array([1.5, 0.5, -1.0]), jnp.array([0.1, -0.2, 0.3])
    renorm = dict(renorm_clipping=(3.0, 5.0))
    step = jax.jit(lambda x, s: _train(x, s, scale=scale, bias=bias, renorm_warmup_steps=2, **renorm))
    plain_step = jax.jit(lambda x, s: _train(x, s, scale=scale, bias=bias))
    renorm_step = jax.jit(lambda x, s: _train(x, s, scale=scale, bias=bias, **renorm))
    state = _far_state()
    for i in range(4):
        x = _batch(20 + i)
        want = (plain_step if i < 2 else renorm_step)(x, state)
        got = step(x, state)
        assert_bit_exact(got, want)
        if i >= 2:  # past the warm-up, renormalization changes the output
            plain, _ = plain_step(x, state)
            assert not np.allclose(got[0], plain, atol=1e-3)
        state = got[1]


def test_skipped_steps_do_not_shorten_the_warmup():
    step = jax.jit(lambda x, s: _train(x, s, renorm_clipping=(3.0, 5.0), renorm_warmup_steps=1))
    state = _far_state()
    _, state = step(_batch(0).at[0].set(jnp.nan), state)  # not finite: skipped, still warming up
    assert int(state.count) == 0
    y, _ = step(_batch(1), state)
    assert_bit_exact(y, jax.jit(_train)(_batch(1), state)[0])


def test_ensemble_of_states_under_vmap():
    states = jax.vmap(lambda _: _far_state())(jnp.arange(3))
    xs = jnp.stack([_batch(30), _batch(31), _batch(32)])
    masks = jnp.array([True, True, False])[:, None, None] & jnp.ones((3, 8, 1), bool)
    step = jax.vmap(lambda x, s, m: _train(x, s, mask=m, renorm_clipping=(3.0, 5.0), renorm_warmup_steps=1))
    ys, new = step(xs, states, masks)
    assert new.count.tolist() == [1, 1, 0]
    for i in range(2):
        want_y, want_state = _train(xs[i], _far_state(), renorm_clipping=(3.0, 5.0), renorm_warmup_steps=1)
        np.testing.assert_allclose(ys[i], want_y, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(new.mean[i], want_state.mean, rtol=1e-6)


def _sync_step(x, state, axis_name):
    return _train(x, state, axis_name=axis_name, renorm_clipping=(3.0, 5.0), renorm_warmup_steps=1)


@pytest.mark.parametrize("mode", ["pmap", "shard_map", "vmap"])
def test_synchronized_counter_stays_replicated(mode):
    x = jnp.concatenate([_batch(40 + i) for i in range(4)])
    state = _far_state()
    _, warm = _train(x, state)  # one plain step over the global batch: the warm-up's
    warm = warm._replace(count=jnp.ones((), jnp.int32))
    want_y, want_state = _train(x, warm, renorm_clipping=(3.0, 5.0), renorm_warmup_steps=1)
    split = x.reshape(4, 8, C)
    if mode == "pmap":
        f = jax.pmap(lambda x, s: _sync_step(x, s, "i"), axis_name="i", in_axes=(0, None), devices=jax.devices()[:4])
        y, new = f(split, warm)
        counts = new.count
        new = jax.tree.map(lambda a: a[0], new)
    elif mode == "shard_map":
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("d",))
        f = jax.shard_map(
            lambda x, s: _sync_step(x, s, "d"), mesh=mesh, in_specs=(P("d"), P()), out_specs=(P("d"), P())
        )
        y, new = jax.jit(f)(x, warm)
        counts = new.count[None]
    else:
        y, new = jax.vmap(lambda x, s: _sync_step(x, s, "v"), axis_name="v", in_axes=(0, None), out_axes=(0, None))(
            split, warm
        )
        counts = new.count[None]
    np.testing.assert_array_equal(counts, 2)
    np.testing.assert_allclose(np.reshape(y, x.shape), want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.mean, want_state.mean, rtol=1e-5)


def test_explicit_sharding_keeps_the_counter():
    x = jnp.concatenate([_batch(50 + i) for i in range(4)])
    step = jax.jit(lambda x, s: _train(x, s, renorm_clipping=(3.0, 5.0), renorm_warmup_steps=1))
    want_y, want_state = step(x, _far_state())
    with jax.set_mesh(jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])):
        y, state = step(jax.device_put(x, P("data")), _far_state())
    np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
    assert int(state.count) == 1 and state.count.dtype == jnp.int32


# -- layers --


def _linen_steps(layer, xs):
    variables = layer.init(jax.random.key(0), xs[0])
    ys = []
    for x in xs:
        y, updates = layer.apply(variables, x, mutable=["batch_stats"])
        variables = {**variables, **updates}
        ys.append(y)
    return ys, variables


def test_layers_keep_the_counter_only_for_the_warmup():
    xs = [_batch(60 + i) for i in range(3)]
    plain = njn.BatchNorm(use_running_average=False, renorm_clipping=(3.0, 5.0))
    assert sorted(plain.init(jax.random.key(0), xs[0])["batch_stats"]) == ["mean", "var"]  # exactly Flax's
    assert njx.BatchNorm(C, rngs=nnx.Rngs(0)).count is None
    renorm = dict(renorm_clipping=(3.0, 5.0), renorm_warmup_steps=2)
    options = dict(momentum=MOMENTUM, epsilon=EPS, **renorm)
    ys, variables = _linen_steps(njn.BatchNorm(use_running_average=False, **options), xs)
    assert variables["batch_stats"]["count"].dtype == jnp.int32 and int(variables["batch_stats"]["count"]) == 3
    state = normjax.init_batch_norm_state(C)
    nnx_layer = njx.BatchNorm(C, **options, rngs=nnx.Rngs(0))
    eqx_layer, eqx_state = eqx.nn.make_with_state(nqx.BatchNorm)(
        C, "batch", momentum=MOMENTUM, eps=EPS, renorm_clipping=(3.0, 5.0), renorm_warmup_steps=2
    )
    eqx_step = jax.vmap(eqx_layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    for x, y in zip(xs, ys, strict=True):
        want, state = _train(x, state, scale=jnp.ones(C), bias=jnp.zeros(C), **renorm)
        assert_bit_exact(y, want)
        assert_bit_exact(nnx_layer(x), y)  # linen and nnx agree bit for bit
        y_eqx, eqx_state = eqx_step(x, eqx_state)
        np.testing.assert_allclose(y_eqx, want, rtol=1e-6, atol=1e-6)
    assert int(nnx_layer.count[...]) == 3 and int(eqx_state.get(eqx_layer.state_index).count) == 3
    assert eqx.nn.make_with_state(nqx.BatchNorm)(C, "batch")[1].get(eqx_layer.state_index).count is None
    # Evaluation and `init` never count.
    y, updates = njn.BatchNorm(use_running_average=True, **options).apply(variables, xs[0], mutable=["batch_stats"])
    assert int(updates["batch_stats"]["count"]) == 3
    _, initial = jax.jit(njn.BatchNorm(use_running_average=False, **options).init_with_output)(jax.random.key(0), xs[0])
    assert int(initial["batch_stats"]["count"]) == 0


def test_counter_round_trips_through_flax_serialization():
    layer = njn.BatchNorm(use_running_average=False, renorm_clipping=(3.0, 5.0), renorm_warmup_steps=5)
    _, variables = _linen_steps(layer, [_batch(70), _batch(71)])
    restored = serialization.msgpack_restore(serialization.msgpack_serialize(variables))
    assert restored["batch_stats"]["count"].dtype == np.int32 and int(restored["batch_stats"]["count"]) == 2


# -- utilities on trees that hold a counter --


def test_utilities_accept_the_counter():
    layer = njn.BatchNorm(use_running_average=False, renorm_clipping=(3.0, 5.0), renorm_warmup_steps=5)
    _, variables = _linen_steps(layer, [_batch(80), _batch(81)])
    stats = variables["batch_stats"]
    replicated = jax.tree.map(lambda a: jnp.stack([a, a + 1]), stats)
    averaged = normjax.average_replicas(replicated)
    assert averaged["count"].dtype == jnp.int32 and averaged["count"].tolist() == [3, 3]  # the largest count
    synced = jax.pmap(lambda s: normjax.sync_batch_stats(s, "i"), axis_name="i", devices=jax.devices()[:2])(replicated)
    assert synced["count"].dtype == jnp.int32 and synced["count"].tolist() == [3, 3]
    np.testing.assert_allclose(synced["mean"][0], stats["mean"] + 0.5, rtol=1e-6)
    batches = [_batch(82), _batch(83)]
    apply_fn = lambda v, x: layer.apply(v, x, mutable=["batch_stats"])[1]["batch_stats"]  # noqa: E731
    precise = normjax.precise_batch_stats(apply_fn, variables, batches)
    assert int(precise["count"]) == 2  # precise statistics replace mean and var, not the count
    np.testing.assert_allclose(precise["mean"], np.concatenate(batches).mean(0), rtol=1e-5)


def test_torch_num_batches_tracked_maps_to_the_counter():
    torch_state = {
        "bn.weight": np.ones(C),
        "bn.bias": np.zeros(C),
        "bn.running_mean": np.zeros(C),
        "bn.running_var": np.ones(C),
        "bn.num_batches_tracked": np.array(7),
    }
    assert "count" not in normjax.norm_variables_from_torch(torch_state, "bn")["batch_stats"]
    loaded = normjax.norm_variables_from_torch(torch_state, "bn", count=True)
    count = loaded["batch_stats"]["count"]
    assert count.dtype == jnp.int32 and int(count) == 7
    layer = njn.BatchNorm(use_running_average=False, renorm_clipping=(3.0, 5.0), renorm_warmup_steps=8)
    _, updates = layer.apply(loaded, _batch(90), mutable=["batch_stats"])
    assert int(updates["batch_stats"]["count"]) == 8


# -- errors --


def test_warmup_errors():
    state = normjax.init_batch_norm_state(C)
    with pytest.raises(ValueError, match="`renorm_clipping` is None"):
        _train(_batch(0), state, renorm_warmup_steps=3)
    with pytest.raises(ValueError, match="has no counter"):
        _train(_batch(0), state._replace(count=None), renorm_clipping=(3.0, 5.0), renorm_warmup_steps=3)
    for bad in (-1, 2.5, True):
        with pytest.raises(TypeError, match="`renorm_warmup_steps` must be a non-negative int"):
            _train(_batch(0), state, renorm_clipping=(3.0, 5.0), renorm_warmup_steps=bad)
    with pytest.raises(TypeError, match="`state.count` must be None or an integer scalar"):
        _train(_batch(0), state._replace(count=jnp.zeros(C)))
