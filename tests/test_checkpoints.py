"""Checkpoints: BatchNormState and normjax layers round-trip through flax.serialization and orbax, bit for bit,
and load Flax's checkpoints.

The same small network is built from ``flax.linen`` / ``flax.nnx`` norm layers and from normjax's; a Flax
checkpoint (after training steps, so the running statistics are non-trivial) loads into the normjax network
and gives the same outputs, and the other way round.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from bitwise import assert_bit_exact, bits
from flax import nnx, serialization

import normjax as nj
from normjax import linen as njn
from normjax import nnx as njx

C = 4
# A state that is not the initial one, so a restored zero template cannot pass by accident.
STATE = nj.BatchNormState(mean=jnp.array([0.5, -1.25, 3.0, 1e-3]), var=jnp.array([2.0, 0.75, 1e-4, 9.0]))


# ------------------------------------------------------------------------------------------ the running state

ROUND_TRIP_STATES = {
    "float32": STATE,
    "complex64": nj.BatchNormState(jnp.array([1 + 2j, -3j]), jnp.array([0.5, 7.0])),
    "nonfinite-free-denormal": nj.BatchNormState(jnp.array([1e-45, -0.0]), jnp.array([np.finfo(np.float32).max, 1.0])),
    "step-count": nj.init_batch_norm_state(2)._replace(count=jnp.asarray(2**31 - 1, jnp.int32)),
}


@pytest.mark.parametrize("state", ROUND_TRIP_STATES.values(), ids=ROUND_TRIP_STATES.keys())
def test_flax_serialization_round_trip_is_exact(state):
    variables = {"params": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}, "batch_stats": state._asdict()}
    for tree in (state, variables):
        template = jax.tree.map(jnp.zeros_like, tree)
        restored = serialization.from_bytes(template, serialization.to_bytes(tree))
        assert jax.tree.structure(restored) == jax.tree.structure(tree)
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(bits(got), bits(want))
    restored = serialization.from_state_dict(template, serialization.to_state_dict(variables))
    assert_bit_exact(nj.BatchNormState(**restored["batch_stats"]), state)


def test_orbax_round_trip_is_exact(tmp_path):
    variables = {"params": {"scale": jnp.full(C, 1.5)}, "batch_stats": STATE._asdict()}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", STATE)
        checkpointer.save(tmp_path / "variables", variables)
        checkpointer.wait_until_finished()
        state = checkpointer.restore(tmp_path / "state", jax.tree.map(jnp.zeros_like, STATE))
        restored = checkpointer.restore(tmp_path / "variables", jax.tree.map(jnp.zeros_like, variables))
    assert isinstance(state, nj.BatchNormState)
    assert_bit_exact(state, STATE)
    assert_bit_exact(nj.BatchNormState(**restored["batch_stats"]), STATE)
    np.testing.assert_array_equal(bits(restored["params"]["scale"]), bits(variables["params"]["scale"]))


# ------------------------------------------------------------------------------------------ the layers


def _input(shape=(8, 4, 6), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(1.0, 2.0, shape).astype(np.float32))


def _assert_trees_equal(got, want):
    chex.assert_trees_all_equal(got, want, strict=True)  # same structure, shapes, dtypes and values


def _flax_exact(layer_cls):
    """Flax's layer with the exact (two-pass) variance, the variant normjax reproduces."""
    return lambda **config: layer_cls(use_fast_variance=False, **config)


LINEN_FLAX = {name: _flax_exact(getattr(nn, name)) for name in njn.__all__}
LINEN_NORMJAX = {name: getattr(njn, name) for name in njn.__all__}


class LinenNet(nn.Module):
    """Every norm layer once, built from ``norms`` (Flax's or normjax's)."""

    norms: dict

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(6)(x)
        x = self.norms["BatchNorm"](use_running_average=not train, momentum=0.5)(x)
        x = self.norms["GroupNorm"](num_groups=3)(nn.relu(x))
        x = self.norms["InstanceNorm"]()(x)
        x = self.norms["LayerNorm"]()(x)
        return self.norms["RMSNorm"]()(x)


