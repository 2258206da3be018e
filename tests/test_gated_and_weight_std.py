"""Gated RMSNorm, RMSNorm's bias, Weight Standardization and zeroed masked outputs, against float64 NumPy."""

import functools

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import normjax
import normjax.equinox as nqx
from normjax import linen as njn
from normjax import nnx as njx

DTYPES = [jnp.float32, jnp.bfloat16]


def _normal(shape, dtype=jnp.float32, seed=0, loc=0.0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), dtype)


def _close(got, want, dtype):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **reference.tolerance(dtype))


def _silu(z):
    z = np.asarray(z, np.float64)
    return z / (1 + np.exp(-z))


def _gated_reference(x, z, scale=None, bias=None, *, norm_before_gate, epsilon=1e-6):
    """mamba_ssm's rms_norm_ref in float64: gate before or after the normalization; the bias before the gate."""
    x = np.asarray(x, np.float64)
    if not norm_before_gate:
        x = x * _silu(z)
    y = reference.rms_norm(x, scale, epsilon=epsilon)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y * _silu(z) if norm_before_gate else y


# --- gated RMSNorm


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("norm_before_gate", [True, False], ids=["norm_then_gate", "gate_then_norm"])
def test_gated_rms_norm_matches_float64(norm_before_gate, dtype):
    x, z = _normal((3, 5, 16), dtype, 0, 0.5, 2.0), _normal((3, 5, 16), dtype, 1)
    scale, bias = _normal((16,), dtype, 2, 1.0, 0.2), _normal((16,), dtype, 3, 0.0, 0.2)
    fn = jax.jit(functools.partial(normjax.gated_rms_norm, norm_before_gate=norm_before_gate))
    got = fn(x, z, scale, bias)
    assert got.dtype == dtype
    _close(got, _gated_reference(x, z, scale, bias, norm_before_gate=norm_before_gate), dtype)
    got = jax.jit(functools.partial(normjax.gated_rms_norm, norm_before_gate=norm_before_gate, scale_offset=1.0))
    _close(got(x, z, scale), _gated_reference(x, z, 1.0 + np.asarray(scale, np.float64),
                                              norm_before_gate=norm_before_gate), dtype)  # fmt: skip


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_rms_norm_gradients(norm_before_gate):
    with jax.enable_x64(True):
        x, z = _normal((3, 6), jnp.float64, 4, 0.3), _normal((3, 6), jnp.float64, 5)
        scale, bias = _normal((6,), jnp.float64, 6, 1.0, 0.3), _normal((6,), jnp.float64, 7)
        fn = jax.jit(functools.partial(normjax.gated_rms_norm, norm_before_gate=norm_before_gate))
        check_grads(fn, (x, z, scale, bias), order=2, modes=("fwd", "rev"))


