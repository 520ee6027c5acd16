"""The history writer: applies queued batches to SQLite, and runs as its own process for a file.

:class:`Writer` turns a batch of queued items (events as published, submissions) into rows,
one transaction per batch. A file-backed :class:`~goflow.history.store.Store` runs it in a
child process (``python -m goflow.history.writer PATH``, :func:`main`) so that decoding and
writing take neither the coordinator's GIL nor its core; an in-memory store (and a store
whose disk failed) runs it on a thread of the coordinator's process.

The child's contract:

* **Frames.** Each message either way is a 4-byte big-endian length and a msgpack body.
  In (stdin): ``[seq, items]``, one batch, applied as one transaction. Out (stdout), once
  per batch, after its commit: ``[seq, written, bad, submissions, seconds, None]``, or
  ``[seq, 0, 0, 0, seconds, problem]`` when the batch was dropped by a bug (it is
  reported, the writer goes on), or ``[seq, "failed", reason]`` when the file cannot be
  written: the batch was rolled back and the child exits; the store then writes that batch
  and the rest in memory.
* **It dies with its parent and never loses a committed batch.** End of input (the store
  closed it, or the coordinator died, even by SIGKILL) means: every complete batch read is
  committed, then the process exits. A partial frame is the dead parent's last write: it
  was never acknowledged, and is discarded. SIGINT, SIGTERM and SIGHUP are ignored (a
  terminal's Ctrl-C or hangup, or a service manager, reaches the whole process group; the
  coordinator drains the queue into this process before it exits, so this process must
  outlive it) from the process's first instruction on: the store starts it with
  :func:`goflow.supervisor.spawn_managed`, which ignores them before the interpreter imports
  anything (ignoring them only in :func:`main`, after the imports, let a Ctrl-C in the first
  fraction of a second kill the writer).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sqlite3
import sys
import time
import zlib
from typing import Any, Callable

import msgpack
from goflow.errors import ErrorKind
from goflow.history.schema import delete_executions, dumps as _dumps, loads as _loads, open_writer
from goflow.states import TERMINAL_EVENT_TYPES

log = logging.getLogger("goflow.history.writer")

IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals the writer process ignores (the module docstring says why)."""

NODE_ATTEMPT_END_TYPES = frozenset({"node.completed", "node.failed", "node.retrying", "node.cancelled"})
"""As in goflow.events.types (repeated so the store does not import pydantic)."""
INTERRUPTED_ERROR = {"type": ErrorKind.INTERRUPTED, "message": "the coordinator stopped while this attempt ran",
                     "node_id": None}
MEMORY_EXECUTIONS = 1000
CHUNK_COMPRESSION = 1
"""zlib level for event chunks: level 1 is within 6% of level 6's size here, 3x faster."""

EVENT = 0
"""Queued item kinds: ``(EVENT, execution_id, topic, payload, monotonic)``,"""
SUBMISSION = 1
"""``(SUBMISSION, execution_id, workflow_name, workflow_text, variables_json, ts, monotonic)``,"""
BARRIER = 2
"""``(BARRIER, execution_id, callback, monotonic)`` (never leaves the store's process)."""
FAILED = "failed"
_HEADER = 4

_CONTEXT_KEYS = ("loop", "index", "parallel", "branch")


def _context(meta: dict) -> str | None:
    ctx = {k: meta[k] for k in _CONTEXT_KEYS if meta.get(k) is not None}
    return _dumps(ctx) if ctx else None


# -- frames ----------------------------------------------------------------------------------
def write_frame(fd: int, message: Any) -> None:
    """Send one msgpack message (length-prefixed) on the file descriptor ``fd``, whole.

    Raw descriptors, not buffered files: a daemon thread blocked in a buffered file holds its
    lock, and an interpreter finalizing that file at exit aborts."""
    body = msgpack.packb(message, use_bin_type=True)
    data = memoryview(len(body).to_bytes(_HEADER, "big") + body)
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd: int, size: int) -> bytes | None:
    parts, missing = [], size
    while missing:
        part = os.read(fd, missing)
        if not part:
            return None
        parts.append(part)
        missing -= len(part)
    return b"".join(parts)


