"""normjax.moments against the float64 reference: axes, ranks, masks, dtypes, complex inputs, large offsets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import normjax

# One jitted program per shape compiles ~3x faster than the eager primitive-by-primitive path (which
# test_jit_and_vmap and the error tests still exercise).
moments = jax.jit(normjax.moments, static_argnames=("reduction_axes", "keepdims", "centered"))
SHAPES_AND_AXES = [
    ((7,), 0),
    ((6, 5), 0),
    ((6, 5), -1),
    ((6, 5), (0, 1)),
    ((3, 4, 5), (0, 2)),
    ((3, 4, 5), (-3, -1)),
    ((2, 3, 4, 5), (0, 1, 2)),
    ((2, 3, 4, 5), (1, 3)),
]


def _random_mask(rng, shape):
    mask = rng.random(shape) < 0.7
    mask.flat[0] = True  # at least one valid element in most reductions; all-masked is tested on its own
    return mask


def _assert_moments_close(got, want, **tol):
    mean, var, count = want
    np.testing.assert_allclose(np.asarray(got.mean), mean, **tol)
    np.testing.assert_allclose(np.asarray(got.var), var, **tol)
    np.testing.assert_array_equal(np.asarray(got.count), count)


@pytest.mark.parametrize(
    ("shape", "axes", "keepdims"), [(shape, axes, i % 2 == 0) for i, (shape, axes) in enumerate(SHAPES_AND_AXES)]
)
def test_matches_reference(shape, axes, keepdims):
    x = np.random.default_rng(0).normal(1.5, 2.0, shape).astype(np.float32)
    got = moments(jnp.asarray(x), axes, keepdims=keepdims)
    mean, var, count = reference.moments(x, axes)
    if not keepdims:
        axes_ = reference._axes(axes, x.ndim)
        mean, var, count = (np.squeeze(np.broadcast_to(a, mean.shape), axes_) for a in (mean, var, count))
    assert got.mean.shape == got.var.shape == got.count.shape == mean.shape
    _assert_moments_close(got, (mean, var, count), **reference.tolerance(np.float32))


@pytest.mark.parametrize(("shape", "axes"), SHAPES_AND_AXES)
@pytest.mark.parametrize("fill", [np.nan, 1e6])
def test_masked_elements_contribute_nothing(shape, axes, fill):
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 1.0, shape).astype(np.float32)
    mask = _random_mask(rng, shape)
    want = reference.moments(x, axes, mask)
    x[~mask] = fill
    got = moments(jnp.asarray(x), axes, mask=jnp.asarray(mask), keepdims=True)
    assert np.all(np.isfinite(got.mean)) and np.all(np.isfinite(got.var))
    _assert_moments_close(got, want, **reference.tolerance(np.float32))


def test_mask_broadcasts_and_counts_valid_elements():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    per_row = np.array([True, False, True, True, False, True])[:, None]  # shape (6, 1): a per-example mask
    got = moments(jnp.asarray(x), 0, mask=jnp.asarray(per_row))
    np.testing.assert_array_equal(got.count, [4.0, 4.0, 4.0])
    np.testing.assert_allclose(got.mean, x[per_row[:, 0]].mean(0), rtol=1e-6)
    np.testing.assert_allclose(got.var, x[per_row[:, 0]].var(0), rtol=1e-5)


def test_count_semantics():
    x = jnp.ones((4, 3, 2))
    m = moments(x, (0, 2))
    # Without a mask, the count is the number of reduced elements, broadcast to the statistics' shape.
    np.testing.assert_array_equal(m.count, np.full((3,), 8.0))
    assert m.count.dtype == jnp.float32
    # An empty reduction (allowed: axis_name may do the reducing) counts one element with zero variance.
    m = moments(x, ())
    np.testing.assert_array_equal(m.count, np.ones((4, 3, 2)))
    np.testing.assert_array_equal(m.var, np.zeros((4, 3, 2)))
    # An all-masked reduction counts zero and gives finite (zero) statistics, whatever the input holds.
    x = jnp.full((4, 3), jnp.nan)
    mask = jnp.zeros((4, 3), bool).at[:, 0].set(True)
    m = moments(x.at[:, 0].set(2.0), 0, mask=mask)
    np.testing.assert_array_equal(m.count, [4.0, 0.0, 0.0])
    np.testing.assert_array_equal(m.mean, [2.0, 0.0, 0.0])
    np.testing.assert_array_equal(m.var, [0.0, 0.0, 0.0])


@pytest.mark.parametrize("masked", [False, True])
def test_uncentered_is_mean_square(masked):
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 1.0, (5, 6)).astype(np.float32)
    mask = _random_mask(rng, x.shape) if masked else None
    got = moments(jnp.asarray(x), 1, mask=None if mask is None else jnp.asarray(mask), centered=False)
    _, mean_square, count = reference.moments(x, 1, mask, centered=False)
    np.testing.assert_array_equal(got.mean, np.zeros(5))
    np.testing.assert_allclose(got.var, mean_square[:, 0], **reference.tolerance(np.float32))
    np.testing.assert_array_equal(got.count, count[:, 0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_give_float32_statistics(dtype):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(3.0, 2.0, (64, 4)), dtype)
    m = moments(x, 0)
    assert m.mean.dtype == m.var.dtype == m.count.dtype == jnp.float32
    # The reference sees the same (rounded) input values, so float32 accumulation gives float32 accuracy even
    # for 16-bit inputs; a reduction in the input's dtype would be off by ~1e-2 (bf16) or ~1e-3 (f16).
    mean, var, _ = reference.moments(np.asarray(x, np.float64), 0)
    np.testing.assert_allclose(m.mean, mean[0], **reference.tolerance(np.float32))
    np.testing.assert_allclose(m.var, var[0], **reference.tolerance(np.float32))


def test_float64_with_x64():
    with jax.enable_x64(True):
        x = np.random.default_rng(5).normal(1.0, 3.0, (8, 5))
        m = moments(jnp.asarray(x, jnp.float64), (0, 1))
        assert m.mean.dtype == m.var.dtype == jnp.float64
        mean, var, _ = reference.moments(x, (0, 1))
        np.testing.assert_allclose(m.mean, mean.item(), **reference.tolerance(np.float64))
        np.testing.assert_allclose(m.var, var.item(), **reference.tolerance(np.float64))
    assert jnp.asarray(1.0).dtype == jnp.float32, "x64 leaked out of its context"


@pytest.mark.parametrize("masked", [False, True])
def test_complex_input_variance_of_modulus(masked):
    rng = np.random.default_rng(6)
    x = (rng.normal(1.0, 1.0, (6, 4)) + 1j * rng.normal(-2.0, 0.5, (6, 4))).astype(np.complex64)
    mask = _random_mask(rng, x.shape) if masked else None
    got = moments(jnp.asarray(x), 0, mask=None if mask is None else jnp.asarray(mask))
    assert got.mean.dtype == jnp.complex64
    assert got.var.dtype == jnp.float32, "the variance of a complex input is E|x - mean|^2, a real number"
    _assert_moments_close(got, [a[0] for a in reference.moments(x, 0, mask)], **reference.tolerance(np.float32))


def test_large_offset_is_stable_where_the_one_pass_formula_is_not():
    # Mean 1e4, standard deviation 1, in float32 (the acceptance case).
    x = jnp.asarray(np.random.default_rng(7).normal(1e4, 1.0, (4096,)), jnp.float32)
    true_var = reference.moments(np.asarray(x, np.float64), 0)[1].item()
    stable = moments(x, 0).var
    naive = jnp.mean(x * x) - jnp.mean(x) ** 2  # E[x^2] - E[x]^2: cancels catastrophically (E[x^2] ~ 1e8)
    assert abs(float(stable) / true_var - 1) < 0.01
    assert abs(float(naive) / true_var - 1) > 0.1, f"naive variance {float(naive)} unexpectedly accurate"


def test_jit_and_vmap():
    x = jnp.asarray(np.random.default_rng(8).normal(size=(3, 5, 4)), jnp.float32)
    mask = jnp.asarray(np.random.default_rng(9).random((3, 5, 4)) < 0.6)
    eager = normjax.moments(x, 1, mask=mask)
    jitted = jax.jit(lambda x, m: normjax.moments(x, 1, mask=m))(x, mask)
    mapped = jax.vmap(lambda x, m: normjax.moments(x, 0, mask=m))(x, mask)
    for got in (jitted, mapped):
        for a, b in zip(got, eager, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: normjax.moments(jnp.ones((2, 3), jnp.int32), 0), TypeError, "floating-point"),
        (lambda: normjax.moments(jnp.ones((2, 3)), 2), ValueError, "out of range"),
        (lambda: normjax.moments(jnp.ones((2, 3)), (0, -2)), ValueError, "repeats an axis"),
        (lambda: normjax.moments(jnp.ones((2, 3)), 0, mask=jnp.ones((2, 3))), TypeError, "boolean"),
        (lambda: normjax.moments(jnp.ones((2, 3)), 0, mask=jnp.ones((2,), bool)), ValueError, "broadcast"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("position", [0, 517], ids=["outlier_is_the_shift", "outlier_elsewhere"])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_one_extreme_outlier_keeps_the_variance_to_one_percent(position, offset):
    # One sample 1e4 standard deviations from the rest: the worst case of the shifted sums is when the sampled
    # shift (the first element) is that outlier; the error bound is then about n * eps.
    rng = np.random.default_rng(3)
    x = offset + rng.normal(size=(1024, 4))
    x[position] += 1e4
    got = normjax.moments(jnp.asarray(x, jnp.float32), reduction_axes=0)
    want = np.var(x.astype(np.float32).astype(np.float64), axis=0)
    np.testing.assert_allclose(got.var, want, rtol=1e-2)
    masked = normjax.moments(jnp.asarray(x, jnp.float32), reduction_axes=0, mask=x < 1e9)
    np.testing.assert_allclose(masked.var, want, rtol=1e-2)