def _train_linen(net, variables, x, steps=2):
    for step in range(steps):
        _, updates = net.apply(variables, x + step, train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
    return variables


@pytest.fixture(scope="module")
def trained_linen():
    net = LinenNet(LINEN_NORMJAX)
    x = _input()
    return net, _train_linen(net, net.init(jax.random.key(0), x, train=True), x), x


def test_linen_round_trips_through_flax_serialization(trained_linen):
    net, variables, x = trained_linen
    restored = serialization.from_bytes(net.init(jax.random.key(1), x, train=False), serialization.to_bytes(variables))
    _assert_trees_equal(restored, variables)
    _assert_trees_equal(serialization.from_state_dict(variables, serialization.to_state_dict(variables)), variables)
    np.testing.assert_array_equal(net.apply(restored, x, train=False), net.apply(variables, x, train=False))


def test_linen_round_trips_through_orbax(trained_linen, tmp_path):
    net, variables, x = trained_linen
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "linen", variables)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "linen", jax.tree.map(ocp.utils.to_shape_dtype_struct, variables))
    _assert_trees_equal(restored, variables)
    np.testing.assert_array_equal(net.apply(restored, x, train=False), net.apply(variables, x, train=False))


@pytest.mark.parametrize("source, target", [(LINEN_FLAX, LINEN_NORMJAX), (LINEN_NORMJAX, LINEN_FLAX)])
def test_linen_checkpoints_move_between_flax_and_normjax(source, target):
    """Variables trained with one implementation drive the other: same tree, same outputs, same updates."""
    x = _input()
    source_net, target_net = LinenNet(source), LinenNet(target)
    variables = _train_linen(source_net, source_net.init(jax.random.key(0), x, train=True), x)
    loaded = serialization.from_bytes(
        target_net.init(jax.random.key(1), x, train=True), serialization.to_bytes(variables)
    )
    _assert_trees_equal(loaded, variables)
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        target_net.apply(loaded, x, train=False), source_net.apply(variables, x, train=False), **tol
    )
    y_target, stats_target = target_net.apply(loaded, x, train=True, mutable=["batch_stats"])
    y_source, stats_source = source_net.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y_target, y_source, **tol)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), stats_target, stats_source)


class NnxNet(nnx.Module):
    """Every norm layer once, built from the module ``norms`` (flax.nnx or normjax.nnx)."""

    def __init__(self, norms, rngs: nnx.Rngs):
        exact = {} if norms is njx else dict(use_fast_variance=False)
        self.dense = nnx.Linear(6, 6, rngs=rngs)
        self.bn = norms.BatchNorm(6, momentum=0.5, rngs=rngs, **exact)
        self.gn = norms.GroupNorm(6, num_groups=3, rngs=rngs, **exact)
        self.inorm = norms.InstanceNorm(6, rngs=rngs, **exact)
        self.ln = norms.LayerNorm(6, rngs=rngs, **exact)
        self.rms = norms.RMSNorm(6, rngs=rngs, **exact)

    def __call__(self, x):
        x = self.bn(self.dense(x))
        return self.rms(self.ln(self.inorm(self.gn(nnx.relu(x)))))


def _trained_nnx(norms, x, steps=2):
    model = NnxNet(norms, nnx.Rngs(0))
    for step in range(steps):
        model(x + step)
    return model


def test_nnx_round_trips_through_flax_serialization_and_orbax(tmp_path):
    x = _input()
    model = _trained_nnx(njx, x)
    model.eval()
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    fresh = NnxNet(njx, nnx.Rngs(1))
    fresh.eval()
    fresh_state = nnx.state(fresh)
    nnx.replace_by_pure_dict(fresh_state, serialization.from_bytes(pure, serialization.to_bytes(pure)))
    nnx.update(fresh, fresh_state)
    _assert_trees_equal(nnx.to_pure_dict(nnx.state(fresh)), pure)
    np.testing.assert_array_equal(fresh(x), model(x))

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "nnx", state)
        checkpointer.wait_until_finished()
        target = nnx.state(nnx.eval_shape(lambda: NnxNet(njx, nnx.Rngs(2))))
        restored = checkpointer.restore(tmp_path / "nnx", target)
    _assert_trees_equal(nnx.to_pure_dict(restored), pure)
    other = NnxNet(njx, nnx.Rngs(3))
    nnx.update(other, restored)
    other.eval()
    np.testing.assert_array_equal(other(x), model(x))


@pytest.mark.parametrize("source, target", [(nnx, njx), (njx, nnx)])
def test_nnx_state_moves_between_flax_and_normjax(source, target):
    x = _input()
    trained = _trained_nnx(source, x)
    model = NnxNet(target, nnx.Rngs(5))
    nnx.update(model, nnx.state(trained))
    _assert_trees_equal(nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(trained)))
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model(x), trained(x), **tol)  # one more training step, compared
    np.testing.assert_allclose(model.bn.mean[...], trained.bn.mean[...], **tol)
    model.eval()
    trained.eval()
    np.testing.assert_allclose(model(x), trained(x), **tol)
