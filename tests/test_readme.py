"""The README's Python API example runs as written (from the repository root)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(180)


def test_readme_python_api_example_runs():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Python API: watch your own run", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=170)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"execution [0-9a-f]{32}", lines[0])
    assert lines[1].startswith("completed [")
