"""On a GPU (H100) and a TPU (v5e), normjax costs no more than Flax's default layers, by XLA's own compilers.

The compilers run deviceless on the CPU (``benchmarks/_accelerators.py``), so these checks are static and
deterministic: no timing, no accelerator. For every case of ``benchmarks/accelerators.py`` (each norm on its
realistic shape, float32 and bfloat16, forward and forward+backward), normjax's compiled program must

* move at most 1.02x the bytes of ``flax.linen``'s default layer (on TPU, also the device-memory part);
* launch no more kernels;
* allocate no temporary as large as the input;

except in the cases of ``KNOWN_GAPS``, where the target is not met yet and the bound is today's measurement.

Skipped only when the compiler plugins (the ``aot`` extra) are not installed.
"""

import functools
import importlib
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PLUGINS = {"jax_plugins.xla_cuda12": "jax-cuda12-plugin", "libtpu": "jax[tpu]"}
BYTES_TOLERANCE = 1.02

# Cases where the target is not met yet, measured on the current core (benchmarks/accelerators.py). Each bound
# is that measurement (+1% on bytes): the test then guards against regressions while the gap stays visible.
# (platform, case, dtype, mode): (bytes ratio to Flax, device-memory ratio, kernels, temporary / input size)
KNOWN_GAPS = {
    ("cuda", "BatchNorm NHWC", "float32", "forward"): (1.02, None, 6, 1.0),
    ("cuda", "BatchNorm NHWC", "bfloat16", "forward"): (1.02, None, 6, 1.0),
    ("cuda", "BatchNorm NC", "float32", "forward"): (1.683, None, 5, 1.0),
    ("cuda", "BatchNorm NC", "float32", "forward+backward"): (1.02, None, 8, 1.0),
    ("cuda", "BatchNorm NC", "bfloat16", "forward"): (2.354, None, 5, 2.01),
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
    ("tpu", "BatchNorm NHWC", "float32", "forward"): (1.02, 1.02, 10, 1.0),
    ("tpu", "BatchNorm NHWC", "bfloat16", "forward"): (1.02, 1.02, 10, 1.0),
    ("tpu", "BatchNorm NHWC", "bfloat16", "forward+backward"): (1.02, 1.02, 19, 1.0),
    ("tpu", "BatchNorm NC", "float32", "forward"): (1.02, 1.02, 11, 1.0),
    ("tpu", "BatchNorm NC", "float32", "forward+backward"): (1.02, 1.02, 19, 1.0),
    ("tpu", "BatchNorm NC", "bfloat16", "forward"): (1.02, 1.02, 11, 1.0),
    ("tpu", "BatchNorm NC", "bfloat16", "forward+backward"): (1.02, 1.02, 19, 1.0),
    ("tpu", "LayerNorm", "float32", "forward"): (1.02, 1.02, 8, 1.0),
    ("tpu", "LayerNorm", "float32", "forward+backward"): (1.02, 1.02, 14, 1.0),
    ("tpu", "LayerNorm", "bfloat16", "forward"): (1.02, 1.02, 9, 1.0),
    ("tpu", "LayerNorm", "bfloat16", "forward+backward"): (1.02, 1.02, 12, 1.0),
    ("tpu", "GroupNorm", "float32", "forward"): (1.02, 1.02, 25, 1.0),
    ("tpu", "GroupNorm", "float32", "forward+backward"): (1.02, 1.02, 42, 1.0),
    ("tpu", "GroupNorm", "bfloat16", "forward"): (1.02, 1.02, 27, 1.0),
    ("tpu", "GroupNorm", "bfloat16", "forward+backward"): (1.02, 1.02, 48, 1.0),
    ("tpu", "InstanceNorm", "float32", "forward"): (1.02, 1.02, 9, 1.0),
    ("tpu", "InstanceNorm", "float32", "forward+backward"): (1.02, 1.02, 11, 1.0),
    ("tpu", "InstanceNorm", "bfloat16", "forward"): (1.02, 1.02, 9, 1.0),
    ("tpu", "InstanceNorm", "bfloat16", "forward+backward"): (1.02, 1.02, 16, 1.0),
}

_missing = [package for module, package in PLUGINS.items() if importlib.util.find_spec(module) is None]
pytestmark = pytest.mark.skipif(
    bool(_missing), reason=f"deviceless GPU/TPU compilers not installed ({', '.join(_missing)}): the `aot` extra"
)


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("accelerators")
    finally:
        sys.path.remove(str(BENCHMARKS))


@functools.cache
def _cost(bench, name, case, dtype, mode, platform):
    return bench.measure(name, case, dtype, mode, platform)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_byte_count_of_an_elementwise_op_and_a_reduction(bench, platform, dtype):
    accelerators = bench._accelerators
    x = jax.ShapeDtypeStruct((1024, 1024), jnp.dtype(dtype))
    size = x.size * x.dtype.itemsize

    double = accelerators.compile_cost(lambda x: x * 2, x, platform=platform)
    assert (double.num_kernels, double.bytes_moved, double.hbm_bytes, double.temp_bytes) == (1, 2 * size, 2 * size, 0)

    total = accelerators.compile_cost(lambda x: x.sum(0), x, platform=platform)
    # x read once from device memory and the 1024 sums written. The TPU compile stages x into on-chip memory first
    # (an asynchronous copy the reduction then reads) and passes the reduction its initial value as an operand.
    initial_value = x.dtype.itemsize if platform == "tpu" else 0
    assert total.hbm_bytes == size + 1024 * x.dtype.itemsize + initial_value
    assert total.num_kernels == (2 if platform == "tpu" else 1)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "case_name",
    ["BatchNorm NHWC", "BatchNorm NC", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm"],
)
def test_normjax_costs_no_more_than_flax_default(bench, case_name, dtype, mode, platform):
    case = next(c for c in bench.CASES if c.name == case_name)
    ours = _cost(bench, "normjax", case, dtype, mode, platform)
    flax = _cost(bench, bench.BASELINE, case, dtype, mode, platform)
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
