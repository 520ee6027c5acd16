"""Load a workflow file into a :class:`~goflow.language.model.Workflow`, collecting every problem.

Loading never stops at the first problem: each variable, server, node and edge is checked
on its own, so one bad node does not hide the next. Semantic checks (graph, references,
expressions) live in :mod:`goflow.language.validation`; :func:`load` runs both.
"""

from __future__ import annotations

import codecs
import difflib
import functools
import gc
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any, Iterator

from pydantic import BaseModel, ValidationError

from goflow.errors import WorkflowError
from goflow.language.model import (
    NODE_TYPES,
    Edge,
    Metadata,
    RetryPolicy,
    Server,
    SharedFieldsSet,
    Variable,
    WorkerSelector,
    Workflow,
    allowed_keys,
)
from goflow.language.problems import Problem
from goflow.language.limits import MAX_BYTES, MAX_NODES
from goflow.language.validation import validate_loaded
from goflow.language.yaml_source import Path, SourceMap, YamlLimitError, YamlSyntaxError, load_yaml, text_position

_SECTIONS: dict[str, type[BaseModel]] = {"variables": Variable, "servers": Server, "edges": Edge}
_NESTED: dict[str, type[BaseModel]] = {"retry": RetryPolicy, "worker": WorkerSelector}


@dataclass
class LoadedWorkflow:
    """A parsed workflow with what is needed to point at its source lines."""

    workflow: Workflow
    file: str
    text: str
    source: SourceMap
    node_paths: dict[str, Path] = field(default_factory=dict)
    edge_paths: list[Path] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    parsed: bool = False
    """True once the text proved to be a YAML mapping; semantic checks need that."""
    broken_node_ids: set[str] = field(default_factory=set)
    """Ids of nodes that failed to parse: later checks must not report them as missing."""
    duplicate_ids: list[tuple[str, Path]] = field(default_factory=list)
    """``(id, path)`` of each node entry whose id an earlier entry has, whether either one
    parsed or not: a duplicate is reported even when a copy has problems of its own (the
    semantic checks see only the nodes that parsed)."""

    def problem(self, path: Path, message: str, *, severity: str = "error", node: str | None = None,
                key: bool = False) -> Problem:
        line, column = self.source.locate(path, key=key)
        found = Problem(self.file, line, column, severity, message, node)  # type: ignore[arg-type]
        self.problems.append(found)
        return found

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


@functools.cache
def _nested_fields(model: type[BaseModel]) -> tuple[tuple[str, type[BaseModel]], ...]:
    """The fields of ``model`` that hold a nested model whose keys are checked too."""
    return tuple((key, nested) for key, nested in _NESTED.items() if key in model.model_fields)


def _suggest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"


def _where(path: Path, raw: Any) -> str:
    """'in node 'x'' style context for messages."""
    if len(path) >= 2 and path[0] == "nodes" and isinstance(raw, dict) and isinstance(raw.get("id"), str):
        return f" in node '{raw['id']}'"
    if len(path) >= 2 and path[0] in ("variables", "servers") and isinstance(raw, dict):
        name = raw.get("name") if path[0] == "variables" else raw.get("id")
        if isinstance(name, str):
            return f" in {path[0][:-1]} '{name}'"
    if len(path) >= 2:
        return f" in {path[0]}[{path[1]}]"
    if len(path) == 1:
        return f" in '{path[0]}'"
    return " at the top level"


@functools.cache
def _plain_keys(model: type[BaseModel]) -> frozenset[str]:
    """Keys with which ``data`` needs no key check before ``model`` validates it: ``model``'s own,
    less those holding a nested model whose keys are checked too (none for a free-form model)."""
    if _free_form(model):
        return frozenset()
    return allowed_keys(model).difference(key for key, _ in _nested_fields(model))


@functools.cache
def _free_form(model: type[BaseModel]) -> bool:
    """A model that takes any key (``metadata:``): only its documented keys are typed."""
    return model.model_config.get("extra") == "allow"


