"""normjax.equinox: each layer against a float64 NumPy reference and against Equinox's own layer where Equinox is
right; a regression test for each known bug of Equinox's normalization layers; synchronized BatchNorm under every
way of mapping over devices; and the Equinox transformations (filter_jit, filter_grad, filter_vmap, lax.scan over
layers, tree_at, serialisation, inference_mode).

Equinox's layers are compared as installed here (``equinox.__version__``); a bug fixed upstream is tested on
normjax's layer only, and its test says so.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import normjax
import normjax.equinox as nqx

AXIS = "batch"
EPS = 1e-5
MOMENTUM = 0.9
C = 3
F32 = reference.tolerance(jnp.float32)
# Two float32 implementations of the same formula differ by a few roundings of order-1 values.
F32_VS_EQUINOX = {"rtol": 1e-5, "atol": 2e-6}


def _data(shape, seed=0, scale=2.0, offset=1.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return jnp.asarray((rng.normal(size=shape) * scale + offset).astype(dtype))


def _random_affine(layer, seed=1):
    """``layer`` with random ``weight`` and ``bias`` (where it has them), so the affine is really tested."""
    rng = np.random.default_rng(seed)
    for name in ("weight", "bias"):
        value = getattr(layer, name)
        if value is not None:
            new = jnp.asarray(rng.normal(size=value.shape).astype(np.float32) + (name == "weight"))
            layer = eqx.tree_at(lambda m, name=name: getattr(m, name), layer, new)
    return layer


def _with_parameters_of(equinox_layer, layer):
    """Equinox's layer holding the same ``weight`` and ``bias`` as normjax's."""
    where = lambda m: (m.weight, m.bias)  # noqa: E731
    return eqx.tree_at(where, equinox_layer, where(layer), is_leaf=lambda v: v is None)


def _np(a):
    return None if a is None else np.asarray(a, np.float64)


def _batched(layer, state, x, mask=None, **call_kwargs):
    """The per-example layer mapped over the batch (axis 0) as Equinox users write it."""

    def per_example(x, mask, state):
        return layer(x, state, mask=mask, **call_kwargs) if mask is not None else layer(x, state, **call_kwargs)

    return jax.vmap(per_example, axis_name=AXIS, in_axes=(0, 0, None), out_axes=(0, None))(x, mask, state)


def _make_bn(**kwargs):
    return eqx.nn.make_with_state(nqx.BatchNorm)(C, AXIS, momentum=MOMENTUM, eps=EPS, **kwargs)


def _make_equinox_bn(mode="batch", **kwargs):
    return eqx.nn.make_with_state(eqx.nn.BatchNorm)(C, AXIS, momentum=MOMENTUM, eps=EPS, mode=mode, **kwargs)


def _ema(old, new):
    return MOMENTUM * np.asarray(old, np.float64) + (1 - MOMENTUM) * new


# ----------------------------------------------------------------------------------------------------------------
# The per-example norms against float64 and against Equinox
# ----------------------------------------------------------------------------------------------------------------

# name -> (normjax layer, Equinox's equivalent, batch shape, float64 reference of the batch)
PER_EXAMPLE = {
    "LayerNorm": (
        lambda: nqx.LayerNorm((4, 6)),
        lambda: eqx.nn.LayerNorm((4, 6)),
        (5, 4, 6),
        lambda x, w, b: reference.layer_norm(x, w, b, reduction_axes=(1, 2), epsilon=EPS),
    ),
    "LayerNorm-no-affine": (
        lambda: nqx.LayerNorm(6, use_weight=False, use_bias=False),
        lambda: eqx.nn.LayerNorm(6, use_weight=False, use_bias=False),
        (5, 6),
        lambda x, w, b: reference.layer_norm(x, reduction_axes=1, epsilon=EPS),
    ),
    "RMSNorm": (
        lambda: nqx.RMSNorm((4, 6)),
        lambda: eqx.nn.RMSNorm((4, 6)),
        (5, 4, 6),
        lambda x, w, b: reference.rms_norm(x, w, reduction_axes=(1, 2), epsilon=EPS) + b,
    ),
    "RMSNorm-weight-only": (
        lambda: nqx.RMSNorm(6, use_bias=False),
        lambda: eqx.nn.RMSNorm(6, use_bias=False),
        (5, 6),
        lambda x, w, b: reference.rms_norm(x, w, reduction_axes=1, epsilon=EPS),
    ),
    "GroupNorm": (
        lambda: nqx.GroupNorm(3, 6),
        lambda: eqx.nn.GroupNorm(3, 6),
        (5, 6, 4, 2),
        lambda x, w, b: reference.group_norm(x, w, b, num_groups=3, feature_axes=1, epsilon=EPS),
    ),
    "GroupNorm-no-spatial": (
        lambda: nqx.GroupNorm(2, 6),
        lambda: eqx.nn.GroupNorm(2, 6),
        (5, 6),
        lambda x, w, b: reference.group_norm(x, w, b, num_groups=2, feature_axes=1, epsilon=EPS),
    ),
    "InstanceNorm": (  # Equinox has no InstanceNorm; its GroupNorm with one channel per group is one
        lambda: nqx.InstanceNorm(6),
        lambda: eqx.nn.GroupNorm(6, 6),
        (5, 6, 7),
        lambda x, w, b: reference.instance_norm(x, w, b, feature_axes=1, epsilon=EPS),
    ),
}


@pytest.mark.parametrize("name", list(PER_EXAMPLE))
def test_per_example_norm_matches_float64_and_equinox(name):
    make, make_equinox, shape, want = PER_EXAMPLE[name]
    layer = _random_affine(make())
    x = _data(shape, offset=3.0)
    y = jax.vmap(layer)(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y, want(np.asarray(x, np.float64), _np(layer.weight), _np(layer.bias)), **F32)
    ours_as_equinox = _with_parameters_of(make_equinox(), layer)
    np.testing.assert_allclose(y, jax.vmap(ours_as_equinox)(x), **F32_VS_EQUINOX)


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"])
def test_per_example_norm_passes_a_state_through_like_equinox(name):
    layer = PER_EXAMPLE[name][0]()
    _, state = _make_bn()
    x = _data(PER_EXAMPLE[name][2][1:])
    y, same_state = layer(x, state)
    assert same_state is state
    np.testing.assert_array_equal(y, layer(x))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"])
def test_per_example_norm_half_precision_input(name, dtype):
    """Statistics in float32, one rounding to the input dtype; the same as Equinox since it upcasts too."""
    make, make_equinox, shape, want = PER_EXAMPLE[name]
    layer = _random_affine(make())
    x = _data(shape, offset=3.0).astype(dtype)
    y = jax.vmap(layer)(x)
    assert y.dtype == dtype
    tol = reference.tolerance(dtype)
    expected = want(np.asarray(x, np.float64), _np(layer.weight), _np(layer.bias))
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=tol["rtol"], atol=4 * tol["atol"])
    ours_as_equinox = _with_parameters_of(make_equinox(), layer)
    y_equinox = np.asarray(jax.vmap(ours_as_equinox)(x), np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), y_equinox, rtol=tol["rtol"], atol=4 * tol["atol"])


def test_constructors_take_equinox_arguments_and_dtypes():
    assert nqx.LayerNorm(4, dtype=jnp.bfloat16).weight.dtype == jnp.bfloat16
    assert nqx.LayerNorm(4, elementwise_affine=False).weight is None
    assert nqx.RMSNorm([2, 3]).shape == (2, 3)
    assert nqx.GroupNorm(2, channelwise_affine=False).weight is None
    assert nqx.BatchNorm(4, ["devices", "batch"]).axis_name == ("devices", "batch")  # static, so hashable
    bn = nqx.BatchNorm(4, "b", dtype=jnp.float16)
    assert bn.weight.dtype == jnp.float16
    # running statistics are never narrower than float32, whatever the parameters' dtype
    assert bn.state_index.init.mean.dtype == jnp.float32 and bn.state_index.init.var.dtype == jnp.float32


@pytest.mark.parametrize(
    "make, x, match",
    [
        (lambda: nqx.LayerNorm(4), jnp.ones((2, 4)), r"LayerNorm .* shape=\(4,\), got \(2, 4\).*jax.vmap"),
        (lambda: nqx.RMSNorm(4), jnp.ones(3), r"RMSNorm .* got \(3,\)"),
        (lambda: nqx.GroupNorm(2, 4), jnp.ones((3, 5)), r"GroupNorm .*\(4, \*spatial\).* got \(3, 5\)"),
        (lambda: nqx.InstanceNorm(4), jnp.ones(4), r"InstanceNorm .*at least one spatial axis.* got \(4,\)"),
    ],
)
def test_wrong_input_shape_errors_say_what_was_expected(make, x, match):
    with pytest.raises(ValueError, match=match):
        make()(x)


def test_group_norm_constructor_errors():
    with pytest.raises(ValueError, match=r"groups=4 and channels=6.*divisors of 6"):
        nqx.GroupNorm(4, 6)
    with pytest.raises(ValueError, match=r"needs `channels`.*channelwise_affine=False"):
        nqx.GroupNorm(2)


# ----------------------------------------------------------------------------------------------------------------
# BatchNorm against float64 and against Equinox's mode="batch"
# ----------------------------------------------------------------------------------------------------------------


def test_batch_norm_training_matches_float64_and_equinox_batch_mode():
    bn, state = _make_bn()
    bn = _random_affine(bn)
    equinox_bn, equinox_state = _make_equinox_bn()
    equinox_bn = _with_parameters_of(equinox_bn, bn)
    want_mean, want_var = np.zeros(C), np.ones(C)
    for step in range(3):
        x = _data((6, C, 5), seed=step, offset=step)
        y, state = _batched(bn, state, x)
        want_y, mean, var, _ = reference.batch_norm_train(x, _np(bn.weight), _np(bn.bias), axis=1, epsilon=EPS)
        want_mean, want_var = _ema(want_mean, mean), _ema(want_var, var)
        running = state.get(bn.state_index)
        np.testing.assert_allclose(y, want_y, **F32)
        np.testing.assert_allclose(running.mean, want_mean, **F32)
        np.testing.assert_allclose(running.var, want_var, **F32)
        # Equinox's mode="batch" computes the same outputs and stores the same (not yet debiased) averages.
        y_equinox, equinox_state = _batched(equinox_bn, equinox_state, x)
        np.testing.assert_allclose(y, y_equinox, **F32_VS_EQUINOX)
        hidden_mean, hidden_var = equinox_state.get(equinox_bn.batch_state_index)
        np.testing.assert_allclose(running.mean, hidden_mean, **F32_VS_EQUINOX)
        np.testing.assert_allclose(running.var, hidden_var, **F32_VS_EQUINOX)


def test_batch_norm_inference_uses_running_statistics_and_keeps_the_state():
    bn, state = _make_bn()
    bn = _random_affine(bn)
    _, state = _batched(bn, state, _data((6, C, 5)))
    running = state.get(bn.state_index)
    x = _data((4, C, 5), seed=7)
    want = reference.batch_norm_eval(x, running.mean, running.var, _np(bn.weight), _np(bn.bias), axis=1, epsilon=EPS)
    for y, new_state in (
        _batched(eqx.nn.inference_mode(bn), state, x),
        _batched(bn, state, x, inference=True),  # the call's flag overrides the field
    ):
        np.testing.assert_allclose(y, want, **F32)
        np.testing.assert_array_equal(new_state.get(bn.state_index).var, running.var)
    assert eqx.nn.inference_mode(bn).inference is True
    y_train, _ = _batched(eqx.nn.inference_mode(bn), state, x, inference=False)
    np.testing.assert_allclose(y_train, reference.batch_norm_train(x, bn.weight, bn.bias, axis=1)[0], **F32)


def test_batch_norm_with_large_offset_keeps_its_variance():
    bn, state = _make_bn(channelwise_affine=False)
    x = _data((16, C, 4), scale=1.0, offset=1e4)
    y, state = _batched(bn, state, x)
    want_y, _, var, _ = reference.batch_norm_train(x, axis=1, epsilon=EPS)
    np.testing.assert_allclose(y, want_y, rtol=0, atol=2e-3)  # float32 holds 1e4 to ~5e-4
    np.testing.assert_allclose(state.get(bn.state_index).var, _ema(1.0, var), rtol=2e-5)


def test_batch_norm_errors():
    with pytest.raises(ValueError, match=r"mode='ema'.*running statistics while training.*mode='batch'"):
        nqx.BatchNorm(C, AXIS, mode="ema")
    bn, state = _make_bn()
    with pytest.raises(ValueError, match=r"\(3, \*spatial\).*got \(8, 3\).*jax.vmap"):
        bn(jnp.ones((8, C)), state)  # a whole batch passed to the per-example layer


def test_batch_norm_in_sequential_threads_the_state():
    key = jax.random.key(0)
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [eqx.nn.Linear(4, C, key=key), nqx.BatchNorm(C, AXIS, momentum=MOMENTUM), eqx.nn.Lambda(jax.nn.relu)]
    )
    x = _data((8, 4))
    y, state = _batched(model, state, x)
    h = jax.vmap(model.layers[0])(x)
    np.testing.assert_allclose(y, np.maximum(reference.batch_norm_train(h, axis=1, epsilon=EPS)[0], 0), **F32)
    assert not np.allclose(state.get(model.layers[1].state_index).mean, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Known bugs of Equinox's normalization layers: Equinox's layer fails (where it still does), normjax's is right
# ----------------------------------------------------------------------------------------------------------------


def test_equinox_659_ema_mode_normalizes_training_batches_with_running_statistics():
    """equinox#659: the default mode="ema" normalizes with running statistics while training (unstable training,
    which led to mode="batch"). normjax's BatchNorm uses the batch's statistics in every training step and
    refuses mode="ema"."""
    first, second = _data((8, C), seed=0), _data((8, C), seed=1, offset=5.0)
    equinox_bn, equinox_state = _make_equinox_bn(mode="ema")
    _, equinox_state = _batched(equinox_bn, equinox_state, first)
    y_equinox, _ = _batched(equinox_bn, equinox_state, second)
    assert np.max(np.abs(np.mean(np.asarray(y_equinox), axis=0))) > 1.0  # not centred: running statistics used

    bn, state = _make_bn(channelwise_affine=False)
    _, state = _batched(bn, state, first)
    y, _ = _batched(bn, state, second)
    np.testing.assert_allclose(y, reference.batch_norm_train(second, epsilon=EPS)[0], **F32)


def test_equinox_955_running_variance_starts_at_one():
    """equinox#955: mode="ema" starts the running variance at 0, so inference before any training step divides
    by sqrt(eps) (x316 with eps=1e-5). normjax's starts at mean 0, variance 1, as Flax and PyTorch do."""
    x = _data((8, C))
    equinox_bn, equinox_state = _make_equinox_bn(mode="ema", channelwise_affine=False)
    y_equinox, _ = _batched(equinox_bn, equinox_state, x, inference=True)
    assert np.max(np.abs(y_equinox)) > 100 * np.max(np.abs(x))

    bn, state = _make_bn(channelwise_affine=False)
    np.testing.assert_array_equal(state.get(bn.state_index).var, np.ones(C))
    y, _ = _batched(bn, state, x, inference=True)
    np.testing.assert_allclose(y, np.asarray(x, np.float64) / np.sqrt(1 + EPS), **F32)


