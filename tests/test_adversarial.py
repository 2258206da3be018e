"""Adversarial inputs for every public function, layer and utility: no silent wrong result.

Each bad argument raises an error naming the argument, what was expected, what was got and how to fix it; each
edge value (NaN, inf, huge, tiny, subnormal, zero-size) gives either the float64 answer or a documented outcome
(running statistics kept bit for bit); traced arguments behave like static ones or are refused by name; and the
same holds under jit, vmap, grad, pmap and shard_map. See ``docs/guides/errors.md``.
"""

from __future__ import annotations

import functools
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
import torch
from bitwise import bits
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import normjax as nj
from normjax import linen as njn
from normjax import nnx as njx

X = jnp.asarray(np.random.RandomState(0).randn(4, 6), jnp.float32)
IMG = jnp.asarray(np.random.RandomState(1).randn(2, 3, 4, 6), jnp.float32)
ST = nj.init_batch_norm_state(6)
# Every message gives a fix; these are the verbs it starts with.
FIX = re.compile(
    r"\b(pass|use|create|cast|choose|wrap|give|put|list each|mark it|train|typical|corresponds to|ramps|build|"
    r"convert|return|fix|check|keep|freeze|restore|make|normalize over|add)\b",
    re.I,
)


def assert_same_state(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(bits(g), bits(w))


def bn_train(x=X, **kwargs):
    return nj.batch_norm(x, kwargs.pop("state", ST), training=True, **kwargs)


def _linen_bn_apply(x, variables=None, **attributes):
    layer = njn.BatchNorm(use_running_average=False, **attributes)
    variables = variables or layer.init(jax.random.key(0), jnp.ones((4, 6)))
    return layer.apply(variables, x, mutable=["batch_stats"])


def _linen_bn_checkpoint_of_other_size():
    variables = njn.BatchNorm(use_running_average=False).init(jax.random.key(0), jnp.ones((4, 6)))
    variables = {**variables, "batch_stats": {"mean": jnp.zeros(5), "var": jnp.ones(5)}}
    return _linen_bn_apply(X, variables)


def _nnx_bn_with_restored_stats_of_other_size():
    layer = njx.BatchNorm(6, rngs=nnx.Rngs(0))
    layer.mean = nnx.BatchStat(jnp.zeros(5))
    return layer(X)


def _nnx_bn_inside_linen_freeze():
    layer = njx.BatchNorm(6, rngs=nnx.Rngs(0))
    with nj.freeze_batch_norm():
        return layer(X)


def _traced_flag(flag):
    return jax.jit(lambda value: bn_train(**{flag: value}))(True)


def _linen_apply_fn():
    model = nn.BatchNorm(use_running_average=False)
    variables = model.init(jax.random.key(0), jnp.ones((2, 1)))
    return model, variables, lambda v, b: model.apply(v, b, mutable=["batch_stats"])[1]["batch_stats"]


def _precise(**kwargs):
    model, variables, apply_fn = _linen_apply_fn()
    args = {"apply_fn": apply_fn, "variables": variables, "batches": [jnp.ones((2, 1))], **kwargs}
    return nj.precise_batch_stats(args.pop("apply_fn"), args.pop("variables"), args.pop("batches"), **args)


FOLD_VARIABLES = {
    "params": {"Dense_0": {"kernel": jnp.ones((1, 1))}, "bn": {"scale": jnp.ones(1), "bias": jnp.zeros(1)}},
    "batch_stats": {"bn": {"mean": jnp.zeros(1), "var": jnp.ones(1)}},
}
TORCH_BN = {
    "bn.weight": np.ones(2),
    "bn.bias": np.zeros(2),
    "bn.running_mean": np.zeros(2),
    "bn.running_var": np.ones(2),
}

# (id, thunk, exception, the argument the message must name)
CASES = [
    # ---- the input x
    ("x-torch-tensor", lambda: nj.layer_norm(torch.ones(4, 6)), TypeError, "x"),
    ("x-torch-tensor-bn", lambda: nj.batch_norm(torch.ones(4, 6), ST, training=True), TypeError, "x"),
    ("x-string", lambda: nj.rms_norm("abc"), TypeError, "x"),
    ("x-none", lambda: nj.moments(None, 0), TypeError, "x"),
    ("x-dict", lambda: nj.normalize({"a": X}, 0.0, 1.0), TypeError, "x"),
    ("x-torch-linen", lambda: _linen_bn_apply(torch.ones(4, 6)), TypeError, "x"),
    # ---- epsilon: against the statistics dtype; inf and booleans refused
    ("epsilon-1e-45", lambda: nj.layer_norm(jnp.ones((2, 3)), epsilon=1e-45), ValueError, "epsilon"),
    ("epsilon-subnormal-bn", lambda: bn_train(epsilon=1e-39), ValueError, "epsilon"),
    ("epsilon-bf16-input", lambda: nj.rms_norm(X.astype(jnp.bfloat16), epsilon=1e-40), ValueError, "epsilon"),
    ("epsilon-inf", lambda: nj.layer_norm(X, epsilon=float("inf")), ValueError, "epsilon"),
    ("epsilon-above-float32", lambda: nj.group_norm(IMG, num_groups=2, epsilon=1e39), ValueError, "epsilon"),
    ("epsilon-np-bool", lambda: nj.layer_norm(X, epsilon=np.bool_(True)), TypeError, "epsilon"),
    ("epsilon-bool", lambda: nj.instance_norm(IMG, epsilon=True), TypeError, "epsilon"),
    ("epsilon-complex", lambda: nj.normalize(X, 0.0, 1.0, epsilon=1e-5j), TypeError, "epsilon"),
    ("epsilon-string", lambda: bn_train(epsilon="1e-5"), TypeError, "epsilon"),
    (
        "epsilon-traced-vector",
        lambda: jax.jit(lambda e: nj.layer_norm(X, epsilon=e))(jnp.ones(6)),
        TypeError,
        "epsilon",
    ),
    ("epsilon-layer", lambda: _linen_bn_apply(X, epsilon=0.0), ValueError, "epsilon"),
    ("epsilon-nnx", lambda: njx.LayerNorm(6, epsilon=1e-45, rngs=nnx.Rngs(0))(X), ValueError, "epsilon"),
    (
        "epsilon-fold",
        lambda: nj.fold_batch_norm(jnp.ones((1, 1)), None, None, None, jnp.zeros(1), jnp.ones(1), epsilon=-1.0),
        ValueError,
        "epsilon",
    ),  # fmt: skip  # noqa: E501
    # ---- momentum
    ("momentum-np-bool", lambda: bn_train(momentum=np.bool_(False)), TypeError, "momentum"),
    ("momentum-traced-vector", lambda: jax.jit(lambda m: bn_train(momentum=m))(jnp.ones(6)), TypeError, "momentum"),
    ("momentum-layer", lambda: _linen_bn_apply(X, momentum=1.5), ValueError, "momentum"),
    # ---- degenerate normalizations
    ("layer-norm-no-axis", lambda: nj.layer_norm(X, reduction_axes=()), ValueError, "reduction_axes"),
    ("rms-norm-no-axis", lambda: nj.rms_norm(X, reduction_axes=()), ValueError, "reduction_axes"),
    ("instance-norm-no-spatial", lambda: nj.instance_norm(X), ValueError, "feature_axes"),
    ("instance-norm-one-pixel", lambda: nj.instance_norm(jnp.ones((2, 1, 1, 3))), ValueError, "feature_axes"),
    ("group-norm-one-value", lambda: nj.group_norm(X, group_size=1), ValueError, "num_groups"),
    (
        "layer-norm-linen-no-axis",
        lambda: njn.LayerNorm(reduction_axes=()).init(jax.random.key(0), X),
        ValueError,
        "reduction_axes",
    ),  # fmt: skip  # noqa: E501
    (
        "bn-vmap-batch-of-one",
        lambda: jax.vmap(lambda r: bn_train(r[None], axis_name="b"), axis_name="b")(X[:1]),
        ValueError,
        "allow_single_value",
    ),
    (
        "ln-vmap-no-axis-one-device",
        lambda: jax.vmap(lambda r: nj.layer_norm(r, reduction_axes=(), axis_name="b"), axis_name="b")(X[:1]),
        ValueError,
        "axis",
    ),
    # ---- complex parameters with a real output
    ("bn-complex-scale", lambda: bn_train(scale=jnp.full(6, 1j)), TypeError, "scale"),
    ("bn-eval-complex-bias", lambda: nj.batch_norm(X, ST, None, jnp.full(6, 1j), training=False), TypeError, "bias"),
    ("ln-complex-scale", lambda: nj.layer_norm(X, jnp.full(6, 1j)), TypeError, "scale"),
    ("gn-complex-bias", lambda: nj.group_norm(IMG, None, jnp.full(6, 1j), num_groups=2), TypeError, "bias"),
    ("normalize-complex-mean", lambda: nj.normalize(X, 1j, 1.0), TypeError, "mean"),
    ("normalize-complex-var", lambda: nj.normalize(X + 0j, 0.0, 1.0 + 1j), TypeError, "var"),
    # ---- normalize's moments and dtype
    ("normalize-mean-rank", lambda: nj.normalize(X, jnp.zeros((2, 4, 6)), 1.0), ValueError, "mean"),
    ("normalize-var-shape", lambda: nj.normalize(X, 0.0, jnp.ones((4, 5))), ValueError, "var"),
    ("normalize-mean-none", lambda: nj.normalize(X, None, 1.0), TypeError, "mean"),
    ("normalize-mean-string", lambda: nj.normalize(X, "a", 1.0), TypeError, "mean"),
    ("normalize-var-list", lambda: nj.normalize(X, 0.0, [1.0] * 6), TypeError, "var"),
    ("normalize-var-bool", lambda: nj.normalize(X, 0.0, jnp.ones(6, bool)), TypeError, "var"),
    ("normalize-int-dtype", lambda: nj.normalize(X, 0.0, 1.0, dtype=jnp.int32), TypeError, "dtype"),
    ("normalize-bad-dtype", lambda: nj.normalize(X, 0.0, 1.0, dtype="foo"), TypeError, "dtype"),
    # ---- init_batch_norm_state
    ("init-string", lambda: nj.init_batch_norm_state("12"), TypeError, "features"),
    ("init-bool", lambda: nj.init_batch_norm_state(True), TypeError, "features"),
    ("init-negative", lambda: nj.init_batch_norm_state(-1), ValueError, "features"),
    ("init-float", lambda: nj.init_batch_norm_state(2.0), TypeError, "features"),
    ("init-none", lambda: nj.init_batch_norm_state(None), TypeError, "features"),
    ("init-shape-of-floats", lambda: nj.init_batch_norm_state((2.0, 3)), TypeError, "features"),
    ("init-int-dtype", lambda: nj.init_batch_norm_state(6, jnp.int32), TypeError, "dtype"),
    ("init-bf16-dtype", lambda: nj.init_batch_norm_state(6, jnp.bfloat16), TypeError, "dtype"),
    ("init-bad-dtype", lambda: nj.init_batch_norm_state(6, "floaty"), TypeError, "dtype"),
    # ---- traced flags and static options
    *[
        (f"traced-{flag}", functools.partial(_traced_flag, flag), TypeError, flag)
        for flag in ("skip_nonfinite", "unbiased_running_var", "allow_single_value")
    ],  # fmt: skip
    ("traced-keepdims", lambda: jax.jit(lambda k: nj.moments(X, 0, keepdims=k))(True), TypeError, "keepdims"),
    ("traced-centered", lambda: jax.jit(lambda c: nj.moments(X, 0, centered=c))(True), TypeError, "centered"),
    ("flag-string", lambda: bn_train(skip_nonfinite="yes"), TypeError, "skip_nonfinite"),
    (
        "traced-use-running-average",
        lambda: jax.jit(lambda u: njn.BatchNorm().apply(njn.BatchNorm().init(jax.random.key(0), X, True), X, u))(True),
        TypeError,
        "use_running_average",
    ),
    (
        "traced-use-running-average-nnx",
        lambda: jax.jit(lambda u: njx.BatchNorm(6, rngs=nnx.Rngs(0))(X, use_running_average=u))(True),
        TypeError,
        "use_running_average",
    ),
    ("virtual-batch-size-float", lambda: bn_train(virtual_batch_size=2.0), TypeError, "virtual_batch_size"),
    ("virtual-batch-size-bool", lambda: bn_train(virtual_batch_size=True), TypeError, "virtual_batch_size"),
    ("renorm-inf", lambda: bn_train(renorm_clipping=(float("inf"), 1.0)), ValueError, "renorm_clipping"),
    ("renorm-triple", lambda: bn_train(renorm_clipping=(2.0, 1.0, 0.0)), ValueError, "renorm_clipping"),
    ("renorm-string", lambda: bn_train(renorm_clipping="3,5"), ValueError, "renorm_clipping"),
    (
        "renorm-with-ghost",
        lambda: bn_train(renorm_clipping=(2.0, 1.0), virtual_batch_size=2),
        ValueError,
        "renorm_clipping",
    ),  # fmt: skip  # noqa: E501
    # ---- axis_name
    ("axis-name-int", lambda: nj.layer_norm(X, axis_name=0), TypeError, "axis_name"),
    ("axis-name-dict", lambda: nj.layer_norm(X, axis_name={}), TypeError, "axis_name"),
    ("axis-name-none-inside", lambda: bn_train(axis_name=("b", None)), TypeError, "axis_name"),
    ("axis-name-sync", lambda: nj.sync_batch_stats({"mean": X}, axis_name=1.5), TypeError, "axis_name"),
    ("axis-name-linen", lambda: _linen_bn_apply(X, axis_name=0), TypeError, "axis_name"),
    # ---- layers: sizes named in the layers' terms
    ("linen-checkpoint-size", _linen_bn_checkpoint_of_other_size, ValueError, "batch_stats/mean"),
    ("nnx-restored-stats-size", _nnx_bn_with_restored_stats_of_other_size, ValueError, "num_features"),
    ("nnx-bn-num-features", lambda: njx.BatchNorm(5, rngs=nnx.Rngs(0))(X), ValueError, "num_features"),
    ("nnx-ln-num-features", lambda: njx.LayerNorm(5, rngs=nnx.Rngs(0))(X), ValueError, "num_features"),
    ("nnx-rms-num-features", lambda: njx.RMSNorm(7, rngs=nnx.Rngs(0))(X), ValueError, "num_features"),
    ("nnx-gn-num-features", lambda: njx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0))(IMG), ValueError, "num_features"),
    ("nnx-in-num-features", lambda: njx.InstanceNorm(4, rngs=nnx.Rngs(0))(IMG), ValueError, "num_features"),
    ("nnx-num-features-zero", lambda: njx.BatchNorm(0, rngs=nnx.Rngs(0)), TypeError, "num_features"),
    ("nnx-num-features-float", lambda: njx.LayerNorm(6.0, rngs=nnx.Rngs(0)), TypeError, "num_features"),
    ("nnx-num-features-string", lambda: njx.GroupNorm("6", rngs=nnx.Rngs(0)), TypeError, "num_features"),
    ("linen-int-dtype", lambda: njn.LayerNorm(dtype=jnp.int32).init(jax.random.key(0), X), TypeError, "dtype"),
    ("nnx-bn-in-linen-freeze", _nnx_bn_inside_linen_freeze, RuntimeError, "normjax.freeze_batch_norm()"),
    # ---- freeze and stop_gradient_where
    ("freeze-nnx-linen-model", lambda: nj.freeze_batch_norm_nnx(nn.BatchNorm()), TypeError, "model"),
    (
        "freeze-nnx-kinds-string",
        lambda: nj.freeze_batch_norm_nnx(njx.BatchNorm(2, rngs=nnx.Rngs(0)), kinds="BatchNorm"),
        TypeError,
        "kinds",
    ),  # fmt: skip  # noqa: E501
    (
        "freeze-nnx-where",
        lambda: nj.freeze_batch_norm_nnx(njx.BatchNorm(2, rngs=nnx.Rngs(0)), where="bn"),
        TypeError,
        "where",
    ),  # fmt: skip  # noqa: E501
    ("freeze-where", lambda: nj.freeze_batch_norm(where=("bn",)).__enter__(), TypeError, "where"),
    ("stop-gradient-structure", lambda: nj.stop_gradient_where({"a": 1.0, "b": 2.0}, {"a": True}), ValueError, "mask"),
    ("stop-gradient-string", lambda: nj.stop_gradient_where({"a": 1.0}, {"a": "yes"}), TypeError, "mask"),
    # ---- fold
    (
        "fold-missing-collection",
        lambda: nj.fold_batch_norm_variables({"params": FOLD_VARIABLES["params"]}, {"Dense_0": "bn"}),
        KeyError,
        "variables",
    ),  # fmt: skip  # noqa: E501
    ("fold-kernel-less", lambda: nj.fold_batch_norm_variables(FOLD_VARIABLES, {"bn": "bn"}), KeyError, "pairs"),
    ("fold-pairs-string", lambda: nj.fold_batch_norm_variables(FOLD_VARIABLES, "Dense_0"), TypeError, "pairs"),
    ("fold-pairs-short", lambda: nj.fold_batch_norm_variables(FOLD_VARIABLES, ["Dense_0"]), TypeError, "pairs"),
    (
        "fold-pairs-triple",
        lambda: nj.fold_batch_norm_variables(FOLD_VARIABLES, [("Dense_0", "bn", "x")]),
        TypeError,
        "pairs",
    ),  # fmt: skip  # noqa: E501
    (
        "fold-variables-list",
        lambda: nj.fold_batch_norm_variables([FOLD_VARIABLES], {"Dense_0": "bn"}),
        TypeError,
        "variables",
    ),  # fmt: skip  # noqa: E501
    (
        "fold-scalar-kernel",
        lambda: nj.fold_batch_norm(jnp.float32(1), None, None, None, jnp.zeros(1), jnp.ones(1)),
        ValueError,
        "kernel",
    ),  # fmt: skip  # noqa: E501
    (
        "fold-mean-none",
        lambda: nj.fold_batch_norm(jnp.ones((1, 1)), None, None, None, None, jnp.ones(1)),
        TypeError,
        "mean",
    ),  # fmt: skip  # noqa: E501
    (
        "fold-int-kernel",
        lambda: nj.fold_batch_norm(jnp.ones((1, 1), int), None, None, None, jnp.zeros(1), jnp.ones(1)),
        TypeError,
        "kernel",
    ),  # fmt: skip  # noqa: E501
    # ---- torch import
    ("torch-int-dtype", lambda: nj.norm_variables_from_torch(TORCH_BN, "bn", dtype=jnp.int32), TypeError, "dtype"),
    (
        "torch-complex-dtype",
        lambda: nj.norm_variables_from_torch(TORCH_BN, "bn", dtype=jnp.complex64),
        TypeError,
        "dtype",
    ),  # fmt: skip  # noqa: E501
    (
        "torch-lengths",
        lambda: nj.norm_variables_from_torch({**TORCH_BN, "bn.running_var": np.ones(3)}, "bn"),
        ValueError,
        "state_dict",
    ),  # fmt: skip  # noqa: E501
    ("torch-module", lambda: nj.norm_variables_from_torch(torch.nn.BatchNorm1d(2), ""), TypeError, "state_dict"),
    ("torch-list", lambda: nj.norm_variables_from_torch([1, 2], ""), TypeError, "state_dict"),
    ("torch-prefix-none", lambda: nj.norm_variables_from_torch(TORCH_BN, None), TypeError, "prefix"),
    ("torch-momentum-string", lambda: nj.momentum_from_torch("0.1"), TypeError, "torch_momentum"),
    ("torch-momentum-bool", lambda: nj.momentum_to_torch(True), TypeError, "flax_momentum"),
    ("torch-momentum-nan", lambda: nj.momentum_from_torch(float("nan")), ValueError, "torch_momentum"),
    # ---- optax masks and module discovery
    ("mask-pattern-invalid", lambda: nj.norm_params_mask({"a": {"scale": 1}}, pattern="("), ValueError, "pattern"),
    ("mask-pattern-not-str", lambda: nj.norm_params_mask({"a": {"scale": 1}}, pattern=3), TypeError, "pattern"),
    (
        "decay-biases-string",
        lambda: nj.weight_decay_mask({"a": {"bias": 1}}, decay_biases="no"),
        TypeError,
        "decay_biases",
    ),  # fmt: skip  # noqa: E501
    ("mask-modules-ints", lambda: nj.norm_params_mask({"a": {"scale": 1}}, modules=[1, 2]), TypeError, "modules"),
    (
        "find-kinds-string",
        lambda: nj.find_norm_modules(njx.BatchNorm(2, rngs=nnx.Rngs(0)), kinds="Norm"),
        TypeError,
        "kinds",
    ),  # fmt: skip  # noqa: E501
    # ---- precise_batch_stats
    ("precise-apply-fn", lambda: _precise(apply_fn="model"), TypeError, "apply_fn"),
    ("precise-variables", lambda: _precise(variables=[1]), ValueError, "variables"),
    ("precise-batches", lambda: _precise(batches=3), TypeError, "batches"),
    ("precise-batch-size", lambda: _precise(batch_size=lambda b: "two"), TypeError, "batch_size"),
    ("precise-batch-size-negative", lambda: _precise(batch_size=lambda b: -1), ValueError, "batch_size"),
    (
        "precise-apply-fn-structure",
        lambda: _precise(apply_fn=lambda v, b: _linen_apply_fn()[0].apply(v, b, mutable=["batch_stats"])[1]),
        ValueError,
        "apply_fn",
    ),
]