def test_gated_rms_norm_under_vmap_and_feature_sharded_shard_map():
    """Qwen3-Next's per-head gated norm under vmap; the hidden dimension split over devices with axis_name."""
    x, z, scale = _normal((2, 3, 16)), _normal((2, 3, 16), seed=1), _normal((16,), seed=2, loc=1.0)
    want = normjax.gated_rms_norm(x, z, scale)
    np.testing.assert_allclose(jax.vmap(normjax.gated_rms_norm, in_axes=(0, 0, None))(x, z, scale), want, rtol=1e-6)
    mesh = Mesh(np.array(jax.devices()[:4]), ("model",))

    def local(x, z, scale):
        return normjax.gated_rms_norm(x, z, scale, norm_before_gate=False, axis_name="model")

    spec = P(None, None, "model")
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P("model")), out_specs=spec))
    want = normjax.gated_rms_norm(x, z, scale, norm_before_gate=False)
    np.testing.assert_allclose(sharded(x, z, scale), want, rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(sharded(*a))), argnums=(0, 1, 2)))(x, z, scale)
    want_grads = jax.grad(
        lambda *a: jnp.sum(jnp.sin(normjax.gated_rms_norm(*a, norm_before_gate=False))), argnums=(0, 1, 2)
    )(x, z, scale)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_rms_norm_layers(norm_before_gate):
    x, z, scale = _normal((2, 4, 8)), _normal((2, 4, 8), seed=1), _normal((8,), seed=2, loc=1.0, scale=0.2)
    want = _gated_reference(x, z, scale, norm_before_gate=norm_before_gate)
    layer = njn.RMSNorm(norm_before_gate=norm_before_gate)
    variables = {"params": {"scale": scale}}
    y = layer.apply(variables, x, gate=z)
    _close(y, want, jnp.float32)
    nnx_layer = njx.RMSNorm(8, norm_before_gate=norm_before_gate, rngs=nnx.Rngs(0))
    nnx_layer.scale[...] = scale
    np.testing.assert_array_equal(nnx_layer(x, gate=z), y)
    eqx_layer = nqx.RMSNorm(8, eps=1e-6, norm_before_gate=norm_before_gate)
    eqx_layer = eqx.tree_at(lambda m: (m.weight, m.bias), eqx_layer, (scale, jnp.full(8, 0.5)))
    y_eqx = jax.vmap(jax.vmap(lambda x, z: eqx_layer(x, gate=z)))(x, z)
    _close(y_eqx, _gated_reference(x, z, scale, np.full(8, 0.5), norm_before_gate=norm_before_gate), jnp.float32)


def test_gate_errors():
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"`gate` of shape \(3,\) does not broadcast to x's shape \(2, 4\)"):
        normjax.gated_rms_norm(x, jnp.ones(3))
    with pytest.raises(TypeError, match="`gate` must be a floating-point"):
        normjax.gated_rms_norm(x, jnp.ones((2, 4), jnp.int32))
    with pytest.raises(TypeError, match="`norm_before_gate` must be a Python bool"):
        normjax.gated_rms_norm(x, x, norm_before_gate="yes")


# --- RMSNorm's bias


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_rms_norm_bias_matches_float64_and_its_gradients(dtype):
    x, scale, bias = _normal((4, 8), dtype, 0, 1.0, 2.0), _normal((8,), dtype, 1, 1.0), _normal((8,), dtype, 2)
    want = reference.rms_norm(x, scale) + np.asarray(bias, np.float64)
    _close(jax.jit(normjax.rms_norm)(x, scale, bias), want, dtype)
    with jax.enable_x64(True):
        args = (_normal((3, 5), jnp.float64), _normal((5,), jnp.float64, 1), _normal((5,), jnp.float64, 2))
        check_grads(jax.jit(normjax.rms_norm), args, order=1, modes=("fwd", "rev"))


def test_equinox_rms_norm_bias_matches_equinox():
    x = _normal((3, 6), seed=3, loc=2.0)
    ours = nqx.RMSNorm(6)
    theirs = eqx.nn.RMSNorm(6)
    theirs = eqx.tree_at(lambda m: m.bias, theirs, jnp.linspace(-1.0, 1.0, 6))
    ours = eqx.tree_at(lambda m: m.bias, ours, jnp.linspace(-1.0, 1.0, 6))
    np.testing.assert_allclose(jax.vmap(ours)(x), jax.vmap(theirs)(x), rtol=1e-6, atol=1e-6)


# --- Weight Standardization


def _standardized(w, axes, epsilon):
    w = np.asarray(w, np.float64)
    mean = w.mean(axes, keepdims=True)
    return (w - mean) / np.sqrt(((w - mean) ** 2).mean(axes, keepdims=True) + epsilon)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_weight_standardize_hwio_and_oihw(dtype):
    kernel = _normal((3, 3, 4, 8), dtype, 0, 0.1, 0.05)
    got = jax.jit(normjax.weight_standardize)(kernel)
    assert got.dtype == dtype and got.shape == kernel.shape
    _close(got, _standardized(kernel, (0, 1, 2), 1e-10), dtype)
    oihw = jnp.transpose(kernel, (3, 2, 0, 1))
    _close(normjax.weight_standardize(oihw, reduction_axes=(1, 2, 3)), _standardized(oihw, (1, 2, 3), 1e-10), dtype)
    gain = _normal((8,), dtype, 1, 1.0, 0.1)
    want = _standardized(kernel, (0, 1, 2), 1e-4) * np.asarray(gain, np.float64)
    _close(normjax.weight_standardize(kernel, gain, epsilon=1e-4), want, dtype)