def test_equinox_1010_inference_before_any_training_step_is_finite():
    """equinox#1010: mode="batch" divided by 1 - momentum**0 = 0 in inference before any training step (fixed
    upstream in the Equinox installed here). normjax's running statistics need no step count: inference and its
    gradient are finite from step 0."""
    bn, state = _make_bn()
    x = _data((8, C))
    y, _ = _batched(bn, state, x, inference=True)
    np.testing.assert_allclose(y, np.asarray(x, np.float64) / np.sqrt(1 + EPS), **F32)
    grads = eqx.filter_grad(lambda m: jnp.sum(_batched(m, state, x, inference=True)[0] ** 2))(bn)
    assert np.all(np.isfinite(grads.weight)) and np.all(np.isfinite(grads.bias))


def test_equinox_batch_mode_debiases_a_variance_that_starts_at_one():
    """Equinox's mode="batch" divides its running averages by 1 - momentum**t in inference (Adam's zero-debiasing),
    but its running variance starts at 1, not 0: after t steps its inference variance is the average plus
    momentum**t / (1 - momentum**t), e.g. +9 after one step with momentum 0.9 (+99 with the default 0.99), so
    early inference outputs shrink by ~3x (~10x). normjax uses the running statistics as they are (Flax's and
    PyTorch's convention)."""
    x = _data((8, C))
    equinox_bn, equinox_state = _make_equinox_bn(channelwise_affine=False)
    _, equinox_state = _batched(equinox_bn, equinox_state, x)
    y_equinox, _ = _batched(equinox_bn, equinox_state, x, inference=True)
    _, _, batch_var, _ = reference.batch_norm_train(x, epsilon=EPS)
    bias = MOMENTUM / (1 - MOMENTUM)  # 9 after one step
    want_equinox = reference.batch_norm_eval(x, np.mean(np.asarray(x, np.float64), 0), batch_var + bias, epsilon=EPS)
    np.testing.assert_allclose(y_equinox, want_equinox, rtol=1e-4, atol=1e-5)  # the variance is off by +9

    bn, state = _make_bn(channelwise_affine=False)
    _, state = _batched(bn, state, x)
    y, _ = _batched(bn, state, x, inference=True)
    running = state.get(bn.state_index)
    np.testing.assert_allclose(running.var, _ema(1.0, batch_var), **F32)
    np.testing.assert_allclose(y, reference.batch_norm_eval(x, running.mean, running.var, epsilon=EPS), **F32)


