"""layer_norm, rms_norm, group_norm and instance_norm against the float64 reference, and their equivalences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import normjax

F32 = reference.tolerance(np.float32)


# One jitted program per shape compiles ~3x faster than the eager primitive-by-primitive path.
layer_norm = jax.jit(normjax.layer_norm, static_argnames=("reduction_axes", "feature_axes"))
rms_norm = jax.jit(normjax.rms_norm, static_argnames=("reduction_axes", "feature_axes"))
group_norm = jax.jit(normjax.group_norm, static_argnames=("feature_axes", "num_groups", "group_size"))
instance_norm = jax.jit(normjax.instance_norm, static_argnames="feature_axes")


def _param_shape(name, shape, axis):
    """The affine parameters' shape: the normalized axes for layer/rms norm, the channel axis otherwise."""
    return tuple(shape[a] for a in reference._axes(axis, len(shape)))


# name -> (normjax function, reference function, extra keywords, takes a bias)
NORMS = {
    "layer_norm": (layer_norm, reference.layer_norm, {}, True),
    "rms_norm": (rms_norm, reference.rms_norm, {}, False),
    "group_norm": (group_norm, reference.group_norm, {"num_groups": 2}, True),
    "instance_norm": (instance_norm, reference.instance_norm, {}, True),
}

# name -> the keyword of the axes a layout names: the normalized axes, or the channel axis
AXES_KEYWORD = {
    "layer_norm": "reduction_axes",
    "rms_norm": "reduction_axes",
    "group_norm": "feature_axes",
    "instance_norm": "feature_axes",
}

# name -> [(shape, axis)] over ranks and layouts (channels last and first).
LAYOUTS = {
    "layer_norm": [((4, 6), -1), ((2, 3, 6), -1), ((2, 3, 6), (1, 2)), ((2, 3, 4, 4), (1, 2, 3)), ((2, 6, 5), 1)],
    "rms_norm": [((4, 6), -1), ((2, 3, 6), -1), ((2, 3, 6), (1, 2)), ((2, 3, 4, 4), (1, 2, 3)), ((2, 6, 5), 1)],
    "group_norm": [((4, 6), -1), ((2, 5, 6), -1), ((2, 3, 3, 4), -1), ((2, 2, 3, 3, 4), -1), ((2, 4, 3, 3), 1)],
    "instance_norm": [((2, 5, 3), -1), ((2, 3, 3, 4), -1), ((2, 2, 3, 3, 4), -1), ((2, 4, 3, 3), 1)],
}
CASES = [(name, shape, axis) for name, layouts in LAYOUTS.items() for shape, axis in layouts]


def _call(name, x, shape, axis, *, dtype=np.float32, mask=None, seed=0):
    """Runs norm `name` on x with random affine parameters; returns (normjax output, float64 reference)."""
    fn, ref, kwargs, has_bias = NORMS[name]
    rng = np.random.default_rng(seed)
    params = [rng.normal(1.0, 0.3, _param_shape(name, shape, axis)).astype(np.float32)]
    if has_bias:
        params.append(rng.normal(0.0, 0.5, params[0].shape).astype(np.float32))
    epsilon = 1e-5
    as_jnp = None if mask is None else jnp.asarray(mask)
    kwargs = {AXES_KEYWORD[name]: axis, **kwargs}
    got = fn(jnp.asarray(x, dtype), *params, epsilon=epsilon, mask=as_jnp, **kwargs)
    want = ref(np.asarray(jnp.asarray(x, dtype), np.float64), *params, epsilon=epsilon, mask=mask, **kwargs)
    return got, want


@pytest.mark.parametrize(("name", "shape", "axis"), CASES)
def test_matches_reference(name, shape, axis):
    x = np.random.default_rng(1).normal(1.0, 2.0, shape)
    got, want = _call(name, x, shape, axis)
    assert got.shape == shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, **F32)


@pytest.mark.parametrize(("name", "shape", "axis"), CASES)
def test_masked_elements_do_not_matter(name, shape, axis):
    rng = np.random.default_rng(2)
    mask = rng.random(shape) < 0.7
    mask.reshape(shape[0], -1)[:, :2] = True  # every reduction keeps at least one valid element
    x = np.where(mask, rng.normal(1.0, 2.0, shape), np.nan)
    got, want = _call(name, x, shape, axis, mask=mask)
    np.testing.assert_allclose(np.asarray(got)[mask], want[mask], **F32)


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_keeps_dtype(name, dtype):
    shape, axis = LAYOUTS[name][2]
    x = np.random.default_rng(3).normal(1.0, 2.0, shape)
    got, want = _call(name, x, shape, axis, dtype=dtype)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **reference.tolerance(dtype))


