"""A quiet timing setup for the benchmarks: one pinned core, stable memory, steady-state blocks of calls.

Why each part (measured on the 2-core CI-like VM, ``XLA:CPU``): with the defaults, two *identical* compiled
programs (normjax's and Flax's RMSNorm forward lower to the same HLO) timed 1.0x-1.4x apart, and the same build
gave ratios 2.5x apart in two runs. Three causes, three fixes:

* **Page faults.** glibc returns large freed buffers to the kernel, so an output buffer is often fresh memory
  whose first touch faults page by page; that cost (up to half the run time of a 25 MB normalization) lands on
  whichever program happens to get the fresh buffer. ``MALLOC_TRIM_THRESHOLD_``/``MALLOC_MMAP_THRESHOLD_``/
  ``MALLOC_TOP_PAD_`` keep freed memory in the process.
* **Threads.** XLA:CPU and PyTorch each run a thread pool over the two cores and compete with anything else on
  the machine; the published numbers are for one core. Everything runs on one pinned core with
  single-threaded XLA (``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``) and PyTorch
  (``torch.set_num_threads(1)``).
* **Cold calls.** Each sample is a block of ``calls_per_sample`` back-to-back calls after one untimed call, so
  every program is measured with its own buffers warm; blocks of different programs are interleaved in
  rotating order, so slow drifts of the machine hit every program alike.

With this setup identical programs time within 1 % of each other, and ratios repeat to a few percent between runs.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

_ENVIRONMENT = {
    "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
    "MALLOC_MMAP_THRESHOLD_": str(1 << 32),
    "MALLOC_TOP_PAD_": str(1 << 30),
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "NORMJAX_BENCH_QUIET": "1",
}


def quiet_process() -> None:
    """Re-executes this script once with the environment above, pinned to the machine's last core (on Linux).

    Must run before JAX (or PyTorch) is imported: XLA reads its flags and glibc its malloc settings at start-up.
    Extra ``XLA_FLAGS`` already set by the caller are kept.
    """
    if os.environ.get("NORMJAX_BENCH_QUIET") == "1":
        return
    environment = dict(os.environ, **_ENVIRONMENT)
    environment["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_ENVIRONMENT['XLA_FLAGS']}".strip()
    if hasattr(os, "sched_setaffinity"):  # Linux; elsewhere the process is not pinned
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # inherited by the re-executed process
    os.execve(sys.executable, [sys.executable, *sys.argv], environment)


def interleaved(callables: dict, rounds: int, calls_per_sample: int = 3) -> dict:
    """Median seconds per call of each callable.

    Each round takes one sample of every callable, in a rotating order; a sample is one untimed call, then
    ``calls_per_sample`` timed back-to-back calls, averaged.
    """
    names = list(callables)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            call = callables[name]
            call()
            start = time.perf_counter()
            for _ in range(calls_per_sample):
                call()
            times[name].append((time.perf_counter() - start) / calls_per_sample)
    return {name: statistics.median(t) for name, t in times.items()}
