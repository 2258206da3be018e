"""Normalization speed, memory and accuracy: normjax against Flax, Haiku, Equinox, plain JAX and PyTorch (CPU).

For BatchNorm (training), LayerNorm, RMSNorm, GroupNorm and InstanceNorm on realistic shapes (NHWC conv
activations, (B, T, D) sequences, (N, C) MLP activations), every implementation is timed forward and
forward+backward (``jax.vjp`` with an upstream gradient, returning the output and the gradients of the input, scale
and bias, as inside a network). The script re-executes itself on one pinned core, single-threaded, with glibc
keeping freed memory (see ``_timing.py`` for why each matters). Repetitions are interleaved in one process (each
round takes a sample of every implementation, in a rotating order; a sample is a block of warm back-to-back calls)
and medians are reported as ratios to ``flax.linen`` with its defaults (``use_fast_variance=True``). A second,
separately compiled copy of that baseline, ``flax.linen (control)``, is timed like the others: its distance from
1.00 is the noise floor of the run.

Also reported, per case:

* the fraction of the memory roofline: the bytes that must move (forward: read x, write y; forward+backward: read x
  twice, read g, write y and dx), divided by the measured copy bandwidth (a jitted ``x * 2`` probe timed in the same
  rounds), over the measured time;
* compiled temporary memory (``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``), as a
  multiple of the input's size;
* accuracy: the largest error of the forward output against a float64 NumPy reference for inputs with a mean of
  0, 1e2 and 1e4 (std 1), i.e. whether the variance survives a large offset.

Usage::

    python benchmarks/run.py --out outputs/benchmarks            # the tables in docs/guides/benchmarks.md
    python benchmarks/run.py --out outputs/benchmarks --quick    # small shapes, < 60 s smoke run

Writes ``results.json``, ``results.md`` and ``ratios.png``, ``roofline.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import _timing
import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import normjax

BASELINE = "flax.linen"
CONTROL = "flax.linen (control)"
OFFSETS = (0.0, 1e2, 1e4)


def _cases(quick: bool):
    """(norm, layout, shape) triples; quick mode shrinks every shape."""
    if quick:
        return [
            ("batch_norm", "NHWC", (8, 8, 8, 64)),
            ("layer_norm", "BTD", (8, 32, 128)),
            ("group_norm", "NHWC", (4, 8, 8, 64)),
        ]
    return [
        ("batch_norm", "NHWC", (32, 32, 32, 128)),
        ("batch_norm", "NC", (4096, 1024)),
        ("layer_norm", "BTD", (16, 512, 768)),
        ("layer_norm", "NC", (4096, 1024)),
        ("rms_norm", "BTD", (16, 512, 768)),
        ("group_norm", "NHWC", (16, 32, 32, 128)),
        ("instance_norm", "NHWC", (16, 32, 32, 128)),
    ]


GROUPS = 32
EPS = 1e-5


# --------------------------------------------------------------------------------------------- implementations
# Each implementation is a pure function f(x, scale, bias) -> y on the NHWC / channels-last array.


def _normjax(norm, shape):
    c = shape[-1]
    state = normjax.init_batch_norm_state(c)
    return {
        "batch_norm": lambda x, s, b: normjax.batch_norm(x, state, s, b, training=True, epsilon=EPS)[0],
        "layer_norm": lambda x, s, b: normjax.layer_norm(x, s, b, epsilon=EPS),
        "rms_norm": lambda x, s, b: normjax.rms_norm(x, s, epsilon=EPS),
        "group_norm": lambda x, s, b: normjax.group_norm(x, s, b, num_groups=GROUPS, epsilon=EPS),
        "instance_norm": lambda x, s, b: normjax.instance_norm(x, s, b, epsilon=EPS),
    }[norm]


def _linen_module(norm, fast):
    return {
        "batch_norm": lambda: nn.BatchNorm(use_running_average=False, epsilon=EPS, use_fast_variance=fast),
        "layer_norm": lambda: nn.LayerNorm(epsilon=EPS, use_fast_variance=fast),
        "rms_norm": lambda: nn.RMSNorm(epsilon=EPS, use_fast_variance=fast),
        "group_norm": lambda: nn.GroupNorm(num_groups=GROUPS, epsilon=EPS, use_fast_variance=fast),
        "instance_norm": lambda: nn.InstanceNorm(epsilon=EPS, use_fast_variance=fast),
    }[norm]()


def _linen(norm, shape, fast):
    module = _linen_module(norm, fast)
    c = shape[-1]

    def f(x, s, b):
        params = {"scale": s} if norm == "rms_norm" else {"scale": s, "bias": b}
        if norm == "batch_norm":
            stats = {"mean": jnp.zeros(c), "var": jnp.ones(c)}
            return module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])[0]
        return module.apply({"params": params}, x)

    return f


def _nnx(norm, shape):
    c = shape[-1]
    rngs = nnx.Rngs(0)
    module = {
        "batch_norm": lambda: nnx.BatchNorm(c, use_running_average=False, epsilon=EPS, rngs=rngs),
        "layer_norm": lambda: nnx.LayerNorm(c, epsilon=EPS, rngs=rngs),
        "rms_norm": lambda: nnx.RMSNorm(c, epsilon=EPS, rngs=rngs),
        "group_norm": lambda: nnx.GroupNorm(c, num_groups=GROUPS, epsilon=EPS, rngs=rngs),
        "instance_norm": lambda: nnx.InstanceNorm(c, epsilon=EPS, rngs=rngs),
    }[norm]()
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [jax.tree_util.keystr(path) for path, _ in paths]

    def f(x, s, b):
        leaves = [{"scale": s, "bias": b}[next(k for k in ("scale", "bias") if k in n)] for n in names]
        state = jax.tree.map(lambda a: a + 0, rest)  # fresh values in this trace, so the layer may update them
        return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves), state)(x)

    return f


def _haiku(norm, shape):
    build = {
        "batch_norm": lambda x: hk.BatchNorm(True, True, 0.99, eps=EPS)(x, is_training=True),
        "layer_norm": lambda x: hk.LayerNorm(-1, True, True, eps=EPS)(x),
        "rms_norm": lambda x: hk.RMSNorm(-1, eps=EPS)(x),
        "group_norm": lambda x: hk.GroupNorm(GROUPS, eps=EPS)(x),
        "instance_norm": lambda x: hk.InstanceNorm(True, True, eps=EPS)(x),
    }[norm]
    transformed = hk.transform_with_state(build)
    dummy = jnp.zeros(shape, jnp.float32)
    params, state = transformed.init(jax.random.key(0), dummy)
    (module,) = params

    def f(x, s, b):
        leaves = {"scale": s, "offset": b}
        p = {module: {k: jnp.reshape(leaves[k], v.shape) for k, v in params[module].items()}}
        return transformed.apply(p, state, None, x)[0]

    return f


def _equinox(norm, shape):
    """Equinox layers act on one example, channels first; only the channels-last-compatible cases are run."""
    c = shape[-1]
    if norm in ("layer_norm", "rms_norm"):
        layer = eqx.nn.LayerNorm(c, eps=EPS) if norm == "layer_norm" else eqx.nn.RMSNorm(c, eps=EPS)
        batch_dims = len(shape) - 1

        def f(x, s, b):
            model = eqx.tree_at(lambda m: m.weight, layer, s)
            if norm == "layer_norm":
                model = eqx.tree_at(lambda m: m.bias, model, b)
            fn = model
            for _ in range(batch_dims):
                fn = jax.vmap(fn)
            return fn(x)

        return f
    if norm == "batch_norm" and len(shape) == 2:
        layer, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(c, axis_name="batch", eps=EPS, mode="batch")

        def f(x, s, b):
            model = eqx.tree_at(lambda m: (m.weight, m.bias), layer, (s, b))
            call = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
            return call(x, state)[0]

        return f
    return None


def _plain_jax(norm, shape):
    """The textbook two-pass formula in jnp, differentiated by JAX."""
    ndim = len(shape)

    def standardize(x, axes, centered=True):
        mean = jnp.mean(x, axes, keepdims=True) if centered else 0.0
        var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + EPS)

    def f(x, s, b):
        if norm == "batch_norm":
            return standardize(x, tuple(range(ndim - 1))) * s + b
        if norm == "layer_norm":
            return standardize(x, (-1,)) * s + b
        if norm == "rms_norm":
            return standardize(x, (-1,), centered=False) * s
        if norm == "instance_norm":
            return standardize(x, tuple(range(1, ndim - 1))) * s + b
        grouped = x.reshape(x.shape[:-1] + (GROUPS, x.shape[-1] // GROUPS))
        y = standardize(grouped, tuple(range(1, ndim - 1)) + (ndim,)).reshape(x.shape)
        return y * s + b

    return f


def _implementations(norm, shape):
    impls = {
        "normjax": _normjax(norm, shape),
        BASELINE: _linen(norm, shape, fast=True),
        CONTROL: _linen(norm, shape, fast=True),
        "flax.linen (two-pass)": _linen(norm, shape, fast=False),
        "flax.nnx": _nnx(norm, shape),
        "haiku": _haiku(norm, shape),
        "equinox": _equinox(norm, shape),
        "plain jax": _plain_jax(norm, shape),
    }
    return {k: v for k, v in impls.items() if v is not None}


# ----------------------------------------------------------------------------------------------------- torch


def _torch_fns(norm, shape):
    """(forward, forward+backward) closures on torch tensors in torch's preferred layout for the op."""
    import torch.nn.functional as F  # noqa: N812

    c = shape[-1]
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=shape).astype(np.float32)
    g_np = rng.normal(size=shape).astype(np.float32)
    x = torch.from_numpy(x_np)
    g = torch.from_numpy(g_np)
    if len(shape) == 4:  # NHWC data as an NCHW tensor in channels_last memory: the same bytes, no copy
        x, g = x.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    op = {
        "batch_norm": lambda x: F.batch_norm(x, None, None, w, b, training=True, eps=EPS),
        "layer_norm": lambda x: F.layer_norm(x, (c,), w, b, eps=EPS),
        "rms_norm": lambda x: F.rms_norm(x, (c,), w, eps=EPS),
        "group_norm": lambda x: F.group_norm(x, GROUPS, w, b, eps=EPS),
        "instance_norm": lambda x: F.instance_norm(x, weight=w, bias=b, eps=EPS),
    }[norm]
    xg = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)

    def forward():
        with torch.no_grad():
            return op(x)

    def forward_backward():
        xg.grad = w.grad = b.grad = None
        y = op(xg)
        y.backward(g)
        return y

    return forward, forward_backward


