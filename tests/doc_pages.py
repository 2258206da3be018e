"""Runs the Python code of a Markdown page the way a reader does: every block, in order, in one fresh process.

    python tests/doc_pages.py docs/guides/sync.md

A fenced ``python`` (or ``pycon``) block containing ``>>>`` prompts is run as a doctest, its printed output
compared with the page's; any other ``python`` block is executed as a script. The blocks of a page share one
namespace, like a reader pasting them into one session. Nothing is set up beforehand: no simulated devices, no
imports, no environment. A page whose code needs several devices asks for them in its own first block, before
it imports JAX, as a reader's first paste must.

``% notest`` on the line right before a fence leaves that block out (code that needs several hosts, say); the
page's text says why.

This module imports only the standard library, so that running a page starts from a bare interpreter.
"""

from __future__ import annotations

import doctest
import re
import sys
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^(?P<fence>```+|~~~+)(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S)
NOTEST = re.compile(r"^%\s*notest\s*$")


@dataclass(frozen=True)
class CodeBlock:
    line: int
    code: str
    run: bool


def code_blocks(page: Path) -> list[CodeBlock]:
    """The fenced ``python`` blocks of a Markdown page, each with whether to run it (not after ``% notest``)."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match["info"].strip().split(" ")[0] not in ("python", "pycon"):
            continue
        line = text.count("\n", 0, match.start()) + 1
        previous = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        blocks.append(CodeBlock(line, match["body"], run=not NOTEST.match(previous.strip())))
    return blocks


def run_page(page: Path) -> None:
    """Runs the page's blocks in order in one namespace; raises at the first block that fails."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    for block in code_blocks(page):
        if not block.run:
            continue
        where = f"{page}:{block.line}"
        if ">>>" in block.code:
            _run_doctest(block.code, namespace, where)
        else:
            # dont_inherit: as pasted, not under this file's `from __future__ import annotations` (Flax fields).
            exec(compile(block.code, where, "exec", dont_inherit=True), namespace)  # noqa: S102


def _run_doctest(code: str, namespace: dict, where: str) -> None:
    test = doctest.DocTestParser().get_doctest(code, namespace, where, where, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    result = runner.run(test, out=report.append, clear_globs=False)
    if result.failed:
        raise AssertionError(f"{where}: a doctest failed\n" + "".join(report))
    namespace.update(test.globs)  # DocTest runs in a copy; later blocks see what this one defined


if __name__ == "__main__":
    # A reader's interactive session in the current directory imports from there (a checkout's normjax), not
    # from this script's directory.
    sys.path[0] = ""
    for argument in sys.argv[1:]:
        run_page(Path(argument))
