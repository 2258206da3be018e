"""Every implementation of each norm (normjax, Flax linen and nnx, Haiku, Equinox, plain JAX, PyTorch) and the
measurement of one case across them: times, compiled memory and accuracy against float64.

Shared by ``run.py`` (which runs the cases and writes the tables) and ``tests/test_benchmarks.py``.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import normjax
from benchmarks import _timing

BASELINE = "flax.linen"
CONTROL = "flax.linen (control)"
OFFSETS = (0.0, 1e2, 1e4)


GROUPS = 32
EPS = 1e-5


# --------------------------------------------------------------------------------------------- implementations
# Each implementation is a pure function f(x, scale, bias) -> y on the NHWC / channels-last array.


def _normjax(norm, shape):
    c = shape[-1]
    state = normjax.init_batch_norm_state(c)
    return {
        "batch_norm": lambda x, s, b: normjax.batch_norm(x, state, s, b, training=True, epsilon=EPS)[0],
        "layer_norm": lambda x, s, b: normjax.layer_norm(x, s, b, epsilon=EPS),
        "rms_norm": lambda x, s, b: normjax.rms_norm(x, s, epsilon=EPS),
        "group_norm": lambda x, s, b: normjax.group_norm(x, s, b, num_groups=GROUPS, epsilon=EPS),
        "instance_norm": lambda x, s, b: normjax.instance_norm(x, s, b, epsilon=EPS),
    }[norm]


def _linen_module(norm, fast):
    return {
        "batch_norm": lambda: nn.BatchNorm(use_running_average=False, epsilon=EPS, use_fast_variance=fast),
        "layer_norm": lambda: nn.LayerNorm(epsilon=EPS, use_fast_variance=fast),
        "rms_norm": lambda: nn.RMSNorm(epsilon=EPS, use_fast_variance=fast),
        "group_norm": lambda: nn.GroupNorm(num_groups=GROUPS, epsilon=EPS, use_fast_variance=fast),
        "instance_norm": lambda: nn.InstanceNorm(epsilon=EPS, use_fast_variance=fast),
    }[norm]()


def _linen(norm, shape, fast):
    module = _linen_module(norm, fast)
    c = shape[-1]

    def f(x, s, b):
        params = {"scale": s} if norm == "rms_norm" else {"scale": s, "bias": b}
        if norm == "batch_norm":
            stats = {"mean": jnp.zeros(c), "var": jnp.ones(c)}
            return module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])[0]
        return module.apply({"params": params}, x)

    return f


def _nnx(norm, shape):
    c = shape[-1]
    rngs = nnx.Rngs(0)
    module = {
        "batch_norm": lambda: nnx.BatchNorm(c, use_running_average=False, epsilon=EPS, rngs=rngs),
        "layer_norm": lambda: nnx.LayerNorm(c, epsilon=EPS, rngs=rngs),
        "rms_norm": lambda: nnx.RMSNorm(c, epsilon=EPS, rngs=rngs),
        "group_norm": lambda: nnx.GroupNorm(c, num_groups=GROUPS, epsilon=EPS, rngs=rngs),
        "instance_norm": lambda: nnx.InstanceNorm(c, epsilon=EPS, rngs=rngs),
    }[norm]()
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [jax.tree_util.keystr(path) for path, _ in paths]

    def f(x, s, b):
        leaves = [{"scale": s, "bias": b}[next(k for k in ("scale", "bias") if k in n)] for n in names]
        state = jax.tree.map(lambda a: a + 0, rest)  # fresh values in this trace, so the layer may update them
        return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves), state)(x)

    return f


def _haiku(norm, shape):
    build = {
        "batch_norm": lambda x: hk.BatchNorm(True, True, 0.99, eps=EPS)(x, is_training=True),
        "layer_norm": lambda x: hk.LayerNorm(-1, True, True, eps=EPS)(x),
        "rms_norm": lambda x: hk.RMSNorm(-1, eps=EPS)(x),
        "group_norm": lambda x: hk.GroupNorm(GROUPS, eps=EPS)(x),
        "instance_norm": lambda x: hk.InstanceNorm(True, True, eps=EPS)(x),
    }[norm]
    transformed = hk.transform_with_state(build)
    dummy = jnp.zeros(shape, jnp.float32)
    params, state = transformed.init(jax.random.key(0), dummy)
    (module,) = params

    def f(x, s, b):
        leaves = {"scale": s, "offset": b}
        p = {module: {k: jnp.reshape(leaves[k], v.shape) for k, v in params[module].items()}}
        return transformed.apply(p, state, None, x)[0]

    return f


def _equinox(norm, shape):
    """Equinox layers act on one example, channels first; only the channels-last-compatible cases are run."""
    c = shape[-1]
    if norm in ("layer_norm", "rms_norm"):
        layer = eqx.nn.LayerNorm(c, eps=EPS) if norm == "layer_norm" else eqx.nn.RMSNorm(c, eps=EPS)
        batch_dims = len(shape) - 1

        def f(x, s, b):
            model = eqx.tree_at(lambda m: m.weight, layer, s)
            if norm == "layer_norm":
                model = eqx.tree_at(lambda m: m.bias, model, b)
            fn = model
            for _ in range(batch_dims):
                fn = jax.vmap(fn)
            return fn(x)

        return f
    if norm == "batch_norm" and len(shape) == 2:
        layer, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(c, axis_name="batch", eps=EPS, mode="batch")

        def f(x, s, b):
            model = eqx.tree_at(lambda m: (m.weight, m.bias), layer, (s, b))
            call = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
            return call(x, state)[0]

        return f
    return None


def _plain_jax(norm, shape):
    """The textbook two-pass formula in jnp, differentiated by JAX."""
    ndim = len(shape)

    def standardize(x, axes, centered=True):
        mean = jnp.mean(x, axes, keepdims=True) if centered else 0.0
        var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + EPS)

    def f(x, s, b):
        if norm == "batch_norm":
            return standardize(x, tuple(range(ndim - 1))) * s + b
        if norm == "layer_norm":
            return standardize(x, (-1,)) * s + b
        if norm == "rms_norm":
            return standardize(x, (-1,), centered=False) * s
        if norm == "instance_norm":
            return standardize(x, tuple(range(1, ndim - 1))) * s + b
        grouped = x.reshape(x.shape[:-1] + (GROUPS, x.shape[-1] // GROUPS))
        y = standardize(grouped, tuple(range(1, ndim - 1)) + (ndim,)).reshape(x.shape)
        return y * s + b

    return f


def _implementations(norm, shape):
    impls = {
        "normjax": _normjax(norm, shape),
        BASELINE: _linen(norm, shape, fast=True),
        CONTROL: _linen(norm, shape, fast=True),
        "flax.linen (two-pass)": _linen(norm, shape, fast=False),
        "flax.nnx": _nnx(norm, shape),
        "haiku": _haiku(norm, shape),
        "equinox": _equinox(norm, shape),
        "plain jax": _plain_jax(norm, shape),
    }
    return {k: v for k, v in impls.items() if v is not None}


# ----------------------------------------------------------------------------------------------------- torch


def _torch_fns(norm, shape):
    """(forward, forward+backward) closures on torch tensors in torch's preferred layout for the op."""
    import torch.nn.functional as F  # noqa: N812

    c = shape[-1]
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=shape).astype(np.float32)
    g_np = rng.normal(size=shape).astype(np.float32)
    x = torch.from_numpy(x_np)
    g = torch.from_numpy(g_np)
    if len(shape) == 4:  # NHWC data as an NCHW tensor in channels_last memory: the same bytes, no copy
        x, g = x.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    op = {
        "batch_norm": lambda x: F.batch_norm(x, None, None, w, b, training=True, eps=EPS),
        "layer_norm": lambda x: F.layer_norm(x, (c,), w, b, eps=EPS),
        "rms_norm": lambda x: F.rms_norm(x, (c,), w, eps=EPS),
        "group_norm": lambda x: F.group_norm(x, GROUPS, w, b, eps=EPS),
        "instance_norm": lambda x: F.instance_norm(x, weight=w, bias=b, eps=EPS),
    }[norm]
    xg = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)

    def forward():
        with torch.no_grad():
            return op(x)

    def forward_backward():
        xg.grad = w.grad = b.grad = None
        y = op(xg)
        y.backward(g)
        return y

    return forward, forward_backward


