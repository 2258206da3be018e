"""What XLA compiles the norms into, read from the compiled programs: the collectives of synchronized statistics
(XLA:CPU, 8 simulated devices) and the cost on a GPU (H100) and a TPU (v5e) from their deviceless compilers.

These assertions depend on the backend and on XLA's passes, not only on the numbers the norms compute; the
numbers themselves are tested in the files of each concept (test_sync.py for synchronized statistics).

**Collectives** (as documented in ``moments``' docstring and ``docs/guides/sync.md``): one round forward and one
backward, of the sizes stated, on squeezed statistics.

**GPU and TPU cost.** The compilers run deviceless on the CPU (``benchmarks/_accelerators.py``), so these checks
are static and deterministic: no timing, no accelerator. For every case of ``benchmarks/_accelerator_cases.py``
(each norm on its realistic shape, float32 and bfloat16, forward and forward+backward), normjax's compiled
program must

* move at most 1.02x the bytes of ``flax.linen``'s default layer (on TPU, also the device-memory part);
* launch no more kernels;
* allocate no temporary as large as the input;

except in the cases of ``KNOWN_GAPS``, where the target is not met yet and the bound is today's measurement.
Skipped only when the compiler plugins (the ``aot`` extra) are not installed.
"""

import functools
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import normjax
from benchmarks import _accelerator_cases as cases
from benchmarks import _accelerators

DEVICES = 8
PLUGINS = {"jax_plugins.xla_cuda12": "jax-cuda12-plugin", "libtpu": "jax[tpu]"}
BYTES_TOLERANCE = 1.02


def _mesh(*shape_and_names):
    *shape, names = shape_and_names
    return Mesh(np.array(jax.devices()[:DEVICES]).reshape(shape), names)


# ------------------------------------------------------------------------------ collectives of synchronized norms


