"""Test setup: 8 simulated CPU devices, set before JAX initializes."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU runs each simulated device's part of a collective on its own thread of a pool sized max(cores, devices):
# with exactly one thread per device, a thread busy elsewhere can leave a collective waiting forever (seen on
# 2-core machines). NPROC sizes that pool; docs pages and examples run as subprocesses inherit it.
os.environ.setdefault("NPROC", "32")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
