"""The affine transform: a zero-centered scale (``scale_offset``) and per-example (conditional) scale and bias.

Every norm, in the functions and the linen, nnx and Equinox layers, against a float64 NumPy reference written
here from ``reference.moments``: ``(x - mean) / sqrt(var + eps) * (scale + offset) + bias`` with ``scale`` and
``bias`` broadcast as NumPy broadcasts them.
"""

import functools

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import normjax
import normjax.equinox as nqx
from normjax import linen as njn
from normjax import nnx as njx
from normjax._src import standardize as core
from normjax._src.spec import NormSpec

DTYPES = [jnp.float32, jnp.bfloat16]


def _ref(x, reduction_axes, scale=None, bias=None, *, offset=0.0, centered=True, epsilon=1e-6, mask=None):
    """Float64: x standardized over ``reduction_axes`` times ``scale + offset`` plus ``bias`` (broadcast as is)."""
    mean, var, _ = reference.moments(x, reduction_axes, mask, centered=centered)
    y = (np.asarray(x, np.float64) - mean) / np.sqrt(var + epsilon)
    if scale is not None:
        y = y * (np.asarray(scale, np.float64) + offset)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def _data(shape, param_shape, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(0.5, 2.0, shape), dtype)
    scale = jnp.asarray(rng.normal(0.0, 0.3, param_shape), dtype)
    bias = jnp.asarray(rng.normal(0.0, 0.5, param_shape), dtype)
    return x, scale, bias


def _close(got, want, dtype):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **reference.tolerance(dtype))


# name -> (function of (x, scale, bias, **kw) returning y, input shape, reduction axes, per-feature shape,
# per-example shape). The per-example shapes keep the batch axis and the feature axes, as AdaLN/FiLM do.
def _batch_norm_train(x, scale, bias, **kw):
    state = normjax.init_batch_norm_state(x.shape[-1])
    return normjax.batch_norm(x, state, scale, bias, training=True, epsilon=1e-6, **kw)[0]


def _batch_norm_ghost(x, scale, bias, **kw):
    state = normjax.init_batch_norm_state(x.shape[-1])
    return normjax.batch_norm(x, state, scale, bias, training=True, epsilon=1e-6, virtual_batch_size=2, **kw)[0]


NORMS = {
    "layer_norm": (normjax.layer_norm, (3, 4, 8), (2,), (8,), (3, 1, 8)),
    "rms_norm": (normjax.rms_norm, (3, 4, 8), (2,), (8,), (3, 1, 8)),
    "group_norm": (functools.partial(normjax.group_norm, num_groups=2), (3, 4, 8), (1, 2), (8,), (3, 1, 8)),
    "instance_norm": (normjax.instance_norm, (3, 4, 8), (1,), (8,), (3, 1, 8)),
    "batch_norm": (_batch_norm_train, (6, 4, 8), (0, 1), (8,), (6, 1, 8)),
}


