"""normjax.batch_norm against the float64 reference: training, running statistics, eval, transforms.

Batch Renormalization and Ghost BatchNorm are tested in test_renorm_ghost.py, empty and non-finite batches in
test_state_safety.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from batch_norm_data import ema as _ema
from batch_norm_data import inputs as _inputs

import normjax

F32 = reference.tolerance(np.float32)

# One jitted program per shape compiles ~3x faster than the eager primitive-by-primitive path (which
# test_jit_matches_eager and the eval test still exercise).
batch_norm = jax.jit(normjax.batch_norm, static_argnames=("training", "axis", "unbiased_running_var"))

# (shape, axis): MLP, sequence, image, volume, channels-first image, two feature axes.
LAYOUTS = [
    ((8, 3), -1),
    ((4, 5, 3), -1),
    ((2, 4, 4, 3), -1),
    ((2, 3, 3, 3, 2), -1),
    ((4, 3, 5, 5), 1),
    ((4, 3, 5), (1, 2)),
]


@pytest.mark.parametrize("features", [3, np.int64(3), (2, 3), [2, np.int32(3)]])
def test_initial_state(features):
    state = normjax.init_batch_norm_state(features)
    shape = (3,) if np.ndim(features) == 0 else (2, 3)
    np.testing.assert_array_equal(state.mean, np.zeros(shape))
    np.testing.assert_array_equal(state.var, np.ones(shape))
    assert state.mean.dtype == state.var.dtype == jnp.float32
    # A pytree of (mean, var, count), the step count an int32 0; constructible from (mean, var) alone, uncounted.
    assert state.count.dtype == jnp.int32 and state.count.shape == () and int(state.count) == 0
    assert len(jax.tree.leaves(state)) == 3
    assert len(jax.tree.leaves(normjax.BatchNormState(state.mean, state.var))) == 2


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("masked", [False, True])
def test_training_matches_reference(shape, axis, masked):
    x, scale, bias, state = _inputs(shape, axis)
    mask = None
    if masked:
        mask = np.random.default_rng(1).random(shape) < 0.7
        x = np.where(mask, x, np.float32(np.nan))  # masked values must not matter
    y, new_state = batch_norm(
        jnp.asarray(x), state, scale, bias, training=True, momentum=0.9, axis=axis,
        mask=None if mask is None else jnp.asarray(mask),
    )  # fmt: skip
    want_y, mean, var, _ = reference.batch_norm_train(x, scale, bias, axis=axis, mask=mask)
    valid = np.ones(shape, bool) if mask is None else mask
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y)[valid], want_y[valid], **F32)
    np.testing.assert_allclose(new_state.mean, _ema(state.mean, mean, 0.9), **F32)
    np.testing.assert_allclose(new_state.var, _ema(state.var, var, 0.9), **F32)
    assert new_state.mean.dtype == new_state.var.dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(("shape", "axis"), [((2, 4, 4, 3), -1), ((4, 3, 5), 1)])
def test_low_precision_training_and_eval(dtype, shape, axis):
    x, scale, bias, state = _inputs(shape, axis)
    x = jnp.asarray(x, dtype)
    x64 = np.asarray(x, np.float64)  # the reference sees the same rounded input
    y, new_state = batch_norm(x, state, scale, bias, training=True, momentum=0.9, axis=axis)
    want_y, mean, var, _ = reference.batch_norm_train(x64, scale, bias, axis=axis)
    assert y.dtype == dtype
    assert new_state.mean.dtype == new_state.var.dtype == jnp.float32, "running statistics stay float32"
    np.testing.assert_allclose(np.asarray(y, np.float64), want_y, **reference.tolerance(dtype))
    # Statistics are reduced in float32, so the state has float32 accuracy even for 16-bit inputs.
    np.testing.assert_allclose(new_state.mean, _ema(state.mean, mean, 0.9), **F32)
    np.testing.assert_allclose(new_state.var, _ema(state.var, var, 0.9), **F32)

    y_eval, _ = batch_norm(x, new_state, scale, bias, training=False, axis=axis)
    assert y_eval.dtype == dtype
    want_eval = reference.batch_norm_eval(x64, new_state.mean, new_state.var, scale, bias, axis=axis)
    np.testing.assert_allclose(np.asarray(y_eval, np.float64), want_eval, **reference.tolerance(dtype))


def test_float64_with_x64():
    with jax.enable_x64(True):
        x = np.random.default_rng(2).normal(3.0, 2.0, (6, 4, 2))
        state = normjax.init_batch_norm_state(2, jnp.float64)
        y, new_state = batch_norm(jnp.asarray(x), state, training=True, momentum=0.8)
        want_y, mean, var, _ = reference.batch_norm_train(x)
        assert y.dtype == new_state.mean.dtype == jnp.float64
        tol = reference.tolerance(np.float64)
        np.testing.assert_allclose(y, want_y, **tol)
        np.testing.assert_allclose(new_state.mean, 0.2 * mean, **tol)
        np.testing.assert_allclose(new_state.var, 0.8 + 0.2 * var, **tol)


@pytest.mark.parametrize("masked", [False, True])
def test_unbiased_running_var_stores_bessel_corrected_variance(masked):
    x, _, _, state = _inputs((6, 5, 3), -1, seed=3)
    mask = np.random.default_rng(4).random(x.shape) < 0.5 if masked else None
    _, new_state = batch_norm(
        jnp.asarray(x), state, training=True, momentum=0.7, unbiased_running_var=True,
        mask=None if mask is None else jnp.asarray(mask),
    )  # fmt: skip
    _, mean, var, count = reference.batch_norm_train(x, mask=mask)
    assert (count > 1).all()
    np.testing.assert_allclose(new_state.mean, _ema(state.mean, mean, 0.7), **F32)
    np.testing.assert_allclose(new_state.var, _ema(state.var, var * count / (count - 1), 0.7), **F32)


def test_running_statistics_over_several_steps():
    """The EMA, unrolled: after k steps, old * m^k + sum_j (1 - m) m^(k-1-j) batch_j."""
    rng = np.random.default_rng(5)
    batches = [rng.normal(i, 1.0 + i, (16, 2)).astype(np.float32) for i in range(3)]
    state = normjax.init_batch_norm_state(2)
    step = jax.jit(lambda x, s: batch_norm(x, s, training=True, momentum=0.5)[1])
    for x in batches:
        state = step(x, state)
    stats = [reference.batch_norm_train(x)[1:3] for x in batches]
    want_mean = sum(0.5 * 0.5 ** (2 - j) * m for j, (m, _) in enumerate(stats))
    want_var = 0.5**3 + sum(0.5 * 0.5 ** (2 - j) * v for j, (_, v) in enumerate(stats))
    np.testing.assert_allclose(state.mean, want_mean, **F32)
    np.testing.assert_allclose(state.var, want_var, **F32)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_extremes(momentum):
    x, _, _, state = _inputs((8, 3), -1, seed=6)
    _, new_state = batch_norm(jnp.asarray(x), state, training=True, momentum=momentum)
    _, mean, var, _ = reference.batch_norm_train(x)
    if momentum == 1.0:  # all weight on the old value: the state does not move
        np.testing.assert_array_equal(new_state.mean, state.mean)
        np.testing.assert_array_equal(new_state.var, state.var)
    else:  # all weight on the batch
        np.testing.assert_allclose(new_state.mean, mean, **F32)
        np.testing.assert_allclose(new_state.var, var, **F32)


@pytest.mark.parametrize(("shape", "axis"), [((4, 3, 5, 5), 1), ((4, 3, 5), (1, 2))])
def test_eval_is_the_affine_map_of_the_running_statistics(shape, axis):
    x, scale, bias, state = _inputs(shape, axis, seed=7)
    z = np.random.default_rng(8).normal(size=shape).astype(np.float32)
    f = lambda v: normjax.batch_norm(jnp.asarray(v), state, scale, bias, training=False, axis=axis)  # noqa: E731
    y, returned_state = f(x)
    assert returned_state is state, "eval returns the state unchanged"
    np.testing.assert_allclose(y, reference.batch_norm_eval(x, state.mean, state.var, scale, bias, axis=axis), **F32)
    # Affine: f(a x + (1 - a) z) = a f(x) + (1 - a) f(z), and each example's output ignores the rest of the batch.
    np.testing.assert_allclose(f(0.3 * x + 0.7 * z)[0], 0.3 * y + 0.7 * f(z)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f(x[:1])[0], y[:1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_large_offset(offset):
    x = np.random.default_rng(24).normal(offset, 1.0, (64, 2, 3)).astype(np.float32)
    state = normjax.init_batch_norm_state(3)
    y, new_state = batch_norm(jnp.asarray(x), state, training=True, momentum=0.0)
    want_y, mean, var, _ = reference.batch_norm_train(x)
    # The float32 mean of values of size `offset` is a few ulps of `offset` off (ulp(1e4) = 9.8e-4); 1e-6 * offset
    # allows 8-16 ulps in units of the unit std. The variance must be right to 1% (the one-pass formula is not).
    np.testing.assert_allclose(y, want_y, rtol=0, atol=1e-6 * offset)
    np.testing.assert_allclose(new_state.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(new_state.var, var, rtol=1e-2)


# Transformations.


def test_jit_matches_eager():
    x, scale, bias, state = _inputs((4, 3, 3, 2), -1, seed=17)
    mask = jnp.asarray(np.random.default_rng(18).random(x.shape) < 0.8)
    f = lambda x, s, m: normjax.batch_norm(x, s, scale, bias, training=True, mask=m)  # noqa: E731
    eager, jitted = f(jnp.asarray(x), state, mask), jax.jit(f)(jnp.asarray(x), state, mask)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-6)


def test_vmap_over_an_ensemble_of_states_and_parameters():
    members, shape = 3, (6, 4, 2)
    x = jnp.asarray(np.random.default_rng(19).normal(size=shape), jnp.float32)
    per_member = [_inputs(shape, -1, seed=20 + k)[1:] for k in range(members)]
    scales = jnp.stack([jnp.asarray(s) for s, _, _ in per_member])
    biases = jnp.stack([jnp.asarray(b) for _, b, _ in per_member])
    states = jax.tree.map(lambda *a: jnp.stack(a), *[s for _, _, s in per_member])

    def step(state, scale, bias, x):
        y, state = batch_norm(x, state, scale, bias, training=True, momentum=0.9)
        y_eval, _ = batch_norm(x, state, scale, bias, training=False)
        return y, y_eval, state

    # The same batch for every member (in_axes None), and a batch per member.
    for xs, x_axis in ((x, None), (jnp.stack([x, 2 * x, x + 1]), 0)):
        got = jax.jit(jax.vmap(step, in_axes=(0, 0, 0, x_axis)))(states, scales, biases, xs)
        for k, (scale, bias, state) in enumerate(per_member):
            want = step(state, scale, bias, xs if x_axis is None else xs[k])
            chex.assert_trees_all_close(jax.tree.map(lambda a, k=k: a[k], got), want, rtol=1e-5, atol=1e-5)


def test_grad_through_training_and_running_statistics():
    x, scale, bias, state = _inputs((6, 3), -1, seed=23)

    def loss(x, scale, bias):
        y, new_state = batch_norm(x, state, scale, bias, training=True)
        return jnp.sum(y**2 * jnp.arange(3.0)[None]) + jnp.sum(new_state.mean)

    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(jnp.asarray(x), scale, bias)
    assert all(np.all(np.isfinite(g)) for g in grads)
    # d/dx of sum(new_state.mean) is (1 - momentum) / N per element, plus the BN term whose sum over a feature is 0
    # (the output is invariant to shifting that feature).
    np.testing.assert_allclose(jnp.sum(grads[0], 0), np.full(3, 0.01), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"x": jnp.ones((1, 3))}, ValueError, "one value per feature"),
        ({"momentum": 1.5}, ValueError, "`momentum` must be in"),
        ({"state": normjax.init_batch_norm_state(4)}, ValueError, r"`state.mean` must have shape \(3,\)"),
        ({"scale": jnp.ones(2)}, ValueError, r"`scale` must have shape \(3,\)"),
        ({"axis": 3}, ValueError, "out of range"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, error, message):
    args = {"x": jnp.ones((4, 3)), "state": normjax.init_batch_norm_state(3), "training": True, **kwargs}
    with pytest.raises(error, match=message):
        normjax.batch_norm(args.pop("x"), args.pop("state"), **args)
