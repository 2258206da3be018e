"""What each normalization costs on a GPU (H100) and a TPU (v5e), measured by their compilers on a CPU-only machine.

XLA's GPU and TPU compilers run deviceless (see ``_accelerators.py``): each implementation is compiled for the
target and its optimized HLO read off. Normalizations do a few flops per byte, so their speed on these devices is
the memory traffic, which the compile determines: which kernels run and which arrays each reads and writes.

For BatchNorm (NHWC conv activations and (N, C) MLP activations), LayerNorm and RMSNorm ((B, T, D) sequences),
GroupNorm (32 groups) and InstanceNorm (NHWC), in float32 and bfloat16 (parameters and statistics in float32,
output in the input's dtype), compiles

* **forward**: ``y = norm(x)``, BatchNorm in training mode returning its new running statistics too;
* **forward+backward**: ``y`` and the gradients of ``sum(y * g)`` with respect to ``x``, scale and bias, ``g`` an
  input (``jax.vjp``, as inside a network),

for normjax (its functional API), ``flax.linen``'s layers with their defaults (one-pass ``E[x²] − E[x]²``
variance), the same layers with ``use_fast_variance=False`` (two-pass) and a plain ``jnp.mean``/``jnp.var``
implementation, and reports, per compile:

* **kernels**: launches in the entry computation (fusions, reductions, copies, custom-calls, collectives);
* **bytes**: what those kernels read and write (``_accelerators.Cost.bytes_moved``), and on TPU also the part in
  device memory (XLA may prefetch an array that fits into on-chip VMEM and read it from there) and XLA's own
  ``cost_analysis()["bytes accessed"]``;
* **temp**: temporary device memory, as a multiple of ``x``'s size (a full-size temporary shows as >= 1);
* **ratio to the minimum**: bytes over the least any implementation must move:

  .. math::

     \\text{forward:}\\quad |x| + |\\text{params}| + |y|, \\qquad
     \\text{forward+backward:}\\quad |x| + |\\text{params}| + |g| + |y| + |dx| + |d\\text{params}|

  where ``|a|`` is the size of ``a`` in bytes (params: scale and bias, float32; BatchNorm's running statistics
  are read and written too but are per-feature, as small as the params, and left out).

A synchronized section compiles BatchNorm inside ``jax.shard_map`` over a 4-device mesh (``axis_name="data"``,
each device holding a quarter of the batch) and counts the collectives in the forward and forward+backward.

Usage::

    JAX_PLATFORMS=cpu python benchmarks/accelerators.py --out outputs/accelerators

Writes ``results.json`` (every measurement) and ``results.md`` (the tables) into ``--out``. Needs the ``aot``
extra (the GPU and TPU compiler plugins); no accelerator.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import `benchmarks` from the root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import _accelerators  # noqa: E402
from benchmarks._accelerator_cases import (  # noqa: E402
    BASELINE,
    CASES,
    IMPLEMENTATIONS,
    MODES,
    Case,
    arg_specs,
    implementation,
    measure,
    program,
)

SYNC_DEVICES = 4
PLATFORMS = {"cuda": "GPU (H100)", "tpu": "TPU (v5e)"}
DTYPES = ("float32", "bfloat16")


def minimum_bytes(case: Case, dtype: str, mode: str) -> int:
    """The least any implementation must move (see the module's docstring)."""
    x = int(np.prod(case.shape)) * jnp.dtype(dtype).itemsize
    params = (1 if case.norm == "rms_norm" else 2) * case.features * 4
    if mode == "forward":
        return x + params + x
    return 4 * x + 2 * params  # read x, g; write y, dx; params in and their gradients out


def measure_synchronized(name: str, case: Case, dtype: str, mode: str, platform: str) -> _accelerators.Cost:
    """The same, synchronized over a mesh of :data:`SYNC_DEVICES` devices (``shard_map``, batch split)."""
    topology = (
        _accelerators.gpu_topology(topology=f"1x1x{SYNC_DEVICES}")
        if platform == "cuda"
        else _accelerators.tpu_topology()
    )
    mesh = jax.sharding.Mesh(np.array(topology.devices[:SYNC_DEVICES]), ("data",))
    f = program(implementation(name, case, axis_name="data"), mode)
    specs = arg_specs(case, dtype, mode)
    in_specs = jax.tree.map(lambda s: P("data") if s.ndim == len(case.shape) else P(), specs)
    out_specs = (P("data"), P()) if mode == "forward" else (P("data"), P(), (P("data"), P()))
    sharded = jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), in_specs)
    return _accelerators.compile_cost(sharded, *specs, platform=platform, topology=topology, in_shardings=shardings)


# ------------------------------------------------------------------------------------------------------ report


