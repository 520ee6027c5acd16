"""The history file's schema, its migrations, connections and the JSON form of stored values.

Shared by the store (queries, in the coordinator's process) and the writer (in its own
process for a file, see :mod:`goflow.history.writer`); both open the file with :func:`connect`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("goflow.history.store")


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
    (4, """
-- 1 when the change was to the execution's own variables (its event's vseq equals its eseq),
-- 0 for a loop iteration's or a branch's scope; NULL in rows written before this column.
-- Crash recovery restores a completed container's merged and body writes from these rows.
ALTER TABLE variable_changes ADD COLUMN execution_level INTEGER;
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


def connect(target: str, *, uri: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(target, uri=uri, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def open_writer(target: str, *, uri: bool = False) -> sqlite3.Connection:
    """A connection that writes ``target``: WAL (a file), migrated, and proved writable now
    (SQLite opens a read-only file without complaint)."""
    conn = connect(target, uri=uri)
    try:
        if not uri:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("history store %s: journal_mode is %s, not WAL", target, mode)
            conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = OFF")
        migrate(conn)
        if not uri:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE schema_version SET applied_at = applied_at "
                         "WHERE version = (SELECT MAX(version) FROM schema_version)")
            conn.execute("COMMIT")
    except Exception:
        conn.close()
        raise
    return conn


def delete_executions(conn: sqlite3.Connection, ids: list[str]) -> None:
    """Delete the executions ``ids`` with all their rows (the caller holds the transaction)."""
    if not ids:
        return
    marks = ",".join("?" * len(ids))
    for table, column in (("events", "execution_id"), ("event_chunks", "execution_id"),
                          ("node_executions", "execution_id"),
                          ("variable_changes", "execution_id"), ("workflow_texts", "execution_id"),
                          ("executions", "id")):
        conn.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", ids)


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


def dumps(value: Any) -> str | None:
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


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)

