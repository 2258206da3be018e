"""Folding inference-mode BatchNorm into the preceding Conv/Dense: same outputs, one layer fewer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax
import normjax.linen


class _ConvNet(nn.Module):
    """Conv(no bias)-BN, depthwise Conv(bias)-BN, Dense-BN; with `folded` the BNs are gone and layers have biases."""

    batch_norm: type = nn.BatchNorm
    folded: bool = False

    def _norm(self, name):
        return (lambda x: x) if self.folded else self.batch_norm(use_running_average=True, epsilon=1e-3, name=name)

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3), use_bias=self.folded, name="conv1")(x)
        x = nn.relu(self._norm("bn1")(x))
        x = nn.Conv(6, (3, 3), feature_group_count=6, name="depthwise")(x)
        x = nn.relu(self._norm("bn2")(x))
        x = nn.Dense(5, name="dense")(x.reshape(x.shape[0], -1))
        return self._norm("bn3")(x)


PAIRS = {"conv1": "bn1", "depthwise": "bn2", "dense": "bn3"}


def _random_like(seed, tree, low, high):
    rng = np.random.default_rng(seed)  # NumPy: no per-shape compilation of random kernels
    return jax.tree.map(lambda a: jnp.asarray(rng.uniform(low, high, a.shape), a.dtype), tree)


@pytest.mark.parametrize("batch_norm", [nn.BatchNorm, normjax.linen.BatchNorm], ids=["flax", "normjax"])
def test_folded_conv_net_equals_conv_bn_eval(batch_norm):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6, 6, 2)), jnp.float32)
    model = _ConvNet(batch_norm=batch_norm)
    variables = jax.jit(model.init)(jax.random.key(1), x)
    # Statistics and affine parameters far from the identity, so the folding has work to do.
    variables["params"] = {
        name: _random_like(2 + i, layer, -1.5, 1.5) if name.startswith("bn") else layer
        for i, (name, layer) in enumerate(variables["params"].items())
    }
    stats = variables["batch_stats"]
    variables["batch_stats"] = {
        name: {"mean": _random_like(10 + i, s["mean"], -2.0, 2.0),
               "var": _random_like(20 + i, s["var"], 0.05, 3.0)}
        for i, (name, s) in enumerate(stats.items())
    }  # fmt: skip
    expected = jax.jit(model.apply)(variables, x)

    folded = normjax.fold_batch_norm_variables(variables, PAIRS, epsilon=1e-3)
    assert folded["batch_stats"] == {}
    assert sorted(folded["params"]) == ["conv1", "dense", "depthwise"]
    assert folded["params"]["conv1"]["kernel"].shape == (3, 3, 2, 6)  # HWIO
    actual = jax.jit(_ConvNet(batch_norm=batch_norm, folded=True).apply)(folded, x)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    assert "bias" not in variables["params"]["conv1"]  # the input tree is not modified


@pytest.mark.parametrize("kernel_shape", [(4, 3), (3, 3, 2, 3), (2, 2, 2, 1, 3)], ids=["dense", "hwio", "3d"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_batch_norm_matches_float64(kernel_shape, with_bias):
    rng = np.random.default_rng(0)
    out = kernel_shape[-1]
    kernel = rng.normal(size=kernel_shape).astype(np.float32)
    bias = rng.normal(size=out).astype(np.float32) if with_bias else None
    scale, bn_bias, mean = (rng.normal(size=out).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.1, 2.0, size=out).astype(np.float32)
    epsilon = 1e-5

    got_kernel, got_bias = normjax.fold_batch_norm(kernel, bias, scale, bn_bias, mean, var, epsilon=epsilon)

    s = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
    old_bias = np.zeros(out) if bias is None else bias.astype(np.float64)
    np.testing.assert_allclose(got_kernel, kernel * s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_bias, (old_bias - mean) * s + bn_bias, rtol=1e-6, atol=1e-6)
    assert got_kernel.dtype == jnp.float32 and got_bias.dtype == jnp.float32


def test_fold_without_scale_or_bias_and_low_precision_kernel():
    kernel = jnp.ones((2, 3), jnp.bfloat16)
    mean, var = jnp.array([1.0, 2.0, 3.0]), jnp.array([3.0, 0.0, 1.0])
    got_kernel, got_bias = normjax.fold_batch_norm(kernel, None, None, None, mean, var, epsilon=1.0)
    np.testing.assert_allclose(np.asarray(got_kernel, np.float32), [[0.5, 1.0, 0.70710677]] * 2, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(got_bias, np.float32), [-0.5, -2.0, -2.1213202], rtol=1e-2)
    assert got_kernel.dtype == jnp.bfloat16 and got_bias.dtype == jnp.bfloat16


def test_errors_are_clear():
    kernel = jnp.ones((8, 3, 3, 3))  # a PyTorch OIHW kernel with 8 output channels
    ones = jnp.ones(8)
    with pytest.raises(ValueError, match="transpose PyTorch OIHW"):
        normjax.fold_batch_norm(kernel, None, ones, ones, ones, ones)
    variables = {"params": {"conv": {"kernel": jnp.ones((1, 1))}}, "batch_stats": {}}
    with pytest.raises(KeyError, match="has no entry 'bn'"):
        normjax.fold_batch_norm_variables(variables, [("conv", "bn")])
