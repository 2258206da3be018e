"""What synchronized BatchNorm costs: step time of a small conv net, local vs synchronized vs Flax, on 1-8 devices.

For 1, 2, 4 and 8 simulated CPU devices (weak scaling: a fixed per-device batch), one data-parallel training step
of a small conv net (three conv + BatchNorm + ReLU blocks, a linear head, optax SGD) is timed with per-device
BatchNorm statistics (``axis_name=None``), with statistics synchronized over the devices (``axis_name="d"``), and
with ``flax.linen.BatchNorm(axis_name="d")`` (Flax's default one-pass variance) in the same step.
Repetitions are interleaved (every configuration once per round) and medians reported, so drifts in machine load
hit every configuration alike. Collectives (all-reduces and all-gathers, ops and bytes per device) are read from
the compiled HLO of the whole step and of a single ``batch_norm`` call. One synchronized BatchNorm
forward+backward is also timed against ``flax.linen.BatchNorm(axis_name=...)``. A last section shows why
equal-weight averaging of device means is wrong, on a probe of 4 devices holding 8, 1, 1 and 1 valid rows.

"ResNet under pmap": Flax's ImageNet example (``examples/imagenet/models.py`` and ``train.py`` in google/flax),
its ResNet18 and ``train_step`` under ``jax.pmap(..., axis_name="batch")`` on 8 devices, reduced to run on a small
CPU machine (16 filters, 32x32 images, 16 per device), with only the BatchNorm class swapped:
``flax.linen.BatchNorm`` (default, one-pass variance), ``flax.linen.BatchNorm(use_fast_variance=False)`` (Flax
exact) and ``normjax.linen.BatchNorm``, plus a second copy of Flax's default as a control of the timing noise.
Step times are paired per round; all-reduces are counted in each compiled step; the losses of a few training
steps from the same start are compared.

Usage::

    python benchmarks/sync_scaling.py --out outputs/sync_scaling            # the numbers in docs/guides/sync.md
    python benchmarks/sync_scaling.py --quick --out outputs/sync_quick      # < 60 s smoke run

The smoke run compiles the conv net for 1 and 8 devices only, and the ResNet with one block (Flax's ``_ResNet1``
test model, 8 filters, 4 images per device).

Writes ``results.json`` and ``results.md`` to ``--out``. Simulated CPU devices share the host's cores, so the
ratios measure the extra work and synchronization points, not a real interconnect.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if not __package__:  # run as a script: import `benchmarks` from the root
    sys.path[0] = str(Path(__file__).resolve().parents[1])
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU runs each simulated device's part of a collective on a thread of a pool sized max(cores, devices); with
# one thread per device, a thread busy elsewhere can leave a collective waiting forever on a 2-core machine.
os.environ.setdefault("NPROC", "32")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import jax_utils  # noqa: E402
from flax.training import train_state  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import normjax  # noqa: E402
import normjax.linen  # noqa: E402
from benchmarks._accelerators import collective_bytes  # noqa: E402

DEVICE_COUNTS = (1, 2, 4, 8)
QUICK_DEVICE_COUNTS = (1, 8)  # the smoke run compiles the smallest and the largest only
CHANNELS = (16, 32, 32)
CLASSES = 10


def init_model(key, in_channels: int):
    """Params (conv kernels HWIO, BatchNorm scale/bias, head) and the BatchNorm running states."""
    params, states = {"blocks": []}, []
    for c_in, c_out in zip((in_channels, *CHANNELS[:-1]), CHANNELS, strict=True):
        key, sub = jax.random.split(key)
        kernel = jax.random.normal(sub, (3, 3, c_in, c_out)) * np.sqrt(2.0 / (9 * c_in))
        params["blocks"].append({"kernel": kernel, "scale": jnp.ones(c_out), "bias": jnp.zeros(c_out)})
        states.append(normjax.init_batch_norm_state(c_out))
    key, sub = jax.random.split(key)
    params["head"] = jax.random.normal(sub, (CHANNELS[-1], CLASSES)) / np.sqrt(CHANNELS[-1])
    return params, states


def flax_batch_norm(h, state, scale, bias, axis_name):
    """``flax.linen.BatchNorm`` with its defaults (one-pass variance), as a function of explicit state."""
    module = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-5, axis_name=axis_name)
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": state.mean, "var": state.var}}
    y, updates = module.apply(variables, h, mutable=["batch_stats"])
    # Flax counts no steps: the state's count passes through, so the step's carry keeps one structure.
    return y, state._replace(mean=updates["batch_stats"]["mean"], var=updates["batch_stats"]["var"])


def forward(params, states, images, axis_name, norm="normjax"):
    """Conv (stride 2 after the first block) -> BatchNorm -> ReLU, three times; mean-pool; linear head."""
    h, new_states = images, []
    for i, (block, state) in enumerate(zip(params["blocks"], states, strict=True)):
        h = jax.lax.conv_general_dilated(
            h, block["kernel"], (1, 1) if i == 0 else (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        if norm == "flax":
            h, state = flax_batch_norm(h, state, block["scale"], block["bias"], axis_name)
        else:
            h, state = normjax.batch_norm(h, state, block["scale"], block["bias"], training=True, axis_name=axis_name)
        h, new_states = jax.nn.relu(h), [*new_states, state]
    return jnp.mean(h, axis=(1, 2)) @ params["head"], new_states


def make_train_step(mesh: Mesh, synchronized: bool, optimizer, norm: str = "normjax"):
    """One data-parallel SGD step (shard_map over the mesh's 'd' axis), to be jitted.

    The loss is the global mean (``pmean``), so under shard_map's varying-axes tracking the gradients of the
    replicated parameters come out already summed over devices; the only collectives are that gradient
    all-reduce, the loss and, if ``synchronized``, the BatchNorm statistics (forward) and their cotangents
    (backward). Local BatchNorm keeps one running state per device (sharded, leading axis of size 1 each).
    """
    bn_axis = "d" if synchronized else None

    def local_step(params, opt_state, states, images, labels):
        per_device = lambda f, tree: tree if synchronized else jax.tree.map(f, tree)  # noqa: E731
        local_states = per_device(lambda a: a[0], states)

        def loss_fn(params):
            logits, new_states = forward(params, local_states, images, bn_axis, norm)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return jax.lax.pmean(loss, "d"), new_states

        (loss, new_states), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new_states = per_device(lambda a: a[None], new_states)
        return optax.apply_updates(params, updates), opt_state, new_states, loss

    state_spec = P() if synchronized else P("d")
    specs = (P(), P(), state_spec, P("d"), P("d"))
    step = jax.shard_map(local_step, mesh=mesh, in_specs=specs, out_specs=(P(), P(), state_spec, P()))
    return jax.jit(step, donate_argnums=(0, 1, 2))


def paired_ratio(numerator: list[float], denominator: list[float]) -> tuple[float, list[float]]:
    """Median and quartiles of the per-round ratios of two configurations' times."""
    # Each round times every configuration back to back, so per-round ratios cancel slow load drifts.
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return statistics.median(ratios), np.percentile(ratios, [25, 75]).tolist()


def batch_norm_call_collectives(mesh: Mesh, features: int, masked: bool, backward: bool) -> dict:
    """All-reduce (ops, bytes per device) of one synchronized batch_norm on (N, 4, 4, features), optionally + grad."""

    def loss(x, mask):
        state = normjax.init_batch_norm_state(features)
        y, _ = normjax.batch_norm(x, state, training=True, axis_name="d", mask=mask if masked else None)
        return jnp.sum(jnp.sin(y))

    call = jax.grad(loss) if backward else loss  # the gradient w.r.t. the local x needs no gradient averaging
    f = jax.jit(jax.shard_map(call, mesh=mesh, in_specs=P("d"), out_specs=P("d") if backward else P()))
    n = mesh.devices.size
    x = jnp.ones((2 * n, 4, 4, features))
    mask = jnp.ones((2 * n, 4, 4, 1), bool)
    if not backward:  # the forward loss is varying; make it a per-device output
        f = jax.jit(jax.shard_map(lambda x, m: call(x, m)[None], mesh=mesh, in_specs=P("d"), out_specs=P("d")))
    hlo = f.lower(x, mask).compile().as_text()
    return {kind: collective_bytes(hlo, kind) for kind in ("all-reduce", "all-gather")}


def equal_weight_probe() -> dict:
    """The probe: 4 devices hold 8, 1, 1, 1 valid rows. Flax's pmean of device means vs normjax."""
    x = np.zeros((4, 8, 1), np.float32)
    x[0] = 1.0
    x[1:, 0, 0] = [20.0, 30.0, 40.0]
    mask = np.zeros((4, 8, 1), bool)
    mask[0], mask[1:, 0, 0] = True, True
    devices = jax.devices()[:4]
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.0, axis_name="i")
    variables = flax_bn.init(jax.random.key(0), x[0])

    def flax_mean(x, m):
        _, updates = flax_bn.apply(variables, x, mask=m, mutable=["batch_stats"])
        return updates["batch_stats"]["mean"]

    flax_result = jax.pmap(flax_mean, axis_name="i", devices=devices)(x, mask)
    ours = jax.pmap(lambda x, m: normjax.moments(x, 0, mask=m, axis_name="i"), axis_name="i", devices=devices)
    valid = x[mask]
    return {
        "valid_rows_per_device": mask.sum(axis=(1, 2)).tolist(),
        "true_mean": float(valid.mean()),
        "normjax_mean": float(ours(x, mask).mean[0, 0]),
        "flax_linen_mean": float(flax_result[0, 0]),
        "equal_weight_mean_of_device_means": float(np.mean([x[d][mask[d]].mean() for d in range(4)])),
    }


