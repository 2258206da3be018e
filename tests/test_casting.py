"""Casting orders (`normalized_dtype`): bit-exact against the public reference formulas, and their derivative.

Each reference is written here in plain jnp from the model code people reproduce checkpoints against:
HF Llama's ``LlamaRMSNorm.forward``, HF T5's ``T5LayerNorm.forward``, HF Gemma's ``GemmaRMSNorm.forward``, and
Flax's ``_normalize`` (normjax's default order). ``torch.nn.functional.rms_norm`` is checked too.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from bitwise import assert_bit_exact, bits
from flax import nnx
from jax.test_util import check_grads

import normjax
import normjax.equinox as nqx
import normjax.linen as njn
import normjax.nnx as njx

EPS = 1e-6
D = 64


def _data(shape, dtype, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _weight(dtype, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(1.0, 0.5, D), dtype)


def _row(weight, x):
    """``weight`` reshaped to broadcast along the last axis of ``x`` (the tests raise on rank promotion)."""
    return jnp.reshape(weight, (1,) * (x.ndim - 1) + (-1,))


def llama(x, weight):
    """HF Llama's ``LlamaRMSNorm.forward``: normalize in float32, cast to the input dtype, then ``weight *``."""
    hidden = x.astype(jnp.float32)
    variance = jnp.mean(hidden * hidden, -1, keepdims=True)
    hidden = hidden * jax.lax.rsqrt(variance + EPS)
    return _row(weight, x) * hidden.astype(x.dtype)


def t5(x, weight):
    """HF T5's ``T5LayerNorm.forward``: float32 statistics, cast to the weight's dtype if it is half precision."""
    variance = jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True)
    hidden = x.astype(jnp.float32) * jax.lax.rsqrt(variance + EPS)
    if weight.dtype in (jnp.bfloat16, jnp.float16):
        hidden = hidden.astype(weight.dtype)
    return _row(weight, x) * hidden


def gemma(x, weight):
    """HF Gemma's ``GemmaRMSNorm.forward``: ``(x_hat * (1 + weight.float())).type_as(x)``, all in float32."""
    hidden = x.astype(jnp.float32)
    hidden = hidden * jax.lax.rsqrt(jnp.mean(hidden * hidden, -1, keepdims=True) + EPS)
    return (hidden * (1.0 + _row(weight, x).astype(jnp.float32))).astype(x.dtype)


def flax_order(x, weight, bias=None, centered=False):
    """Flax's ``_normalize``: ``(x - mean) * (rsqrt(var + eps) * scale) + bias`` in float32, cast once."""
    hidden = x.astype(jnp.float32)
    mean = jnp.mean(hidden, -1, keepdims=True) if centered else 0.0
    var = jnp.mean(jnp.square(hidden - mean), -1, keepdims=True)
    y = (hidden - mean) * (jax.lax.rsqrt(var + EPS) * _row(weight, x).astype(jnp.float32))
    return (y if bias is None else y + _row(bias, x).astype(jnp.float32)).astype(x.dtype)


