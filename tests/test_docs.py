"""The README and the documentation site: code that runs, links that resolve, a site that builds.

Every fenced block whose info string is ``python`` in ``README.md`` and
``docs/*.md`` is written to a file of its own and run as a script, with
warnings as errors, in a temporary folder. A block that is not meant to run is
marked by an HTML comment on the line just above its fence,
``<!-- no-run: NAME -->``, and NAME must be listed in ``NOT_RUN`` below with
the reason; nothing else is left out.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import pipe_rpc

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("**/*.md"))]

#: Blocks marked ``<!-- no-run: NAME -->``, by NAME, with why each is not run.
NOT_RUN: dict[str, str] = {
    "ray-quickstart": "docs/ray.md: needs Ray, which this suite does not install; the same "
    "code is examples/ray_cluster.py, run by tests_ray/test_ray.py",
}

#: Info strings that mean Python code (the first word of the fence's info string).
PYTHON = {"python", "py", "python3"}

README_MAX_BYTES = 8 * 1024

_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_NO_RUN = re.compile(r"^<!--\s*no-run:\s*(?P<name>[\w-]+)\s*-->$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it starts, its info string, its code, its no-run name."""

    page: str
    line: int
    info: str
    code: str
    no_run: str | None

    @property
    def language(self) -> str:
        return self.info.split(maxsplit=1)[0] if self.info else ""

    @property
    def is_python(self) -> bool:
        return self.language in PYTHON

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks_in(text: str, page: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order."""
    lines = text.splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence = opening["fence"]
        marker = _NO_RUN.match(lines[index - 1].strip()) if index else None
        end = index + 1
        while end < len(lines) and not (
            lines[end].startswith(fence[0] * len(fence)) and not lines[end].strip(fence[0]).strip()
        ):
            end += 1
        if end == len(lines):
            raise ValueError(f"{page}:{index + 1}: code block never closed")
        found.append(
            Block(
                page=page,
                line=index + 1,
                info=opening["info"].strip(),
                code="\n".join(lines[index + 1 : end]) + "\n",
                no_run=marker["name"] if marker else None,
            )
        )
        index = end + 1
    return found


def _all_blocks() -> list[Block]:
    return [
        block
        for page in PAGES
        for block in blocks_in(page.read_text(), str(page.relative_to(ROOT)))
    ]


BLOCKS = _all_blocks()
RUNNABLE = [block for block in BLOCKS if block.is_python and block.no_run is None]


def test_blocks_are_found() -> None:
    """The README's quickstart and the docs' examples are among the blocks run."""
    pages = {block.page for block in RUNNABLE}
    assert "README.md" in pages
    assert "docs/index.md" in pages


def test_extractor_tells_blocks_apart() -> None:
    text = textwrap.dedent(
        """\
        # Title

        ```python
        print("runs")
        ```

        <!-- no-run: sketch -->
        ```python
        undefined_name()
        ```

        ````text
        ```python
        nested, shown as text
        ```
        ````

        ```sh
        echo shell
        ```
        """
    )
    blocks = blocks_in(text, "page.md")
    assert [(b.line, b.language, b.no_run) for b in blocks] == [
        (3, "python", None),
        (8, "python", "sketch"),
        (12, "text", None),
        (18, "sh", None),
    ]
    assert blocks[0].code == 'print("runs")\n'
    assert "nested, shown as text" in blocks[2].code


def test_extractor_refuses_an_unclosed_block() -> None:
    with pytest.raises(ValueError, match="never closed"):
        blocks_in("```python\nprint(1)\n", "page.md")


def test_blocks_not_run_are_the_declared_ones() -> None:
    """Every ``no-run`` marker names an entry of NOT_RUN, and every entry is used once."""
    marked = [block.no_run for block in BLOCKS if block.no_run is not None]
    assert sorted(marked) == sorted(NOT_RUN), (marked, NOT_RUN)
    misplaced = [block.id for block in BLOCKS if block.no_run and not block.is_python]
    assert not misplaced, f"no-run markers on blocks that are not Python: {misplaced}"


def test_python_fences_have_a_plain_info_string() -> None:
    """``python`` alone: renderers drop a block whose info string has more words after it."""
    odd = [
        f"{block.id}: {block.info!r}"
        for block in BLOCKS
        if block.is_python and block.info != block.language
    ]
    assert not odd, odd


def _starts_children_outside_guard(tree: ast.Module) -> list[int]:
    """Lines of module-level code, outside ``if __name__ == "__main__":``, that start a child."""
    lines: list[int] = []
    for statement in tree.body:
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        if isinstance(statement, ast.If) and ast.unparse(statement.test) in {
            "__name__ == '__main__'",
            "'__main__' == __name__",
        }:
            continue
        for node in ast.walk(statement):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func).rsplit(".", 1)[-1]
                if name in {"spawn", "pool", "Process", "Pool"}:
                    lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.id for block in RUNNABLE])
def test_scripts_that_start_children_show_the_main_guard(block: Block) -> None:
    outside = _starts_children_outside_guard(ast.parse(block.code))
    assert not outside, f'{block.id}: starts a child outside `if __name__ == "__main__":`'


def test_main_guard_check_can_fail() -> None:
    unguarded = ast.parse("import pipe_rpc\nserver = pipe_rpc.spawn(dict)\n")
    assert _starts_children_outside_guard(ast.parse("import pipe_rpc\npipe_rpc.pool(dict)\n"))
    guarded = ast.parse("import pipe_rpc\nif __name__ == '__main__':\n    pipe_rpc.spawn(dict)\n")
    assert _starts_children_outside_guard(unguarded) == [2]
    assert _starts_children_outside_guard(guarded) == []


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.id for block in RUNNABLE])
def test_code_block_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block.code)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=tmp_path,
        env=env,
        timeout=60,
        capture_output=True,
        text=True,
        check=False,
    )
    report = (
        f"{block.id}: exit code {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    assert result.returncode == 0, report
    assert not result.stderr, report


def test_readme_is_a_front_door() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}"


def test_readme_keeps_the_two_setup_commands() -> None:
    text = README.read_text()
    venv = "python3 -m venv .venv && "
    for command in [
        venv + ".venv/bin/pip install -q -e . && .venv/bin/python -m pipe_rpc",
        venv + ".venv/bin/pip install -q -e '.[dev]' && .venv/bin/python -m pytest",
    ]:
        assert command in text, command


_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """The ids MkDocs gives a page's headings (its default ``toc`` slugs)."""
    anchors: set[str] = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = re.sub(r"[`*]", "", line.lstrip("#").strip())
            slug = re.sub(r"[^\w\s-]", "", title).strip().lower()
            anchors.add(re.sub(r"[-\s]+", "-", slug))
    return anchors


def test_readme_links_resolve() -> None:
    """Links from the README into the repository point at files (and headings) that exist."""
    prose = README.read_text()
    for block in blocks_in(prose, "README.md"):
        prose = prose.replace(block.code, "")
    prose = re.sub(r"`[^`]*`", "", prose)  # code spans: `f(x)[0](y)` is no link
    targets = [m["target"] for m in _LINK.finditer(prose)]
    assert any(target.startswith("docs/") for target in targets)
    broken = []
    for target in targets:
        if re.match(r"^[a-z]+:", target):
            broken.append(f"{target}: the README links only within the repository")
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else README
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in _anchors(file):
            broken.append(f"{target}: no heading {anchor!r} in {path or 'README.md'}")
    assert not broken, broken


def test_api_reference_covers_all_public_names() -> None:
    documented = re.findall(r"^::: pipe_rpc\.(\w+)$", (DOCS / "api.md").read_text(), re.MULTILINE)
    assert sorted(documented) == sorted(pipe_rpc.__all__)


def test_site_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    """``mkdocs build --strict``: broken links or anchors, pages left out of the nav and
    docstring warnings all fail the build."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        timeout=300,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()
    assert "WARNING" not in result.stderr, result.stderr
