"""normjax.nnx against flax.nnx's exact variant (use_fast_variance=False), and against normjax.linen.

Both layers are built with the same ``rngs``; the state of the Flax layer is perturbed and copied into the
normjax one with ``nnx.update``, so the comparison covers the affine and the running statistics. The normjax
layer gets Flax's ``promote_dtype`` hook in these comparisons; its own default (which never rounds the input to a
narrower ``dtype``, like linen) is tested against linen and the float64 reference at the end. Tolerances
are ``reference.tolerance`` of the output dtype (with ``dtype=bfloat16`` Flax evaluates in bfloat16
arithmetic where normjax uses float32, a difference of about one bfloat16 ulp).
"""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx
from flax.nnx.nn import dtypes

from normjax import linen as njn
from normjax import nnx as njx
from normjax._src.flax_conventions import promote_exactly

DTYPES = [  # (input dtype, param_dtype, layer dtype)
    (jnp.float32, jnp.float32, None),
    (jnp.bfloat16, jnp.float32, None),
    (jnp.float32, jnp.bfloat16, jnp.bfloat16),
]


def _grid(options):
    """Every dtype configuration unmasked; a mask (NaN where masked) with float32 for the first option (masks
    across all axes options are covered by test_linen: both front ends share flax_conventions)."""
    return [(*d, o, False) for d in DTYPES for o in options] + [(*DTYPES[0], options[0], True)]


def _input(shape, dtype, offset=1.0, seed=0):
    x = np.random.default_rng(seed).normal(offset, 2.0, shape).astype(np.float32)
    return jnp.asarray(x).astype(dtype)  # NumPy randomness: no compilation per shape


def _mask(shape, seed=1):
    mask = np.random.default_rng(seed).random(shape) < 0.6
    mask[0] = True
    mask[(slice(None),) + (0,) * (len(shape) - 1)] = True
    return jnp.asarray(mask)


def _assert_close(got, want, tol=None):
    got, want = jnp.asarray(got), jnp.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = tol or reference.tolerance(jnp.finfo(want.dtype).dtype if jnp.iscomplexobj(want) else want.dtype)
    # Where Flax's output is NaN (NaN padding at masked-out positions), normjax selects the padding away and outputs
    # the bias instead: compare where Flax's output is finite.
    got, want = np.asarray(got, np.complex128), np.asarray(want, np.complex128)
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], **tol)


def _assert_same_state(got, want):
    """Same variables: names, nnx types, shapes and dtypes."""
    got, want = nnx.to_flat_state(nnx.state(got)), nnx.to_flat_state(nnx.state(want))
    assert [path for path, _ in got] == [path for path, _ in want]
    for (_, g), (_, w) in zip(got, want, strict=True):
        assert type(g) is type(w)
        assert (g[...].shape, g[...].dtype) == (w[...].shape, w[...].dtype)


def _perturb(model, seed=3):
    """Gives every variable of `model` a non-trivial value (in place)."""
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        noise = rng.uniform(0.5, 1.5, variable[...].shape).astype(np.float32)
        centered = path[-1] in ("bias", "mean")
        variable[...] = jnp.asarray(noise - 1.0 if centered else noise).astype(variable[...].dtype)


def _pair(name, *args, **config):
    """(flax layer, normjax layer) with identical state and, unless given, Flax's default ``promote_dtype``."""
    flax_layer = getattr(nnx, name)(*args, use_fast_variance=False, rngs=nnx.Rngs(0), **config)
    config.setdefault("promote_dtype", dtypes.promote_dtype)
    nj_layer = getattr(njx, name)(*args, rngs=nnx.Rngs(0), **config)
    _assert_same_state(nj_layer, flax_layer)
    _perturb(flax_layer)
    nnx.update(nj_layer, nnx.state(flax_layer))
    return flax_layer, nj_layer


def _nan_where_masked(x, mask):
    return x if mask is None else jnp.where(mask, x, jnp.nan)


