"""The passes of a normalization's forward, timed one by one: why a stable forward costs more than Flax's default.

A training-mode forward reads ``x`` three times on XLA:CPU, in any implementation: one reduction for the mean,
one for the second moment, one elementwise pass for the output. The implementations differ in the second
reduction only. Flax's default reduces ``x * x`` (then subtracts ``mean**2``, which cancels at large offsets);
a stable two-pass forward reduces ``(x - mean) ** 2``. XLA:CPU runs reductions as library ("ynn") fusions that
execute each elementwise operation as its own kernel over cached tiles and have a fused kernel for a plain sum
and for a sum of squares, but not for a sum of squared differences; so the stable reduction costs a
subtraction more. This script times each pass alone, in the layouts of ``run.py``, and the forward ratio that
follows from them: (mean + centered + output) / (mean + squares + output).

Usage::

    python benchmarks/passes.py --out outputs/passes

Writes ``passes.md`` and ``passes.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import `benchmarks` from the root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import _timing  # noqa: E402

# (name, shape, reduction axes): BatchNorm reduces all but the channels, InstanceNorm the spatial axes.
CASES = (
    ("batch_norm NHWC", (32, 32, 32, 128), (0, 1, 2)),
    ("batch_norm NC", (4096, 1024), (0,)),
    ("instance_norm NHWC", (16, 32, 32, 128), (1, 2)),
)


def _passes(axes):
    def mean(x, m, a):
        return jnp.mean(x, axes)

    def squares(x, m, a):
        return jnp.mean(x * x, axes)

    def centered(x, m, a):
        deviation = x - m
        return jnp.mean(deviation * deviation, axes)

    def output(x, m, a):
        return (x - m) * a + m

    def copy(x, m, a):
        return x * 2.0

    return {"mean": mean, "squares": squares, "centered": centered, "output": output, "copy": copy}


def measure(shape, axes, rounds):
    x = jax.random.normal(jax.random.key(0), shape)
    m = jnp.mean(x, axes, keepdims=True)
    a = jax.lax.rsqrt(jnp.var(x, axes, keepdims=True) + 1e-5)
    calls = {}
    for name, f in _passes(axes).items():
        compiled = jax.jit(f).lower(x, m, a).compile()
        calls[name] = lambda compiled=compiled: jax.block_until_ready(compiled(x, m, a))
    return _timing.interleaved(calls, rounds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/passes"))
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    _timing.quiet_process()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, shape, axes in CASES:
        seconds = measure(shape, axes, args.rounds)
        one_pass = seconds["mean"] + seconds["squares"] + seconds["output"]
        two_pass = seconds["mean"] + seconds["centered"] + seconds["output"]
        rows.append({"case": name, "shape": list(shape), "seconds": seconds, "predicted_ratio": two_pass / one_pass})
        print(f"{name}: predicted two-pass / one-pass forward {two_pass / one_pass:.2f}", flush=True)
    command = f"python benchmarks/passes.py --out {args.out} --rounds {args.rounds}"
    lines = [
        f"Command: `{command}` (one pinned core, single-threaded XLA; medians of interleaved warm samples)",
        "",
        "| case | mean: sum(x) | squares: sum(x * x) | centered: sum((x - m)^2) | output: (x - m) * a + b | copy "
        "| centered / squares | predicted forward ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        t = {k: v * 1e3 for k, v in row["seconds"].items()}
        lines.append(
            f"| {row['case']} {tuple(row['shape'])} | {t['mean']:.2f} ms | {t['squares']:.2f} ms | "
            f"{t['centered']:.2f} ms | {t['output']:.2f} ms | {t['copy']:.2f} ms | "
            f"{t['centered'] / t['squares']:.2f} | {row['predicted_ratio']:.2f} |"
        )
    (args.out / "passes.md").write_text("\n".join(lines) + "\n")
    (args.out / "passes.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print(f"wrote passes.md, passes.json to {args.out}")


if __name__ == "__main__":
    main()
