"""BatchNorm's running state is never corrupted: empty and all-masked batches, single values, non-finite batches,
low-precision activations and 100k EMA steps. (Its checkpoint round-trips are in test_checkpoints.py.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
import scipy.signal
from bitwise import assert_bit_exact, bits

import normjax as nj

C = 4
# A state that is not the initial one, so "unchanged" cannot pass by accident.
STATE = nj.BatchNormState(mean=jnp.array([0.5, -1.25, 3.0, 1e-3]), var=jnp.array([2.0, 0.75, 1e-4, 9.0]))


def data(shape, seed=0, offset=3.0):
    return jnp.asarray(np.random.default_rng(seed).normal(offset, 2.0, shape), jnp.float32)


train = jax.jit(nj.batch_norm, static_argnames=("training", "unbiased_running_var", "skip_nonfinite", "momentum"))


@pytest.mark.parametrize("unbiased", [False, True])
def test_empty_batch_keeps_state_bit_exact(unbiased):
    x = jnp.zeros((0, C))
    y, state = train(x, STATE, training=True, momentum=0.9, unbiased_running_var=unbiased)
    assert y.shape == (0, C)
    assert_bit_exact(state, STATE)


def test_empty_batch_keeps_state_under_vmap_and_grad():
    state = nj.BatchNormState(jnp.arange(float(C)), jnp.full(C, 2.0))

    def loss(x):
        y, new = nj.batch_norm(x, state, training=True)
        return jnp.sum(y), new

    (_, new), grad = jax.value_and_grad(loss, has_aux=True)(jnp.zeros((0, C)))
    assert_bit_exact(new, state)
    assert grad.shape == (0, C)
    stacked = jax.vmap(lambda x: nj.batch_norm(x, state, training=True)[1])(jnp.zeros((3, 0, C)))
    assert_bit_exact(jax.tree.map(lambda a: a[2], stacked), state)


def test_all_masked_batch_of_finite_values_gives_finite_outputs_and_keeps_state():
    x = data((6, C), seed=9)
    y, state = train(x, STATE, training=True, momentum=0.9, mask=jnp.zeros((6, C), bool))
    assert np.all(np.isfinite(y))
    assert_bit_exact(state, STATE)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_all_masked_batch_keeps_state_bit_exact_whatever_the_masked_values(unbiased, skip_nonfinite):
    # Masked-out positions hold NaN, inf and huge values: none of it may reach the state.
    x = jnp.array([[jnp.nan, jnp.inf, -jnp.inf, 1e38]] * 3)
    y, state = train(
        x, STATE, training=True, momentum=0.9, mask=jnp.zeros((3, 1), bool),
        unbiased_running_var=unbiased, skip_nonfinite=skip_nonfinite,
    )  # fmt: skip
    assert_bit_exact(state, STATE)


@pytest.mark.parametrize("unbiased", [False, True])
def test_feature_without_valid_elements_keeps_its_state_others_update(unbiased):
    x = data((5, C))
    mask = jnp.array([[True, False, True, True]] * 5)
    _, state = train(x, STATE, training=True, momentum=0.9, mask=mask, unbiased_running_var=unbiased)
    _, mean, var, _ = reference.batch_norm_train(np.asarray(x))
    var = var * 5 / 4 if unbiased else var  # Bessel's correction over the 5 valid values
    updated = np.array([0, 2, 3])
    np.testing.assert_allclose(state.mean[updated], 0.9 * STATE.mean[updated] + 0.1 * mean[updated], rtol=1e-6)
    np.testing.assert_allclose(state.var[updated], 0.9 * STATE.var[updated] + 0.1 * var[updated], rtol=1e-5)
    assert bits(state.mean[1]) == bits(STATE.mean[1]) and bits(state.var[1]) == bits(STATE.var[1])


def test_ghost_batch_norm_all_masked_keeps_state():
    x = jnp.full((4, C), jnp.nan)
    ghost = jax.jit(lambda x, m: nj.batch_norm(x, STATE, training=True, virtual_batch_size=2, mask=m))
    _, state = ghost(x, jnp.zeros((4, 1), bool))
    assert_bit_exact(state, STATE)


@functools.partial(jax.pmap, axis_name="d")
def _sync_step(x, mask):
    """One training step synchronized over all devices: (state, state with unbiased_running_var)."""
    step = lambda unbiased: nj.batch_norm(  # noqa: E731
        x, STATE, training=True, momentum=0.9, mask=mask, axis_name="d", unbiased_running_var=unbiased
    )[1]
    return step(False), step(True)


def _pmapped_train(x, mask):
    return _sync_step(x, mask)[0]


def test_across_devices_all_masked_keeps_state_on_every_device():
    devices = jax.local_device_count()
    x = jnp.full((devices, 3, C), jnp.nan)
    state = _pmapped_train(x, jnp.zeros((devices, 3, 1), bool))
    for d in range(devices):
        assert_bit_exact(jax.tree.map(lambda a, d=d: a[d], state), STATE)


def test_across_devices_one_masked_device_contributes_nothing():
    devices = jax.local_device_count()
    x = data((devices, 3, C)).at[0].set(jnp.nan)  # device 0 holds garbage and is fully masked
    mask = jnp.ones((devices, 3, 1), bool).at[0].set(False)
    state = _pmapped_train(x, mask)
    _, mean, var, _ = reference.batch_norm_train(np.asarray(x[1:]).reshape(-1, C))
    for d in range(devices):
        np.testing.assert_allclose(state.mean[d], 0.9 * STATE.mean + 0.1 * mean, rtol=1e-6)
        np.testing.assert_allclose(state.var[d], 0.9 * STATE.var + 0.1 * var, rtol=1e-5)
    # Every device holds the same state, bit for bit: replicas never diverge.
    assert (bits(state.mean) == bits(state.mean[:1])).all() and (bits(state.var) == bits(state.var[:1])).all()


def test_unbiased_running_var_with_a_single_valid_element_never_divides_by_zero():
    x = data((6, C))
    mask = jnp.zeros((6, C), bool).at[2].set(True)  # exactly one valid element per feature
    _, state = train(x, STATE, training=True, momentum=0.9, mask=mask, unbiased_running_var=True)
    # n = 1: the batch variance is 0 and Bessel's n/(n-1) is left out instead of producing 0/0.
    np.testing.assert_allclose(state.var, 0.9 * STATE.var, rtol=1e-6)
    np.testing.assert_allclose(state.mean, 0.9 * STATE.mean + 0.1 * x[2], rtol=1e-6)
    # Across devices: one valid element in total, on the last device.
    devices = jax.local_device_count()
    xs = data((devices, 3, C), seed=1)
    masks = jnp.zeros((devices, 3, 1), bool).at[-1, 0].set(True)
    _, state = _sync_step(xs, masks)
    assert np.isfinite(state.var).all()
    np.testing.assert_allclose(state.var, np.broadcast_to(0.9 * STATE.var, (devices, C)), rtol=1e-6)


NONFINITE = data((6, C)).at[1, 0].set(jnp.nan).at[3, 1].set(jnp.inf).at[:, 2].set(jnp.array([1e30, -1e30] * 3))


def test_nonfinite_batch_statistics_are_skipped_by_default():
    # Feature 0 holds a NaN, feature 1 an inf, feature 2 finite values whose variance overflows float32 (1e60).
    y, state = train(NONFINITE, STATE, training=True, momentum=0.9)
    for feature in (0, 1, 2):
        assert bits(state.mean[feature]) == bits(STATE.mean[feature])
        assert bits(state.var[feature]) == bits(STATE.var[feature])
    _, mean, var, _ = reference.batch_norm_train(np.asarray(NONFINITE[:, 3:]))
    np.testing.assert_allclose(state.mean[3], 0.9 * STATE.mean[3] + 0.1 * mean[0], rtol=1e-6)
    np.testing.assert_allclose(state.var[3], 0.9 * STATE.var[3] + 0.1 * var[0], rtol=1e-5)
    # The output is not repaired: the batch itself is non-finite, so its normalized features are too.
    assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 3]).all()


def test_one_nonfinite_value_keeps_only_its_feature():
    x = data((6, C), seed=10).at[2, 1].set(jnp.nan)
    _, state = train(x, STATE, training=True, momentum=0.9)
    assert bits(state.mean[1]) == bits(STATE.mean[1]) and bits(state.var[1]) == bits(STATE.var[1])
    others = np.array([0, 2, 3])
    assert np.all(state.mean[others] != STATE.mean[others]), "the finite features still update"
    _, poisoned = train(x, STATE, training=True, momentum=0.9, skip_nonfinite=False)
    assert np.isnan(poisoned.mean[1])


def test_nonfinite_batch_statistics_propagate_when_not_skipped():
    _, state = train(NONFINITE, STATE, training=True, momentum=0.9, skip_nonfinite=False)
    assert np.isnan(state.mean[0]) and np.isnan(state.var[0])
    assert np.isinf(state.mean[1]) and np.isnan(state.var[1])  # mean of +inf is inf; inf - inf is NaN
    assert np.isinf(state.var[2])  # the overflowed variance enters the state
    assert np.isfinite(state.mean[3]) and np.isfinite(state.var[3])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_state_stays_float32_for_low_precision_activations(dtype):
    x = data((8, 2, C)).astype(dtype)
    state = nj.init_batch_norm_state(C)
    step = jax.jit(lambda s, x: nj.batch_norm(x, s, training=True, momentum=0.5))
    for _ in range(3):
        y, state = step(state, x)
    assert y.dtype == dtype
    assert state.mean.dtype == jnp.float32 and state.var.dtype == jnp.float32
    _, mean, var, _ = reference.batch_norm_train(np.asarray(x.astype(jnp.float32)))
    # After three steps with momentum 0.5 the state is 1/8 initial + 7/8 batch; float32-accurate, not bf16.
    np.testing.assert_allclose(state.mean, 7 / 8 * mean, rtol=1e-5)
    np.testing.assert_allclose(state.var, 1 / 8 + 7 / 8 * var, rtol=1e-5)
    _, eval_state = nj.batch_norm(x, state, training=False)
    assert eval_state is state


def test_100k_ema_updates_stay_within_float32_rounding_of_the_float64_ema():
    steps, momentum = 100_000, 0.999
    rng = np.random.default_rng(0)
    # Slowly drifting bfloat16 activations: the EMA tracks a moving target, as in training.
    drift = np.linspace(0.0, 4.0, steps)[:, None, None]
    xs = jnp.asarray(rng.normal(3.0, 2.0, (steps, 8, C)) + drift, jnp.bfloat16)

    @jax.jit
    def run(xs):
        def step(state, x):
            return nj.batch_norm(x, state, training=True, momentum=momentum)[1], None

        return jax.lax.scan(step, nj.init_batch_norm_state(C), xs)[0]

    state = run(xs)
    x64 = np.asarray(xs.astype(jnp.float32), np.float64)  # bfloat16 values are exact in float64
    batch_mean, batch_var = x64.mean(1), x64.var(1)

    def ema(batch, initial):
        b, a = [1.0 - momentum], [1.0, -momentum]
        return scipy.signal.lfilter(b, a, batch, axis=0, zi=np.full((1, C), momentum * initial))[0][-1]

    # Each step rounds a handful of times (momentum and 1 - momentum to float32, two products, a sum, the batch
    # statistics), each by at most u = 2**-24 relative to max|b|; the EMA damps past errors by `momentum` per
    # step, so the total error is at most (about 5 u) / (1 - momentum) * max|b|, i.e. about 3e-4 relative.
    u = np.finfo(np.float32).eps / 2
    for got, batch, initial in ((state.mean, batch_mean, 0.0), (state.var, batch_var, 1.0)):
        want = ema(batch, initial)
        bound = 5 * u / (1 - momentum) * np.abs(batch).max()
        error = np.abs(np.asarray(got, np.float64) - want)
        assert got.dtype == jnp.float32
        assert (error <= bound).all(), (error, bound)


@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_a_variance_that_overflows_gives_nan_outputs_not_zeros(magnitude):
    # The squared deviations overflow float32: the output must not silently become 0 (it is NaN, and the running
    # state is kept as for any non-finite batch).
    x = jnp.asarray([[1.0], [-1.0], [3.0]], jnp.float32) * magnitude
    state = nj.init_batch_norm_state(1)
    y, new_state = nj.batch_norm(x, state, training=True)
    assert np.all(np.isnan(y))
    np.testing.assert_array_equal(new_state.mean, state.mean)
    np.testing.assert_array_equal(new_state.var, state.var)
    assert np.all(np.isnan(nj.layer_norm(x.T)))


@pytest.mark.parametrize("magnitude", [1e20, 1e30])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_mean_square_that_overflows_gives_nan_outputs_not_zeros(magnitude, dtype):
    # rms_norm of finite values whose mean square overflows float32 (Flax and PyTorch return 0 there); the
    # other rows are exact.
    x = jnp.asarray([[1.0, -1.0, 3.0], [1.0, 2.0, 2.0]], jnp.float32) * jnp.asarray([[magnitude], [1.0]])
    for fn in (nj.rms_norm, jax.jit(nj.rms_norm)):
        y = fn(x.astype(dtype))
        assert np.all(np.isnan(np.asarray(y[0], np.float32)))
        np.testing.assert_allclose(
            np.asarray(y[1], np.float32),
            [1 / np.sqrt(3), 2 / np.sqrt(3), 2 / np.sqrt(3)],
            rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6,
        )
    from normjax import linen

    assert np.all(np.isnan(np.asarray(linen.RMSNorm().apply({"params": {"scale": jnp.ones(3)}}, x)[0])))
