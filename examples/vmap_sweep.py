"""A learning-rate sweep trained all at once: ``jax.vmap`` over parameters, optimizer state and BatchNorm state.

K networks (one per learning rate and seed) are stacked along a leading axis and trained by one compiled step,
with and without BatchNorm. Because :func:`normjax.batch_norm` takes and returns its running statistics
explicitly, the stack of ``BatchNormState`` is just another vmapped argument: every model keeps its own
statistics, computed over its own batch. The script plots the final test accuracy against the learning rate.

Tests the shape of Ioffe & Szegedy (2015, Sec. 3.3, "Batch Normalization enables higher learning rates")
and Santurkar et al. (2018, Fig. 1/2): the BatchNorm network trains well over a much wider range of learning
rates, and is at least as accurate at each learning rate tried.

    python examples/vmap_sweep.py --quick --out outputs/vmap_sweep
"""

from __future__ import annotations

import functools
import time

import _common as C
import jax
import numpy as np
import optax

CLAIM = (
    "BatchNorm enables higher learning rates (Ioffe & Szegedy 2015, Sec. 3.3; Santurkar et al. 2018, Fig. 1): "
    "the BN network trains over a wider learning-rate range and is at least as accurate at each rate."
)
# The direction of SGD with momentum; each model multiplies it by its own learning rate (momentum is linear,
# so this equals optax.sgd(learning_rate, momentum=0.9)).
DIRECTION = optax.sgd(1.0, momentum=0.9)


def loss_fn(params, states, x, y, use_bn):
    logits, states, _ = C.mlp_apply(params, states, x, use_bn=use_bn, training=True)
    return C.cross_entropy(logits, y), states


def train_step(params, states, opt_state, learning_rate, x, y, *, use_bn):
    """One SGD step of one model; vmapped over the models, with the batch shared."""
    (loss, states), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, states, x, y, use_bn)
    direction, opt_state = DIRECTION.update(grads, opt_state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda d: learning_rate * d, direction))
    return params, states, opt_state, loss


@functools.partial(jax.jit, static_argnames="use_bn")
def train_chunk(params, states, opt_state, learning_rates, xs, ys, *, use_bn):
    step = jax.vmap(functools.partial(train_step, use_bn=use_bn), in_axes=(0, 0, 0, 0, None, None))

    def body(carry, batch):
        params, states, opt_state, loss = step(*carry[:3], learning_rates, *batch)
        return (params, states, opt_state), loss

    (params, states, opt_state), losses = jax.lax.scan(body, (params, states, opt_state), (xs, ys))
    return params, states, opt_state, losses


@functools.partial(jax.jit, static_argnames="use_bn")
def evaluate(params, states, x, y, *, use_bn):
    """Test accuracy of every model (BatchNorm in inference mode: running statistics)."""
    logits = jax.vmap(lambda p, s: C.mlp_apply(p, s, x, use_bn=use_bn, training=False)[0])(params, states)
    return jax.vmap(C.accuracy, in_axes=(0, None))(logits, y)


