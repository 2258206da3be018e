"""How the cost of a normalization grows with the input's size: normjax against flax.linen, 1e4 to 1e8 elements.

BatchNorm (training, ``(N, 256)``) and LayerNorm (``(N, 1024)``) forward and forward+backward, for inputs of 1e4,
1e5, 1e6, 1e7 and 1e8 float32 elements (quick mode: 1e4 to 1e6). Repetitions are interleaved across
implementations within each size; medians are reported as nanoseconds per element and the growth exponent is
the least-squares slope of log(time) against log(size) over the sizes of at least 1e6 elements (below that, fixed
dispatch costs dominate). Timing as in ``run.py``: one pinned core, single-threaded, interleaved warm samples (see
``_timing.py``). Cost versus the number of devices for synchronized BatchNorm is measured by
``benchmarks/sync_scaling.py``.

Usage::

    python benchmarks/scaling.py --out outputs/scaling            # the table in docs/guides/benchmarks.md
    python benchmarks/scaling.py --out outputs/scaling --quick    # sizes 1e4..1e6, < 60 s

Writes ``scaling.json``, ``scaling.md`` and ``scaling.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import `benchmarks` from the root

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import normjax  # noqa: E402
from benchmarks import _timing  # noqa: E402

FEATURES = {"batch_norm": 256, "layer_norm": 1024}


def _functions(norm, features):
    state = normjax.init_batch_norm_state(features)
    if norm == "batch_norm":
        flax_module = nn.BatchNorm(use_running_average=False)
        stats = {"mean": state.mean, "var": state.var}
        return {
            "normjax": lambda x, s, b: normjax.batch_norm(x, state, s, b, training=True)[0],
            "flax.linen": lambda x, s, b: flax_module.apply(
                {"params": {"scale": s, "bias": b}, "batch_stats": stats}, x, mutable=["batch_stats"]
            )[0],
        }
    flax_module = nn.LayerNorm()
    return {
        "normjax": lambda x, s, b: normjax.layer_norm(x, s, b),
        "flax.linen": lambda x, s, b: flax_module.apply({"params": {"scale": s, "bias": b}}, x),
    }


def _with_backward(f):
    def fwd_bwd(x, s, b, g):
        y, pull = jax.vjp(f, x, s, b)
        return y, pull(g)

    return fwd_bwd


def measure(norm, size, reps):
    features = FEATURES[norm]
    rows = max(size // features, 2)
    x = jax.random.normal(jax.random.key(0), (rows, features))
    g = jax.random.normal(jax.random.key(1), (rows, features))
    s, b = jnp.ones(features), jnp.zeros(features)
    calls = {}
    for name, f in _functions(norm, features).items():
        fwd = jax.jit(f).lower(x, s, b).compile()
        both = jax.jit(_with_backward(f)).lower(x, s, b, g).compile()
        calls[(name, "fwd")] = lambda fwd=fwd: jax.block_until_ready(fwd(x, s, b))
        calls[(name, "fwd+bwd")] = lambda both=both: jax.block_until_ready(both(x, s, b, g))
    medians = _timing.interleaved(calls, reps, calls_per_sample=1 if size >= 10**7 else 3)
    return [
        {"norm": norm, "impl": k[0], "mode": k[1], "elements": x.size, "seconds": seconds}
        for k, seconds in medians.items()
    ]


def growth_exponent(points):
    """Least-squares slope of log(seconds) against log(elements) for sizes of at least 1e6 elements."""
    big = [(e, t) for e, t in points if e >= 1e6] or points
    if len(big) < 2:
        return float("nan")
    return float(np.polyfit(np.log([e for e, _ in big]), np.log([t for _, t in big]), 1)[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/scaling"))
    parser.add_argument("--quick", action="store_true", help="sizes 1e4..1e6 only")
    args = parser.parse_args(argv)
    _timing.quiet_process()
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = [10**k for k in (4, 5, 6)] if args.quick else [10**k for k in (4, 5, 6, 7, 8)]
    results = []
    for norm in FEATURES:
        for size in sizes:
            reps = 5 if size >= 10**7 else (5 if args.quick else 15)
            results += measure(norm, size, reps)
            print(f"{norm} {size:.0e} done", flush=True)

    lines = ["| norm | implementation | mode | " + " | ".join(f"{s:.0e}" for s in sizes) + " | growth exponent |"]
    lines.append("|---" * (4 + len(sizes)) + "|")
    summary = []
    for norm in FEATURES:
        for impl in ("normjax", "flax.linen"):
            for mode in ("fwd", "fwd+bwd"):
                pts = [
                    (r["elements"], r["seconds"])
                    for r in results
                    if (r["norm"], r["impl"], r["mode"]) == (norm, impl, mode)
                ]
                exponent = growth_exponent(pts)
                summary.append({"norm": norm, "impl": impl, "mode": mode, "growth_exponent": exponent})
                cells = " | ".join(f"{t / e * 1e9:.2f}" for e, t in pts)
                lines.append(f"| {norm} | {impl} | {mode} | {cells} | {exponent:.2f} |")
    command = "python benchmarks/scaling.py --out " + str(args.out) + (" --quick" if args.quick else "")
    header = [
        f"Command: `{command}`",
        "",
        "Nanoseconds per element (median of interleaved samples, one pinned core) by input size; growth exponent k in "
        "time ~ size^k fitted over sizes >= 1e6 (k = 1: linear).",
        "",
    ]
    (args.out / "scaling.md").write_text("\n".join(header + lines) + "\n")
    (args.out / "scaling.json").write_text(json.dumps({"command": command, "rows": results, "fits": summary}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, norm in zip(axes, FEATURES, strict=True):
        for impl in ("normjax", "flax.linen"):
            for mode, style in (("fwd", "--"), ("fwd+bwd", "-")):
                pts = [
                    (r["elements"], r["seconds"])
                    for r in results
                    if (r["norm"], r["impl"], r["mode"]) == (norm, impl, mode)
                ]
                ax.loglog([e for e, _ in pts], [t for _, t in pts], style, marker="o", label=f"{impl} {mode}")
        ax.set_title(norm)
        ax.set_xlabel("elements")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "scaling.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
