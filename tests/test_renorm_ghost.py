"""Batch Renormalization and Ghost BatchNorm in the core `batch_norm`, against float64 NumPy implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from batch_norm_data import ema as _ema
from batch_norm_data import feature_shape as _feature_shape
from batch_norm_data import inputs as _inputs

import normjax

EPS = 1e-3
F32 = reference.tolerance(np.float32)

STATIC = ("training", "axis", "unbiased_running_var", "virtual_batch_size", "renorm_clipping")
batch_norm = jax.jit(normjax.batch_norm, static_argnames=STATIC)


def _renorm_reference(x, running_mean, running_var, gamma, beta, r_max, d_max, upstream):
    """Ioffe (2017), Algorithm 1, in float64 for (N, C) inputs: output and the gradients with r, d held constant."""
    x = np.asarray(x, np.float64)
    mu, var = x.mean(0), x.var(0)
    sigma_b = np.sqrt(var + EPS)
    sigma = np.sqrt(np.asarray(running_var, np.float64) + EPS)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mu - running_mean) / sigma, -d_max, d_max)
    x_hat = (x - mu) / sigma_b
    y = (x_hat * r + d) * gamma + beta
    # Backward with r and d treated as constants: the usual BatchNorm backward, scaled by r.
    g_hat = upstream * gamma * r
    grad_x = (g_hat - g_hat.mean(0) - x_hat * (g_hat * x_hat).mean(0)) / sigma_b
    grad_gamma = (upstream * (x_hat * r + d)).sum(0)
    grad_beta = upstream.sum(0)
    return y, (grad_x, grad_gamma, grad_beta), (r, d)


def _renorm_case(seed, running_offset, running_scale):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(8, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -2.0]).astype(np.float32)
    running_mean = (x.mean(0) + running_offset).astype(np.float32)
    running_var = (x.var(0) * running_scale**2).astype(np.float32)
    gamma, beta = (rng.normal(size=3).astype(np.float32) for _ in range(2))
    upstream = rng.normal(size=x.shape)
    return x, running_mean, running_var, gamma, beta, upstream


@pytest.mark.parametrize(
    ("r_max", "d_max", "running_offset", "running_scale"),
    [
        (3.0, 5.0, np.array([0.5, -0.3, 0.2]), np.array([1.5, 0.8, 1.2])),  # r and d inside their ranges
        (1.2, 0.1, np.array([0.5, -0.3, 0.2]), np.array([2.0, 0.5, 1.0])),  # clipped in some features
        (1.0, 0.0, np.array([3.0, 1.0, 0.0]), np.array([5.0, 0.2, 1.0])),  # fully clipped: plain BatchNorm
    ],
    ids=["inside", "clipped", "plain"],
)
def test_batch_renorm_matches_float64_with_constant_r_and_d(r_max, d_max, running_offset, running_scale):
    x, running_mean, running_var, gamma, beta, upstream = _renorm_case(0, running_offset, running_scale)
    state = normjax.BatchNormState(jnp.asarray(running_mean), jnp.asarray(running_var))

    def forward(x, gamma, beta):
        return normjax.batch_norm(
            x, state, gamma, beta, training=True, epsilon=EPS, momentum=0.8, renorm_clipping=(r_max, d_max)
        )

    (y, new_state), vjp = jax.vjp(forward, jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta))
    grads = vjp((jnp.asarray(upstream, jnp.float32), jax.tree.map(jnp.zeros_like, new_state)))

    expected_y, expected_grads, (r, d) = _renorm_reference(
        x, running_mean, running_var, gamma, beta, r_max, d_max, upstream
    )
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
    for got, want, name in zip(grads, expected_grads, ("x", "scale", "bias"), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"gradient to {name}")
    # The running statistics follow the plain EMA of the batch statistics, whatever r and d.
    np.testing.assert_allclose(new_state.mean, 0.8 * running_mean + 0.2 * x.astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(new_state.var, 0.8 * running_var + 0.2 * x.astype(np.float64).var(0), rtol=1e-5)
    if d_max == 0.0:
        np.testing.assert_array_equal(r, 1.0)
        y_plain, _ = normjax.batch_norm(x, state, gamma, beta, training=True, epsilon=EPS, momentum=0.8)
        np.testing.assert_allclose(y, y_plain, rtol=1e-6, atol=1e-6)


def test_unclipped_renorm_output_equals_inference_output():
    """With r and d inside their ranges, training-mode Batch Renorm computes exactly the inference transform."""
    x, running_mean, running_var, gamma, beta, _ = _renorm_case(1, np.array([0.4, 0.1, -0.2]), np.array([1.3] * 3))
    state = normjax.BatchNormState(jnp.asarray(running_mean), jnp.asarray(running_var))
    y_train, _ = normjax.batch_norm(x, state, gamma, beta, training=True, epsilon=EPS, renorm_clipping=(10.0, 10.0))
    y_eval, _ = normjax.batch_norm(x, state, gamma, beta, training=False, epsilon=EPS, renorm_clipping=(10.0, 10.0))
    np.testing.assert_allclose(y_train, y_eval, rtol=1e-5, atol=1e-5)


def test_renorm_gradient_differs_from_finite_differences_through_r_and_d():
    """The stop-gradient is real: differentiating through r and d (finite differences) gives another answer."""
    x, running_mean, running_var, gamma, beta, upstream = _renorm_case(2, np.array([0.5] * 3), np.array([1.5] * 3))
    state = normjax.BatchNormState(jnp.asarray(running_mean), jnp.asarray(running_var))
    x64 = x.astype(np.float64)

    def loss(x):
        y, _ = normjax.batch_norm(x, state, gamma, beta, training=True, epsilon=EPS, renorm_clipping=(3.0, 5.0))
        return jnp.sum(y * upstream.astype(np.float32))

    def loss64(x):
        y, *_ = _renorm_reference(x, running_mean, running_var, gamma, beta, 3.0, 5.0, upstream)
        return np.sum(y * upstream)

    direction = np.random.default_rng(3).normal(size=x.shape)
    h = 1e-6
    total_derivative = (loss64(x64 + h * direction) - loss64(x64 - h * direction)) / (2 * h)
    analytic = float(jnp.sum(jax.grad(loss)(jnp.asarray(x)) * direction))
    _, (grad_x, _, _), _ = _renorm_reference(x, running_mean, running_var, gamma, beta, 3.0, 5.0, upstream)
    np.testing.assert_allclose(analytic, np.sum(grad_x * direction), rtol=1e-4)
    assert abs(analytic - total_derivative) > 1e-2 * abs(total_derivative)


# Batch Renormalization (Ioffe, 2017), on more layouts and with gradients.


@pytest.mark.parametrize(("shape", "axis"), [((16, 4), -1), ((4, 4, 3, 3), 1)])
def test_renorm_matches_paper(shape, axis):
    x, scale, bias, _ = _inputs(shape, axis, seed=11, mean=0.0, std=1.0)
    features = _feature_shape(shape, axis)
    # Per feature, running statistics that make r and d clip (first features) or not (last feature).
    running_mean = np.array([3.0, -3.0, 0.5, 0.0][: features[0]], np.float32)
    running_var = np.array([0.1, 20.0, 1.3, 1.0][: features[0]], np.float32)
    state = normjax.BatchNormState(jnp.asarray(running_mean), jnp.asarray(running_var))
    r_max, d_max = 1.5, 0.5
    y, new_state = batch_norm(
        jnp.asarray(x), state, scale, bias, training=True, momentum=0.9, axis=axis, renorm_clipping=(r_max, d_max)
    )
    want_y, r, d = reference.batch_renorm_train(
        x, running_mean, running_var, scale, bias, r_max=r_max, d_max=d_max, axis=axis
    )
    assert np.any(np.isin(r, [r_max, 1 / r_max])) and np.any(np.abs(d) == d_max), "clipping is exercised"
    assert np.any(np.abs(r - 1) < r_max - 1) and np.any(np.abs(d) < d_max), "and so is the unclipped range"
    np.testing.assert_allclose(y, want_y, **F32)
    # The running statistics are updated from the batch statistics, as without renormalization.
    _, mean, var, _ = reference.batch_norm_train(x, axis=axis)
    np.testing.assert_allclose(new_state.mean, _ema(running_mean, mean, 0.9), **F32)
    np.testing.assert_allclose(new_state.var, _ema(running_var, var, 0.9), **F32)


def test_renorm_without_room_is_plain_batch_norm():
    x, scale, bias, state = _inputs((8, 3, 3), 1, seed=12, mean=4.0)
    plain = batch_norm(jnp.asarray(x), state, scale, bias, training=True, axis=1)
    renorm = batch_norm(jnp.asarray(x), state, scale, bias, training=True, axis=1, renorm_clipping=(1.0, 0.0))
    np.testing.assert_allclose(renorm[0], plain[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(renorm[1].mean, plain[1].mean)
    np.testing.assert_array_equal(renorm[1].var, plain[1].var)


def test_renorm_treats_r_and_d_as_constants_in_the_gradient():
    x, scale, bias, _ = _inputs((12, 2), -1, seed=13, mean=0.0, std=1.0)
    state = normjax.BatchNormState(jnp.array([0.3, -0.2]), jnp.array([0.8, 1.1]))
    _, r, d = reference.batch_renorm_train(x, state.mean, state.var, r_max=3.0, d_max=5.0)
    weights = jnp.asarray(np.random.default_rng(14).normal(size=x.shape), jnp.float32)

    def loss(x, scale, bias, **renorm):
        y, _ = batch_norm(x, state, scale, bias, training=True, **renorm)
        return jnp.sum(weights * y)

    got = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnames="renorm_clipping")(
        jnp.asarray(x), scale, bias, renorm_clipping=(3.0, 5.0)
    )
    # With r, d constant, renorm is plain BN with scale gamma * r and bias beta + gamma * d.
    r, d = jnp.asarray(r, jnp.float32), jnp.asarray(d, jnp.float32)
    gx, gscale, _ = jax.jit(jax.grad(loss, (0, 1, 2)))(jnp.asarray(x), scale * r, bias + scale * d)
    np.testing.assert_allclose(got[0], gx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], gscale * r + jnp.sum(weights, 0) * d, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[2], jnp.sum(weights, 0), rtol=1e-6)


# Ghost BatchNorm (Hoffer et al., 2017).


@pytest.mark.parametrize("unbiased", [False, True])
def test_ghost_batch_norm_equals_batch_norm_on_each_virtual_batch(unbiased):
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(12, 3, 2)) * 2 + np.arange(12)[:, None, None] / 3).astype(np.float32)  # NWC
    gamma, beta = rng.normal(size=2).astype(np.float32), rng.normal(size=2).astype(np.float32)
    state = normjax.BatchNormState(jnp.asarray([0.5, -0.5]), jnp.asarray([2.0, 1.0]))
    y, new_state = jax.jit(
        lambda x: normjax.batch_norm(
            x, state, gamma, beta, training=True, epsilon=EPS, momentum=0.9, virtual_batch_size=4,
            unbiased_running_var=unbiased,
        )
    )(x)  # fmt: skip

    means, variances = [], []
    for ghost in np.split(x, 3):
        expected, mean, var, count = reference.batch_norm_train(ghost, gamma, beta, epsilon=EPS)
        np.testing.assert_allclose(y[len(means) * 4 : len(means) * 4 + 4], expected, rtol=1e-5, atol=1e-5)
        means.append(mean)
        variances.append(var * count / (count - 1) if unbiased else var)
    np.testing.assert_allclose(new_state.mean, 0.9 * np.array([0.5, -0.5]) + 0.1 * np.mean(means, 0), rtol=1e-5)
    np.testing.assert_allclose(new_state.var, 0.9 * np.array([2.0, 1.0]) + 0.1 * np.mean(variances, 0), rtol=1e-5)


def test_ghost_running_statistics_are_count_weighted_under_a_mask():
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(6, 2)) + [[0.0, 5.0]]).astype(np.float32)
    mask = np.ones((6, 1), bool)
    mask[3:5] = False  # the second virtual batch keeps 1 of its 3 rows
    state = normjax.init_batch_norm_state(2)
    y, new_state = normjax.batch_norm(
        x, state, training=True, epsilon=EPS, momentum=0.0, virtual_batch_size=3, mask=mask, allow_single_value=True
    )
    first, second = reference.moments(x[:3], 0), reference.moments(x[5:], 0)
    weighted_mean = (3 * first[0] + 1 * second[0]) / 4
    weighted_var = (3 * first[1] + 1 * second[1]) / 4
    np.testing.assert_allclose(new_state.mean, weighted_mean.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state.var, weighted_var.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[:3], reference.batch_norm_train(x[:3], epsilon=EPS)[0], rtol=1e-5, atol=1e-5)


def test_ghost_is_training_only():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(8, 2)), jnp.float32)
    state = normjax.BatchNormState(jnp.array([0.1, 0.2]), jnp.array([1.5, 0.5]))
    ghost, _ = normjax.batch_norm(x, state, training=False, virtual_batch_size=2)
    plain, _ = normjax.batch_norm(x, state, training=False)
    np.testing.assert_array_equal(ghost, plain)


@pytest.mark.parametrize(
    ("shape", "axis", "masked", "unbiased"),
    [((12, 3), -1, False, False), ((12, 3), -1, True, True), ((8, 2, 3, 3), 1, True, False)],
)
def test_ghost_batch_norm_is_batch_norm_per_virtual_batch(shape, axis, masked, unbiased):
    x, scale, bias, state = _inputs(shape, axis, seed=15)
    virtual, ghosts = 4, shape[0] // 4
    mask = None
    if masked:  # uneven valid counts per virtual batch, so the weighting of the running statistics matters
        keep_probability = np.linspace(0.3, 0.9, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
        mask = np.random.default_rng(16).random(shape) < keep_probability
        mask[::virtual] = mask[1::virtual] = True  # at least two valid values per virtual batch and feature
    kw = dict(training=True, momentum=0.9, axis=axis, unbiased_running_var=unbiased)
    as_jnp = lambda m: None if m is None else jnp.asarray(m)  # noqa: E731
    y, new_state = batch_norm(jnp.asarray(x), state, scale, bias, virtual_batch_size=virtual, mask=as_jnp(mask), **kw)
    counts, means, vars_ = [], [], []
    for g in range(ghosts):
        part = slice(g * virtual, (g + 1) * virtual)
        part_mask = None if mask is None else mask[part]
        y_g, state_g = batch_norm(jnp.asarray(x[part]), state, scale, bias, mask=as_jnp(part_mask), **kw)
        valid = np.ones(x[part].shape, bool) if part_mask is None else np.broadcast_to(part_mask, x[part].shape)
        np.testing.assert_allclose(np.asarray(y)[part][valid], np.asarray(y_g)[valid], rtol=1e-6, atol=1e-6)
        _, mean, var, count = reference.batch_norm_train(x[part], axis=axis, mask=part_mask)
        counts.append(count)
        means.append(mean)
        vars_.append(var * count / (count - 1) if unbiased else var)
    weights = np.stack(counts) / np.sum(counts, axis=0)
    np.testing.assert_allclose(new_state.mean, _ema(state.mean, np.sum(weights * np.stack(means), 0), 0.9), **F32)
    np.testing.assert_allclose(new_state.var, _ema(state.var, np.sum(weights * np.stack(vars_), 0), 0.9), **F32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"virtual_batch_size": 5}, "must be a positive int that divides the batch size 12"),
        ({"virtual_batch_size": 4, "renorm_clipping": (2.0, 1.0)}, "cannot be combined"),
    ],
)
def test_ghost_batch_norm_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        normjax.batch_norm(jnp.ones((12, 3)), normjax.init_batch_norm_state(3), training=True, **kwargs)
