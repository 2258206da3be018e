"""normjax's speed targets checked against one or more runs of ``run.py``: a markdown table, one column per run.

The targets: normjax's forward takes at most 1.05x (BatchNorm) or 1.0x (the other norms) the time of
``flax.linen``'s default layer, and its forward+backward at most 0.8x, with the stable two-pass variance.

Usage::

    python benchmarks/run.py --out outputs/bench_A && python benchmarks/run.py --out outputs/bench_B
    python benchmarks/targets.py outputs/bench_A outputs/bench_B

A target is met when normjax's ratio to ``flax.linen`` defaults is at most the target in every run given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BASELINE, CONTROL = "flax.linen", "flax.linen (control)"
JAX_PEERS = ("flax.linen (two-pass)", "flax.nnx", "haiku", "equinox", "plain jax")
# (forward, forward+backward) ratio targets against flax.linen defaults.
TARGETS = {
    "batch_norm": (1.05, 0.8),
    "layer_norm": (1.0, 0.8),
    "rms_norm": (1.0, 0.8),
    "group_norm": (1.0, 0.8),
    "instance_norm": (1.0, 0.8),
}


def _ratios(rows, case, mode):
    return {
        r["impl"]: r["ratio"] for r in rows if (r["norm"], r["layout"], tuple(r["shape"])) == case and r["mode"] == mode
    }


def table(runs: list[list[dict]]) -> str:
    cases = list(dict.fromkeys((r["norm"], r["layout"], tuple(r["shape"])) for r in runs[0]))
    runs_label = " / ".join(chr(ord("A") + i) for i in range(len(runs)))
    lines = [
        f"| case | normjax fwd ({runs_label}) | target | met | normjax fwd+bwd ({runs_label}) | target | met "
        f"| control fwd / fwd+bwd ({runs_label}) | fastest JAX peer fwd+bwd (A) | PyTorch fwd / fwd+bwd (A) |",
        "|---" * 10 + "|",
    ]
    for case in cases:
        norm, layout, shape = case
        members = next(r.get("members", 0) for r in runs[0] if (r["norm"], r["layout"], tuple(r["shape"])) == case)
        cells = [f"{norm} {layout} {shape}" + (f" x {members} (vmap)" if members else "")]
        for mode, target in zip(("fwd", "fwd+bwd"), TARGETS[norm], strict=True):
            values = [_ratios(rows, case, mode)["normjax"] for rows in runs]
            cells += [" / ".join(f"{v:.2f}" for v in values), f"<= {target}", "yes" if max(values) <= target else "no"]
        controls = [(_ratios(rows, case, "fwd")[CONTROL], _ratios(rows, case, "fwd+bwd")[CONTROL]) for rows in runs]
        cells.append(" ; ".join(f"{f:.2f} / {b:.2f}" for f, b in controls))
        both = _ratios(runs[0], case, "fwd+bwd")
        peer = min((p for p in JAX_PEERS if p in both), key=both.get)
        cells.append(f"{peer} {both[peer]:.2f}")
        forward = _ratios(runs[0], case, "fwd")
        cells.append(f"{forward['pytorch']:.2f} / {both['pytorch']:.2f}" if "pytorch" in both else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="--out folders of run.py")
    args = parser.parse_args(argv)
    runs = [json.loads((folder / "results.json").read_text())["rows"] for folder in args.runs]
    print(table(runs))


if __name__ == "__main__":
    main()
