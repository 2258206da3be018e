"""The GroupNorm paper's batch-size experiment (Wu & He 2018, Figure 1): test error vs images per worker.

A small ResNet is trained by 8 workers with BatchNorm (each worker's own batch), synchronized BatchNorm (the
statistics of all 8 workers' batches), GroupNorm, LayerNorm and InstanceNorm, for per-worker batch sizes from 32
down to 2, the same number of epochs each and a learning rate scaled linearly with the global batch (as in the
paper). The 8 workers are simulated in one process with ``jax.vmap(..., axis_name="workers")``: normjax's
synchronized BatchNorm reduces over a vmapped axis exactly as over ``pmap``/``shard_map`` devices (see
``multi_device_training.py`` for real device parallelism), and a vmap compiles and runs much faster on a CPU.

    python examples/gn_batch_size.py --quick --out outputs/gn_batch_size
"""

from __future__ import annotations

import functools
import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

WORKERS = 8
AXIS = "workers"
NORMS = {"BatchNorm": "batch", "sync BatchNorm": "sync_batch", "GroupNorm": "group", "LayerNorm": "layer",
         "InstanceNorm": "instance"}  # fmt: skip
CLAIM = (
    "Wu & He 2018, Fig. 1: BatchNorm's error grows quickly as the per-worker batch shrinks (ImageNet: 23.6% at 32 "
    "-> 34.7% at 2), while GroupNorm's does not depend on the batch size; synchronized BN (statistics over all "
    "workers) avoids the small-batch degradation; at batch 32, BN <= GN < LN < IN (Table 1)."
)


def worker_loss(params, states, x, y, norm):
    logits, states = C.resnet_apply(params, states, x, norm=norm, training=True, axis_name=AXIS)
    return C.cross_entropy(logits, y), states


@functools.partial(jax.jit, static_argnames=("norm", "optimizer"))
def train_chunk(params, opt_state, states, xs, ys, *, norm, optimizer):
    """A scan over steps; in each, 8 vmapped workers compute gradients that are averaged (all-reduce)."""
    grad_fn = jax.vmap(
        jax.value_and_grad(functools.partial(worker_loss, norm=norm), has_aux=True),
        in_axes=(None, 0, 0, 0),
        axis_name=AXIS,
    )

    def step(carry, batch):
        params, opt_state, states = carry
        (_, states), grads = grad_fn(params, states, *batch)
        grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)  # the all-reduce of data parallelism
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, states), None

    (params, opt_state, states), _ = jax.lax.scan(step, (params, opt_state, states), (xs, ys))
    return params, opt_state, states


@functools.partial(jax.jit, static_argnames="norm")
def test_error(params, states, x, y, *, norm):
    """Inference mode: the BatchNorms use their running statistics (averaged over the workers); GroupNorm,
    LayerNorm and InstanceNorm compute the same per-example statistics as in training."""
    states = jax.tree.map(lambda a: jnp.mean(a, axis=0).astype(a.dtype), states)  # the step count stays int
    norm = "batch" if norm == "sync_batch" else norm  # in inference there is nothing to synchronize
    logits, _ = C.resnet_apply(params, states, x, norm=norm, training=False)
    return 1.0 - C.accuracy(logits, y)


def train(data, norm, per_worker_batch, epochs, seed, strided_block):
    spatial = data.x_train.ndim - 2
    params, states = C.init_resnet(
        np.random.default_rng(seed), data.x_train.shape[-1], data.num_classes, spatial=spatial,
        strided_block=strided_block,
    )  # fmt: skip
    global_batch = WORKERS * per_worker_batch
    steps = max(1, epochs * len(data.x_train) // global_batch)
    learning_rate = 0.1 * global_batch / 64  # the linear scaling rule (Goyal et al. 2017), as in Wu & He
    optimizer = optax.sgd(optax.cosine_decay_schedule(learning_rate, steps), momentum=0.9)
    opt_state = optimizer.init(params)
    states = jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (WORKERS,) + np.shape(a)), states)
    draw = C.batch_indices(np.random.default_rng(seed), len(data.x_train), global_batch)
    idx = np.stack([draw() for _ in range(steps)])
    split = lambda a: a[idx].reshape(steps, WORKERS, per_worker_batch, *a.shape[1:])  # noqa: E731
    params, _, states = train_chunk(
        params, opt_state, states, split(data.x_train), split(data.y_train), norm=norm, optimizer=optimizer
    )
    return float(test_error(params, states, data.x_test, data.y_test, norm=norm)), steps


