"""An Equinox convnet with normjax's synchronized BatchNorm, trained on 8 devices.

The model is a plain ``eqx.Module`` (two ``eqx.nn.Conv2d`` layers, each followed by :class:`normjax.equinox.BatchNorm`,
a pooled ``eqx.nn.Linear`` head), written for one channels-first example and mapped over the batch with
``jax.vmap(..., axis_name="batch")``; the running statistics live in an ``eqx.nn.State``. It is trained with optax on
8 devices (8 simulated CPU devices on a laptop, real accelerators when 8 are present), 2 examples per device, three
ways:

- **synchronized, sharded ``eqx.filter_jit``**: the batch is sharded over the devices and the vmap axis spans all
  of it, so BatchNorm's statistics are those of the global batch (XLA inserts the cross-device reduction);
- **synchronized, ``shard_map``**: each device maps the model over its own examples and BatchNorm synchronizes
  over ``("devices", "batch")``; the same statistics, so the same steps as the sharded ``filter_jit``;
- **per-device, ``shard_map``**: BatchNorm over ``"batch"`` only, each device's 2 examples on their own.

The script also runs the first steps with ``eqx.nn.BatchNorm(mode="batch")`` in place of normjax's layer and checks
that they are the same steps (normjax's layer is a drop-in where Equinox's is right).

Reproduces the observation behind synchronized BatchNorm (Peng et al., "MegDet", CVPR 2018; Wu & He, "Group
Normalization", ECCV 2018, Figure 1): with very small per-device batches, per-device BatchNorm trains to a worse
model than BatchNorm whose statistics span the devices.

    python examples/equinox_convnet.py --quick --out outputs/equinox_convnet
"""

from __future__ import annotations

import time

import _common as C
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import normjax.equinox as nqx

DEVICES, BATCH = "devices", "batch"
CLAIM = (
    "synchronized BatchNorm (MegDet, Peng et al. 2018; Wu & He 2018, Fig. 1): with tiny per-device batches, "
    "per-device BatchNorm reaches a lower test accuracy than BatchNorm synchronized across devices."
)
# label -> (how the step is parallelized, the BatchNorm axis_name, the BatchNorm class)
VARIANTS = {
    "synchronized, sharded filter_jit": ("filter_jit", BATCH, nqx.BatchNorm),
    "synchronized, shard_map": ("shard_map", (DEVICES, BATCH), nqx.BatchNorm),
    "per-device, shard_map": ("shard_map", BATCH, nqx.BatchNorm),
}
EQUINOX_CHECK = ("filter_jit", BATCH, eqx.nn.BatchNorm)  # the same steps with Equinox's own layer


class ConvNet(eqx.Module):
    """conv 3x3 -> BatchNorm -> relu -> conv 3x3 stride 2 -> BatchNorm -> relu -> global mean pool -> linear."""

    conv1: eqx.nn.Conv2d
    norm1: eqx.Module
    conv2: eqx.nn.Conv2d
    norm2: eqx.Module
    head: eqx.nn.Linear

    def __init__(self, norm_cls, axis_name, key, width=16, num_classes=10):
        k1, k2, k3 = jax.random.split(key, 3)
        norm_kwargs = {"mode": "batch"} if norm_cls is eqx.nn.BatchNorm else {}
        self.conv1 = eqx.nn.Conv2d(1, width, 3, padding=1, use_bias=False, key=k1)
        self.norm1 = norm_cls(width, axis_name, momentum=0.9, **norm_kwargs)
        self.conv2 = eqx.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, use_bias=False, key=k2)
        self.norm2 = norm_cls(2 * width, axis_name, momentum=0.9, **norm_kwargs)
        self.head = eqx.nn.Linear(2 * width, num_classes, key=k3)

    def __call__(self, x, state):
        x, state = self.norm1(self.conv1(x), state)
        x, state = self.norm2(self.conv2(jax.nn.relu(x)), state)
        return self.head(jnp.mean(jax.nn.relu(x), axis=(1, 2))), state


def batched(model, state, x):
    """The per-example model mapped over the batch; the new state is shared (out_axes None)."""
    return jax.vmap(model, axis_name=BATCH, in_axes=(0, None), out_axes=(0, None))(x, state)


def loss_fn(params, static, state, x, y):
    logits, state = batched(eqx.combine(params, static), state, x)
    return C.cross_entropy(logits, y), state


def make_step(parallel, static, optimizer, mesh, axis_name):
    """One training step ``(params, state, opt_state, x, y) -> (params, state, opt_state, loss)``, jitted."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    if parallel == "filter_jit":

        @eqx.filter_jit
        def step(params, state, opt_state, x, y):
            (loss, state), grads = grad_fn(params, static, state, x, y)
            params, opt_state = update(params, opt_state, grads)
            return params, state, opt_state, loss

        return step

    def local(params, state, x, y):
        """One device: its own examples; the gradient of its local loss, averaged over devices (pmap's idiom)."""
        (loss, state), grads = grad_fn(params, static, state, x, y)
        if axis_name == BATCH:  # per-device statistics: keep the running averages equal on every device
            state = jax.lax.pmean(state, DEVICES)
        return jax.lax.pmean(loss, DEVICES), state, jax.lax.pmean(grads, DEVICES)

    # check_vma=False: JAX 0.10 cannot yet type the collective of a vmap axis ("batch") inside shard_map.
    local = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(DEVICES), P(DEVICES)),
        out_specs=(P(), P(), P()),
        check_vma=False,
    )

    @jax.jit
    def step(params, state, opt_state, x, y):
        loss, state, grads = local(params, state, x, y)
        params, opt_state = update(params, opt_state, grads)
        return params, state, opt_state, loss

    return step


