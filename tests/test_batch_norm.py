"""normjax.batch_norm against the float64 reference: training, running statistics, eval, renorm, ghost, transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import normjax

F32 = reference.tolerance(np.float32)

# One jitted program per shape compiles ~3x faster than the eager primitive-by-primitive path (which
# test_jit_matches_eager and the eval test still exercise).
batch_norm = jax.jit(
    normjax.batch_norm,
    static_argnames=(
        "training", "axis", "unbiased_running_var", "skip_nonfinite", "allow_single_value", "virtual_batch_size",
        "renorm_clipping",
    ),
)  # fmt: skip

# (shape, axis): MLP, sequence, image, volume, channels-first image, two feature axes.
LAYOUTS = [
    ((8, 3), -1),
    ((4, 5, 3), -1),
    ((2, 4, 4, 3), -1),
    ((2, 3, 3, 3, 2), -1),
    ((4, 3, 5, 5), 1),
    ((4, 3, 5), (1, 2)),
]


def _feature_shape(shape, axis):
    return tuple(shape[a] for a in reference._axes(axis, len(shape)))


def _inputs(shape, axis, seed=0, mean=1.0, std=2.0):
    rng = np.random.default_rng(seed)
    features = _feature_shape(shape, axis)
    x = rng.normal(mean, std, shape).astype(np.float32)
    scale = rng.normal(1.0, 0.3, features).astype(np.float32)
    bias = rng.normal(0.0, 0.5, features).astype(np.float32)
    state = normjax.BatchNormState(
        mean=jnp.asarray(rng.normal(0.0, 1.0, features), jnp.float32),
        var=jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32),
    )
    return x, scale, bias, state


def _ema(old, batch, momentum):
    return momentum * np.asarray(old, np.float64) + (1 - momentum) * batch


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


def test_empty_batch_leaves_state_exactly_unchanged():
    x, scale, bias, state = _inputs((6, 4), -1, seed=9)
    none = jnp.zeros((6, 4), bool)
    y, new_state = batch_norm(jnp.asarray(x), state, scale, bias, training=True, mask=none)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(new_state.mean, state.mean)
    np.testing.assert_array_equal(new_state.var, state.var)
    # The same holds per feature: a feature with no valid element keeps its statistics; the others update.
    mask = np.ones((6, 4), bool)
    mask[:, 2] = False
    _, new_state = batch_norm(
        jnp.asarray(x), state, training=True, momentum=0.9, unbiased_running_var=True, mask=jnp.asarray(mask)
    )
    assert new_state.mean[2] == state.mean[2] and new_state.var[2] == state.var[2]
    _, mean, var, _ = reference.batch_norm_train(x)
    keep = np.array([0, 1, 3])
    new_state = jax.tree.map(np.asarray, new_state)
    np.testing.assert_allclose(new_state.mean[keep], _ema(state.mean, mean, 0.9)[keep], **F32)
    np.testing.assert_allclose(new_state.var[keep], _ema(state.var, var * 6 / 5, 0.9)[keep], **F32)


def test_nonfinite_batch_does_not_poison_the_state():
    x, _, _, state = _inputs((6, 3), -1, seed=10)
    x[2, 1] = np.nan
    _, new_state = batch_norm(jnp.asarray(x), state, training=True)
    assert new_state.mean[1] == state.mean[1] and new_state.var[1] == state.var[1]
    assert np.all(new_state.mean[::2] != state.mean[::2]), "the finite features still update"
    _, poisoned = batch_norm(jnp.asarray(x), state, training=True, skip_nonfinite=False)
    assert np.isnan(poisoned.mean[1])


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


# Batch Renormalization (Ioffe, 2017).


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


# Transformations.


def test_jit_matches_eager():
    x, scale, bias, state = _inputs((4, 3, 3, 2), -1, seed=17)
    mask = jnp.asarray(np.random.default_rng(18).random(x.shape) < 0.8)
    f = lambda x, s, m: normjax.batch_norm(x, s, scale, bias, training=True, mask=m)  # noqa: E731
    eager, jitted = f(jnp.asarray(x), state, mask), jax.jit(f)(jnp.asarray(x), state, mask)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


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
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(a[k], b, rtol=1e-5, atol=1e-5)


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
