"""Synchronized BatchNorm across two processes (hosts) with JAX's distributed runtime and gloo CPU collectives.

Two worker processes (``multihost_worker.py``) on 127.0.0.1, four CPU devices each, synchronize statistics over
all eight global devices; the result must equal the float64 statistics of the concatenated global batch.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import reference
from multihost_worker import ROWS_PER_DEVICE, global_batch

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
TIMEOUT_S = 60  # for the whole run, both workers together
WORKER = Path(__file__).with_name("multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict[str, str]:
    """The parent's environment minus its 8-device XLA_FLAGS: each child simulates its own 4 devices."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    env["JAX_PLATFORMS"] = "cpu"
    # normjax from this checkout even when it is not installed (the parent imports it from the repository root).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WORKER.parents[1]), env.get("PYTHONPATH")]))
    return env


pytestmark = pytest.mark.slow  # two worker processes start JAX's distributed runtime


class _PortTaken(Exception):
    """The coordinator could not bind its port: another process took it between _free_port() and the bind."""


_PORT_TAKEN_MESSAGES = ("already in use", "Failed to add port")


def _run_workers_once(port: int) -> list[dict]:
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), str(port)],
            env=_child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    outputs, deadline = [], time.monotonic() + TIMEOUT_S
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
            if proc.returncode != 0 and any(message in stderr for message in _PORT_TAKEN_MESSAGES):
                raise _PortTaken(stderr[-1000:])
            assert proc.returncode == 0, f"worker failed with code {proc.returncode}:\n{stderr[-3000:]}"
            outputs.append(stdout)
    finally:
        for proc in procs:  # a worker left waiting for a dead peer must not outlive the test
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    # gloo prints connection lines on stdout too; the result is the one JSON line.
    return [json.loads(next(line for line in out.splitlines() if line.startswith("{"))) for out in outputs]


def _run_workers(attempts: int = 3) -> list[dict]:
    """Runs the workers, on a fresh port again if the free port was taken before the coordinator bound it."""
    for _ in range(attempts - 1):
        try:
            return _run_workers_once(_free_port())
        except _PortTaken:
            continue
    return _run_workers_once(_free_port())


@pytest.fixture(scope="module")
def worker_results() -> list[dict]:
    return _run_workers()


def test_workers_form_one_eight_device_system(worker_results):
    assert sorted(r["process_index"] for r in worker_results) == list(range(NUM_PROCESSES))
    for r in worker_results:
        assert r["device_count"] == NUM_PROCESSES * DEVICES_PER_PROCESS
        assert r["local_device_count"] == DEVICES_PER_PROCESS
        assert r["dtype"] == "float32"


@pytest.mark.parametrize("masked", [False, True], ids=["full", "uneven_mask"])
def test_statistics_equal_the_global_batch(worker_results, masked):
    x, mask = global_batch(NUM_PROCESSES * DEVICES_PER_PROCESS)
    mean, var, count = reference.moments(x, 0, mask if masked else None)
    prefix = "masked_" if masked else ""
    for r in worker_results:
        # mean ~1e4 in float32 (one ulp ~1e-3): the two-pass variance is still exact to ~1e-6 relative.
        np.testing.assert_allclose(r[prefix + "mean"], mean[0], rtol=5e-7)
        np.testing.assert_allclose(r[prefix + "var"], var[0], rtol=2e-6)
        if masked:
            np.testing.assert_array_equal(r["masked_count"], count[0])
            assert count[0, 0] < x.shape[0] and x.shape[0] == NUM_PROCESSES * DEVICES_PER_PROCESS * ROWS_PER_DEVICE
    # Both hosts hold bit-identical statistics, so their running averages can never drift apart.
    assert worker_results[0] == {**worker_results[1], "process_index": worker_results[0]["process_index"]}