def _reference(name, x, scale, bias, *, offset=0.0):
    axes = NORMS[name][2]
    if name == "group_norm":  # each group of channels standardized on the grouped view, then the affine
        grouped = np.asarray(x, np.float64).reshape(x.shape[:-1] + (2, x.shape[-1] // 2))
        x_hat = _ref(grouped, (1, 3)).reshape(x.shape)
        return x_hat * (np.asarray(scale, np.float64) + offset) + np.asarray(bias, np.float64)
    return _ref(x, axes, scale, bias, offset=offset, centered=name != "rms_norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("per", ["feature", "example"])
@pytest.mark.parametrize("name", sorted(NORMS))
def test_zero_centered_and_per_example_affine_match_float64(name, per, dtype):
    fn, shape, _, feature_shape, example_shape = NORMS[name]
    x, scale, bias = _data(shape, feature_shape if per == "feature" else example_shape, dtype)
    want = _reference(name, x, scale, bias, offset=1.0)
    got = jax.jit(functools.partial(fn, scale_offset=1.0))(x, scale, bias)
    assert got.dtype == dtype
    _close(got, want, dtype)
    # offset 0: the plain affine, per example too
    _close(jax.jit(fn)(x, scale, bias), _reference(name, x, scale, bias), dtype)


def test_ghost_batch_norm_takes_per_example_parameters():
    x, scale, bias = _data((8, 3, 4), (8, 1, 4))
    got = _batch_norm_ghost(x, scale, bias, scale_offset=1.0)
    for i in range(4):  # each virtual batch of two examples on its own
        rows = slice(2 * i, 2 * i + 2)
        _close(got[rows], _ref(x[rows], (0, 1), scale[rows], bias[rows], offset=1.0), jnp.float32)


def test_offset_is_exact_for_bfloat16_parameters():
    """1 + scale rounded to bfloat16 loses the scale's small values; the offset is added in float32."""
    x, _, _ = _data((4, 16), (16,))
    scale = jnp.asarray(np.linspace(-3e-3, 3e-3, 16), jnp.bfloat16)
    want = _ref(x, (1,), scale, offset=1.0)
    np.testing.assert_allclose(normjax.layer_norm(x, scale, scale_offset=1.0), want, rtol=1e-5, atol=1e-5)
    want_rms = _ref(x, (1,), scale, offset=1.0, centered=False)
    np.testing.assert_allclose(normjax.rms_norm(x, scale, scale_offset=1.0), want_rms, rtol=1e-5, atol=1e-5)
    rounded_first = normjax.layer_norm(x, 1 + scale)  # the offset applied in bfloat16 by the caller
    assert np.max(np.abs(np.asarray(rounded_first) - want)) > 1e-3


def test_normalize_and_batch_norm_evaluation_take_the_offset_and_per_example_parameters():
    x, scale, bias = _data((6, 4, 8), (6, 1, 8))
    state = normjax.BatchNormState(jnp.full((8,), 0.3), jnp.full((8,), 2.0))
    y, same = normjax.batch_norm(x, state, scale, bias, training=False, epsilon=1e-6, scale_offset=1.0)
    want = (np.asarray(x, np.float64) - 0.3) / np.sqrt(2.0 + 1e-6) * (np.asarray(scale, np.float64) + 1) + bias
    _close(y, want, jnp.float32)
    assert same is state
    m = normjax.moments(x, reduction_axes=(0, 1), keepdims=True)
    got = normjax.normalize(x, m.mean, m.var, scale, bias, epsilon=1e-6, scale_offset=1.0)
    _close(got, _ref(x, (0, 1), scale, bias, offset=1.0), jnp.float32)


@pytest.mark.parametrize("name", ["layer_norm", "batch_norm", "group_norm"])
def test_check_grads_per_example_with_offset(name):
    fn, shape, _, _, example_shape = NORMS[name]
    with jax.enable_x64(True):
        x, scale, bias = _data(shape, example_shape, jnp.float64, seed=3)
        check_grads(jax.jit(functools.partial(fn, scale_offset=1.0)), (x, scale, bias), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize("name", sorted(NORMS))
def test_per_example_cotangents_sum_over_the_broadcast_axes(name):
    """d/dscale of sum(y * w) is sum(x_hat * w) over exactly the axes scale was broadcast along."""
    fn, shape, _, _, example_shape = NORMS[name]
    x, scale, bias = _data(shape, example_shape)
    w = jnp.asarray(np.random.default_rng(5).normal(size=shape), jnp.float32)
    dscale, dbias = jax.jit(jax.grad(lambda s, b: jnp.sum(fn(x, s, b, scale_offset=1.0) * w), argnums=(0, 1)))(
        scale, bias
    )
    x_hat = _reference(name, x, np.zeros(example_shape), np.zeros(example_shape), offset=1.0)
    broadcast = tuple(a for a, n in enumerate(example_shape) if n == 1)
    assert dscale.shape == scale.shape and dbias.shape == bias.shape
    np.testing.assert_allclose(dscale, np.sum(x_hat * np.asarray(w), broadcast, keepdims=True), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dbias, np.sum(np.asarray(w), broadcast, keepdims=True), rtol=1e-5, atol=1e-5)


_LAYOUT_CASES = {  # shape, reduction axes, feature axes, centered, per-example parameter shape
    "batch": ((6, 4, 8), (0, 1), (2,), True, (6, 1, 8)),
    "layer": ((3, 4, 8), (2,), (2,), True, (3, 1, 8)),
    "rms": ((3, 4, 8), (2,), (2,), False, (3, 4, 1)),
    "instance": ((3, 4, 8), (1,), (2,), True, (3, 1, 1)),
}


@pytest.mark.parametrize("layout", ["xla_cpu", "xla_tpu", "xla_gpu"])
@pytest.mark.parametrize("name", sorted(_LAYOUT_CASES))
def test_every_layout_agrees_with_the_generic_one_on_per_example_parameters(name, layout):
    shape, reduction_axes, feature_axes, centered, param_shape = _LAYOUT_CASES[name]
    x, s, b = _data(shape, param_shape, seed=11)
    g = jnp.asarray(np.random.default_rng(12).normal(size=shape), jnp.float32)
    epsilon = jnp.asarray(1e-5, jnp.float32)

    def run(layout):
        spec = NormSpec(
            reduction_axes, feature_axes, centered, None, None, jnp.dtype(jnp.float32), layout, scale_offset=1.0
        )
        f = jax.jit(lambda x, s, b: core._standardize(spec, x, s, b, None, epsilon, None))
        (y, mean, var, _), pull = jax.vjp(f, x, s, b)
        return (y,) + pull((g, jnp.zeros_like(mean), jnp.zeros_like(var), jnp.zeros_like(var)))

    for got, want in zip(run(layout), run("generic"), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_vmap_over_an_ensemble_of_per_example_parameters():
    x, scale, bias = _data((3, 4, 8), (5, 3, 1, 8))
    got = jax.vmap(lambda s, b: normjax.layer_norm(x, s, b, scale_offset=1.0))(scale, bias)
    for k in range(5):
        _close(got[k], _ref(x, (2,), scale[k], bias[k], offset=1.0), jnp.float32)


def _class_conditional_bn(x, scale, bias, axis_name=None):
    state = normjax.init_batch_norm_state(x.shape[-1])
    return normjax.batch_norm(
        x, state, scale, bias, training=True, axis_name=axis_name, scale_offset=1.0, epsilon=1e-6
    )  # fmt: skip


def test_class_conditional_batch_norm_under_shard_map_vmap_and_pmap_equals_the_global_batch():
    """BigGAN's conditional BatchNorm: per-example gains, statistics synchronized over the devices."""
    x, scale, bias = _data((8, 2, 4), (8, 1, 4))
    want_y, want_state = _class_conditional_bn(x, scale, bias)
    loss = lambda f: lambda x, s, b: jnp.sum(jnp.sin(f(x, s, b)))  # noqa: E731
    want_grads = jax.grad(loss(lambda *a: _class_conditional_bn(*a)[0]), argnums=(0, 1, 2))(x, scale, bias)

    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
    local = lambda x, s, b: _class_conditional_bn(x, s, b, "d")[0]  # noqa: E731
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("d"), out_specs=P("d")))
    np.testing.assert_allclose(sharded(x, scale, bias), want_y, rtol=1e-5, atol=1e-5)
    got_grads = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2)))(x, scale, bias)
    for got, want in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    per_example = lambda x, s, b: _class_conditional_bn(x, s, b, "b")  # noqa: E731
    y, state = jax.vmap(per_example, axis_name="b", out_axes=(0, None))(x[:, None], scale[:, None], bias[:, None])
    np.testing.assert_allclose(y[:, 0], want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.mean, want_state.mean, rtol=1e-5, atol=1e-6)

    split = lambda a: a.reshape((4, 2) + a.shape[1:])  # noqa: E731
    y = jax.pmap(lambda x, s, b: _class_conditional_bn(x, s, b, "p")[0], axis_name="p")(*map(split, (x, scale, bias)))
    np.testing.assert_allclose(y.reshape(x.shape), want_y, rtol=1e-5, atol=1e-5)