def call_time_vs_flax(quick: bool) -> list[dict]:
    """One synchronized BatchNorm forward+backward under ``shard_map``: normjax vs ``flax.linen.BatchNorm``.

    Both with ``axis_name="d"`` (Flax in its default one-pass mode and two-pass); the same NHWC activations as the
    conv net's second block. Interleaved rounds, medians; ratios to Flax's default.
    """
    features, rounds = 32, (4 if quick else 15)
    state = normjax.init_batch_norm_state(features)

    def ours(x, s, b):
        return normjax.batch_norm(x, state, s, b, training=True, axis_name="d")[0]

    def flax(x, s, b, fast):
        layer = nn.BatchNorm(use_running_average=False, axis_name="d", use_fast_variance=fast)
        variables = {"params": {"scale": s, "bias": b}, "batch_stats": {"mean": state.mean, "var": state.var}}
        return layer.apply(variables, x, mutable=["batch_stats"])[0]

    rows = []
    for n in QUICK_DEVICE_COUNTS if quick else DEVICE_COUNTS:
        mesh = Mesh(np.array(jax.devices()[:n]), ("d",))
        x = jax.random.normal(jax.random.key(0), (n * 32, 8, 8, features))
        g = jax.random.normal(jax.random.key(1), x.shape)
        calls = {}
        for name, norm in (
            ("normjax", ours),
            ("flax", lambda x, s, b: flax(x, s, b, True)),
            ("flax two-pass", lambda x, s, b: flax(x, s, b, False)),
        ):

            def grads(x, s, b, g, norm=norm):
                return jax.grad(lambda x, s, b: jnp.sum(norm(x, s, b) * g), argnums=(0, 1, 2))(x, s, b)

            step = jax.shard_map(grads, mesh=mesh, in_specs=(P("d"), P(), P(), P("d")), out_specs=(P("d"), P(), P()))
            compiled = jax.jit(step).lower(x, jnp.ones(features), jnp.zeros(features), g).compile()
            args = (x, jnp.ones(features), jnp.zeros(features), g)
            calls[name] = lambda compiled=compiled, args=args: jax.block_until_ready(compiled(*args))
        times = {name: [] for name in calls}
        for round_index in range(rounds):
            names = list(calls)[round_index % len(calls) :] + list(calls)[: round_index % len(calls)]
            for name in names:
                calls[name]()
                start = time.perf_counter()
                for _ in range(3):
                    calls[name]()
                times[name].append((time.perf_counter() - start) / 3)
        medians = {name: statistics.median(t) for name, t in times.items()}
        rows.append(
            {
                "devices": n,
                "flax_ms": 1e3 * medians["flax"],
                "normjax_over_flax": medians["normjax"] / medians["flax"],
                "flax_two_pass_over_flax": medians["flax two-pass"] / medians["flax"],
            }
        )
    return rows


