"""optax weight-decay masks that leave normalization scales and biases undecayed."""

import functools

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


def _mlp(norms):
    """Dense layers each followed by a norm layer given as a factory; the norms get Flax's automatic names."""

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            for norm in norms:
                x = norm()(nn.Dense(4)(x))
            return x

    return Mlp()


def _linen_norms(module):
    return [
        lambda: module.BatchNorm(use_running_average=False),
        module.LayerNorm,
        lambda: module.GroupNorm(num_groups=2),
        module.RMSNorm,
    ]


@pytest.mark.parametrize("module", [nn, normjax.linen], ids=["flax", "normjax"])
def test_adamw_step_decays_kernels_but_not_norm_params(module):
    model = _mlp(_linen_norms(module))
    x = jnp.ones((2, 3))
    params = model.init(jax.random.key(0), x)["params"]
    assert sorted(params) == sorted(
        ["BatchNorm_0", "LayerNorm_0", "GroupNorm_0", "RMSNorm_0"] + [f"Dense_{i}" for i in range(4)]
    )
    learning_rate, weight_decay = 0.1, 0.5
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay, mask=normjax.weight_decay_mask)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
    new_params = optax.apply_updates(params, updates)

    # With zero gradients adamw's step is exactly the decoupled decay -lr * wd * p where the mask is True.
    for name, layer in params.items():
        for leaf, value in layer.items():
            decayed = name.startswith("Dense")
            expected = value * (1 - learning_rate * weight_decay) if decayed else value
            np.testing.assert_allclose(new_params[name][leaf], expected, rtol=1e-6, err_msg=f"{name}/{leaf}")


def test_explicit_modules_work_for_any_names():
    class Named(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4, name="encoder")(x)
            x = normjax.linen.LayerNorm(name="final_ln")(x)  # not matched by the default pattern
            return nn.Dense(2, name="head")(x)

    model = Named()
    x = jnp.ones((1, 3))
    params = model.init(jax.random.key(0), x)["params"]
    assert not any(jax.tree.leaves(normjax.norm_params_mask(params)))
    modules = normjax.find_norm_modules(model, x)
    assert modules == [("final_ln",)]
    mask = normjax.weight_decay_mask(params, modules=modules)
    assert mask == {
        "encoder": {"kernel": True, "bias": True},
        "final_ln": {"scale": False, "bias": False},
        "head": {"kernel": True, "bias": True},
    }
    assert normjax.weight_decay_mask(params, modules=["final_ln"], decay_biases=False)["head"] == {
        "kernel": True,
        "bias": False,
    }


@pytest.mark.parametrize(
    ("name", "is_norm"),
    [
        ("BatchNorm_0", True),
        ("LayerNorm_12", True),
        ("RMSNorm_0", True),
        ("InstanceNorm_1", True),
        ("norm", True),
        ("norm2", True),
        ("bn_1", True),
        ("ln", True),
        ("layernorm", True),
        ("Dense_0", False),
        ("normal_head", False),
        ("bnk", False),
    ],
)
def test_default_pattern_on_module_names(name, is_norm):
    params = {name: {"scale": jnp.ones(2), "bias": jnp.zeros(2)}}
    assert normjax.norm_params_mask(params) == {name: {"scale": is_norm, "bias": is_norm}}


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.blocks = nnx.List([normjax.nnx.LayerNorm(4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs)])


def test_nnx_optimizer_with_mask_from_the_graph():
    model = _NnxNet(nnx.Rngs(0))
    modules = normjax.find_norm_modules(model)
    assert modules == [("blocks", "0"), ("blocks", "1")]
    mask = functools.partial(normjax.weight_decay_mask, modules=modules)
    optimizer = nnx.Optimizer(model, optax.adamw(0.1, weight_decay=0.5, mask=mask), wrt=nnx.Param)
    kernel = np.array(model.linear.kernel[...])
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    np.testing.assert_allclose(model.linear.kernel[...], kernel * 0.95, rtol=1e-6)
    np.testing.assert_array_equal(model.blocks[0].scale[...], 1.0)
    np.testing.assert_array_equal(model.blocks[1].scale[...], 1.0)


def test_errors_are_clear():
    with pytest.raises(TypeError, match="Wrap it in a list"):
        normjax.norm_params_mask({}, modules="bn")
    with pytest.raises(TypeError, match="flax.linen.Module or a flax.nnx.Module"):
        normjax.find_norm_modules(lambda x: x, jnp.ones(2))