class _Loader:
    def __init__(self, loaded: LoadedWorkflow):
        self.loaded = loaded
        self.fields_sets: dict[frozenset[str], SharedFieldsSet] = {}

    def share_fields_set(self, model: BaseModel) -> None:
        """Give ``model`` the shared fields-set equal to its own (memory: see SharedFieldsSet)."""
        own = model.__pydantic_fields_set__
        key = frozenset(own)
        shared = self.fields_sets.get(key)
        if shared is None:
            shared = self.fields_sets[key] = SharedFieldsSet(own)
        object.__setattr__(model, "__pydantic_fields_set__", shared)

    def check_keys(self, data: dict, model: type[BaseModel], path: Path, owner: Any, node_id: str | None) -> None:
        if _free_form(model):
            return
        known = allowed_keys(model)
        for key in data:
            if key not in known:
                self.loaded.problem(path + (key,), f"unknown key '{key}'{_where(path, owner)}{_suggest(str(key), known)}",
                                    node=node_id, key=True)

    def validate_model(self, model: type[BaseModel], data: Any, path: Path, node_id: str | None) -> Any:
        """``model.model_validate(data)``, or None after reporting each error at its own line."""
        if type(data) is dict and _plain_keys(model).issuperset(data):  # the common case: one call
            try:
                validated = model.__pydantic_validator__.validate_python(data)
            except ValidationError:
                pass  # validated again below, to report each error
            else:
                self.share_fields_set(validated)
                return validated
        if not isinstance(data, dict):
            self.loaded.problem(path, f"expected a mapping{_where(path, data)}, got {type(data).__name__}", node=node_id)
            return None
        known = allowed_keys(model)
        clean = data
        if not _free_form(model) and not known.issuperset(data):  # rare: drop the unknown keys
            self.check_keys(data, model, path, data, node_id)
            clean = {k: v for k, v in data.items() if k in known}
        for key, nested in _nested_fields(model):
            value = clean.get(key)
            if isinstance(value, dict) and not allowed_keys(nested).issuperset(value):
                self.check_keys(value, nested, path + (key,), data, node_id)
                clean = dict(clean)
                clean[key] = {k: v for k, v in value.items() if k in allowed_keys(nested)}
        try:
            validated = model.model_validate(clean)
        except ValidationError as exc:
            for error in exc.errors():
                location = tuple(error["loc"])
                field_name = ".".join(str(part) for part in location) or "value"
                message = error["msg"]
                if error["type"] == "missing":
                    message = f"missing required key '{field_name}'{_where(path, data)}"
                elif error["type"] == "literal_error":
                    message = f"invalid value for '{field_name}'{_where(path, data)}: {message}"
                else:
                    message = f"invalid '{field_name}'{_where(path, data)}: {message}"
                if isinstance(error.get("ctx"), dict) and isinstance(error["ctx"].get("error"), ValueError):
                    message = f"invalid '{field_name}'{_where(path, data)}: {error['ctx']['error']}"
                self.loaded.problem(path + location, message, node=node_id)
            return None
        self.share_fields_set(validated)
        return validated

    def node(self, raw: Any, path: Path) -> Any:
        """The node at ``path`` (``("nodes", index)``), or None after reporting why not."""
        index = path[1]
        if not isinstance(raw, dict):
            self.loaded.problem(path, f"nodes[{index}] must be a mapping with 'id' and 'type'")
            return None
        node_id = raw.get("id") if isinstance(raw.get("id"), str) else None
        node_type = raw.get("type")
        if node_type is None:
            self.loaded.problem(path, f"node {node_id or f'nodes[{index}]'!r} has no 'type'; "
                                      f"use one of: {', '.join(NODE_TYPES)}", node=node_id)
            return None
        model = NODE_TYPES.get(str(node_type))
        if model is None:
            self.loaded.problem(path + ("type",), f"unknown node type '{node_type}' in node '{node_id}'"
                                f"{_suggest(str(node_type), set(NODE_TYPES)).replace('known keys', 'known types')}",
                                node=node_id)
            return None
        node = self.validate_model(model, raw, path, node_id)
        if node is None and node_id:
            self.loaded.broken_node_ids.add(node_id)
        return node

    def run(self, data: Any) -> Workflow | None:
        loaded = self.loaded
        if data is None:
            loaded.problem((), "the file is empty; a workflow needs at least 'name', 'nodes' and 'edges'")
            return None
        if not isinstance(data, dict):
            loaded.problem((), f"a workflow must be a YAML mapping with 'name', 'nodes' and 'edges', "
                               f"not a {type(data).__name__}")
            return None
        loaded.parsed = True
        for path, _ in loaded.source.duplicate_keys:
            loaded.problem(path, f"duplicate key '{path[-1]}'; the later value would silently win", key=True)
        self.check_keys(data, Workflow, (), data, None)

        parts: dict[str, Any] = {}
        for key in ("version", "name", "description"):
            if key in data:
                parts[key] = data[key]
        if "metadata" in data:
            metadata = self.validate_model(Metadata, data["metadata"], ("metadata",), None)
            if metadata is not None:
                parts["metadata"] = metadata
        for section, model in _SECTIONS.items():
            raw_items = data.get(section) or []
            if not isinstance(raw_items, list):
                loaded.problem((section,), f"'{section}' must be a list")
                raw_items = []
            items = []
            for index, raw in enumerate(raw_items):
                path = (section, index)
                item = self.validate_model(model, raw, path, None)
                if item is not None:
                    items.append(item)
                    if section == "edges":
                        loaded.edge_paths.append(path)
            parts[section] = items
        raw_nodes = data.get("nodes") or []
        if not isinstance(raw_nodes, list):
            loaded.problem(("nodes",), "'nodes' must be a list")
            raw_nodes = []
        nodes = []
        ids: set[str] = set()
        for index, raw in enumerate(raw_nodes):
            path = ("nodes", index)
            node = self.node(raw, path)
            raw_id = raw.get("id") if isinstance(raw, dict) else None
            if isinstance(raw_id, str):
                if raw_id in ids:
                    loaded.duplicate_ids.append((raw_id, path))
                ids.add(raw_id)
                if node is None:
                    loaded.broken_node_ids.add(raw_id)
            if node is not None:
                nodes.append(node)
                loaded.node_paths.setdefault(node.id, path)
        parts["nodes"] = nodes
        if "name" not in parts:
            loaded.problem((), "missing required key 'name' at the top level")
            parts["name"] = "unnamed"
        try:
            return Workflow.model_validate({k: v for k, v in parts.items()})
        except ValidationError as exc:
            for error in exc.errors():
                location = tuple(error["loc"])
                if location and location[0] in ("nodes", "variables", "servers", "edges", "metadata"):
                    continue  # already validated item by item
                loaded.problem(location, f"invalid '{'.'.join(map(str, location))}': {error['msg']}")
            safe = {k: v for k, v in parts.items() if k in ("nodes", "variables", "servers", "edges", "metadata")}
            return Workflow.model_construct(name=str(parts.get("name")), version="1.0", description=None, **safe)