def _record(cost: _accelerators.Cost, case: Case, dtype: str, mode: str) -> dict:
    x_bytes = int(np.prod(case.shape)) * jnp.dtype(dtype).itemsize
    return {
        "kernels": cost.num_kernels,
        "collectives": cost.num_collectives,
        "bytes": cost.bytes_moved,
        "device_memory_bytes": cost.hbm_bytes,
        "bytes_accessed": cost.bytes_accessed,
        "temp_bytes": cost.temp_bytes,
        "temp_over_x": None if cost.temp_bytes is None else cost.temp_bytes / x_bytes,
        "minimum_bytes": minimum_bytes(case, dtype, mode),
        "kernel_list": [dataclasses.asdict(k) for k in cost.kernels],
    }


def _markdown(results: list[dict], synchronized: list[dict]) -> str:
    def find(rows, **keys):
        return next(r for r in rows if all(r[k] == v for k, v in keys.items()))

    lines = ["# Normalization cost on GPU and TPU (deviceless XLA compiles)", ""]
    lines.append(f"jax {jax.__version__}; per cell: kernels, bytes moved / minimum bytes, temp / |x|.")
    for platform, title in PLATFORMS.items():
        measures = [("bytes", "bytes every kernel reads and writes")]
        if platform == "tpu":
            measures += [
                ("device_memory_bytes", "the part in device memory (HBM), VMEM-resident reads excluded"),
                ("bytes_accessed", 'XLA\'s cost_analysis()["bytes accessed"]'),
            ]
        for key, meaning in measures:
            lines += ["", f"## {title}: {key} ({meaning})", ""]
            header = "| case | dtype | pass | " + " | ".join(IMPLEMENTATIONS) + " | normjax ÷ Flax |"
            lines += [header, "|" + "---|" * (header.count("|") - 1)]
            for case in CASES:
                for dtype in DTYPES:
                    for mode in MODES:
                        rows = {
                            name: find(results, platform=platform, case=case.name, dtype=dtype, mode=mode, impl=name)
                            for name in IMPLEMENTATIONS
                        }
                        cells = []
                        for name in IMPLEMENTATIONS:
                            r = rows[name]
                            temp = "" if r["temp_over_x"] is None else f", temp {r['temp_over_x']:.2f}"
                            cells.append(f"{r['kernels']} k, {r[key] / r['minimum_bytes']:.2f}×{temp}")
                        ratio = rows["normjax"][key] / rows[BASELINE][key]
                        lines.append(f"| {case.name} | {dtype} | {mode} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    lines += ["", f"## Synchronized BatchNorm ({SYNC_DEVICES} devices, shard_map): collectives / kernels", ""]
    header = "| platform | case | dtype | pass | " + " | ".join(IMPLEMENTATIONS) + " |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r0 in synchronized:
        if r0["impl"] != "normjax":
            continue
        keys = {k: r0[k] for k in ("platform", "case", "dtype", "mode")}
        cells = [
            f"{r['collectives']} / {r['kernels']}"
            for r in (find(synchronized, impl=name, **keys) for name in IMPLEMENTATIONS)
        ]
        lines.append(
            f"| {PLATFORMS[r0['platform']]} | {r0['case']} | {r0['dtype']} | {r0['mode']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json and results.md")
    args = parser.parse_args()
    reason = _accelerators.compilers_available()
    if reason is not None:
        raise SystemExit(f"The deviceless GPU/TPU compilers do not load ({reason}); install the `aot` extra.")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results, synchronized = [], []
    for platform in PLATFORMS:
        for case in CASES:
            for dtype in DTYPES:
                for mode in MODES:
                    for name in IMPLEMENTATIONS:
                        cost = measure(name, case, dtype, mode, platform)
                        keys = dict(platform=platform, case=case.name, dtype=dtype, mode=mode, impl=name)
                        results.append(keys | _record(cost, case, dtype, mode))
                    print(platform, case.name, dtype, mode, flush=True)
        for case in (c for c in CASES if c.norm == "batch_norm"):
            for mode in MODES:
                for name in IMPLEMENTATIONS:
                    cost = measure_synchronized(name, case, "float32", mode, platform)
                    keys = dict(platform=platform, case=case.name, dtype="float32", mode=mode, impl=name)
                    synchronized.append(keys | _record(cost, case, "float32", mode))
    meta = {"jax": jax.__version__, "seconds": time.perf_counter() - start, "sync_devices": SYNC_DEVICES}
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "results": results, "synchronized": synchronized}, indent=1)
    )
    (args.out / "results.md").write_text(_markdown(results, synchronized))
    print(f"wrote {args.out}/results.md and results.json in {meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()