@pytest.mark.parametrize(("thunk", "error", "argument"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_is_refused_naming_it_and_the_fix(thunk, error, argument):
    with pytest.raises(error) as info:
        thunk()
    message = str(info.value)
    assert f"`{argument}" in message or f"'{argument}" in message or argument in message.split("`"), message
    assert FIX.search(message), f"the message gives no fix: {message}"


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------- valid inputs that used to be refused


def test_numpy_integer_virtual_batch_size_is_accepted():
    got = bn_train(virtual_batch_size=np.int64(2))
    want = bn_train(virtual_batch_size=2)
    np.testing.assert_array_equal(got[0], want[0])
    assert_same_state(got[1], want[1])


def test_array_wrappers_are_accepted_like_arrays():
    # nnx variables implement __jax_array__ and are passed as parameters directly.
    scale = nnx.Param(jnp.full(6, 2.0))
    np.testing.assert_array_equal(nj.layer_norm(X, scale), nj.layer_norm(X, jnp.full(6, 2.0)))


def test_traced_renorm_clipping_follows_a_schedule():
    """Batch Renormalization ramps r_max and d_max during training: traced bounds equal static ones."""
    state = nj.BatchNormState(jnp.full(6, 0.3), jnp.full(6, 0.5))
    step = jax.jit(lambda r, d: bn_train(state=state, renorm_clipping=(r, d), momentum=0.9))
    for r_max, d_max in ((1.0, 0.0), (1.5, 0.5), (3.0, 5.0)):
        y, new = step(r_max, d_max)
        want, *_ = reference.batch_renorm_train(
            np.asarray(X, np.float64), np.asarray(state.mean), np.asarray(state.var), r_max=r_max, d_max=d_max
        )
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
        static = bn_train(state=state, renorm_clipping=(r_max, d_max), momentum=0.9)[0]
        np.testing.assert_allclose(y, static, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- epsilon, momentum: traced values and the state


def test_tiny_epsilon_of_a_constant_feature_gives_zero_where_valid():
    # The smallest normal float32 epsilon is accepted and gives float64's answer (0), not NaN.
    y = nj.layer_norm(jnp.ones((2, 3)), epsilon=float(jnp.finfo(jnp.float32).tiny))
    np.testing.assert_array_equal(y, 0.0)


@pytest.mark.parametrize("bad", [np.nan, -0.5, 1.5, np.inf])
def test_traced_momentum_out_of_range_keeps_the_state(bad):
    state = nj.BatchNormState(jnp.arange(6.0), jnp.full(6, 2.0))
    sweep = jax.jit(jax.vmap(lambda m: bn_train(state=state, momentum=m)[1]))
    new = sweep(jnp.array([0.9, bad], jnp.float32))
    want = bn_train(state=state, momentum=0.9)[1]
    np.testing.assert_allclose(new.mean[0], want.mean, rtol=1e-6)
    assert_same_state(jax.tree.map(lambda a: a[1], new), state)


@pytest.mark.parametrize("bad", [np.nan, 0.0, -1e-5, np.inf])
def test_traced_epsilon_not_positive_and_finite_keeps_the_state(bad):
    state = nj.BatchNormState(jnp.arange(6.0), jnp.full(6, 2.0))
    new = jax.jit(lambda e: bn_train(state=state, epsilon=e)[1])(jnp.float32(bad))
    assert_same_state(new, state)
    ghost = jax.jit(lambda e: bn_train(state=state, epsilon=e, virtual_batch_size=2)[1])(jnp.float32(bad))
    assert_same_state(ghost, state)


# ---------------------------------------------------------------- degenerate normalizations accepted where sound


def test_one_value_is_accepted_when_devices_add_values():
    # A batch of one per device under vmap of size 4: four values per feature, the usual per-example idiom.
    y, state = jax.vmap(lambda r: bn_train(r[None], axis_name="b"), axis_name="b")(X)
    want, mean, *_ = reference.batch_norm_train(np.asarray(X, np.float64))
    np.testing.assert_allclose(y[:, 0], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.mean[0], 0.01 * mean, rtol=1e-5, atol=1e-7)
    # LayerNorm over size-1 axes is accepted, as in PyTorch and Flax (its output is the bias).
    np.testing.assert_array_equal(nj.layer_norm(jnp.ones((4, 1)), None, jnp.full(1, 2.0)), 2.0)


def test_one_value_under_pmap_and_shard_map_uses_the_static_axis_size():
    devices = jax.devices()
    one = lambda r: bn_train(r, axis_name="d")[0]  # noqa: E731
    with pytest.raises(ValueError, match="allow_single_value"):
        jax.pmap(one, axis_name="d", devices=devices[:1])(X[:1, None])
    y = jax.pmap(one, axis_name="d", devices=devices[:4])(X[:, None])
    want, *_ = reference.batch_norm_train(np.asarray(X, np.float64))
    np.testing.assert_allclose(y[:, 0], want, rtol=1e-4, atol=1e-5)
    spec = jax.sharding.PartitionSpec("d")
    for count, data in ((4, X), (1, X[:1])):
        mesh = jax.sharding.Mesh(np.array(devices[:count]), ("d",))
        sharded = jax.jit(jax.shard_map(one, mesh=mesh, in_specs=spec, out_specs=spec))
        if count == 1:
            with pytest.raises(ValueError, match="allow_single_value"):
                sharded(data)
        else:
            np.testing.assert_allclose(sharded(data), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- complex parameters with a complex output


def test_complex_parameters_with_a_complex_input_are_supported():
    z = (X + 1j * X[::-1]).astype(jnp.complex64)
    scale, bias = jnp.full(6, 1j, jnp.complex64), jnp.full(6, 2 - 1j, jnp.complex64)
    z64 = np.asarray(z, np.complex128)
    centered = z64 - z64.mean(-1, keepdims=True)
    standardized = centered / np.sqrt((np.abs(centered) ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(nj.layer_norm(z, scale, bias), standardized * 1j + (2 - 1j), rtol=1e-5, atol=1e-5)
    # normalize with a complex output dtype keeps a complex mean of a real input.
    y = nj.normalize(X, 1j, 1.0, epsilon=1e-12, dtype=jnp.complex64)
    np.testing.assert_allclose(y, np.asarray(X, np.float64) - 1j, rtol=1e-6)


# ---------------------------------------------------------------- precise_batch_stats skips what the layers skip


@pytest.mark.parametrize("layer", [njn.BatchNorm, nn.BatchNorm], ids=["normjax", "flax"])
def test_precise_statistics_leave_out_skipped_batches(layer):
    model = layer(use_running_average=False)
    variables = model.init(jax.random.key(0), jnp.ones((2, 1)))
    apply_fn = jax.jit(lambda v, b: model.apply(v, b, mutable=["batch_stats"])[1]["batch_stats"])
    four_six = jnp.array([[4.0], [6.0]])
    with_nan = jnp.array([[1.0], [jnp.nan]])
    stats, counts = nj.precise_batch_stats(apply_fn, variables, [four_six, with_nan, four_six], return_counts=True)
    np.testing.assert_allclose(stats["mean"], [5.0], rtol=1e-6)
    np.testing.assert_allclose(stats["var"], [1.0], rtol=1e-5)
    assert counts["mean"].tolist() == counts["var"].tolist() == [2]


def test_precise_statistics_without_any_used_batch_keep_the_variables_and_warn():
    model = njn.BatchNorm(use_running_average=False)
    variables = model.init(jax.random.key(0), jnp.ones((2, 2)))
    variables = {**variables, "batch_stats": {"mean": jnp.array([1.0, 2.0]), "var": jnp.array([3.0, 4.0])}}
    apply_fn = lambda v, b: model.apply(v, b[0], mask=b[1], mutable=["batch_stats"])[1]["batch_stats"]  # noqa: E731
    # Feature 0 is masked out in every batch; feature 1 sees [0, 2] and then [4, 6].
    mask = jnp.array([[False, True], [False, True]])
    batches = [(jnp.array([[9.0, 0.0], [9.0, 2.0]]), mask), (jnp.array([[9.0, 4.0], [9.0, 6.0]]), mask)]
    with pytest.warns(RuntimeWarning, match="no batch updated"):
        stats, counts = nj.precise_batch_stats(apply_fn, variables, batches, batch_size=lambda b: 2, return_counts=True)
    np.testing.assert_allclose(stats["mean"], [1.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(stats["var"], [3.0, 5.0], rtol=1e-5)
    assert counts["mean"].tolist() == [0, 2]
    with pytest.warns(RuntimeWarning, match="no batch updated"):
        empty = nj.precise_batch_stats(apply_fn, variables, [(jnp.zeros((0, 2)), jnp.zeros((0, 2), bool))])
    assert_same_state(
        (empty["mean"], empty["var"]), (variables["batch_stats"]["mean"], variables["batch_stats"]["var"])
    )


# ---------------------------------------------------------------- utilities that did nothing, silently


def test_torch_bfloat16_state_dict_is_loaded_exactly():
    weights = torch.tensor([1.5, -2.25], dtype=torch.bfloat16)
    variables = nj.norm_variables_from_torch({"ln.weight": weights, "ln.bias": torch.zeros(2)}, "ln")
    np.testing.assert_array_equal(variables["params"]["scale"], [1.5, -2.25])
    assert variables["params"]["scale"].dtype == jnp.float32


def test_freeze_batch_norm_still_freezes_linen_and_lets_nnx_evaluate():
    layer = njx.BatchNorm(6, rngs=nnx.Rngs(0))
    with nj.freeze_batch_norm():
        y = layer(X, use_running_average=True)  # evaluation is not an update: allowed
    np.testing.assert_allclose(y, X / np.sqrt(1 + 1e-5), rtol=1e-6)
    np.testing.assert_array_equal(layer.mean[...], 0.0)
    # The context is exited: training works again.
    layer(X)
    assert not np.all(np.asarray(layer.mean[...]) == 0.0)


# ---------------------------------------------------------------- values: NaN, inf, huge, tiny, subnormal, zero-size

MAGNITUDES = [1e-42, 1e-30, 1e-3, 1.0, 1e6, 1e15]  # subnormal, tiny, small, unit, large, huge (no overflow)


@st.composite
def batches(draw):
    """(6, 4) float32 batches: per feature a magnitude and an offset, some entries NaN or inf."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    scale = np.array([draw(st.sampled_from(MAGNITUDES)) for _ in range(4)])
    offset = np.array([draw(st.sampled_from([0.0, 1.0, -1e3])) for _ in range(4)])
    x = rng.normal(0.0, 1.0, (6, 4)) * scale + offset * scale
    poisoned = draw(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), max_size=3))
    for i, j in poisoned:
        x[i, j] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return x.astype(np.float32)


TRAIN = jax.jit(functools.partial(nj.batch_norm, training=True, momentum=0.5))
LAYER = jax.jit(nj.layer_norm)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(x=batches())
def test_batch_norm_on_extreme_values_matches_float64_or_keeps_the_state(x):
    state = nj.BatchNormState(jnp.full(4, 0.25), jnp.full(4, 3.0))
    y, new = TRAIN(jnp.asarray(x), state)
    exact = np.asarray(x, np.float64)
    finite = np.isfinite(exact).all(0)
    with np.errstate(invalid="ignore"):  # inf - inf in the reference's non-finite features, not compared
        want, mean, var, _ = reference.batch_norm_train(exact)
    # Features with a non-finite value keep their state bit for bit; the others take one exact EMA step.
    for f in range(4):
        if not finite[f]:
            assert bits(new.mean[f]) == bits(state.mean[f]) and bits(new.var[f]) == bits(state.var[f])
            continue
        np.testing.assert_allclose(new.mean[f], 0.5 * 0.25 + 0.5 * mean[f], rtol=1e-5, atol=1e-37)
        np.testing.assert_allclose(new.var[f], 0.5 * 3.0 + 0.5 * var[f], rtol=1e-5)
        np.testing.assert_allclose(y[:, f], want[:, f], rtol=1e-3, atol=1e-3)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(x=batches())
def test_layer_norm_on_extreme_values_matches_float64_on_finite_rows(x):
    y = np.asarray(LAYER(jnp.asarray(x.T)))  # rows of 6 values, each row of one magnitude
    exact = np.asarray(x.T, np.float64)
    rows = np.isfinite(exact).all(1)
    want = reference.layer_norm(exact[rows])
    np.testing.assert_allclose(y[rows], want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "norm",
    [
        lambda x: nj.layer_norm(x),
        lambda x: nj.rms_norm(x),
        lambda x: nj.group_norm(x, num_groups=2),
        lambda x: nj.instance_norm(x),
        lambda x: bn_train(x, state=nj.init_batch_norm_state(6))[0],
        lambda x: nj.batch_norm(x, ST, training=False)[0],
        lambda x: nj.moments(x, (0, 1, 2)).mean,
        lambda x: nj.normalize(x, 0.0, 1.0),
    ],
    ids=["layer", "rms", "group", "instance", "batch-train", "batch-eval", "moments", "normalize"],
)
def test_zero_size_inputs_give_empty_outputs_and_finite_gradients(norm):
    empty = jnp.zeros((0, 3, 4, 6))
    assert jax.jit(norm)(empty).shape[0] in (0, 6)
    grad = jax.grad(lambda x: jnp.sum(norm(x)))(empty)
    assert grad.shape == empty.shape


# ---------------------------------------------------------------- transformations raise the same errors


@pytest.mark.parametrize(
    "call",
    [
        lambda x: nj.layer_norm(x, epsilon=1e-45),
        lambda x: nj.instance_norm(x[:, 0, 0]),
        lambda x: nj.layer_norm(x, jnp.full(6, 1j)),
        lambda x: bn_train(x, axis_name=0),
    ],
    ids=["epsilon", "instance-no-spatial", "complex-scale", "axis-name-int"],
)
def test_errors_are_the_same_eagerly_under_jit_vmap_and_grad(call):
    messages = set()
    runs = [
        call,
        jax.jit(call),
        lambda x: jax.vmap(call)(x[None]),
        lambda x: jax.grad(lambda v: jnp.sum(jnp.real(jnp.asarray(call(v)[0]))))(x),
    ]
    for run in runs:
        with pytest.raises((TypeError, ValueError)) as info:
            run(IMG)
        messages.add(str(info.value).split(". ")[0])
    assert len(messages) == 1, messages


def test_warnings_stay_errors_here():
    # The suite turns warnings into errors; the library must not emit any on valid inputs.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nj.init_batch_norm_state(3, jnp.float64)
        nj.layer_norm(X, epsilon=np.float64(1e-6))


def test_instance_norm_layers_accept_one_value_per_statistic_as_flax_does():
    """Flax's own InstanceNorm tests normalize (N, C) inputs: nothing is reduced and the output is the bias."""
    variables = njn.InstanceNorm().init(jax.random.key(0), X)
    np.testing.assert_array_equal(njn.InstanceNorm().apply(variables, X), jnp.zeros_like(X))
    np.testing.assert_array_equal(njx.InstanceNorm(6, rngs=nnx.Rngs(0))(X), jnp.zeros_like(X))
