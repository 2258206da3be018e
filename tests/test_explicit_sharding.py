"""The norms on a mesh with explicit axis types (``jax.make_mesh``'s default): same results as unsharded.

With ``AxisType.Explicit`` shardings are part of array types, so every reshape that merges a sharded axis with
others must say its output sharding. Each norm is run under ``jax.jit`` on an input sharded over the batch (and,
for the per-example norms, the features), forward and backward, and compared with the same call on one device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import normjax

C = 64
NORMS = {
    "batch_norm": lambda x: normjax.batch_norm(x, normjax.init_batch_norm_state(C), training=True)[0],
    "layer_norm": lambda x: normjax.layer_norm(x),
    "rms_norm": lambda x: normjax.rms_norm(x),
    "group_norm": lambda x: normjax.group_norm(x, num_groups=8),
    "instance_norm": lambda x: normjax.instance_norm(x),
}
CASES = [
    ("batch_norm", (16, C), P("data")),
    ("batch_norm", (16, 8, C), P("data")),
    ("batch_norm", (16, 4, 4, C), P("data")),
    ("batch_norm", (16, C), P("data", "model")),
    ("layer_norm", (16, 8, C), P("data")),
    ("layer_norm", (16, 8, C), P("data", None, "model")),
    ("rms_norm", (16, 8, C), P("data", None, "model")),
    ("group_norm", (16, 4, 4, C), P("data")),
    ("instance_norm", (16, 4, 4, C), P("data")),
]


IDS = [f"{name}-{len(shape)}d-" + "-".join(map(str, spec)) for name, shape, spec in CASES]


@pytest.mark.parametrize("name, shape, spec", CASES, ids=IDS)
def test_norm_on_explicit_mesh_equals_unsharded(name, shape, spec):
    norm = NORMS[name]
    x = jax.random.normal(jax.random.key(0), shape) * 2.0 + 3.0
    loss = lambda x: jnp.sum(norm(x) * jnp.cos(x))  # noqa: E731
    want_y, want_grad = jax.jit(norm)(x), jax.jit(jax.grad(loss))(x)
    with jax.set_mesh(jax.make_mesh((2, 4), ("data", "model"))):
        sharded = jax.device_put(x, spec)
        y, grad = jax.jit(norm)(sharded), jax.jit(jax.grad(loss))(sharded)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-4)
