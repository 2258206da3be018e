"""The benchmark suite runs, times what it says it times, and measures the accuracy it reports.

Timings are never asserted here (the machines are noisy); only the structure of the results and what is
deterministic: the accuracy column, the collectives of a compiled program, the losses of a few training steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from benchmarks import _peers, _timing, sync_scaling

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


def test_conv_net_step_keeps_its_carry_with_every_batch_norm():
    """The compiled shard_map step of ``sync_scaling`` runs again on its own output: the carry keeps one structure
    (an ahead-of-time compiled step, as the benchmark runs it, does not retrace)."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("d",))
    images, labels = jnp.ones((4, 6, 6, 3)), jnp.arange(4)
    optimizer = optax.sgd(0.05)
    for norm in ("normjax", "flax"):
        params, states = sync_scaling.init_model(jax.random.key(0), 3)
        carry = (params, optimizer.init(params), states)
        step = sync_scaling.make_train_step(mesh, True, optimizer, norm).lower(*carry, images, labels).compile()
        for _ in range(2):
            *carry, loss = step(*carry, images, labels)
        assert np.isfinite(loss)


def test_resnet_under_pmap_reports_every_batch_norm_its_collectives_and_losses():
    result = sync_scaling.resnet_under_pmap(quick=True)
    rows = {row["batch_norm"]: row for row in result["rows"]}
    assert list(rows) == list(sync_scaling.RESNET_BATCH_NORMS)
    assert all(row["ms"] > 0 and len(row["times_s"]) == result["rounds"] for row in rows.values())
    assert rows["flax default"]["over_flax_default"] == 1.0
    # Static facts of the compiled steps: normjax's synchronized statistics take one all-reduce per layer in the
    # forward, so its step holds as many all-reduces as Flax default's; Flax's exact variance needs a second round.
    all_reduces = {name: row["all_reduce"][0] for name, row in rows.items()}
    assert all_reduces["normjax"] == all_reduces["flax default"] == all_reduces["flax default (control copy)"]
    assert all_reduces["flax exact"] > all_reduces["flax default"]
    assert all(row["all_gather"] == (0, 0) for row in rows.values())
    # The one-import swap trains as Flax's exact layer does, from the same weights on the same batches.
    losses = {name: np.array(row["losses"]) for name, row in rows.items()}
    assert len(losses["normjax"]) >= 2 and np.all(np.isfinite(losses["normjax"]))
    assert result["max_loss_difference"]["normjax vs flax exact"] < 1e-5
    np.testing.assert_allclose(losses["normjax"], losses["flax exact"], atol=1e-5)
