"""The goflow event stream: types, wire codec, filters and the coordinator's publisher.

Subscribers use :class:`goflow.events.monitor.Monitor`; the wire format is in ``docs/events.md``.
"""

from .codec import decode_event, decode_payload, encode_event, parse_topic, topic_for
from .filter import EventFilter
from .publisher import DEFAULT_SNDHWM, EventPublisher
from .types import (EVENT_TYPES, EXECUTION_SCOPED_TYPES, HEARTBEAT, TERMINAL_TYPES, WORKER_TYPES,
                    Event)

__all__ = [
    "DEFAULT_SNDHWM", "EVENT_TYPES", "EXECUTION_SCOPED_TYPES", "HEARTBEAT", "TERMINAL_TYPES",
    "WORKER_TYPES", "Event", "EventFilter", "EventPublisher", "decode_event", "decode_payload",
    "encode_event", "parse_topic", "topic_for",
]
