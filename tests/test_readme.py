"""Every ```python block of the README runs as written: each in a fresh interpreter (its own
namespace), on the cpu runtime, from the repo root. A block whose first line is ``# needs: WHAT``
(a GPU, the model) is skipped with that reason. The README's test command is the one .ci/run runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks(text: str) -> list:
    """(id, code) of every ```python fenced block; the id is the section heading above it and the
    block's number within that section."""
    blocks, heading, count = [], "top", {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!") and i and lines[i - 1].strip() == "":
            heading = re.sub(r"[^a-z0-9]+", "-", line.lstrip("#").strip().lower()).strip("-")[:40]
        if line.strip() == "```python":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            count[heading] = count.get(heading, 0) + 1
            blocks.append((f"{heading}-{count[heading]}", "\n".join(lines[i + 1:j]) + "\n"))
            i = j
        i += 1
    return blocks


BLOCKS = python_blocks(README)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 5, [b for b, _ in BLOCKS]


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[b for b, _ in BLOCKS])
def test_readme_python_block_runs(code):
    first = code.lstrip().splitlines()[0]
    if first.startswith("# needs:"):
        pytest.skip(f"README block {first[2:]}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PAGED_NUMBA_RUNTIME"] = "cpu"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"README block failed:\n{code}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python -m pytest -q -rs -n 2 tests"
    assert re.search(rf"^{re.escape(command)}\s", README, re.M), "README: the test command"
    assert ci.rstrip().splitlines()[-1].strip() == command, ".ci/run: the last line is the README's command"


def test_readme_stands_alone():
    assert "SPEC.md" not in README