# --- Gemma-style checkpoints: y = x_hat * (1 + scale), scale initialized at zero


def _gemma_rms_norm(x, scale):
    """Gemma's RMSNorm as its reference implementation writes it (float32 statistics)."""
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    normed = x.astype(jnp.float32) * jax.lax.rsqrt(var + 1e-6)
    return (normed * (1 + scale.astype(jnp.float32)[None, None])).astype(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_gemma_checkpoint_maps_to_rms_norm_with_scale_offset_one(dtype):
    x, gemma_scale, _ = _data((2, 5, 16), (16,), dtype)
    gemma = {"params": {"scale": gemma_scale}}  # Gemma's variables: params/scale, initialized at 0
    layer = njn.RMSNorm(scale_offset=1.0, scale_init=nn.initializers.zeros, param_dtype=dtype)
    init = layer.init(jax.random.key(0), x)
    np.testing.assert_array_equal(init["params"]["scale"], jnp.zeros(16, dtype))  # identity at init
    _close(layer.apply(init, x), _ref(x, (2,), centered=False), dtype)
    assert jax.tree.structure(init) == jax.tree.structure(gemma)
    got = layer.apply(gemma, x)
    _close(got, _ref(x, (2,), gemma_scale, offset=1.0, centered=False), dtype)
    np.testing.assert_allclose(
        np.asarray(got, np.float32),
        np.asarray(_gemma_rms_norm(x, gemma_scale), np.float32),
        **reference.tolerance(dtype),
    )
    # the same checkpoint without the flag is the wrong model, not an error: the flag must be set
    assert np.max(np.abs(np.asarray(njn.RMSNorm().apply(gemma, x), np.float32) - np.asarray(got, np.float32))) > 0.1

    model = njx.RMSNorm(16, scale_offset=1.0, scale_init=nnx.initializers.zeros_init(), param_dtype=dtype,
                        rngs=nnx.Rngs(0))  # fmt: skip
    model.scale[...] = gemma_scale
    np.testing.assert_array_equal(model(x), got)  # linen and nnx agree bit for bit
    eqx_layer = nqx.RMSNorm(16, eps=1e-6, use_bias=False, scale_offset=1.0, dtype=dtype)
    np.testing.assert_array_equal(eqx_layer.weight, jnp.zeros(16, dtype))
    eqx_layer = eqx.tree_at(lambda m: m.weight, eqx_layer, gemma_scale)
    _close(jax.vmap(jax.vmap(eqx_layer))(x), _ref(x, (2,), gemma_scale, offset=1.0, centered=False), dtype)


@pytest.mark.parametrize("name", ["LayerNorm", "GroupNorm", "InstanceNorm", "BatchNorm"])
def test_linen_and_nnx_layers_take_the_offset_and_agree_bit_for_bit(name):
    x, scale, bias = _data((4, 3, 8), (8,))
    config = {"use_running_average": False} if name == "BatchNorm" else {}
    if name == "GroupNorm":
        config["num_groups"] = 2
    linen_layer = getattr(njn, name)(scale_offset=1.0, scale_init=nn.initializers.zeros, **config)
    variables = linen_layer.init(jax.random.key(0), x)
    variables = {**variables, "params": {"scale": scale, "bias": bias}}
    y = linen_layer.apply(variables, x, mutable=["batch_stats"])[0]
    plain = getattr(njn, name)(**config).apply({**variables, "params": {"scale": 1 + scale, "bias": bias}}, x,
                                                mutable=["batch_stats"])[0]  # fmt: skip
    np.testing.assert_allclose(y, plain, rtol=1e-6, atol=1e-6)
    nnx_layer = getattr(njx, name)(8, scale_offset=1.0, rngs=nnx.Rngs(0), **config)
    nnx_layer.scale[...], nnx_layer.bias[...] = scale, bias
    np.testing.assert_array_equal(nnx_layer(x), y)


def test_folding_a_zero_centered_batch_norm_keeps_the_offset():
    x = _data((6, 3), (3,))[0]
    dense = nn.Dense(4)
    bn = njn.BatchNorm(use_running_average=True, scale_offset=1.0, scale_init=nn.initializers.zeros)
    model = nn.Sequential([dense, bn])
    variables = model.init(jax.random.key(0), x)
    stats = {"mean": jnp.array([0.1, -0.2, 0.3, 0.0]), "var": jnp.array([0.5, 2.0, 1.5, 1.0])}
    params = {**variables["params"], "layers_1": {"scale": jnp.array([0.1, -0.2, 0.0, 0.3]), "bias": jnp.ones(4)}}
    variables = {"params": params, "batch_stats": {"layers_1": stats}}
    folded = normjax.fold_batch_norm_variables(variables, {"layers_0": "layers_1"}, scale_offset=1.0)
    y = nn.Dense(4).apply({"params": folded["params"]["layers_0"]}, x)
    np.testing.assert_allclose(y, model.apply(variables, x), rtol=1e-5, atol=1e-5)


def _renorm_reference(x, mask, scale, bias, state, r_max, d_max, epsilon):
    """Float64 Batch Renorm training output over axes (0, 1): ``(x_hat r + d) (scale + 1) + bias`` and ``d``."""
    mean, var, _ = reference.moments(x, (0, 1), mask)
    running_std = np.sqrt(np.asarray(state.var, np.float64) + epsilon)
    r = np.clip(np.sqrt(var + epsilon) / running_std, 1 / r_max, r_max)
    d = np.clip((mean - np.asarray(state.mean, np.float64)) / running_std, -d_max, d_max)
    gamma = np.asarray(scale, np.float64) + 1
    x_hat = (np.asarray(x, np.float64) - mean) / np.sqrt(var + epsilon)
    return (x_hat * r + d) * gamma + np.asarray(bias, np.float64), gamma * d + np.asarray(bias, np.float64)


@pytest.mark.parametrize("normalized_dtype", [None, jnp.float32, jnp.bfloat16], ids=["once", "f32", "bf16"])
def test_the_output_composes_offset_per_example_renorm_mask_and_casting_order(normalized_dtype):
    """One call with every option of the output: the offset, per-example parameters, Batch Renorm's r and d,
    a mask whose padding is NaN, ``zero_masked_outputs`` and a casting order."""
    x, scale, bias = _data((6, 4, 8), (6, 1, 8), seed=21)
    mask = jnp.asarray(np.random.default_rng(22).random((6, 4, 1)) > 0.25)
    x = jnp.where(mask, x, jnp.nan)  # padding holds anything
    state = normjax.init_batch_norm_state(8)._replace(mean=jnp.linspace(-1.0, 2.0, 8), var=jnp.linspace(0.2, 3, 8))
    options = dict(training=True, mask=mask, epsilon=1e-5, renorm_clipping=(1.5, 0.5), dtype=jnp.float32)

    def run(scale, **kw):
        return jax.jit(lambda x, s, b: normjax.batch_norm(x, state, s, b, **options, **kw))(x, scale, bias)

    y, new_state = run(scale, scale_offset=1.0, normalized_dtype=normalized_dtype)
    want, at_padding = _renorm_reference(x, mask, scale, bias, state, 1.5, 0.5, 1e-5)
    valid = np.broadcast_to(np.asarray(mask), x.shape)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if normalized_dtype == jnp.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    np.testing.assert_allclose(np.asarray(y)[valid], want[valid], **tolerance)
    # NaN padding outputs the effective bias, beta + gamma d, and does not reach the statistics
    padding = np.broadcast_to(at_padding, x.shape)[~valid]
    np.testing.assert_allclose(np.asarray(y)[~valid], padding, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(new_state.mean))) and int(new_state.count) == 1
    # the offset is formed in float32 before the casting order: the same bits as passing 1 + scale in float32
    plain, _ = run(scale.astype(jnp.float32) + 1, normalized_dtype=normalized_dtype)
    np.testing.assert_array_equal(y, plain)
    zeroed, _ = run(scale, scale_offset=1.0, normalized_dtype=normalized_dtype, zero_masked_outputs=True)
    np.testing.assert_array_equal(np.asarray(zeroed)[~valid], 0.0)
    np.testing.assert_array_equal(np.asarray(zeroed)[valid], np.asarray(y)[valid])
    grads = jax.grad(
        lambda x, s, b: jnp.sum(jnp.sin(normjax.batch_norm(x, state, s, b, **options, scale_offset=1.0,
                                        normalized_dtype=normalized_dtype, zero_masked_outputs=True)[0])),
        argnums=(0, 1, 2),
    )(x, scale, bias)  # fmt: skip
    assert np.all(np.isfinite(np.asarray(grads[0])[valid])) and all(np.all(np.isfinite(g)) for g in grads[1:])


