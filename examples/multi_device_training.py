"""Multi-device training with synchronized BatchNorm, in a ``pmap`` variant and a ``shard_map``/``jit`` variant.

A small ResNet (plain functions over parameter dictionaries, normalized by :func:`normjax.batch_norm`) is trained
with optax on 8 devices (8 simulated CPU devices on a laptop, real accelerators when 8 are present) with a tiny
per-device batch. Per-device BatchNorm normalizes each device's 2 examples on their own; synchronized BatchNorm
(``axis_name=...``) normalizes with the statistics of the whole global batch, exactly as one large-batch
BatchNorm would. The script trains both in both variants, plots test accuracy against steps and checks that
the ``pmap`` and ``shard_map`` runs agree.

Tests the observation behind synchronized BatchNorm (Peng et al., "MegDet", CVPR 2018; Wu & He, "Group
Normalization", ECCV 2018, Figure 1): with very small per-device batches, per-device BatchNorm trains to a
worse model than BatchNorm whose statistics span the devices.

    python examples/multi_device_training.py --quick --out outputs/multi_device_training
"""

from __future__ import annotations

import functools
import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "devices"
NORMS = {"per-device BN": "batch", "synchronized BN": "sync_batch"}
CLAIM = (
    "synchronized BatchNorm (MegDet, Peng et al. 2018; Wu & He 2018, Fig. 1): with tiny per-device batches, "
    "per-device BatchNorm reaches a lower test accuracy than BatchNorm synchronized across devices."
)


def loss_and_states(params, states, x, y, norm):
    logits, new_states = C.resnet_apply(params, states, x, norm=norm, training=True, axis_name=AXIS)
    return C.cross_entropy(logits, y), new_states


def pmap_chunk(params, opt_state, states, xs, ys, *, norm, optimizer):
    """Per device under ``pmap``: a scan over a chunk of steps. Every input carries its own copy per device.

    pmap idiom: differentiate the *local* loss, then average the gradients with ``pmean``. (Through synchronized
    BatchNorm's collective this gives exactly the gradient of the global mean loss.)
    """

    def step(carry, batch):
        params, opt_state, states = carry
        grad_fn = jax.value_and_grad(loss_and_states, has_aux=True)
        (loss, states), grads = grad_fn(params, states, *batch, norm)
        grads = jax.lax.pmean(grads, AXIS)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, states), jax.lax.pmean(loss, AXIS)

    (params, opt_state, states), losses = jax.lax.scan(step, (params, opt_state, states), (xs, ys))
    return params, opt_state, states, losses


def shard_map_chunk(params, opt_state, states, xs, ys, *, norm, optimizer):
    """Per device under ``shard_map``: parameters are replicated (one invariant value), data and the BatchNorm
    states are split along the device axis (per-device running statistics have a leading device axis).

    shard_map idiom: differentiate the *global* mean loss (``pmean`` inside the loss); JAX sums the gradient of
    the replicated parameters over devices itself, so there is no ``pmean`` of the gradients.
    """
    states = jax.tree.map(lambda a: a[0], states)  # this device's (1, C) block -> (C,)

    def global_loss(params, states, x, y):
        loss, states = loss_and_states(params, states, x, y, norm)
        return jax.lax.pmean(loss, AXIS), states

    def step(carry, batch):
        params, opt_state, states = carry
        (loss, states), grads = jax.value_and_grad(global_loss, has_aux=True)(params, states, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, states), loss

    (params, opt_state, states), losses = jax.lax.scan(step, (params, opt_state, states), (xs, ys))
    return params, opt_state, jax.tree.map(lambda a: a[None], states), losses


@jax.jit
def evaluate(params, states, x, y):
    """Test accuracy in inference mode: BatchNorm uses the running statistics."""
    logits, _ = C.resnet_apply(params, states, x, norm="batch", training=False)
    return C.accuracy(logits, y)


def stack(tree, n):
    return jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (n,) + np.shape(a)), tree)


def host(tree, first=False):
    """Brings a pytree to NumPy; ``first`` takes device 0's copy of pmap's replicated values."""
    return jax.tree.map(lambda a: np.asarray(a)[0] if first else np.asarray(a), tree)