def read_frame(fd: int) -> Any:
    """The next message on ``fd``, or None at the end of the stream (a partial frame is an end too)."""
    header = _read_exactly(fd, _HEADER)
    if header is None:
        return None
    body = _read_exactly(fd, int.from_bytes(header, "big"))
    if body is None:
        return None
    return msgpack.unpackb(body, raw=False, use_list=True)


_ATTEMPT_INSERT = ("INSERT INTO node_executions (execution_id, node_id, node_type, attempt, status, worker, "
                   "inputs, output, error, started_at, finished_at, duration_s, context) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_STATUS, _WORKER, _OUTPUT, _ERROR, _STARTED_AT, _FINISHED_AT, _DURATION = 4, 5, 7, 8, 9, 10, 11
"""Column positions in an ``_ATTEMPT_INSERT`` row."""


class _BatchRows:
    """The ``node_executions`` and ``variable_changes`` rows one write batch adds.

    They are inserted with one ``executemany`` each when the batch ends (or before a statement
    that reads what they would change), in event order, so row ids and contents are those that
    one INSERT per event made. An attempt's end whose ``node.started`` is in the same batch
    completes the pending row, as the UPDATE would have (no statement at all).
    """

    def __init__(self) -> None:
        self.attempts: list[list] = []
        self.running: dict[tuple, list[int]] = {}
        """(execution, node, attempt, context) -> indexes of pending rows still 'running', oldest first."""
        self.changes: list[tuple] = []

    def started(self, row: list) -> None:
        key = (row[0], row[1], row[3], row[12])
        self.running.setdefault(key, []).append(len(self.attempts))
        self.attempts.append(row)

    def finish(self, key: tuple, status: str, worker: Any, output: Any, error: Any, ts: Any,
               duration: Any) -> bool:
        """Complete the newest pending running row of ``key``; False when there is none."""
        waiting = self.running.get(key)
        if not waiting:
            return False
        row = self.attempts[waiting.pop()]
        if not waiting:
            del self.running[key]
        row[_STATUS], row[_OUTPUT], row[_ERROR], row[_FINISHED_AT] = status, output, error, ts
        if worker is not None:
            row[_WORKER] = worker
        if duration is None and ts is not None and row[_STARTED_AT] is not None:
            duration = ts - row[_STARTED_AT]
        row[_DURATION] = duration
        return True

    def flush(self, conn: sqlite3.Connection) -> None:
        if self.attempts:
            conn.executemany(_ATTEMPT_INSERT, self.attempts)
            self.attempts.clear()
            self.running.clear()
        if self.changes:
            conn.executemany("INSERT INTO variable_changes (execution_id, seq, eseq, name, old, new, scope, "
                             "node_id, ts, execution_level) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", self.changes)
            self.changes.clear()



def _recorded_variables(conn: sqlite3.Connection, execution_id: str) -> dict[str, Any]:
    """The execution's variables as its recorded changes left them (every epoch, arrival order)."""
    variables: dict[str, Any] = {}
    for name, value in conn.execute("SELECT name, new FROM variable_changes WHERE execution_id = ? "
                                    "AND execution_level = 1 ORDER BY id", (execution_id,)):
        variables[name] = _loads(value)
    return variables


class Writer:
    """Applies batches to one writing connection (``memory``: an in-memory database, bounded
    to the last ``memory_events`` events and ``MEMORY_EXECUTIONS`` executions).

    :meth:`apply` raises ``sqlite3.Error``/``OSError`` when the database cannot be written
    (the batch's transaction is rolled back); it returns ``(written, bad, submissions)``.
    The state it keeps (known executions, running variables, the highest stored eseq) is
    what it has committed, so a batch replayed after a failure is applied exactly once.
    """

    def __init__(self, conn: sqlite3.Connection, *, memory_events: int | None = None):
        self.conn = conn
        self.memory_events = memory_events
        self._known: set[str] = set()
        self._snapshots: dict[str, dict[str, Any]] = {}
        """Running executions' variables, rebuilt from ``variable.changed``; written as
        ``variables_out`` by the terminal event (events carry no snapshot)."""
        self._last_eseq: dict[tuple[str, str | None], int] = {}
        """(execution, epoch) -> the highest eseq stored (committed state)."""
        self._counts = [0, 0, 0]

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass

    def apply(self, batch: list) -> tuple[int, int, int]:
        """Write ``batch`` (events and submissions, no barriers) in one transaction."""
        self._counts = [0, 0, 0]
        self._apply(self.conn, batch)
        if self.memory_events is not None:
            self._bound_memory(self.conn)
        written, bad, submissions = self._counts
        return written, bad, submissions

    def _apply(self, conn: sqlite3.Connection, batch: list) -> None:
        unpack = msgpack.unpackb
        stored: dict[tuple[str, str | None], int] = {}
        conn.execute("BEGIN")
        try:
            self._apply_batch(conn, batch, unpack, stored)
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        conn.execute("COMMIT")
        last = self._last_eseq
        if len(last) > 100_000:   # bounded; a forgotten key is looked up again
            last.clear()
        last.update(stored)

    def _stored_eseq(self, conn: sqlite3.Connection, key: tuple[str, str | None],
                     pending: dict[tuple[str, str | None], int]) -> int:
        """The highest eseq of ``key`` (execution, epoch) already stored or in this batch."""
        value = pending.get(key)
        if value is None:
            value = self._last_eseq.get(key)
        if value is None:
            row = conn.execute("SELECT MAX(last_eseq) FROM event_chunks WHERE execution_id = ? AND epoch IS ?",
                               key).fetchone()
            legacy = conn.execute("SELECT MAX(eseq) FROM events WHERE execution_id = ? AND epoch IS ?",
                                  key).fetchone()
            value = max(row[0] or 0, legacy[0] or 0)
            pending[key] = value
        return value

    def _apply_batch(self, conn: sqlite3.Connection, batch: list, unpack: Callable,
                     stored: dict[tuple[str, str | None], int]) -> None:
        rows = _BatchRows()
        touched: dict[str, list] = {}   # execution id -> [epoch, last eseq, events, workflow]: one UPDATE each
        chunks: dict[tuple[str, str | None], list] = {}   # (execution, epoch) -> its events, in order
        for item in batch:
            if item[0] == SUBMISSION:
                _, eid, name, text, variables_in, ts, _mono = item
                digest = hashlib.sha256(text.encode()).hexdigest() if text is not None else None
                conn.execute(
                    "INSERT INTO executions (id, workflow, workflow_hash, status, variables_in, "
                    "submitted_at) VALUES (?, ?, ?, 'submitted', ?, ?) ON CONFLICT(id) DO UPDATE SET "
                    "workflow = COALESCE(workflow, excluded.workflow), workflow_hash = excluded.workflow_hash, "
                    "variables_in = excluded.variables_in, submitted_at = excluded.submitted_at",
                    (eid, name, digest, variables_in, ts))
                if text is None:
                    conn.execute("DELETE FROM workflow_texts WHERE execution_id = ?", (eid,))
                else:
                    conn.execute("INSERT OR REPLACE INTO workflow_texts (execution_id, text) VALUES (?, ?)",
                                 (eid, text))
                self._known.add(eid)
                self._counts[2] += 1
                continue
            _, eid, topic, payload, _mono = item
            if eid is None:
                continue           # worker events and heartbeats are not execution history
            try:
                ev = unpack(payload, raw=False)
                etype = ev["type"]
            except Exception:
                self._counts[1] += 1
                continue
            epoch, eseq = ev.get("epoch"), ev.get("eseq")
            key = (eid, epoch)
            if isinstance(eseq, int):
                if eseq <= self._stored_eseq(conn, key, stored):
                    continue       # a duplicate (same execution, epoch, eseq): already applied
                stored[key] = eseq
            topic_text = topic.decode("utf-8", "replace") if isinstance(topic, (bytes, bytearray)) else str(topic)
            chunk = chunks.get(key)
            if chunk is None:
                chunks[key] = chunk = []
            chunk.append((topic_text, bytes(payload), eseq, etype, ev.get("node_id")))
            self._counts[0] += 1
            self._apply_event(conn, eid, etype, ev, rows)
            counters = touched.get(eid)
            if counters is None:
                touched[eid] = [epoch, eseq, 1, ev.get("workflow")]
            else:
                counters[0], counters[1], counters[2] = epoch, eseq, counters[2] + 1
        rows.flush(conn)
        if chunks:
            conn.executemany(
                "INSERT INTO event_chunks (execution_id, epoch, first_eseq, last_eseq, events, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(eid, epoch, events[0][2], events[-1][2], len(events),
                  zlib.compress(msgpack.packb(events, use_bin_type=True), CHUNK_COMPRESSION))
                 for (eid, epoch), events in chunks.items()])
        if touched:
            conn.executemany("UPDATE executions SET epoch = ?, last_eseq = ?, events = events + ?, "
                             "workflow = COALESCE(workflow, ?) WHERE id = ?",
                             [(*counters, eid) for eid, counters in touched.items()])

    def _apply_event(self, conn: sqlite3.Connection, eid: str, etype: str, ev: dict, rows: _BatchRows) -> None:
        ts = ev.get("ts")
        meta = ev.get("meta") or {}
        if eid not in self._known:
            conn.execute("INSERT OR IGNORE INTO executions (id, workflow, status, started_at, epoch) "
                         "VALUES (?, ?, 'running', ?, ?)", (eid, ev.get("workflow"), ts, ev.get("epoch")))
            if len(self._known) > 100_000:
                self._known.clear()
            self._known.add(eid)
        node_id = ev.get("node_id")
        if etype == "execution.started":
            # COALESCE: a resumed execution keeps its original start time
            conn.execute("UPDATE executions SET status = 'running', started_at = COALESCE(started_at, ?), "
                         "inputs = ? WHERE id = ?", (ts, _dumps(meta.get("inputs")), eid))
        elif etype == "execution.resumed":
            rows.flush(conn)
            conn.execute("UPDATE executions SET status = 'running', finished_at = NULL WHERE id = ?", (eid,))
            # attempts in flight when the previous coordinator stopped will never report
            conn.execute("UPDATE node_executions SET status = 'interrupted', finished_at = ?, error = ? "
                         "WHERE execution_id = ? AND status = 'running'",
                         (ts, _dumps(INTERRUPTED_ERROR), eid))
        elif etype in TERMINAL_EVENT_TYPES:
            status = ev.get("status") or etype.split(".", 1)[1]
            snapshot = self._snapshots.pop(eid, None)
            if snapshot is None:   # no change seen by this writer: e.g. failed as unresumable after a restart
                rows.flush(conn)
                snapshot = _recorded_variables(conn, eid)
            conn.execute("UPDATE executions SET status = ?, finished_at = ?, duration_s = ?, result = ?, "
                         "error = ?, variables_out = ? WHERE id = ?",
                         (status, ts, meta.get("duration_s"), _dumps(meta.get("result")), _dumps(ev.get("error")),
                          _dumps(snapshot), eid))
        elif etype == "node.started" and node_id is not None:
            rows.started([eid, node_id, ev.get("node_type"), ev.get("attempt") or 1, "running", None,
                          _dumps(meta.get("inputs")), None, None, ts, None, None, _context(meta)])
        elif etype == "node.completed" and node_id is not None and meta.get("resumed"):
            # a node restored from history after a restart: its real attempt is already stored
            rows.flush(conn)
            conn.execute("DELETE FROM node_executions WHERE id = (SELECT id FROM node_executions WHERE "
                         "execution_id = ? AND node_id = ? AND context IS ? AND status = 'running' "
                         "ORDER BY id DESC LIMIT 1)", (eid, node_id, _context(meta)))
        elif etype in NODE_ATTEMPT_END_TYPES and node_id is not None:
            status = {"node.completed": "completed", "node.cancelled": "cancelled"}.get(etype, "failed")
            output = None
            if etype == "node.completed":
                output = meta.get("output")
                if output is None:
                    output = meta.get("return", meta.get("result"))
            ctx = _context(meta)
            attempt = ev.get("attempt") or 1
            values = (status, meta.get("worker"), _dumps(output), _dumps(ev.get("error")), ts,
                      meta.get("duration_s"))
            if rows.finish((eid, node_id, attempt, ctx), *values):
                return   # its node.started is in this batch: the pending row is complete now
            # A pending row of this batch never matches here (none is running for this key), so
            # the UPDATE sees exactly the rows it would have seen.
            cur = conn.execute(
                "UPDATE node_executions SET status = ?, worker = COALESCE(?, worker), output = ?, error = ?, "
                "finished_at = ?, duration_s = COALESCE(?, ? - started_at) WHERE id = ("
                "SELECT id FROM node_executions WHERE execution_id = ? AND node_id = ? AND attempt = ? "
                "AND context IS ? AND status = 'running' ORDER BY id DESC LIMIT 1)",
                (*values[:5], values[5], ts, eid, node_id, attempt, ctx))
            if cur.rowcount == 0:   # its node.started is not in the store (e.g. dropped): keep the outcome
                rows.attempts.append([eid, node_id, ev.get("node_type"), attempt, status, values[1], None,
                                      values[2], values[3], None, ts, values[5], ctx])
        elif etype == "node.skipped" and node_id is not None:
            rows.attempts.append([eid, node_id, ev.get("node_type"), ev.get("attempt") or 1, "skipped", None, None,
                                  None, _dumps({"reason": meta.get("reason")}) if meta.get("reason") else None,
                                  ts, ts, 0, _context(meta)])
        elif etype == "variable.changed":
            execution_level = ev.get("vseq") == ev.get("eseq")   # it changed the execution's variables
            if execution_level:
                self._snapshots.setdefault(eid, {})[str(meta.get("name"))] = meta.get("value")
            rows.changes.append((eid, ev.get("seq"), ev.get("eseq"), str(meta.get("name")), _dumps(meta.get("old")),
                                 _dumps(meta.get("value")), meta.get("scope"), node_id, ts, int(execution_level)))

    def _bound_memory(self, conn: sqlite3.Connection) -> None:
        """In-memory mode: keep the last ``memory_events`` events and ``MEMORY_EXECUTIONS`` runs."""
        row = conn.execute("SELECT id FROM (SELECT id, SUM(events) OVER (ORDER BY id DESC) AS newer "
                           "FROM event_chunks) WHERE newer > ? ORDER BY id DESC LIMIT 1",
                           (self.memory_events,)).fetchone()
        if row is not None:
            conn.execute("DELETE FROM event_chunks WHERE id <= ?", (row[0],))
        count = conn.execute("SELECT COUNT(*) FROM executions").fetchone()[0]
        if count > MEMORY_EXECUTIONS:
            victims = [r[0] for r in conn.execute(
                "SELECT id FROM executions WHERE finished_at IS NOT NULL ORDER BY finished_at LIMIT ?",
                (count - MEMORY_EXECUTIONS,))]
            delete_executions(conn, victims)