@eqx.filter_jit
def accuracy(params, static, state, x, y):
    """Test accuracy in inference mode: BatchNorm uses the running statistics."""
    model = eqx.nn.inference_mode(eqx.combine(params, static))
    logits, _ = batched(model, state, x)
    return C.accuracy(logits, y)


def train(variant, data, mesh, *, steps, schedule_steps, eval_every, per_device_batch, learning_rate, seed):
    """Trains one model for ``steps`` of a ``schedule_steps``-long learning-rate schedule; returns the
    test-accuracy curve and the training losses."""
    parallel, axis_name, norm_cls = variant
    model, state = eqx.nn.make_with_state(ConvNet)(norm_cls, axis_name, jax.random.key(seed))
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = optax.sgd(optax.cosine_decay_schedule(learning_rate, schedule_steps), momentum=0.9, nesterov=True)
    opt_state = optimizer.init(params)
    # Placed as the step's outputs will be, so the second step does not compile again for new placements.
    params, state, opt_state = jax.device_put((params, state, opt_state), NamedSharding(mesh, P()))
    step = make_step(parallel, static, optimizer, mesh, axis_name)
    batch_sharding = NamedSharding(mesh, P(DEVICES))
    draw = C.batch_indices(np.random.default_rng(seed), len(data.x_train), mesh.size * per_device_batch)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    curve, losses = [], []
    for done in C.progress(range(1, steps + 1), f"{parallel:10s} {axis_name!s:22s}", total=steps):
        idx = draw()
        x, y = jax.device_put((data.x_train[idx], data.y_train[idx]), batch_sharding)
        params, state, opt_state, loss = step(params, state, opt_state, x, y)
        losses.append(float(loss))
        if done % eval_every == 0:
            curve.append((done, float(accuracy(params, static, state, x_test, y_test))))
    return curve, np.asarray(losses)


def channels_first(data: C.Dataset) -> C.Dataset:
    """Equinox's convolutions and norms take one example channels first: (N, H, W, C) -> (N, C, H, W)."""
    to_nchw = lambda a: np.ascontiguousarray(np.moveaxis(a, -1, 1))  # noqa: E731
    return data._replace(x_train=to_nchw(data.x_train), x_test=to_nchw(data.x_test))


def main(argv=None):
    runtimes = "about 55 s in full mode (1000 steps on digits), about 25 s with --quick"
    args = C.parse_args(__doc__.splitlines()[0], "equinox_convnet", argv, runtimes=runtimes)
    started = time.time()
    data = channels_first(C.load_digits(args.seed))
    devices = C.devices(8)
    mesh = Mesh(np.array(devices), (DEVICES,))
    steps, eval_every = (60, 20) if args.quick else (1000, 50)
    per_device_batch, learning_rate = 2, 0.1
    C.banner("Equinox convnet, per-device vs synchronized BatchNorm", data, CLAIM, "quick" if args.quick else "full")
    print(f"devices: {len(devices)} x {devices[0].platform}; per-device batch {per_device_batch}, global batch "
          f"{len(devices) * per_device_batch}; {steps} steps")  # fmt: skip

    shared = dict(per_device_batch=per_device_batch, learning_rate=learning_rate, seed=args.seed, schedule_steps=steps)
    curves, losses, rows = {}, {}, []
    for label, variant in VARIANTS.items():
        t0 = time.time()
        curves[label], losses[label] = train(variant, data, mesh, steps=steps, eval_every=eval_every, **shared)
        best = max(acc for _, acc in curves[label])
        rows.append([label, curves[label][-1][1], best, float(losses[label][-1]), round(time.time() - t0, 1)])
    _, equinox_losses = train(EQUINOX_CHECK, data, mesh, steps=3, eval_every=3, **shared)

    # Same data, same initialization: the same steps up to float rounding (checked on the first 3 losses, i.e.
    # the first updates; rounding differences then grow over training as between any two reduction orders).
    first3 = lambda a, b: float(np.max(np.abs(a[:3] - b[:3])))  # noqa: E731
    sharded, shard_mapped = losses["synchronized, sharded filter_jit"], losses["synchronized, shard_map"]
    agreement = {
        "sharded filter_jit vs shard_map": first3(sharded, shard_mapped),
        "normjax vs eqx.nn.BatchNorm(mode='batch')": first3(sharded, equinox_losses),
    }
    for what, diff in agreement.items():
        print(f"{what}: max |loss difference| over the first 3 steps = {diff:.1e}")
    gap = curves["synchronized, shard_map"][-1][1] - curves["per-device, shard_map"][-1][1]
    outcome = C.verdict(
        gap > 0,
        f"final test accuracy of synchronized minus per-device BatchNorm = {gap:+.3f} "
        f"({per_device_batch} examples per device)",
    )

    fig, axes = C.figure()
    ax = axes[0][0]
    for label, curve in curves.items():
        s, acc = zip(*curve, strict=True)
        ax.plot(s, acc, marker=".", label=label)
    ax.set(title=f"8 devices x {per_device_batch} examples", xlabel="step", ylabel="test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    C.save_figure(fig, args.out / "accuracy_vs_steps.png")
    meta = {
        "command": f"python examples/equinox_convnet.py{' --quick' if args.quick else ''}",
        "data": data.description,
        "devices": f"{len(devices)} x {devices[0].platform}",
        "per_device_batch": per_device_batch,
        "steps": steps,
        "claim": CLAIM,
        "max_loss_diff_first_3_steps": agreement,
        "verdict": outcome,
    }
    columns = ["BatchNorm", "final test acc", "best test acc", "final train loss", "seconds"]
    C.write_results(args.out, "results", columns, rows, meta, started)


if __name__ == "__main__":
    main()
