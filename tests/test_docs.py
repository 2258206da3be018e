"""The documentation: the site builds with warnings as errors, covers every public symbol, and its code runs.

Code blocks in ``README.md`` and ``docs/**/*.md`` are checked by running them as a reader would: each page in a
fresh Python process without this suite's simulated devices, its blocks pasted in order (``tests/doc_pages.py``
says how blocks are run and how to leave one out).
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from doc_pages import FENCE, code_blocks

import normjax
import normjax.linen
import normjax.nnx

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BUILD_TIMEOUT_S = 300
PAGE_TIMEOUT_S = 300
MAX_CODE_LINE = 84


def public_modules() -> dict[str, object]:
    """``normjax`` and each public subpackage or module of it (no ``_`` in its dotted name)."""
    modules = {"normjax": normjax}
    for info in pkgutil.walk_packages(normjax.__path__, prefix="normjax."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            modules[info.name] = importlib.import_module(info.name)
    return modules


def public_symbols() -> list[str]:
    """Fully qualified names of every symbol in the ``__all__`` of a public module."""
    return sorted(f"{name}.{symbol}" for name, module in public_modules().items() for symbol in module.__all__)


def read_inventory(path: Path) -> set[str]:
    """The object names in a Sphinx ``objects.inv`` (version 2: four header lines, then zlib-compressed text)."""
    data = path.read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = data.index(b"\n", header_end) + 1
    lines = zlib.decompress(data[header_end:]).decode().splitlines()
    return {line.split(" ", 1)[0] for line in lines if line.strip()}


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-d", str(out / "doctrees"), str(DOCS), str(out / "html")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, cwd=ROOT)
    assert result.returncode == 0, f"sphinx failed:\n{result.stdout}\n{result.stderr}"
    return out / "html"


@pytest.mark.slow  # a Sphinx build
def test_docs_build_with_warnings_as_errors_and_document_every_public_symbol(built_docs):
    assert (built_docs / "index.html").is_file()
    documented = read_inventory(built_docs / "objects.inv")
    missing = [name for name in public_symbols() if name not in documented]
    assert not missing, (
        f"public symbols missing from the API reference: {missing}. Add each to the page of its module in "
        "docs/api/ (an autosummary entry and an autofunction/autoclass directive, as in docs/api/norms.md)."
    )


def test_public_functions_and_classes_have_docstrings():
    undocumented = []
    for name in public_symbols():
        module, _, symbol = name.rpartition(".")
        obj = getattr(importlib.import_module(module), symbol)
        # Constants carry their type's docstring; their description lives on the API page instead.
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and not (obj.__doc__ or "").strip():
            undocumented.append(name)
    assert not undocumented, f"public functions and classes without a docstring: {undocumented}"


def test_symbol_discovery_sees_the_core_and_the_flax_layers():
    symbols = public_symbols()  # guards the coverage check against passing vacuously
    assert {"normjax.batch_norm", "normjax.linen.BatchNorm", "normjax.nnx.BatchNorm"} <= set(symbols)
    assert len(symbols) >= len(normjax.__all__) + len(normjax.linen.__all__) + len(normjax.nnx.__all__)


PAGES = [ROOT / "README.md"] + sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
PAGES = [p for p in PAGES if code_blocks(p)]


@pytest.mark.slow  # a fresh Python process per page
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_code_in_docs_runs_as_pasted_in_a_fresh_process(page):
    assert any(block.run for block in code_blocks(page)), f"{page} has python blocks but all are marked % notest"
    # A reader's fresh process: none of this suite's simulated devices; a page that needs them says so itself.
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    relative = str(page.relative_to(ROOT))
    command = [sys.executable, str(Path(__file__).with_name("doc_pages.py")), relative]
    result = subprocess.run(command, capture_output=True, text=True, timeout=PAGE_TIMEOUT_S, cwd=ROOT, env=env)
    assert result.returncode == 0, f"{relative} fails when its blocks are pasted in order:\n{result.stderr[-6000:]}"


def test_code_lines_fit_the_sites_width():
    """The docs theme shows about 85 characters of code without scrolling; longer input lines overflow. (Output
    lines of doctests and ``text`` blocks, e.g. error messages, are wrapped by the site's stylesheet.)"""
    too_long = []
    for page in sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts):
        text = page.read_text()
        for match in FENCE.finditer(text):
            if match["info"].strip().split(" ")[0] not in ("python", "pycon", "bash"):
                continue
            first_line = text.count("\n", 0, match.start()) + 2
            doctest = ">>>" in match["body"]
            for offset, line in enumerate(match["body"].splitlines()):
                is_input = not doctest or line.lstrip().startswith((">>>", "..."))
                if is_input and len(line) > MAX_CODE_LINE:
                    too_long.append(f"{page.relative_to(ROOT)}:{first_line + offset} ({len(line)} characters)")
    assert not too_long, f"code lines over {MAX_CODE_LINE} characters overflow on the site: {too_long}"


def test_readme_links_point_to_existing_files():
    readme = (ROOT / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)", readme) if "://" not in t]
    assert targets, "README.md should link to the docs"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