@pytest.mark.parametrize("x_dtype, param_dtype, dtype, axis, masked", _grid([-1, 1]))
def test_batch_norm_matches_flax(x_dtype, param_dtype, dtype, axis, masked):
    x = _input((4, 3, 5), x_dtype)
    features = x.shape[axis]
    flax_bn, nj_bn = _pair("BatchNorm", features, axis=axis, momentum=0.8, param_dtype=param_dtype, dtype=dtype)
    mask = _mask(x.shape) if masked else None
    x = _nan_where_masked(x, mask)
    _assert_close(nj_bn(x, mask=mask), flax_bn(x, mask=mask))
    _assert_close(nj_bn.mean[...], flax_bn.mean[...])
    _assert_close(nj_bn.var[...], flax_bn.var[...])
    _assert_same_state(nj_bn, flax_bn)
    flax_bn.eval()
    nj_bn.eval()
    assert nj_bn.use_running_average is True
    if dtype != jnp.bfloat16:
        _assert_close(nj_bn(x), flax_bn(x))
        return
    # promote_dtype rounds the statistics and affine to bfloat16, then Flax evaluates in bfloat16 arithmetic
    # (two roundings apart from normjax's float32 ones) while normjax matches the float64 reference.
    _assert_close(nj_bn(x), flax_bn(x), tol=dict(rtol=2**-6, atol=2**-6))
    rounded = [np.asarray(jnp.asarray(v[...], jnp.bfloat16), np.float64) for v in (x, *_bn_variables(nj_bn))]
    want = reference.batch_norm_eval(*rounded, axis=axis, epsilon=nj_bn.epsilon)
    _assert_close(nj_bn(x), jnp.asarray(want, jnp.bfloat16))


def _bn_variables(bn):
    return bn.mean, bn.var, bn.scale, bn.bias


@pytest.mark.parametrize("x_dtype, param_dtype, dtype, reduction_axes, masked", _grid([-1, (1, 2)]))
def test_layer_norm_and_rms_norm_match_flax(x_dtype, param_dtype, dtype, reduction_axes, masked):
    x = _input((4, 3, 5), x_dtype, offset=3.0)
    mask = _mask(x.shape) if masked else None
    x = _nan_where_masked(x, mask)
    config = dict(reduction_axes=reduction_axes, param_dtype=param_dtype, dtype=dtype, epsilon=1e-4)
    for name in ("LayerNorm", "RMSNorm"):
        flax_layer, nj_layer = _pair(name, 5, **config)
        _assert_close(nj_layer(x, mask=mask), flax_layer(x, mask=mask))


@pytest.mark.parametrize(
    "x_dtype, param_dtype, dtype, groups, masked", _grid([dict(num_groups=3), dict(num_groups=None, group_size=1)])
)
def test_group_norm_matches_flax(x_dtype, param_dtype, dtype, groups, masked):
    x = _input((2, 3, 4, 6), x_dtype)
    mask = _mask(x.shape) if masked else None
    x = _nan_where_masked(x, mask)
    flax_gn, nj_gn = _pair("GroupNorm", 6, param_dtype=param_dtype, dtype=dtype, epsilon=1e-4, **groups)
    assert (nj_gn.num_groups, nj_gn.group_size) == (flax_gn.num_groups, flax_gn.group_size)
    _assert_close(nj_gn(x, mask=mask), flax_gn(x, mask=mask))


@pytest.mark.parametrize("x_dtype, param_dtype, dtype, feature_axes, masked", _grid([-1, 1]))
def test_instance_norm_matches_flax(x_dtype, param_dtype, dtype, feature_axes, masked):
    x = _input((2, 3, 4, 6), x_dtype)
    mask = _mask(x.shape) if masked else None
    x = _nan_where_masked(x, mask)
    config = dict(feature_axes=feature_axes, param_dtype=param_dtype, dtype=dtype, epsilon=1e-4)
    flax_in, nj_in = _pair("InstanceNorm", x.shape[feature_axes], **config)
    _assert_close(nj_in(x, mask=mask), flax_in(x, mask=mask))


def test_optional_affine_matches_flax():
    x = _input((8, 4, 3), jnp.float32)  # spatial axis: InstanceNorm and one-channel groups need more than one value
    cases = [
        ("BatchNorm", dict(use_bias=False)),
        ("LayerNorm", dict(use_scale=False)),
        ("GroupNorm", dict(num_groups=3, use_bias=False, use_scale=False)),
        ("InstanceNorm", dict(use_bias=False)),
        ("RMSNorm", dict(use_scale=False)),
    ]
    for name, config in cases:
        flax_layer, nj_layer = _pair(name, 3, **config)
        _assert_close(nj_layer(x), flax_layer(x))


def test_promote_dtype_hook_is_applied_as_in_flax():
    """A custom promote_dtype (here: everything to bfloat16) sees the same arguments and has the same effect."""
    seen = []

    def to_bfloat16(args, *, dtype=None):
        seen.append(len(args))
        return tuple(None if a is None else jnp.asarray(a, jnp.bfloat16) for a in args)

    x = _input((8, 4, 3), jnp.float32, offset=2.0)
    for name in ("BatchNorm", "LayerNorm", "RMSNorm", "InstanceNorm"):
        seen.clear()
        flax_layer, nj_layer = _pair(name, 3, promote_dtype=to_bfloat16)
        want = flax_layer(x)
        flax_calls = list(seen)
        got = nj_layer(x)
        assert seen[len(flax_calls) :] == flax_calls  # same number of calls with the same arguments
        assert got.dtype == jnp.bfloat16
        _assert_close(got, want)