def test_equinox_707_double_vmap():
    """equinox#707: BatchNorm under two vmaps (samples x batch) failed when the running state, unmapped, would
    have to hold different statistics per sample. Both consistent layouts work: statistics over both named axes
    (one state, the statistics of all samples x batch, exactly), or per-sample statistics with one state per
    sample (an ensemble)."""
    x = _data((4, 5, C, 2))  # (samples, batch, C, L)
    bn, state = eqx.nn.make_with_state(nqx.BatchNorm)(C, ("samples", AXIS), momentum=MOMENTUM)
    inner = jax.vmap(bn, axis_name=AXIS, in_axes=(0, None), out_axes=(0, None))
    y, state = jax.vmap(inner, axis_name="samples", in_axes=(0, None), out_axes=(0, None))(x, state)
    flat = np.asarray(x, np.float64).reshape(20, C, 2)
    want_y, mean, _, _ = reference.batch_norm_train(flat, axis=1, epsilon=EPS)
    np.testing.assert_allclose(np.asarray(y).reshape(flat.shape), want_y, **F32)
    np.testing.assert_allclose(state.get(bn.state_index).mean, _ema(0.0, mean), **F32)

    bn, state = _make_bn(channelwise_affine=False)
    states = jax.tree.map(lambda a: jnp.stack([a] * 4), state)  # one state per sample
    y, states = jax.vmap(lambda x, s: _batched(bn, s, x))(x, states)
    for sample in range(4):
        want_y, mean, _, _ = reference.batch_norm_train(x[sample], axis=1, epsilon=EPS)
        np.testing.assert_allclose(y[sample], want_y, **F32)
        np.testing.assert_allclose(states.get(bn.state_index).mean[sample], _ema(0.0, mean), **F32)


