"""YAML loading that remembers where every key and value came from.

The validator reports problems as ``FILE:LINE:COL``; this module turns YAML text into plain
Python data plus a :class:`SourceMap` from *paths* (tuples of keys and list indexes, e.g.
``("nodes", 3, "merge_strategy")``) to 1-based line and column numbers.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any

import yaml

from goflow.language.limits import MAX_ALIAS_VALUES, MAX_DEPTH

Path = tuple[str | int, ...]


class SourceMap:
    """Positions of the values (and of the keys) found in one YAML document.

    Computed on first use, by parsing the text again with positions: a valid file (the
    common case) never pays for a position per value, and an invalid one pays once.
    """

    def __init__(self, text: str = "", *, has_duplicates: bool = False):
        self._text = text
        self._has_duplicates = has_duplicates
        self._tables: tuple[dict, dict, list] | None = None

    def _positions(self) -> tuple[dict, dict, list]:
        if self._tables is None:
            values: dict[Path, tuple[int, int]] = {}
            keys: dict[Path, tuple[int, int]] = {}
            duplicates: list[tuple[Path, tuple[int, int]]] = []
            if self._text:
                loader = _Loader(self._text)
                try:
                    node = loader.get_single_node()
                    if node is not None:
                        _build_positioned(loader, node, (), values, keys, duplicates)
                finally:
                    loader.dispose()
            self._tables = values, keys, duplicates
        return self._tables

    @property
    def duplicate_keys(self) -> list[tuple[Path, tuple[int, int]]]:
        """``(path, position)`` of every key that repeats one earlier in the same mapping."""
        return self._positions()[2] if self._has_duplicates else []

    def locate(self, path: Path, *, key: bool = False) -> tuple[int, int]:
        """The position of ``path`` (its key when ``key``), else of its nearest ancestor."""
        values, keys, _ = self._positions()
        table = keys if key else values
        probe = tuple(path)
        while probe:
            if probe in table:
                return table[probe]
            if probe in values:
                return values[probe]
            probe = probe[:-1]
        return values.get((), (1, 1))


class YamlSyntaxError(Exception):
    """The text is not YAML; ``line``/``column`` are 1-based."""

    def __init__(self, message: str, line: int, column: int):
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column


class YamlLimitError(YamlSyntaxError):
    """The text is YAML but exceeds a limit for workflows (see :mod:`goflow.language.limits`)."""


_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: ~10x faster


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """SafeLoader with YAML 1.2 booleans: only true/false are booleans.

    YAML 1.1 also reads ``on``, ``off``, ``yes`` and ``no`` as booleans, which would turn
    GoFlow's ``retry: {on: [...]}`` key into ``True``.

    Tag resolution is memoised per document: a workflow repeats the same plain scalars
    (``type: python``, ``to: end``) thousands of times, and resolving one runs regular
    expressions. Path resolvers are not used, so the result depends on the text alone.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._tags: dict[tuple[str, tuple[bool, bool]], str] = {}

    def resolve(self, kind: type, value: Any, implicit: Any) -> str:
        if kind is not yaml.ScalarNode:
            return super().resolve(kind, value, implicit)
        key = (value, implicit)
        tag = self._tags.get(key)
        if tag is None:
            tag = self._tags[key] = super().resolve(kind, value, implicit)
        return tag


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


_STR_TAG = "tag:yaml.org,2002:str"
_WILDCARD_RESOLVERS = tuple(_Loader.yaml_implicit_resolvers.get(None, ()))
_RESOLVERS_BY_FIRST = {first: tuple(resolvers) + _WILDCARD_RESOLVERS
                       for first, resolvers in _Loader.yaml_implicit_resolvers.items() if first is not None}


def _plain_tag(text: str) -> str:
    """The tag ``_Loader.resolve`` gives plain scalar ``text`` (it has no path resolvers), without its
    call chain: each distinct plain text of a document is resolved once, 300k of them at 100k nodes."""
    for tag, regexp in _RESOLVERS_BY_FIRST.get(text[:1], _WILDCARD_RESOLVERS):
        if regexp.match(text):
            return tag
    return _STR_TAG


def _position(mark: yaml.Mark) -> tuple[int, int]:
    return mark.line + 1, mark.column + 1


def _scalar(value: Any) -> Any:
    # YAML timestamps become ISO text: values must stay JSON/msgpack-friendly.
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.isoformat()
    return value