def main(argv=None):
    runtimes = "about 8 minutes in full mode (5 norms x 5 batch sizes, 20 epochs of MNIST-1D), about 25 s with --quick"
    args = C.parse_args(__doc__.splitlines()[0], "gn_batch_size", argv, runtimes=runtimes)
    started = time.time()
    if args.quick:
        data, batch_sizes, epochs, strided_block = C.load_digits(args.seed), (8, 2), 3, False
    else:
        data, batch_sizes, epochs, strided_block = C.load_mnist1d(args.data_dir), (32, 16, 8, 4, 2), 20, True
    C.banner("Wu & He Figure 1: error vs images per worker", data, CLAIM, "quick" if args.quick else "full")
    print(f"{WORKERS} workers (vmapped), per-worker batch {batch_sizes}, {epochs} epochs each, SGD momentum 0.9, "
          "learning rate 0.1 x global batch / 64, cosine decay")  # fmt: skip

    errors = {label: {} for label in NORMS}
    runs = [(label, b) for b in batch_sizes for label in NORMS]
    for label, b in C.progress(runs, "norm x batch size"):
        errors[label][b], _ = train(data, NORMS[label], b, epochs, args.seed, strided_block)

    large, small = batch_sizes[0], batch_sizes[-1]
    change = {label: 100 * (errors[label][small] - errors[label][large]) for label in NORMS}
    # One standard error of a test error rate p on n images is sqrt(p (1 - p) / n); a change counts when it
    # exceeds two of them, in points, at the norm's largest error.
    two_standard_errors = lambda p: 200 * np.sqrt(p * (1 - p) / len(data.y_test))  # noqa: E731
    noise = {label: two_standard_errors(max(errors[label].values())) for label in NORMS}
    bn_degrades = change["BatchNorm"] > noise["BatchNorm"]
    sync_holds = change["sync BatchNorm"] <= noise["sync BatchNorm"]
    gn_flat = abs(change["GroupNorm"]) <= noise["GroupNorm"]
    outcome = C.verdict(
        bn_degrades and sync_holds and gn_flat,
        f"test error change from {large} to {small} images per worker (points; a change counts beyond "
        "two standard errors): " + ", ".join(f"{label} {change[label]:+.1f} (±{noise[label]:.1f})" for label in NORMS),
    )

    fig, axes = C.figure(width=6.0, height=3.6)
    ax = axes[0, 0]
    for label, by_batch in errors.items():
        ax.plot(batch_sizes, [100 * by_batch[b] for b in batch_sizes], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(batch_sizes))
    ax.xaxis.set_major_formatter(FixedFormatter([str(b) for b in batch_sizes]))
    ax.xaxis.set_minor_locator(NullLocator())  # a log axis' minor ticks would label 3, 5, 6, ... too
    ax.invert_xaxis()
    ax.set(xlabel="images per worker", ylabel="test error (%)")
    verb = "grows" if bn_degrades else "does not grow"
    ax.set_title(
        f"{WORKERS} workers: BatchNorm's error {verb} from {large} to {small} images\n"
        f"per worker ({change['BatchNorm']:+.1f} points; sync BatchNorm {change['sync BatchNorm']:+.1f})",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside the axes: no data covered
    C.save_figure(fig, args.out / "error_vs_batch_size.png")
    rows = [[label] + [100 * errors[label][b] for b in batch_sizes] for label in NORMS]
    meta = {
        "command": f"python examples/gn_batch_size.py{' --quick' if args.quick else ''}",
        "data": data.description,
        "workers": WORKERS,
        "epochs": epochs,
        "claim": CLAIM,
        "verdict": outcome,
    }
    columns = ["normalization"] + [f"error % @ {b}/worker" for b in batch_sizes]
    C.write_results(args.out, "results", columns, rows, meta, started)


if __name__ == "__main__":
    main()