def test_complex_batch_norm_matches_flax_linen():
    """Flax nnx drops the imaginary part of the running mean (with a FutureWarning); normjax keeps it, like
    Flax linen, whose outputs and statistics it matches."""
    x = _input((8, 3), jnp.float32) + 1j * _input((8, 3), jnp.float32, seed=1) - 1j
    bn = njx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
    flax_linen = nn.BatchNorm(use_fast_variance=False, momentum=0.5)
    variables = flax_linen.init(jax.random.key(0), x, use_running_average=False)
    y_flax, stats = flax_linen.apply(variables, x, False, mutable=["batch_stats"])
    _assert_close(bn(x), y_flax)
    assert bn.mean[...].dtype == jnp.complex64 and bn.var[...].dtype == jnp.float32
    _assert_close(bn.mean[...], stats["batch_stats"]["mean"])
    _assert_close(bn.var[...], stats["batch_stats"]["var"])
    bn.eval()
    _assert_close(bn(x), flax_linen.apply({**variables, **stats}, x, True))


@pytest.mark.parametrize(
    "name, args, config",
    [
        ("BatchNorm", (4,), dict(momentum=0.7)),
        ("LayerNorm", (4,), {}),
        ("RMSNorm", (4,), {}),
    ],
)
def test_synchronized_under_nnx_vmap_matches_flax(name, args, config):
    """Per-example inputs under nnx.vmap(axis_name=...) with the layer broadcast; equal counts per example."""
    flax_layer, nj_layer = _pair(name, *args, axis_name="batch", **config)

    @nnx.vmap(in_axes=(None, 0), out_axes=0, axis_name="batch")
    def apply(layer, x):
        return layer(x)

    x = _input((6, 4), jnp.float32, offset=2.0)
    _assert_close(apply(nj_layer, x), apply(flax_layer, x))
    for (_, got), (_, want) in zip(
        nnx.to_flat_state(nnx.state(nj_layer)), nnx.to_flat_state(nnx.state(flax_layer)), strict=True
    ):
        _assert_close(got[...], want[...])


def test_group_norm_synchronized_under_nnx_vmap():
    """Flax nnx's GroupNorm fails under vmap (it repeats the statistics along axis 1, absent for one example);
    normjax's equals Flax linen's GroupNorm over the whole batch (the mapped axis joins the statistics)."""
    layer = njx.GroupNorm(4, num_groups=2, reduction_axes=-1, axis_name="batch", rngs=nnx.Rngs(0))
    _perturb(layer)
    x = _input((6, 4), jnp.float32, offset=2.0)
    y = nnx.vmap(lambda layer, x: layer(x), in_axes=(None, 0), out_axes=0, axis_name="batch")(layer, x)
    params = {"params": {k: v[...] for k, v in nnx.state(layer, nnx.Param).items()}}
    whole_batch = nn.GroupNorm(num_groups=2, reduction_axes=(0, 1), use_fast_variance=False)
    _assert_close(y, whole_batch.apply(params, x))


@pytest.mark.parametrize(
    "name, args, config",
    [
        ("BatchNorm", (5,), dict(momentum=0.8)),
        ("LayerNorm", (5,), dict(reduction_axes=(1, 2))),
        ("RMSNorm", (5,), {}),
        ("GroupNorm", (5,), dict(num_groups=None, group_size=1)),
        ("InstanceNorm", (5,), {}),
    ],
)
@pytest.mark.parametrize(
    "x_dtype, dtype_config",
    [(jnp.bfloat16, {}), (jnp.float32, dict(dtype=jnp.float16, param_dtype=jnp.bfloat16))],
    ids=["promoted", "narrowed"],
)
def test_nnx_and_linen_agree(name, args, config, x_dtype, dtype_config):
    """One core behind both front ends: the same variables give the same outputs and running statistics, also
    when ``dtype`` is narrower than the input (the nnx default ``promote_dtype`` does not round it first)."""
    x = _input((4, 3, 5), x_dtype, offset=2.0)
    mask = _mask(x.shape)
    config = {**config, **dtype_config}
    layer = getattr(njx, name)(*args, rngs=nnx.Rngs(0), **config)
    _perturb(layer)
    variables = {"params": {k: v[...] for k, v in nnx.state(layer, nnx.Param).items()}}
    linen_layer = getattr(njn, name)(**config)
    if name == "BatchNorm":
        variables["batch_stats"] = {k: v[...] for k, v in nnx.state(layer, nnx.BatchStat).items()}
        y_linen, stats = linen_layer.apply(variables, x, False, mask=mask, mutable=["batch_stats"])
        np.testing.assert_array_equal(layer(x, mask=mask), y_linen)
        np.testing.assert_array_equal(layer.mean[...], stats["batch_stats"]["mean"])
        np.testing.assert_array_equal(layer.var[...], stats["batch_stats"]["var"])
        np.testing.assert_array_equal(layer(x, True), linen_layer.apply({**variables, **stats}, x, True))
    else:
        np.testing.assert_array_equal(layer(x, mask=mask), linen_layer.apply(variables, x, mask=mask))