def bn_call_bytes(features: int = 32) -> list[dict]:
    """Collective cost of one synchronized batch_norm call on 8 devices (per device; the same for any count)."""
    mesh = Mesh(np.array(jax.devices()), ("d",))
    rows = []
    for masked in (False, True):
        for backward in (False, True):
            found = batch_norm_call_collectives(mesh, features, masked, backward)
            rows.append({"features": features, "masked": masked, "with_grad": backward, **found})
    return rows


# The BatchNorm classes the ResNet step is timed with: only this class differs between the configurations. The
# control is a second, separately compiled copy of Flax's default: its ratio to the first shows the timing noise.
RESNET_BATCH_NORMS = {
    "flax default": nn.BatchNorm,
    "flax default (control copy)": nn.BatchNorm,
    "flax exact": functools.partial(nn.BatchNorm, use_fast_variance=False),
    "normjax": normjax.linen.BatchNorm,
}


class ResNetBlock(nn.Module):
    """The ResNet block, as Flax's ImageNet example (``examples/imagenet/models.py``) writes it."""

    filters: int
    conv: Any
    norm: Any
    act: Any
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    """The ResNetV1 of Flax's ImageNet example, with synchronized BatchNorm; ``norm_cls`` is the swapped class."""

    stage_sizes: tuple[int, ...]
    num_classes: int
    norm_cls: Any = nn.BatchNorm
    num_filters: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            self.norm_cls,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            axis_name="batch",
        )
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=nn.relu)(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return jnp.asarray(x, self.dtype)


class TrainState(train_state.TrainState):
    batch_stats: Any


def resnet_train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """The ``train_step`` of Flax's ImageNet example, to run under ``jax.pmap(..., axis_name="batch")``.

    Cross-entropy plus weight decay on the kernels, ``batch_stats`` mutable, gradients averaged with
    ``lax.pmean``, the metrics (loss and accuracy) averaged over devices. Left out: the learning-rate schedule
    (the optimizer's rate is constant) and mixed precision (float32 throughout).
    """

    def loss_fn(params):
        logits, new_model_state = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], CLASSES)).mean()
        weight_l2 = sum(jnp.sum(x**2) for x in jax.tree.leaves(params) if x.ndim > 1)
        return loss + 0.0001 * 0.5 * weight_l2, (new_model_state, logits)

    (_, (new_model_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, axis_name="batch")
    metrics = {
        "loss": optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], CLASSES)).mean(),
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
    }
    new_state = state.apply_gradients(grads=grads, batch_stats=new_model_state["batch_stats"])
    return new_state, jax.lax.pmean(metrics, axis_name="batch")


