"""One process of the two-process synchronized-BatchNorm check in ``test_multihost.py``.

Run as ``python multihost_worker.py <process_id> <num_processes> <port>``; the test starts one per process. Each
process initializes JAX's distributed runtime over 127.0.0.1 with gloo CPU collectives, builds a mesh over every
global device, feeds its own devices' rows of a deterministic global batch, and prints the synchronized
statistics as one JSON line for the parent to compare against a float64 reference of the whole batch.
Importing this module (pytest's doctest collection does) runs nothing.
"""

from __future__ import annotations

import json
import sys

import numpy as np

ROWS_PER_DEVICE = 8
FEATURES = 3
# Valid rows per global device in the uneven case: the Flax probe's 8, 1, 1, 1, a device with none, and more.
UNEVEN_COUNTS = (8, 1, 1, 1, 0, 3, 2, 5)


def global_batch(num_devices: int) -> tuple[np.ndarray, np.ndarray]:
    """The global batch ``(num_devices * ROWS_PER_DEVICE, FEATURES)`` with a large offset, and its uneven mask."""
    rng = np.random.default_rng(1234)
    x = (1e4 + rng.normal(size=(num_devices * ROWS_PER_DEVICE, FEATURES)) * np.arange(1, FEATURES + 1)).astype(
        np.float32
    )
    counts = (UNEVEN_COUNTS * num_devices)[:num_devices]
    rows = np.arange(ROWS_PER_DEVICE)
    mask = np.concatenate([rows < c for c in counts])[:, None]
    return x, mask


def _synchronized_statistics() -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import normjax

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    x, mask = global_batch(jax.device_count())
    sharding = NamedSharding(mesh, P("batch"))
    local = lambda a: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])  # noqa: E731

    def train_step(x, mask):
        state = normjax.init_batch_norm_state(FEATURES)
        _, plain = normjax.batch_norm(x, state, training=True, momentum=0.0, axis_name="batch")
        _, masked = normjax.batch_norm(x, state, training=True, momentum=0.0, axis_name="batch", mask=mask)
        counts = normjax.moments(x, 0, mask=mask, axis_name="batch").count
        return plain, masked, counts

    step = jax.jit(
        jax.shard_map(train_step, mesh=mesh, in_specs=(P("batch"), P("batch")), out_specs=P())
    )  # statistics are psum'd, hence replicated (P()) on every device of both processes
    plain, masked, counts = step(local(x), local(mask))
    as_list = lambda a: np.asarray(a.addressable_data(0), np.float64).tolist()  # noqa: E731
    return {
        "process_index": jax.process_index(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "mean": as_list(plain.mean),
        "var": as_list(plain.var),
        "masked_mean": as_list(masked.mean),
        "masked_var": as_list(masked.var),
        "masked_count": as_list(counts),
        "dtype": str(jnp.result_type(plain.mean)),
    }


def main(process_id: int, num_processes: int, port: int) -> None:
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=30,
    )
    try:
        print(json.dumps(_synchronized_statistics()), flush=True)
    finally:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
