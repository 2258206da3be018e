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
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import `benchmarks` from the root

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import _timing  # noqa: E402
from benchmarks._peers import BASELINE, CONTROL, run_case  # noqa: E402


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