# -- the writer process ----------------------------------------------------------------------
def serve(path: str, source: int, sink: int,
          on_connect: Callable[[sqlite3.Connection], None] | None = None) -> int:
    """Apply the batches read from the descriptor ``source`` to the file ``path``,
    acknowledging each on ``sink`` after its commit (module docstring). Returns the exit status.

    ``on_connect(conn)`` is called with the writing connection once it is open (tests slow
    the real writer's disk with a progress handler through it)."""
    try:
        conn = open_writer(path)
    except (sqlite3.Error, OSError) as exc:
        write_frame(sink, [0, FAILED, f"opening {path}: {type(exc).__name__}: {exc}"])
        return 1
    if on_connect is not None:
        on_connect(conn)
    writer = Writer(conn)
    try:
        while True:
            message = read_frame(source)
            if message is None:
                return 0
            seq, items = message
            started = time.monotonic()
            try:
                written, bad, submissions = writer.apply(items) if items else (0, 0, 0)
            except (sqlite3.Error, OSError) as exc:
                write_frame(sink, [seq, FAILED, f"writing {path}: {type(exc).__name__}: {exc}"])
                return 1
            except Exception:   # a bug: report the batch as dropped, keep writing the others
                log.exception("history: batch of %d dropped", len(items))
                write_frame(sink, [seq, 0, 0, 0, time.monotonic() - started,
                                   "a batch of events could not be written (see the log)"])
                continue
            write_frame(sink, [seq, written, bad, submissions, time.monotonic() - started, None])
    finally:
        writer.close()


def main(argv: list[str] | None = None,
         on_connect: Callable[[sqlite3.Connection], None] | None = None) -> int:
    """``python -m goflow.history.writer PATH``: the writer process of a file-backed store."""
    args = sys.argv[1:] if argv is None else argv
    for signum in IGNORED_SIGNALS:   # already so when the store started us; run by hand, from here
        signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="goflow-history-writer: %(message)s")
    try:
        return serve(args[0], 0, 1, on_connect)
    except BrokenPipeError:   # the store is gone and everything read is committed
        return 0


if __name__ == "__main__":
    sys.exit(main())