# ---------------------------------------------------------------------------------------------------- helpers


def _reference64(norm, x):
    x = np.asarray(x, np.float64)
    ndim = x.ndim
    if norm == "group_norm":
        grouped = x.reshape(x.shape[:-1] + (GROUPS, x.shape[-1] // GROUPS))
        axes = tuple(range(1, ndim - 1)) + (ndim,)
        mean = grouped.mean(axes, keepdims=True)
        var = ((grouped - mean) ** 2).mean(axes, keepdims=True)
        return ((grouped - mean) / np.sqrt(var + EPS)).reshape(x.shape)
    axes = {
        "batch_norm": tuple(range(ndim - 1)),
        "layer_norm": (-1,),
        "rms_norm": (-1,),
        "instance_norm": tuple(range(1, ndim - 1)),
    }[norm]
    mean = 0.0 if norm == "rms_norm" else x.mean(axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axes, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS)


def _block(out):
    return jax.block_until_ready(out)


def _compile(f, args):
    return jax.jit(f).lower(*args).compile()


def _temp_bytes(compiled) -> float:
    analysis = compiled.memory_analysis()
    return float(getattr(analysis, "temp_size_in_bytes", float("nan")))


def _vjp(f):
    def fwd_bwd(x, s, b, g):
        y, pull = jax.vjp(f, x, s, b)
        return y, pull(g)

    return fwd_bwd


def run_case(norm, layout, shape, rounds, members=0):
    """Times, memory and accuracy for one (norm, shape) across all implementations.

    With ``members`` > 0 every JAX implementation is ``jax.vmap``-ed over an ensemble of that many independent
    members (each with its own data, scale and bias; PyTorch is not run): the vmap experiments of the brief.
    """
    c = shape[-1]
    ensemble = (members,) if members else ()
    key_x, key_g = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, ensemble + shape, jnp.float32)
    g = jax.random.normal(key_g, ensemble + shape, jnp.float32)
    s, b = jnp.ones(ensemble + (c,)), jnp.zeros(ensemble + (c,))
    impls = _implementations(norm, shape)
    if members:
        impls = {name: jax.vmap(f) for name, f in impls.items()}
    nbytes = x.size * x.dtype.itemsize

    compiled = {}
    for name, f in impls.items():
        compiled[(name, "fwd")] = _compile(f, (x, s, b))
        compiled[(name, "fwd+bwd")] = _compile(_vjp(f), (x, s, b, g))
    probe = _compile(lambda x: x * 2.0, (x,))

    calls = {"copy probe": lambda: _block(probe(x))}
    if not members:
        calls["pytorch (fwd)"], calls["pytorch (fwd+bwd)"] = _torch_fns(norm, shape)
    for (name, mode), fn in compiled.items():
        args = (x, s, b) if mode == "fwd" else (x, s, b, g)
        calls[f"{name} ({mode})"] = lambda fn=fn, args=args: _block(fn(*args))
    medians = _timing.interleaved(calls, rounds)

    bandwidth = 2 * nbytes / medians["copy probe"]  # bytes per second, read + write
    must_move = {"fwd": 2 * nbytes, "fwd+bwd": 5 * nbytes}
    rows = []
    for name in list(impls) + ([] if members else ["pytorch"]):
        for mode in ("fwd", "fwd+bwd"):
            seconds = medians[f"{name} ({mode})"]
            row = {
                "norm": norm,
                "layout": layout,
                "shape": list(shape),
                "members": members,
                "impl": name,
                "mode": mode,
                "seconds": seconds,
                "ratio": seconds / medians[f"{BASELINE} ({mode})"],
                "roofline": must_move[mode] / bandwidth / seconds,
            }
            if name != "pytorch":
                row["temp_x_input"] = _temp_bytes(compiled[(name, mode)]) / nbytes
            rows.append(row)

    errors = {}
    for name in impls:
        errs = []
        for offset in OFFSETS:
            xo = x + offset
            y = np.asarray(compiled[(name, "fwd")](xo, s, b), np.float64)
            reference = np.stack([_reference64(norm, m) for m in xo]) if members else _reference64(norm, xo)
            errs.append(float(np.max(np.abs(y - reference))))
        errors[name] = errs
    for row in rows:
        if row["impl"] in errors and row["mode"] == "fwd":
            row["max_error_at_offsets"] = errors[row["impl"]]
    return rows, bandwidth
