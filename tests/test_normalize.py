"""normjax.normalize against the float64 reference: affine broadcasting over feature axes and dtype handling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import normjax


@pytest.mark.parametrize(
    ("shape", "feature_axes"),
    [((6, 4), -1), ((6, 4), 0), ((2, 3, 4), (1, 2)), ((2, 3, 4, 5), 1), ((2, 3, 4, 5), (0, 3))],
)
@pytest.mark.parametrize("affine", [False, True])
def test_matches_reference(shape, feature_axes, affine):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    axes = reference._axes(feature_axes, x.ndim)
    reduce = reference._other(axes, x.ndim)
    mean, var, _ = reference.moments(x, reduce)
    feature_shape = tuple(shape[a] for a in axes)
    scale = rng.normal(1.0, 0.5, feature_shape).astype(np.float32) if affine else None
    bias = rng.normal(0.0, 1.0, feature_shape).astype(np.float32) if affine else None
    got = normjax.normalize(
        jnp.asarray(x), jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32), scale, bias,
        epsilon=1e-5, feature_axes=feature_axes,
    )  # fmt: skip
    want = reference.normalize(x, mean, var, scale, bias, 1e-5, feature_axes)
    assert got.shape == x.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, **reference.tolerance(np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_output_keeps_input_dtype(dtype):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(1.0, 2.0, (16, 3)), dtype)
    m = normjax.moments(x, 0, keepdims=True)  # float32 statistics for every input dtype
    scale = jnp.asarray(rng.normal(1.0, 0.5, (3,)), jnp.float32)
    y = normjax.normalize(x, m.mean, m.var, scale, jnp.zeros(3), epsilon=1e-5)
    assert y.dtype == dtype
    x64 = np.asarray(x, np.float64)
    mean, var, _ = reference.moments(x64, 0)
    want = reference.normalize(x64, mean, var, scale, np.zeros(3), 1e-5, -1)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, **reference.tolerance(dtype))


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_override(out_dtype):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 2)), jnp.bfloat16)
    m = normjax.moments(x, 0, keepdims=True)
    y = normjax.normalize(x, m.mean, m.var, dtype=out_dtype)
    assert y.dtype == out_dtype
    x64 = np.asarray(x, np.float64)
    mean, var, _ = reference.moments(x64, 0)
    np.testing.assert_allclose(
        np.asarray(y, np.float64), reference.normalize(x64, mean, var, None, None, 1e-5, -1),
        **reference.tolerance(out_dtype),
    )  # fmt: skip


def test_float64_with_x64():
    with jax.enable_x64(True):
        x = np.random.default_rng(3).normal(5.0, 2.0, (6, 3))
        mean, var, _ = reference.moments(x, 0)
        y = normjax.normalize(jnp.asarray(x), jnp.asarray(mean), jnp.asarray(var), jnp.full(3, 2.0), jnp.ones(3))
        assert y.dtype == jnp.float64
        want = reference.normalize(x, mean, var, np.full(3, 2.0), np.ones(3), 1e-5, -1)
        np.testing.assert_allclose(y, want, **reference.tolerance(np.float64))


def test_jit_grad_vmap():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 5, 2)), jnp.float32)
    scale = jnp.array([1.5, -0.5])

    def loss(x, scale):
        m = normjax.moments(x, 0, keepdims=True)
        return jnp.sum(normjax.normalize(x, m.mean, m.var, scale) ** 3)

    per_example = jax.vmap(jax.grad(loss), in_axes=(0, None))(x, scale)
    grad = jax.jit(jax.grad(loss))
    looped = jnp.stack([grad(xi, scale) for xi in x])
    np.testing.assert_allclose(per_example, looped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"scale": jnp.ones(3)}, ValueError, r"`scale` must have shape \(4,\)"),
        ({"bias": jnp.ones((4, 1))}, ValueError, r"`bias` must have shape \(4,\)"),
        ({"epsilon": 0.0}, ValueError, "`epsilon` must be a positive number"),
        ({"feature_axes": 2}, ValueError, "out of range"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, error, message):
    with pytest.raises(error, match=message):
        normjax.normalize(jnp.ones((2, 4)), 0.0, 1.0, **kwargs)
