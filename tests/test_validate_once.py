"""Each argument is checked and canonicalized once per call, at the public boundary, whatever the entry point.

The validators and canonicalizers are replaced by counting wrappers, each public norm, ``moments``, ``normalize`` and
each layer is traced once (:func:`jax.eval_shape`), and every (validator, argument) pair must have run exactly once:
the core (:func:`normjax._src.standardize.standardize`) receives a checked spec and checks nothing again.
"""

from __future__ import annotations

import collections
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import normjax as nj
import normjax.equinox as nqx
import normjax.linen as njn
import normjax.nnx as njx
from normjax._src import arguments, device_axes, dtypes
from normjax._src import axes as axes_lib

X = jax.ShapeDtypeStruct((4, 3, 6), jnp.float32)  # (N, L, C)
C = 6
SCALE = jnp.ones(C)

# The counted functions, and which positional or keyword argument names the argument checked.
COUNTED = {
    axes_lib: {"canonicalize_axes": ("name", 2), "instance_norm_axes": None, "canonicalize_channel_axis": None},
    arguments: {
        "check_inexact": ("name", 1),
        "check_mask": None,
        "check_affine": ("name", 3),
        "check_scale_offset": None,
        "check_static_bool": ("name", 1),
        "check_epsilon": None,
        "check_momentum": None,
        "check_gate": None,
        "check_state": None,
        "group_count": None,
        "check_norm_values": None,
        "check_several_values": None,
        "check_batch_norm_values": None,
        "check_input_features": None,
        "check_moment_array": ("name", 1),
    },
    device_axes: {"check_axis_name": None},
    dtypes: {
        "check_float_dtype": ("name", 1),
        "output_dtype": None,
        "layer_output_dtype": None,
        "check_real_output": None,
        "check_normalized_dtype": None,
    },
}


@pytest.fixture
def calls(monkeypatch):
    """Counts each call of a counted function, by (function, the argument it checks)."""
    counts = collections.Counter()
    for module, functions in COUNTED.items():
        for name, argument in functions.items():
            original = getattr(module, name)

            def counting(*args, _original=original, _name=name, _argument=argument, **kwargs):
                checked = ""
                if _argument is not None:
                    keyword, position = _argument
                    checked = kwargs.get(keyword, args[position] if len(args) > position else "default")
                counts[(_name, checked)] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, counting)
    return counts


def _ones(shape):
    return jnp.ones(shape, jnp.float32)


FUNCTIONS = {
    "layer_norm": lambda x: nj.layer_norm(x, SCALE, SCALE),
    "rms_norm": lambda x: nj.rms_norm(x, SCALE),
    "gated_rms_norm": lambda x: nj.gated_rms_norm(x, x, SCALE),
    "group_norm": lambda x: nj.group_norm(x, SCALE, SCALE, num_groups=2),
    "instance_norm": lambda x: nj.instance_norm(x, SCALE, SCALE),
    "batch_norm_training": lambda x: nj.batch_norm(x, nj.init_batch_norm_state(C), SCALE, SCALE, training=True),
    "batch_norm_evaluation": lambda x: nj.batch_norm(x, nj.init_batch_norm_state(C), SCALE, training=False),
    "batch_norm_ghost": lambda x: nj.batch_norm(x, nj.init_batch_norm_state(C), training=True, virtual_batch_size=2),
    "weight_standardize": lambda x: nj.weight_standardize(x, SCALE),
    "layer_norm_synchronized": lambda x: jax.vmap(functools.partial(nj.layer_norm, axis_name="i"), axis_name="i")(x),
}


# The statistics alone, and the output given them: each checks its own arguments once too.
MOMENTS_AND_NORMALIZE = {
    "moments": lambda x: nj.moments(x, (0, 1), mask=jnp.ones(x.shape, bool), keepdims=True, centered=False),
    "moments_synchronized": lambda x: jax.vmap(
        functools.partial(nj.moments, reduction_axes=0, axis_name="i"), axis_name="i"
    )(x),
    "normalize": lambda x: nj.normalize(
        x, jnp.zeros((1, 1, C)), jnp.ones((1, 1, C)), SCALE, SCALE, mask=jnp.ones(x.shape, bool), scale_offset=1.0
    ),
}