def resnet_under_pmap(quick: bool) -> dict:
    """Flax's ImageNet training step (ResNet18, 8 devices, ``pmap``) with each BatchNorm class of
    ``RESNET_BATCH_NORMS``: ms/step, per-round ratios to Flax's default, collectives of each compiled step, and
    the losses of the first steps from the same weights.
    """
    # ResNet18's stages, or (quick) the one-block ResNet of Flax's tests: compiling takes most of the time.
    stage_sizes, width, per_device_batch = ((1,), 8, 4) if quick else ((2, 2, 2, 2), 16, 16)
    rounds, steps, loss_steps = (2, 1, 2) if quick else (21, 5, 10)
    devices, size = jax.local_device_count(), 32
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": jnp.asarray(rng.normal(size=(devices, per_device_batch, size, size, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, CLASSES, (devices, per_device_batch))),
        }
        for _ in range(loss_steps)
    ]
    models = {name: ResNet(stage_sizes, CLASSES, norm_cls, width) for name, norm_cls in RESNET_BATCH_NORMS.items()}
    # The swap keeps Flax's variables, so one init serves every model and all start from the same weights. An
    # "rbg" key: threefry's random bits take XLA:CPU seconds to compile.
    variables = jax.jit(models["flax default"].init)(jax.random.key(0, impl="rbg"), jnp.ones((1, size, size, 3)))
    optimizer = optax.sgd(0.1, momentum=0.9, nesterov=True)
    configs = {}
    for name, model in models.items():
        state = TrainState.create(
            apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=optimizer
        )
        state = jax_utils.replicate(state)
        step = jax.pmap(resnet_train_step, axis_name="batch").lower(state, batches[0]).compile()
        losses = []
        for batch in batches:  # also the warm-up of the timing
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"][0]))
        hlo = step.as_text()
        configs[name] = {
            "step": step,
            "state": state,
            "losses": losses,
            "times": [],
            "all_reduce": collective_bytes(hlo, "all-reduce"),
            "all_gather": collective_bytes(hlo, "all-gather"),
        }
    names = list(configs)
    for round_index in range(rounds):  # interleaved: every configuration once per round, order rotating
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            c = configs[name]
            start = time.perf_counter()
            for _ in range(steps):
                c["state"], _ = c["step"](c["state"], batches[-1])
            jax.block_until_ready(c["state"])
            c["times"].append((time.perf_counter() - start) / steps)

    def max_loss_difference(a, b):
        return max(abs(x - y) for x, y in zip(configs[a]["losses"], configs[b]["losses"], strict=True))

    rows = []
    for name, c in configs.items():
        over_flax, quartiles = paired_ratio(c["times"], configs["flax default"]["times"])
        rows.append(
            {
                "batch_norm": name,
                "ms": 1e3 * statistics.median(c["times"]),
                "over_flax_default": over_flax,
                "over_flax_default_quartiles": quartiles,
                "all_reduce": c["all_reduce"],
                "all_gather": c["all_gather"],
                "losses": c["losses"],
                "times_s": c["times"],
            }
        )
    normjax_over_exact, exact_quartiles = paired_ratio(configs["normjax"]["times"], configs["flax exact"]["times"])
    return {
        "stage_sizes": list(stage_sizes),
        "num_filters": width,
        "batch_norm_layers": len(jax.tree.leaves(variables["batch_stats"])) // 2,
        "devices": devices,
        "per_device_batch": per_device_batch,
        "image": [size, size, 3],
        "optimizer": "optax.sgd(0.1, momentum=0.9, nesterov=True)",
        "rounds": rounds,
        "steps_per_timing": steps,
        "rows": rows,
        "normjax_over_flax_exact": normjax_over_exact,
        "normjax_over_flax_exact_quartiles": exact_quartiles,
        "max_loss_difference": {
            "normjax vs flax exact": max_loss_difference("normjax", "flax exact"),
            "normjax vs flax default": max_loss_difference("normjax", "flax default"),
            "flax exact vs flax default": max_loss_difference("flax exact", "flax default"),
        },
    }


