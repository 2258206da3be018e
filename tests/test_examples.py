"""Every example runs in ``--quick`` mode in a fresh process, writes its plots and its results table, says
whether the run supports the claim it tests, and prints the table that the examples guide quotes for it."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GUIDE = ROOT / "docs" / "guides" / "examples.md"
# A quoted number matches a fresh run within this much (absolute, or relative for large numbers): enough for the
# float rounding that differs between CPUs and XLA builds, far less than any change in what a table says.
ABSOLUTE_TOLERANCE, RELATIVE_TOLERANCE = 0.005, 0.005

# script -> (the PNG files it must write, the optional modules it needs)
CASES = {
    "multi_device_training.py": (["accuracy_vs_steps.png"], ["optax", "matplotlib", "tqdm", "sklearn"]),
    "vmap_sweep.py": (["accuracy_vs_learning_rate.png"], ["optax", "matplotlib", "tqdm", "sklearn"]),
    "bn_paper_mnist.py": (["figure1.png", "learning_rates.png"], ["optax", "matplotlib", "tqdm", "mlxtend"]),
    "gn_batch_size.py": (["error_vs_batch_size.png"], ["optax", "matplotlib", "tqdm", "sklearn"]),
    "flax_dropin.py": (["accuracy_vs_steps.png"], ["optax", "matplotlib", "tqdm", "sklearn"]),
    "equinox_convnet.py": (["accuracy_vs_steps.png"], ["equinox", "optax", "matplotlib", "tqdm", "sklearn"]),
}


@pytest.mark.slow  # each example trains a network, in a fresh process
@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_quick_and_writes_outputs(script, tmp_path):
    pngs, modules = CASES[script]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"optional example dependencies not installed: {missing} (pip install '.[examples]')")
    out, data = tmp_path / "out", tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script asks for its own 8 host devices
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # this checkout's normjax
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", "--out", str(out), "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "tests the claim:" in result.stdout and "data:" in result.stdout
    assert re.search(r"^this run (supports|does NOT support) the claim: ", result.stdout, re.M), result.stdout[-2000:]
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    table = json.loads((out / "results.json").read_text())
    assert table["rows"] and table["meta"]["claim"]
    assert (out / "results.md").read_text().count("|") > 10
    _assert_quoted_table_matches(script, (out / "results.md").read_text())
    assert not any(data.glob("*")) or all(p.suffix == ".npz" for p in data.iterdir())
    if script == "multi_device_training.py":  # pmap and shard_map compute the same first steps
        assert max(table["meta"]["pmap_vs_shard_map_max_loss_diff_first_3_steps"].values()) < 1e-5
    if script == "flax_dropin.py":  # drop-in equal to Flax, folding exact to float32 rounding, frozen stats fixed
        meta = table["meta"]
        assert max(meta["dropin_max_abs_diff"].values()) < 1e-5
        assert meta["linen_fold_diff"] < 1e-4 and meta["nnx_fold_diff"] < 1e-4
        assert meta["linen_batch_stats_change"] == 0.0 and meta["nnx_batch_stats_change"] == 0.0
        assert meta["linen_bn_params_change_during_finetune"] == 0.0 < meta["linen_head_change_during_finetune"]
    if script == "equinox_convnet.py":  # sharded filter_jit = shard_map, and the same steps as Equinox's layer
        assert max(table["meta"]["max_loss_diff_first_3_steps"].values()) < 1e-5


def markdown_tables(text: str) -> list[list[list[str]]]:
    """The pipe tables of a Markdown text, each as rows of stripped cells, without the ``|---|`` rule."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(set(cell) <= set("-: ") for cell in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def quoted_table(script: str) -> list[list[str]] | None:
    """The first table after the guide's ``python examples/<script> --quick`` line, or None if it quotes none."""
    text = GUIDE.read_text()
    command = f"`python examples/{script} --quick`"
    if command not in text:
        return None
    following = text[text.index(command) :]
    next_command = following.find("`python examples/", len(command))
    tables = markdown_tables(following if next_command < 0 else following[:next_command])
    return tables[0] if tables else None


def _cells_match(quoted: str, fresh: str) -> bool:
    try:
        a, b = float(quoted), float(fresh)
    except ValueError:
        return quoted == fresh
    return math.isclose(a, b, abs_tol=ABSOLUTE_TOLERANCE, rel_tol=RELATIVE_TOLERANCE)


def _assert_quoted_table_matches(script: str, results_md: str) -> None:
    """The guide's table for this script's quick run must be what the run prints (its columns may be a subset,
    e.g. without the timings)."""
    quoted = quoted_table(script)
    if quoted is None:
        return
    fresh = markdown_tables(results_md)[0]
    header, rows = quoted[0], quoted[1:]
    missing = [name for name in header if name not in fresh[0]]
    columns = [fresh[0].index(name) for name in header if name in fresh[0]]
    fresh_rows = [[row[c] for c in columns] for row in fresh[1:]]
    stale = missing or len(rows) != len(fresh_rows) or not all(
        _cells_match(q, f) for quoted_row, fresh_row in zip(rows, fresh_rows, strict=False)
        for q, f in zip(quoted_row, fresh_row, strict=True)
    )  # fmt: skip
    fresh_table = "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *fresh_rows])
    assert not stale, (
        f"docs/guides/examples.md quotes a table for `python examples/{script} --quick` that this run no longer "
        f"gives (columns missing from the run: {missing}). Rerun the command and paste its table:\n{fresh_table}"
    )


def test_quoted_table_is_found_for_the_examples_with_quick_tables():
    """Guards the table check against passing because the guide's layout changed and nothing is compared."""
    found = {script for script in CASES if quoted_table(script) is not None}
    assert {"multi_device_training.py", "bn_paper_mnist.py", "gn_batch_size.py", "flax_dropin.py"} <= found


def test_cells_match_within_rounding_but_not_beyond():
    assert _cells_match("0.922", "0.9239") and _cells_match("2.4e-07", "3.1e-07") and _cells_match("never", "never")
    assert not _cells_match("0.922", "0.915") and not _cells_match("700", "600") and not _cells_match("never", "900")