def _linen(layer, **call):
    variables = layer.init(jax.random.key(0), _ones(X.shape), **call)
    return lambda x: layer.apply(variables, x, mutable=["batch_stats"], **call)


LINEN = {
    "BatchNorm": lambda: _linen(njn.BatchNorm(use_running_average=False)),
    "LayerNorm": lambda: _linen(njn.LayerNorm()),
    "RMSNorm": lambda: _linen(njn.RMSNorm()),
    "RMSNorm_gated": lambda: _linen(njn.RMSNorm(), gate=_ones(X.shape)),
    "GroupNorm": lambda: _linen(njn.GroupNorm(num_groups=2)),
    "InstanceNorm": lambda: _linen(njn.InstanceNorm()),
}

NNX = {
    "BatchNorm": lambda: njx.BatchNorm(C, use_running_average=False, rngs=nnx.Rngs(0)),
    "LayerNorm": lambda: njx.LayerNorm(C, rngs=nnx.Rngs(0)),
    "RMSNorm": lambda: njx.RMSNorm(C, rngs=nnx.Rngs(0)),
    "GroupNorm": lambda: njx.GroupNorm(C, num_groups=2, rngs=nnx.Rngs(0)),
    "InstanceNorm": lambda: njx.InstanceNorm(C, rngs=nnx.Rngs(0)),
}

EQUINOX = {  # one example at a time, channels first for the conv norms
    "BatchNorm": lambda: eqx.nn.make_with_state(nqx.BatchNorm)(3, axis_name="batch"),
    "LayerNorm": lambda: nqx.LayerNorm((3, C)),
    "RMSNorm": lambda: nqx.RMSNorm((3, C)),
    "GroupNorm": lambda: nqx.GroupNorm(3, 3),
    "InstanceNorm": lambda: nqx.InstanceNorm(3),
}


def _assert_each_once(counts):
    assert counts, "nothing was counted"
    repeated = {key: n for key, n in counts.items() if n != 1}
    assert not repeated, f"checked more than once: {repeated}"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_each_function_checks_each_argument_once(calls, name):
    jax.eval_shape(FUNCTIONS[name], X)
    _assert_each_once(calls)
    checked = {fn for fn, _ in calls}
    assert {"check_inexact", "check_epsilon", "check_affine", "check_real_output"} <= checked


@pytest.mark.parametrize("name", sorted(MOMENTS_AND_NORMALIZE))
def test_moments_and_normalize_check_each_argument_once(calls, name):
    jax.eval_shape(MOMENTS_AND_NORMALIZE[name], X)
    _assert_each_once(calls)
    checked = {fn for fn, _ in calls}
    assert {"check_inexact", "check_mask" if name != "moments_synchronized" else "check_axis_name"} <= checked


@pytest.mark.parametrize("name", sorted(LINEN))
def test_each_linen_layer_checks_each_argument_once(calls, name):
    apply = LINEN[name]()
    calls.clear()  # count the call, not the initialization
    jax.eval_shape(apply, X)
    _assert_each_once(calls)


@pytest.mark.parametrize("name", sorted(NNX))
def test_each_nnx_layer_checks_each_argument_once(calls, name):
    layer = NNX[name]()
    calls.clear()  # count the call, not the construction
    nnx.eval_shape(lambda layer, x: layer(x), layer, X)
    _assert_each_once(calls)


@pytest.mark.parametrize("name", sorted(EQUINOX))
def test_each_equinox_layer_checks_each_argument_once(calls, name):
    made = EQUINOX[name]()
    calls.clear()
    if name == "BatchNorm":
        layer, state = made
        jax.eval_shape(
            lambda x: jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state),
            jax.ShapeDtypeStruct((4, 3, C), jnp.float32),
        )
    else:
        jax.eval_shape(made, jax.ShapeDtypeStruct((3, C), jnp.float32))
    _assert_each_once(calls)