def test_equinox_237_scan_inside_vmap_under_filter_grad():
    """equinox#237: BatchNorm in a lax.scan (lax.map) inside vmap(axis_name) under filter_grad failed on the
    second call (an old stateful API, fixed upstream by eqx.nn.State). normjax's threads its state through
    the scan; two calls give the same gradient, equal to that of the steps unrolled."""
    bn, state = _make_bn()
    xs = _data((3, 6, C))  # (steps, batch, C)

    def loss(bn, state, xs, unroll):
        def step(state, x):
            y, state = _batched(bn, state, x)
            return state, jnp.sum(y**2 * jnp.arange(1.0, C + 1)[None])

        if unroll:
            outs = []
            for x in xs:
                state, out = step(state, x)
                outs.append(out)
            return sum(outs)
        return jnp.sum(jax.lax.scan(step, state, xs)[1])

    grad = eqx.filter_jit(eqx.filter_grad(loss))
    first, second = grad(bn, state, xs, False), grad(bn, state, xs, False)
    unrolled = eqx.filter_grad(loss)(bn, state, xs, True)
    np.testing.assert_array_equal(first.weight, second.weight)
    np.testing.assert_allclose(first.weight, unrolled.weight, rtol=1e-5, atol=1e-5)
    assert np.any(np.asarray(first.weight) != 0)


