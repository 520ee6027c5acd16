"""The workflow schema: GoFlow's YAML format as pydantic models.

Both GoFlow dialects load: the parser's (``default:``, ``return:``, ``merge_strategy:``) and the
CLI loader's / docs' spellings (``default_value:``, ``return_value:``, ``merge:``). Keys are
checked strictly by :mod:`goflow.language.loader` before these models see them, so a typo is an error
that names the key and suggests the nearest known one.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Annotated, Any, Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from goflow.language.durations import parse_duration

ID_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
VARIABLE_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CALL_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

VariableType = Literal["string", "number", "boolean", "object", "array", "any"]
MergeStrategy = Literal["wait_all", "wait_any", "wait_first"]


class SharedFieldsSet(set):
    """The set of explicitly given fields, one per distinct set of keys, shared by every model
    the loader built with exactly those keys (a 5-key set costs ~470 bytes: 90 MB over a
    100k-node workflow's nodes and edges). A model copies it before its first assignment,
    so sharing is never visible (see ``_Model.__setattr__``)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=False)

    def __setattr__(self, name: str, value: Any) -> None:
        if type(self.__pydantic_fields_set__) is SharedFieldsSet:
            object.__setattr__(self, "__pydantic_fields_set__", set(self.__pydantic_fields_set__))
        super().__setattr__(name, value)


def _duration(value: Any) -> float | None:
    if value is None:
        return None
    return parse_duration(value)


class Metadata(BaseModel):
    """Descriptive metadata. Free-form beyond the documented keys: it is never executed."""

    model_config = ConfigDict(extra="allow")
    author: str | None = None
    created: str | None = None
    last_modified: str | None = None
    tags: list[str] = Field(default_factory=list)
    icon: str | None = None


class Variable(_Model):
    name: str
    type: VariableType = "any"
    default: Any = Field(default=None, validation_alias=AliasChoices("default", "default_value"))
    required: bool = False
    description: str | None = None
    secret: bool = False

    @property
    def has_default(self) -> bool:
        return "default" in self.model_fields_set


class Server(_Model):
    """An MCP server. ``transport`` defaults to stdio (GoFlow's engine rejects an omitted one)."""

    id: str
    name: str | None = None
    description: str | None = None
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    transport: Literal["stdio", "sse", "http"] = "stdio"
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    credential_ref: str | None = None


class RetryPolicy(_Model):
    """How a failed node is retried.

    ``max_attempts`` counts every attempt, the first included (``3`` = up to two retries).
    The delay before retry *n* is ``initial_delay * backoff_multiplier**(n-1)`` for
    ``exponential`` backoff (``initial_delay`` for ``fixed``), capped at ``max_delay``, with
    +/-25% jitter when ``jitter`` is true. ``on`` (alias ``retryable_errors``) lists the error
    classes retried (empty = all); ``non_retryable_errors`` wins over it. GoFlow's class names
    (``connection_error``, ``timeout_error``, ...) are accepted too. The decision is
    :mod:`goflow.coordinator.retry`'s.
    """

    max_attempts: int = Field(default=3, ge=1, le=1000)
    backoff: Literal["fixed", "exponential"] = "exponential"
    initial_delay: float = 1.0
    max_delay: float = 30.0
    backoff_multiplier: float = Field(default=2.0, ge=1.0, le=100.0)
    jitter: bool = True
    on: list[str] = Field(default_factory=list, validation_alias=AliasChoices("on", "retryable_errors"))
    non_retryable_errors: list[str] = Field(default_factory=list)

    _durations = field_validator("initial_delay", "max_delay", mode="before")(_duration)



class WorkerSelector(_Model):
    labels: dict[str, str] = Field(default_factory=dict)


class NodeBase(_Model):
    id: str
    description: str | None = None
    retry: RetryPolicy | None = None
    timeout: float | None = None
    condition: str | None = None
    """On every node but ``condition`` nodes: a guard; when false the node is skipped."""
    worker: WorkerSelector | None = None

    _timeout = field_validator("timeout", mode="before")(_duration)

    @property
    def output_variable(self) -> str | None:
        return getattr(self, "output", None)


