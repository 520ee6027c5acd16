"""The layout is the architecture: dependencies point down and no module imports itself back.

The same check from a shell: ``python -m pytest tests/test_architecture.py`` (it uses grimp,
the import-graph library behind import-linter). Imports under ``TYPE_CHECKING`` are type
hints, not dependencies, and are left out.
"""

from __future__ import annotations

import grimp
import pytest

LAYERS = [
    "goflow.cli",
    "goflow.coordinator",
    "goflow.history",
    "goflow.observability",
    "goflow.events",
    "goflow.control",
    "goflow.language",
]
"""Higher layers may import lower ones, never the reverse. Workers sit beside the coordinator."""


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("goflow", exclude_type_checking_imports=True)


def test_no_import_cycles(graph):
    cycles = sorted({tuple(sorted((module, imported)))
                     for module in graph.modules
                     for imported in graph.find_modules_directly_imported_by(module)
                     if graph.chain_exists(importer=imported, imported=module)})
    assert cycles == []


@pytest.mark.parametrize("lower_index", range(1, len(LAYERS)))
def test_dependencies_point_down(graph, lower_index):
    lower = LAYERS[lower_index]
    upward = [(lower, higher, graph.find_shortest_chain(importer=lower, imported=higher))
              for higher in LAYERS[:lower_index]
              if graph.chain_exists(importer=lower, imported=higher, as_packages=True)]
    assert upward == []


def test_workers_never_import_the_coordinator(graph):
    assert not graph.chain_exists(importer="goflow.workers", imported="goflow.coordinator", as_packages=True)
    assert not graph.chain_exists(importer="goflow.coordinator", imported="goflow.workers", as_packages=True)