def main(argv=None):
    runtimes = "about 1 minute in full mode (2 x 39 models, 3000 steps on MNIST-1D), about 5 s with --quick"
    args = C.parse_args(__doc__.splitlines()[0], "vmap_sweep", argv, runtimes=runtimes)
    started = time.time()
    if args.quick:
        data = C.load_digits(args.seed, flat=True)
        learning_rates, seeds, steps, chunk, batch = np.logspace(-3, 1, 9), 1, 300, 100, 64
    else:
        data = C.load_mnist1d(args.data_dir)
        data = data._replace(x_train=data.x_train[..., 0], x_test=data.x_test[..., 0])
        learning_rates, seeds, steps, chunk, batch = np.logspace(-3, 1, 13), 3, 3000, 250, 64
    C.banner("vmap learning-rate sweep, with and without BatchNorm", data, CLAIM, "quick" if args.quick else "full")
    sizes = [data.x_train.shape[1], 128, 128, 128, 128, data.num_classes]
    grid_lr = np.repeat(learning_rates, seeds).astype(np.float32)  # model k: learning rate k // seeds
    print(f"{len(grid_lr)} models per network ({len(learning_rates)} learning rates x {seeds} seeds) trained at "
          f"once; MLP {sizes}, batch {batch}, {steps} steps")  # fmt: skip

    accuracies = {}
    for use_bn in (False, True):
        label = "with BatchNorm" if use_bn else "without BatchNorm"
        inits = [C.init_mlp(np.random.default_rng(args.seed + 1000 * (k % seeds)), sizes) for k in range(len(grid_lr))]
        stack = lambda trees: jax.tree.map(lambda *leaves: np.stack(leaves), *trees)  # noqa: E731
        params, states = stack([p for p, _ in inits]), stack([s for _, s in inits])
        opt_state = jax.vmap(DIRECTION.init)(params)
        draw = C.batch_indices(np.random.default_rng(args.seed), len(data.x_train), batch)
        for _ in C.progress(range(steps // chunk), label):
            idx = np.stack([draw() for _ in range(chunk)])
            params, states, opt_state, _ = train_chunk(
                params, states, opt_state, grid_lr, data.x_train[idx], data.y_train[idx], use_bn=use_bn
            )
        acc = np.asarray(evaluate(params, states, data.x_test, data.y_test, use_bn=use_bn))
        accuracies[label] = acc.reshape(len(learning_rates), seeds)  # a diverged model predicts one class

    rows = []
    for i, lr in enumerate(learning_rates):
        rows.append([f"{lr:.3g}"] + [float(accuracies[label][i].mean()) for label in accuracies])
    good = {label: learning_rates[acc.mean(1) >= 0.9 * acc.mean(1).max()] for label, acc in accuracies.items()}
    span = {label: f"{lrs.min():.3g}-{lrs.max():.3g}" for label, lrs in good.items()}
    fig, axes = C.figure(width=5.0, height=3.6)
    ax = axes[0, 0]
    for label, acc in accuracies.items():
        spread = f", mean and std of {seeds} seeds" if seeds > 1 else ""
        yerr = acc.std(1) if seeds > 1 else None
        ax.errorbar(learning_rates, acc.mean(1), yerr=yerr, marker="o", capsize=2, label=f"{label}{spread}")
    ax.set(xscale="log", xlabel="learning rate (SGD, momentum 0.9)", ylabel="test accuracy", ylim=(0, None))
    ax.set_title(
        f"Within 90% of the best accuracy: with BatchNorm\nfor rates {span['with BatchNorm']}, "
        f"without for {span['without BatchNorm']}",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", fontsize=8)
    C.save_figure(fig, args.out / "accuracy_vs_learning_rate.png")
    for label, lrs in span.items():
        print(f"{label}: within 90% of its best accuracy for learning rates {lrs}")
    with_bn, without_bn = accuracies["with BatchNorm"].mean(1), accuracies["without BatchNorm"].mean(1)
    wider = good["with BatchNorm"].max() > good["without BatchNorm"].max()
    at_least_as_good = bool(np.all(with_bn >= without_bn - 0.01))
    outcome = C.verdict(
        wider and at_least_as_good,
        f"with BatchNorm trains up to learning rate {good['with BatchNorm'].max():.3g} vs "
        f"{good['without BatchNorm'].max():.3g} without; at least as accurate (within 0.01) at "
        f"{int(np.sum(with_bn >= without_bn - 0.01))} of {len(learning_rates)} rates",
    )
    meta = {
        "command": f"python examples/vmap_sweep.py{' --quick' if args.quick else ''}",
        "data": data.description,
        "models_per_network": len(grid_lr),
        "seeds": seeds,
        "steps": steps,
        "claim": CLAIM,
        "verdict": outcome,
        "learning_rates_within_90pct_of_best": {k: [float(v.min()), float(v.max())] for k, v in good.items()},
    }
    columns = ["learning rate"] + [f"test acc {label}" for label in accuracies]
    C.write_results(args.out, "results", columns, rows, meta, started)


if __name__ == "__main__":
    main()
