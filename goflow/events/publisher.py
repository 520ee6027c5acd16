"""The coordinator side of the event stream: :class:`EventPublisher`.

Used from ONE thread (the coordinator's reactor): no locks. ``emit`` never blocks: the
XPUB socket drops at its high-water mark (per subscriber) and every drop is visible to
subscribers as a gap in ``seq``/``eseq`` that they repair through the control socket's
``replay`` / ``replay_seq`` ops, served from this object's bounded in-memory logs.

``emit`` sequences, logs and *queues* an event; :meth:`EventPublisher.flush` sends the
queue, in order. The owner flushes once per reactor turn (the coordinator does, after every
turn), so a burst of events is handed to ZeroMQ back to back: one wake-up of its I/O thread
and of each subscriber per burst instead of one per event (measured on a 20k fan-out: the
I/O thread's CPU 0.20 -> 0.07 s, a draining subscriber's 0.40 -> 0.22 s). The queue never
holds more than ``OUTBOX_EVENTS``: ``emit`` flushes it when full, which bounds how long a
long turn holds an event back (the latency this costs: docs/events.md §7). A heartbeat
flushes first (its ``seq`` must not run ahead of what was sent), and so does ``close``.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections import Counter, OrderedDict, deque
from typing import Any, Callable

import msgpack
import zmq

from .codec import decode_payload, new_packer, topic_for
from .types import HEARTBEAT, WIRE_VERSION

log = logging.getLogger(__name__)

#: Default per-subscriber send high-water mark. libzmq's default (1,000) drops most of an
#: unthrottled burst even for a healthy Python subscriber (measured: 62-82 % delivered at
#: 1,000). 10,000 events (~3 MB per subscriber at ~300 B/event) absorbs bursts of a few
#: thousand nodes while keeping a stalled subscriber's cost bounded; anything beyond is a
#: counted gap that reliable subscribers repair from the replay log.
DEFAULT_SNDHWM = 10_000
#: Default bounds of the replay logs: events, and bytes of payload (an event carries values
#: up to ``max_value_bytes`` each, so a count alone does not bound memory).
DEFAULT_LOG_CAPACITY = 100_000
DEFAULT_LOG_BYTES = 64 * 1024 * 1024
#: How long a finished execution stays in the heartbeat's ``meta.executions``.
FINISHED_HEARTBEAT_SECONDS = 30.0

#: Subscription limits. A subscription is a topic prefix; libzmq keeps every subscription of
#: every connection in a trie (measured: ~450 bytes per distinct prefix byte), freed only when
#: the connection goes; 2,000 SUBSCRIBE frames of 60 KB once took a daemon to 4.9 GB.
#: One prefix: at most MAX_PREFIX_BYTES (real topics are far shorter); a bigger frame makes
#: libzmq drop the connection that sent it. In total, over all connections: at most
#: MAX_SUBSCRIPTIONS prefixes and MAX_SUBSCRIBED_BYTES bytes of them (~60 MB of trie at
#: worst, for prefixes that share nothing). SUBSCRIPTION_RCVHWM bounds how far libzmq reads
#: a connection's subscriptions ahead of this count. XPUB tells no connection apart, so a
#: subscription beyond the total is refused by resetting the socket: every connection is
#: dropped (libzmq frees their subscriptions), subscribers reconnect and resubscribe by
#: themselves and repair the gap from the replay log like any other gap. Refusals and
#: resets are counted (stats, metrics).
MAX_PREFIX_BYTES = 512
MAX_SUBSCRIPTIONS = 4096
MAX_SUBSCRIBED_BYTES = 128 * 1024
SUBSCRIPTION_RCVHWM = 64
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_NOBLOCK = int(zmq.NOBLOCK)
_HEARTBEAT_TOPIC = b"heartbeat/"
#: Most events queued between two flushes (see the module docstring).
OUTBOX_EVENTS = 64
_OUTBOX_FRAMES = 2 * OUTBOX_EVENTS
_now = time.time


def _raw_send(sock: zmq.Socket) -> Callable[..., Any]:
    """``sock.send`` without pyzmq's Python-level wrapper (routing ids, groups: unused here);
    two sends per event, ~0.3 us each saved."""
    return super(zmq.Socket, sock).send


def _topic_of(payload: bytes) -> bytes:
    """The topic an event was published under, from its payload (see ``emit``)."""
    d = decode_payload(payload)
    worker_id = (d.get("meta") or {}).get("worker_id") if d.get("execution_id") is None else None
    return topic_for(d["type"], d.get("execution_id"), d.get("node_id"), worker_id).encode()


class _Execution:
    __slots__ = ("execution_id", "workflow", "eseq", "vseq", "log", "first_eseq", "finished_at")

    def __init__(self, execution_id: str, workflow: str | None):
        self.execution_id = execution_id
        self.workflow = workflow
        self.eseq = 0
        self.vseq = 0                # eseq of the latest change to the variables snapshot
        self.log: deque[bytes] = deque()
        self.first_eseq = 1          # eseq of log[0]; == eseq + 1 when the log is empty
        self.finished_at: float | None = None


class EventPublisher:
    """Sequence, encode and publish events; keep bounded replay logs.

    ``sink(execution_id, topic, payload)`` is called for every emitted event (not for
    heartbeats); the history store uses it. Its exceptions are logged and counted in
    ``stats()["sink_errors"]``, never raised into the reactor.
    """

    def __init__(self, context: zmq.Context, endpoints: list[str], *, sndhwm: int = DEFAULT_SNDHWM,
                 epoch: str | None = None, log_capacity: int = DEFAULT_LOG_CAPACITY,
                 log_bytes: int = DEFAULT_LOG_BYTES,
                 sink: Callable[[str | None, bytes, bytes], None] | None = None,
                 curve: dict | None = None):
        self.epoch: str = epoch or uuid.uuid4().hex
        self.log_capacity = max(1, int(log_capacity))
        self.log_bytes = max(1, int(log_bytes))
        self.sink = sink
        self._context = context
        self._sndhwm = int(sndhwm)
        self._curve = curve
        self.endpoints = list(endpoints)
        self._bound: list[str] = []
        """Where the socket is bound (port 0 resolved), for a reset to bind the same again."""
        self.socket: zmq.Socket = self._open(self.endpoints)
        self._send = _raw_send(self.socket)
        self._packer = new_packer()
        self._plain_pack = msgpack.Packer(use_bin_type=True).pack
        self._seq = 0
        self._outbox: list[bytes] = []   # topic, payload, topic, payload, ... not yet sent
        self._published = 0
        self._dropped = 0
        self._sink_errors = 0
        self._heartbeats = 0
        self._execs: OrderedDict[str, _Execution] = OrderedDict()   # open order
        self._finished: OrderedDict[str, None] = OrderedDict()     # finish order
        self._log_total = 0
        self._log_size = 0           # payload bytes in the per-execution logs
        # The global ring holds payloads only (the same objects as the per-execution logs):
        # its seqs are contiguous, so ring[i] has seq _ring_first + i, and a topic is rebuilt
        # from its payload on replay (rare) rather than kept for every event (~150 B each).
        self._ring: deque[bytes] = deque()
        self._ring_first = 1
        self._ring_size = 0          # payload bytes in the global ring
        self._prefixes: Counter[bytes] = Counter()
        self.subscription_count = 0
        self._subscribed_bytes = 0
        self._bad_subscription_messages = 0
        self._refused_subscriptions = 0
        self._subscription_resets = 0
        self._closed = False

    # -- subscriptions -------------------------------------------------------------------
    def _open(self, endpoints: list[str]) -> zmq.Socket:
        sock = self._context.socket(zmq.XPUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self._sndhwm)
        # VERBOSER = every subscribe AND unsubscribe is passed up, so counts stay exact.
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)
        # Subscribers only send (un)subscribe messages: a bigger frame is garbage, and libzmq
        # drops the connection that sent it.
        sock.setsockopt(zmq.MAXMSGSIZE, 1 + MAX_PREFIX_BYTES)
        sock.setsockopt(zmq.RCVHWM, SUBSCRIPTION_RCVHWM)
        curve = self._curve
        if curve:
            if curve.get("domain"):
                sock.zap_domain = curve["domain"].encode()
            sock.curve_server = True
            sock.curve_secretkey = curve["secret"]
        bound = []
        try:
            for ep in endpoints:
                sock.bind(ep)
                bound.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        except Exception:
            sock.close(0)
            raise
        self._bound = bound
        return sock

    def on_readable(self) -> None:
        """Drain subscribe/unsubscribe messages from the XPUB socket (never blocks).

        May replace :attr:`socket` (see MAX_SUBSCRIPTIONS): a poller must re-register it.
        """
        recv = self.socket.recv
        while True:
            try:
                msg = recv(_NOBLOCK)
            except zmq.Again:
                return
            if not msg:
                self._bad_subscription_messages += 1
                continue
            prefix = msg[1:]
            if msg[0] == 1:
                if self.subscription_count >= MAX_SUBSCRIPTIONS or \
                        self._subscribed_bytes + len(prefix) > MAX_SUBSCRIBED_BYTES:
                    self._refused_subscriptions += 1
                    self._reset()
                    return
                self._prefixes[prefix] += 1
                self.subscription_count += 1
                self._subscribed_bytes += len(prefix)
            elif msg[0] == 0:
                if self._prefixes.get(prefix, 0) > 0:
                    self._prefixes[prefix] -= 1
                    if not self._prefixes[prefix]:
                        del self._prefixes[prefix]
                    self.subscription_count -= 1
                    self._subscribed_bytes -= len(prefix)
            else:
                self._bad_subscription_messages += 1

    def _reset(self) -> None:
        """Drop every subscriber connection (freeing libzmq's subscriptions) and bind anew."""
        self.flush()   # what is queued goes to the connections that subscribed to it
        self._subscription_resets += 1
        log.warning("event subscriptions over the limit (%d prefixes, %d bytes; limits %d, %d): dropping every "
                    "subscriber connection (they reconnect and repair the gap)", self.subscription_count,
                    self._subscribed_bytes, MAX_SUBSCRIPTIONS, MAX_SUBSCRIBED_BYTES)
        self.socket.close(0)
        self._prefixes.clear()
        self.subscription_count = 0
        self._subscribed_bytes = 0
        deadline = time.monotonic() + 5.0
        while True:  # the closed socket releases its TCP port asynchronously
            try:
                self.socket = self._open(self._bound)
                break
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self._send = _raw_send(self.socket)

    @property
    def subscriptions(self) -> dict[str, int]:
        """Active subscription prefixes and how many subscriptions each has."""
        return {k.decode("utf-8", "replace"): v for k, v in self._prefixes.items()}

    # -- executions ----------------------------------------------------------------------
    def open_execution(self, execution_id: str, workflow: str | None) -> None:
        """Start logging ``execution_id`` (again, when resumed: eseq and log are kept)."""
        ex = self._execs.get(execution_id)
        if ex is None:
            self._execs[execution_id] = _Execution(execution_id, workflow)
            return
        ex.workflow = workflow
        ex.finished_at = None
        self._finished.pop(execution_id, None)

    def close_execution(self, execution_id: str) -> None:
        ex = self._execs.get(execution_id)
        if ex is None or ex.finished_at is not None:
            return
        ex.finished_at = time.monotonic()
        self._finished[execution_id] = None

    def _auto_open(self, execution_id: str) -> _Execution:
        self.open_execution(execution_id, None)
        return self._execs[execution_id]

    def vseq(self, execution_id: str) -> int | None:
        """The eseq of the execution's latest snapshot change (0: none yet); None if unknown."""
        ex = self._execs.get(execution_id)
        return None if ex is None else ex.vseq

    # -- emission ------------------------------------------------------------------------
    def emit(self, type: str, execution_id: str | None = None, *, node_id: str | None = None,
             node_type: str | None = None, status: str | None = None, attempt: int | None = None,
             snapshot_change: bool = False, error: dict | None = None, meta: dict | None = None,
             worker_id: str | None = None) -> int:
        """Sequence, encode, log and queue one event for the next :meth:`flush`. Returns its
        ``seq``. Never blocks.

        ``snapshot_change``: this (``variable.changed``) event changes the execution's
        variables snapshot, so its ``vseq`` is its own ``eseq``; every other event of the
        execution carries the ``vseq`` of the latest such change (docs/events.md §1).
        Worker events take their id from ``worker_id`` or ``meta["worker_id"]``.
        """
        self._seq = seq = self._seq + 1
        if execution_id is not None:
            ex = self._execs.get(execution_id)
            if ex is None:
                ex = self._auto_open(execution_id)
            ex.eseq = eseq = ex.eseq + 1
            if snapshot_change:
                ex.vseq = eseq
            vseq = ex.vseq
            if node_id is None:
                topic = f"{type}/{execution_id}/".encode()
            else:
                topic = f"{type}/{execution_id}/{node_id}/".encode()
            workflow = ex.workflow
        else:
            ex = None
            eseq = vseq = None
            workflow = None
            if worker_id is None and meta:
                worker_id = meta.get("worker_id")
            if worker_id is not None:
                if meta is None:
                    meta = {"worker_id": worker_id}
                elif "worker_id" not in meta:
                    meta = {**meta, "worker_id": worker_id}
                topic = f"{type}/{worker_id}/".encode()
            else:
                topic = f"{type}/".encode()
        fields = {
            "v": WIRE_VERSION, "type": type, "ts": _now(), "epoch": self.epoch,
            "seq": seq, "eseq": eseq, "execution_id": execution_id, "workflow": workflow,
            "node_id": node_id, "node_type": node_type, "status": status, "attempt": attempt,
            "vseq": vseq, "error": error, "meta": meta if meta is not None else {},
        }
        try:   # the plain packer first: a ``default`` hook makes every call a third slower
            payload = self._plain_pack(fields)
        except (TypeError, ValueError, OverflowError):   # the codec's: the same bytes, any value
            payload = self._packer.pack(fields)
        outbox = self._outbox
        outbox += (topic, payload)
        if len(outbox) >= _OUTBOX_FRAMES:
            self.flush()
        size = len(payload)
        if ex is not None:
            ex.log.append(payload)
            self._log_total += 1
            self._log_size += size
            if self._log_total > self.log_capacity or self._log_size > self.log_bytes:
                self._evict()
        ring = self._ring
        ring.append(payload)
        self._ring_size += size
        if len(ring) > self.log_capacity or self._ring_size > self.log_bytes:
            self._trim_ring()
        if self.sink is not None:
            try:
                self.sink(execution_id, topic, payload)
            except Exception:
                self._sink_errors += 1
                log.exception("event sink failed for seq %d", seq)
        return seq

    def _trim_ring(self) -> None:
        ring = self._ring
        while len(ring) > self.log_capacity or (self._ring_size > self.log_bytes and len(ring) > 1):
            self._ring_size -= len(ring.popleft())
            self._ring_first += 1

    def flush(self) -> None:
        """Send every queued event, in emit order (never blocks: a full subscriber drops)."""
        sent = dropped = 0
        send = self._send
        outbox = self._outbox
        for i in range(0, len(outbox), 2):
            try:
                send(outbox[i], _SNDMORE_NOBLOCK)
                send(outbox[i + 1], _NOBLOCK)
                sent += 1
            except zmq.Again:
                dropped += 1
        outbox.clear()
        self._published += sent
        self._dropped += dropped

    def heartbeat(self) -> None:
        """Publish a heartbeat: latest ``seq`` plus each live/recent execution's latest eseq.

        Consumes no seq. Call it periodically (the coordinator uses 1 s).
        """
        now = time.monotonic()
        executions: dict[str, int] = {}
        stale: list[str] = []
        for eid, ex in self._execs.items():
            if ex.finished_at is None or now - ex.finished_at <= FINISHED_HEARTBEAT_SECONDS:
                executions[eid] = ex.eseq
            elif not ex.log:
                stale.append(eid)
        for eid in stale:   # finished, out of the heartbeat window and fully evicted
            del self._execs[eid]
            self._finished.pop(eid, None)
        oldest_seq = self.oldest_seq
        payload = self._plain_pack({   # plain values only
            "v": WIRE_VERSION, "type": HEARTBEAT, "ts": time.time(), "epoch": self.epoch,
            "seq": self._seq, "eseq": None, "execution_id": None, "workflow": None,
            "node_id": None, "node_type": None, "status": None, "attempt": None,
            "vseq": None, "error": None, "meta": {"executions": executions, "oldest_seq": oldest_seq},
        })
        self._heartbeats += 1
        self.flush()
        try:
            self._send(_HEARTBEAT_TOPIC, _SNDMORE_NOBLOCK)
            self._send(payload, _NOBLOCK)
        except zmq.Again:
            self._dropped += 1

    # -- bounded logs ----------------------------------------------------------------------
    def _evict(self) -> None:
        """Drop logged events until both bounds hold again: the oldest finished execution's
        oldest events first, then the oldest running execution's (never the newest event)."""
        while self._log_total > self.log_capacity or (self._log_size > self.log_bytes and self._log_total > 1):
            ex = self._eviction_victim()
            if ex is None:
                return
            self._log_size -= len(ex.log.popleft())
            ex.first_eseq += 1
            self._log_total -= 1

    def _eviction_victim(self) -> _Execution | None:
        while self._finished:
            eid = next(iter(self._finished))
            ex = self._execs.get(eid)
            if ex is not None and ex.log:
                return ex
            del self._finished[eid]
        for ex in self._execs.values():
            if ex.log:
                return ex
        return None

    # -- replay ----------------------------------------------------------------------------
    def has_execution(self, execution_id: str) -> bool:
        return execution_id in self._execs

    def oldest_eseq(self, execution_id: str) -> int | None:
        """Oldest eseq still in the log (``last_eseq + 1`` if all evicted); None if unknown."""
        ex = self._execs.get(execution_id)
        return None if ex is None else ex.first_eseq

    def last_eseq(self, execution_id: str) -> int | None:
        ex = self._execs.get(execution_id)
        return None if ex is None else ex.eseq

    def is_finished(self, execution_id: str) -> bool | None:
        ex = self._execs.get(execution_id)
        return None if ex is None else ex.finished_at is not None

    def replay(self, execution_id: str, from_eseq: int = 1, to_eseq: int | None = None,
               limit: int | None = None) -> list[bytes]:
        """Encoded payloads with ``from_eseq <= eseq <= to_eseq`` still in the log, in order.

        Starts at ``max(from_eseq, oldest_eseq)``: compare the first payload's eseq with
        ``from_eseq`` (or call :meth:`oldest_eseq`) to know what is gone.
        """
        ex = self._execs.get(execution_id)
        if ex is None:
            return []
        last = ex.eseq if to_eseq is None else min(int(to_eseq), ex.eseq)
        start = max(int(from_eseq), ex.first_eseq)
        if start > last:
            return []
        stop = last - ex.first_eseq + 1
        if limit is not None:
            stop = min(stop, start - ex.first_eseq + max(0, int(limit)))
        return list(itertools.islice(ex.log, start - ex.first_eseq, stop))

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def oldest_seq(self) -> int:
        return self._ring_first if self._ring else self._seq + 1

    def replay_seq(self, from_seq: int, limit: int | None = None) -> list[tuple[bytes, bytes]]:
        """``(topic, payload)`` for every event with ``seq >= from_seq`` in the global ring."""
        if not self._ring:
            return []
        first = self._ring_first
        start = max(int(from_seq), first) - first
        if start >= len(self._ring):
            return []
        stop = None if limit is None else start + max(0, int(limit))
        return [(_topic_of(p), p) for p in itertools.islice(self._ring, start, stop)]

    # -- bookkeeping -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "seq": self._seq,
            "published": self._published,
            "queued": len(self._outbox) // 2,
            "dropped": self._dropped,
            "subscriptions": self.subscription_count,
            "heartbeats": self._heartbeats,
            "log_events": self._log_total,
            "log_capacity": self.log_capacity,
            "log_bytes": self._log_size,
            "log_bytes_capacity": self.log_bytes,
            "ring_bytes": self._ring_size,
            "log_executions": len(self._execs),
            "ring_events": len(self._ring),
            "oldest_seq": self.oldest_seq,
            "sink_errors": self._sink_errors,
            "bad_subscription_messages": self._bad_subscription_messages,
            "subscribed_bytes": self._subscribed_bytes,
            "refused_subscriptions": self._refused_subscriptions,
            "subscription_resets": self._subscription_resets,
        }

    def close(self, linger_ms: int = 1000) -> None:
        """Send the queue, give it up to ``linger_ms`` to leave, then close the socket."""
        if self._closed:
            return
        self._closed = True
        self.flush()
        self.socket.close(linger=linger_ms)
