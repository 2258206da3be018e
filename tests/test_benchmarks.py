"""The benchmark suite runs, times what it says it times, and measures the accuracy it reports.

Timings are never asserted here (the machines are noisy); only the structure of the results and the accuracy
column, which is deterministic.
"""

import jax
import pytest

from benchmarks import _peers, _timing

pytestmark = pytest.mark.slow  # compiles and times every peer library's implementation


def test_interleaved_takes_warm_samples_of_every_callable():
    calls = {"a": 0, "b": 0}

    def counter(name):
        def call():
            calls[name] += 1

        return call

    medians = _timing.interleaved({name: counter(name) for name in calls}, rounds=3, calls_per_sample=2)
    assert calls == {"a": 9, "b": 9}  # per round: one untimed call, then two timed ones
    assert set(medians) == {"a", "b"} and all(m >= 0 for m in medians.values())


def test_run_case_reports_every_implementation_with_ratios_and_accuracy():
    with jax.numpy_rank_promotion("allow"):  # peers' code (Flax, Haiku, plain jnp) broadcasts implicitly
        rows, bandwidth = _peers.run_case("batch_norm", "NHWC", (2, 4, 4, 8), rounds=1)
    impls = {row["impl"] for row in rows}
    assert {"normjax", _peers.BASELINE, _peers.CONTROL, "flax.linen (two-pass)", "pytorch"} <= impls
    assert all({row["mode"] for row in rows if row["impl"] == impl} == {"fwd", "fwd+bwd"} for impl in impls)
    assert all(row["ratio"] == 1.0 for row in rows if row["impl"] == _peers.BASELINE)
    assert bandwidth > 0 and all(row["seconds"] > 0 for row in rows)

    errors = {row["impl"]: row["max_error_at_offsets"] for row in rows if "max_error_at_offsets" in row}
    # At a mean of 1e4 (std 1) two-pass stays at float32's resolution of the input; one-pass E[x^2] - E[x]^2
    # loses the variance.
    assert errors["normjax"][2] < 1e-2
    assert errors["flax.linen (two-pass)"][2] < 1e-2
    assert errors[_peers.BASELINE][2] > 100 * errors["normjax"][2]
