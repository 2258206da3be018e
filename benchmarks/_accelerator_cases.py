"""The normalizations whose GPU and TPU cost ``accelerators.py`` reports: the cases, each implementation as a
program to compile, and its deviceless compile (see ``_accelerators.py``).

Shared by ``accelerators.py`` (which writes the tables) and ``tests/test_compiled_programs.py`` (which bounds
normjax's cost by Flax's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

import normjax
from benchmarks import _accelerators

GROUPS = 32
EPS = 1e-5
BASELINE = "flax.linen"
IMPLEMENTATIONS = ("normjax", BASELINE, "flax.linen (two-pass)", "plain jax")
MODES = ("forward", "forward+backward")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    norm: str
    shape: tuple[int, ...]

    @property
    def features(self) -> int:
        return self.shape[-1]


CASES = (
    Case("BatchNorm NHWC", "batch_norm", (64, 56, 56, 64)),
    Case("BatchNorm NC", "batch_norm", (4096, 1024)),
    Case("LayerNorm", "layer_norm", (16, 2048, 4096)),
    Case("GroupNorm", "group_norm", (16, 64, 64, 256)),
    Case("InstanceNorm", "instance_norm", (16, 64, 64, 256)),
    Case("RMSNorm", "rms_norm", (16, 2048, 4096)),
)


# --------------------------------------------------------------------------------------------- implementations
# Each implementation is f(x, params, stats) -> (y, new_stats): params {"scale", "bias"} ({"scale"} for RMSNorm),
# stats {"mean", "var"} for BatchNorm (the running statistics it reads and updates), else {}.


def _normjax(case: Case, axis_name: str | None) -> Callable:
    def f(x, params, stats):
        scale, bias = params["scale"], params.get("bias")
        if case.norm == "batch_norm":
            state = normjax.BatchNormState(stats["mean"], stats["var"])
            y, new = normjax.batch_norm(x, state, scale, bias, training=True, epsilon=EPS, axis_name=axis_name)
            return y, {"mean": new.mean, "var": new.var}
        if case.norm == "layer_norm":
            return normjax.layer_norm(x, scale, bias, epsilon=EPS, axis_name=axis_name), {}
        if case.norm == "rms_norm":
            return normjax.rms_norm(x, scale, epsilon=EPS, axis_name=axis_name), {}
        if case.norm == "group_norm":
            return normjax.group_norm(x, scale, bias, num_groups=GROUPS, epsilon=EPS, axis_name=axis_name), {}
        return normjax.instance_norm(x, scale, bias, epsilon=EPS, axis_name=axis_name), {}

    return f


def _linen(case: Case, fast: bool, axis_name: str | None) -> Callable:
    def f(x, params, stats):
        # dtype=x.dtype: the output in the input's dtype, as normjax's (Flax's default would promote a bfloat16
        # input to the float32 parameters' dtype and write twice the bytes).
        common = dict(epsilon=EPS, use_fast_variance=fast, dtype=x.dtype)
        module = {
            "batch_norm": lambda: nn.BatchNorm(use_running_average=False, axis_name=axis_name, **common),
            "layer_norm": lambda: nn.LayerNorm(axis_name=axis_name, **common),
            "rms_norm": lambda: nn.RMSNorm(axis_name=axis_name, **common),
            "group_norm": lambda: nn.GroupNorm(num_groups=GROUPS, axis_name=axis_name, **common),
            "instance_norm": lambda: nn.InstanceNorm(axis_name=axis_name, **common),
        }[case.norm]()
        if case.norm == "batch_norm":
            y, updates = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
            return y, dict(updates["batch_stats"])
        return module.apply({"params": params}, x), {}

    return f


def _plain_jax(case: Case, axis_name: str | None) -> Callable:
    """The textbook two-pass formula in jnp (statistics in float32), differentiated by JAX."""
    ndim = len(case.shape)
    axes = {
        "batch_norm": tuple(range(ndim - 1)),
        "layer_norm": (ndim - 1,),
        "rms_norm": (ndim - 1,),
        "instance_norm": tuple(range(1, ndim - 1)),
        "group_norm": tuple(range(1, ndim - 1)) + (ndim,),  # on the (..., groups, channels per group) view
    }[case.norm]

    def mean(a):
        m = jnp.mean(a, axes, keepdims=True)
        return m if axis_name is None else jax.lax.pmean(m, axis_name)

    def f(x, params, stats):
        h = x.astype(jnp.float32)
        if case.norm == "group_norm":
            h = h.reshape(x.shape[:-1] + (GROUPS, x.shape[-1] // GROUPS))
        mu = 0.0 if case.norm == "rms_norm" else mean(h)
        var = mean(jnp.square(h - mu))
        y = ((h - mu) * jax.lax.rsqrt(var + EPS)).reshape(x.shape) * params["scale"]
        if "bias" in params:
            y = y + params["bias"]
        new_stats = {}
        if case.norm == "batch_norm":
            new_stats = {"mean": mu.ravel(), "var": var.ravel()}
            new_stats = jax.tree.map(lambda old, new: 0.99 * old + 0.01 * new, stats, new_stats)
        return y.astype(x.dtype), new_stats

    return f


def implementation(name: str, case: Case, axis_name: str | None = None) -> Callable:
    """``f(x, params, stats) -> (y, new_stats)`` for one of :data:`IMPLEMENTATIONS`."""
    if name == "normjax":
        return _normjax(case, axis_name)
    if name == BASELINE:
        return _linen(case, fast=True, axis_name=axis_name)
    if name == "flax.linen (two-pass)":
        return _linen(case, fast=False, axis_name=axis_name)
    if name == "plain jax":
        return _plain_jax(case, axis_name)
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {name!r}")


def program(f: Callable, mode: str) -> Callable:
    """The compiled program: ``(x, params, stats) -> (y, stats)`` or ``(x, params, stats, g) -> (y, stats, grads)``."""
    if mode == "forward":
        return f
    if mode != "forward+backward":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def forward_backward(x, params, stats, g):
        y, pullback, new_stats = jax.vjp(lambda x, p: f(x, p, stats), x, params, has_aux=True)
        return y, new_stats, pullback(g)

    return forward_backward


def arg_specs(case: Case, dtype: str, mode: str, batch_divisor: int = 1):
    """Shape-dtype structures of the program's arguments (the batch divided by ``batch_divisor``, per device)."""
    shape = (case.shape[0] // batch_divisor,) + case.shape[1:]
    x = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
    vector = jax.ShapeDtypeStruct((case.features,), jnp.float32)
    params = {"scale": vector} if case.norm == "rms_norm" else {"scale": vector, "bias": vector}
    stats = {"mean": vector, "var": vector} if case.norm == "batch_norm" else {}
    return (x, params, stats) if mode == "forward" else (x, params, stats, x)


def measure(name: str, case: Case, dtype: str, mode: str, platform: str) -> _accelerators.Cost:
    """The deviceless compile of one implementation, case, dtype and mode on ``platform`` ("cuda" or "tpu")."""
    f = program(implementation(name, case), mode)
    return _accelerators.compile_cost(f, *arg_specs(case, dtype, mode), platform=platform)
