"""Shared fixtures: write workflows to temporary files and run them on real workers."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

# Worker processes import tests/flowlib.py as `flowlib`.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture
def write_flow(tmp_path):
    """Write YAML text (dedented) to a file and return its path."""

    def write(text: str, name: str = "flow.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    return write


@pytest.fixture(autouse=True)
def private_goflow_home(tmp_path, monkeypatch):
    """Every test gets its own GOFLOW_HOME: history and the server registry never touch ~."""
    home = tmp_path / "goflow-home"
    monkeypatch.setenv("GOFLOW_HOME", str(home))
    return home


def pick_free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held together while chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture
def free_ports():
    return pick_free_ports
