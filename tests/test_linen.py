"""normjax.linen against flax.linen's exact variant (use_fast_variance=False): variables, outputs, batch_stats.

Each case initializes both layers, checks the variable trees are identical in structure, shape and dtype, then
applies both with the *same* variables (the Flax ones) in training and evaluation and compares the outputs and
the updated running statistics. Outputs match Flax's bit for bit in float32; the bounds below are
``reference.tolerance`` of the output dtype.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

from normjax import linen as njn

KEY = jax.random.key(0)


def _input(shape, dtype, offset=1.0, seed=0):
    x = np.random.default_rng(seed).normal(offset, 2.0, shape).astype(np.float32)
    return jnp.asarray(x).astype(dtype)  # NumPy randomness: no compilation per shape


def _mask(shape, seed=1):
    mask = np.random.default_rng(seed).random(shape) < 0.6
    mask[0] = True  # every feature and every example sees at least one valid element
    mask[(slice(None),) + (0,) * (len(shape) - 1)] = True
    return jnp.asarray(mask)


def _nan_where_masked(x, mask):
    return x if mask is None else jnp.where(mask, x, jnp.nan)


def _assert_same_tree(got, want):
    """Identical structure, shapes and dtypes."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert (g.shape, g.dtype) == (w.shape, w.dtype)


def _assert_close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = reference.tolerance(jnp.finfo(want.dtype).dtype if jnp.iscomplexobj(want) else want.dtype)
    # Where Flax's output is NaN (NaN padding at masked-out positions), normjax selects the padding away and outputs
    # the bias instead: compare where Flax's output is finite.
    got, want = np.asarray(got, np.complex128), np.asarray(want, np.complex128)
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], **tol)


def _perturbed(variables, seed=3):
    """Non-trivial params and running statistics, so the affine and the eval path are really exercised."""
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        noise = rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        name = jax.tree_util.keystr(path)
        shifted = noise - 1.0 if "bias" in name or "mean" in name else noise
        return jnp.asarray(shifted).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(perturb, variables)


def _compare_stateless(flax_layer, nj_layer, x, mask):
    variables = flax_layer.init(KEY, x)
    _assert_same_tree(nj_layer.init(KEY, x), variables)
    variables = _perturbed(variables)
    x = _nan_where_masked(x, mask)
    _assert_close(nj_layer.apply(variables, x, mask=mask), flax_layer.apply(variables, x, mask=mask))


DTYPES = [  # (input dtype, param_dtype, layer dtype)
    (jnp.float32, jnp.float32, None),
    (jnp.bfloat16, jnp.float32, None),
    (jnp.float32, jnp.bfloat16, jnp.bfloat16),
]


def _grid(axes_options):
    """(dtypes, axes, masked): every dtype configuration and axes unmasked, and masks (NaN at masked positions)
    with float32 for every axes option. Kept small: eager Flax compiles anew for each case."""
    cases = [(*dtypes, axes, False) for dtypes in DTYPES for axes in axes_options]
    return cases + [(*DTYPES[0], axes, True) for axes in axes_options]


@pytest.mark.parametrize("x_dtype, param_dtype, dtype, axis, masked", _grid([-1, 1, (1, 2)]))
def test_batch_norm_matches_flax(x_dtype, param_dtype, dtype, axis, masked):
    shape = (4, 3, 5)
    config = dict(axis=axis, momentum=0.8, epsilon=1e-3, dtype=dtype, param_dtype=param_dtype)
    flax_bn = nn.BatchNorm(use_fast_variance=False, **config)
    nj_bn = njn.BatchNorm(**config)
    x = _input(shape, x_dtype)
    mask = _mask(shape) if masked else None

    variables = flax_bn.init(KEY, x, use_running_average=False)
    _assert_same_tree(nj_bn.init(KEY, x, use_running_average=False), variables)
    variables = _perturbed(variables)
    x = _nan_where_masked(x, mask)

    train = dict(use_running_average=False, mask=mask, mutable=["batch_stats"])
    y_nj, stats_nj = nj_bn.apply(variables, x, **train)
    y_flax, stats_flax = flax_bn.apply(variables, x, **train)
    _assert_close(y_nj, y_flax)
    _assert_same_tree(stats_nj, stats_flax)
    jax.tree.map(_assert_close, stats_nj, stats_flax)

    trained = {"params": variables["params"], **stats_flax}
    _assert_close(
        nj_bn.apply(trained, x, use_running_average=True), flax_bn.apply(trained, x, use_running_average=True)
    )