@pytest.mark.parametrize("name", NORMS)
def test_float64_with_x64(name):
    shape, axis = LAYOUTS[name][-1]
    with jax.enable_x64(True):
        x = np.random.default_rng(4).normal(1.0, 2.0, shape)
        got, want = _call(name, x, shape, axis, dtype=np.float64)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, **reference.tolerance(np.float64))


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_large_offset(name, offset):
    shape, axis = LAYOUTS[name][2]
    x = np.random.default_rng(5).normal(offset, 1.0, shape).astype(np.float32)
    got, want = _call(name, x, shape, axis)
    # The reference sees the same float32 inputs, so what remains is the float32 mean: summing values of size
    # `offset` rounds each partial sum to ~2^-24 of its size, leaving the mean a few ulps of `offset` off
    # (ulp(1e4) = 9.8e-4, ulp(1e3) = 6.1e-5). The tolerance, 1e-6 * offset, is 8-16 ulps of the offset in units of
    # the unit standard deviation; a one-pass variance would be off by ~offset^2 * 2^-24 = 6 at 1e4, i.e. useless.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * offset)


# Equivalences.


@pytest.mark.parametrize(("shape", "axis"), [((2, 3, 3, 4), -1), ((2, 4, 3, 3), 1), ((3, 6), -1)])
def test_group_norm_with_one_group_is_layer_norm_over_channels_and_space(shape, axis):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(1.0, 2.0, shape), jnp.float32)
    scale, bias = (jnp.asarray(rng.normal(size=shape[axis]), jnp.float32) for _ in range(2))
    grouped = group_norm(x, scale, bias, num_groups=1, feature_axes=axis)
    layered = layer_norm(x, scale, bias, reduction_axes=tuple(range(1, len(shape))), feature_axes=axis)
    np.testing.assert_allclose(grouped, layered, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("shape", "axis"), [((2, 3, 3, 4), -1), ((2, 4, 3, 3), 1), ((2, 5, 4), -1)])
def test_group_norm_with_one_channel_per_group_is_instance_norm(shape, axis):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(1.0, 2.0, shape), jnp.float32)
    scale, bias = (jnp.asarray(rng.normal(size=shape[axis]), jnp.float32) for _ in range(2))
    channels = shape[axis]
    by_size = group_norm(x, scale, bias, group_size=1, feature_axes=axis)
    by_count = group_norm(x, scale, bias, num_groups=channels, feature_axes=axis)
    np.testing.assert_array_equal(by_size, by_count)
    np.testing.assert_allclose(by_size, instance_norm(x, scale, bias, feature_axes=axis), rtol=1e-5, atol=1e-5)


def test_group_size_and_num_groups_agree():
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 3, 12)), jnp.float32)
    for groups in (3, 4):  # 1 and 12 groups are compared in the equivalence tests above
        np.testing.assert_array_equal(group_norm(x, num_groups=groups), group_norm(x, group_size=12 // groups))


def test_layer_norm_without_centering_is_rms_norm_of_centered_input():
    x = jnp.asarray(np.random.default_rng(9).normal(3.0, 2.0, (4, 8)), jnp.float32)
    centered = x - jnp.mean(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(layer_norm(x), rms_norm(centered), rtol=1e-5, atol=1e-5)


# Transformations.


@pytest.mark.parametrize("name", NORMS)
def test_vmap_over_examples_matches_batch(name):
    shape, axis = LAYOUTS[name][2]
    fn, _, kwargs, has_bias = NORMS[name]
    x = jnp.asarray(np.random.default_rng(10).normal(size=shape), jnp.float32)
    if name in ("group_norm", "instance_norm"):  # these take the batch on axis 0; vmap a batch of batches
        xs = jnp.stack([x, 2 * x + 1])
        per_batch = jax.vmap(functools.partial(fn, feature_axes=axis, **kwargs))(xs)
        want = jnp.stack([fn(xi, feature_axes=axis, **kwargs) for xi in xs])
    else:  # layer/rms norm are per example: vmapping over the batch axis gives the batched result
        per_batch = jax.vmap(functools.partial(fn, reduction_axes=tuple(a - 1 for a in axis)))(x)
        want = fn(x, reduction_axes=axis)
    np.testing.assert_allclose(per_batch, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: normjax.group_norm(jnp.ones((2, 6)), num_groups=4), r"does not divide the 6 channels"),
        (lambda: normjax.group_norm(jnp.ones((2, 6))), "exactly one of `num_groups` and `group_size`"),
        (lambda: normjax.group_norm(jnp.ones((2, 6)), num_groups=2, group_size=3), "exactly one of"),
        (lambda: normjax.group_norm(jnp.ones((2, 6)), num_groups=2, feature_axes=0), "batch axis"),
        (lambda: normjax.instance_norm(jnp.ones((2, 6, 3)), feature_axes=0), "batch axis"),
        (lambda: normjax.layer_norm(jnp.ones((2, 6)), jnp.ones(5)), r"`scale` must have shape \(6,\)"),
    ],
)
def test_bad_input_raises_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
