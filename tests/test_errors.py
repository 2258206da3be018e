"""The error catalogue: every bad input fails at trace time with a message naming the argument and the fix.

Each case is traced with :func:`jax.eval_shape` on abstract inputs, so the error provably comes from tracing
(shapes, dtypes and Python values), before anything is computed. See ``docs/guides/errors.md``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normjax as nj
import normjax.linen
import normjax.nnx

X = jax.ShapeDtypeStruct((4, 6), jnp.float32)  # (N, C)
IMG = jax.ShapeDtypeStruct((2, 3, 4, 6), jnp.float32)  # (N, H, W, C)
STATE = nj.init_batch_norm_state(6)

# Every message tells the user what to do; these are the verbs the messages start their advice with.
FIX = re.compile(
    r"\b(pass|use|create|cast|choose|wrap|give|put|list each|mark it|train|typical|corresponds to|ramps)\b", re.I
)


def bn(**kwargs):
    state = kwargs.pop("state", STATE)
    kwargs.setdefault("training", True)
    return lambda x: nj.batch_norm(x, state, **kwargs)


def gn(**kwargs):
    kwargs.setdefault("num_groups", 2)
    return lambda x: nj.group_norm(x, **kwargs)


NORMS = {  # each norm with valid defaults, traced on IMG
    "batch_norm": lambda x, **kw: nj.batch_norm(x, STATE, training=True, **kw),
    "layer_norm": nj.layer_norm,
    "rms_norm": nj.rms_norm,
    "group_norm": lambda x, **kw: nj.group_norm(x, num_groups=2, **kw),
    "instance_norm": nj.instance_norm,
}

# (id, function of x, input, exception type, the argument the message must name)
CASES = [
    # Shape and rank of scale, bias and the running state versus the feature axes of x.
    ("bn-scale-shape", bn(scale=jnp.ones(5)), X, ValueError, "scale"),
    ("bn-scale-rank", bn(scale=jnp.ones((1, 1, 6))), X, ValueError, "scale"),
    ("bn-bias-shape", bn(bias=jnp.ones(7)), X, ValueError, "bias"),
    ("bn-eval-scale-shape", bn(training=False, scale=jnp.ones(5)), X, ValueError, "scale"),
    ("bn-state-mean-shape", bn(state=nj.BatchNormState(jnp.zeros(5), jnp.ones(6))), X, ValueError, "state.mean"),
    ("bn-state-var-rank", bn(state=nj.BatchNormState(jnp.zeros(6), jnp.ones((1, 6)))), X, ValueError, "state.var"),
    ("bn-state-axis-mismatch", bn(axis=0), X, ValueError, "state.mean"),
    ("ln-scale-shape", lambda x: nj.layer_norm(x, jnp.ones(5)), X, ValueError, "scale"),
    ("ln-bias-rank", lambda x: nj.layer_norm(x, None, jnp.ones((6, 1))), X, ValueError, "bias"),
    ("rms-scale-shape", lambda x: nj.rms_norm(x, jnp.ones(3)), X, ValueError, "scale"),
    ("gn-scale-shape", gn(scale=jnp.ones(4)), IMG, ValueError, "scale"),
    ("gn-bias-shape", gn(bias=jnp.ones((2, 3))), IMG, ValueError, "bias"),
    ("in-scale-shape", lambda x: nj.instance_norm(x, jnp.ones(4)), IMG, ValueError, "scale"),
    ("normalize-scale", lambda x: nj.normalize(x, 0.0, 1.0, jnp.ones(2)), X, ValueError, "scale"),
    ("scale-list", lambda x: nj.layer_norm(x, [1.0] * 6), X, TypeError, "scale"),
    # The running state's type and dtype.
    ("bn-state-tuple", bn(state=(jnp.zeros(6), jnp.ones(6))), X, TypeError, "state"),
    ("bn-state-none", bn(state=None), X, TypeError, "state"),
    ("bn-state-bf16", bn(state=nj.BatchNormState(*[jnp.ones(6, jnp.bfloat16)] * 2)), X, TypeError, "state.mean"),
    (
        "bn-state-f16-var",
        bn(state=nj.BatchNormState(jnp.zeros(6), jnp.ones(6, jnp.float16))),
        X,
        TypeError,
        "state.var",
    ),
    ("bn-state-int", bn(state=nj.BatchNormState(jnp.zeros(6, int), jnp.ones(6, int))), X, TypeError, "state.mean"),
    (
        "bn-state-complex-var",
        bn(state=nj.BatchNormState(jnp.zeros(6), jnp.ones(6, jnp.complex64))),
        X,
        TypeError,
        "state.var",
    ),  # fmt: skip
    ("bn-complex-x-real-state", bn(), jax.ShapeDtypeStruct((4, 6), jnp.complex64), TypeError, "state.mean"),
    # Axes: out of range, repeated, not ints, the batch axis where it cannot be a feature axis.
    ("bn-axis-range", bn(axis=2), X, ValueError, "axis"),
    ("bn-axis-repeated", bn(axis=(1, -1)), X, ValueError, "axis"),
    ("bn-axis-str", bn(axis="channels"), X, TypeError, "axis"),
    ("bn-axis-bool", bn(axis=True), X, TypeError, "axis"),
    ("bn-axis-float", bn(axis=1.0), X, TypeError, "axis"),
    ("bn-axis-every-axis", bn(axis=(0, 1), state=nj.init_batch_norm_state((4, 6))), X, ValueError, "axis"),
    (
        "bn-ghost-batch-axis",
        bn(axis=(0, 1), virtual_batch_size=2, state=nj.init_batch_norm_state((4, 6))),
        X,
        ValueError,
        "axis",
    ),  # fmt: skip
    ("ln-axis-range", lambda x: nj.layer_norm(x, reduction_axes=-3), X, ValueError, "reduction_axes"),
    ("ln-axis-repeated", lambda x: nj.layer_norm(x, reduction_axes=(0, 0)), X, ValueError, "reduction_axes"),
    ("ln-feature-axes-range", lambda x: nj.layer_norm(x, feature_axes=5), X, ValueError, "feature_axes"),
    ("rms-axis-range", lambda x: nj.rms_norm(x, reduction_axes=9), X, ValueError, "reduction_axes"),
    ("gn-axis-tuple", gn(feature_axes=(1, 3)), IMG, TypeError, "feature_axes"),
    ("gn-axis-batch", gn(feature_axes=0), IMG, ValueError, "feature_axes"),
    ("gn-axis-range", gn(feature_axes=4), IMG, ValueError, "feature_axes"),
    ("gn-reduction-without-channels", gn(reduction_axes=(1, 2)), IMG, ValueError, "reduction_axes"),
    ("in-axis-str", lambda x: nj.instance_norm(x, feature_axes="C"), IMG, TypeError, "feature_axes"),
    ("in-axis-batch", lambda x: nj.instance_norm(x, feature_axes=-4), IMG, ValueError, "feature_axes"),
    ("moments-axes-range", lambda x: nj.moments(x, reduction_axes=(0, 2)), X, ValueError, "reduction_axes"),
    ("moments-axes-repeated", lambda x: nj.moments(x, reduction_axes=(1, -1)), X, ValueError, "reduction_axes"),
    ("normalize-feature-axes", lambda x: nj.normalize(x, 0.0, 1.0, feature_axes=2), X, ValueError, "feature_axes"),
    # GroupNorm's groups.
    ("gn-groups-not-dividing", gn(num_groups=4), IMG, ValueError, "num_groups"),
    ("gn-group-size-not-dividing", gn(num_groups=None, group_size=4), IMG, ValueError, "group_size"),
    ("gn-both", gn(group_size=3), IMG, ValueError, "num_groups"),
    ("gn-neither", gn(num_groups=None), IMG, ValueError, "group_size"),
    ("gn-groups-zero", gn(num_groups=0), IMG, ValueError, "num_groups"),
    ("gn-groups-negative", gn(num_groups=-2), IMG, ValueError, "num_groups"),
    ("gn-group-size-zero", gn(num_groups=None, group_size=0), IMG, ValueError, "group_size"),
    ("gn-groups-float", gn(num_groups=2.0), IMG, ValueError, "num_groups"),
    ("gn-groups-bool", gn(num_groups=True), IMG, ValueError, "num_groups"),
    # Masks.
    ("bn-mask-shape", bn(mask=jnp.ones((3, 1), bool)), X, ValueError, "mask"),
    ("bn-mask-dtype", bn(mask=jnp.ones((4, 1))), X, TypeError, "mask"),
    ("bn-mask-list", bn(mask=[[True]] * 4), X, TypeError, "mask"),
    ("ln-mask-rank", lambda x: nj.layer_norm(x, mask=jnp.ones((2, 4, 6), bool)), X, ValueError, "mask"),
    ("gn-mask-dtype", gn(mask=jnp.ones(IMG.shape, jnp.int32)), IMG, TypeError, "mask"),
    ("moments-mask-shape", lambda x: nj.moments(x, 0, mask=jnp.ones(4, bool)), X, ValueError, "mask"),
    # momentum and epsilon.
    ("bn-momentum-high", bn(momentum=1.1), X, ValueError, "momentum"),
    ("bn-momentum-negative", bn(momentum=-0.1), X, ValueError, "momentum"),
    ("bn-momentum-nan", bn(momentum=float("nan")), X, ValueError, "momentum"),
    ("bn-momentum-str", bn(momentum="0.9"), X, TypeError, "momentum"),
    ("bn-momentum-array", bn(momentum=jnp.full(6, 0.9)), X, TypeError, "momentum"),
    ("bn-epsilon-zero", bn(epsilon=0.0), X, ValueError, "epsilon"),
    ("bn-epsilon-nan", bn(epsilon=float("nan")), X, ValueError, "epsilon"),
    ("bn-eval-epsilon-negative", bn(training=False, epsilon=-1e-5), X, ValueError, "epsilon"),
    ("normalize-epsilon-none", lambda x: nj.normalize(x, 0.0, 1.0, epsilon=None), X, TypeError, "epsilon"),
    # BatchNorm in training with a single value per feature.
    ("bn-single-example", bn(), jax.ShapeDtypeStruct((1, 6), jnp.float32), ValueError, "allow_single_value"),
    (
        "bn-single-pixel",
        bn(axis=-1),
        jax.ShapeDtypeStruct((1, 1, 1, 6), jnp.float32),
        ValueError,
        "allow_single_value",
    ),  # fmt: skip
    ("bn-ghost-single", bn(virtual_batch_size=1), X, ValueError, "allow_single_value"),
    # Other BatchNorm options.
    ("bn-training-none", bn(training=None), X, TypeError, "training"),
    ("bn-renorm-rmax", bn(renorm_clipping=(0.5, 1.0)), X, ValueError, "renorm_clipping"),
    ("bn-renorm-scalar", bn(renorm_clipping=3.0), X, ValueError, "renorm_clipping"),
    ("bn-ghost-not-dividing", bn(virtual_batch_size=3), X, ValueError, "virtual_batch_size"),
    ("bn-ghost-axis-name", bn(virtual_batch_size=2, axis_name="batch"), X, ValueError, "virtual_batch_size"),
    # axis_index_groups without axis_name.
    (
        "ln-groups-without-axis-name",
        lambda x: nj.layer_norm(x, axis_index_groups=[[0]]),
        X,
        ValueError,
        "axis_index_groups",
    ),  # fmt: skip
]

# Cases that apply to every norm alike.
for _name, _norm in NORMS.items():
    CASES += [
        (f"{_name}-int-x", _norm, jax.ShapeDtypeStruct(IMG.shape, jnp.int32), TypeError, "x"),
        (f"{_name}-bool-x", _norm, jax.ShapeDtypeStruct(IMG.shape, jnp.bool_), TypeError, "x"),
        (f"{_name}-uint8-x", _norm, jax.ShapeDtypeStruct(IMG.shape, jnp.uint8), TypeError, "x"),
        (f"{_name}-epsilon-zero", lambda x, n=_norm: n(x, epsilon=0.0), IMG, ValueError, "epsilon"),
        (f"{_name}-epsilon-negative", lambda x, n=_norm: n(x, epsilon=-1.0), IMG, ValueError, "epsilon"),
        (f"{_name}-mask-shape", lambda x, n=_norm: n(x, mask=jnp.ones((2, 5, 1, 1), bool)), IMG, ValueError, "mask"),
        (f"{_name}-mask-float", lambda x, n=_norm: n(x, mask=jnp.ones((2, 1, 1, 1))), IMG, TypeError, "mask"),
        (f"{_name}-unbound-axis-name", lambda x, n=_norm: n(x, axis_name="devices"), IMG, NameError, "axis_name"),
    ]
CASES += [
    ("moments-int-x", lambda x: nj.moments(x, 0), jax.ShapeDtypeStruct((4, 6), jnp.int32), TypeError, "x"),
    ("normalize-bool-x", lambda x: nj.normalize(x, 0.0, 1.0), jax.ShapeDtypeStruct((4, 6), jnp.bool_), TypeError, "x"),
    ("moments-unbound-axis-name", lambda x: nj.moments(x, 0, axis_name="i"), X, NameError, "axis_name"),
]


@pytest.mark.parametrize(("fn", "x", "error", "argument"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_at_trace_time_names_the_argument_and_the_fix(fn, x, error, argument):
    # eval_shape traces on abstract values only: the error cannot come from a computation.
    with pytest.raises(error, match=f"`{re.escape(argument)}") as info:
        jax.eval_shape(fn, x)
    assert FIX.search(str(info.value)), f"the message gives no fix: {info.value}"


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    ("fn", "shape"), [(bn(scale=jnp.ones(5)), X.shape), (gn(num_groups=4), IMG.shape), (bn(momentum=2.0), X.shape)]
)
def test_eager_and_jit_raise_the_same_error_as_tracing(fn, shape):
    x = jnp.ones(shape)
    with pytest.raises(ValueError) as traced:
        jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, x.dtype))
    for run in (fn, jax.jit(fn)):
        with pytest.raises(ValueError) as info:
            run(x)
        assert str(info.value) == str(traced.value)


def test_messages_echo_what_was_received():
    with pytest.raises(ValueError, match=r"got shape \(5,\)") as info:
        jax.eval_shape(bn(scale=jnp.ones(5)), X)
    assert "(6,)" in str(info.value)  # the expected shape
    with pytest.raises(ValueError, match="Choose a divisor of 6: \\[1, 2, 3, 6\\]"):
        jax.eval_shape(gn(num_groups=4), IMG)
    with pytest.raises(ValueError, match="got 1.5"):
        jax.eval_shape(bn(momentum=1.5), X)
    with pytest.raises(TypeError, match="got dtype int32"):
        jax.eval_shape(nj.layer_norm, jax.ShapeDtypeStruct((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"rank 2: every axis must be in \[-2, 1\]"):
        jax.eval_shape(bn(axis=2), X)


BATCH = jnp.arange(24.0).reshape(4, 6)
VALID = {
    "numpy-scalars": (bn(momentum=np.float32(0.9), epsilon=np.float64(1e-5)), BATCH),
    "concrete-jax-scalars": (bn(momentum=jnp.float32(0.9), epsilon=jnp.float32(1e-3)), BATCH),
    "numpy-axis": (bn(axis=np.int64(-1)), BATCH),
    "numpy-groups": (gn(num_groups=np.int32(3)), jnp.ones(IMG.shape)),
    "numpy-group-size": (gn(num_groups=None, group_size=np.int64(2)), jnp.ones(IMG.shape)),
    "numpy-bool": (bn(training=np.bool_(True)), BATCH),
    "single-value-opt-in": (bn(allow_single_value=True), jnp.ones((1, 6))),
    "single-value-masked": (bn(mask=jnp.ones((1, 1), bool)), jnp.ones((1, 6))),
    "hashable-axis-name": (lambda x: jax.vmap(bn(axis_name=("b",)), axis_name="b")(x[:, None]), BATCH),
}


@pytest.mark.parametrize(("fn", "x"), VALID.values(), ids=VALID.keys())
def test_valid_variants_are_accepted(fn, x):
    jax.eval_shape(fn, x)


def test_traced_momentum_and_epsilon_are_accepted():
    # A vmap sweep over momentum passes tracers: they cannot be checked statically and must not be refused.
    x = jnp.arange(24.0).reshape(4, 6)
    sweep = jax.jit(jax.vmap(lambda m, e: nj.batch_norm(x, STATE, training=True, momentum=m, epsilon=e)[1].mean))
    means = sweep(jnp.array([0.5, 0.9]), jnp.array([1e-5, 1e-3]))
    np.testing.assert_allclose(means, [0.5 * x.mean(0), 0.1 * x.mean(0)], rtol=1e-6)


def test_single_value_is_refused_only_when_statically_known():
    @jax.jit
    def accepted(one, four):
        # Opting in gives the degenerate output (x - mean = 0), i.e. the bias.
        y, _ = nj.batch_norm(one, STATE, None, jnp.full(6, 3.0), training=True, allow_single_value=True)
        # Evaluation with one example is the normal inference case.
        nj.batch_norm(one, STATE, training=False)
        # With axis_name the batch is spread over devices: one value per device is fine.
        per_device = lambda r: nj.batch_norm(r[None], STATE, training=True, axis_name="b")  # noqa: E731
        jax.vmap(per_device, axis_name="b")(four)
        # A mask decides the count only at run time.
        nj.batch_norm(one, STATE, training=True, mask=jnp.ones((1, 1), bool))
        return y

    np.testing.assert_array_equal(accepted(jnp.ones((1, 6)), jnp.ones((4, 6))), 3.0)


def test_complex_inputs_are_supported():
    # Flax's convention: the variance of a complex input is the mean of |x - mean|^2, a real number.
    z = (jnp.arange(24.0) + 1j * jnp.arange(24.0)[::-1] ** 2).reshape(4, 6).astype(jnp.complex64)
    siblings = (nj.layer_norm, nj.rms_norm, lambda x: nj.group_norm(x, num_groups=3), nj.instance_norm)
    for fn in siblings:
        assert jax.eval_shape(fn, z[None]).dtype == jnp.complex64
    state = nj.init_batch_norm_state(6, jnp.complex64)
    train = jax.jit(lambda z: nj.batch_norm(z, state, training=True, momentum=0.0, epsilon=1e-12))
    y, new = train(z)
    z64 = np.asarray(z, np.complex128)
    centered = z64 - z64.mean(0)
    var = (np.abs(centered) ** 2).mean(0)
    assert new.mean.dtype == jnp.complex64 and new.var.dtype == jnp.float32
    np.testing.assert_allclose(new.mean, z64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(new.var, var, rtol=1e-5)
    np.testing.assert_allclose(y, centered / np.sqrt(var), rtol=1e-4, atol=1e-5)


def test_flax_initialization_with_a_batch_of_one_is_allowed_but_training_on_it_is_not():
    layer = normjax.linen.BatchNorm(use_running_average=False, axis_name="batch")
    one = jnp.ones((1, 6))
    # model.init(key, x[:1]) is the common idiom: no error, and no bound axis_name needed either.
    variables = jax.eval_shape(layer.init, jax.random.key(0), one)
    assert variables["batch_stats"]["mean"].shape == (6,)
    # Training on one value per feature, without a bound axis_name or a mask, is refused.
    unsynchronized = normjax.linen.BatchNorm(use_running_average=False)
    with pytest.raises(ValueError, match="`allow_single_value"):
        jax.eval_shape(lambda v: unsynchronized.apply(v, one, mutable=["batch_stats"]), variables)


def test_layer_errors_start_with_flax_sentence_and_keep_normjax_advice():
    """Code that matches Flax's error texts keeps working: each message starts with Flax's sentence (linen's or
    nnx's), then says what was got and how to fix it."""
    x = jnp.ones((2, 6))
    cases = [
        (
            lambda: normjax.linen.GroupNorm(group_size=2).init(jax.random.key(0), x),
            "Either `num_groups` or `group_size` should be specified. If `group_size` is to be specified, pass "
            "`num_groups=None` as argument to override the default `num_groups` value of 32.",
            "num_groups=32 and group_size=2",
        ),
        (
            lambda: normjax.linen.GroupNorm(num_groups=4).init(jax.random.key(0), x),
            "Number of groups (4) does not divide the number of channels (6).",
            "Choose a divisor of 6: [1, 2, 3, 6]",
        ),
        (
            lambda: normjax.linen.GroupNorm(num_groups=None, group_size=4).init(jax.random.key(0), x),
            "Number of channels (6) is not multiple of the group size (4).",
            "Choose a divisor of 6",
        ),
        (
            lambda: normjax.nnx.GroupNorm(6, num_groups=None, group_size=4, rngs=nnx.Rngs(0)),
            "Number of features (6) is not multiple of the group size (4).",
            "Choose a divisor of 6",
        ),
        (
            lambda: normjax.linen.GroupNorm(num_groups=2, reduction_axes=0).init(jax.random.key(0), x),
            "The reduction axes must include the final dimension as this is assumed to be the feature axis.",
            "`reduction_axes`=0 must include the last axis",
        ),
        (
            lambda: normjax.linen.InstanceNorm(feature_axes=(0, 1)).init(jax.random.key(0), x),
            "The channel axes cannot include the leading dimension as this is assumed to be the batch axis.",
            "Put the batch first",
        ),
        (
            lambda: normjax.nnx.BatchNorm(6, use_running_average=None, rngs=nnx.Rngs(0))(x),
            "No `use_running_average` argument was provided to BatchNorm.",
            "model.eval()",
        ),
    ]
    for make, flax_sentence, advice in cases:
        with pytest.raises(ValueError) as error:
            make()
        assert str(error.value).startswith(flax_sentence)
        assert advice in str(error.value)
