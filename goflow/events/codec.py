"""Topic and payload encoding of the event stream (see ``docs/events.md``).

The publisher's hot path lives in :mod:`goflow.events.publisher`; this module holds the
pieces it shares with subscribers and tests: topic construction, the msgpack fallback for
values msgpack cannot encode, value bounding and secret masking, and decoding.
"""

from __future__ import annotations

import datetime
import enum
from typing import Any, Iterable, Mapping

import json

import msgpack

from .types import HEARTBEAT, WIRE_VERSION, WORKER_TYPES, Event


#: Payload keys in the order the publisher writes them (a msgpack map: order is not part
#: of the contract, but it is stable).
PAYLOAD_KEYS: tuple[str, ...] = (
    "v", "type", "ts", "epoch", "seq", "eseq", "execution_id", "workflow", "node_id",
    "node_type", "status", "attempt", "vseq", "error", "meta",
)

DEFAULT_MAX_VALUE_BYTES = 4096


def topic_for(type: str, execution_id: str | None = None, node_id: str | None = None,
              worker_id: str | None = None) -> str:
    """The topic string of an event. Always ends with ``/``."""
    if execution_id is not None:
        if node_id is not None:
            return f"{type}/{execution_id}/{node_id}/"
        return f"{type}/{execution_id}/"
    if type == HEARTBEAT:
        return "heartbeat/"
    if worker_id is not None:
        return f"{type}/{worker_id}/"
    return f"{type}/"


def parse_topic(topic: str) -> dict[str, str | None]:
    """Split a topic into ``type``, ``execution_id``/``worker_id`` and ``node_id``."""
    parts = topic.split("/")
    if parts and parts[-1] == "":
        parts.pop()
    out: dict[str, str | None] = {"type": parts[0] if parts else "", "execution_id": None,
                                  "node_id": None, "worker_id": None}
    if out["type"] in WORKER_TYPES:
        out["worker_id"] = parts[1] if len(parts) > 1 else None
    else:
        out["execution_id"] = parts[1] if len(parts) > 1 else None
        out["node_id"] = "/".join(parts[2:]) if len(parts) > 2 else None
    return out


def msgpack_default(obj: Any) -> Any:
    """Make anything encodable rather than fail the coordinator's emit path."""
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "model_dump"):
        try:
            return obj.model_dump()
        except Exception:  # pragma: no cover - defensive
            pass
    return str(obj)


def new_packer() -> msgpack.Packer:
    return msgpack.Packer(default=msgpack_default, use_bin_type=True)


_BOUND_PACKER = new_packer()


def json_type(value: Any) -> str:
    """JSON type name of a Python value (used in the ``$omitted`` marker)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple, set, frozenset)):
        return "array"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "binary"
    return "string"




def bound_value(value: Any, max_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> Any:
    """``value``, or the ``$omitted`` marker when its msgpack encoding exceeds ``max_bytes``.

    Used for every value an event carries in ``meta`` (outputs, variable changes, loop
    items). Small scalars are returned without encoding.
    """
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str) and len(value) * 4 <= max_bytes:
        return value
    try:
        size = len(_BOUND_PACKER.pack(value))
    except Exception:
        _BOUND_PACKER.reset()
        value = msgpack_default(value)
        size = len(_BOUND_PACKER.pack(value))
    if size > max_bytes:
        return {"$omitted": True, "type": json_type(value), "bytes": size}
    return value


def encode_event(fields: Mapping[str, Any]) -> bytes:
    """Encode a full payload dict (slow path: tests, tools, other publishers)."""
    d = {k: fields.get(k) for k in PAYLOAD_KEYS}
    d["v"] = fields.get("v", WIRE_VERSION)
    if d["meta"] is None:
        d["meta"] = {}
    for k, v in fields.items():
        if k not in d and k != "topic":
            d[k] = v
    return new_packer().pack(d)


def decode_payload(payload: bytes) -> dict[str, Any]:
    """Decode a payload into a plain dict. Raises ``ValueError`` on garbage."""
    try:
        d = msgpack.unpackb(payload, raw=False)
    except Exception as exc:
        raise ValueError(f"event payload is not msgpack: {exc}") from exc
    if not isinstance(d, dict):
        raise ValueError("event payload is not a msgpack map")
    return d


def decode_event(topic: bytes | str, payload: bytes) -> Event:
    """Decode one ``[topic, payload]`` message into an :class:`Event`."""
    d = decode_payload(payload)
    d["topic"] = topic.decode("utf-8", "replace") if isinstance(topic, (bytes, bytearray)) else topic
    if d.get("meta") is None:
        d["meta"] = {}
    if isinstance(d.get("type"), str) and isinstance(d.get("seq"), int) and isinstance(d.get("epoch"), str) \
            and isinstance(d.get("ts"), float):
        # Well-formed (what goflow publishes): skip per-field validation.
        return Event.from_wire(d)
    return Event.model_validate(d)
