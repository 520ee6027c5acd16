"""Execution history in SQLite, built from the coordinator's published events.

The coordinator's :class:`~goflow.events.publisher.EventPublisher` calls
``sink(execution_id, topic, payload)`` for every event, on the reactor thread.
:meth:`Store.sink` only appends to an in-memory queue (it never blocks, never raises); the
store's ``goflow-history`` thread cuts the queue into batches (every ``flush_interval``
seconds or ``batch_size`` items) and, for a file, ships each batch as it is (the published
bytes, one msgpack frame) to a **writer process** (:mod:`goflow.history.writer`) that
decodes it and writes it as one transaction to the WAL-mode SQLite file, then acknowledges
it; the ``goflow-history-acks`` thread takes the acknowledgements. *Why a process:* the
decoding and row building took the coordinator's GIL (about 20 us per event, 1-1.75 s
of a 20k-node run), time taken from the reactor; in the writer process they run on the other
core. An in-memory store (``":memory:"``), and a store after its file failed, write on the
``goflow-history`` thread instead (small, bounded, and queries must reach that database
from this process). Queries run in this process on their own connections (WAL: a reader
never blocks the other process's writer).

Contracts (see ``docs/history.md``):

* **Nothing is dropped while the coordinator cooperates.** When more than
  ``high_watermark`` events wait (queued, or sent to the writer process and not yet
  acknowledged), :meth:`backlogged` is True and the coordinator stops handing tasks to
  workers (the publisher is never slowed); the store calls the relief callback once that
  count is back under half of that. Only beyond ``queue_capacity``
  (a bound the coordinator's back-pressure keeps the queue far from) is an event dropped,
  and its execution is then marked history-incomplete.
* **Closing drains.** :meth:`close` returns once every queued item is written: it ends the
  writer process's input and waits for its last acknowledgement and its exit. The writer
  owns its connection and closes it itself, so no connection is closed under it.
* **The writer process dies with the coordinator and never loses a committed batch.** It
  exits at the end of its input, so also when the coordinator is SIGKILLed (after
  committing every batch it had read). A store keeps each batch until it is acknowledged:
  if the process ends early, that is a write failure (below), and the unacknowledged
  batches are written in memory.
* **Completion is reported after it is recorded.** :meth:`after_written` queues a barrier:
  its callback runs once everything queued before it is committed, with the execution's
  :meth:`history_problem` (None when its history is complete in the file).
* **A failing disk is reported, never raised.** When the file cannot be written (disk full,
  read-only path, the writer process died, ...) the failure is reported once (``store.healthy`` False,
  ``store.last_error``, one log record), recent history continues in an in-memory
  database, every execution with events since then is history-incomplete, and a small
  marker file next to the database (``<db>.state``, overwritten in place so it needs no
  new disk space) says so to the next coordinator (:attr:`previous_failure`), whose
  recovery must then not resume what this one may have run unrecorded.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import msgpack
from goflow.history.schema import (MIGRATIONS, SCHEMA_VERSION, connect as _connect, create_private,  # noqa: F401
                                   delete_executions, dumps as _dumps, loads as _loads, migrate, open_writer,
                                   schema_version)
from goflow.history.writer import BARRIER, EVENT, FAILED, SUBMISSION, Writer, read_frame, write_frame
from goflow.redaction import SECRET_MASK
from goflow.states import TERMINAL_STATUSES

log = logging.getLogger("goflow.history.store")

DEFAULT_QUEUE_CAPACITY = 200_000
DEFAULT_HIGH_WATERMARK = 20_000
DEFAULT_BATCH_SIZE = 2000
DEFAULT_FLUSH_INTERVAL = 0.05
DEFAULT_MEMORY_EVENTS = 50_000

STATE_SIZE = 512
"""Bytes of the ``<db>.state`` marker; always rewritten whole, in place."""
_memory_ids = itertools.count(1)


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
    writes: list[tuple[str, str, str | None, Any]] = field(default_factory=list)
    """Every recorded change to the execution's own variables made by a node, in arrival order:
    ``(node_id, name, scope, value)`` (bounded like events). Rows from before schema 4 are absent."""


# -- the store -------------------------------------------------------------------------------
class Store:
    """SQLite execution history fed by :meth:`sink` (see module docstring).

    ``path``: the database file (default :func:`default_db_path`; ``":memory:"`` for a
    private in-memory history). ``start=False`` starts no writer (read-only use,
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
        self._writer: Writer | None = None
        """The in-process writer (an in-memory history); None while the writer process writes."""
        self._proc: subprocess.Popen | None = None
        self._acks: threading.Thread | None = None
        self._lock = threading.Lock()
        self._seq = 0
        self._inflight: dict[int, tuple[list, tuple | None]] = {}
        """Writer process: seq -> (batch, its barrier) sent and not acknowledged yet, in order."""
        self._inflight_events = 0
        self._input_closed = False
        self._lost: str | None = None
        """Why the writer process ended before its work was done (set by the acks thread)."""
        self._thread: threading.Thread | None = None
        self._marker: StateMarker | None = None
        if self.path == ":memory:":
            self._use_memory()
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
                open_writer(self.path).close()     # migrated and writable now: healthy says so from here
                if start:
                    self._spawn()
            except (OSError, sqlite3.Error) as exc:
                if self._marker is None:
                    self._marker = StateMarker(Path(self.path + ".state"))
                # (failing to open, this store records nothing and recovery resumes nothing:
                # no history can go missing, so there is no failure to hand on in the marker)
                self._degrade(f"opening {self.path}: {type(exc).__name__}: {exc}", mark=False)
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

    @property
    def writer_pid(self) -> int | None:
        """The writer process's pid (None: the history is written in this process, in memory)."""
        proc = self._proc
        return proc.pid if proc is not None else None

    # -- the writer process and connections ------------------------------------------------------
    def _writer_command(self) -> list[str]:
        """The writer process's command line (tests run the real writer with a slowed disk)."""
        return [sys.executable, "-m", "goflow.history.writer", self.path]

    def _spawn(self) -> None:
        """Start the writer process, immune from its first instruction on to the signals it
        ignores (goflow.history.writer's contract): a Ctrl-C during its startup killed it."""
        from goflow.history.writer import IGNORED_SIGNALS
        from goflow.supervisor import spawn_managed

        self._proc = spawn_managed(self._writer_command(), ignore=IGNORED_SIGNALS, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, close_fds=True, bufsize=0)
        self._acks = threading.Thread(target=self._read_acks, args=(self._proc,), name="goflow-history-acks",
                                      daemon=True)
        self._acks.start()

    def _use_memory(self) -> None:
        self._target = f"file:goflow-history-{os.getpid()}-{next(_memory_ids)}?mode=memory&cache=shared"
        self._uri = True
        self.in_memory = True
        self._writer = Writer(open_writer(self._target, uri=True), memory_events=self.memory_events)
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

    def _degrade(self, reason: str, *, mark: bool = True) -> None:
        """Report a write failure once and continue with in-memory history."""
        if self.in_memory:
            # Even the in-memory database failed (out of memory?): keep counting, never raise.
            self.last_error = reason
            return
        self.healthy = False
        self.last_error = reason
        log.error("history store failed (%s); keeping recent history in memory from now on", reason)
        if self._marker is not None and mark:
            self._marker.mark_failed(reason)
        self._close_writer()
        try:
            self._use_memory()
        except Exception as exc2:  # pragma: no cover - sqlite without memory databases?
            log.error("history store: in-memory fallback failed too: %s", exc2)

    # -- feeding (any thread; the reactor calls sink) -------------------------------------
    def sink(self, execution_id: str | None, topic: bytes, payload: bytes) -> None:
        """Queue one published event. O(1), never blocks, never raises."""
        try:
            q = self._queue
            depth = len(q) + self._inflight_events
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
            q.append((EVENT, execution_id, topic, payload, time.monotonic()))
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
            self._queue.append((SUBMISSION, execution_id, workflow_name, text, _dumps(redacted), time.time(),
                                time.monotonic()))
        except Exception:
            log.exception("history: cannot record the submission of %s", execution_id)

    def after_written(self, execution_id: str, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(problem)`` once everything queued so far is committed.

        ``problem`` is :meth:`history_problem` for ``execution_id`` at that moment: None when
        its history is complete in the file. Runs on a store thread (or at once, on the
        caller's, when there is no writer); not subject to the queue cap. The callback
        must be quick and must not raise.
        """
        if self._thread is None or self._closed:
            self._call_barrier(execution_id, callback)
            return
        self._queue.append((BARRIER, execution_id, callback, time.monotonic()))
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
        if len(self._queue) + self._inflight_events < self.high_watermark or self._closed:
            return False
        if not self._pressure:
            self._pressure = True
            self.stats["backlogged"] += 1
        self._wake.set()
        return True

    def set_relief(self, callback: Callable[[], None] | None) -> None:
        """``callback()`` (a store thread) when the queue falls under half the high watermark
        after :meth:`backlogged` said True. It must be quick (e.g. ``call_soon`` a pump)."""
        self._relief = callback

    def _relieve(self) -> None:
        if self._pressure and len(self._queue) + self._inflight_events <= self.high_watermark // 2:
            self._pressure = False
            relief = self._relief
            if relief is not None:
                try:
                    relief()
                except Exception:
                    log.exception("history: relief callback failed")

    # -- the writer thread -----------------------------------------------------------------
    def _run(self) -> None:
        """Cut the queue into batches (at most ``batch_size`` items, ending at a barrier) and
        hand each to the writer process, or write it here in memory."""
        q = self._queue
        try:
            while True:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                if self._lost is not None:
                    self._take_over()
                while q:
                    batch = []
                    popleft = q.popleft
                    try:
                        for _ in range(self.batch_size):
                            batch.append(popleft())
                            if batch[-1][0] == BARRIER:
                                break
                    except IndexError:
                        pass
                    barrier = batch.pop() if batch[-1][0] == BARRIER else None
                    self._hand(batch, barrier)
                    self._relieve()
                self._relieve()   # also when the reactor asked after this thread emptied the queue
                if self._closing and not q:
                    self._finish_writer_process()
                    return
        finally:   # the writer connection belongs to this thread: nobody closes it under us
            self._close_writer()

    def _hand(self, batch: list, barrier: tuple | None) -> None:
        proc = self._proc
        if proc is None:
            self._write_here(batch, barrier)
            return
        with self._lock:
            self._seq += 1
            seq = self._seq
            self._inflight[seq] = (batch, barrier)
            self._inflight_events += len(batch)
        try:
            write_frame(proc.stdin.fileno(), [seq, batch])
        except (OSError, ValueError):   # the process is gone; its acks thread says why
            self._take_over()

    def _read_acks(self, proc: subprocess.Popen) -> None:
        """The writer process's acknowledgements, in order: the batch is committed; then its
        barrier runs. Ends at the process's end of output."""
        reason = None
        try:
            acks = proc.stdout.fileno()
            while True:
                message = read_frame(acks)
                if message is None:
                    break
                if message[1] == FAILED:
                    reason = message[2]
                    break
                self._acknowledged(*message)
        except Exception as exc:  # a bug or a garbled frame: the batches not acknowledged go to memory
            log.exception("history: the writer process's acknowledgements cannot be read")
            reason = f"the history writer process's acknowledgements cannot be read: {exc}"
        if reason is None and not (self._input_closed and not self._inflight):
            status = proc.wait()
            reason = f"the history writer process (pid {proc.pid}) ended with status {status}"
        self._lost = reason
        self._wake.set()

    def _acknowledged(self, seq: int, written: int, bad: int, submissions: int, seconds: float,
                      problem: str | None) -> None:
        with self._lock:
            batch, barrier = self._inflight.pop(seq)
            self._inflight_events -= len(batch)
        stats = self.stats
        stats["events_written"] += written
        stats["bad_events"] += bad
        stats["submissions"] += submissions
        stats["write_seconds"] += seconds
        if batch:
            stats["batches"] += 1
            stats["last_batch_lag_s"] = time.monotonic() - batch[0][-1]
            if problem is not None:
                self._mark_batch(batch, problem)
        if barrier is not None:
            self._call_barrier(barrier[1], barrier[2])
        self._relieve()

    def _take_over(self) -> None:
        """The writer process ended early: report it, and write what it had not committed (and
        everything after) in memory here."""
        proc, acks = self._proc, self._acks
        if proc is None:
            return
        if acks is not None:
            acks.join()
        self._proc = self._acks = None
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        proc.wait()
        self._degrade(self._lost or f"the history writer process (pid {proc.pid}) ended")
        with self._lock:
            pending = sorted(self._inflight.items())
            self._inflight.clear()
            self._inflight_events = 0
        for _seq, (batch, barrier) in pending:
            self._write_here(batch, barrier)

    def _finish_writer_process(self) -> None:
        """Closing: end the writer's input, wait for its last acknowledgements and its exit."""
        proc = self._proc
        if proc is None:
            return
        self._input_closed = True
        try:
            proc.stdin.close()
        except (OSError, ValueError):
            pass
        if self._acks is not None:
            self._acks.join()
        if self._lost is not None:
            self._take_over()
            return
        proc.stdout.close()
        proc.wait()
        self._proc = self._acks = None

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def _write_here(self, batch: list, barrier: tuple | None) -> None:
        if batch and self._writer is not None:
            started = time.monotonic()
            self._write_batch(batch)
            self.stats["write_seconds"] += time.monotonic() - started
        if barrier is not None:
            self._call_barrier(barrier[1], barrier[2])

    def _write_batch(self, batch: list) -> None:
        try:
            self._count(self._writer.apply(batch))
        except (sqlite3.Error, OSError) as exc:   # only the in-memory database is written here
            self._degrade(f"in-memory history: {type(exc).__name__}: {exc}")
        except Exception:  # a bug: never kill the writer thread
            log.exception("history: batch of %d dropped", len(batch))
            self._mark_batch(batch, "a batch of events could not be written (see the log)")
            return
        if not self.healthy:
            self._mark_batch(batch, f"history is not written to the file since: {self.last_error}")
        self.stats["batches"] += 1
        self.stats["last_batch_lag_s"] = time.monotonic() - batch[0][-1]

    def _count(self, counts: tuple[int, int, int]) -> None:
        stats = self.stats
        stats["events_written"] += counts[0]
        stats["bad_events"] += counts[1]
        stats["submissions"] += counts[2]

    def _mark_batch(self, batch: list, reason: str) -> None:
        for item in batch:
            if item[1] is not None:
                self._mark_incomplete(item[1], reason)

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Items queued or sent to the writer process and not yet committed."""
        return len(self._queue) + self._inflight_events

    def write_lag(self) -> float:
        """Seconds the oldest uncommitted event has been waiting (0 when there is none)."""
        with self._lock:
            oldest = next((batch[0] for batch, _barrier in self._inflight.values() if batch), None)
        try:
            return max(0.0, time.monotonic() - (oldest or self._queue[0])[-1])
        except IndexError:
            return 0.0

    def gauges(self) -> dict[str, float]:
        """Scrape-time values for :class:`goflow.observability.metrics.Metrics` (``set_gauge_source``)."""
        return {"store_queue_depth": self.queue_depth, "store_write_lag_seconds": self.write_lag(),
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
        The writer closes its own connection; a store without a writer
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
                log.warning("history store: still writing at close, %d item(s) queued", self.queue_depth)
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
            writes = [(w[0], w[1], w[2], _loads(w[3])) for w in self._query(
                "SELECT node_id, name, scope, new FROM variable_changes WHERE execution_id = ? "
                "AND execution_level = 1 AND node_id IS NOT NULL ORDER BY id", (r["id"],))]
            out.append(Unfinished(r["id"], r["workflow"], r["workflow_text"], _loads(r["variables_in"]), completed,
                                  r["epoch"], r["last_eseq"], writes))
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
                delete_executions(conn, chunk)
                conn.execute("COMMIT")
            except Exception:
                conn.execute("ROLLBACK")
                raise
        return len(ids)


def open_store(path: str | os.PathLike | None = None) -> Store:
    """A query-only store on an existing database (the CLI): no writer."""
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
