"""The core (``normjax/_src/standardize.py``): its closed-form derivative against JAX's autodiff of the same
forward, its two layouts against each other, and float64 NumPy.

Every norm runs twice: as shipped (the ``custom_jvp``) and with the core's rule replaced, in the test only, by
the plain forward that JAX differentiates itself (:func:`_autodiff`). Outputs, reverse-mode gradients with an
upstream gradient, forward-mode tangents, ``check_grads`` (orders 1 and 2, both modes), masks holding NaN,
``vmap`` and ``pmap`` with synchronized statistics, bfloat16 and complex inputs are compared.
"""

import contextlib
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jax.test_util import check_grads

import normjax
from normjax._src import layout as layout_lib
from normjax._src import standardize as core
from normjax._src.spec import NormSpec

C = 8
F32 = dict(rtol=2e-5, atol=2e-5)


def _norms():
    """name -> (fn(x, scale, bias, mask), float64 reference(x, scale, bias, mask), input shape)."""
    state = normjax.init_batch_norm_state(C)

    def bn(x, s, b, m):
        return normjax.batch_norm(x, state, s, b, training=True, mask=m)[0]

    return {
        "batch_norm": (bn, lambda x, s, b, m: reference.batch_norm_train(x, s, b, mask=m)[0], (6, 3, C)),
        "layer_norm": (
            lambda x, s, b, m: normjax.layer_norm(x, s, b, mask=m),
            lambda x, s, b, m: reference.layer_norm(x, s, b, mask=m),
            (4, 5, C),
        ),
        "rms_norm": (
            lambda x, s, b, m: normjax.rms_norm(x, s, mask=m),
            lambda x, s, b, m: reference.rms_norm(x, s, mask=m),
            (4, 5, C),
        ),
        "group_norm": (
            lambda x, s, b, m: normjax.group_norm(x, s, b, num_groups=4, mask=m),
            lambda x, s, b, m: reference.group_norm(x, s, b, num_groups=4, mask=m),
            (3, 4, C),
        ),
        "instance_norm": (
            lambda x, s, b, m: normjax.instance_norm(x, s, b, mask=m),
            lambda x, s, b, m: reference.instance_norm(x, s, b, mask=m),
            (3, 5, C),
        ),
    }


NAMES = sorted(_norms())


def _inputs(shape, seed=0, offset=0.0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = (offset + rng.normal(size=shape) * rng.uniform(0.5, 2.0, size=shape[-1])).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, size=C).astype(np.float32)
    bias = rng.normal(size=C).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    mask = rng.uniform(size=shape) > 0.3
    return jnp.asarray(x, dtype), jnp.asarray(scale), jnp.asarray(bias), jnp.asarray(g, dtype), jnp.asarray(mask)


@contextlib.contextmanager
def _autodiff_rule():
    """Within this context (at trace time) the core's custom rule is replaced by JAX's autodiff of its forward."""
    with mock.patch.object(core, "_standardize", lambda spec, *operands: core._forward(spec, *operands)[:4]):
        yield


def _autodiff(fn):
    @functools.wraps(fn)
    def wrapped(*args):
        with _autodiff_rule():
            return fn(*args)

    return wrapped


def _value_and_vjp(fn, x, s, b, g):
    y, pull = jax.vjp(fn, x, s, b)
    return (y,) + pull(g)


def test_the_closed_form_rule_is_taken_and_the_test_substitution_removes_it():
    fn, _, shape = _norms()["layer_norm"]
    x, s, b, _, _ = _inputs(shape)
    fast = str(jax.make_jaxpr(lambda x: fn(x, s, b, None))(x))
    plain = str(jax.make_jaxpr(_autodiff(lambda x: fn(x, s, b, None)))(x))
    assert "custom_jvp_call" in fast
    assert "custom_jvp_call" not in plain


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("name", NAMES)
def test_rule_matches_autodiff_values_and_gradients(name, masked):
    fn, ref64, shape = _norms()[name]
    x, s, b, g, mask = _inputs(shape, seed=NAMES.index(name), offset=3.0)
    m = mask if masked else None
    f = jax.jit(lambda x, s, b: fn(x, s, b, m))
    fast = _value_and_vjp(f, x, s, b, g)
    plain = _value_and_vjp(_autodiff(lambda x, s, b: fn(x, s, b, m)), x, s, b, g)
    for got, want in zip(fast, plain, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fast[0], ref64(x, s, b, None if m is None else np.asarray(m)), **F32)


