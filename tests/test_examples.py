"""Every example runs in ``--quick`` mode in a fresh process and writes its plots and its results table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# script -> (the PNG files it must write, the optional modules it needs)
CASES = {
    "multi_device_training.py": (["accuracy_vs_steps.png"], ["optax", "matplotlib", "tqdm", "sklearn"]),
    "vmap_sweep.py": (["accuracy_vs_learning_rate.png"], ["optax", "matplotlib", "tqdm", "sklearn"]),
    "bn_paper_mnist.py": (["figure1.png", "learning_rates.png"], ["optax", "matplotlib", "tqdm", "mlxtend"]),
    "gn_batch_size.py": (["error_vs_batch_size.png"], ["optax", "matplotlib", "tqdm", "sklearn"]),
    "flax_dropin.py": (["accuracy_vs_steps.png"], ["optax", "matplotlib", "tqdm", "sklearn"]),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_quick_and_writes_outputs(script, tmp_path):
    pngs, modules = CASES[script]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"optional example dependencies not installed: {missing} (pip install '.[examples]')")
    out, data = tmp_path / "out", tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script asks for its own 8 host devices
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", "--out", str(out), "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "reproduces:" in result.stdout and "data:" in result.stdout
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    table = json.loads((out / "results.json").read_text())
    assert table["rows"] and table["meta"]["claim"]
    assert (out / "results.md").read_text().count("|") > 10
    assert not any(data.glob("*")) or all(p.suffix == ".npz" for p in data.iterdir())
    if script == "multi_device_training.py":  # pmap and shard_map compute the same first steps
        assert max(table["meta"]["pmap_vs_shard_map_max_loss_diff_first_3_steps"].values()) < 1e-5
    if script == "flax_dropin.py":  # drop-in equal to Flax, folding exact to float32 rounding, frozen stats fixed
        meta = table["meta"]
        assert max(meta["dropin_max_abs_diff"].values()) < 1e-5
        assert meta["linen_fold_diff"] < 1e-4 and meta["nnx_fold_diff"] < 1e-4
        assert meta["linen_batch_stats_change"] == 0.0 and meta["nnx_batch_stats_change"] == 0.0
        assert meta["linen_bn_params_change_during_finetune"] == 0.0 < meta["linen_head_change_during_finetune"]