def test_weight_standardize_gradients():
    with jax.enable_x64(True):
        kernel, gain = _normal((2, 2, 3, 4), jnp.float64), _normal((4,), jnp.float64, 1, 1.0)
        check_grads(jax.jit(normjax.weight_standardize), (kernel, gain), order=2, modes=("fwd", "rev"))


class StdConv(nn.Conv):
    """BiT's StdConv: the kernel standardized whenever it is read."""

    def param(self, name, *args, **kwargs):
        value = super().param(name, *args, **kwargs)
        return normjax.weight_standardize(value) if name == "kernel" else value


def test_std_conv_trains_through_jit_grad_and_vmap():
    x = _normal((2, 6, 6, 3), seed=4)
    conv = StdConv(8, (3, 3))
    variables = conv.init(jax.random.key(0), x)
    kernel = variables["params"]["kernel"]
    y = jax.jit(conv.apply)(variables, x)
    plain = nn.Conv(8, (3, 3)).apply({"params": {**variables["params"],
                                      "kernel": normjax.weight_standardize(kernel)}}, x)  # fmt: skip
    np.testing.assert_allclose(y, plain, rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda v: jnp.sum(conv.apply(v, x) ** 2)))(variables)
    assert grads["params"]["kernel"].shape == kernel.shape
    assert np.all(np.isfinite(grads["params"]["kernel"]))
    ensemble = jax.vmap(normjax.weight_standardize)(jnp.stack([kernel, 2.0 * kernel + 1.0]))
    np.testing.assert_allclose(ensemble[0], ensemble[1], rtol=1e-4, atol=1e-5)  # invariant to affine reparam.


def test_weight_standardize_errors():
    with pytest.raises(TypeError, match="`kernel` must be a floating-point"):
        normjax.weight_standardize(jnp.ones((3, 4), jnp.int32))
    with pytest.raises(ValueError, match="weight_standardize would compute each statistic from a single value"):
        normjax.weight_standardize(jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"`scale` must have shape \(4,\)"):
        normjax.weight_standardize(jnp.ones((3, 4)), jnp.ones(3))


# --- zeroed masked outputs


def _bn(x, scale=None, bias=None, *, training=True, **kw):
    state = normjax.BatchNormState(jnp.full(x.shape[-1], 0.5), jnp.full(x.shape[-1], 2.0))
    return normjax.batch_norm(x, state, scale, bias, training=training, **kw)[0]