@pytest.mark.parametrize("name", NAMES)
def test_forward_mode_matches_autodiff(name):
    fn, _, shape = _norms()[name]
    x, s, b, g, mask = _inputs(shape, seed=3)
    tangents = (g, jnp.ones(C) * 0.3, jnp.arange(C, dtype=jnp.float32) / C)
    f = lambda x, s, b: fn(x, s, b, mask)  # noqa: E731
    fast = jax.jvp(f, (x, s, b), tangents)
    plain = jax.jvp(_autodiff(f), (x, s, b), tangents)
    for got, want in zip(fast, plain, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# Order 2 on one norm per branch of the rule (folded coefficients: batch_norm; per-row and per-feature: layer_norm);
# order 1 on the others keeps the suite's time budget (second order through x64 compiles is the slow part).
@pytest.mark.parametrize(
    "name, order", [("batch_norm", 2), ("layer_norm", 2), ("group_norm", 1), ("instance_norm", 1), ("rms_norm", 1)]
)
def test_check_grads(name, order):
    fn, _, shape = _norms()[name]
    with jax.enable_x64(True):
        x, s, b, _, mask = (jnp.asarray(a, jnp.float64) if a.dtype != bool else a for a in _inputs(shape, seed=5))
        check_grads(lambda x, s, b: fn(x, s, b, mask), (x, s, b), order=order, modes=("fwd", "rev"), eps=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_masked_out_values_do_not_reach_valid_gradients(name):
    # Whatever masked-out positions hold (0, 1e3, NaN, inf), the loss over valid positions has the same value and
    # gradients there, equal to JAX's autodiff of the forward with zero padding.
    fn, _, shape = _norms()[name]
    x, s, b, g, mask = _inputs(shape, seed=7)

    def valid_grads(fill, path=lambda f: f):
        def loss(x, s, b):
            return jnp.sum(jnp.where(mask, fn(x, s, b, mask) * g, 0.0))

        value, grads = jax.value_and_grad(path(loss), argnums=(0, 1, 2))(jnp.where(mask, x, fill), s, b)
        return (value, np.where(mask, grads[0], 0.0)) + grads[1:]

    want = valid_grads(0.0, _autodiff)
    for fill in (0.0, 1e3, np.nan, np.inf):
        got = valid_grads(fill)
        for got_part, want_part in zip(got, want, strict=True):
            assert np.all(np.isfinite(got_part)), fill
            np.testing.assert_allclose(got_part, want_part, rtol=1e-4, atol=1e-4)


def _synchronized(x, s, b, mask):
    y, new_state = normjax.batch_norm(
        x, normjax.init_batch_norm_state(C), s, b, training=True, mask=mask, axis_name="d"
    )
    return y, new_state.mean


def _sync_case(devices, seed=11):
    x, s, b, g, mask = _inputs((devices, 3, C), seed=seed, offset=5.0)
    mask = mask.at[1].set(False)  # a device without a valid row: uneven counts across devices
    return x, s, b, g, mask


def test_vmap_axis_name_gradients_match_autodiff():
    x, s, b, g, mask = _sync_case(4)

    def loss(x, s, b):
        y, _ = jax.vmap(_synchronized, in_axes=(0, None, None, 0), axis_name="d")(x, s, b, mask)
        return jnp.sum(y * g)

    fast = jax.grad(loss, argnums=(0, 1, 2))(x, s, b)
    plain = jax.grad(_autodiff(loss), argnums=(0, 1, 2))(x, s, b)
    for got, want in zip(fast, plain, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_pmap_gradient_sums_are_synchronized():
    # The backward of synchronized statistics needs the psum of the gradient sums; a per-device backward is
    # wrong, so compare with the gradient of the same loss computed on the concatenated global batch.
    devices = jax.device_count()
    x, s, b, g, mask = _sync_case(devices)

    def device_loss(x, s, b, g, mask):
        y, mean = _synchronized(x, s, b, mask)
        return jnp.sum(y * g) + jnp.sum(mean)

    def grads(x, s, b, g, mask):
        dx, ds, db = jax.grad(device_loss, argnums=(0, 1, 2))(x, s, b, g, mask)
        return dx, jax.lax.psum(ds, "d"), jax.lax.psum(db, "d")

    fast = jax.pmap(grads, axis_name="d", in_axes=(0, None, None, 0, 0))(x, s, b, g, mask)

    def global_loss(x, s, b):
        flat = lambda a: a.reshape(-1, C)  # noqa: E731
        state = normjax.init_batch_norm_state(C)
        with _autodiff_rule():
            y, new_state = normjax.batch_norm(flat(x), state, s, b, training=True, mask=flat(mask))
        return jnp.sum(y * flat(g)) + devices * jnp.sum(new_state.mean)

    want = jax.grad(global_loss, argnums=(0, 1, 2))(x, s, b)
    np.testing.assert_allclose(fast[0], want[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fast[1][0], want[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fast[2][0], want[2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_matches_autodiff(name):
    fn, _, shape = _norms()[name]
    x, s, b, g, mask = _inputs(shape, seed=13, dtype=jnp.bfloat16)
    f = lambda x, s, b: fn(x, s, b, mask)  # noqa: E731
    fast = _value_and_vjp(f, x, s, b, g)
    plain = _value_and_vjp(_autodiff(f), x, s, b, g)
    assert fast[0].dtype == jnp.bfloat16 and fast[1].dtype == jnp.bfloat16
    for got, want in zip(fast, plain, strict=True):
        np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=2e-2, atol=2e-2)


def test_large_offset_stays_accurate():
    fn, ref64, shape = _norms()["layer_norm"]
    x, s, b, _, _ = _inputs(shape, seed=17, offset=1e4)
    np.testing.assert_allclose(fn(x, s, b, None), ref64(x, s, b, None), rtol=1e-3, atol=1e-3)


def test_complex_input_takes_the_autodiff():
    rng = np.random.default_rng(19)
    z = jnp.asarray(rng.normal(size=(4, C)) + 1j * rng.normal(size=(4, C)), jnp.complex64)
    assert "custom_jvp_call" not in str(jax.make_jaxpr(normjax.layer_norm)(z))
    np.testing.assert_allclose(normjax.layer_norm(z), reference.layer_norm(np.asarray(z)), rtol=1e-5, atol=1e-5)


_LAYOUT_CASES = {
    # name: (shape, reduction_axes, feature_axes, centered)
    "batch_norm": ((6, 3, 4, C), (0, 1, 2), (3,), True),
    "batch_norm NC": ((4096, C), (0,), (1,), True),  # the GPU layout sums it in two stages
    "layer_norm": ((4, 5, C), (2,), (2,), True),
    "rms_norm": ((4, 5, C), (2,), (2,), False),
    "group_norm": ((3, 4, 2, C // 2), (1, 3), (2, 3), True),
    "instance_norm": ((3, 5, C), (1,), (2,), True),
}


@pytest.mark.parametrize("offset", [0.5, 100.0], ids=["sums-about-zero", "sums-about-the-sample"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("layout", ["xla_cpu", "xla_tpu", "xla_gpu"])
@pytest.mark.parametrize("name", sorted(_LAYOUT_CASES))
def test_every_layout_computes_the_generic_values_and_gradients(name, layout, masked, offset):
    """A layout only changes how XLA sees the work: values and gradients equal the generic layout's. The generic
    and TPU layouts subtract the mean exactly, as two floats; XLA:CPU's output subtracts it rounded to one float:
    they differ by that rounding, a few eps * offset."""
    shape, reduction_axes, feature_axes, centered = _LAYOUT_CASES[name]
    rng = np.random.default_rng(23)
    x = jnp.asarray(offset + rng.normal(size=shape), jnp.float32)
    feature_shape = tuple(shape[a] for a in feature_axes)
    s = jnp.asarray(rng.uniform(0.5, 1.5, feature_shape), jnp.float32)
    b = jnp.asarray(rng.normal(size=feature_shape), jnp.float32)
    g = jnp.asarray(rng.normal(size=shape), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=shape) > 0.3) if masked else None
    epsilon = jnp.asarray(1e-5, jnp.float32)

    def run(layout):
        spec = NormSpec(reduction_axes, feature_axes, centered, None, None, jnp.dtype(jnp.float32), layout)
        f = jax.jit(lambda x, s, b: core._standardize(spec, x, s, b, mask, epsilon, None))
        (y, mean, var, _), pull = jax.vjp(f, x, s, b)
        return (y, mean, var) + pull((g, jnp.zeros_like(mean), jnp.zeros_like(var), jnp.zeros_like(var)))

    rounding_of_the_mean = 8 * np.finfo(np.float32).eps * offset if layout == "xla_cpu" else 0.0
    # The parameters' cotangents sum 4096 rows of BatchNorm NC, which the GPU layout adds in another order.
    rtol = 1e-4 if name == "batch_norm NC" else 2e-5
    for got, want in zip(run(layout), run("generic"), strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=2e-5 + rounding_of_the_mean)


@pytest.mark.parametrize("offset", [0.0, 1.0, 1.7, 1e4])
def test_xla_cpu_statistics_are_as_accurate_as_the_shifted_sums(offset):
    """XLA:CPU sums about zero while mean^2 <= 3 var, else about the sample: within 4 eps of float64 either way."""
    rng = np.random.default_rng(29)
    x = np.float32(offset) + rng.normal(size=(512, 6)).astype(np.float32)
    x[:, 5] = np.float32(offset + 0.25)  # a constant feature: exactly zero variance
    spec = NormSpec((0,), (1,), True, None, None, jnp.dtype(jnp.float32), "xla_cpu")
    epsilon = jnp.asarray(1e-5, jnp.float32)
    _, mean, var, _ = jax.jit(lambda x: core._standardize(spec, x, None, None, None, epsilon, None))(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(var[0, :5], x64[:, :5].var(0), rtol=4 * np.finfo(np.float32).eps * np.sqrt(512))
    np.testing.assert_allclose(mean[0], x64.mean(0), rtol=1e-6, atol=1e-6)
    assert var[0, 5] == 0.0


def test_xla_cpu_statistics_under_vmap_choose_once_for_the_whole_batch():
    """Under vmap the choice between sums about zero and about the sample stays a branch (a batched predicate
    would turn it into a select that computes both), taken accurately when any member needs it."""
    rng = np.random.default_rng(31)
    x = rng.normal(size=(3, 256, 4)).astype(np.float32)
    x[1] += np.float32(1e4)  # one ill-conditioned member
    spec = NormSpec((0,), (1,), True, None, None, jnp.dtype(jnp.float32), "xla_cpu")
    epsilon = jnp.asarray(1e-5, jnp.float32)
    statistics = jax.vmap(lambda x: core._standardize(spec, x, None, None, None, epsilon, None)[1:3])

    def primitives(jaxpr):
        """The primitives of ``jaxpr`` and its sub-jaxprs, except inside a cond's branches (where a select of small
        statistics is no branch turned into a select)."""
        for eqn in jaxpr.eqns:
            yield eqn.primitive.name
            if eqn.primitive.name == "cond":
                continue
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
                        yield from primitives(getattr(sub, "jaxpr", sub))

    branches = [p for p in primitives(jax.make_jaxpr(statistics)(x).jaxpr) if p in ("cond", "select_n")]
    assert branches == ["cond"]
    mean, var = jax.jit(statistics)(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(var[:, 0], x64.var(1), rtol=4 * np.finfo(np.float32).eps * np.sqrt(256))
    np.testing.assert_allclose(mean[:, 0], x64.mean(1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "axes", "staged"),
    [
        ((4096, 1024), (0,), (0, 1, 256)),  # BatchNorm NC: 1024 statistics over 4096 rows
        ((4096, 64), (0,), (0, 1, 64)),
        ((2, 4096, 64), (1,), (1, 2, 128)),  # InstanceNorm of a long sequence
        ((8192, 1024), (0,), None),  # XLA splits the reduction itself
        ((4096, 4096), (0,), None),  # enough statistics to fuse
        ((16, 4096), (1,), None),  # a row reduction (LayerNorm)
        ((64, 56, 56, 8), (0, 1, 2), None),
    ],
)
def test_the_gpu_layout_stages_only_reductions_xla_would_not_fuse(shape, axes, staged):
    assert layout_lib._gpu_row_groups(shape, axes) == staged
