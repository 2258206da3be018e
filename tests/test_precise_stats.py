"""Precise BatchNorm statistics against a float64 computation over the concatenated batches."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax
import normjax.linen
from tests import reference


def _mlp(batch_norm):
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = batch_norm(use_running_average=not train, momentum=0.9, name="bn1")(nn.Dense(4, name="d1")(x))
            x = nn.Dense(3, name="d2")(nn.relu(x))
            return batch_norm(use_running_average=not train, momentum=0.99, name="bn2")(x)

    return Mlp()


def _float64_inputs_of_batch_norms(params, batch):
    """The inputs each BatchNorm sees in training for one batch, computed in float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h1 = np.asarray(batch, np.float64) @ p["d1"]["kernel"] + p["d1"]["bias"]
    y1, *_ = reference.batch_norm_train(h1, p["bn1"]["scale"], p["bn1"]["bias"])
    h2 = np.maximum(y1, 0.0) @ p["d2"]["kernel"] + p["d2"]["bias"]
    return {"bn1": h1, "bn2": h2}


# Flax's default one-pass variance loses ~1e-4 relative accuracy on these offset inputs; its exact variant does not.
EXACT_FLAX_BATCH_NORM = functools.partial(nn.BatchNorm, use_fast_variance=False)


@pytest.mark.parametrize("batch_norm", [EXACT_FLAX_BATCH_NORM, normjax.linen.BatchNorm], ids=["flax", "normjax"])
def test_precise_statistics_match_float64(batch_norm):
    model = _mlp(batch_norm)
    sizes = (3, 5, 8)
    keys = jax.random.split(jax.random.key(0), len(sizes))
    # A large offset that shifts between batches: the between-batch spread matters for the variance.
    batches = [
        jax.random.normal(k, (n, 2)) * 2.0 + 50.0 + 3.0 * i for i, (k, n) in enumerate(zip(keys, sizes, strict=True))
    ]
    variables = model.init(jax.random.key(1), batches[0], train=False)
    params = jax.tree.map(lambda a: a + 0.3, variables["params"])  # non-trivial scale and bias
    variables = {**variables, "params": params}

    @jax.jit
    def apply_fn(v, batch):
        return model.apply(v, batch, train=True, mutable=["batch_stats"])[1]["batch_stats"]

    pooled = normjax.precise_batch_stats(apply_fn, variables, batches)
    averaged = normjax.precise_batch_stats(apply_fn, variables, batches, variance="mean")

    per_batch = [_float64_inputs_of_batch_norms(params, b) for b in batches]
    for name in ("bn1", "bn2"):
        everything = np.concatenate([inputs[name] for inputs in per_batch])
        np.testing.assert_allclose(pooled[name]["mean"], everything.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(pooled[name]["var"], everything.var(0), rtol=1e-4)
        weighted_var = sum(n * inputs[name].var(0) for n, inputs in zip(sizes, per_batch, strict=True)) / sum(sizes)
        np.testing.assert_allclose(averaged[name]["var"], weighted_var, rtol=1e-4)
        np.testing.assert_array_equal(averaged[name]["mean"], pooled[name]["mean"])
        assert pooled[name]["mean"].dtype == jnp.float32
    # The batches' means differ, so the pooled variance exceeds the mean of the batch variances.
    assert np.all(np.asarray(pooled["bn1"]["var"]) > np.asarray(averaged["bn1"]["var"]))


def test_batch_size_function_weights_batches():
    model = nn.BatchNorm(use_running_average=False, momentum=0.5)
    variables = model.init(jax.random.key(0), jnp.ones((2, 1)))
    apply_fn = lambda v, b: model.apply(v, b["x"], mutable=["batch_stats"])[1]["batch_stats"]  # noqa: E731
    batches = [{"x": jnp.array([[0.0], [2.0]])}, {"x": jnp.array([[10.0], [12.0]])}]
    stats = normjax.precise_batch_stats(apply_fn, variables, batches, batch_size=lambda b: 3 if b["x"][0, 0] else 1)
    np.testing.assert_allclose(stats["mean"], [(1.0 + 3 * 11.0) / 4])


def test_errors_are_clear():
    model = nn.BatchNorm(use_running_average=False)
    variables = model.init(jax.random.key(0), jnp.ones((2, 1)))
    apply_fn = lambda v, b: model.apply(v, b, mutable=["batch_stats"])[1]["batch_stats"]  # noqa: E731
    with pytest.raises(ValueError, match="`batches` is empty"):
        normjax.precise_batch_stats(apply_fn, variables, [])
    with pytest.raises(ValueError, match="'pooled' or 'mean'"):
        normjax.precise_batch_stats(apply_fn, variables, [], variance="biased")
    with pytest.raises(ValueError, match="no 'batch_stats' collection"):
        normjax.precise_batch_stats(apply_fn, {"params": variables["params"]}, [])
    frozen = nn.BatchNorm(use_running_average=False, momentum=1.0)
    frozen_fn = lambda v, b: frozen.apply(v, b, mutable=["batch_stats"])[1]["batch_stats"]  # noqa: E731
    with pytest.raises(ValueError, match="momentum=1.0"):
        normjax.precise_batch_stats(frozen_fn, variables, [jnp.ones((2, 1))])