@pytest.mark.parametrize("x_dtype, param_dtype, dtype, axes, masked", _grid([(-1, -1), ((1, 2), -1), (-1, (-2, -1))]))
def test_layer_norm_and_rms_norm_match_flax(x_dtype, param_dtype, dtype, axes, masked):
    reduction_axes, feature_axes = axes
    config = dict(
        reduction_axes=reduction_axes, feature_axes=feature_axes, dtype=dtype, param_dtype=param_dtype, epsilon=1e-4
    )
    x = _input((4, 3, 5), x_dtype, offset=3.0)
    mask = _mask(x.shape) if masked else None
    _compare_stateless(nn.LayerNorm(use_fast_variance=False, **config), njn.LayerNorm(**config), x, mask)
    _compare_stateless(nn.RMSNorm(use_fast_variance=False, **config), njn.RMSNorm(**config), x, mask)


@pytest.mark.parametrize(
    "x_dtype, param_dtype, dtype, grouping, masked",
    _grid([(dict(num_groups=3), None), (dict(num_groups=None, group_size=1), None), (dict(num_groups=1), (2, 3))]),
)
def test_group_norm_matches_flax(x_dtype, param_dtype, dtype, grouping, masked):
    groups, reduction_axes = grouping
    config = dict(reduction_axes=reduction_axes, dtype=dtype, param_dtype=param_dtype, epsilon=1e-4, **groups)
    x = _input((2, 3, 4, 6), x_dtype)
    mask = _mask(x.shape) if masked else None
    _compare_stateless(nn.GroupNorm(use_fast_variance=False, **config), njn.GroupNorm(**config), x, mask)


@pytest.mark.parametrize("x_dtype, param_dtype, dtype, feature_axes, masked", _grid([-1, 1, (2, 3)]))
def test_instance_norm_matches_flax(x_dtype, param_dtype, dtype, feature_axes, masked):
    config = dict(feature_axes=feature_axes, dtype=dtype, param_dtype=param_dtype, epsilon=1e-4)
    x = _input((2, 3, 4, 6), x_dtype)
    mask = _mask(x.shape) if masked else None
    _compare_stateless(nn.InstanceNorm(use_fast_variance=False, **config), njn.InstanceNorm(**config), x, mask)


@pytest.mark.parametrize("use_bias, use_scale", [(False, True), (True, False), (False, False)])
def test_optional_affine_matches_flax(use_bias, use_scale):
    x = _input((8, 3), jnp.bfloat16)
    flags = dict(use_bias=use_bias, use_scale=use_scale)
    _compare_stateless(nn.LayerNorm(use_fast_variance=False, **flags), njn.LayerNorm(**flags), x, None)
    flax_bn, nj_bn = nn.BatchNorm(use_fast_variance=False, **flags), njn.BatchNorm(**flags)
    variables = flax_bn.init(KEY, x, use_running_average=False)
    _assert_same_tree(nj_bn.init(KEY, x, use_running_average=False), variables)
    _assert_close(
        nj_bn.apply(variables, x, False, mutable=True)[0], flax_bn.apply(variables, x, False, mutable=True)[0]
    )


def test_complex_batch_norm_matches_flax():
    """Flax normalizes complex inputs with the variance of |x|; its running mean becomes complex, as ours."""
    x = jnp.asarray(_input((8, 3), jnp.float32) + 1j * _input((8, 3), jnp.float32, seed=1) - 1j)
    flax_bn, nj_bn = nn.BatchNorm(use_fast_variance=False, momentum=0.5), njn.BatchNorm(momentum=0.5)
    variables = _perturbed(flax_bn.init(KEY, x, use_running_average=False))
    y_nj, stats_nj = nj_bn.apply(variables, x, False, mutable=["batch_stats"])
    y_flax, stats_flax = flax_bn.apply(variables, x, False, mutable=["batch_stats"])
    _assert_close(y_nj, y_flax)
    assert stats_nj["batch_stats"]["mean"].dtype == jnp.complex64
    assert stats_nj["batch_stats"]["var"].dtype == jnp.float32
    jax.tree.map(_assert_close, stats_nj, stats_flax)
    trained = {"params": variables["params"], **stats_flax}
    _assert_close(nj_bn.apply(trained, x, True), flax_bn.apply(trained, x, True))
    _assert_close(njn.LayerNorm().apply({"params": variables["params"]}, x), nn.LayerNorm().apply(variables, x))