def parse(text: str, file: str = "<workflow>") -> LoadedWorkflow:
    """Parse workflow text without semantic validation. Problems are collected, not raised."""
    loaded = LoadedWorkflow(workflow=Workflow.model_construct(name="unnamed"), file=file, text=text, source=SourceMap())
    size = len(text) if len(text) * 4 <= MAX_BYTES else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        loaded.problems.append(_too_big(file, size))
        return loaded
    with gc_paused():
        try:
            data, loaded.source = load_yaml(text)
        except YamlLimitError as exc:
            loaded.problems.append(Problem(file, exc.line, exc.column, "error", exc.message))
            return loaded
        except YamlSyntaxError as exc:
            loaded.problems.append(Problem(file, exc.line, exc.column, "error", f"not valid YAML: {exc.message}"))
            return loaded
        raw_nodes = data.get("nodes") if isinstance(data, dict) else None
        if isinstance(raw_nodes, list) and len(raw_nodes) > MAX_NODES:
            line, column = loaded.source.locate(("nodes",), key=True)
            loaded.problems.append(Problem(file, line, column, "error",
                                           f"the workflow has {len(raw_nodes):,} nodes; the limit is {MAX_NODES:,} "
                                           f"nodes per workflow (split it, or use a loop over a collection)"))
            return loaded
        workflow = _Loader(loaded).run(data)
        del data, raw_nodes  # freed before the collector resumes, which would walk them once more
    if workflow is not None:
        loaded.workflow = workflow
    return loaded


