"""Property-based tests (hypothesis) of every norm over random shapes, axes, groups, dtypes and masks.

- Every output matches the float64 reference in ``tests/reference.py`` to the input dtype's tolerance.
- Invariances: shifting and positively scaling the input by constants per normalized slice leaves the output
  unchanged up to epsilon effects (only scaling for RMSNorm).
- Without an affine transform, outputs have mean 0 and variance 1 over each normalized slice.

The ``normjax-ci`` profile keeps the examples few so the suite stays fast; run more with
``HYPOTHESIS_PROFILE=normjax-thorough pytest tests/test_properties.py``.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normjax as nj

settings.register_profile(
    "normjax-ci", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("normjax-thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "normjax-ci"))

REAL_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
# Tiny compared with the unit-scale variances drawn below, so the invariances hold to float32 accuracy.
TINY_EPSILON = 1e-10


@st.composite
def shapes(draw, min_rank=1, max_rank=3):
    rank = draw(st.integers(min_rank, max_rank))
    return tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))


@st.composite
def axes_of(draw, ndim, min_size=1):
    """A random set of axes of a rank-`ndim` array, as given by a user: negative or not, int or tuple."""
    chosen = draw(st.lists(st.integers(0, ndim - 1), min_size=min_size, max_size=ndim, unique=True))
    signed = tuple(a - ndim if draw(st.booleans()) else a for a in chosen)
    return signed[0] if len(signed) == 1 and draw(st.booleans()) else signed


def random_input(seed, shape, dtype, offset=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(offset, 1.0, shape)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        x = x + 1j * rng.normal(0.0, 1.0, shape)
    return jnp.asarray(x, dtype)


def random_mask(seed, shape, kind):
    """None, a full-shape mask, or one that broadcasts (size 1 along the last axis)."""
    if kind == "none":
        return None
    mask_shape = shape if kind == "full" else shape[:-1] + (1,)
    return jnp.asarray(np.random.default_rng(seed + 1).random(mask_shape) < 0.7)


def poison(x, mask):
    """Fills masked-out positions with NaN: a correct implementation never looks at them."""
    return x if mask is None else jnp.where(mask, x, jnp.nan)


def affine(seed, shape, use):
    if not use:
        return None, None
    rng = np.random.default_rng(seed + 2)
    return jnp.asarray(rng.normal(1.0, 0.5, shape), jnp.float32), jnp.asarray(rng.normal(0.0, 1.0, shape), jnp.float32)


def exact(x):
    """``x`` in float64 (complex128), exactly: low-precision inputs are compared on the values they hold."""
    x = np.asarray(x.astype(jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32))
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def assert_matches(y, want, dtype, mask=None):
    assert y.dtype == dtype
    got, want = np.asarray(y.astype(jnp.complex64 if jnp.iscomplexobj(y) else jnp.float32)), np.asarray(want)
    if mask is not None:  # masked positions hold NaN input: only the valid ones are defined
        valid = np.broadcast_to(mask, got.shape)
        got, want = got[valid], want[valid]
    np.testing.assert_allclose(got, want, **reference.tolerance(dtype))


common = dict(
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(REAL_DTYPES),
    mask_kind=st.sampled_from(["none", "full", "broadcast"]),
    use_affine=st.booleans(),
)


@given(data=st.data(), shape=shapes(), **common)
def test_layer_norm_matches_reference(data, shape, seed, dtype, mask_kind, use_affine):
    dtype = data.draw(st.sampled_from([*REAL_DTYPES, jnp.complex64]))
    axis = data.draw(axes_of(len(shape)))
    feature_shape = tuple(shape[a] for a in sorted(a % len(shape) for a in np.atleast_1d(axis)))
    scale, bias = affine(seed, feature_shape, use_affine)
    mask = random_mask(seed, shape, mask_kind)
    x = random_input(seed, shape, dtype)
    y = jax.jit(functools.partial(nj.layer_norm, reduction_axes=axis))(poison(x, mask), scale, bias, mask=mask)
    assert_matches(y, reference.layer_norm(exact(x), scale, bias, reduction_axes=axis, mask=mask), dtype, mask)


@given(data=st.data(), shape=shapes(), **common)
def test_rms_norm_matches_reference(data, shape, seed, dtype, mask_kind, use_affine):
    axis = data.draw(axes_of(len(shape)))
    feature_shape = tuple(shape[a] for a in sorted(a % len(shape) for a in np.atleast_1d(axis)))
    scale, _ = affine(seed, feature_shape, use_affine)
    mask = random_mask(seed, shape, mask_kind)
    x = random_input(seed, shape, dtype)
    y = jax.jit(functools.partial(nj.rms_norm, reduction_axes=axis))(poison(x, mask), scale, mask=mask)
    assert_matches(y, reference.rms_norm(exact(x), scale, reduction_axes=axis, mask=mask), dtype, mask)


@given(data=st.data(), shape=shapes(min_rank=2), **common)
def test_batch_norm_output_and_state_match_reference(data, shape, seed, dtype, mask_kind, use_affine):
    axis = data.draw(axes_of(len(shape)))
    feature_axes = sorted(a % len(shape) for a in np.atleast_1d(axis))
    feature_shape = tuple(shape[a] for a in feature_axes)
    scale, bias = affine(seed, feature_shape, use_affine)
    mask = random_mask(seed, shape, mask_kind)
    x = random_input(seed, shape, dtype, offset=5.0)
    state = nj.init_batch_norm_state(feature_shape)
    train = functools.partial(nj.batch_norm, training=True, momentum=0.9, axis=axis, allow_single_value=True)
    y, new = jax.jit(train)(poison(x, mask), state, scale, bias, mask=mask)
    want, mean, var, count = reference.batch_norm_train(exact(x), scale, bias, axis=axis, mask=mask)
    assert_matches(y, want, dtype, mask)
    # Features without a valid element keep the old state; the others take one EMA step.
    np.testing.assert_allclose(new.mean, np.where(count > 0, 0.1 * mean, 0.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.var, np.where(count > 0, 0.9 + 0.1 * var, 1.0), rtol=1e-5, atol=1e-5)
    assert new.mean.dtype == new.var.dtype == jnp.float32
    y_eval, same = jax.jit(functools.partial(nj.batch_norm, training=False, axis=axis))(x, new, scale, bias)
    want_eval = reference.batch_norm_eval(exact(x), new.mean, new.var, scale, bias, axis=axis)
    assert_matches(y_eval, want_eval, dtype)
    np.testing.assert_array_equal(same.mean, new.mean)


@given(
    data=st.data(),
    spatial=st.lists(st.integers(1, 3), max_size=1),
    batch=st.integers(1, 3),
    num_groups=st.integers(1, 3),
    group_size=st.integers(1, 3),
    **common,
)
def test_group_norm_matches_reference(data, spatial, batch, num_groups, group_size, seed, dtype, mask_kind, use_affine):
    channels = num_groups * group_size
    channel_axis = data.draw(st.integers(1, len(spatial) + 1))
    shape = (batch, *spatial[: channel_axis - 1], channels, *spatial[channel_axis - 1 :])
    axis = channel_axis - len(shape) if data.draw(st.booleans()) else channel_axis
    scale, bias = affine(seed, (channels,), use_affine)
    mask = random_mask(seed, shape, mask_kind)
    x = random_input(seed, shape, dtype)
    by = {"num_groups": num_groups} if data.draw(st.booleans()) else {"group_size": group_size}
    if group_size * math.prod(spatial) == 1:  # one value per group: refused, as in PyTorch
        with pytest.raises(ValueError, match="single value"):
            nj.group_norm(x, feature_axes=axis, **by)
        return
    y = jax.jit(functools.partial(nj.group_norm, feature_axes=axis, **by))(poison(x, mask), scale, bias, mask=mask)
    want = reference.group_norm(exact(x), scale, bias, num_groups=num_groups, feature_axes=axis, mask=mask)
    assert_matches(y, want, dtype, mask)


@given(data=st.data(), shape=shapes(min_rank=2), **common)
def test_instance_norm_matches_reference(data, shape, seed, dtype, mask_kind, use_affine):
    axis = data.draw(st.integers(1, len(shape) - 1))
    scale, bias = affine(seed, (shape[axis],), use_affine)
    mask = random_mask(seed, shape, mask_kind)
    x = random_input(seed, shape, dtype)
    if math.prod(shape[1:]) == shape[axis]:  # one value per instance and channel: refused, as in PyTorch
        with pytest.raises(ValueError, match="single value"):
            nj.instance_norm(x, feature_axes=axis)
        return
    y = jax.jit(functools.partial(nj.instance_norm, feature_axes=axis))(poison(x, mask), scale, bias, mask=mask)
    assert_matches(y, reference.instance_norm(exact(x), scale, bias, feature_axes=axis, mask=mask), dtype, mask)


# Invariances and output moments. Each norm is described by the axes its statistics are constant over, so one
# jitted function runs all of them; a few fixed shapes keep compilations few while hypothesis varies the values.
INVARIANCE_SHAPES = [(2, 2, 2, 3), (3, 1, 3, 2)]  # (N, G, S, L)


def _grouped_norm(x):
    """group_norm on (N, G * S, L) with G groups on axis 1, viewed as (N, G, S, L)."""
    n, g, s, length = x.shape
    y = nj.group_norm(jnp.reshape(x, (n, g * s, length)), num_groups=g, feature_axes=1, epsilon=TINY_EPSILON)
    return jnp.reshape(y, x.shape)


# (name, function, the axes each statistic is computed over for an (N, G, S, L) input, centered)
NORM_CASES = [
    ("layer_norm", lambda x: nj.layer_norm(x, reduction_axes=(-2, -1), epsilon=TINY_EPSILON), (2, 3), True),
    ("rms_norm", lambda x: nj.rms_norm(x, reduction_axes=-1, epsilon=TINY_EPSILON), (3,), False),
    (
        "batch_norm",
        lambda x: nj.batch_norm(x, nj.init_batch_norm_state(x.shape[-1]), training=True, epsilon=TINY_EPSILON)[0],
        (0, 1, 2),
        True,
    ),
    ("instance_norm", lambda x: nj.instance_norm(x, epsilon=TINY_EPSILON), (1, 2), True),
    ("group_norm", _grouped_norm, (2, 3), True),
]


@jax.jit
def all_norms(inputs):
    """Each norm of NORM_CASES applied to its own input."""
    return [fn(x) for (_, fn, _, _), x in zip(NORM_CASES, inputs, strict=True)]


@given(shape=st.sampled_from(INVARIANCE_SHAPES), seed=st.integers(0, 2**16))
def test_shift_and_positive_scale_per_slice_leave_outputs_unchanged(shape, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(0.0, 1.0, shape), jnp.float32)
    transformed = []
    for _, _, reduced, centered in NORM_CASES:
        # One shift and one positive scale per statistic: constant along the reduced axes.
        slice_shape = tuple(1 if a in reduced else n for a, n in enumerate(shape))
        scale = rng.uniform(0.25, 4.0, slice_shape)
        shift = rng.normal(0.0, 3.0, slice_shape) if centered else 0.0
        transformed.append(jnp.asarray(np.asarray(x) * scale + shift, jnp.float32))
    for (name, *_), y, y_transformed in zip(NORM_CASES, all_norms([x] * 5), all_norms(transformed), strict=True):
        np.testing.assert_allclose(y_transformed, y, rtol=1e-4, atol=1e-4, err_msg=name)


@given(shape=st.sampled_from(INVARIANCE_SHAPES), seed=st.integers(0, 2**16))
def test_outputs_have_zero_mean_and_unit_variance_per_slice(shape, seed):
    x = random_input(seed, shape, jnp.float32)
    for (name, _, reduced, centered), y in zip(NORM_CASES, all_norms([x] * 5), strict=True):
        mean, var, _ = reference.moments(np.asarray(y), reduced, centered=centered)
        if centered:
            np.testing.assert_allclose(mean, 0.0, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(var, 1.0, rtol=1e-4, err_msg=name)  # the mean square for RMSNorm


@jax.jit
def _masked_batch_norm(x, mask):
    state = nj.init_batch_norm_state(x.shape[1])
    return nj.batch_norm(x, state, training=True, mask=mask, epsilon=TINY_EPSILON)[0]


@given(seed=st.integers(0, 2**16))
def test_masked_outputs_have_zero_mean_and_unit_variance_over_valid_elements(seed):
    shape = (6, 3)
    x = random_input(seed, shape, jnp.float32)
    mask = random_mask(seed, shape, "full").at[:2].set(True)  # at least two valid values per feature
    y = _masked_batch_norm(poison(x, mask), mask)
    mean, var, _ = reference.moments(np.where(mask, np.asarray(y), 0.0), 0, mask=mask)
    np.testing.assert_allclose(mean, 0.0, atol=1e-5)
    np.testing.assert_allclose(var, 1.0, rtol=1e-4)