def run(quick: bool) -> dict:
    per_device_batch, size = (8, 12) if quick else (32, 16)
    rounds, steps = (4, 2) if quick else (21, 5)
    device_counts = QUICK_DEVICE_COUNTS if quick else DEVICE_COUNTS
    optimizer = optax.sgd(0.05)
    rng = np.random.default_rng(0)
    results = {}
    modes = ("local", "sync", "flax_sync")  # per-device normjax, synchronized normjax, synchronized Flax default
    for n in device_counts:
        mesh = Mesh(np.array(jax.devices()[:n]), ("d",))
        images = jnp.asarray(rng.normal(size=(n * per_device_batch, size, size, 3)), jnp.float32)
        labels = jnp.asarray(rng.integers(0, CLASSES, n * per_device_batch))
        for mode in modes:
            synchronized = mode != "local"
            params, states = init_model(jax.random.key(0), 3)
            if not synchronized:  # one running state per device
                states = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), states)  # noqa: B023
            carry = [params, optimizer.init(params), states]
            # Run the ahead-of-time compiled step itself, so each configuration compiles once.
            norm = "flax" if mode == "flax_sync" else "normjax"
            step = make_train_step(mesh, synchronized, optimizer, norm).lower(*carry, images, labels).compile()
            hlo = step.as_text()
            carry[:3] = step(*carry, images, labels)[:3]  # compile + warm up
            jax.block_until_ready(carry)
            results[(n, mode)] = {
                "step": step,
                "carry": carry,
                "times": [],
                "all_reduce": collective_bytes(hlo, "all-reduce"),
                "all_gather": collective_bytes(hlo, "all-gather"),
                "data": (images, labels),
            }
    for round_index in range(rounds):  # interleaved: every configuration once per round, order rotating
        for n in device_counts:
            shift = round_index % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                r = results[(n, mode)]
                start = time.perf_counter()
                for _ in range(steps):
                    out = r["step"](*r["carry"], *r["data"])
                    r["carry"][:3] = out[:3]
                jax.block_until_ready(r["carry"])
                r["times"].append((time.perf_counter() - start) / steps)

    rows = []
    for n in device_counts:
        local, synced, flax = (results[(n, mode)] for mode in modes)
        sync_over_local, quartiles = paired_ratio(synced["times"], local["times"])
        sync_over_flax, flax_quartiles = paired_ratio(synced["times"], flax["times"])
        rows.append(
            {
                "devices": n,
                "local_ms": 1e3 * statistics.median(local["times"]),
                "sync_ms": 1e3 * statistics.median(synced["times"]),
                "flax_sync_ms": 1e3 * statistics.median(flax["times"]),
                "sync_over_local": sync_over_local,
                "sync_over_local_quartiles": quartiles,
                "sync_over_flax_sync": sync_over_flax,
                "sync_over_flax_sync_quartiles": flax_quartiles,
                "times_s": {mode: results[(n, mode)]["times"] for mode in modes},
                "collectives": {
                    mode: {
                        "all_reduce": results[(n, mode)]["all_reduce"],
                        "all_gather": results[(n, mode)]["all_gather"],
                    }
                    for mode in modes
                },
            }
        )
    return {
        "config": {
            "quick": quick,
            "per_device_batch": per_device_batch,
            "image": [size, size, 3],
            "channels": list(CHANNELS),
            "rounds": rounds,
            "steps_per_timing": steps,
            "jax": jax.__version__,
            "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, {jax.device_count()} simulated devices",
        },
        "rows": rows,
        "bn_call_collectives": bn_call_bytes(),
        "call_time_vs_flax": call_time_vs_flax(quick),
        "resnet_pmap": resnet_under_pmap(quick),
        "equal_weight_probe": equal_weight_probe(),
    }