def _batch_norm_hlo(mesh, features: int, masked: bool, backward: bool) -> str:
    """The compiled HLO of one synchronized batch_norm on (N, 4, 4, features), optionally with its gradient."""

    def loss(x, mask):
        state = normjax.init_batch_norm_state(features)
        y, _ = normjax.batch_norm(x, state, training=True, axis_name="d", mask=mask if masked else None)
        return jnp.sum(jnp.sin(y))

    if backward:  # the gradient w.r.t. the local x needs no gradient averaging
        f = jax.shard_map(jax.grad(loss), mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    else:  # the forward loss is varying; make it a per-device output
        f = jax.shard_map(lambda x, m: loss(x, m)[None], mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    n = mesh.devices.size
    x = jnp.ones((2 * n, 4, 4, features))
    mask = jnp.ones((2 * n, 4, 4, 1), bool)
    return jax.jit(f).lower(x, mask).compile().as_text()


@pytest.mark.parametrize("features", [5, 32])
@pytest.mark.parametrize("masked", [False, True])
def test_one_collective_round_forward_and_one_backward(features, masked):
    """From the compiled HLO: the forward gathers (count, shift, offset, M2) of every device in one all-gather
    (4F float32 numbers from each of D devices) and all-reduces nothing; the backward adds one all-reduce round
    of 2F numbers (the sums of the cotangent and of its product with x - mean)."""
    mesh = _mesh(DEVICES, ("d",))
    forward = _batch_norm_hlo(mesh, features, masked, backward=False)
    assert _accelerators.collective_bytes(forward, "all-gather") == (1, 4 * 4 * features * DEVICES)
    assert _accelerators.collective_bytes(forward, "all-reduce") == (0, 0)
    backward = _batch_norm_hlo(mesh, features, masked, backward=True)
    assert _accelerators.collective_bytes(backward, "all-gather") == (1, 4 * 4 * features * DEVICES)
    assert _accelerators.collective_bytes(backward, "all-reduce")[1] == 4 * 2 * features


@pytest.mark.parametrize("groups", [None, [[0, 1, 2, 3], [4, 5, 6, 7]]])
def test_one_all_reduce_round_forward_under_pmap(groups):
    """Under pmap each device's (count, shift, offset, M2) is gathered by one all-reduce (each device's values in
    its own slot of zeros: D x 4F numbers); the backward adds one all-reduce of the cotangents' sums."""
    features = 16

    def loss(x):
        state = normjax.init_batch_norm_state(features)
        y, _ = normjax.batch_norm(x, state, training=True, axis_name="d", axis_index_groups=groups)
        return jnp.sum(jnp.sin(y))

    x = jnp.ones((DEVICES, 4, 4, 4, features))
    group_size = DEVICES if groups is None else len(groups[0])
    forward = jax.pmap(loss, axis_name="d").lower(x).compile().as_text()
    assert _accelerators.collective_bytes(forward, "all-reduce") == (1, 4 * group_size * 4 * features)
    backward = jax.pmap(jax.grad(loss), axis_name="d").lower(x).compile().as_text()
    assert _accelerators.collective_bytes(backward, "all-reduce") == (
        2,
        4 * group_size * 4 * features + 4 * 2 * features,
    )


@pytest.mark.parametrize("mode", ["unsynchronized", "pmap", "vmap", "shard_map"])
def test_every_synchronization_runs_the_platforms_layout(mode):
    """Synchronized or not, the core runs the layout of the platform it is lowered for: on the CPU, XLA:CPU's,
    whose statistics are summed about zero and again about the sample only where needed (a ``conditional`` in
    the compiled program), forward and backward."""
    features = 16

    def loss(x, axis_name="d"):
        state = normjax.init_batch_norm_state(features)
        y, _ = normjax.batch_norm(x, state, training=True, axis_name=axis_name)
        return jnp.sum(jnp.sin(y))

    x = jnp.ones((DEVICES, 4, 4, 4, features))
    if mode == "unsynchronized":
        step = jax.jit(jax.grad(functools.partial(loss, axis_name=None)))
    elif mode == "pmap":
        step = jax.pmap(jax.grad(loss), axis_name="d")
    elif mode == "vmap":
        step = jax.jit(jax.vmap(jax.grad(loss), axis_name="d"))
    else:
        mesh = _mesh(DEVICES, ("d",))
        step = jax.jit(jax.shard_map(jax.grad(lambda x: loss(x[0])), mesh=mesh, in_specs=P("d"), out_specs=P("d")))
    assert "conditional(" in step.lower(x).compile().as_text()


def test_uncentered_statistics_take_one_small_all_reduce():
    features = 16
    mesh = _mesh(DEVICES, ("d",))
    rms = jax.shard_map(
        lambda x: normjax.rms_norm(x, reduction_axes=(0, 1), feature_axes=-1, axis_name="d"),
        mesh=mesh,
        in_specs=P("d"),
        out_specs=P("d"),
    )
    hlo = jax.jit(rms).lower(jnp.ones((2 * DEVICES, 4, features))).compile().as_text()
    assert _accelerators.collective_bytes(hlo, "all-reduce") == (1, 4 * (features + 1))
    assert _accelerators.collective_bytes(hlo, "all-gather") == (0, 0)


@pytest.mark.parametrize(
    "norm",
    [
        lambda x, s, b: normjax.batch_norm(
            x, normjax.init_batch_norm_state(x.shape[-1]), s, b, training=True, axis_name="d"
        )[0],
        lambda x, s, b: normjax.layer_norm(x, s, b, reduction_axes=(0, -1), feature_axes=-1, axis_name="d"),
    ],
    ids=["batch_norm", "layer_norm"],
)
def test_synchronized_reductions_keep_no_unit_axes(norm):
    """Every all-reduce of a synchronized forward+backward runs on squeezed statistics, e.g. f32[C], never
    f32[1, 1, 1, C]: XLA:CPU fuses each reduction with the reshape that feeds its all-reduce, and its reductions
    to a shape with unit axes are several times slower (synchronized BatchNorm was 5x slower than local)."""
    features = 16
    mesh = _mesh(DEVICES, ("d",))

    def grads(x, s, b, g):
        return jax.grad(lambda x, s, b: jnp.sum(norm(x, s, b) * g), argnums=(0, 1, 2))(x, s, b)

    step = jax.shard_map(grads, mesh=mesh, in_specs=(P("d"), P(), P(), P("d")), out_specs=(P("d"), P(), P()))
    x = jnp.ones((2 * DEVICES, 4, 4, features))
    hlo = jax.jit(step).lower(x, jnp.ones(features), jnp.zeros(features), x).compile().as_text()
    shapes = [m for line in hlo.splitlines() if " all-reduce(" in line for m in re.findall(r"f32\[([\d,]*)\]", line)]
    assert shapes, "expected all-reduces in a synchronized program"
    assert all("1," not in dims + "," for dims in shapes), shapes


# ------------------------------------------------------------------------------ GPU and TPU cost, deviceless

# Cases where the target is not met yet, measured on the current core (`make accelerators`). Each bound
# is that measurement (+1% on bytes): the test then guards against regressions while the gap stays visible.
# (platform, case, dtype, mode): (bytes ratio to Flax, device-memory ratio, kernels, temporary / input size)
KNOWN_GAPS = {
    ("cuda", "BatchNorm NHWC", "float32", "forward"): (1.02, None, 6, 1.0),
    ("cuda", "BatchNorm NHWC", "bfloat16", "forward"): (1.02, None, 6, 1.0),
    ("cuda", "BatchNorm NC", "float32", "forward"): (1.02, None, 4, 1.0),
    ("cuda", "BatchNorm NC", "float32", "forward+backward"): (1.02, None, 8, 1.0),
    ("cuda", "BatchNorm NC", "bfloat16", "forward+backward"): (1.02, None, 7, 2.01),
    ("cuda", "LayerNorm", "float32", "forward"): (1.02, None, 4, 1.0),
    ("cuda", "LayerNorm", "float32", "forward+backward"): (1.02, None, 8, 1.0),
    ("cuda", "LayerNorm", "bfloat16", "forward"): (1.02, None, 4, 1.0),
    ("cuda", "LayerNorm", "bfloat16", "forward+backward"): (1.02, None, 8, 1.0),
    ("cuda", "GroupNorm", "float32", "forward"): (1.02, None, 7, 1.0),
    ("cuda", "GroupNorm", "float32", "forward+backward"): (1.02, None, 13, 1.0),
    ("cuda", "GroupNorm", "bfloat16", "forward+backward"): (1.02, None, 13, 2.01),
    ("cuda", "InstanceNorm", "float32", "forward"): (1.02, None, 4, 1.0),
    ("cuda", "InstanceNorm", "float32", "forward+backward"): (1.02, None, 8, 1.0),
    ("cuda", "InstanceNorm", "bfloat16", "forward+backward"): (1.02, None, 8, 2.01),
    ("tpu", "BatchNorm NHWC", "float32", "forward"): (1.02, 1.02, 9, 1.0),
    ("tpu", "BatchNorm NHWC", "bfloat16", "forward"): (1.02, 1.02, 9, 1.0),
    ("tpu", "BatchNorm NHWC", "bfloat16", "forward+backward"): (1.02, 1.02, 17, 1.0),
    ("tpu", "BatchNorm NC", "float32", "forward"): (1.02, 1.02, 9, 1.0),
    ("tpu", "BatchNorm NC", "bfloat16", "forward"): (1.02, 1.02, 9, 1.0),
    ("tpu", "BatchNorm NC", "bfloat16", "forward+backward"): (1.02, 1.02, 17, 1.0),
    ("tpu", "LayerNorm", "float32", "forward"): (1.02, 1.02, 6, 1.0),
    ("tpu", "LayerNorm", "bfloat16", "forward"): (1.02, 1.02, 6, 1.0),
    ("tpu", "LayerNorm", "bfloat16", "forward+backward"): (1.02, 1.02, 8, 1.0),
    ("tpu", "GroupNorm", "float32", "forward"): (1.02, 1.02, 18, 1.0),
    # GroupNorm's backward on TPU: 8 more kernels than before the rule corrected by the offset's division error,
    # each a relayout of a (16, 32) array of statistics (2 KB) that the compiler inserts around that arithmetic.
    ("tpu", "GroupNorm", "float32", "forward+backward"): (1.02, 1.02, 39, 1.0),
    ("tpu", "GroupNorm", "bfloat16", "forward"): (1.02, 1.02, 19, 1.0),
    ("tpu", "GroupNorm", "bfloat16", "forward+backward"): (1.02, 1.02, 45, 1.0),
    ("tpu", "InstanceNorm", "float32", "forward"): (1.02, 1.02, 7, 1.0),
    ("tpu", "InstanceNorm", "bfloat16", "forward"): (1.02, 1.02, 7, 1.0),
    ("tpu", "InstanceNorm", "bfloat16", "forward+backward"): (1.02, 1.02, 14, 1.0),
}

_missing = [package for module, package in PLUGINS.items() if importlib.util.find_spec(module) is None]
needs_compilers = pytest.mark.skipif(
    bool(_missing), reason=f"deviceless GPU/TPU compilers not installed ({', '.join(_missing)}): the `aot` extra"
)


@functools.cache
def _cost(name, case, dtype, mode, platform):
    return cases.measure(name, case, dtype, mode, platform)


@needs_compilers
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_byte_count_of_an_elementwise_op_and_a_reduction(platform, dtype):
    x = jax.ShapeDtypeStruct((1024, 1024), jnp.dtype(dtype))
    size = x.size * x.dtype.itemsize

    double = _accelerators.compile_cost(lambda x: x * 2, x, platform=platform)
    assert (double.num_kernels, double.bytes_moved, double.hbm_bytes, double.temp_bytes) == (1, 2 * size, 2 * size, 0)

    total = _accelerators.compile_cost(lambda x: x.sum(0), x, platform=platform)
    # x read once from device memory and the 1024 sums written. The TPU compile stages x into on-chip memory first
    # (an asynchronous copy the reduction then reads) and passes the reduction its initial value as an operand.
    initial_value = x.dtype.itemsize if platform == "tpu" else 0
    assert total.hbm_bytes == size + 1024 * x.dtype.itemsize + initial_value
    assert total.num_kernels == (2 if platform == "tpu" else 1)


@needs_compilers
@pytest.mark.slow  # 48 deviceless GPU and TPU compiles of realistic shapes
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "case_name",
    ["BatchNorm NHWC", "BatchNorm NC", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm"],
)
def test_normjax_costs_no_more_than_flax_default(case_name, dtype, mode, platform):
    case = next(c for c in cases.CASES if c.name == case_name)
    ours = _cost("normjax", case, dtype, mode, platform)
    flax = _cost(cases.BASELINE, case, dtype, mode, platform)
    x_bytes = int(np.prod(case.shape)) * jnp.dtype(dtype).itemsize

    bytes_limit, hbm_limit, kernel_limit, temp_limit = KNOWN_GAPS.get(
        (platform, case_name, dtype, mode), (BYTES_TOLERANCE, BYTES_TOLERANCE, flax.num_kernels, 1.0)
    )
    problems = []
    measures = {"bytes": (lambda c: c.bytes_moved, bytes_limit)}
    if platform == "tpu":
        measures["device-memory bytes"] = (lambda c: c.hbm_bytes, hbm_limit)
    for label, (measure, limit) in measures.items():
        if measure(ours) > limit * measure(flax):
            problems.append(
                f"{label}: {measure(ours) / measure(flax):.3f}x Flax's ({measure(ours)} vs {measure(flax)}), "
                f"limit {limit}x"
            )
    if ours.num_kernels > kernel_limit:
        problems.append(f"kernels: {ours.num_kernels} vs Flax's {flax.num_kernels}, limit {kernel_limit}")
    if ours.temp_bytes is not None and ours.temp_bytes >= temp_limit * x_bytes:
        problems.append(f"temporary: {ours.temp_bytes} bytes = {ours.temp_bytes / x_bytes:.2f}x the input's size")
    assert not problems, "; ".join(problems) + "\nnormjax " + ours.summary() + "\nFlax " + flax.summary()