class StartNode(NodeBase):
    type: Literal["start"]


class EndNode(NodeBase):
    type: Literal["end"]
    return_: Any = Field(default=None, validation_alias=AliasChoices("return", "return_value"))


class PassthroughNode(NodeBase):
    type: Literal["passthrough"]


class McpToolNode(NodeBase):
    type: Literal["mcp_tool"]
    server: str
    tool: str
    parameters: Any = Field(default_factory=dict)
    output: str | None = None


class TransformNode(NodeBase):
    type: Literal["transform"]
    input: str | None = None
    expression: str | None = None
    template: str | None = None
    output: str | None = None


class ConditionNode(NodeBase):
    type: Literal["condition"]
    condition: str  # type: ignore[assignment]


class LoopNode(NodeBase):
    type: Literal["loop"]
    collection: str
    item: str
    body: list[str]
    break_condition: str | None = None
    output: str | None = None
    max_parallel: int | None = Field(default=None, ge=1)
    parallel: bool = False
    """GoFlow docs' ``parallel: true``: iterations overlap (bounded by ``max_parallel`` if set)."""


class ParallelNode(NodeBase):
    type: Literal["parallel"]
    branches: list[list[str]]
    merge_strategy: MergeStrategy = Field(default="wait_all", validation_alias=AliasChoices("merge_strategy", "merge"))
    max_parallel: int | None = Field(default=None, ge=1)


class PythonNode(NodeBase):
    type: Literal["python"]
    call: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    output: str | None = None


Node = Annotated[
    Union[StartNode, EndNode, PassthroughNode, McpToolNode, TransformNode, ConditionNode, LoopNode, ParallelNode, PythonNode],
    Field(discriminator="type"),
]

NODE_TYPES: dict[str, type[NodeBase]] = {
    "start": StartNode,
    "end": EndNode,
    "passthrough": PassthroughNode,
    "mcp_tool": McpToolNode,
    "transform": TransformNode,
    "condition": ConditionNode,
    "loop": LoopNode,
    "parallel": ParallelNode,
    "python": PythonNode,
}
WORKER_NODE_TYPES = frozenset({"mcp_tool", "transform", "python"})


class Edge(_Model):
    id: str | None = None
    source: str = Field(validation_alias="from")
    target: str = Field(validation_alias="to")
    condition: str | None = None
    label: str | None = None
    description: str | None = None

    @field_validator("condition", mode="before")
    @classmethod
    def _condition_text(cls, value: Any) -> Any:
        # YAML reads an unquoted `condition: true` as a bool; GoFlow means the string.
        if isinstance(value, bool):
            return "true" if value else "false"
        return value


class Workflow(_Model):
    version: str = "1.0"
    name: str
    description: str | None = None
    metadata: Metadata | None = None
    variables: list[Variable] = Field(default_factory=list)
    servers: list[Server] = Field(default_factory=list)
    nodes: list[Node] = Field(default_factory=list)
    edges: list[Edge] = Field(default_factory=list)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value

    def node(self, node_id: str) -> NodeBase:
        """The node with id ``node_id`` (KeyError if none)."""
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    @property
    def secret_variables(self) -> frozenset[str]:
        return frozenset(v.name for v in self.variables if v.secret)

    def source_text(self) -> str:
        """The workflow as text, for one whose YAML is unknown: its model as JSON (valid YAML)."""
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True), default=str, indent=1)


@functools.cache
def allowed_keys(model: type[BaseModel]) -> frozenset[str]:
    """Every YAML key ``model`` accepts: field names and all their aliases."""
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            keys.update(str(choice) for choice in alias.choices)
        elif isinstance(alias, str):
            keys.add(alias)
        elif info.alias:
            keys.add(info.alias)
        else:
            keys.add(name)
    return frozenset(keys)
