"""Execution history in SQLite, built from the coordinator's published events.

The coordinator's :class:`~goflow.events.publisher.EventPublisher` calls
``sink(execution_id, topic, payload)`` for every event, on the reactor thread.
:meth:`Store.sink` only appends to an in-memory queue (it never blocks, never raises);
a writer thread decodes the events and writes them in batches (every ``flush_interval``
seconds or ``batch_size`` events, one transaction per batch) to a WAL-mode SQLite file.

Contracts (see ``docs/history.md``):

* **Nothing is dropped while the coordinator cooperates.** When more than
  ``high_watermark`` events wait, :meth:`backlogged` is True and the coordinator stops
  handing tasks to workers (the publisher is never slowed); the writer calls the relief
  callback once the queue is back under half of that. Only beyond ``queue_capacity``
  (a bound the coordinator's back-pressure keeps the queue far from) is an event dropped,
  and its execution is then marked history-incomplete.
* **Closing drains.** :meth:`close` returns once every queued item is written; the writer
  thread owns its connection and closes it itself, so no connection is closed under it.
* **Completion is reported after it is recorded.** :meth:`after_written` queues a barrier:
  its callback runs once everything queued before it is committed, with the execution's
  :meth:`history_problem` (None when its history is complete in the file).
* **A failing disk is reported, never raised.** When the file cannot be written (disk full,
  read-only path, ...) the failure is reported once (``store.healthy`` False,
  ``store.last_error``, one log record), recent history continues in an in-memory
  database, every execution with events since then is history-incomplete, and a small
  marker file next to the database (``<db>.state``, overwritten in place so it needs no
  new disk space) says so to the next coordinator (:attr:`previous_failure`), whose
  recovery must then not resume what this one may have run unrecorded.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import msgpack
from goflow.redaction import SECRET_MASK
from goflow.states import TERMINAL_EVENT_TYPES, TERMINAL_STATUSES

log = logging.getLogger("goflow.history.store")

NODE_ATTEMPT_END_TYPES = frozenset({"node.completed", "node.failed", "node.retrying", "node.cancelled"})
"""As in goflow.events.types (repeated so the store does not import pydantic)."""
INTERRUPTED_ERROR = {"type": "interrupted", "message": "the coordinator stopped while this attempt ran",
                     "node_id": None}

DEFAULT_QUEUE_CAPACITY = 200_000
DEFAULT_HIGH_WATERMARK = 20_000
DEFAULT_BATCH_SIZE = 2000
DEFAULT_FLUSH_INTERVAL = 0.05
DEFAULT_MEMORY_EVENTS = 50_000
MEMORY_EXECUTIONS = 1000

_SUBMISSION = 1
_EVENT = 0
_BARRIER = 2
STATE_SIZE = 512
"""Bytes of the ``<db>.state`` marker; always rewritten whole, in place."""
_memory_ids = itertools.count(1)
CHUNK_COMPRESSION = 1
"""zlib level for event chunks: level 1 is within 6% of level 6's size here, 3x faster."""


class HistoryError(Exception):
    """A query could not be answered (unknown or ambiguous id, ...)."""


class NotFound(HistoryError):
    pass


class AmbiguousId(HistoryError):
    def __init__(self, prefix: str, candidates: list[str]):
        self.prefix = prefix
        self.candidates = candidates
        super().__init__(f"execution id prefix {prefix!r} is ambiguous: it matches "
                         + ", ".join(candidates[:10]) + (" ..." if len(candidates) > 10 else ""))


# -- paths -----------------------------------------------------------------------------------
def default_db_path() -> Path:
    """``$GOFLOW_HOME/history.db``, else ``$XDG_DATA_HOME/goflow/history.db``,
    else ``~/.local/share/goflow/history.db``."""
    home = os.environ.get("GOFLOW_HOME")
    if home:
        return Path(home).expanduser() / "history.db"
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "goflow" / "history.db"