def test_equinox_1074_axis_name_is_static():
    """equinox#1074: BatchNorm's axis_name (a string) is a pytree leaf, so jax.device_put (or a plain jax.jit)
    of a model refuses it. normjax's axis_name is static; the remaining non-array leaf, the inference flag,
    may become an array and still selects the mode (lax.cond when traced)."""
    mesh = Mesh(np.array(jax.devices()), ("d",))
    replicated = NamedSharding(mesh, P())
    equinox_bn, _ = _make_equinox_bn()
    with pytest.raises(TypeError, match="not a valid JAX type"):
        jax.device_put(equinox_bn, replicated)

    bn, state = _make_bn()
    bn = jax.device_put(bn, replicated)
    x = _data((8, C, 2))
    want_y, mean, _, _ = reference.batch_norm_train(x, axis=1, epsilon=EPS)
    for flag in (False, jnp.asarray(False)):  # a plain jax.jit traces the inference flag
        y, new_state = jax.jit(lambda m, s, x: _batched(m, s, x))(
            eqx.tree_at(lambda m: m.inference, bn, flag), state, x
        )
        np.testing.assert_allclose(y, want_y, **F32)
        np.testing.assert_allclose(new_state.get(bn.state_index).mean, _ema(0.0, mean), **F32)
    y, kept = jax.jit(lambda m, s, x: _batched(m, s, x))(
        eqx.tree_at(lambda m: m.inference, bn, jnp.asarray(True)), state, x
    )
    np.testing.assert_allclose(y, np.asarray(x, np.float64) / np.sqrt(1 + EPS), **F32)
    np.testing.assert_array_equal(kept.get(bn.state_index).mean, np.zeros(C))