def mismatch(a, b):
    return float(np.mean(bits(a) != bits(b)))


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype"),
    [
        (jnp.bfloat16, jnp.bfloat16),
        (jnp.bfloat16, jnp.float32),
        (jnp.float16, jnp.float16),
        (jnp.float32, jnp.bfloat16),
    ],
)
def test_llama_order_is_bit_exact(x_dtype, w_dtype):
    x, w = _data((16, D), x_dtype), _weight(w_dtype)
    want = llama(x, w)
    f = jax.jit(lambda x, w: normjax.rms_norm(x, w, epsilon=EPS, normalized_dtype=x.dtype, dtype=want.dtype))
    assert_bit_exact(f(x, w), want)


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype"), [(jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32)]
)
def test_t5_order_is_bit_exact(x_dtype, w_dtype):
    x, w = _data((16, D), x_dtype, seed=2), _weight(w_dtype)
    want = t5(x, w)
    half = w_dtype in (jnp.bfloat16, jnp.float16)
    got = normjax.rms_norm(x, w, epsilon=EPS, normalized_dtype=w_dtype if half else None, dtype=want.dtype)
    if not half:  # a float32 weight: T5 keeps float32 throughout, i.e. normalize first, then the weight
        got = normjax.rms_norm(x, w, epsilon=EPS, normalized_dtype=jnp.float32, dtype=want.dtype)
    assert_bit_exact(got, want)


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32])
def test_gemma_order_is_bit_exact_with_its_float32_scale(x_dtype):
    x, w = _data((16, D), x_dtype, seed=3), _weight(jnp.bfloat16) - 1
    scale = 1.0 + w.astype(jnp.float32)  # Gemma's zero-centered weight, offset in float32 as its code does
    assert_bit_exact(normjax.rms_norm(x, scale, epsilon=EPS, normalized_dtype=jnp.float32), gemma(x, w))


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32])
def test_gemma_order_is_bit_exact_with_scale_offset(x_dtype):
    """``scale_offset=1.0`` forms ``1 + w`` in float32 before the casting order: Gemma's checkpoint as it is.

    The weights are small, as a trained zero-centered weight is, so ``1 + w`` is not a bfloat16 number.
    """
    x = _data((16, D), x_dtype, seed=3)
    w = jnp.asarray(np.random.default_rng(18).normal(0.0, 0.05, D), jnp.bfloat16)
    want = gemma(x, w)
    assert mismatch(normjax.rms_norm(x, 1 + w, epsilon=EPS, normalized_dtype=jnp.float32), want) > 0.05
    options = dict(normalized_dtype=jnp.float32, scale_offset=1.0)
    assert_bit_exact(jax.jit(lambda x, w: normjax.rms_norm(x, w, epsilon=EPS, **options))(x, w), want)
    linen_y = njn.RMSNorm(epsilon=EPS, param_dtype=jnp.bfloat16, **options).apply({"params": {"scale": w}}, x)
    assert_bit_exact(linen_y, want)
    nnx_layer = njx.RMSNorm(D, epsilon=EPS, param_dtype=jnp.bfloat16, **options, rngs=nnx.Rngs(0))
    nnx_layer.scale[...] = w
    assert_bit_exact(nnx_layer(x), want)
    eqx_layer = nqx.RMSNorm(D, eps=EPS, use_bias=False, dtype=jnp.bfloat16, **options)
    assert_bit_exact(jax.vmap(eqx.tree_at(lambda m: m.weight, eqx_layer, w))(x), want)


def qwen3_next_gated(x, weight, gate):
    """HF Qwen3-Next's ``Qwen3NextRMSNormGated.forward``: Llama's order, then ``* silu(gate.float())``, cast."""
    return (llama(x, weight).astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


def test_gated_rms_norm_takes_the_order_qwen3_next_bit_exact():
    """Op by op, and under ``jit`` against the jitted reference: there XLA may keep the bfloat16 product
    ``weight * x_hat`` in float32 before the gate (its excess-precision default), in both alike."""
    x, w, z = _data((16, D), jnp.bfloat16, seed=19), _weight(jnp.bfloat16), _data((16, D), jnp.bfloat16, seed=20)

    def gated(x, w, z, **options):
        return normjax.gated_rms_norm(x, z, w, epsilon=EPS, normalized_dtype=x.dtype, **options)

    want = qwen3_next_gated(x, w, z)
    assert_bit_exact(gated(x, w, z), want)
    assert_bit_exact(jax.jit(gated)(x, w, z), jax.jit(qwen3_next_gated)(x, w, z))
    assert mismatch(normjax.gated_rms_norm(x, z, w, epsilon=EPS), want) > 0.05  # the default order differs
    wide = gated(x, w, z, dtype=jnp.float32)
    assert wide.dtype == jnp.float32
    assert_bit_exact(wide.astype(jnp.bfloat16), want)
    options = dict(epsilon=EPS, param_dtype=jnp.bfloat16, normalized_dtype=jnp.bfloat16)
    assert_bit_exact(njn.RMSNorm(**options).apply({"params": {"scale": w}}, x, gate=z), want)
    nnx_layer = njx.RMSNorm(D, **options, rngs=nnx.Rngs(0))
    nnx_layer.scale[...] = w
    assert_bit_exact(nnx_layer(x, gate=z), want)
    eqx_layer = nqx.RMSNorm(D, eps=EPS, use_bias=False, dtype=jnp.bfloat16, normalized_dtype=jnp.bfloat16)
    eqx_layer = eqx.tree_at(lambda m: m.weight, eqx_layer, w)
    assert_bit_exact(jnp.stack([eqx_layer(x[i], gate=z[i]) for i in range(len(x))]), want)


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32])
def test_default_order_is_flax_order_bit_exact(x_dtype):
    x, w = _data((16, D), x_dtype, seed=4), _weight(jnp.float32)
    b = _weight(jnp.float32, seed=5)
    assert_bit_exact(normjax.rms_norm(x, w, epsilon=EPS), flax_order(x, w))
    if x_dtype == jnp.bfloat16:  # a centered mean is computed about a shift (stable), so float32 differs by ulps
        assert_bit_exact(normjax.layer_norm(x, w, b, epsilon=EPS), flax_order(x, w, b, centered=True))


