"""The documentation: the site builds with warnings as errors, covers every public symbol, and its code runs.

Code blocks in ``README.md`` and ``docs/**/*.md`` are checked by running them: a fenced ``python`` block
containing ``>>>`` prompts is a doctest; any other fenced ``python`` block is executed as a script. The blocks of
one page share a namespace, in order, like a reader's session.

``% notest`` on the line right before a fence leaves that block out (e.g. code that needs several hosts); say
why in the page's text.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

import normjax
import normjax.linen
import normjax.nnx

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BUILD_TIMEOUT_S = 300
FENCE = re.compile(r"^(?P<fence>```+|~~~+)(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S)
NOTEST = re.compile(r"^%\s*notest\s*$")


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


@dataclass(frozen=True)
class CodeBlock:
    line: int
    code: str
    run: bool


def code_blocks(page: Path) -> list[CodeBlock]:
    """The fenced ``python`` blocks of a MyST page, each with whether to run it (not after ``% notest``)."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match["info"].strip().split(" ")[0] not in ("python", "pycon"):
            continue
        line = text.count("\n", 0, match.start()) + 1
        previous = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        blocks.append(CodeBlock(line, match["body"], run=not NOTEST.match(previous.strip())))
    return blocks


PAGES = [ROOT / "README.md"] + sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
PAGES = [p for p in PAGES if code_blocks(p)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_code_in_docs_runs(page):
    namespace: dict[str, object] = {"__name__": f"docs.{page.stem}"}
    blocks = [block for block in code_blocks(page) if block.run]
    assert blocks, f"{page} has python blocks but all are marked % notest"
    for block in blocks:
        where = f"{page.relative_to(ROOT)}:{block.line}"
        if ">>>" in block.code:
            _run_doctest(block.code, namespace, where)
        else:
            # dont_inherit: run as pasted, not under this file's `from __future__ import annotations` (which
            # would turn a Flax module's field annotations into strings its dataclass cannot resolve).
            exec(compile(block.code, where, "exec", dont_inherit=True), namespace)  # noqa: S102 (the docs are the test)


def _run_doctest(code: str, namespace: dict, where: str) -> None:
    test = doctest.DocTestParser().get_doctest(code, namespace, where, where, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    result = runner.run(test, out=report.append, clear_globs=False)
    assert result.failed == 0, "".join(report)
    namespace.update(test.globs)  # DocTest runs in a copy; later blocks see what this one defined


def test_readme_links_point_to_existing_files():
    readme = (ROOT / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)", readme) if "://" not in t]
    assert targets, "README.md should link to the docs"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