def train(variant, norm, data, devices, *, steps, chunk, per_device_batch, learning_rate, seed, strided_block=True):
    """Trains one model; returns the test-accuracy curve, the losses of the first 3 steps, the last loss."""
    n = len(devices)
    spatial = data.x_train.ndim - 2  # 2-D convolutions for digits, 1-D for MNIST-1D
    params, states = C.init_resnet(
        np.random.default_rng(seed), data.x_train.shape[-1], data.num_classes, spatial=spatial
    )
    optimizer = optax.sgd(optax.cosine_decay_schedule(learning_rate, steps), momentum=0.9, nesterov=True)
    opt_state = optimizer.init(params)
    states = stack(states, n)  # per-device running statistics (identical for synchronized BN)
    # The first inputs are placed as the step's outputs will be: otherwise the second call would see differently
    # placed arguments and compile the step again.
    if variant == "pmap":
        run = jax.pmap(functools.partial(pmap_chunk, norm=norm, optimizer=optimizer), axis_name=AXIS, devices=devices)
        replicate = jax.pmap(lambda tree: tree, axis_name=AXIS, devices=devices)
        params, opt_state, states = replicate((stack(params, n), stack(opt_state, n), states))
    else:
        mesh = Mesh(np.array(devices), (AXIS,))
        body = functools.partial(shard_map_chunk, norm=norm, optimizer=optimizer)
        batch_spec = P(None, AXIS)  # (chunk, global batch, ...): split the batch over the devices
        run = jax.jit(
            jax.shard_map(
                body,
                mesh=mesh,
                in_specs=(P(), P(), P(AXIS), batch_spec, batch_spec),
                out_specs=(P(), P(), P(AXIS), P()),
            )
        )
        replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
        params, opt_state, states = jax.device_put((params, opt_state, states), (replicated, replicated, split))
    draw = C.batch_indices(np.random.default_rng(seed), len(data.x_train), n * per_device_batch)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    curve, loss, first_losses = [], float("nan"), None
    for done in C.progress(range(chunk, steps + 1, chunk), f"{variant:9s} {norm:10s}"):
        idx = np.stack([draw() for _ in range(chunk)])  # (chunk, global batch); device d gets slice d
        xs, ys = data.x_train[idx], data.y_train[idx]
        if variant == "pmap":  # pmap wants the device axis first: (devices, chunk, per-device batch, ...)
            split = lambda a: np.swapaxes(a.reshape(chunk, n, per_device_batch, *a.shape[2:]), 0, 1)  # noqa: E731
            xs, ys = split(xs), split(ys)
        params, opt_state, states, losses = run(params, opt_state, states, xs, ys)
        # Inference uses the device-averaged running statistics (per-device BN's differ between devices).
        eval_params = host(params, first=variant == "pmap")
        eval_states = jax.tree.map(lambda a: np.mean(a, axis=0).astype(a.dtype), host(states))  # count: int
        curve.append((done, float(evaluate(eval_params, eval_states, x_test, y_test))))
        loss = float(np.asarray(losses).reshape(-1)[-1])
        first_losses = np.asarray(losses).reshape(-1)[:3] if first_losses is None else first_losses
    return curve, first_losses, loss


def main(argv=None):
    runtimes = "about 30 s in full mode (1000 steps on MNIST-1D), about 10 s with --quick"
    args = C.parse_args(__doc__.splitlines()[0], "multi_device_training", argv, runtimes=runtimes)
    started = time.time()
    data = C.load_digits(args.seed) if args.quick else C.load_mnist1d(args.data_dir)
    devices = C.devices(8)
    # Quick mode: a 3-norm ResNet for 60 steps (a smoke run: each of the 8 simulated devices is a CPU thread);
    # full mode: the 7-norm ResNet on MNIST-1D for 1000 steps.
    steps, chunk, strided_block = (60, 5, False) if args.quick else (1000, 50, True)
    per_device_batch = 2
    C.banner(
        "multi-device training, per-device vs synchronized BatchNorm", data, CLAIM, "quick" if args.quick else "full"
    )
    print(f"devices: {len(devices)} x {devices[0].platform}; per-device batch {per_device_batch}, global batch "
          f"{len(devices) * per_device_batch}; {steps} steps")  # fmt: skip

    curves, early, rows = {}, {}, []
    for variant in ("pmap", "shard_map"):
        for label, norm in NORMS.items():
            t0 = time.time()
            curve, first_losses, loss = train(
                variant, norm, data, devices, steps=steps, chunk=chunk, per_device_batch=per_device_batch,
                learning_rate=0.1, seed=args.seed, strided_block=strided_block,
            )  # fmt: skip
            curves[variant, label], early[variant, label] = curve, first_losses
            best = max(acc for _, acc in curve)
            rows.append([variant, label, curve[-1][1], best, loss, round(time.time() - t0, 1)])

    # Same data, same initialization: the two variants compute the same steps up to float rounding; the losses of
    # steps 2 and 3 check the first updates, i.e. the gradients. (Rounding differences then grow over training, as
    # between any two orderings of the same float reductions, so the final models are close but not equal.)
    agreement = {label: float(np.max(np.abs(early["pmap", label] - early["shard_map", label]))) for label in NORMS}
    for label, diff in agreement.items():
        print(f"pmap vs shard_map, {label}: max |loss difference| over the first 3 steps = {diff:.1e}")
    gap = {v: curves[v, "synchronized BN"][-1][1] - curves[v, "per-device BN"][-1][1] for v in ("pmap", "shard_map")}
    outcome = C.verdict(
        min(gap.values()) > 0,
        f"final test accuracy, synchronized minus per-device BN: pmap {gap['pmap']:+.3f}, "
        f"shard_map {gap['shard_map']:+.3f} (one seed; --seed N for others)",
    )

    fig, axes = C.figure(ncols=2)
    for ax, variant in zip(axes[0], ("pmap", "shard_map"), strict=True):
        for label in NORMS:
            s, acc = zip(*curves[variant, label], strict=True)
            ax.plot(s, acc, marker=".", label=f"{label}: {acc[-1]:.3f} at the end")
        ax.set(xlabel="step", ylabel="test accuracy")
        ax.set_title(
            f"{variant}, 8 devices x {per_device_batch} examples:\nsynchronized BN {gap[variant]:+.3f} at the end",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    C.save_figure(fig, args.out / "accuracy_vs_steps.png")
    meta = {
        "command": f"python examples/multi_device_training.py{' --quick' if args.quick else ''}",
        "data": data.description,
        "devices": f"{len(devices)} x {devices[0].platform}",
        "per_device_batch": per_device_batch,
        "steps": steps,
        "claim": CLAIM,
        "verdict": outcome,
        "pmap_vs_shard_map_max_loss_diff_first_3_steps": agreement,
    }
    columns = ["variant", "normalization", "final test acc", "best test acc", "final train loss", "seconds"]
    C.write_results(args.out, "results", columns, rows, meta, started)


if __name__ == "__main__":
    main()