def _key(loader: _Loader, key_node: yaml.Node) -> Any:
    key = key_node.value if key_node.tag == _STR_TAG else _scalar(loader.construct_object(key_node, deep=True))
    return str(key) if isinstance(key, (list, dict)) else key


def _build_positioned(loader: _Loader, node: yaml.Node, path: Path, values: dict, keys: dict,
                      duplicates: list) -> None:
    """Record the position of every value and key under ``node`` (limits were checked by the fast pass)."""
    values[path] = _position(node.start_mark)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        seen = set()
        for key_node, value_node in node.value:
            key = _key(loader, key_node)
            child = path + (key,)
            if key in seen:
                duplicates.append((child, _position(key_node.start_mark)))
            seen.add(key)
            keys[child] = _position(key_node.start_mark)
            _build_positioned(loader, value_node, child, values, keys, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _build_positioned(loader, item, path + (index,), values, keys, duplicates)


class _Builder:
    """Plain data from a composed node tree, without positions (the fast pass)."""

    def __init__(self, loader: _Loader, *, merges: bool):
        self.loader = loader
        self.merges = merges
        self.has_duplicates = False

    def build(self, node: yaml.Node, depth: int) -> Any:
        kind = node.__class__
        if kind is yaml.ScalarNode:
            if node.tag == _STR_TAG:  # most scalars: no constructor round trip needed
                return node.value
            return _scalar(self.loader.construct_object(node, deep=True))
        if depth >= MAX_DEPTH:
            raise _too_deep(node)
        if kind is yaml.SequenceNode:
            return [self.build(item, depth + 1) for item in node.value]
        if self.merges:
            self.loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value if key_node.tag == _STR_TAG else _key(self.loader, key_node)
            if key in result:
                self.has_duplicates = True
            result[key] = self.build(value_node, depth + 1)
        return result


def _too_deep(node: Any) -> "YamlLimitError":
    line, column = _position(node.start_mark)
    return YamlLimitError(f"the YAML nests deeper than {MAX_DEPTH} levels (the limit for a workflow)",
                          line, column)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases add more than MAX_ALIAS_VALUES values.

    The composed tree shares an anchored node among its aliases, so each distinct node is
    sized once and an alias costs a lookup: a "billion laughs" file is refused after a few
    dozen steps, before anything is expanded.
    """
    sizes: dict[int, int] = {}
    """id(node) -> values under it, aliases expanded (for nodes whose subtree is done)."""
    started: set[int] = set()
    added = 0
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative depth-first walk in document order
        node, finished = stack.pop()
        if finished:
            sizes[id(node)] = 1 + sum(sizes.get(id(child), 1) for child in _children(node))
            continue
        if id(node) in started:  # met again: an alias
            added += sizes.get(id(node), 1)  # (a recursive alias, inside its own anchor, counts 1)
            if added > MAX_ALIAS_VALUES:
                raise _too_many_aliases(node)
            continue
        started.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(_children(node)))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


class _Unusual(Exception):
    """The document uses YAML the streaming builder leaves to the composing one (merge keys,
    collection keys, tagged collections)."""


_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_INT_TAG = "tag:yaml.org,2002:int"
_MERGE_TAG = "tag:yaml.org,2002:merge"

_KEY_WANTED = object()
"""In :func:`_stream`: the open mapping's next value is a key."""
_IN_LIST = object()
"""In :func:`_stream`: the open collection is a sequence."""
_TOP = object()
"""In :func:`_stream`: no collection is open (the next value is the document's)."""
_MISSING = object()


def _plain_value(loader: _Loader, event: yaml.ScalarEvent, strings: dict[str, str]) -> Any:
    """The value of a plain scalar, by its text alone (memoised per document by the caller)."""
    text = event.value
    if text.isdigit() and text.isascii() and (text[0] != "0" or len(text) == 1):
        return int(text)  # what the int resolver and constructor give for decimal digits
    tag = _plain_tag(text)
    if tag == _STR_TAG:
        return strings.setdefault(text, text)
    return _constructed(loader, event, tag)


def _quoted_value(loader: _Loader, event: yaml.ScalarEvent, strings: dict[str, str]) -> Any:
    """The value of a quoted or explicitly tagged scalar."""
    tag = event.tag
    if tag is None or tag == "!" or tag == _STR_TAG:
        return strings.setdefault(event.value, event.value)
    return _constructed(loader, event, tag)


def _constructed(loader: _Loader, event: yaml.ScalarEvent, tag: str) -> Any:
    if tag == _MERGE_TAG:
        raise _Unusual()
    return _scalar(loader.construct_object(
        yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style), deep=True))


