"""Freezing BatchNorm for fine-tuning: running statistics used and kept, zero gradients to scale and bias."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import normjax
import normjax.linen
import normjax.nnx

LINEN_BATCH_NORMS = [pytest.param(nn.BatchNorm, id="flax"), pytest.param(normjax.linen.BatchNorm, id="normjax")]
NNX_BATCH_NORMS = [pytest.param(nnx.BatchNorm, id="flax"), pytest.param(normjax.nnx.BatchNorm, id="normjax")]


def _conv_net(batch_norm, *, attribute):
    """A Conv-BN-Dense-LayerNorm net; `attribute` sets use_running_average in the constructor, else at call time."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Conv(4, (3, 3), use_bias=False)(x)
            if attribute:
                x = batch_norm(use_running_average=not train, name="bn1")(x)
            else:
                x = batch_norm(name="bn1")(x, use_running_average=not train)
            x = nn.relu(x).mean(axis=(1, 2))
            x = nn.Dense(3)(x)
            x = batch_norm(use_running_average=not train, momentum=0.5)(x)
            return nn.LayerNorm()(x)

    return Net()


def _normal(seed, shape):
    """NumPy random inputs: no compilation of a random kernel per shape."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _trained_variables(model, x):
    """Variables whose running statistics are away from their initial (0, 1), so eval differs from train."""
    variables = model.init(jax.random.key(0), x, train=False)
    _, updates = model.apply(variables, x + 1.0, train=True, mutable=["batch_stats"])
    return {**variables, **updates}


@pytest.mark.parametrize("batch_norm", LINEN_BATCH_NORMS)
@pytest.mark.parametrize("attribute", [True, False], ids=["attribute", "call-argument"])
def test_linen_frozen_training_step_equals_eval_and_keeps_stats(batch_norm, attribute):
    model = _conv_net(batch_norm, attribute=attribute)
    x = _normal(1, (6, 5, 5, 2))
    variables = _trained_variables(model, x)
    eval_out = model.apply(variables, x, train=False)
    train_out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(train_out, eval_out, atol=1e-3)  # the freeze below has something to change

    def loss(params):
        with normjax.freeze_batch_norm():
            out, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(out**2), (out, updates)

    grads, (out, updates) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    np.testing.assert_allclose(out, eval_out, rtol=1e-6, atol=1e-6)  # jit vs eager rounding
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
    assert float(jnp.abs(grads["Conv_0"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("batch_norm", LINEN_BATCH_NORMS)
def test_linen_freeze_where_selects_layers(batch_norm):
    model = _conv_net(batch_norm, attribute=True)
    x = _normal(2, (4, 5, 5, 2))
    variables = _trained_variables(model, x)
    with normjax.freeze_batch_norm(where=lambda path: path == ("bn1",)):
        _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    stats, old = updates["batch_stats"], variables["batch_stats"]
    np.testing.assert_array_equal(stats["bn1"]["mean"], old["bn1"]["mean"])
    second = next(name for name in stats if name != "bn1")
    assert not np.allclose(stats[second]["mean"], old[second]["mean"])


def test_linen_freeze_ends_with_the_context():
    model = _conv_net(nn.BatchNorm, attribute=True)
    x = _normal(3, (4, 5, 5, 2))
    variables = _trained_variables(model, x)
    with normjax.freeze_batch_norm():
        model.apply(variables, x, train=True, mutable=["batch_stats"])
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(updates["batch_stats"]["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"])


@pytest.mark.parametrize("batch_norm", LINEN_BATCH_NORMS)
def test_stop_gradient_zeroes_frozen_batch_norm_params_only(batch_norm):
    model = _conv_net(batch_norm, attribute=True)
    x = _normal(4, (4, 5, 5, 2))
    variables = _trained_variables(model, x)
    bn_paths = normjax.find_norm_modules(model, x, train=False, kinds=("BatchNorm",))
    assert bn_paths == [("BatchNorm_0",), ("bn1",)]
    frozen = normjax.norm_params_mask(variables["params"], modules=bn_paths)

    def loss(params):
        params = normjax.stop_gradient_where(params, frozen)
        with normjax.freeze_batch_norm():
            out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(out))

    grads = jax.grad(loss)(variables["params"])
    for name in ("bn1", "BatchNorm_0"):
        for leaf in ("scale", "bias"):
            np.testing.assert_array_equal(grads[name][leaf], 0.0)
    for name, leaf in (("LayerNorm_0", "scale"), ("Dense_0", "kernel"), ("Conv_0", "kernel")):
        assert float(jnp.abs(grads[name][leaf]).sum()) > 0, (name, leaf)


class _NnxNet(nnx.Module):
    def __init__(self, batch_norm, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn = batch_norm(4, momentum=0.5, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.dropout(self.bn(self.linear(x))))


@pytest.mark.parametrize("batch_norm", NNX_BATCH_NORMS)
def test_nnx_frozen_batch_norm_keeps_stats_and_matches_eval(batch_norm):
    model = _NnxNet(batch_norm, nnx.Rngs(0))
    x = _normal(5, (8, 3))
    model(x + 2.0)  # move the running statistics away from (0, 1)
    frozen = normjax.freeze_batch_norm_nnx(model)
    assert frozen == [("bn",)]
    assert model.dropout.deterministic is False  # only BatchNorm changed mode
    mean, var = np.array(model.bn.mean[...]), np.array(model.bn.var[...])
    model.dropout.deterministic = True
    out = model(x)
    np.testing.assert_array_equal(model.bn.mean[...], mean)
    np.testing.assert_array_equal(model.bn.var[...], var)
    model.eval()
    np.testing.assert_array_equal(out, model(x))


@pytest.mark.parametrize("batch_norm", NNX_BATCH_NORMS)
def test_nnx_frozen_params_leave_the_optimizer(batch_norm):
    model = _NnxNet(batch_norm, nnx.Rngs(0))
    normjax.freeze_batch_norm_nnx(model)
    model.dropout.deterministic = True
    frozen_params = nnx.All(nnx.Param, nnx.PathContains("bn"))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.All(nnx.Param, nnx.Not(frozen_params)))
    scale, kernel = np.array(model.bn.scale[...]), np.array(model.linear.kernel[...])
    x = _normal(6, (8, 3))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, optimizer.wrt))(model)
    optimizer.update(model, grads)
    np.testing.assert_array_equal(model.bn.scale[...], scale)
    assert not np.allclose(model.linear.kernel[...], kernel)