def test_large_offset_is_exact_where_flax_fast_variance_is_not():
    """The default Flax variance E[x^2] - E[x]^2 cancels for a large mean; normjax matches float64 there."""
    x = _input((64, 4), jnp.float32, offset=1e4, seed=5)
    want_y, want_mean, want_var, _ = reference.batch_norm_train(np.asarray(x), epsilon=1e-5)
    variables = njn.BatchNorm().init(KEY, x, use_running_average=False)
    y, stats = njn.BatchNorm(momentum=0.0).apply(variables, x, False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, want_y, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(stats["batch_stats"]["var"], want_var, rtol=1e-4)
    y_fast, _ = nn.BatchNorm(momentum=0.0).apply(variables, x, False, mutable=["batch_stats"])
    assert np.max(np.abs(np.asarray(y_fast) - want_y)) > 1e-2  # the failure normjax fixes, kept visible


def test_init_with_a_batch_of_one_and_an_unbound_axis_name():
    """`model.init(key, x)` in training mode: one example, and no mapped axis bound (Flax skips the sync too)."""
    x = _input((1, 4), jnp.float32)
    for layer in (
        njn.BatchNorm(use_running_average=False, axis_name="batch", axis_index_groups=[[0, 1]]),
        njn.BatchNorm(use_running_average=False, virtual_batch_size=4, renorm_clipping=(3.0, 5.0)),
        njn.LayerNorm(axis_name="batch"),
        njn.RMSNorm(axis_name="batch"),
        njn.GroupNorm(num_groups=2, axis_name="batch"),
        njn.InstanceNorm(axis_name="batch"),
    ):
        variables = layer.init(KEY, x)
        assert jax.tree.leaves(variables)
    stats = njn.BatchNorm(use_running_average=False).init(KEY, x)["batch_stats"]
    np.testing.assert_array_equal(stats["mean"], 0.0)  # init does not update the running statistics
    np.testing.assert_array_equal(stats["var"], 1.0)
    with pytest.raises(ValueError, match="one value per feature"):
        njn.BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])


def test_use_running_average_given_twice_or_never_is_refused_as_in_flax():
    x = _input((8, 3), jnp.float32)
    variables = njn.BatchNorm().init(KEY, x, use_running_average=True)
    with pytest.raises(ValueError, match="use_running_average"):
        njn.BatchNorm().apply(variables, x)
    with pytest.raises(ValueError, match="use_running_average"):
        njn.BatchNorm(use_running_average=True).apply(variables, x, use_running_average=False)


def test_group_norm_errors_name_the_argument():
    x = _input((2, 6), jnp.float32)
    with pytest.raises(ValueError, match="num_groups=None"):
        njn.GroupNorm(group_size=2).init(KEY, x)
    with pytest.raises(ValueError, match="does not divide"):
        njn.GroupNorm(num_groups=4).init(KEY, x)
    with pytest.raises(ValueError, match="must include the last axis"):
        njn.GroupNorm(num_groups=2, reduction_axes=0).init(KEY, x)
    with pytest.raises(ValueError, match="batch axis"):
        njn.InstanceNorm(feature_axes=(0, 1)).init(KEY, x)


# normjax's options beyond Flax's, each passed by the layer to the core.

TRAIN = dict(use_running_average=False, mutable=["batch_stats"])


def _batch_norm_variables(x):
    return njn.BatchNorm().init(KEY, x, use_running_average=False)


def test_unbiased_running_var_reaches_the_core():
    x = _input((8, 3), jnp.float32)
    variables = _batch_norm_variables(x)
    _, biased = njn.BatchNorm(momentum=0.0).apply(variables, x, **TRAIN)
    _, unbiased = njn.BatchNorm(momentum=0.0, unbiased_running_var=True).apply(variables, x, **TRAIN)
    np.testing.assert_allclose(unbiased["batch_stats"]["var"], biased["batch_stats"]["var"] * 8 / 7, rtol=1e-6)


def test_virtual_batch_size_reaches_the_core():
    x = _input((8, 3), jnp.float32)
    y_ghost, _ = njn.BatchNorm(virtual_batch_size=4).apply(_batch_norm_variables(x), x, **TRAIN)
    halves = [reference.batch_norm_train(np.asarray(x[i : i + 4]))[0] for i in (0, 4)]
    np.testing.assert_allclose(y_ghost, np.concatenate(halves), rtol=1e-5, atol=1e-5)


def test_a_float_mask_acts_as_the_boolean_mask():
    x = _input((8, 3), jnp.float32)
    variables = _batch_norm_variables(x)
    mask = jnp.arange(8)[:, None] < 5
    y_bool, _ = njn.BatchNorm().apply(variables, x, mask=mask, **TRAIN)
    y_float, _ = njn.BatchNorm().apply(variables, x, mask=mask.astype(jnp.float32), **TRAIN)
    np.testing.assert_array_equal(y_float, y_bool)  # Flax accepts 0/1 masks of any dtype; so do the layers


