"""The README's Python examples run as written.

Every ```python block of README.md runs, in order, in one shared namespace (a
later block may use an earlier block's ``model``), in a temporary working
folder, on the embedded model. A block that cannot run here carries a line
``# readme-test: skip (reason)``; it is reported as skipped with that reason,
and the blocks after it still run."""
from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARK = re.compile(r"^\s*#\s*readme-test:\s*skip\b\s*(?:\((?P<reason>.*)\))?", re.MULTILINE)
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """[(line number of the fence, code, skip reason or None)] of every ```python block."""
    blocks = []
    for match in FENCE.finditer(text):
        indent = match.group("indent")
        code = "".join(line[len(indent):] if line.startswith(indent) else line
                       for line in match.group("body").splitlines(keepends=True))
        skip = SKIP_MARK.search(code)
        reason = (skip.group("reason") or "marked skip") if skip else None
        blocks.append((text.count("\n", 0, match.start()) + 1, code, reason))
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_extractor_finds_blocks_and_skip_marks():
    text = ("intro\n```python\nx = 1\n```\n\n```bash\nls\n```\n  ```python\n  y = x + 1\n  ```\n"
            "```python\n# readme-test: skip (needs a CUDA device)\nz = 1\n```\n```python\n#readme-test: skip\n```\n")
    blocks = python_blocks(text)
    assert [(line, code) for line, code, _ in blocks[:2]] == [(2, "x = 1\n"), (9, "y = x + 1\n")]
    assert [reason for _, _, reason in blocks] == [None, None, "needs a CUDA device", "marked skip"]


def test_the_readme_has_python_examples_that_compile():
    assert len(BLOCKS) >= 3
    for line, code, _ in BLOCKS:
        compile(code, f"README.md:{line}", "exec")


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    """One namespace for all blocks, run with a temporary folder as working directory."""
    import os

    folder, old = tmp_path_factory.mktemp("readme"), os.getcwd()
    os.chdir(folder)
    yield {"__name__": "__readme__"}
    os.chdir(old)


@pytest.mark.slow
@pytest.mark.parametrize("line, code, skip", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs(line, code, skip, namespace):
    if skip:
        pytest.skip(f"README.md:{line}: {skip}")
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