def _too_big(file: str, size: int | None) -> Problem:
    """``size``: the file's, or None for a stream (a pipe) that went past the limit."""
    said = "more than the limit" if size is None else f"{size / 2**20:.1f} MiB"
    return Problem(file, 1, 1, "error", f"the file is {said}; the limit is "
                                        f"{MAX_BYTES / 2**20:g} MiB per workflow file")


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while loading (re-entrant, thread-safe).

    Loading allocates millions of small acyclic objects; each collection would walk all the
    ones still alive, which made loading a 100k-node file about 3x slower (a cost that grows
    with the workflow). Reference counting still frees memory as usual meanwhile.

    On resuming, what survived goes straight to the oldest generation (``gc.freeze`` then
    ``gc.unfreeze``, both O(1)) instead of being walked by the next young and middle
    collections (0.15 s each at 100k nodes): a full collection still sees it, so cyclic garbage
    made meanwhile is collected by the next one. When something else froze the collector
    (the coordinator, while executions run), the survivors stay where they are: frozen, any
    garbage among them would wait until the process is next idle, for a busy daemon never.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                if not gc.get_freeze_count():
                    gc.freeze()
                    gc.unfreeze()
                gc.enable()


def read(path: str | FsPath) -> LoadedWorkflow:
    """Parse the workflow file at ``path`` (see :func:`parse`)."""
    file = str(path)
    try:
        size = FsPath(path).stat().st_size
        if size > MAX_BYTES:  # refused before reading it
            loaded = parse("", file)
            loaded.problems[:] = [_too_big(file, size)]
            return loaded
        with open(path, "rb") as handle:   # a pipe has no size: read at most one byte past the limit
            data = handle.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            loaded = parse("", file)
            loaded.problems[:] = [_too_big(file, None)]
            return loaded
    except FileNotFoundError:
        loaded = parse("", file)
        loaded.problems[:] = [Problem(file, 1, 1, "error", "no such file")]
        return loaded
    except OSError as exc:
        loaded = parse("", file)
        loaded.problems[:] = [Problem(file, 1, 1, "error", f"cannot read the file: {exc}")]
        return loaded
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        loaded = parse("", file)
        loaded.problems[:] = [_not_utf8(file, data, exc)]
        return loaded
    if "\r" in text:   # universal newlines, as reading in text mode does
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return parse(text, file)


_BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                     (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))
"""(UTF-32 first: its little-endian mark starts with UTF-16's.)"""


def _not_utf8(file: str, data: bytes, exc: UnicodeDecodeError) -> Problem:
    """The problem of a file that is not UTF-8, at the first byte that is not, with the fix.

    A UTF-16/UTF-32 file is named as such (by its byte order mark); else the bad byte is
    shown with what it is in Windows-1252/Latin-1, the usual other encoding of a text file."""
    for mark, encoding in _BYTE_ORDER_MARKS:
        if data.startswith(mark):
            return Problem(file, 1, 1, "error", f"the file is {encoding} text (it starts with a {encoding} byte "
                                                f"order mark); workflow files are UTF-8: save the file as UTF-8")
    line, column = text_position(data[:exc.start].decode("utf-8"))   # (valid up to there)
    byte = data[exc.start]
    try:
        guess = f" ('{bytes([byte]).decode('cp1252')}' in Windows-1252/Latin-1)"
        how = " (e.g. iconv -f WINDOWS-1252 -t UTF-8)"
    except UnicodeDecodeError:
        guess = how = ""
    return Problem(file, line, column, "error", f"the file is not UTF-8: byte 0x{byte:02x}{guess} is not valid "
                                                f"UTF-8 here; save the file as UTF-8{how}")


def check(loaded: LoadedWorkflow) -> LoadedWorkflow:
    """Run semantic validation on ``loaded`` (when it is a mapping at all) and return it."""
    if loaded.parsed:
        with gc_paused():
            validate_loaded(loaded)
    return loaded


def load(source: str | FsPath, *, text: str | None = None) -> Workflow:
    """Load and validate a workflow file (or ``text`` with ``source`` as its name).

    Raises :class:`~goflow.errors.WorkflowError` listing every problem found.
    """
    loaded = check(parse(text, str(source)) if text is not None else read(source))
    if loaded.errors:
        raise WorkflowError(loaded.problems)
    return loaded.workflow


def validate_file(path: str) -> list:
    """Every problem (errors and warnings) in the workflow file at ``path``."""
    return check(read(path)).problems