def test_skip_nonfinite_reaches_the_core():
    x = _input((8, 3), jnp.float32)
    nan_batch = x.at[0, 1].set(jnp.nan)
    _, kept = njn.BatchNorm().apply(_batch_norm_variables(x), nan_batch, **TRAIN)
    np.testing.assert_array_equal(kept["batch_stats"]["var"][1], 1.0)  # skip_nonfinite keeps the old value


def test_renorm_clipping_reaches_the_core():
    x = _input((8, 3), jnp.float32)
    params = _batch_norm_variables(x)["params"]
    running = {"params": params, "batch_stats": {"mean": jnp.zeros(3), "var": jnp.full(3, 4.0)}}
    y_renorm, _ = njn.BatchNorm(renorm_clipping=(1.0, 0.0)).apply(running, x, **TRAIN)
    y_plain, _ = njn.BatchNorm().apply(running, x, **TRAIN)
    np.testing.assert_allclose(y_renorm, y_plain, rtol=1e-6, atol=1e-6)  # r_max=1, d_max=0 is plain BatchNorm


def _vmapped(layer_cls, variable_axes, **config):
    return nn.vmap(
        layer_cls,
        variable_axes=variable_axes,
        split_rngs={"params": False},
        in_axes=0,
        out_axes=0,
        axis_name="batch",
    )(axis_name="batch", **config)


@pytest.mark.parametrize(
    "name, config",
    [
        ("BatchNorm", dict(use_running_average=False, momentum=0.7)),
        ("LayerNorm", dict(reduction_axes=-1)),
        ("RMSNorm", dict(reduction_axes=-1)),
        ("GroupNorm", dict(num_groups=2, reduction_axes=-1)),
        ("InstanceNorm", dict(feature_axes=-1)),
    ],
)
def test_synchronized_under_nn_vmap_matches_flax(name, config):
    """Per-example inputs under nn.vmap(axis_name=...): statistics across the mapped axis, as Flax's
    (equal counts per example, so Flax's mean of means is exact too)."""
    flax_config = dict(config, use_fast_variance=False)
    x = _input((6, 4, 4), jnp.float32, offset=2.0)
    variable_axes = {"params": None, "batch_stats": None}
    nj = _vmapped(getattr(njn, name), variable_axes, **config)
    flax = _vmapped(getattr(nn, name), variable_axes, **flax_config)
    variables = flax.init(KEY, x)
    _assert_same_tree(nj.init(KEY, x), variables)
    variables = _perturbed(variables)
    y_nj, state_nj = nj.apply(variables, x, mutable=["batch_stats"])
    y_flax, state_flax = flax.apply(variables, x, mutable=["batch_stats"])
    _assert_close(y_nj, y_flax)
    jax.tree.map(_assert_close, state_nj, state_flax)


def test_jit_and_grad_through_a_model():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = njn.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))
            return njn.LayerNorm()(nn.relu(x)).sum()

    x = _input((8, 3), jnp.float32)
    variables = Net().init(KEY, x, train=True)

    @jax.jit
    def loss(params, x):
        out, state = Net().apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return out, state

    grads, state = jax.grad(loss, has_aux=True)(variables["params"], x)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert not np.allclose(state["batch_stats"]["BatchNorm_0"]["mean"], 0.0)


def test_integer_inputs_are_promoted_as_in_flax():
    x = jnp.arange(24).reshape(4, 6)
    # Every layer widens its input through the same flax_conventions.widen; two layers cover it.
    for name, config in [("BatchNorm", dict(use_running_average=False)), ("LayerNorm", {})]:
        flax_layer, nj_layer = getattr(nn, name)(use_fast_variance=False, **config), getattr(njn, name)(**config)
        variables = flax_layer.init(KEY, x)
        _assert_close(nj_layer.apply(variables, x, mutable=True)[0], flax_layer.apply(variables, x, mutable=True)[0])


@pytest.mark.parametrize("name", njn.__all__)
def test_attributes_extend_flax_in_order_with_the_same_defaults(name):
    """Drop-in: Flax's attributes come first, in Flax's order and with Flax's defaults; normjax's follow."""
    ours = [(f.name, f.default) for f in dataclasses.fields(getattr(njn, name)) if f.name not in ("parent", "name")]
    flax = [(f.name, f.default) for f in dataclasses.fields(getattr(nn, name)) if f.name not in ("parent", "name")]
    assert ours[: len(flax)] == flax