def test_equinox_876_half_precision_batch_statistics():
    """equinox#876 made LayerNorm, GroupNorm and RMSNorm compute in float32; Equinox's BatchNorm still reduces
    in the input dtype, so float16 activations of magnitude ~300 overflow the variance (inf: the outputs collapse
    to the bias and the running variance becomes inf). normjax's computes in float32 and keeps float32 state."""
    x = (_data((16, C, 4)) * 150).astype(jnp.float16)
    equinox_bn, equinox_state = _make_equinox_bn(channelwise_affine=False)
    y_equinox, equinox_state = _batched(equinox_bn, equinox_state, x)
    assert np.all(np.isinf(equinox_state.get(equinox_bn.batch_state_index)[1]))
    assert np.all(np.asarray(y_equinox) == 0)

    bn, state = _make_bn(channelwise_affine=False, dtype=jnp.float16)
    y, state = _batched(bn, state, x)
    assert y.dtype == jnp.float16
    want_y, _, var, _ = reference.batch_norm_train(x, axis=1, epsilon=EPS)
    np.testing.assert_allclose(np.asarray(y, np.float64), want_y, **reference.tolerance(jnp.float16))
    running = state.get(bn.state_index)
    assert running.var.dtype == jnp.float32
    np.testing.assert_allclose(running.var, _ema(1.0, var), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Synchronized BatchNorm: the statistics of the global batch, exact for uneven per-device counts
# ----------------------------------------------------------------------------------------------------------------

DEVICES, ROWS = 8, 4
COUNTS = (4, 1, 1, 1, 3, 2, 0, 4)  # valid examples per device; padding holds NaN and must not matter
SYNC_AXES = ("devices", AXIS)


def _sync_data():
    x = np.asarray(_data((DEVICES * ROWS, C, 2), seed=3))
    valid = np.concatenate([np.arange(ROWS) < count for count in COUNTS])
    return np.where(valid[:, None, None], x, np.nan).astype(np.float32), valid


def _sync_layer(axis_name):
    bn, state = eqx.nn.make_with_state(nqx.BatchNorm)(C, axis_name, momentum=MOMENTUM)
    return _random_affine(bn), state


def _local(bn):
    """One device's step: the per-example layer mapped over the device's rows, synchronized over both axes."""
    return lambda x, mask, state: _batched(bn, state, x, mask)


def run_pmap(bn, state, x, valid):
    f = jax.pmap(_local(bn), axis_name="devices", in_axes=(0, 0, None), out_axes=(0, None))
    y, state = f(x.reshape(DEVICES, ROWS, *x.shape[1:]), valid.reshape(DEVICES, ROWS), state)
    return y.reshape(x.shape), state


def run_shard_map(bn, state, x, valid):
    # check_vma=False: JAX 0.10 cannot yet type a vmap axis's collective inside shard_map (a plain lax.psum over
    # ("devices", "batch") fails the same way); the collective itself is the same.
    mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("devices",))
    specs = dict(in_specs=(P("devices"), P("devices"), P()), out_specs=(P("devices"), P()), check_vma=False)
    return jax.jit(jax.shard_map(_local(bn), mesh=mesh, **specs))(x, valid, state)


