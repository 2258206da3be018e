"""The documentation: the site builds with warnings as errors, covers every public symbol, and its code runs.

Code blocks in ``README.md`` and ``docs/**/*.md`` are checked by running them: a fenced ``python`` block
containing ``>>>`` prompts is a doctest; any other fenced ``python`` block is executed as a script. The blocks of
one page share a namespace, in order, like a reader's session. Two MyST comment lines placed right before a
fence change that:

- ``% notest`` — do not run the block (e.g. code that needs several hosts); say why in the page's text.
- ``% requires: some.module`` — run the block only when ``some.module`` can be imported.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

import normjax

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_PAGES = DOCS / "api"
BUILD_TIMEOUT_S = 300
FENCE = re.compile(r"^(?P<fence>```+|~~~+)(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S)
DIRECTIVE = re.compile(r"^%\s*(notest|requires:\s*(?P<module>[\w.]+))\s*$")


def public_modules() -> dict[str, object]:
    """``normjax`` and each public subpackage/module of it (no ``_`` in its name) that can be imported."""
    modules = {"normjax": normjax}
    for info in pkgutil.walk_packages(normjax.__path__, prefix="normjax."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        try:
            modules[info.name] = importlib.import_module(info.name)
        except ImportError:  # a subpackage still being written; the docs leave its page out too
            continue
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


def test_docs_build_with_warnings_as_errors_and_document_every_public_symbol(built_docs):
    assert (built_docs / "index.html").is_file()
    documented = read_inventory(built_docs / "objects.inv")
    missing = [name for name in public_symbols() if name not in documented]
    assert not missing, (
        f"public symbols missing from the API reference: {missing}. Add each to the page of its module in "
        "docs/api/ (an autosummary entry and an autofunction/autoclass directive, as in docs/api/norms.md)."
    )


def test_public_symbols_have_docstrings():
    undocumented = []
    for name in public_symbols():
        module, _, symbol = name.rpartition(".")
        if not (getattr(importlib.import_module(module), symbol).__doc__ or "").strip():
            undocumented.append(name)
    assert not undocumented, f"public symbols without a docstring: {undocumented}"


def test_inventory_reader_and_symbol_discovery_see_the_core():
    symbols = public_symbols()
    assert "normjax.batch_norm" in symbols and "normjax.moments" in symbols
    assert len(symbols) >= len(normjax.__all__)


@dataclass(frozen=True)
class CodeBlock:
    line: int
    code: str
    skip_reason: str | None


def code_blocks(page: Path) -> list[CodeBlock]:
    """The fenced ``python`` blocks of a MyST page, with whether (and why not) to run each."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match["info"].strip().split(" ")[0] not in ("python", "pycon"):
            continue
        line = text.count("\n", 0, match.start()) + 1
        previous = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        directive = DIRECTIVE.match(previous.strip())
        skip_reason = None
        if directive and directive[1] == "notest":
            skip_reason = "marked % notest"
        elif directive and directive["module"] and not _importable(directive["module"]):
            skip_reason = f"needs {directive['module']}, which cannot be imported"
        blocks.append(CodeBlock(line, match["body"], skip_reason))
    return blocks


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


PAGES = [ROOT / "README.md"] + sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
PAGES = [p for p in PAGES if code_blocks(p)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_code_in_docs_runs(page):
    namespace: dict[str, object] = {"__name__": f"docs.{page.stem}"}
    not_run = []
    for block in code_blocks(page):
        where = f"{page.relative_to(ROOT)}:{block.line}"
        if block.skip_reason:
            not_run.append(f"{where} ({block.skip_reason})")
            continue
        if ">>>" in block.code:
            _run_doctest(block.code, namespace, where)
        else:
            exec(compile(block.code, where, "exec"), namespace)  # noqa: S102 (running the docs is the test)
    if not_run:
        pytest.skip(f"the other blocks ran; not run here: {not_run}")


def _run_doctest(code: str, namespace: dict, where: str) -> None:
    test = doctest.DocTestParser().get_doctest(code, namespace, where, where, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    result = runner.run(test, out=report.append, clear_globs=False)
    assert result.failed == 0, "".join(report)
    namespace.update(test.globs)  # DocTest runs in a copy; later blocks see what this one defined
