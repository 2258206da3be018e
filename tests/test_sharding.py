"""Every norm and layer under every way JAX shards a computation, against the unsharded result and Flax's layers.

The sharding modes:

- **explicit**: a mesh whose axes are ``AxisType.Explicit`` (what ``jax.make_mesh`` gives by default) made current
  with ``jax.set_mesh``. Shardings are part of each array's type (``jax.typeof(x)`` reads
  ``float32[16@data,6,6,32@model]``) and every operation must say what sharding its output has, so an operation
  that cannot (e.g. a reshape merging a sharded axis with others) is a trace-time ``ShardingTypeError``. The
  code is written for the global batch, with no ``axis_name``; the statistics' reductions over a sharded axis
  become collectives.
- **auto**: the same with ``AxisType.Auto``: the compiler propagates the input shardings through the program.
- **shard_map**: manual sharding (on the default, explicit mesh): ``jax.shard_map`` runs the code on each
  device's block; statistics over a sharded axis are synchronized by ``axis_name`` (the batch over ``data``;
  LayerNorm and RMSNorm over ``model`` when the features are sharded there).
- **pmap**: manual too, on the one-axis mesh: each device gets one slice of the batch, ``axis_name='data'``.

The meshes: ``(8,)`` named ``data`` (the batch sharded, everything else replicated) and ``(2, 4)`` named ``data``
and ``model`` (the batch over ``data``, the features over ``model``, and with them the parameters and the running
statistics; under explicit and auto also with the parameters and running statistics replicated, as ``init``
creates them). The input has a large offset (1e3) so that a one-pass variance is visibly wrong.

Each case checks that the sharded computation runs; that its output, running statistics and gradients (of a
scalar loss with respect to ``x``, ``scale`` and ``bias``) equal the unsharded computation's and those of Flax's
layer (``use_fast_variance=False``); that the running statistics equal those of the global batch in float64; and
that the outputs are sharded as they should be: ``y`` and ``dx`` like ``x``, the new running statistics like the
batch statistics (like the features) in training and as given in evaluation, the parameters' gradients like the
parameters (under explicit sharding, where it is their type), and under ``pmap`` every device holding the same
running statistics. Flax's own layers go through the same cases, which shows the cases are fair.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as flax_linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as flax_nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import normjax
from normjax import linen as normjax_linen
from normjax import nnx as normjax_nnx

SHAPE = (16, 6, 6, 32)  # (N, H, W, C)
C = SHAPE[-1]
GROUP_SIZE = 4  # channels per group: a group never straddles two devices of `model`
MOMENTUM = 0.9
OFFSET = 1e3
TOLERANCE = 1e-4

MESHES = {
    "data8": ((8,), ("data",)),
    "data2_model4": ((2, 4), ("data", "model")),
}


def _specs(mesh_name):
    """(x's spec, the features' spec) on each mesh: the batch statistics are sharded like the features."""
    if mesh_name == "data8":
        return P("data", None, None, None), P(None)
    return P("data", None, None, "model"), P("model")


def _expected_specs(mesh_name, placement, norm):
    """(x's spec, the parameters' and running statistics' spec as given, the new running statistics' spec).

    ``placement`` says where the parameters and running statistics are given: ``sharded`` like the features, or
    ``replicated`` (as ``init`` creates them). In training the new running statistics follow the batch
    statistics, sharded like the features; in evaluation they are returned as given.
    """
    x_spec, feature_spec = _specs(mesh_name)
    given = feature_spec if placement == "sharded" else P()
    return x_spec, given, feature_spec if norm == "BatchNorm_train" else given


def _data():
    rng = np.random.default_rng(0)
    std = rng.uniform(2.0, 4.0, C)
    x = (OFFSET + rng.normal(0.0, 3.0, C) + std * rng.normal(size=SHAPE)).astype(np.float32)
    params = {
        "scale": (1.0 + 0.2 * rng.normal(size=C)).astype(np.float32),
        "bias": (0.2 * rng.normal(size=C)).astype(np.float32),
    }
    stats = {
        "mean": (OFFSET + rng.normal(size=C)).astype(np.float32),
        "var": (std**2 * rng.uniform(0.5, 2.0, C)).astype(np.float32),
    }
    cotangent = rng.normal(size=SHAPE).astype(np.float32)
    return x, params, stats, cotangent


X, PARAMS, STATS, COTANGENT = _data()

# ---------------------------------------------------------------------------------------------------------------
# The norms, each as f(x, params, stats) -> (y, new_stats), built for given axis names (None: the global view).
# `batch_axis` synchronizes statistics over the batch, `feature_axis` over the (sharded) features.


def _functional(norm, batch_axis, feature_axis, features):
    del features  # read from the arrays

    def f(x, params, stats):
        scale, bias = params["scale"], params.get("bias")
        if norm in ("BatchNorm_train", "BatchNorm_eval"):
            y, state = normjax.batch_norm(
                x,
                normjax.BatchNormState(**stats),
                scale,
                bias,
                training=norm == "BatchNorm_train",
                momentum=MOMENTUM,
                axis_name=batch_axis,
            )
            return y, {"mean": state.mean, "var": state.var}
        if norm == "LayerNorm":
            return normjax.layer_norm(x, scale, bias, axis_name=feature_axis), {}
        if norm == "RMSNorm":
            return normjax.rms_norm(x, scale, axis_name=feature_axis), {}
        if norm == "GroupNorm":
            return normjax.group_norm(x, scale, bias, group_size=GROUP_SIZE), {}
        return normjax.instance_norm(x, scale, bias), {}

    return f


def _linen_module(library, norm, batch_axis, feature_axis):
    if norm in ("BatchNorm_train", "BatchNorm_eval"):
        return library.BatchNorm(
            use_running_average=norm == "BatchNorm_eval",
            momentum=MOMENTUM,
            axis_name=batch_axis,
            use_fast_variance=False,
        )
    if norm == "LayerNorm":
        return library.LayerNorm(axis_name=feature_axis, use_fast_variance=False)
    if norm == "RMSNorm":
        return library.RMSNorm(axis_name=feature_axis, use_fast_variance=False)
    if norm == "GroupNorm":
        return library.GroupNorm(num_groups=None, group_size=GROUP_SIZE, use_fast_variance=False)
    return library.InstanceNorm(use_fast_variance=False)


def _linen(library):
    def build(norm, batch_axis, feature_axis, features):
        del features  # read from the arrays
        module = _linen_module(library, norm, batch_axis, feature_axis)

        def f(x, params, stats):
            variables = {"params": params, **({"batch_stats": stats} if stats else {})}
            y, updates = module.apply(variables, x, mutable=["batch_stats"])
            return y, dict(updates.get("batch_stats", {}))

        return f

    return build


def _nnx_module(library, norm, batch_axis, feature_axis, features):
    rngs = flax_nnx.Rngs(0)
    if norm in ("BatchNorm_train", "BatchNorm_eval"):
        return library.BatchNorm(
            features,
            use_running_average=norm == "BatchNorm_eval",
            momentum=MOMENTUM,
            axis_name=batch_axis,
            use_fast_variance=False,
            rngs=rngs,
        )
    if norm == "LayerNorm":
        return library.LayerNorm(features, axis_name=feature_axis, use_fast_variance=False, rngs=rngs)
    if norm == "RMSNorm":
        return library.RMSNorm(features, axis_name=feature_axis, use_fast_variance=False, rngs=rngs)
    if norm == "GroupNorm":
        return library.GroupNorm(features, num_groups=None, group_size=GROUP_SIZE, use_fast_variance=False, rngs=rngs)
    return library.InstanceNorm(features, use_fast_variance=False, rngs=rngs)


def _nnx(library):
    def build(norm, batch_axis, feature_axis, features):
        graph, param_state, stat_state = flax_nnx.split(
            _nnx_module(library, norm, batch_axis, feature_axis, features), flax_nnx.Param, flax_nnx.BatchStat
        )

        def f(x, params, stats):
            params_in = jax.tree.map(lambda a: a, param_state)
            flax_nnx.replace_by_pure_dict(params_in, params)
            stats_in = jax.tree.map(lambda a: a, stat_state)
            flax_nnx.replace_by_pure_dict(stats_in, stats)
            model = flax_nnx.merge(graph, params_in, stats_in)
            y = model(x)
            return y, flax_nnx.to_pure_dict(flax_nnx.state(model, flax_nnx.BatchStat))

        return f

    return build


IMPLEMENTATIONS: dict[str, Callable] = {
    "functional-normjax": _functional,
    "linen-normjax": _linen(normjax_linen),
    "linen-flax": _linen(flax_linen),
    "nnx-normjax": _nnx(normjax_nnx),
    "nnx-flax": _nnx(flax_nnx),
}
FLAX_OF = {"functional-normjax": "linen-flax", "linen-normjax": "linen-flax", "nnx-normjax": "nnx-flax"}
NORMS = ("BatchNorm_train", "BatchNorm_eval", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")


def _inputs(norm):
    params = PARAMS if norm != "RMSNorm" else {"scale": PARAMS["scale"]}
    stats = STATS if norm.startswith("BatchNorm") else {}
    return X, params, stats


# ---------------------------------------------------------------------------------------------------------------
# Running a norm: forward returns (y, new_stats); gradient returns (dx, dparams) of sum(y * COTANGENT).


def _loss(f):
    def loss(x, params, stats, cotangent):
        return jnp.sum(f(x, params, stats)[0] * cotangent)

    return loss


def _gradient(f):
    return jax.grad(_loss(f), argnums=(0, 1))


@functools.cache
def _unsharded(implementation, norm, check):
    f = IMPLEMENTATIONS[implementation](norm, None, None, C)
    x, params, stats = _inputs(norm)
    if check == "forward":
        return jax.device_get(jax.jit(f)(x, params, stats))
    return jax.device_get(jax.jit(_gradient(f))(x, params, stats, COTANGENT))


def _global_mode(axis_type):
    """explicit and auto: the global program, jitted under ``jax.set_mesh`` with sharded inputs."""

    def run(implementation, norm, check, mesh_name, placement):
        mesh = jax.make_mesh(*MESHES[mesh_name], axis_types=(axis_type,) * len(MESHES[mesh_name][0]))
        x_spec, given_spec, new_stats_spec = _expected_specs(mesh_name, placement, norm)
        f = IMPLEMENTATIONS[implementation](norm, None, None, C)
        x, params, stats = _inputs(norm)
        with jax.set_mesh(mesh):
            x = jax.device_put(x, NamedSharding(mesh, x_spec))
            params, stats = jax.device_put((params, stats), NamedSharding(mesh, given_spec))
            if check == "forward":
                out = jax.jit(f)(x, params, stats)
            else:
                cotangent = jax.device_put(COTANGENT, NamedSharding(mesh, x_spec))
                out = jax.jit(_gradient(f))(x, params, stats, cotangent)
        if check == "forward":
            return out, (mesh, x_spec, new_stats_spec)
        # dx like x; the parameters' gradients like the parameters: their type under explicit sharding, the
        # compiler's choice under auto (it shards the gradient of a replicated parameter like the features).
        return out, (mesh, x_spec, given_spec if axis_type == AxisType.Explicit else None)

    return run


def _shard_map(implementation, norm, check, mesh_name, placement):
    assert placement == "sharded"
    mesh = jax.make_mesh(*MESHES[mesh_name])
    x_spec, param_spec = _specs(mesh_name)
    model = mesh.shape.get("model", 1)
    # Each device sees its block: C / model channels (an nnx layer is built for the shape it is applied to).
    local = IMPLEMENTATIONS[implementation](norm, "data", "model" if model > 1 else None, C // model)
    f = jax.shard_map(local, mesh=mesh, in_specs=(x_spec, param_spec, param_spec), out_specs=(x_spec, param_spec))
    x, params, stats = _inputs(norm)
    x = jax.device_put(x, NamedSharding(mesh, x_spec))
    params, stats = jax.device_put((params, stats), NamedSharding(mesh, param_spec))
    if check == "forward":
        out = jax.jit(f)(x, params, stats)
    else:
        cotangent = jax.device_put(COTANGENT, NamedSharding(mesh, x_spec))
        out = jax.jit(_gradient(f))(x, params, stats, cotangent)
    return out, (mesh, x_spec, param_spec)


def _pmap(implementation, norm, check, mesh_name, placement):
    assert (mesh_name, placement) == ("data8", "sharded")
    devices = jax.device_count()
    local = IMPLEMENTATIONS[implementation](norm, "data", None, C)
    x, params, stats = _inputs(norm)
    split = lambda a: a.reshape(devices, -1, *a.shape[1:])  # noqa: E731
    merge = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
    if check == "forward":
        y, new_stats = jax.pmap(local, axis_name="data", in_axes=(0, None, None))(split(x), params, stats)
        return (merge(y), _one_replica(new_stats)), None

    def device_gradient(x, params, stats, cotangent):
        dx, dparams = _gradient(local)(x, params, stats, cotangent)
        return dx, jax.lax.psum(dparams, "data")

    dx, dparams = jax.pmap(device_gradient, axis_name="data", in_axes=(0, None, None, 0))(
        split(x), params, stats, split(COTANGENT)
    )
    return (merge(dx), _one_replica(dparams)), None


def _one_replica(tree):
    """The value every device holds (they must agree: the running statistics are synchronized)."""

    def one(a):
        a = np.asarray(a)
        np.testing.assert_array_equal(a, np.broadcast_to(a[0], a.shape), err_msg="the devices disagree")
        return a[0]

    return jax.tree.map(one, tree)


MODES = {
    "explicit": _global_mode(AxisType.Explicit),
    "auto": _global_mode(AxisType.Auto),
    "shard_map": _shard_map,
    "pmap": _pmap,
}
CASES = [
    *((mode, mesh_name, "sharded") for mode in ("explicit", "auto", "shard_map") for mesh_name in MESHES),
    ("pmap", "data8", "sharded"),  # pmap maps one axis: the batch over all devices
    # Parameters and running statistics as `init` creates them, replicated, with the features sharded.
    ("explicit", "data2_model4", "replicated"),
    ("auto", "data2_model4", "replicated"),
]


# ---------------------------------------------------------------------------------------------------------------
# The checks.


def _assert_close(got, want, what):
    got, want = jax.tree.map(np.asarray, (got, want))
    assert jax.tree.structure(got) == jax.tree.structure(want), what
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        error = np.max(np.abs(g.astype(np.float64) - w)) / max(1.0, np.max(np.abs(w)))
        assert error <= TOLERANCE, f"{what}{jax.tree_util.keystr(path)}: relative error {error:.2e}"


def _global_running_stats():
    x = X.astype(np.float64)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    return {
        "mean": MOMENTUM * STATS["mean"] + (1 - MOMENTUM) * mean,
        "var": MOMENTUM * STATS["var"] + (1 - MOMENTUM) * var,
    }


def _assert_sharding(out, want_spec, mesh, what):
    for path, a in jax.tree_util.tree_leaves_with_path(out):
        want = NamedSharding(mesh, want_spec)
        assert a.sharding.is_equivalent_to(want, a.ndim), (
            f"{what}{jax.tree_util.keystr(path)}: sharded as {a.sharding}, expected {want.spec}"
        )


@pytest.mark.parametrize("check", ["forward", "gradient"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("mode", "mesh_name", "placement"), CASES)
def test_sharded_equals_unsharded_and_flax(mode, mesh_name, placement, implementation, norm, check):
    if implementation.endswith("-flax") and norm == "GroupNorm" and (mode, mesh_name) == ("explicit", "data2_model4"):
        pytest.skip("Flax's GroupNorm cannot take channels sharded under explicit sharding (its jnp.repeat raises)")
    out, layout = MODES[mode](implementation, norm, check, mesh_name, placement)
    _assert_close(out, _unsharded(implementation, norm, check), "sharded vs unsharded: ")
    flax = FLAX_OF.get(implementation, implementation)
    _assert_close(out, _unsharded(flax, norm, check), f"vs {flax}: ")
    if check == "forward" and norm == "BatchNorm_train":
        _assert_close(out[1], _global_running_stats(), "running statistics vs the global batch's: ")
    if layout is not None:
        mesh, x_spec, feature_spec = layout
        _assert_sharding(out[0], x_spec, mesh, "y" if check == "forward" else "dx")
        if feature_spec is not None:
            _assert_sharding(out[1], feature_spec, mesh, "new running statistics" if check == "forward" else "dparams")


@pytest.mark.parametrize("norm", [n for n in NORMS if n != "BatchNorm_eval"])
@pytest.mark.parametrize("library", [normjax_linen, flax_linen], ids=["normjax", "flax"])
@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_linen_init_with_a_sharded_input(axis_type, mesh_name, library, norm):
    # `model.init(key, x)` with the global batch sharded, as a training script calls it: the same variables.
    if library is flax_linen and norm == "GroupNorm" and (axis_type, mesh_name) == (AxisType.Explicit, "data2_model4"):
        pytest.skip("Flax's GroupNorm cannot take channels sharded under explicit sharding (its jnp.repeat raises)")
    module = _linen_module(library, norm, None, None)
    want = module.init(jax.random.key(0), X)
    mesh = jax.make_mesh(*MESHES[mesh_name], axis_types=(axis_type,) * len(MESHES[mesh_name][0]))
    with jax.set_mesh(mesh):
        x = jax.device_put(X, NamedSharding(mesh, _specs(mesh_name)[0]))
        got = jax.jit(module.init)(jax.random.key(0), x)
    _assert_close(got, want, "init: ")