def _stream(loader: _Loader) -> tuple[Any, bool]:
    """Plain data straight from the parser's events: ``(data, has_duplicate_keys)``.

    The fast pass for ordinary workflow files: no node tree is kept (about a quarter of the
    composing path's memory at 100k nodes), limits are checked as values arrive (an alias
    adds the size recorded for its anchor, so a "billion laughs" file is refused before
    anything is expanded). Raises :class:`_Unusual` for what it leaves to :func:`_compose`.

    The loop is the cost of loading (one turn per event, ~16 events per node): the open
    collection lives in locals, and a plain scalar's value is memoised by its text, so a
    repeated ``type: python`` or ``to: end`` costs one dict lookup.
    """
    get = loader.get_event
    scalar_event, mapping_start, sequence_start = yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent
    mapping_end, sequence_end, alias_event = yaml.MappingEndEvent, yaml.SequenceEndEvent, yaml.AliasEvent
    plain: dict[str, Any] = {}
    """Plain scalar text -> its value (str, int, float, bool or None: immutable, so shared)."""
    strings: dict[str, str] = {}
    """Every distinct string once: a node id repeats in each of its edges (memory at 100k nodes)."""
    stack: list[tuple[Any, Any, int, str | None]] = []
    """The enclosing collections' states, each ``(container, key, first, anchor)`` as below."""
    container: Any = None
    """The open collection (a dict or a list), None at the top level."""
    key: Any = _TOP
    """_KEY_WANTED / the pending key in a mapping, _IN_LIST in a sequence, _TOP at the top level."""
    first = 0
    """Values counted when the open collection started (its size is ``counted - first`` at its end)."""
    anchor: str | None = None
    """The open collection's anchor."""
    anchors: dict[str, tuple[Any, int]] = {}
    counted = added = 0
    duplicates = False
    root: Any = None
    documents = 0
    while True:
        event = get()
        kind = event.__class__
        if kind is scalar_event:
            if event.tag is None and event.implicit[0]:  # plain: its value depends on its text alone
                value = plain.get(event.value, _MISSING)
                if value is _MISSING:
                    value = plain[event.value] = _plain_value(loader, event, strings)
            else:
                value = _quoted_value(loader, event, strings)
            counted += 1
            if event.anchor is not None:
                anchors[event.anchor] = (value, 1)
        elif kind is mapping_start or kind is sequence_start:
            tag = event.tag
            if tag is not None and tag != "!" and tag != (_MAP_TAG if kind is mapping_start else _SEQ_TAG):
                raise _Unusual()
            if key is _KEY_WANTED:
                raise _Unusual()  # a collection as a mapping key
            if len(stack) >= MAX_DEPTH:
                raise _too_deep(event)
            stack.append((container, key, first, anchor))
            if kind is mapping_start:
                container, key = {}, _KEY_WANTED
            else:
                container, key = [], _IN_LIST
            first, anchor = counted, event.anchor
            if anchor is not None:
                anchors[anchor] = (container, 0)  # open: an alias to it now would be recursive
            counted += 1
            continue
        elif kind is mapping_end or kind is sequence_end:
            value = container
            if anchor is not None:
                anchors[anchor] = (value, counted - first)
            container, key, first, anchor = stack.pop()
        elif kind is alias_event:
            if event.anchor not in anchors:
                line, column = _position(event.start_mark)
                raise YamlSyntaxError(f"found undefined alias '{event.anchor}'", line, column)
            value, size = anchors[event.anchor]
            if size == 0:
                line, column = _position(event.start_mark)
                raise YamlLimitError(f"alias '*{event.anchor}' is inside the value it names; recursive YAML "
                                     f"cannot be a workflow", line, column)
            if key is _KEY_WANTED and isinstance(value, (dict, list)):
                raise _Unusual()
            added += size
            counted += size
            if added > MAX_ALIAS_VALUES:
                raise _too_many_aliases(event)
        elif kind is yaml.DocumentStartEvent:
            documents += 1
            if documents > 1:
                line, column = _position(event.start_mark)
                raise YamlSyntaxError("expected a single document in the stream, but found another document",
                                      line, column)
            continue
        elif kind is yaml.StreamEndEvent:
            return root, duplicates
        else:  # stream start, document end
            continue
        # `value` is complete: place it in the open collection.
        if key is _KEY_WANTED:
            key = value  # a scalar: a collection as a key went to _compose
        elif key is _IN_LIST:
            container.append(value)
        elif key is _TOP:
            root = value
        else:
            if key in container:
                duplicates = True
            container[key] = value
            key = _KEY_WANTED


