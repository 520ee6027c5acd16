"""YAML loading that remembers where every key and value came from.

The validator reports problems as ``FILE:LINE:COL``; this module turns YAML text into plain
Python data plus a :class:`SourceMap` from *paths* (tuples of keys and list indexes, e.g.
``("nodes", 3, "merge_strategy")``) to 1-based line and column numbers.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]


@dataclass
class SourceMap:
    """Positions of the values (and of the keys) found in one YAML document."""

    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)
    duplicate_keys: list[tuple[Path, tuple[int, int]]] = field(default_factory=list)

    def locate(self, path: Path, *, key: bool = False) -> tuple[int, int]:
        """The position of ``path`` (its key when ``key``), else of its nearest ancestor."""
        table = self.keys if key else self.values
        probe = tuple(path)
        while probe:
            if probe in table:
                return table[probe]
            if probe in self.values:
                return self.values[probe]
            probe = probe[:-1]
        return self.values.get((), (1, 1))


class YamlSyntaxError(Exception):
    """The text is not YAML; ``line``/``column`` are 1-based."""

    def __init__(self, message: str, line: int, column: int):
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column


_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: ~10x faster


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """SafeLoader with YAML 1.2 booleans: only true/false are booleans.

    YAML 1.1 also reads ``on``, ``off``, ``yes`` and ``no`` as booleans, which would turn
    GoFlow's ``retry: {on: [...]}`` key into ``True``.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


_STR_TAG = "tag:yaml.org,2002:str"


def _position(mark: yaml.Mark) -> tuple[int, int]:
    return mark.line + 1, mark.column + 1


def _scalar(value: Any) -> Any:
    # YAML timestamps become ISO text: values must stay JSON/msgpack-friendly.
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.isoformat()
    return value


def _build(loader: _Loader, node: yaml.Node, path: Path, source: SourceMap) -> Any:
    source.values[path] = _position(node.start_mark)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value if key_node.tag == _STR_TAG else _scalar(loader.construct_object(key_node, deep=True))
            if isinstance(key, (list, dict)):
                key = str(key)
            child = path + (key,)
            if key in result:
                source.duplicate_keys.append((child, _position(key_node.start_mark)))
            source.keys[child] = _position(key_node.start_mark)
            result[key] = _build(loader, value_node, child, source)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, path + (i,), source) for i, item in enumerate(node.value)]
    if node.tag == _STR_TAG:  # most scalars: no constructor round trip needed
        return node.value
    return _scalar(loader.construct_object(node, deep=True))


def load_yaml(text: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document. Returns ``(data, source_map)``; ``data`` is None when empty.

    Raises :class:`YamlSyntaxError` with the position of the first syntax error.
    """
    loader = _Loader(text)
    source = SourceMap()
    try:
        node = loader.get_single_node()
        if node is None:
            return None, source
        return _build(loader, node, (), source), source
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = _position(mark) if mark else (1, 1)
        message = " ".join(part for part in (exc.context, exc.problem) if part) or str(exc)
        raise YamlSyntaxError(message, line, column) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(str(exc), 1, 1) from None
    finally:
        loader.dispose()