# -- schema ----------------------------------------------------------------------------------
MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE executions (
    id            TEXT PRIMARY KEY,
    workflow      TEXT,
    workflow_hash TEXT,              -- sha256 of workflow_text
    workflow_text TEXT,              -- as submitted (YAML), for crash recovery and `goflow execution`
    status        TEXT NOT NULL,     -- submitted, running, completed, failed, cancelled, timed_out
    variables_in  TEXT,              -- JSON: the variables supplied at submit (secrets '***')
    inputs        TEXT,              -- JSON: execution.started meta.inputs (defaults included, bounded)
    variables_out TEXT,              -- JSON: the terminal event's variables snapshot (bounded, redacted)
    result        TEXT,              -- JSON: execution.completed meta.result
    error         TEXT,              -- JSON: {type, message, node_id, ...}
    submitted_at  REAL,
    started_at    REAL,
    finished_at   REAL,
    duration_s    REAL,
    epoch         TEXT,              -- coordinator incarnation of the latest event
    last_eseq     INTEGER,
    events        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX executions_started_at ON executions(started_at);
CREATE INDEX executions_workflow ON executions(workflow, started_at);
CREATE INDEX executions_status ON executions(status, started_at);
CREATE INDEX executions_finished_at ON executions(finished_at);

CREATE TABLE node_executions (     -- one row per attempt
    id           INTEGER PRIMARY KEY,
    execution_id TEXT NOT NULL,
    node_id      TEXT NOT NULL,
    node_type    TEXT,
    attempt      INTEGER NOT NULL,
    status       TEXT NOT NULL,     -- running, completed, failed, skipped
    worker       TEXT,
    inputs       TEXT,              -- JSON; only when node.started carries meta.inputs
    output       TEXT,              -- JSON (bounded like every event value)
    error        TEXT,              -- JSON
    started_at   REAL,
    finished_at  REAL,
    duration_s   REAL,
    context      TEXT               -- JSON {loop, index} / {parallel, branch}; NULL in the main graph
);
CREATE INDEX node_executions_run ON node_executions(execution_id, node_id, attempt);

CREATE TABLE variable_changes (
    id           INTEGER PRIMARY KEY,
    execution_id TEXT NOT NULL,
    seq          INTEGER,           -- the event's publisher-wide seq
    eseq         INTEGER,           -- the event's per-execution seq
    name         TEXT NOT NULL,
    old          TEXT,              -- JSON
    new          TEXT,              -- JSON
    scope        TEXT,
    node_id      TEXT,
    ts           REAL
);
CREATE INDEX variable_changes_execution ON variable_changes(execution_id, id);

CREATE TABLE events (
    id           INTEGER PRIMARY KEY,   -- arrival order
    execution_id TEXT NOT NULL,
    epoch        TEXT,
    eseq         INTEGER,
    seq          INTEGER,
    type         TEXT NOT NULL,
    node_id      TEXT,
    ts           REAL,
    topic        TEXT NOT NULL,
    payload      BLOB NOT NULL,         -- exactly as published
    UNIQUE (execution_id, epoch, eseq)
);
"""),
    (2, """
-- Events are stored in chunks: all of one execution's events of one write batch, compressed
-- together (similar msgpack payloads compress about 12x). Rows of the v1 ``events`` table
-- (files written before) are still read, before the chunks.
CREATE TABLE event_chunks (
    id           INTEGER PRIMARY KEY,   -- arrival order
    execution_id TEXT NOT NULL,
    epoch        TEXT,
    first_eseq   INTEGER,
    last_eseq    INTEGER,
    events       INTEGER NOT NULL,
    data         BLOB NOT NULL          -- zlib(msgpack([[topic, payload, eseq, type, node_id], ...]))
);
CREATE INDEX event_chunks_execution ON event_chunks(execution_id, epoch, last_eseq);
"""),
    (3, """
-- The submitted text gets a table of its own: SQLite rewrites a whole row on UPDATE, and the
-- writer updates an execution's counters once per batch, so a 10 MB workflow in its row cost
-- 10 MB of page writes per batch. ``executions.workflow_text`` stays, always NULL (SQLite
-- before 3.35 cannot drop a column).
CREATE TABLE workflow_texts (
    execution_id TEXT PRIMARY KEY,
    text         TEXT NOT NULL
);
INSERT INTO workflow_texts (execution_id, text)
    SELECT id, workflow_text FROM executions WHERE workflow_text IS NOT NULL;
UPDATE executions SET workflow_text = NULL WHERE workflow_text IS NOT NULL;
"""),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def schema_version(conn: sqlite3.Connection) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at REAL)")
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection, migrations: list[tuple[int, str]] | None = None) -> int:
    """Apply the missing migration steps in order (each in its own transaction). Returns the version."""
    steps = MIGRATIONS if migrations is None else migrations
    current = schema_version(conn)
    for version, script in steps:
        if version <= current:
            continue
        # executescript commits first; wrap each step so a failure leaves the previous version.
        conn.executescript(f"BEGIN;\n{script}\nINSERT INTO schema_version VALUES ({int(version)}, {time.time()!r});\n"
                           f"COMMIT;")
        current = version
    return current


def create_private(path: Path) -> None:
    """Create ``path``'s directory (0700) and the empty file (0600) unless they exist.

    An existing directory or file keeps its mode (the operator chose it). SQLite gives its
    ``-wal`` and ``-shm`` files the database file's mode.
    """
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
        os.chmod(parent, 0o700)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


class StateMarker:
    """``<db>.state``: one fixed-size record saying whether the last writer failed.

    The record is rewritten in place at offset 0 (``os.pwrite`` of ``STATE_SIZE`` bytes
    into a file already that long), so marking a failure needs no new space on a full disk.
    ``failure`` is the reason a previous store recorded, or None.
    """

    def __init__(self, path: Path):
        self.path = path
        self.failure: str | None = None
        self._fd: int | None = None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            log.debug("history state marker %s unavailable: %s", path, exc)
            self._read_only()
            return
        self._fd = fd
        self.failure = self._parse(os.pread(fd, STATE_SIZE, 0))
        if os.fstat(fd).st_size < STATE_SIZE:
            self._write("failed " + self.failure if self.failure else "ok")

    def _read_only(self) -> None:
        try:
            self.failure = self._parse(self.path.read_bytes()[:STATE_SIZE])
        except OSError:
            pass

    @staticmethod
    def _parse(data: bytes) -> str | None:
        text = data.rstrip(b"\0 \n").decode("utf-8", "replace")
        return text[len("failed "):] if text.startswith("failed ") else None

    def _write(self, text: str) -> bool:
        if self._fd is None:
            return False
        data = text.encode("utf-8")[:STATE_SIZE - 1] + b"\n"
        try:
            os.pwrite(self._fd, data.ljust(STATE_SIZE, b"\0"), 0)
            os.fsync(self._fd)
            return True
        except OSError as exc:
            log.error("history state marker %s cannot be written: %s", self.path, exc)
            return False

    def mark_failed(self, reason: str) -> bool:
        """Record that history written from now on is not in the file."""
        return self._write(f"failed {time.strftime('%Y-%m-%dT%H:%M:%S')} {reason}")

    def clear(self) -> bool:
        """The previous failure has been dealt with (its executions are settled in the file)."""
        if self._write("ok"):
            self.failure = None
            return True
        return False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _connect(target: str, *, uri: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(target, uri=uri, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


# -- value helpers ---------------------------------------------------------------------------
def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        import base64

        return {"$base64": base64.b64encode(bytes(obj)).decode()}
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    return str(obj)


_ENCODE = json.JSONEncoder(default=_json_default, ensure_ascii=False, separators=(",", ":")).encode
try:   # the C encoder built once: JSONEncoder.encode builds one per call, ~3 us of the writer's time each
    from json.encoder import c_make_encoder as _c_make_encoder, encode_basestring as _encode_str

    _C_ENCODE = _c_make_encoder(None, _json_default, _encode_str, None, ":", ",", False, False, True)
except (ImportError, TypeError):  # pragma: no cover - a Python without the C accelerator
    _C_ENCODE = None
_SCALAR_JSON: dict[type, Callable[[Any], str]] = {int: int.__repr__, bool: lambda v: "true" if v else "false",
                                                  **({str: _encode_str} if _C_ENCODE is not None else {})}


def _dumps(value: Any) -> str | None:
    """``value`` as compact JSON (what ``_ENCODE`` makes, byte for byte; values decoded from
    msgpack hold no cycles, so the C encoder runs without the circular-reference markers)."""
    if value is None:
        return None
    scalar = _SCALAR_JSON.get(type(value))
    if scalar is not None:
        return scalar(value)
    if _C_ENCODE is not None:
        return "".join(_C_ENCODE(value, 0))
    return _ENCODE(value)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


_CONTEXT_KEYS = ("loop", "index", "parallel", "branch")


def _context(meta: dict) -> str | None:
    ctx = {k: meta[k] for k in _CONTEXT_KEYS if meta.get(k) is not None}
    return _dumps(ctx) if ctx else None


def workflow_source(workflow: Any) -> str:
    """Text for a workflow object whose YAML is unknown: its model as JSON (valid YAML)."""
    if isinstance(workflow, str):
        return workflow
    source_text = getattr(workflow, "source_text", None)
    return source_text() if source_text is not None else str(workflow)


def _since_to_ts(since: Any) -> float | None:
    if since is None:
        return None
    if isinstance(since, _dt.datetime):
        return since.timestamp()
    if isinstance(since, _dt.timedelta):
        return time.time() - since.total_seconds()
    return time.time() - float(since)


def parse_since(text: str) -> float:
    """``30s``/``15m``/``24h``/``7d``/``2w`` (ago) or an ISO date/time -> unix time."""
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    if text and text[-1] in units:
        try:
            return time.time() - float(text[:-1]) * units[text[-1]]
        except ValueError:
            pass
    try:
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: use 30m, 24h, 7d or an ISO date like 2024-05-01T12:00") from None
    return moment.timestamp()


@dataclass
class Unfinished:
    """An execution without a terminal event (what crash recovery needs)."""

    id: str
    workflow: str | None
    workflow_text: str | None
    variables_in: dict | None
    completed: dict[str, Any]      # main-graph node id -> output (bounded; may be an $omitted marker)
    epoch: str | None
    last_eseq: int | None


# -- the store -------------------------------------------------------------------------------
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
                             "node_id, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", self.changes)
            self.changes.clear()


class Store:
    """SQLite execution history fed by :meth:`sink` (see module docstring).

    ``path``: the database file (default :func:`default_db_path`; ``":memory:"`` for a
    private in-memory history). ``start=False`` skips the writer thread (read-only use,
    e.g. the CLI; calling :meth:`sink` then only queues). ``high_watermark``: queued
    events above which :meth:`backlogged` asks the coordinator to hold dispatch.
    ``queue_capacity``: the hard bound beyond which events are dropped (and their
    executions marked history-incomplete).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, queue_capacity: int = DEFAULT_QUEUE_CAPACITY,
                 high_watermark: int = DEFAULT_HIGH_WATERMARK,
                 batch_size: int = DEFAULT_BATCH_SIZE, flush_interval: float = DEFAULT_FLUSH_INTERVAL,
                 memory_events: int = DEFAULT_MEMORY_EVENTS, start: bool = True, readonly: bool = False):
        self.path = str(path) if path is not None else str(default_db_path())
        self.queue_capacity = max(1, int(queue_capacity))
        self.high_watermark = max(1, min(int(high_watermark), self.queue_capacity))
        self.batch_size = max(1, int(batch_size))
        self.flush_interval = float(flush_interval)
        self.memory_events = max(1, int(memory_events))
        self.readonly = readonly
        self.healthy = True
        self.last_error: str | None = None
        self.in_memory = False
        self.dropped_from_history = 0
        self.max_queue_depth = 0
        self.stats = {"events_written": 0, "batches": 0, "bad_events": 0, "submissions": 0,
                      "dropped_from_history": 0, "last_batch_lag_s": 0.0, "write_seconds": 0.0,
                      "backlogged": 0}
        self._queue: deque = deque()
        self._wake = threading.Event()
        self._closing = False
        self._closed = False
        self._warned_full = False
        self._pressure = False
        self._relief: Callable[[], None] | None = None
        self._incomplete: dict[str, str] = {}
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._target, self._uri = self.path, False
        self._writer: sqlite3.Connection | None = None
        self._known: set[str] = set()
        self._snapshots: dict[str, dict[str, Any]] = {}
        """Running executions' variables, rebuilt from ``variable.changed`` (writer thread only);
        written as ``variables_out`` by the terminal event (events carry no snapshot)."""
        self._last_eseq: dict[tuple[str, str | None], int] = {}
        """(execution, epoch) -> the highest eseq stored (writer thread only; committed state)."""
        self._thread: threading.Thread | None = None
        self._marker: StateMarker | None = None
        if self.path == ":memory:":
            self._use_memory(reason=None)
        elif readonly:
            if not Path(self.path).exists():
                raise NotFound(f"no history database at {self.path}")
            try:   # bring an older file up to date; harmless when it is current or not writable
                conn = _connect(self.path)
                try:
                    migrate(conn)
                finally:
                    conn.close()
            except sqlite3.Error as exc:
                log.debug("history store %s: not migrated: %s", self.path, exc)
        else:
            try:
                create_private(Path(self.path))
                self._marker = StateMarker(Path(self.path + ".state"))
                self._writer = self._open_writer(self.path, uri=False)
            except (OSError, sqlite3.Error) as exc:
                if self._marker is None:
                    self._marker = StateMarker(Path(self.path + ".state"))
                self._degrade(exc, during="opening")
        if start and not readonly:
            self._thread = threading.Thread(target=self._run, name="goflow-history", daemon=True)
            self._thread.start()

    @property
    def previous_failure(self) -> str | None:
        """Why a previous writer of this file could not record everything (None: it could)."""
        return self._marker.failure if self._marker is not None else None

    def clear_previous_failure(self) -> bool:
        """Forget :attr:`previous_failure` once recovery has settled its executions in the file."""
        return self._marker.clear() if self._marker is not None and self.healthy else False

    # -- connections ---------------------------------------------------------------------
    def _open_writer(self, target: str, *, uri: bool) -> sqlite3.Connection:
        conn = _connect(target, uri=uri)
        try:
            if not uri:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    log.warning("history store %s: journal_mode is %s, not WAL", target, mode)
                conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = OFF")
            migrate(conn)
            if not uri:   # prove the file is writable now (a read-only one may open quietly)
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("UPDATE schema_version SET applied_at = applied_at "
                             "WHERE version = (SELECT MAX(version) FROM schema_version)")
                conn.execute("COMMIT")
        except Exception:
            conn.close()
            raise
        return conn

    def _use_memory(self, reason: str | None) -> None:
        self._target = f"file:goflow-history-{os.getpid()}-{next(_memory_ids)}?mode=memory&cache=shared"
        self._uri = True
        self.in_memory = True
        self._writer = self._open_writer(self._target, uri=True)
        self._drop_readers()

    def _drop_readers(self) -> None:
        with self._readers_lock:
            readers, self._readers = self._readers, []
        self._local = threading.local()
        for conn in readers:
            try:
                conn.close()
            except Exception:
                pass

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "target", None) != self._target:
            if self._closed:
                raise HistoryError("the history store is closed")
            conn = _connect(self._target, uri=self._uri)
            conn.row_factory = sqlite3.Row
            if self.in_memory:   # shared-cache tables lock readers out of a writing transaction otherwise
                conn.execute("PRAGMA read_uncommitted = 1")
            self._local.conn = conn
            self._local.target = self._target
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _degrade(self, exc: BaseException, *, during: str) -> None:
        """Report a write failure once and continue with in-memory history."""
        if self.in_memory:
            # Even the in-memory database failed (out of memory?): keep counting, never raise.
            self.last_error = f"{during}: {exc}"
            return
        self.healthy = False
        self.last_error = f"{during} {self.path}: {type(exc).__name__}: {exc}"
        log.error("history store failed (%s); keeping recent history in memory from now on", self.last_error)
        if self._marker is not None and during != "opening":
            # (failing to open, this store records nothing and recovery resumes nothing:
            # no history can go missing, so there is no failure to hand on)
            self._marker.mark_failed(self.last_error)
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:
                pass
        self._writer = None
        self._known.clear()
        self._snapshots.clear()
        self._last_eseq.clear()
        try:
            self._use_memory(reason=self.last_error)
        except Exception as exc2:  # pragma: no cover - sqlite without memory databases?
            log.error("history store: in-memory fallback failed too: %s", exc2)

    # -- feeding (any thread; the reactor calls sink) -------------------------------------
    def sink(self, execution_id: str | None, topic: bytes, payload: bytes) -> None:
        """Queue one published event. O(1), never blocks, never raises."""
        try:
            q = self._queue
            depth = len(q)
            if depth > self.max_queue_depth:
                self.max_queue_depth = depth
            if depth >= self.queue_capacity:
                self.dropped_from_history += 1
                if execution_id is not None:
                    self._mark_incomplete(execution_id, f"{self.dropped_from_history} event(s) dropped: the history "
                                                        f"queue was full ({self.queue_capacity} events)")
                if not self._warned_full:
                    self._warned_full = True
                    log.warning("history queue full (%d events): events are dropped from history",
                                self.queue_capacity)
                return
            q.append((_EVENT, execution_id, topic, payload, time.monotonic()))
            if len(q) % self.batch_size == 0:
                self._wake.set()
        except Exception:  # pragma: no cover - never into the reactor
            pass

    def record_submission(self, execution_id: str, workflow_name: str | None, workflow_text: Any,
                          variables: dict | None, *, secrets: Iterable[str] = ()) -> None:
        """Remember what was submitted (workflow text + sha256, supplied variables).

        ``workflow_text`` may be the YAML text or a workflow model (stored as JSON).
        Variables named in ``secrets`` are stored as ``"***"``. Queued like events (never
        blocks, never raises, not subject to the queue cap).
        """
        try:
            text = workflow_source(workflow_text) if workflow_text is not None else None
            secret_set = frozenset(secrets)
            redacted = {k: (SECRET_MASK if k in secret_set else v) for k, v in (variables or {}).items()}
            self._queue.append((_SUBMISSION, execution_id, workflow_name, text, redacted, time.time(),
                                time.monotonic()))
        except Exception:
            log.exception("history: cannot record the submission of %s", execution_id)

    def after_written(self, execution_id: str, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(problem)`` once everything queued so far is committed.

        ``problem`` is :meth:`history_problem` for ``execution_id`` at that moment: None when
        its history is complete in the file. Runs on the writer thread (or at once, on the
        caller's, when there is no writer); not subject to the queue cap. The callback
        must be quick and must not raise.
        """
        if self._thread is None or self._closed:
            self._call_barrier(execution_id, callback)
            return
        self._queue.append((_BARRIER, execution_id, callback, time.monotonic()))
        self._wake.set()

    def history_problem(self, execution_id: str) -> str | None:
        """Why ``execution_id``'s history in the file is incomplete, or None."""
        return self._incomplete.get(execution_id)

    def _mark_incomplete(self, execution_id: str, reason: str) -> None:
        incomplete = self._incomplete
        if execution_id not in incomplete:
            if len(incomplete) >= 100_000:   # bounded: the oldest reasons go first
                del incomplete[next(iter(incomplete))]
            incomplete[execution_id] = reason

    def _call_barrier(self, execution_id: str, callback: Callable[[str | None], None]) -> None:
        try:
            callback(self.history_problem(execution_id))
        except Exception:
            log.exception("history: after_written callback failed")

    # -- back-pressure -----------------------------------------------------------------------
    def backlogged(self) -> bool:
        """True while more than ``high_watermark`` events wait: hold dispatch until relief.

        Cheap (a length check): the coordinator asks before handing out tasks.
        """
        if len(self._queue) < self.high_watermark or self._closed:
            return False
        if not self._pressure:
            self._pressure = True
            self.stats["backlogged"] += 1
        self._wake.set()
        return True

    def set_relief(self, callback: Callable[[], None] | None) -> None:
        """``callback()`` (writer thread) when the queue falls under half the high watermark
        after :meth:`backlogged` said True. It must be quick (e.g. ``call_soon`` a pump)."""
        self._relief = callback

    def _relieve(self) -> None:
        if self._pressure and len(self._queue) <= self.high_watermark // 2:
            self._pressure = False
            relief = self._relief
            if relief is not None:
                try:
                    relief()
                except Exception:
                    log.exception("history: relief callback failed")

    # -- the writer thread -----------------------------------------------------------------
    def _run(self) -> None:
        q = self._queue
        try:
            while True:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                while q:
                    batch = []
                    popleft = q.popleft
                    try:
                        for _ in range(self.batch_size):
                            batch.append(popleft())
                            if batch[-1][0] == _BARRIER:
                                break
                    except IndexError:
                        pass
                    self._write(batch)
                    self._relieve()
                self._relieve()   # also when the reactor asked after this thread emptied the queue
                if self._closing and not q:
                    return
        finally:   # the writer connection belongs to this thread: nobody closes it under us
            self._close_writer()

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass

    def _write(self, batch: list) -> None:
        barrier = batch[-1] if batch[-1][0] == _BARRIER else None
        if barrier is not None:
            batch.pop()
        if batch and self._writer is not None:
            started = time.monotonic()
            self._write_batch(batch)
            self.stats["write_seconds"] += time.monotonic() - started
        if barrier is not None:
            self._call_barrier(barrier[1], barrier[2])

    def _write_batch(self, batch: list) -> None:
        try:
            self._apply(self._writer, batch)
        except (sqlite3.Error, OSError) as exc:
            self._degrade(exc, during="writing")
            if self._writer is not None:
                try:
                    self._apply(self._writer, batch)
                except Exception as exc2:
                    self.last_error = f"in-memory history: {exc2}"
                    log.exception("history: in-memory write failed")
        except Exception:  # a bug: never kill the writer thread
            log.exception("history: batch of %d dropped", len(batch))
            self._mark_batch(batch, "a batch of events could not be written (see the log)")
            return
        if not self.healthy:
            self._mark_batch(batch, f"history is not written to the file since: {self.last_error}")
        self.stats["batches"] += 1
        self.stats["last_batch_lag_s"] = time.monotonic() - batch[0][-1]
        if self.in_memory and self._writer is not None:
            self._bound_memory(self._writer)

    def _mark_batch(self, batch: list, reason: str) -> None:
        for item in batch:
            if item[1] is not None:
                self._mark_incomplete(item[1], reason)

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
            if item[0] == _SUBMISSION:
                _, eid, name, text, variables_in, ts, _mono = item
                digest = hashlib.sha256(text.encode()).hexdigest() if text is not None else None
                conn.execute(
                    "INSERT INTO executions (id, workflow, workflow_hash, status, variables_in, "
                    "submitted_at) VALUES (?, ?, ?, 'submitted', ?, ?) ON CONFLICT(id) DO UPDATE SET "
                    "workflow = COALESCE(workflow, excluded.workflow), workflow_hash = excluded.workflow_hash, "
                    "variables_in = excluded.variables_in, submitted_at = excluded.submitted_at",
                    (eid, name, digest, _dumps(variables_in), ts))
                if text is None:
                    conn.execute("DELETE FROM workflow_texts WHERE execution_id = ?", (eid,))
                else:
                    conn.execute("INSERT OR REPLACE INTO workflow_texts (execution_id, text) VALUES (?, ?)",
                                 (eid, text))
                self._known.add(eid)
                self.stats["submissions"] += 1
                continue
            _, eid, topic, payload, _mono = item
            if eid is None:
                continue           # worker events and heartbeats are not execution history
            try:
                ev = unpack(payload, raw=False)
                etype = ev["type"]
            except Exception:
                self.stats["bad_events"] += 1
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
            self.stats["events_written"] += 1
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
            conn.execute("UPDATE executions SET status = ?, finished_at = ?, duration_s = ?, result = ?, "
                         "error = ?, variables_out = ? WHERE id = ?",
                         (status, ts, meta.get("duration_s"), _dumps(meta.get("result")), _dumps(ev.get("error")),
                          _dumps(self._snapshots.pop(eid, {})), eid))
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
            if ev.get("vseq") == ev.get("eseq"):   # it changed the execution's variables
                self._snapshots.setdefault(eid, {})[str(meta.get("name"))] = meta.get("value")
            rows.changes.append((eid, ev.get("seq"), ev.get("eseq"), str(meta.get("name")), _dumps(meta.get("old")),
                                 _dumps(meta.get("value")), meta.get("scope"), node_id, ts))

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
            self._delete(conn, victims)

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def write_lag(self) -> float:
        """Seconds the oldest queued event has been waiting (0 when the queue is empty)."""
        try:
            return max(0.0, time.monotonic() - self._queue[0][-1])
        except IndexError:
            return 0.0

    def gauges(self) -> dict[str, float]:
        """Scrape-time values for :class:`goflow.observability.metrics.Metrics` (``set_gauge_source``)."""
        return {"store_queue_depth": len(self._queue), "store_write_lag_seconds": self.write_lag(),
                "store_dropped_events": self.dropped_from_history, "store_healthy": 1.0 if self.healthy else 0.0,
                "store_events_written": self.stats["events_written"]}

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is written (True) or ``timeout`` passes (False)."""
        if self._thread is None or not self._thread.is_alive():
            return not self._queue
        written = threading.Event()
        self.after_written("", lambda problem: written.set())
        return written.wait(timeout)

    def close(self) -> None:
        """Write everything queued, stop the writer and close every connection.

        Waits as long as the writer needs: it always finishes, since each batch is either
        committed or, when the disk fails, kept in memory (progress is logged every 10 s).
        The writer thread closes its own connection; a store without a writer thread
        (``start=False``) discards what was queued.
        """
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            while True:
                thread.join(10.0)
                if not thread.is_alive():
                    break
                log.warning("history store: still writing at close, %d item(s) queued", len(self._queue))
                self._wake.set()
        else:
            self._close_writer()
        self.stats["dropped_from_history"] = self.dropped_from_history
        self._closed = True
        self._drop_readers()
        if self._marker is not None:
            self._marker.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- queries (any thread) ----------------------------------------------------------------
    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        return self._reader().execute(sql, tuple(params)).fetchall()

    @staticmethod
    def _execution_row(row: sqlite3.Row, full: bool = False) -> dict[str, Any]:
        d = dict(row)
        for key in ("variables_in", "inputs", "variables_out", "result", "error"):
            if key in d:
                d[key] = _loads(d[key])
        if d.get("duration_s") is None and d.get("finished_at") and d.get("started_at"):
            d["duration_s"] = d["finished_at"] - d["started_at"]
        if not full:
            d.pop("workflow_text", None)
        return d

    def list_executions(self, workflow: str | None = None, status: str | None = None, since: Any = None,
                        limit: int | None = 50) -> list[dict[str, Any]]:
        """Newest first. ``since``: seconds ago, a timedelta or a datetime."""
        where, params = [], []
        if workflow:
            where.append("workflow = ?")
            params.append(workflow)
        if status:
            where.append("status = ?")
            params.append(status)
        cutoff = _since_to_ts(since)
        if cutoff is not None:
            where.append("COALESCE(started_at, submitted_at) >= ?")
            params.append(cutoff)
        sql = ("SELECT id, workflow, workflow_hash, status, submitted_at, started_at, finished_at, duration_s, "
               "error, epoch, last_eseq, events FROM executions")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY COALESCE(started_at, submitted_at) DESC, id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [self._execution_row(r) for r in self._query(sql, params)]

    def resolve_id(self, id_or_prefix: str) -> str:
        """The full execution id for an id or an unambiguous prefix of >= 4 characters."""
        rows = self._query("SELECT id FROM executions WHERE id = ?", (id_or_prefix,))
        if rows:
            return rows[0][0]
        if len(id_or_prefix) < 4:
            raise NotFound(f"no execution {id_or_prefix!r} (a prefix needs at least 4 characters)")
        rows = self._query("SELECT id FROM executions WHERE id >= ? AND id < ? ORDER BY id LIMIT 51",
                           (id_or_prefix, id_or_prefix + "\U0010ffff"))
        ids = [r[0] for r in rows]
        if not ids:
            raise NotFound(f"no execution {id_or_prefix!r} in the history")
        if len(ids) > 1:
            raise AmbiguousId(id_or_prefix, ids)
        return ids[0]

    def execution_row(self, id_or_prefix: str, *, full: bool = False) -> dict[str, Any]:
        """One execution's row (``workflow_text`` only with ``full``), without its nodes."""
        eid = self.resolve_id(id_or_prefix)
        rows = self._query("SELECT * FROM executions WHERE id = ?", (eid,))
        if not rows:
            raise NotFound(f"no execution {eid!r}")
        row = self._execution_row(rows[0], full=full)
        if full:
            text = self._query("SELECT text FROM workflow_texts WHERE execution_id = ?", (eid,))
            row["workflow_text"] = text[0][0] if text else None
        return row

    def get_execution(self, id_or_prefix: str) -> dict[str, Any]:
        """One execution (workflow text included) with ``nodes`` (every attempt) and ``variable_changes``."""
        d = self.execution_row(id_or_prefix, full=True)
        eid = d["id"]
        d["nodes"] = self.node_attempts(eid)
        d["variable_changes"] = self.variable_changes(eid)
        return d

    def node_attempts(self, execution_id: str) -> list[dict[str, Any]]:
        """Every attempt of every node, in start order."""
        rows = self._query("SELECT node_id, node_type, attempt, status, worker, inputs, output, error, started_at, "
                           "finished_at, duration_s, context FROM node_executions WHERE execution_id = ? "
                           "ORDER BY COALESCE(started_at, finished_at), id", (execution_id,))
        out = []
        for r in rows:
            d = dict(r)
            for key in ("inputs", "output", "error", "context"):
                d[key] = _loads(d[key])
            out.append(d)
        return out

    def variable_changes(self, execution_id: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT seq, eseq, name, old, new, scope, node_id, ts FROM variable_changes "
                           "WHERE execution_id = ? ORDER BY id", (execution_id,))
        out = []
        for r in rows:
            d = dict(r)
            d["old"], d["new"] = _loads(d["old"]), _loads(d["new"])
            out.append(d)
        return out

    def events(self, execution_id: str, from_eseq: int = 1, types: Iterable[str] | None = None,
               nodes: Iterable[str] | None = None, *, with_topic: bool = False) -> list[Any]:
        """Stored payloads (bytes, exactly as published) in order; ``(topic, payload)`` with ``with_topic``.

        ``from_eseq`` counts in the execution's latest epoch; events of earlier epochs (before
        a coordinator restart) are included only when ``from_eseq <= 1``. Cost: the chunks
        that hold the selected events are decompressed (O(events read)).
        """
        epoch = None
        if from_eseq > 1:
            row = self._query("SELECT epoch FROM executions WHERE id = ?", (execution_id,))
            epoch = row[0][0] if row else None
        wanted_types = frozenset(types or ())
        wanted_nodes = frozenset(nodes or ())
        out: list[Any] = []

        def keep(topic: str, payload: bytes, eseq: Any, etype: str, node_id: Any) -> None:
            if from_eseq > 1 and not (isinstance(eseq, int) and eseq >= from_eseq):
                return
            if (wanted_types and etype not in wanted_types) or (wanted_nodes and node_id not in wanted_nodes):
                return
            out.append((topic, bytes(payload)) if with_topic else bytes(payload))

        where, params = "execution_id = ?", [execution_id]
        if from_eseq > 1:
            where += " AND epoch IS ?"
            params.append(epoch)
        for r in self._query(f"SELECT topic, payload, eseq, type, node_id FROM events WHERE {where} "
                             f"ORDER BY id", params):   # files written before schema v2
            keep(r[0], r[1], r[2], r[3], r[4])
        if from_eseq > 1:
            where += " AND last_eseq >= ?"
            params.append(int(from_eseq))
        for r in self._query(f"SELECT data FROM event_chunks WHERE {where} ORDER BY id", params):
            for item in msgpack.unpackb(zlib.decompress(r[0]), raw=False):
                keep(*item)
        return out

    def execution_status(self, execution_id: str) -> str | None:
        rows = self._query("SELECT status FROM executions WHERE id = ?", (execution_id,))
        return rows[0][0] if rows else None

    def last_event(self, execution_id: str) -> dict[str, Any] | None:
        """``{epoch, eseq, type}`` of the execution's latest stored event, or None."""
        rows = self._query("SELECT epoch, data FROM event_chunks WHERE execution_id = ? ORDER BY id DESC LIMIT 1",
                           (execution_id,))
        if rows:
            _topic, _payload, eseq, etype, _node = msgpack.unpackb(zlib.decompress(rows[0][1]), raw=False)[-1]
            return {"epoch": rows[0][0], "eseq": eseq, "type": etype}
        rows = self._query("SELECT epoch, eseq, type FROM events WHERE execution_id = ? ORDER BY id DESC LIMIT 1",
                           (execution_id,))
        return dict(rows[0]) if rows else None

    def unfinished_executions(self) -> list[Unfinished]:
        """Executions without a terminal event, oldest first, with their completed main-graph nodes."""
        placeholders = ",".join("?" * len(TERMINAL_STATUSES))
        rows = self._query(f"SELECT e.id, e.workflow, w.text AS workflow_text, e.variables_in, e.epoch, e.last_eseq "
                           f"FROM executions e LEFT JOIN workflow_texts w ON w.execution_id = e.id "
                           f"WHERE e.status NOT IN ({placeholders}) ORDER BY COALESCE(e.started_at, e.submitted_at)",
                           sorted(status.value for status in TERMINAL_STATUSES))
        out = []
        for r in rows:
            completed = {n[0]: _loads(n[1]) for n in self._query(
                "SELECT node_id, output FROM node_executions WHERE execution_id = ? AND status = 'completed' "
                "AND context IS NULL ORDER BY id", (r["id"],))}
            out.append(Unfinished(r["id"], r["workflow"], r["workflow_text"], _loads(r["variables_in"]), completed,
                                  r["epoch"], r["last_eseq"]))
        return out

    def prune(self, older_than_days: float) -> int:
        """Delete executions that finished more than ``older_than_days`` days ago. Returns how many.

        Unfinished executions are kept (crash recovery needs them). Runs on the caller's
        thread with its own connection (WAL: the writer is not blocked for long).
        """
        cutoff = time.time() - float(older_than_days) * 86400.0
        conn = self._reader()
        ids = [r[0] for r in conn.execute("SELECT id FROM executions WHERE finished_at IS NOT NULL "
                                          "AND finished_at < ?", (cutoff,))]
        if not ids:
            return 0
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._delete(conn, chunk)
                conn.execute("COMMIT")
            except Exception:
                conn.execute("ROLLBACK")
                raise
        return len(ids)

    @staticmethod
    def _delete(conn: sqlite3.Connection, ids: list[str]) -> None:
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        for table, column in (("events", "execution_id"), ("event_chunks", "execution_id"),
                              ("node_executions", "execution_id"),
                              ("variable_changes", "execution_id"), ("workflow_texts", "execution_id"),
                              ("executions", "id")):
            conn.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", ids)


def open_store(path: str | os.PathLike | None = None) -> Store:
    """A query-only store on an existing database (the CLI): no writer thread."""
    return Store(path, start=False, readonly=True)


def combine_sinks(*sinks: Callable[[str | None, bytes, bytes], None] | None
                  ) -> Callable[[str | None, bytes, bytes], None] | None:
    """One sink calling each given sink in turn (``None`` entries are skipped; None when
    none is left); a failing sink does not stop the others and never raises."""
    active = tuple(s for s in sinks if s is not None)
    if not active:
        return None
    if len(active) == 1:
        return active[0]

    def sink(execution_id: str | None, topic: bytes, payload: bytes) -> None:
        for each in active:
            try:
                each(execution_id, topic, payload)
            except Exception:
                log.exception("event sink %r failed", each)

    return sink
