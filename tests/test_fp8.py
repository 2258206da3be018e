"""8-bit float inputs (``float8_e4m3fn``, ``float8_e5m2``): float32 statistics, an explicit output dtype.

Every norm and layer is compared with the float64 reference of ``tests/reference.py`` on the 8-bit values
(which float64 holds exactly), so the only error is float32 arithmetic and the output's rounding.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normjax
import normjax.equinox as nqx
import normjax.linen as njn
import normjax.nnx as njx
from tests import reference

FP8 = [jnp.float8_e4m3fn, jnp.float8_e5m2]
IDS = ["e4m3fn", "e5m2"]
C = 8
EPS = 1e-5


def _data(dtype, shape=(6, 4, C), seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(1.0, 2.0, shape), jnp.float32).astype(dtype)


def _f64(a):
    return np.asarray(a.astype(jnp.float32), np.float64)


def _params():
    return np.linspace(0.5, 1.5, C, dtype=np.float32), np.linspace(-1.0, 1.0, C, dtype=np.float32)


def _close(got, want, dtype=jnp.float32):
    tolerance = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2}.get(jnp.dtype(dtype), 0.13)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", FP8, ids=IDS)
def test_functional_norms_default_to_float32_output(dtype):
    x = _data(dtype)
    scale, bias = _params()
    ref = _f64(x)
    state = normjax.init_batch_norm_state(C)
    cases = {
        "layer_norm": (
            normjax.layer_norm(x, scale, bias, epsilon=EPS),
            reference.layer_norm(ref, scale, bias, epsilon=EPS),
        ),
        "rms_norm": (normjax.rms_norm(x, scale, epsilon=EPS), reference.rms_norm(ref, scale, epsilon=EPS)),
        "group_norm": (
            normjax.group_norm(x, scale, bias, num_groups=2, epsilon=EPS),
            reference.group_norm(ref, scale, bias, num_groups=2, epsilon=EPS),
        ),
        "instance_norm": (
            normjax.instance_norm(x, scale, bias, epsilon=EPS),
            reference.instance_norm(ref, scale, bias, epsilon=EPS),
        ),
        "batch_norm": (
            normjax.batch_norm(x, state, scale, bias, training=True, epsilon=EPS)[0],
            reference.batch_norm_train(ref, scale, bias, epsilon=EPS)[0],
        ),
        "batch_norm eval": (
            normjax.batch_norm(x, state._replace(mean=scale), scale, bias, training=False, epsilon=EPS)[0],
            reference.batch_norm_eval(ref, scale, np.ones(C), scale, bias, epsilon=EPS),
        ),
    }
    for name, (got, want) in cases.items():
        assert got.dtype == jnp.float32, name
        _close(got, want)
    m = normjax.moments(x, reduction_axes=(0, 1))
    want_mean, want_var, _ = reference.moments(ref, (0, 1))
    np.testing.assert_allclose(m.mean, want_mean.reshape(C), rtol=1e-6)
    np.testing.assert_allclose(m.var, want_var.reshape(C), rtol=1e-5)
    assert m.mean.dtype == jnp.float32
    mk = normjax.moments(x, reduction_axes=(0, 1), keepdims=True)
    _close(
        normjax.normalize(x, mk.mean, mk.var, scale, bias),
        reference.normalize(ref, mk.mean, mk.var, scale, bias, 1e-5, -1),
    )


@pytest.mark.parametrize("dtype", FP8, ids=IDS)
@pytest.mark.parametrize("out", [jnp.bfloat16, "same"], ids=["bf16", "fp8"])
def test_explicit_output_dtype_rounds_once(dtype, out):
    x = _data(dtype, seed=1)
    out = dtype if out == "same" else out
    scale, bias = _params()
    for f in (
        lambda **k: normjax.layer_norm(x, scale, bias, **k),
        lambda **k: normjax.rms_norm(x, scale, **k),
        lambda **k: normjax.group_norm(x, scale, bias, num_groups=4, **k),
        lambda **k: normjax.instance_norm(x, scale, bias, **k),
        lambda **k: normjax.batch_norm(x, normjax.init_batch_norm_state(C), scale, bias, training=True, **k)[0],
    ):
        y = f(dtype=out)
        assert y.dtype == jnp.dtype(out)
        np.testing.assert_array_equal(
            np.asarray(y.astype(jnp.float32)), np.asarray(f().astype(out).astype(jnp.float32))
        )


@pytest.mark.parametrize("dtype", FP8, ids=IDS)
def test_under_jit_vmap_grad_and_sync(dtype):
    x = _data(dtype, seed=2)
    scale, bias = _params()
    ref = _f64(x)

    def loss(scale, bias):
        return jnp.sum(normjax.layer_norm(x, scale, bias) * jnp.cos(jnp.arange(C))[None, None])

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(scale, bias)
    x_hat = reference.layer_norm(ref, epsilon=1e-6)
    np.testing.assert_allclose(grads[0], np.sum(x_hat * np.cos(np.arange(C)), axis=(0, 1)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads[1], np.cos(np.arange(C)) * 24, rtol=1e-5)
    vmapped = jax.vmap(lambda x: normjax.rms_norm(x, scale))(x)
    _close(vmapped, reference.rms_norm(ref, scale))
    # BatchNorm synchronized over a vmap axis splitting the batch: the statistics of the whole batch.
    state = normjax.init_batch_norm_state(C)
    y, new_state = jax.vmap(
        lambda x: normjax.batch_norm(x, state, scale, bias, training=True, epsilon=EPS, axis_name="d"),
        axis_name="d",
        out_axes=(0, None),
    )(x.reshape(2, 3, 4, C))
    _close(y.reshape(x.shape), reference.batch_norm_train(ref, scale, bias, epsilon=EPS)[0])
    np.testing.assert_allclose(new_state.mean, 0.01 * ref.mean(axis=(0, 1)), rtol=1e-5)
    assert int(new_state.count) == 1


@pytest.mark.parametrize("dtype", FP8, ids=IDS)
def test_flax_layers_output_float32_and_agree_bit_for_bit(dtype):
    x = _data(dtype, seed=3)
    ref = _f64(x)
    layers = {
        "LayerNorm": (njn.LayerNorm(), lambda: njx.LayerNorm(C, rngs=nnx.Rngs(0)), reference.layer_norm(ref)),
        "RMSNorm": (njn.RMSNorm(), lambda: njx.RMSNorm(C, rngs=nnx.Rngs(0)), reference.rms_norm(ref)),
        "GroupNorm": (
            njn.GroupNorm(num_groups=2, reduction_axes=(1, 2)),
            lambda: njx.GroupNorm(C, num_groups=2, reduction_axes=(1, 2), rngs=nnx.Rngs(0)),
            reference.group_norm(ref, num_groups=2),
        ),
        "InstanceNorm": (
            njn.InstanceNorm(),
            lambda: njx.InstanceNorm(C, rngs=nnx.Rngs(0)),
            reference.instance_norm(ref),
        ),
        "BatchNorm": (
            njn.BatchNorm(use_running_average=False),
            lambda: njx.BatchNorm(C, rngs=nnx.Rngs(0)),
            reference.batch_norm_train(ref)[0],
        ),
    }
    for name, (linen_layer, make_nnx, want) in layers.items():
        variables = linen_layer.init(jax.random.key(0), x)
        y, _ = linen_layer.apply(variables, x, mutable=["batch_stats"])
        assert y.dtype == jnp.float32, name
        _close(y, want)
        np.testing.assert_array_equal(np.asarray(make_nnx()(x)), np.asarray(y), err_msg=name)
        y8 = linen_layer.copy(dtype=dtype).apply(variables, x, mutable=["batch_stats"])[0]
        assert y8.dtype == dtype, name
        np.testing.assert_array_equal(
            np.asarray(y8.astype(jnp.float32)), np.asarray(y.astype(dtype).astype(jnp.float32))
        )


@pytest.mark.parametrize("dtype", FP8, ids=IDS)
def test_equinox_layers(dtype):
    x = _data(dtype, shape=(6, C, 4), seed=4)  # channels first per example
    ref = _f64(x)
    bn, state = eqx.nn.make_with_state(nqx.BatchNorm)(C, "batch")
    y, state = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    assert y.dtype == jnp.float32
    _close(y, reference.batch_norm_train(ref, axis=1)[0])
    per_example = {
        "LayerNorm": (nqx.LayerNorm((C, 4)), reference.layer_norm(ref, reduction_axes=(1, 2), epsilon=1e-5)),
        "RMSNorm": (nqx.RMSNorm((C, 4)), reference.rms_norm(ref, reduction_axes=(1, 2), epsilon=1e-5)),
        "GroupNorm": (nqx.GroupNorm(2, C), reference.group_norm(ref, num_groups=2, feature_axes=1, epsilon=1e-5)),
        "InstanceNorm": (nqx.InstanceNorm(C), reference.instance_norm(ref, feature_axes=1, epsilon=1e-5)),
    }
    for name, (layer, want) in per_example.items():
        got = jax.vmap(layer)(x)
        assert got.dtype == jnp.float32, name
        _close(got, want)
    with_bias = eqx.tree_at(lambda m: m.bias, nqx.RMSNorm((C, 4)), jnp.full((C, 4), 0.5))
    _close(jax.vmap(with_bias)(x), reference.rms_norm(ref, reduction_axes=(1, 2), epsilon=1e-5) + 0.5)