MASKED_NORMS = {
    "layer_norm": normjax.layer_norm,
    "rms_norm": normjax.rms_norm,
    "group_norm": functools.partial(normjax.group_norm, num_groups=2),
    "instance_norm": normjax.instance_norm,
    "batch_norm": _bn,
    "batch_norm_eval": functools.partial(_bn, training=False),
    "ghost_batch_norm": functools.partial(_bn, virtual_batch_size=2),
    "gated_rms_norm": lambda x, scale, bias, **kw: normjax.gated_rms_norm(x, jnp.ones_like(x), scale, bias, **kw),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("name", sorted(MASKED_NORMS))
def test_zero_masked_outputs(name, dtype):
    """0 at masked positions (NaN padding included), the other outputs and all gradients unchanged."""
    fn = MASKED_NORMS[name]
    x = _normal((4, 3, 4), dtype, 0, 1.0, 2.0)
    mask = np.random.default_rng(1).random((4, 3, 4)) < 0.7
    mask[:, 0] = True  # every statistic keeps valid elements
    x = jnp.where(mask, x, jnp.nan)
    scale, bias = _normal((4,), dtype, 2, 1.0, 0.2), _normal((4,), dtype, 3)
    plain = jax.jit(functools.partial(fn, mask=mask))(x, scale, bias)
    zeroed = jax.jit(functools.partial(fn, mask=mask, zero_masked_outputs=True))(x, scale, bias)
    assert zeroed.dtype == dtype
    np.testing.assert_array_equal(np.asarray(zeroed, np.float32)[~mask], 0.0)
    np.testing.assert_array_equal(zeroed[mask], plain[mask])
    w = _normal((4, 3, 4), jnp.float32, 4)
    grads = jax.jit(jax.grad(lambda x, s, b: jnp.sum(fn(x, s, b, mask=mask, zero_masked_outputs=True) * w),
                             argnums=(0, 1, 2)))(x, scale, bias)  # fmt: skip
    masked_loss = lambda x, s, b: jnp.sum(jnp.where(mask, fn(x, s, b, mask=mask), 0) * w)  # noqa: E731
    want = jax.jit(jax.grad(masked_loss, argnums=(0, 1, 2)))(x, scale, bias)
    for got, expected in zip(grads, want, strict=True):
        assert np.all(np.isfinite(np.asarray(got, np.float32)))
        np.testing.assert_array_equal(got, expected)
    dense = _normal((4, 3, 4), dtype, 5)  # without a mask there is nothing to zero
    np.testing.assert_array_equal(fn(dense, scale, bias, zero_masked_outputs=True), fn(dense, scale, bias))


@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"])
def test_zero_masked_outputs_in_linen_and_nnx_layers(name):
    x = _normal((4, 3, 4), seed=5)
    mask = jnp.asarray(np.random.default_rng(6).random((4, 3, 1)) < 0.6).at[:, 0].set(True)
    config = {"GroupNorm": {"num_groups": 2}, "BatchNorm": {"use_running_average": False}}.get(name, {})
    layer = getattr(njn, name)(zero_masked_outputs=True, **config)
    variables = layer.init(jax.random.key(0), x)
    y, _ = layer.apply(variables, x, mask=mask, mutable=["batch_stats"])
    plain, _ = getattr(njn, name)(**config).apply(variables, x, mask=mask, mutable=["batch_stats"])
    np.testing.assert_array_equal(y, jnp.where(mask, plain, 0.0))
    nnx_layer = getattr(njx, name)(4, zero_masked_outputs=True, rngs=nnx.Rngs(0), **config)
    np.testing.assert_array_equal(nnx_layer(x, mask=mask), y)
    if name == "BatchNorm":  # evaluation zeroes the masked outputs too
        evaluated = njn.BatchNorm(use_running_average=True, zero_masked_outputs=True).apply(variables, x, mask=mask)
        np.testing.assert_array_equal(np.asarray(evaluated)[~np.broadcast_to(mask, x.shape)], 0.0)


def test_zero_masked_outputs_in_equinox_batch_norm():
    bn, state = eqx.nn.make_with_state(nqx.BatchNorm)(4, "batch", zero_masked_outputs=True)
    x = _normal((6, 4, 3), seed=7)
    keep = jnp.array([True, True, False, True, True, False])
    run = jax.vmap(lambda x, m, s: bn(x, s, mask=m), axis_name="batch", in_axes=(0, 0, None), out_axes=(0, None))
    y, state = run(x, keep, state)
    np.testing.assert_array_equal(y[~keep], 0.0)
    want = reference.batch_norm_train(np.moveaxis(np.asarray(x)[keep], 1, -1), epsilon=1e-5)[0]
    np.testing.assert_allclose(np.moveaxis(np.asarray(y)[keep], 1, -1), want, rtol=1e-5, atol=1e-5)


def test_zero_masked_outputs_must_be_a_static_bool():
    with pytest.raises(TypeError, match="`zero_masked_outputs` must be a Python bool"):
        normjax.layer_norm(jnp.ones((2, 4)), mask=jnp.ones((2, 4), bool), zero_masked_outputs=1)