def run_sharded_filter_jit(bn, state, x, valid):
    """No shard_map: the batch is sharded over the devices and the vmap axis spans the whole of it."""
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:DEVICES]), ("devices",)), P("devices"))
    x, valid = jax.device_put((jnp.asarray(x), jnp.asarray(valid)), sharding)
    f = eqx.filter_jit(lambda bn, state, x, valid: _batched(bn, state, x, valid))
    hlo = jax.jit(lambda x, valid: _batched(bn, state, x, valid)).lower(x, valid).compile().as_text()
    assert "all-reduce" in hlo  # computed across the 8 devices
    y, state = f(bn, state, x, valid)
    assert y.sharding.is_equivalent_to(sharding, y.ndim)
    return y, state


def run_vmap(bn, state, x, valid):
    return _batched(bn, state, x, valid)


# runner -> the axes the layer synchronizes over
SYNC_RUNNERS = {run_pmap: SYNC_AXES, run_shard_map: SYNC_AXES, run_sharded_filter_jit: AXIS, run_vmap: AXIS}


@pytest.mark.parametrize("runner", list(SYNC_RUNNERS), ids=lambda f: f.__name__)
def test_synchronized_batch_norm_equals_the_global_batch_with_uneven_counts(runner):
    bn, state = _sync_layer(SYNC_RUNNERS[runner])
    x, valid = _sync_data()
    y, state = runner(bn, state, jnp.asarray(x), jnp.asarray(valid))
    want_y, mean, var, count = reference.batch_norm_train(
        x, _np(bn.weight), _np(bn.bias), axis=1, epsilon=EPS, mask=valid[:, None, None]
    )
    assert count[0] == 2 * sum(COUNTS)
    np.testing.assert_allclose(np.asarray(y)[valid], want_y[valid], rtol=0, atol=2e-5)
    running = state.get(bn.state_index)
    np.testing.assert_allclose(running.mean, _ema(0.0, mean), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(running.var, _ema(1.0, var), rtol=2e-5)


# ----------------------------------------------------------------------------------------------------------------
# Equinox transformations
# ----------------------------------------------------------------------------------------------------------------


def test_filter_grad_matches_equinox_batch_mode():
    bn, state = _make_bn()
    bn = _random_affine(bn)
    equinox_bn, equinox_state = _make_equinox_bn()
    equinox_bn = _with_parameters_of(equinox_bn, bn)
    x, cotangent = _data((6, C, 4)), _data((6, C, 4), seed=5)

    def loss(model, state, x):
        return jnp.sum(_batched(model, state, x)[0] * cotangent)

    grads = eqx.filter_grad(loss)(bn, state, x)
    equinox_grads = eqx.filter_grad(loss)(equinox_bn, equinox_state, x)
    np.testing.assert_allclose(grads.weight, equinox_grads.weight, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads.bias, equinox_grads.bias, rtol=1e-5, atol=1e-5)
    dx = jax.grad(lambda x: loss(bn, state, x))(x)
    dx_equinox = jax.grad(lambda x: loss(equinox_bn, equinox_state, x))(x)
    np.testing.assert_allclose(dx, dx_equinox, rtol=1e-5, atol=1e-5)


def test_filter_vmap_ensemble_of_batch_norms():
    """Three BatchNorms built with eqx.filter_vmap, each with its own state and its own batch."""
    ensemble, states = eqx.nn.make_with_state(
        eqx.filter_vmap(lambda: nqx.BatchNorm(C, AXIS, momentum=MOMENTUM), axis_size=3)
    )()
    ensemble = eqx.tree_at(lambda m: m.weight, ensemble, jnp.arange(1.0, 4.0)[:, None] * jnp.ones((1, C)))
    xs = _data((3, 8, C))
    ys, states = eqx.filter_vmap(lambda bn, state, x: _batched(bn, state, x))(ensemble, states, xs)
    for member in range(3):
        want_y, mean, _, _ = reference.batch_norm_train(xs[member], epsilon=EPS)
        np.testing.assert_allclose(ys[member], (member + 1) * want_y, **F32)
        np.testing.assert_allclose(states.get(ensemble.state_index).mean[member], _ema(0.0, mean), **F32)


def test_lax_scan_over_a_stack_of_batch_norm_layers():
    """A stack of identical layers (built with filter_vmap) applied in turn by lax.scan, with their states."""

    class Stack(eqx.Module):
        layers: nqx.BatchNorm

        def __init__(self, depth):
            self.layers = eqx.filter_vmap(lambda: nqx.BatchNorm(C, AXIS, momentum=MOMENTUM), axis_size=depth)()

        def __call__(self, x, state):
            params, static = eqx.partition(self.layers, eqx.is_array)

            def apply(x, params_and_state):
                layer = eqx.combine(params_and_state[0], static)
                x, layer_state = layer(x, params_and_state[1])
                return jnp.tanh(2 * x), layer_state

            x, layer_states = jax.lax.scan(apply, x, (params, state.substate(self.layers)))
            return x, state.update(layer_states)

    stack, state = eqx.nn.make_with_state(Stack)(3)
    stack = eqx.tree_at(lambda s: s.layers.bias, stack, jnp.asarray([[0.5] * C, [-0.5] * C, [0.1] * C]))
    x = _data((8, C))
    y, state = _batched(stack, state, x)
    h, means = np.asarray(x, np.float64), []
    for depth in range(3):
        z, mean, _, _ = reference.batch_norm_train(h, bias=np.asarray(stack.layers.bias[depth]), epsilon=EPS)
        h, means = np.tanh(2 * z), means + [mean]
    np.testing.assert_allclose(y, h, **F32)
    np.testing.assert_allclose(state.get(stack.layers.state_index).mean, _ema(0.0, np.stack(means)), **F32)


def test_tree_at_surgery_on_parameters_and_state():
    bn, state = _make_bn()
    x = _data((6, C))
    scale, shift = jnp.asarray([2.0, 0.5, 1.0]), jnp.asarray([1.0, -1.0, 0.0])
    bn = eqx.tree_at(lambda m: (m.weight, m.bias), bn, (scale, shift))
    running = normjax.BatchNormState(mean=jnp.asarray([1.0, 0.0, -1.0]), var=jnp.asarray([4.0, 1.0, 0.25]))
    state = state.set(bn.state_index, running)
    y, _ = _batched(eqx.nn.inference_mode(bn), state, x)
    np.testing.assert_allclose(y, reference.batch_norm_eval(x, running.mean, running.var, scale, shift), **F32)
    no_affine = eqx.tree_at(lambda m: (m.weight, m.bias), bn, (None, None), is_leaf=lambda v: v is None)
    y, _ = _batched(eqx.nn.inference_mode(no_affine), state, x)
    np.testing.assert_allclose(y, reference.batch_norm_eval(x, running.mean, running.var), **F32)


def test_tree_serialise_leaves_round_trip(tmp_path):
    key = jax.random.key(0)

    def make():
        return eqx.nn.make_with_state(eqx.nn.Sequential)(
            [eqx.nn.Conv1d(2, C, 3, key=key), nqx.BatchNorm(C, AXIS), nqx.GroupNorm(1, C), nqx.RMSNorm((C, 6))]
        )

    model, state = make()
    model = eqx.tree_at(lambda m: m.layers[2].bias, model, jnp.asarray([0.1, 0.2, 0.3]))
    x = _data((4, 2, 8))
    _, state = _batched(model, state, x)
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, (model, state))
    loaded_model, loaded_state = eqx.tree_deserialise_leaves(path, make())
    for a, b in zip(jax.tree.leaves((model, state)), jax.tree.leaves((loaded_model, loaded_state)), strict=True):
        np.testing.assert_array_equal(a, b)
    inference = eqx.nn.inference_mode(model)
    np.testing.assert_array_equal(
        _batched(inference, state, x)[0], _batched(eqx.nn.inference_mode(loaded_model), loaded_state, x)[0]
    )


def test_named_scopes_label_the_layers():
    bn, state = _make_bn()
    text = jax.jit(lambda x, s: _batched(bn, s, x)).lower(jnp.ones((4, C)), state).as_text(debug_info=True)
    assert "normjax.equinox.BatchNorm" in text
    text = jax.jit(jax.vmap(nqx.LayerNorm(C))).lower(jnp.ones((4, C))).as_text(debug_info=True)
    assert "normjax.equinox.LayerNorm" in text