def test_layers_compose_offset_call_time_parameters_renorm_warmup_and_casting_order():
    """linen and nnx BatchNorm with every new option at once agree bit for bit, step count included."""
    x, gains, shifts = _data((6, 4, 8), (6, 1, 8), jnp.bfloat16, seed=23)
    mask = jnp.asarray(np.random.default_rng(24).random((6, 4, 1)) > 0.25)
    # dtype given: without it nnx's output dtype counts the float32 running statistics, as Flax nnx's does
    config = dict(
        dtype=jnp.bfloat16, use_scale=False, use_bias=False, renorm_clipping=(3.0, 5.0), renorm_warmup_steps=1,
        normalized_dtype=jnp.bfloat16, scale_offset=1.0, zero_masked_outputs=True,
    )  # fmt: skip
    layer = njn.BatchNorm(use_running_average=False, **config)
    variables = layer.init(jax.random.key(0), x, scale=gains, bias=shifts)
    nnx_layer = njx.BatchNorm(8, **config, rngs=nnx.Rngs(0))
    for _ in range(3):  # warm-up step, then Batch Renorm
        y, updates = layer.apply(variables, x, mask=mask, scale=gains, bias=shifts, mutable=["batch_stats"])
        variables = {**variables, **updates}
        np.testing.assert_array_equal(nnx_layer(x, mask=mask, scale=gains, bias=shifts), y)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32)[~np.broadcast_to(np.asarray(mask), x.shape)], 0.0)
    assert int(variables["batch_stats"]["count"]) == int(nnx_layer.count[...]) == 3
    np.testing.assert_array_equal(variables["batch_stats"]["var"], nnx_layer.var[...])