def test_torch_rms_norm_is_the_float32_order():
    x, w = _data((16, D), jnp.bfloat16, seed=6), _weight(jnp.bfloat16)
    xt = torch.tensor(np.asarray(x, np.float32)).bfloat16()
    wt = torch.tensor(np.asarray(w, np.float32)).bfloat16()
    want = torch.nn.functional.rms_norm(xt, (D,), wt, eps=EPS).float().numpy()
    got = normjax.rms_norm(x, w, epsilon=EPS, normalized_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_orders_differ_where_they_should():
    """The measured disagreement that makes the option necessary (bfloat16 output, 16 x 64 normal inputs)."""
    x, w = _data((16, D), jnp.bfloat16, seed=7), _weight(jnp.bfloat16)
    once = normjax.rms_norm(x, w, epsilon=EPS)
    llama_order = normjax.rms_norm(x, w, epsilon=EPS, normalized_dtype=jnp.bfloat16)
    assert 0.1 < mismatch(once, llama_order) < 0.5
    assert mismatch(once, llama(x, w)) == mismatch(once, llama_order)


def test_casting_order_applies_to_every_norm_and_bias():
    """LayerNorm, GroupNorm, InstanceNorm and BatchNorm (train and eval) round x_hat, then scale and shift in D."""
    x = _data((4, 6, 8), jnp.bfloat16, seed=8)
    w, b = (jnp.asarray(np.random.default_rng(s).normal(size=8), jnp.bfloat16) for s in (9, 10))

    def affine_in_bf16(x_hat):
        return x_hat.astype(jnp.bfloat16) * _row(w, x_hat) + _row(b, x_hat)

    xf = x.astype(jnp.float32)
    mean, var = jnp.mean(xf, -1, keepdims=True), jnp.var(xf, -1, keepdims=True)
    want = affine_in_bf16((xf - mean) * jax.lax.rsqrt(var + EPS))
    got = normjax.layer_norm(x, w, b, epsilon=EPS, normalized_dtype=jnp.bfloat16)
    assert_bit_exact(got, want)
    state = normjax.BatchNormState(jnp.linspace(-1, 1, 8), jnp.linspace(0.5, 2, 8))
    y, _ = normjax.batch_norm(x, state, w, b, training=False, epsilon=EPS, normalized_dtype=jnp.bfloat16)
    assert_bit_exact(y, affine_in_bf16((xf - _row(state.mean, xf)) * jax.lax.rsqrt(_row(state.var, xf) + EPS)))
    for f in (
        lambda **k: normjax.group_norm(x, w, b, num_groups=2, epsilon=EPS, **k),
        lambda **k: normjax.instance_norm(x, w, b, epsilon=EPS, **k),
        lambda **k: normjax.batch_norm(x, state, w, b, training=True, epsilon=EPS, **k)[0],
    ):
        # The same statistics as the float32 order: rounding x_hat to float32 is exact, so the orders differ
        # only by where bfloat16 rounds.
        y32 = f(normalized_dtype=jnp.float32, dtype=jnp.float32)
        y16 = f(normalized_dtype=jnp.bfloat16)
        assert y16.dtype == jnp.bfloat16
        x_hat = (y32 - _row(b, y32).astype(jnp.float32)) / _row(w, y32).astype(jnp.float32)
        np.testing.assert_allclose(
            np.asarray(y16, np.float32), np.asarray(affine_in_bf16(x_hat), np.float32), atol=0.05
        )


def test_layers_take_the_order_and_agree_bit_for_bit():
    x = _data((8, D), jnp.bfloat16, seed=11)
    w = _weight(jnp.bfloat16)
    want = llama(x, w)
    options = dict(epsilon=EPS, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, normalized_dtype=jnp.bfloat16)
    linen_layer = njn.RMSNorm(**options)
    variables = {"params": {"scale": w}}
    assert_bit_exact(linen_layer.apply(variables, x), want)
    nnx_layer = njx.RMSNorm(D, **options, rngs=nnx.Rngs(0))
    nnx_layer.scale[...] = w
    assert_bit_exact(nnx_layer(x), want)
    eqx_layer = eqx.tree_at(
        lambda m: m.weight, nqx.RMSNorm(D, eps=EPS, use_bias=False, normalized_dtype=jnp.bfloat16), w
    )
    assert_bit_exact(jax.vmap(eqx_layer)(x), want)
    for linen_cls, nnx_cls in ((njn.LayerNorm, njx.LayerNorm), (njn.GroupNorm, njx.GroupNorm)):
        extra = {"num_groups": 4} if linen_cls is njn.GroupNorm else {}
        linen_y, variables = linen_cls(**options, **extra).init_with_output(jax.random.key(0), x)
        nnx_y = nnx_cls(D, **options, **extra, rngs=nnx.Rngs(0))(x)
        assert_bit_exact(linen_y, nnx_y)
    bn_linen = njn.BatchNorm(use_running_average=False, **options)
    variables = bn_linen.init(jax.random.key(0), x)
    y_linen, _ = bn_linen.apply(variables, x, mutable=["batch_stats"])
    y_nnx = njx.BatchNorm(D, **options, rngs=nnx.Rngs(0))(x)
    assert_bit_exact(y_linen, y_nnx)


@pytest.mark.parametrize("normalized_dtype", [None, jnp.float32, jnp.bfloat16])
def test_derivative_is_the_same_closed_form_whatever_the_order(normalized_dtype):
    """Rounding has derivative 1 (as ``astype`` does): every order has the tangent of the default order."""
    x, w = _data((8, D), jnp.float32, seed=12), _weight(jnp.float32)
    dx, dw = _data((8, D), jnp.float32, seed=13), _weight(jnp.float32, seed=14)

    def f(normalized):
        return lambda x, w: normjax.rms_norm(x, w, epsilon=EPS, normalized_dtype=normalized)

    _, want = jax.jvp(jax.jit(f(None)), (x, w), (dx, dw))
    _, got = jax.jvp(jax.jit(f(normalized_dtype)), (x, w), (dx, dw))
    np.testing.assert_array_equal(bits(got), bits(want))


def test_gradient_matches_autodiff_of_the_reference():
    x, w = _data((8, D), jnp.float32, seed=15), _weight(jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

    ours = loss(lambda x, w: normjax.rms_norm(x, w, epsilon=EPS, normalized_dtype=jnp.float32))
    got = jax.grad(ours, argnums=(0, 1))(x, w)
    want = jax.grad(loss(llama), argnums=(0, 1))(x, w)  # float32 input: Llama's order without a rounding
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5)


def test_check_grads_with_normalized_dtype():
    x, w = _data((4, 8), jnp.float32, seed=16), jnp.linspace(0.5, 1.5, 8)
    b = jnp.linspace(-1, 1, 8)

    def f(x, w, b):
        return normjax.layer_norm(x, w, b, epsilon=1e-3, normalized_dtype=jnp.float32)

    check_grads(f, (x, w, b), order=2, modes=("fwd", "rev"), atol=5e-2, rtol=5e-2)


def test_under_vmap_and_sync():
    x, w = _data((4, 8, D), jnp.bfloat16, seed=17), _weight(jnp.bfloat16)
    vmapped = jax.vmap(lambda x: normjax.rms_norm(x, w, epsilon=EPS, normalized_dtype=jnp.bfloat16))(x)
    assert_bit_exact(vmapped, llama(x, w))
    # Synchronized over a vmap axis that splits the features: the statistics of the whole row.
    split = x.reshape(4, 8, 2, D // 2).transpose(2, 0, 1, 3)
    halves = w.reshape(2, D // 2)
    synced = jax.vmap(
        lambda x, w: normjax.rms_norm(x, w, epsilon=EPS, axis_name="shard", normalized_dtype=jnp.bfloat16),
        axis_name="shard",
    )(split, halves)
    np.testing.assert_allclose(
        np.asarray(synced.transpose(1, 2, 0, 3).reshape(x.shape), np.float32),
        np.asarray(llama(x, w), np.float32),
        rtol=1e-2,
        atol=1e-2,
    )


def test_bad_normalized_dtype_is_refused():
    x = _data((2, 4), jnp.float32)
    with pytest.raises(TypeError, match="`normalized_dtype` must be a real floating-point dtype"):
        normjax.rms_norm(x, normalized_dtype=jnp.int8)
    with pytest.raises(TypeError, match="`normalized_dtype` must be a complex dtype"):
        normjax.layer_norm(x.astype(jnp.complex64), normalized_dtype=jnp.float32)
    with pytest.raises(TypeError, match="`normalized_dtype` must be a dtype"):
        normjax.normalize(x, 0.0, 1.0, normalized_dtype="llama")