# ---------------------------------------------------------------------------------------------------- helpers


def _reference64(norm, x):
    x = np.asarray(x, np.float64)
    ndim = x.ndim
    if norm == "group_norm":
        grouped = x.reshape(x.shape[:-1] + (GROUPS, x.shape[-1] // GROUPS))
        axes = tuple(range(1, ndim - 1)) + (ndim,)
        mean = grouped.mean(axes, keepdims=True)
        var = ((grouped - mean) ** 2).mean(axes, keepdims=True)
        return ((grouped - mean) / np.sqrt(var + EPS)).reshape(x.shape)
    axes = {
        "batch_norm": tuple(range(ndim - 1)),
        "layer_norm": (-1,),
        "rms_norm": (-1,),
        "instance_norm": tuple(range(1, ndim - 1)),
    }[norm]
    mean = 0.0 if norm == "rms_norm" else x.mean(axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axes, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS)


def _block(out):
    return jax.block_until_ready(out)


def _compile(f, args):
    return jax.jit(f).lower(*args).compile()


def _temp_bytes(compiled) -> float:
    analysis = compiled.memory_analysis()
    return float(getattr(analysis, "temp_size_in_bytes", float("nan")))


def _vjp(f):
    def fwd_bwd(x, s, b, g):
        y, pull = jax.vjp(f, x, s, b)
        return y, pull(g)

    return fwd_bwd


def run_case(norm, layout, shape, rounds, members=0):
    """Times, memory and accuracy for one (norm, shape) across all implementations.

    With ``members`` > 0 every JAX implementation is ``jax.vmap``-ed over an ensemble of that many independent
    members (each with its own data, scale and bias; PyTorch is not run): the vmap experiments of the brief.
    """
    c = shape[-1]
    ensemble = (members,) if members else ()
    key_x, key_g = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, ensemble + shape, jnp.float32)
    g = jax.random.normal(key_g, ensemble + shape, jnp.float32)
    s, b = jnp.ones(ensemble + (c,)), jnp.zeros(ensemble + (c,))
    impls = _implementations(norm, shape)
    if members:
        impls = {name: jax.vmap(f) for name, f in impls.items()}
    nbytes = x.size * x.dtype.itemsize

    compiled = {}
    for name, f in impls.items():
        compiled[(name, "fwd")] = _compile(f, (x, s, b))
        compiled[(name, "fwd+bwd")] = _compile(_vjp(f), (x, s, b, g))
    probe = _compile(lambda x: x * 2.0, (x,))

    calls = {"copy probe": lambda: _block(probe(x))}
    if not members:
        calls["pytorch (fwd)"], calls["pytorch (fwd+bwd)"] = _torch_fns(norm, shape)
    for (name, mode), fn in compiled.items():
        args = (x, s, b) if mode == "fwd" else (x, s, b, g)
        calls[f"{name} ({mode})"] = lambda fn=fn, args=args: _block(fn(*args))
    medians = _timing.interleaved(calls, rounds)

    bandwidth = 2 * nbytes / medians["copy probe"]  # bytes per second, read + write
    must_move = {"fwd": 2 * nbytes, "fwd+bwd": 5 * nbytes}
    rows = []
    for name in list(impls) + ([] if members else ["pytorch"]):
        for mode in ("fwd", "fwd+bwd"):
            seconds = medians[f"{name} ({mode})"]
            row = {
                "norm": norm,
                "layout": layout,
                "shape": list(shape),
                "members": members,
                "impl": name,
                "mode": mode,
                "seconds": seconds,
                "ratio": seconds / medians[f"{BASELINE} ({mode})"],
                "roofline": must_move[mode] / bandwidth / seconds,
            }
            if name != "pytorch":
                row["temp_x_input"] = _temp_bytes(compiled[(name, mode)]) / nbytes
            rows.append(row)

    errors = {}
    for name in impls:
        errs = []
        for offset in OFFSETS:
            xo = x + offset
            y = np.asarray(compiled[(name, "fwd")](xo, s, b), np.float64)
            reference = np.stack([_reference64(norm, m) for m in xo]) if members else _reference64(norm, xo)
            errs.append(float(np.max(np.abs(y - reference))))
        errors[name] = errs
    for row in rows:
        if row["impl"] in errors and row["mode"] == "fwd":
            row["max_error_at_offsets"] = errors[row["impl"]]
    return rows, bandwidth


# ----------------------------------------------------------------------------------------------------- output


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": len(jax.devices()),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "pinned_cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "not pinned",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


SMOKE_RUN = (
    "Smoke run (--quick): small shapes and few rounds check that every implementation runs; its timings mean "
    "nothing. Run without --quick for the numbers."
)


def _markdown(rows, machine, command, bandwidths) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine['processor']}, {machine['cpu_count']} cores, {machine['platform']}; jax "
        f"{machine['jax']} ({machine['jax_backend']}, `XLA_FLAGS={machine['xla_flags']}`), torch {machine['torch']} "
        f"({machine['torch_threads']} thread); pinned to core {machine['pinned_cores']}; "
        f"load average at the end {tuple(round(v, 1) for v in machine['load_average'])}.",
        "",
        "Ratios are medians of interleaved samples divided by `flax.linen` defaults (lower is faster); "
        f"`{CONTROL}` is a second copy of that baseline, so its distance from 1.00 is this run's noise. "
        "Roofline: fraction of the measured copy bandwidth needed to move the bytes that must move. "
        "Temp: compiled temporary memory as a multiple of the input. Error: max |y - float64| at input means "
        "0 / 1e2 / 1e4.",
        "",
    ]
    cases = []
    for row in rows:
        case = (row["norm"], row["layout"], tuple(row["shape"]))
        if case not in cases:
            cases.append(case)
    for norm, layout, shape in cases:
        sub = [r for r in rows if (r["norm"], r["layout"], tuple(r["shape"])) == (norm, layout, shape)]
        base = {r["mode"]: r["seconds"] for r in sub if r["impl"] == BASELINE}
        bw = bandwidths[(norm, layout, tuple(shape))] / 1e9
        members = sub[0]["members"]
        lines += [
            f"### {norm} {layout} {shape}" + (f", vmap over {members} members" if members else ""),
            "",
            f"Flax default: forward {base['fwd'] * 1e3:.2f} ms, forward+backward {base['fwd+bwd'] * 1e3:.2f} ms; "
            f"copy probe {bw:.1f} GB/s.",
            "",
            "| implementation | fwd ratio | fwd+bwd ratio | fwd roofline | fwd+bwd roofline | temp fwd | temp fwd+bwd "
            "| error (0 / 1e2 / 1e4) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for impl in dict.fromkeys(r["impl"] for r in sub):
            fwd = next(r for r in sub if r["impl"] == impl and r["mode"] == "fwd")
            both = next(r for r in sub if r["impl"] == impl and r["mode"] == "fwd+bwd")
            temp = lambda r: f"{r['temp_x_input']:.1f}x" if "temp_x_input" in r else "n/a"  # noqa: E731
            err = fwd.get("max_error_at_offsets")
            err_text = " / ".join(f"{e:.1e}" for e in err) if err else "n/a"
            lines.append(
                f"| {impl} | {fwd['ratio']:.2f} | {both['ratio']:.2f} | {fwd['roofline']:.0%} | "
                f"{both['roofline']:.0%} | {temp(fwd)} | {temp(both)} | {err_text} |"
            )
        lines.append("")
    return "\n".join(lines)


def _plots(rows, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(f"{r['norm']}\n{r['layout']}" for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    written = []
    for metric, name, ylabel in (
        ("ratio", "ratios.png", "time / flax.linen default (lower is faster)"),
        ("roofline", "roofline.png", "fraction of memory roofline (higher is better)"),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(15, 5), sharey=True)
        width = 0.8 / len(impls)
        for ax, mode in zip(axes, ("fwd", "fwd+bwd"), strict=True):
            for i, impl in enumerate(impls):
                values = []
                for case in cases:
                    match = [
                        r[metric]
                        for r in rows
                        if f"{r['norm']}\n{r['layout']}" == case and r["impl"] == impl and r["mode"] == mode
                    ]
                    values.append(match[0] if match else np.nan)
                ax.bar(np.arange(len(cases)) + i * width, values, width, label=impl)
            if metric == "ratio":
                ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2, cases, fontsize=8)
            ax.set_title(mode)
            ax.set_ylabel(ylabel)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="The full run (no --quick) takes about 4 minutes on one pinned core of an x86_64 CPU.",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: three small cases, two rounds (< 60 s); checks that everything runs, its timings mean "
        "nothing",
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9, quick 2)")
    parser.add_argument(
        "--ensemble",
        type=int,
        default=0,
        metavar="E",
        help="vmap every JAX implementation over E members, each with 1/E of each case's batch (no PyTorch)",
    )
    args = parser.parse_args(argv)
    _timing.quiet_process()  # may re-execute this script: say nothing before it
    if args.quick:
        print(SMOKE_RUN, flush=True)
    torch.set_num_threads(1)  # XLA:CPU runs single-threaded too (see _timing.py)
    rounds = args.rounds or (2 if args.quick else 9)
    args.out.mkdir(parents=True, exist_ok=True)

    rows, bandwidths = [], {}
    for norm, layout, shape in _cases(args.quick):
        if args.ensemble:  # the same bytes as the plain case, split across the members
            shape = (max(shape[0] // args.ensemble, 1),) + tuple(shape[1:])
        case_rows, bandwidth = run_case(norm, layout, shape, rounds, members=args.ensemble)
        rows += case_rows
        bandwidths[(norm, layout, tuple(shape))] = bandwidth
        summary = {r["impl"]: round(r["ratio"], 2) for r in case_rows if r["mode"] == "fwd+bwd"}
        print(f"{norm} {layout} {shape}: fwd+bwd ratios {summary}", flush=True)

    command = "python benchmarks/run.py --out " + str(args.out) + (" --quick" if args.quick else "")
    command += f" --rounds {args.rounds}" if args.rounds else ""
    command += f" --ensemble {args.ensemble}" if args.ensemble else ""
    machine = _machine()
    (args.out / "results.json").write_text(
        json.dumps({"command": command, "machine": machine, "rounds": rounds, "rows": rows}, indent=1)
    )
    markdown = _markdown(rows, machine, command, bandwidths)
    (args.out / "results.md").write_text(f"**{SMOKE_RUN}**\n\n{markdown}" if args.quick else markdown)
    plots = _plots(rows, args.out)
    print(f"wrote results.json, results.md, {', '.join(plots)} to {args.out}")
    if args.quick:
        print(SMOKE_RUN)


if __name__ == "__main__":
    main()
