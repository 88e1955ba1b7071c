"""Docs that run: every ```python block in README.md and docs/*.md is a test case.

Each block is one case, with the id ``<file>:<line>`` (the line of its opening fence). A
block is one of three kinds, decided from its source alone:

- A **program**, when its top level runs something: a statement other than an import, a
  function or class definition, an assignment or a docstring (``asyncio.run(main())``,
  ``print(...)``, a ``for`` or ``with`` statement...). It is saved as ``example.py`` in a
  fresh temporary directory and run there as a script (``sys.executable``, the test
  process's environment with this checkout first on ``PYTHONPATH``, a timeout). It must
  exit 0 and write nothing to stderr.
- A **pytest module**, when it is not a program and defines a top-level class whose name
  starts with ``Test``. It is saved as ``test_example.py`` in a fresh temporary directory
  and run there with ``python -m pytest`` (pytest-asyncio in its default strict mode,
  warnings as errors). Every test it collects must pass, and none may be skipped.
- A **fragment**, anything else (a configuration line, a signature's use). It is not run,
  but it must compile.

**Output.** When the closing fence of a program is followed, after nothing but blank
lines, by a plain ````` fence (no language), that block is the program's expected stdout,
compared exactly, after the normalizations in ``NORMALIZATIONS`` (each one for output
that the doc's prose says varies). A program with no such block is still run.

**Directives**, an HTML comment on the nearest non-blank line above the opening fence:

- ``<!-- not run: REASON -->``: a program that cannot run here (it needs a real cloud
  account, say). It is only compiled. Every program that is not run needs one, so nothing
  is skipped silently; the directive on a block that is not a program is an error.
- ``<!-- run after the previous program, in its directory, with arguments: ARGS -->``: a
  program that reads what the previous program of the same file left behind. The previous
  program is run first in the same directory, then this one with ``ARGS`` (split as by a
  shell) as its command-line arguments.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT_S = 60

FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
NOT_RUN = re.compile(r"^<!-- not run: (\S.*?) -->$")
RUN_AFTER = re.compile(
    r"^<!-- run after the previous program, in its directory, with arguments: (\S.*?) -->$")
# Top-level statements that only define names: a block made of these alone runs nothing.
DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
               ast.Assign, ast.AnnAssign)

JSON_RECORD_SIZE = re.compile(r"^(\S+\.json) (\d+)$")


def _open_ms(shown: str, actual: str, cwd: Path) -> tuple[str, str]:
    # docs/concepts.md, Logging: "`open_ms` varies from run to run" (a wall-clock duration).
    pattern = re.compile(r"\bopen_ms=\d+(?:\.\d+)?\b")
    return pattern.sub("open_ms=<ms>", shown), pattern.sub("open_ms=<ms>", actual)


WRITER_FACTS = re.compile(r"\b(current_)?(host=\S+ )(current_)?(pid=\d+ )(.*?)(current_)?started=\S+")


def _writer_facts(shown: str, actual: str, cwd: Path) -> tuple[str, str]:
    # docs/concepts.md, The writer role and fencing: the writer's host, process id and start
    # "vary with the machine, the process and the time".
    def norm(text: str) -> str:
        return WRITER_FACTS.sub(lambda m: f"{m[1] or ''}host=<host> {m[3] or ''}pid=<pid> "
                                          f"{m[5]}{m[6] or ''}started=<time>", text)

    return norm(shown), norm(actual)


def _json_record_sizes(shown: str, actual: str, cwd: Path) -> tuple[str, str]:
    # docs/format.md, Worked example: "The sizes shown are those with a 10-digit CRC". A
    # commit or epoch record (a `.json` file) holds a random token, so its CRC32, written in
    # decimal, may have fewer digits. Each printed `<path>.json <size>` line of the actual
    # output gets the size its record would have with a 10-digit CRC, read from the record,
    # and an epoch record the size it would have with the host name and process id the doc
    # says (its `host` and `pid` are those of the machine and process that ran the example).
    lines = actual.split("\n")
    for i, line in enumerate(lines):
        m = JSON_RECORD_SIZE.match(line)
        if m is None:
            continue
        [record] = [p for p in cwd.rglob("*.json") if p.as_posix().endswith("/" + m[1])]
        doc = json.loads(record.read_bytes())
        size = int(m[2]) + 10 - len(str(doc["crc32"]))
        if doc["body"]["type"] == "epoch":
            # "its size shown is that with a 6-character host name and a 4-digit process id"
            host = json.dumps(doc["body"]["host"], ensure_ascii=False).encode()
            size += 6 - (len(host) - 2) + 4 - len(str(doc["body"]["pid"]))
        lines[i] = f"{m[1]} {size}"
    return shown, "\n".join(lines)


# Every normalization, by the doc file whose blocks it applies to, so none hides a change
# anywhere else. Each takes (shown, actual, the program's directory) and returns both,
# normalized.
NORMALIZATIONS: dict[str, list[Callable[[str, str, Path], tuple[str, str]]]] = {
    "docs/concepts.md": [_open_ms, _writer_facts],
    "docs/format.md": [_json_record_sizes],
}


@dataclass
class Block:
    file: str          # relative to the repository root
    line: int          # 1-based line of the opening fence
    source: str
    output: str | None  # the plain block right after it, if any
    directive: str | None  # the HTML comment right above it, if any

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def _blocks() -> list[Block]:
    blocks: list[Block] = []
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").split("\n")
        fences: list[tuple[int, str, int, str]] = []  # (start, lang, end, body)
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if m is None:
                i += 1
                continue
            indent, lang = m[1], m[2]
            end = i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            assert end < len(lines), f"{path.name}:{i + 1}: unclosed fence"
            body = "\n".join(line.removeprefix(indent) for line in lines[i + 1:end]) + "\n"
            fences.append((i, lang, end, body))
            i = end + 1
        for n, (start, lang, end, body) in enumerate(fences):
            if lang != "python":
                continue
            output = None
            after = end + 1
            while after < len(lines) and not lines[after].strip():
                after += 1
            if n + 1 < len(fences) and fences[n + 1][0] == after and fences[n + 1][1] == "":
                output = fences[n + 1][3]
            above = start - 1
            while above >= 0 and not lines[above].strip():
                above -= 1
            directive = lines[above].strip() if above >= 0 and lines[above].strip().startswith("<!--") \
                else None
            blocks.append(Block(str(path.relative_to(ROOT)), start + 1, body, output, directive))
    return blocks


BLOCKS = _blocks()


def _is_program(tree: ast.Module) -> bool:
    for i, node in enumerate(tree.body):
        docstring = (i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                     and isinstance(node.value.value, str))
        if not isinstance(node, DEFINITIONS) and not docstring:
            return True
    return False


def _is_pytest_module(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.ClassDef) and node.name.startswith("Test") for node in tree.body)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _run(argv: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"{what} exited {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc


def _run_program(block: Block, cwd: Path, args: list[str]) -> str:
    (cwd / "example.py").write_text(block.source, encoding="utf-8")
    proc = _run([sys.executable, "example.py", *args], cwd, block.id)
    assert proc.stderr == "", f"{block.id} wrote to stderr:\n{proc.stderr}"
    return proc.stdout


def test_the_docs_have_python_blocks() -> None:
    assert len(BLOCKS) >= 20
    assert sum(_is_program(ast.parse(b.source)) for b in BLOCKS) >= 15


def test_normalizations_name_doc_files() -> None:
    assert set(NORMALIZATIONS) <= {b.file for b in BLOCKS}


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block(block: Block, tmp_path: Path) -> None:
    code = compile(block.source, block.id, "exec", flags=ast.PyCF_ONLY_AST, dont_inherit=True)
    assert isinstance(code, ast.Module)
    compile(block.source, block.id, "exec", dont_inherit=True)
    program = _is_program(code)
    directive = block.directive or ""
    not_run = NOT_RUN.match(directive)
    run_after = RUN_AFTER.match(directive)
    if directive and not (not_run or run_after):
        pytest.fail(f"{block.id}: unknown directive above the block: {directive}")
    if not program:
        assert not directive, f"{block.id}: a directive on a block that is no program"
        assert block.output is None, f"{block.id}: output shown after a block that is no program"
        if _is_pytest_module(code):
            (tmp_path / "test_example.py").write_text(block.source, encoding="utf-8")
            proc = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error",
                         "-o", "asyncio_mode=strict", "-o", "asyncio_default_fixture_loop_scope=function",
                         "test_example.py"], tmp_path, block.id)
            summary = proc.stdout.strip().split("\n")[-1]
            assert re.fullmatch(r"[1-9]\d* passed in [\d.]+s(?: \(.*\))?", summary), proc.stdout
        return
    if not_run:
        return  # compiled above; the reason is in the doc, next to the block
    args: list[str] = []
    if run_after:
        earlier = [b for b in BLOCKS if b.file == block.file and b.line < block.line
                   and _is_program(ast.parse(b.source))]
        assert earlier, f"{block.id}: no previous program in {block.file}"
        _run_program(earlier[-1], tmp_path, [])
        args = shlex.split(run_after[1])
    stdout = _run_program(block, tmp_path, args)
    if block.output is not None:
        shown, actual = block.output, stdout
        for normalize in NORMALIZATIONS.get(block.file, []):
            shown, actual = normalize(shown, actual, tmp_path)
        assert actual == shown