def _too_many_aliases(event: Any) -> "YamlLimitError":
    """(``event``: a parser event or a node; both carry ``start_mark``.)"""
    line, column = _position(event.start_mark)
    return YamlLimitError(f"YAML aliases expand to more than {MAX_ALIAS_VALUES:,} values, the limit "
                          f"for a workflow (a 'billion laughs' document?)", line, column)


def _compose(loader: _Loader, text: str) -> tuple[Any, bool]:
    """Plain data through libyaml's node tree: every YAML feature (merge keys, complex keys)."""
    node = loader.get_single_node()
    if node is None:
        return None, False
    if "*" in text:  # only an alias ("*name") can make the tree share nodes
        _check_expansion(node)
    builder = _Builder(loader, merges="<<" in text)
    return builder.build(node, 0), builder.has_duplicates


def load_yaml(text: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document. Returns ``(data, source_map)``; ``data`` is None when empty.

    Raises :class:`YamlSyntaxError` with the position of the first syntax error, and its
    subclass :class:`YamlLimitError` when the document exceeds a limit (nesting depth,
    alias expansion).
    """
    try:
        loader = _Loader(text)
        try:
            data, duplicates = _stream(loader)
        except _Unusual:
            loader.dispose()
            loader = _Loader(text)
            data, duplicates = _compose(loader, text)
        return data, SourceMap(text, has_duplicates=duplicates)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = _position(mark) if mark else (1, 1)
        message = " ".join(part for part in (exc.context, exc.problem) if part) or str(exc)
        raise YamlSyntaxError(message, line, column) from None
    except yaml.reader.ReaderError as exc:   # a character YAML does not allow: not marked, an offset
        line, column = _offset_position(text, exc.position, utf8=_BaseLoader is not yaml.SafeLoader)
        raise YamlSyntaxError(_unacceptable(text, exc.character), line, column) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(str(exc), 1, 1) from None
    finally:
        loader.dispose()


_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")
"""What YAML counts as a line break (a CR LF pair is one)."""


def text_position(prefix: str) -> tuple[int, int]:
    """The 1-based line and column (in characters) just after ``prefix``, counted as YAML counts them."""
    line, start = 1, 0
    for match in _LINE_BREAK.finditer(prefix):
        line, start = line + 1, match.end()
    return line, len(prefix) - start + 1


def _offset_position(text: str, offset: int, *, utf8: bool) -> tuple[int, int]:
    """The position of the character at ``offset`` in ``text``: a character index (PyYAML's
    reader), or with ``utf8`` a byte offset into the UTF-8 encoding (libyaml reads bytes)."""
    if utf8:
        prefix = text.encode("utf-8", "surrogatepass")[:offset].decode("utf-8", "replace")
    else:
        prefix = text[:offset]
    return text_position(prefix)


def _unacceptable(text: str, character: Any) -> str:
    """What to say about a character YAML refuses (C0/C1 controls but tab and line breaks,
    U+FFFE, U+FFFF), and what to do. A NUL is mostly a UTF-16/UTF-32 file without its byte
    order mark (then every other character is one), else binary data."""
    code = character if isinstance(character, int) else ord(character[:1] or "\0")
    if code == 0:
        head = text[:64]
        if head.count("\0") * 3 >= len(head):
            return ("NUL characters between the letters: the file is UTF-16 or UTF-32 text without a byte "
                    "order mark; save the file as UTF-8")
        return ("a NUL character (U+0000), which YAML does not allow (is this a binary file?): remove it; "
                "inside a double-quoted string, write it as \"\\0\"")
    escape = f"\\x{code:02X}" if code <= 0xFF else f"\\u{code:04X}"
    kind = "a noncharacter" if code in (0xFFFE, 0xFFFF) else "a control character"
    return (f"the character U+{code:04X}, which YAML does not allow ({kind}): remove it; inside a "
            f"double-quoted string, write it as \"{escape}\"")