# --- call-time (conditional) parameters in the layers


def _adaln_zero_reference(x, shift, scale):
    """DiT's modulate(LayerNorm(x, elementwise_affine=False), shift, scale) = x_hat * (1 + scale) + shift."""
    return _ref(x, (2,), scale, shift, offset=1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_adaln_through_linen_nnx_and_equinox_layers(dtype):
    x, scale, shift = _data((2, 6, 8), (2, 1, 8), dtype)
    want = _adaln_zero_reference(x, shift, scale)
    linen_layer = njn.LayerNorm(use_scale=False, use_bias=False, scale_offset=1.0)
    variables = linen_layer.init(jax.random.key(0), x, scale=scale, bias=shift)
    assert variables == {}
    y = linen_layer.apply(variables, x, scale=scale, bias=shift)
    _close(y, want, dtype)
    _close(jax.jit(lambda x, s, b: linen_layer.apply(variables, x, scale=s, bias=b))(x, scale, shift), want, dtype)
    nnx_layer = njx.LayerNorm(8, use_scale=False, use_bias=False, scale_offset=1.0, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(nnx_layer(x, scale=scale, bias=shift), y)
    eqx_layer = nqx.LayerNorm(8, eps=1e-6, use_weight=False, use_bias=False, scale_offset=1.0)
    per_token = jax.vmap(lambda x, s, b: eqx_layer(x, weight=s, bias=b), in_axes=(0, None, None))
    y_eqx = jax.vmap(per_token)(x, scale[:, 0], shift[:, 0])
    _close(y_eqx, want, dtype)


def test_class_conditional_batch_norm_layers():
    x, gains, shifts = _data((6, 2, 2, 4), (6, 1, 1, 4))
    want = _ref(x, (0, 1, 2), gains, shifts, offset=1.0, epsilon=1e-5)
    layer = njn.BatchNorm(use_running_average=False, use_scale=False, use_bias=False, scale_offset=1.0)
    variables = layer.init(jax.random.key(0), x, scale=gains, bias=shifts)
    y, _ = layer.apply(variables, x, scale=gains, bias=shifts, mutable=["batch_stats"])
    _close(y, want, jnp.float32)
    nnx_layer = njx.BatchNorm(4, use_scale=False, use_bias=False, scale_offset=1.0, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(nnx_layer(x, scale=gains, bias=shifts), y)
    np.testing.assert_array_equal(nnx_layer.mean[...], layer.apply(variables, x, scale=gains, bias=shifts,
                                  mutable=["batch_stats"])[1]["batch_stats"]["mean"])  # fmt: skip
    bn, state = eqx.nn.make_with_state(nqx.BatchNorm)(4, "batch", channelwise_affine=False, scale_offset=1.0)
    channels_first = lambda a: jnp.moveaxis(a, -1, 1)  # noqa: E731
    run = jax.vmap(lambda x, s, g, b: bn(x, s, weight=g, bias=b), axis_name="batch", in_axes=(0, None, 0, 0),
                   out_axes=(0, None))  # fmt: skip
    y_eqx, _ = run(channels_first(x), state, channels_first(gains), channels_first(shifts))
    np.testing.assert_allclose(y_eqx, want.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_film_with_group_and_instance_norm_layers():
    x, gamma, beta = _data((2, 3, 3, 8), (2, 1, 1, 8))
    for name, config in [("GroupNorm", {"num_groups": 2}), ("InstanceNorm", {})]:
        layer = getattr(njn, name)(use_scale=False, use_bias=False, **config)
        y = layer.apply({}, x, scale=gamma, bias=beta)
        axes = (1, 2) if name == "InstanceNorm" else None
        if axes is None:
            want = _reference("group_norm", x.reshape(2, 9, 8), gamma[:, 0], beta[:, 0]).reshape(x.shape)
        else:
            want = _ref(x, axes, gamma, beta)
        _close(y, want, jnp.float32)
        nnx_layer = getattr(njx, name)(8, use_scale=False, use_bias=False, rngs=nnx.Rngs(0), **config)
        np.testing.assert_array_equal(nnx_layer(x, scale=gamma, bias=beta), y)


# --- errors


def test_errors_for_the_offset_and_per_example_parameters():
    x = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match="`scale_offset`=1.0 offsets `scale`, but no `scale` was given"):
        normjax.layer_norm(x, scale_offset=1.0)
    with pytest.raises(TypeError, match="`scale_offset` must be a Python float known at trace time"):
        jax.jit(lambda c: normjax.layer_norm(x, jnp.ones(4), scale_offset=c))(1.0)
    with pytest.raises(ValueError, match="`scale_offset` must be finite"):
        normjax.rms_norm(x, jnp.ones(4), scale_offset=float("inf"))
    with pytest.raises(ValueError, match=r"`scale` must have shape \(4,\).*\(2, 1, 4\)\); got shape \(2, 2, 4\)"):
        normjax.layer_norm(x, jnp.ones((2, 2, 4)))
    with pytest.raises(ValueError, match=r"`bias` must have shape \(4,\)"):
        normjax.layer_norm(x, None, jnp.ones((3, 4)))  # lower ranks are not broadcast: ambiguous with per feature
    with pytest.raises(ValueError, match="LayerNorm has its own `scale` parameter \\(use_scale=True\\)"):
        njn.LayerNorm().init(jax.random.key(0), x, scale=jnp.ones((2, 1, 4)))
    with pytest.raises(ValueError, match="BatchNorm has its own `bias` parameter \\(use_bias=True\\)"):
        njx.BatchNorm(4, use_scale=False, rngs=nnx.Rngs(0))(x, bias=jnp.ones(4))
    with pytest.raises(ValueError, match="LayerNorm has its own `weight` parameter \\(use_weight=True\\)"):
        nqx.LayerNorm(4)(x[0, 0], weight=jnp.ones(4))
    with pytest.raises(ValueError, match="no `scale` was given.*`use_scale=False`, pass the scale at call time"):
        njn.RMSNorm(use_scale=False, scale_offset=1.0).init(jax.random.key(0), x)
