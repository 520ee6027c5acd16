"""The gateway's copy of the event stream: one reliable subscriber, many browser readers.

A :class:`Hub` runs one :class:`~goflow.events.monitor.Monitor` (reliable, everything,
``since="start"``) on its own thread and appends each event, encoded once as an SSE frame,
to a fixed-size ring. Browser streams do not get queues: each one is a cursor into the ring
(:meth:`Hub.follow`), so a slow reader costs nothing but its cursor; a reader the ring has
overtaken (or whose socket stalls, see ``goflow.web.app``) is cut off and resumes from its
last id like any reconnecting ``EventSource``.

Positions: an event's SSE id is ``<epoch>:<seq>`` (the coordinator incarnation and its
gap-free sequence number), so ``Last-Event-ID`` names exactly one event even across a
coordinator restart. The hub never runs on the coordinator's reactor thread; with
``goflow-coordinator --http`` and ``goflow run --http`` it runs in its own process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from goflow.control.framing import ControlError
from goflow.events.filter import EventFilter
from goflow.events.monitor import Monitor
from goflow.events.types import Event

log = logging.getLogger("goflow.web.hub")

DEFAULT_CAPACITY = 100_000
DEFAULT_HEARTBEAT_S = 15.0
#: Events joined into one write to a browser (fewer, larger writes).
BATCH = 500
#: Seconds without events after which the subscriber thread re-subscribes (and sees stop()).
IDLE_S = 1.0
MAX_EPOCHS = 64
#: Executions whose first ring position is remembered (a new reader of one starts there).
MAX_FIRSTS = 10_000
#: A reader of "everything held" starts this fraction of the ring after its oldest event, so
#: that the next append to a full ring does not overtake it at once.
START_SLACK = 0.01


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$binary": base64.b64encode(bytes(value)).decode("ascii")}
    return str(value)


_ENCODER = json.JSONEncoder(default=_json_default, separators=(",", ":"), ensure_ascii=False)


def to_json(value: Any) -> str:
    """JSON text for anything an event or a control reply holds (bytes as ``{"$binary": b64}``)."""
    return _ENCODER.encode(value)


def event_id(epoch: str, seq: int) -> str:
    return f"{epoch}:{seq}"


def gap_frame(missed: int) -> bytes:
    """The SSE message telling a resuming client that ``missed`` events after its id are gone."""
    return f"event: gap\ndata: {json.dumps({'missed': missed})}\n\n".encode()


def parse_event_id(text: str | None) -> tuple[str, int] | None:
    """``(epoch, seq)`` from an SSE id; None when absent or malformed."""
    if not text:
        return None
    epoch, sep, seq = text.strip().rpartition(":")
    if not sep or not seq.isdigit():
        return None
    return epoch, int(seq)


@dataclass(slots=True)
class Entry:
    """One event in the ring: what filters look at, and its ready-to-send SSE frame."""

    pos: int
    epoch: str
    seq: int
    type: str
    execution_id: str | None
    node_id: str | None
    frame: bytes


class Hub:
    """The ring of events and the thread that fills it (see the module docstring)."""

    def __init__(self, events: str, control: str | None, *, curve: dict | None = None,
                 capacity: int = DEFAULT_CAPACITY,
                 on_event: Callable[[Event], None] | None = None):
        self.monitor = Monitor(events, control, curve=curve)
        self.capacity = max(1, int(capacity))
        self.on_event = on_event
        self._ring: list[Entry | None] = [None] * self.capacity
        self.next_pos = 0
        #: epoch -> (position and seq of its first event in the ring)
        self._epochs: dict[str, tuple[int, int]] = {}
        self.epoch: str | None = None
        #: execution id -> ring position of its first event held (insertion-ordered, bounded)
        self._firsts: dict[str, int] = {}
        self.stats = {"events": 0, "clients": 0, "cut_off": 0, "served": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._wake_pending = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()

    # -- the subscriber thread -----------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._changed = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="goflow-web-hub", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.monitor.close()

    def _run(self) -> None:
        """Subscribe, deliver, and on an idle timeout (so ``stop`` is seen) subscribe again
        from the next seq; a control error (coordinator not up yet, restarting) is retried."""
        while not self._stop.is_set():
            try:
                for ev in self.monitor.subscribe(EventFilter(), since=self._since(), timeout=IDLE_S):
                    self.append(ev)
                    if self._stop.is_set():
                        return
            except ControlError as exc:
                log.warning("the gateway cannot reach the control socket yet: %s", exc)
                self._stop.wait(IDLE_S)
            except Exception:
                log.exception("the gateway's subscriber failed; subscribing again")
                self._stop.wait(IDLE_S)
            finally:
                self.ready.set()

    def _since(self) -> Any:
        """Where a (re)subscription starts: everything retained, or after the last event held
        when the coordinator is still the same incarnation."""
        if not self.monitor.control_endpoint:
            return "now"
        last = self.last_seq()
        if last is None:
            return "start"
        current = self.monitor.request("replay_seq", from_seq=2 ** 62, limit=1).get("epoch")
        return last + 1 if current == self.epoch else "start"

    def last_seq(self) -> int | None:
        """The seq of the newest event held (None before the first)."""
        if self.next_pos == 0:
            return None
        last = self._ring[(self.next_pos - 1) % self.capacity]
        return last.seq if last is not None else None

    def last_event_id(self) -> str | None:
        """The SSE id of the newest event held (None before the first). Every event up to it
        has been through ``on_event``: a view read after this call and a stream resumed from
        this id together miss nothing."""
        if self.next_pos == 0:
            return None
        last = self._ring[(self.next_pos - 1) % self.capacity]
        return event_id(last.epoch, last.seq) if last is not None else None

    def append(self, ev: Event) -> None:
        """Add one delivered event (the subscriber thread; tests may call it directly)."""
        if self.on_event is not None:
            self.on_event(ev)
        data = ev.__dict__   # the fields as received (what to_wire_dict() dumps, without pydantic's cost)
        extra = ev.__pydantic_extra__
        frame = (f"id: {event_id(ev.epoch, ev.seq)}\nevent: goflow\ndata: "
                 f"{to_json({**data, **extra} if extra else data)}\n\n").encode()
        pos = self.next_pos
        if ev.epoch != self.epoch:
            self.epoch = ev.epoch
            self._epochs[ev.epoch] = (pos, ev.seq)
            while len(self._epochs) > MAX_EPOCHS:   # coordinator restarts; oldest first
                del self._epochs[next(iter(self._epochs))]
        if ev.execution_id is not None and ev.execution_id not in self._firsts:
            self._firsts[ev.execution_id] = pos
            if len(self._firsts) > MAX_FIRSTS:
                del self._firsts[next(iter(self._firsts))]
        self._ring[pos % self.capacity] = Entry(pos, ev.epoch, ev.seq, ev.type, ev.execution_id, ev.node_id, frame)
        self.next_pos = pos + 1
        self.stats["events"] += 1
        self._wake()

    def _wake(self) -> None:
        if self._loop is None or self._wake_pending:
            return
        self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._notify)
        except RuntimeError:   # the loop is closed: shutting down
            pass

    def _notify(self) -> None:
        self._wake_pending = False
        changed, self._changed = self._changed, asyncio.Event()
        if changed is not None:
            changed.set()

    # -- readers (the event loop) ----------------------------------------------------------
    @property
    def oldest_pos(self) -> int:
        return max(0, self.next_pos - self.capacity)

    def entry(self, pos: int) -> Entry | None:
        """The entry at ``pos``, or None once the ring has overwritten it."""
        item = self._ring[pos % self.capacity]
        return item if item is not None and item.pos == pos else None

    def start_position(self, executions: tuple[str, ...] | None) -> int:
        """Where a reader without an id starts: the first event held of the executions it
        follows, else (everything held) a little after the oldest event (``START_SLACK``)."""
        oldest = self.oldest_pos
        if executions:
            firsts = [self._firsts.get(eid) for eid in executions]
            if all(first is not None for first in firsts):
                return max(oldest, min(firsts))   # type: ignore[type-var]
            if not any(first is not None for first in firsts):
                return self.next_pos   # none seen yet: they start after now
        if self.next_pos - oldest < self.capacity:
            return oldest
        return min(self.next_pos, oldest + int(self.capacity * START_SLACK))

    def position_after(self, last: tuple[str, int] | None) -> int:
        """The ring position of the first event after SSE id ``last`` (``(epoch, seq)``).

        No id: the oldest event held. An id of an epoch the ring no longer (or never) held:
        the first event of the current epoch (its events before ``seq`` belong to another
        coordinator incarnation). Within an epoch seq is increasing, so the position is found
        directly, or by bisection when the subscriber recorded a loss. A ring still being
        filled may not hold the id yet: :meth:`follow` (given the id) skips what the client has.
        """
        oldest = self.oldest_pos
        if last is None:
            return oldest
        epoch, seq = last
        if epoch not in self._epochs:
            start = self._epochs.get(self.epoch or "", (oldest, 0))[0]
            return max(oldest, start)
        first_pos, first_seq = self._epochs[epoch]
        guess = first_pos + (seq - first_seq) + 1
        probe = self.entry(guess - 1) if oldest <= guess - 1 < self.next_pos else None
        if probe is not None and probe.epoch == epoch and probe.seq == seq:
            return guess
        lo, hi = max(oldest, first_pos), self.next_pos   # bisect: first entry with (epoch, seq') > seq
        while lo < hi:
            mid = (lo + hi) // 2
            item = self.entry(mid)
            if item is None:
                lo = mid + 1
            elif item.epoch == epoch and item.seq <= seq:
                lo = mid + 1
            else:
                hi = mid
        return lo

    async def follow(self, filt: EventFilter, start: int, *, after: tuple[str, int] | None = None,
                     heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> AsyncIterator[bytes]:
        """SSE bytes from ring position ``start`` on, forever: frames that match ``filt`` and
        a comment line after ``heartbeat_s`` of silence. Ends (the client is cut off) when the
        ring has overwritten the reader's position.

        ``after`` is the id the client resumes from (``Last-Event-ID``). It is honoured here,
        event by event, not only by ``start``: a gateway that has just (re)started may not
        hold it yet, since its ring is still being filled from the coordinator's replay; the
        leading events of that epoch up to its seq are then skipped as they arrive, so the
        client gets neither a duplicate nor a gap. If the first event after it is not its
        successor (the events between are no longer held), an ``event: gap`` frame says how
        many were missed."""
        pos = start
        self.stats["clients"] += 1
        try:
            while True:
                assert self._changed is not None
                changed = self._changed
                if pos < self.oldest_pos:
                    self.stats["cut_off"] += 1
                    return
                chunk: list[bytes] = []
                end = min(self.next_pos, pos + BATCH)
                while pos < end:
                    item = self.entry(pos)
                    if item is None:   # overwritten while we read: cut off, resume by id
                        self.stats["cut_off"] += 1
                        return
                    pos += 1
                    if after is not None:
                        if item.epoch == after[0]:
                            if item.seq <= after[1]:
                                continue   # the client has it already
                            if item.seq > after[1] + 1:
                                chunk.append(gap_frame(item.seq - after[1] - 1))
                        after = None   # the first event after the client's id: resumed
                    if filt.matches(item):
                        chunk.append(item.frame)
                if chunk:
                    self.stats["served"] += len(chunk)
                    yield b"".join(chunk)
                    continue
                if pos < self.next_pos:
                    await asyncio.sleep(0)   # a long scan of other executions' events: let others run
                    continue
                try:
                    await asyncio.wait_for(changed.wait(), heartbeat_s)
                except asyncio.TimeoutError:
                    yield b": heartbeat\n\n"
        finally:
            self.stats["clients"] -= 1