class _Block(nnx.Module):
    def __init__(self, norm_module, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn = norm_module.BatchNorm(4, rngs=rngs)
        self.ln = norm_module.LayerNorm(4, rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.ln(nnx.relu(self.bn(self.linear(x)))))


def test_drop_in_model_train_eval_view_jit_grad():
    """Swapping the import keeps everything: the rngs draws (so every parameter), .train()/.eval(), nnx.view,
    and a jitted training step with the same loss, gradients and running statistics as Flax's."""
    nj_model, flax_model = _Block(njx, nnx.Rngs(0)), _Block(nnx, nnx.Rngs(0))
    for (_, got), (_, want) in zip(
        nnx.to_flat_state(nnx.state(nj_model)), nnx.to_flat_state(nnx.state(flax_model)), strict=True
    ):
        np.testing.assert_array_equal(got[...], want[...])
    flax_model.bn.use_fast_variance = False
    flax_model.ln.use_fast_variance = False

    @nnx.jit
    def step(model, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        return loss, grads

    x = _input((8, 3), jnp.float32)
    (loss_nj, grads_nj), (loss_flax, grads_flax) = step(nj_model, x), step(flax_model, x)
    _assert_close(loss_nj, loss_flax)
    jax.tree.map(_assert_close, nnx.state(grads_nj), nnx.state(grads_flax))
    _assert_close(nj_model.bn.mean[...], flax_model.bn.mean[...])

    eval_view = nnx.view(nj_model, use_running_average=True)
    assert eval_view.bn.use_running_average is True and nj_model.bn.use_running_average is False
    nj_model.eval()
    flax_model.eval()
    assert nj_model.bn.use_running_average is True
    _assert_close(nj_model(x), flax_model(x))
    _assert_close(eval_view(x), flax_model(x))
    nj_model.train()
    assert nj_model.bn.use_running_average is False


def test_constructor_errors_are_flax_compatible_and_clear():
    with pytest.raises(ValueError, match="num_groups=None"):
        njx.GroupNorm(6, group_size=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="does not divide"):
        njx.GroupNorm(6, num_groups=4, rngs=nnx.Rngs(0))
    bn = njx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_running_average"):
        bn(jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="`num_features`=4"):
        njx.LayerNorm(4, rngs=nnx.Rngs(0))(jnp.ones((2, 3)))


@pytest.mark.parametrize("name", njx.__all__)
def test_constructor_extends_flax_in_order_with_the_same_defaults(name):
    """Drop-in: Flax's constructor parameters come first, in Flax's order, kinds and defaults; normjax's follow
    as keyword-only parameters."""
    ours = list(inspect.signature(getattr(njx, name).__init__).parameters.values())
    flax = list(inspect.signature(getattr(nnx, name).__init__).parameters.values())
    summary = lambda params: [(p.name, p.kind, p.default) for p in params]  # noqa: E731
    # The one deliberate difference: the default promote_dtype rounds once (see test_default_promotion_...).
    flax = [p.replace(default=promote_exactly) if p.name == "promote_dtype" else p for p in flax]
    assert summary(ours[: len(flax)]) == summary(flax)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(flax) :])


def _ulps(got, want):
    """|got - want| in units of the spacing of float16 at ``want`` (float64 reference)."""
    want = np.asarray(want, np.float64)
    return np.abs(np.asarray(got, np.float64) - want) / np.spacing(np.abs(want).astype(np.float16)).astype(np.float64)


def test_default_promotion_rounds_once_where_flax_hook_rounds_twice():
    """With ``dtype=float16`` and a float32 input, the default hook leaves the input float32 and the output is the
    float64 reference rounded once (within half an ulp, plus float32 noise); Flax's hook rounds the input first."""
    x = _input((64, 16), jnp.float32, offset=3.0)
    default = njx.LayerNorm(16, dtype=jnp.float16, rngs=nnx.Rngs(0))
    _perturb(default)
    flax_hook = njx.LayerNorm(16, dtype=jnp.float16, promote_dtype=dtypes.promote_dtype, rngs=nnx.Rngs(0))
    nnx.update(flax_hook, nnx.state(default))
    want = reference.layer_norm(x, default.scale[...], default.bias[...], epsilon=default.epsilon)
    assert default(x).dtype == flax_hook(x).dtype == jnp.float16
    assert _ulps(default(x), want).max() <= 0.5 + 2**-8
    assert _ulps(flax_hook(x), want).max() > 1.0  # the input's rounding, amplified by the normalization