def resnet_markdown(r: dict) -> list[str]:
    """The "ResNet under pmap" section of ``results.md``."""
    labels = {
        "flax default": "`flax.linen.BatchNorm` (default)",
        "flax default (control copy)": "`flax.linen.BatchNorm` (default), control copy",
        "flax exact": "`flax.linen.BatchNorm(use_fast_variance=False)`",
        "normjax": "`normjax.linen.BatchNorm`",
    }
    q25, q75 = r["normjax_over_flax_exact_quartiles"]
    losses = r["max_loss_difference"]
    lines = [
        "",
        "## ResNet under pmap",
        "",
        f"Flax's ImageNet example (ResNet with stages {r['stage_sizes']}, {r['num_filters']} filters, "
        f"{r['batch_norm_layers']} synchronized BatchNorm layers; its `train_step` under `jax.pmap(..., "
        f"axis_name='batch')`, {r['optimizer']}) on {r['devices']} devices, per-device batch "
        f"{r['per_device_batch']} of {r['image']} images; {r['rounds']} interleaved rounds of "
        f"{r['steps_per_timing']} steps. Only the BatchNorm class differs. Ratios are medians of the per-round "
        "ratios [interquartile range]; collectives are per device, from the compiled step.",
        "",
        "| BatchNorm | ms/step | / Flax default [IQR] | all-reduce ops, bytes | all-gather ops, bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        a25, a75 = row["over_flax_default_quartiles"]
        lines.append(
            f"| {labels[row['batch_norm']]} | {row['ms']:.2f} | {row['over_flax_default']:.3f} "
            f"[{a25:.3f}, {a75:.3f}] | {row['all_reduce'][0]}, {row['all_reduce'][1]} | "
            f"{row['all_gather'][0]}, {row['all_gather'][1]} |"
        )
    lines += [
        "",
        f"normjax / Flax exact: {r['normjax_over_flax_exact']:.3f} [{q25:.3f}, {q75:.3f}]. Training losses over "
        f"the first {len(r['rows'][0]['losses'])} steps from the same weights, largest difference: normjax vs "
        f"Flax exact {losses['normjax vs flax exact']:.2e}, normjax vs Flax default "
        f"{losses['normjax vs flax default']:.2e}, Flax exact vs Flax default "
        f"{losses['flax exact vs flax default']:.2e}.",
    ]
    return lines


def to_markdown(result: dict) -> str:
    cfg = result["config"]
    mode = " (quick mode: a smoke run, its timings mean nothing)" if cfg["quick"] else ""
    lines = [
        "# Synchronized vs local BatchNorm: step time and collective bytes",
        "",
        f"Conv net {cfg['channels']} channels, per-device batch {cfg['per_device_batch']} of {cfg['image']} images, "
        f"optax SGD; {cfg['rounds']} interleaved rounds of {cfg['steps_per_timing']} steps. "
        f"jax {cfg['jax']}, {cfg['machine']}{mode}.",
        "",
        "Times are medians over rounds; sync / local is the median of the per-round ratios, with their "
        "interquartile range.",
        "",
        "| devices | local ms/step | sync ms/step | Flax sync ms/step | sync / local [IQR] | sync / Flax sync [IQR] |"
        " collectives/step local; sync; Flax sync (all-reduce + all-gather) |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]

    def collectives(c):
        return f"{c['all_reduce'][0]} + {c['all_gather'][0]}"

    for r in result["rows"]:
        q25, q75 = r["sync_over_local_quartiles"]
        f25, f75 = r["sync_over_flax_sync_quartiles"]
        c = r["collectives"]
        lines.append(
            f"| {r['devices']} | {r['local_ms']:.2f} | {r['sync_ms']:.2f} | {r['flax_sync_ms']:.2f} | "
            f"{r['sync_over_local']:.2f} [{q25:.2f}, {q75:.2f}] | "
            f"{r['sync_over_flax_sync']:.2f} [{f25:.2f}, {f75:.2f}] | "
            f"{collectives(c['local'])}; {collectives(c['sync'])}; {collectives(c['flax_sync'])} |"
        )
    lines += [
        "",
        "Every step all-reduces the gradients and the loss; a synchronized normjax step also gathers each "
        "BatchNorm's statistics (forward, one all-gather) and all-reduces their cotangents (backward); Flax's "
        "default all-reduces its one-pass sums. Local BatchNorm keeps one running state per device.",
        "",
        "One synchronized `batch_norm` call, from the compiled HLO (per device, any device count > 1):",
        "",
        "| features | mask | pass | all-reduce ops, bytes | all-gather ops, bytes received |",
        "|---:|---|---|---:|---:|",
    ]
    for r in result["bn_call_collectives"]:
        lines.append(
            f"| {r['features']} | {'yes' if r['masked'] else 'no'} | "
            f"{'forward + grad' if r['with_grad'] else 'forward'} | {r['all-reduce'][0]}, {r['all-reduce'][1]} | "
            f"{r['all-gather'][0]}, {r['all-gather'][1]} |"
        )
    lines += [
        "",
        "One synchronized BatchNorm forward+backward under `shard_map` (activations (32 per device, 8, 8, 32)), "
        "time relative to `flax.linen.BatchNorm(axis_name='d')` with its defaults:",
        "",
        "| devices | Flax default ms | normjax / Flax | Flax two-pass / Flax |",
        "|---:|---:|---:|---:|",
    ]
    for r in result["call_time_vs_flax"]:
        lines.append(
            f"| {r['devices']} | {r['flax_ms']:.2f} | {r['normjax_over_flax']:.2f} | "
            f"{r['flax_two_pass_over_flax']:.2f} |"
        )
    lines += resnet_markdown(result["resnet_pmap"])
    p = result["equal_weight_probe"]
    lines += [
        "",
        f"Equal-weight averaging probe (valid rows per device {p['valid_rows_per_device']}): true mean "
        f"{p['true_mean']:.4f}, normjax {p['normjax_mean']:.4f}, flax.linen.BatchNorm {p['flax_linen_mean']:.4f}, "
        f"mean of device means {p['equal_weight_mean_of_device_means']:.4f}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json and results.md")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: small shapes, few rounds (< 60 s); its timings mean nothing"
    )
    args = parser.parse_args()
    result = run(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    markdown = to_markdown(result)
    (args.out / "results.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
