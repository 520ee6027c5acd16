"""MCP tool calls for worker processes.

:class:`MCPSessionPool` keeps one MCP session per server id (per pool, i.e. per worker
process). It runs a private asyncio loop in a daemon thread; its public methods are
blocking and thread-safe, so the synchronous worker task loop can call them directly and
another thread can :meth:`~MCPSessionPool.cancel` a call in flight.

Session lifecycle (see docs/mcp.md):

* opened on first use (``initialize`` handshake with the official ``mcp`` SDK), reused by
  every later call with the same server id;
* checked before reuse: a stdio server whose process has gone (stderr/stdout at EOF) or a
  transport the SDK has closed is replaced by a fresh session;
* a server that dies during a call fails that call with ``server_lost`` (retryable) and the
  session is dropped, so the next call starts a new server;
* a spec that changes under the same id (different command, url, env...) reopens it;
* :meth:`~MCPSessionPool.close` ends every session and stops stdio servers (stdin closed,
  then SIGTERM/SIGKILL to the server's process group, as the SDK's stdio client does).

The stderr of stdio servers is drained by a thread per session (so a chatty server never
blocks on a full pipe); the last 50 lines are kept and appended, redacted, to
``connection`` and ``server_lost`` errors.

Result rule (:func:`tool_result_value`, documented in docs/mcp.md), following the MCP
specification's ``structuredContent`` (validated against the tool's ``outputSchema`` by the
SDK before this rule runs; a mismatch fails the call with ``tool_error``):

1. ``isError: true`` -> raise ``MCPToolError(ErrorKind.TOOL_ERROR)`` with the result's text.
2. ``structuredContent`` exactly ``{"result": X}`` (FastMCP/MCPServer's wrapper for a
   non-object return) -> ``X``, unless the single text item parses to that same object
   (the tool really returned ``{"result": ...}``).
3. other ``structuredContent`` -> it, unless it merely wraps the single text item in a
   one-key object (like the filesystem server's ``{"content": text}``): then rule 4.
4. exactly one text item -> its text parsed as JSON if it is valid JSON, else the text.
5. no content -> ``None``.
6. anything else (several items, or one image/audio/resource link/embedded resource) ->
   the item's value (one item) or the list of item values; a text item's value follows
   rule 4's JSON parsing, other items are the dicts as sent (resource links and embedded
   resources are kept as data: ``uri``, ``mimeType``, ``text``/``blob``...).

The full result stays available as :attr:`ToolCallResult.raw`.

While a call runs, the server's ``notifications/message`` and (stdio) stderr lines become
the node's output lines and its ``notifications/progress`` the node's progress
(:mod:`goflow.workers.capture`): every ``tools/call`` carries a progress token. A call
given a ``traceparent`` (tracing on) sends it as an HTTP header to sse/http servers and in
the request's ``_meta`` to every server.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import fcntl
import json
import logging
import os
import struct
import sys
import termios
import threading
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Mapping

from goflow.errors import ErrorKind
from goflow.language.parameters import coerce_arguments
from goflow.workers.capture import CAPTURE
from goflow.servers import (
    ServerSpecError,
    describe_spec,
    expand_env_refs,
    redact,
    secret_values,
    transport_of,
    validate_spec,
)

log = logging.getLogger(__name__)

__all__ = [
    "MCPToolError",
    "MCPSessionPool",
    "ToolCallResult",
    "tool_result_value",
    "check_arguments",
]

STDERR_TAIL_LINES = 50
_STDERR_LINE_MAX = 500
# Streamable HTTP buffers one SSE event per response; the SDK's default cap is 1 MiB, which
# would reject large tool results. Raise it well above anything a workflow should move.
_MAX_SSE_EVENT_SIZE = 256 * 1024 * 1024
_HTTP_TIMEOUT_S = 30.0
_HTTP_READ_TIMEOUT_S = 300.0  # a streamable HTTP response may stay open while a long tool runs
_CLIENT_NAME = "goflow"
_CLIENT_VERSION = "0.1.0"


class MCPToolError(Exception):
    """A failed MCP tool call or connection.

    ``error_type`` is one of:

    * ``tool_error`` - the tool ran and reported failure (``isError``) or the server
      answered with a JSON-RPC error; ``message`` is the tool's own text;
    * ``server_lost`` - the server died or the transport broke mid-call (retryable);
    * ``timeout`` - the call exceeded its timeout; the request was cancelled on the server;
    * ``connection`` - the server could not be started/connected, or its spec is invalid;
    * ``cancelled`` - :meth:`MCPSessionPool.cancel` was called;
    * ``invalid_arguments`` - the arguments do not match the tool's input schema.
    """

    def __init__(
        self,
        error_type: str,
        message: str,
        *,
        server_id: str | None = None,
        tool: str | None = None,
        retryable: bool | None = None,
        stderr_tail: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.server_id = server_id
        self.tool = tool
        self.retryable = error_type in (ErrorKind.SERVER_LOST, ErrorKind.TIMEOUT, ErrorKind.CONNECTION) if retryable is None else retryable
        self.stderr_tail = stderr_tail or []

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"MCPToolError({self.error_type!r}, {self.message!r})"


@dataclass
class ToolCallResult:
    """``value`` follows the result rule; ``raw`` is the MCP result as a JSON-able dict."""

    value: Any
    raw: dict = field(default_factory=dict)


# ------------------------------------------------------------------------ results


def _parse_json(text: str) -> tuple[bool, Any]:
    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        return True, json.loads(text, parse_constant=no_constants)
    except (ValueError, TypeError):
        return False, None


def _item_value(item: Mapping[str, Any]) -> Any:
    if item.get("type") == "text":
        text = item.get("text", "")
        ok, parsed = _parse_json(text)
        return parsed if ok else text
    return dict(item)


def _error_text(raw: Mapping[str, Any]) -> str:
    texts = [str(i.get("text", "")) for i in raw.get("content") or [] if i.get("type") == "text"]
    text = "\n".join(t for t in texts if t)
    if not text and raw.get("structuredContent") is not None:
        text = json.dumps(raw["structuredContent"])
    return text or "the tool reported an error without a message"


def tool_result_value(raw: dict) -> Any:
    """The value a workflow sees for an MCP ``tools/call`` result (see the module docstring).

    Raises :class:`MCPToolError` (``tool_error``) when ``raw["isError"]`` is true.
    """
    if raw.get("isError"):
        raise MCPToolError(ErrorKind.TOOL_ERROR, _error_text(raw), retryable=False)
    content = [i for i in raw.get("content") or [] if isinstance(i, Mapping)]
    has_structured = "structuredContent" in raw and raw["structuredContent"] is not None
    structured = raw.get("structuredContent")
    texts = [i for i in content if i.get("type") == "text"]
    single_text: str | None = texts[0].get("text", "") if len(content) == 1 and len(texts) == 1 else None

    # 2. the {"result": X} wrapper
    if has_structured and isinstance(structured, Mapping) and list(structured) == ["result"]:
        if single_text is not None:
            ok, parsed = _parse_json(single_text)
            if ok and parsed == structured:
                return parsed
        return structured["result"]
    # 3. structured content, unless it only wraps the text
    if has_structured:
        wraps_text = single_text is not None and isinstance(structured, Mapping) and len(structured) == 1 and (
            next(iter(structured.values())) == single_text
        )
        if not wraps_text:
            return structured
    # 4. one text item
    if single_text is not None:
        ok, parsed = _parse_json(single_text)
        return parsed if ok else single_text
    # 5. no content
    if not content:
        return None
    # 6. several items / non-text items
    if len(content) == 1:
        return _item_value(content[0])
    return [_item_value(i) for i in content]


# ---------------------------------------------------------------------- arguments


def check_arguments(input_schema: dict | None, arguments: dict) -> list[str]:
    """Problems with ``arguments`` against a tool's JSON Schema ``input_schema`` (empty = ok).

    Uses ``jsonschema`` (a dependency of ``mcp``) when importable; otherwise checks only
    that ``arguments`` is an object and has the ``required`` properties.
    """
    if not isinstance(arguments, Mapping):
        return [f"arguments must be an object, got {type(arguments).__name__}"]
    if not input_schema:
        return []
    try:
        from jsonschema.validators import validator_for
    except ImportError:  # pragma: no cover - jsonschema ships with mcp
        required = input_schema.get("required") or []
        return [f"missing required argument {name!r}" for name in required if name not in arguments]
    try:
        cls = validator_for(input_schema)
        cls.check_schema(input_schema)
    except Exception as exc:  # a broken schema is the server's problem, not the caller's
        log.debug("tool input schema is not valid JSON Schema: %s", exc)
        return []
    problems = []
    for err in sorted(cls(input_schema).iter_errors(dict(arguments)), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path)
        problems.append(f"{where}: {err.message}" if where else err.message)
    return problems


# ------------------------------------------------------------------------ stderr


class _StderrTail:
    """A pipe for a child's stderr, drained by a daemon thread that keeps the last lines."""

    def __init__(self, label: str, secrets: list[str], maxlen: int = STDERR_TAIL_LINES) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=maxlen)
        self._secrets = secrets
        self._lock = threading.Lock()
        self.eof = threading.Event()
        self.busy = False
        rfd, wfd = os.pipe()
        self._reader = os.fdopen(rfd, "rb", buffering=0)
        self.writer = os.fdopen(wfd, "w")  # handed to the child as its stderr
        self._thread = threading.Thread(target=self._drain, name=f"mcp-stderr-{label}", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self._reader.read(65536)
                if not chunk:
                    break
                self.busy = True
                buf += chunk
                *complete, buf = buf.split(b"\n")
                for raw in complete:
                    self._add(raw)
                if len(buf) > 65536:  # a huge line without newline: keep its start
                    self._add(buf[:_STDERR_LINE_MAX])
                    buf = b""
                self.busy = False
            if buf:
                self._add(buf)
        except (OSError, ValueError):
            pass
        finally:
            self.eof.set()
            try:
                self._reader.close()
            except OSError:
                pass

    def _add(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        CAPTURE.emit("mcp_stderr", "error", redact(line, self._secrets))  # the running call's output
        if len(line) > _STDERR_LINE_MAX:
            line = line[:_STDERR_LINE_MAX] + "..."
        with self._lock:
            self.lines.append(line)

    def unread(self) -> bool:
        """Whether the server wrote stderr that the drain thread has not turned into lines yet."""
        if self.eof.is_set():
            return False
        try:
            pending = struct.unpack("i", fcntl.ioctl(self._reader.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        except (OSError, ValueError):
            return False
        return pending > 0 or self.busy

    def close_writer(self) -> None:
        """Close the parent's copy of the write end (after the child has been spawned)."""
        if not self.writer.closed:
            try:
                self.writer.close()
            except OSError:
                pass

    def tail(self, wait: float = 0.0) -> list[str]:
        if wait:
            self.eof.wait(wait)
        with self._lock:
            lines = list(self.lines)
        return [redact(line, self._secrets) for line in lines]


# ---------------------------------------------------------------------- sessions


def _spec_key(spec: Mapping[str, Any]) -> str:
    return json.dumps(
        {k: spec.get(k) for k in ("transport", "command", "args", "env", "cwd", "url", "headers")},
        sort_keys=True,
        default=str,
    )


def _flatten(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            if not isinstance(sub, asyncio.CancelledError):
                return _flatten(sub)
    return exc


def _describe_exc(exc: BaseException) -> str:
    exc = _flatten(exc)
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


_MCP_LEVELS = {"debug": "debug", "info": "info", "notice": "info", "warning": "warning", "error": "error",
               "critical": "critical", "alert": "critical", "emergency": "critical"}


async def _server_log(params: Any) -> None:
    """``notifications/message`` from a server: an output line of the running call."""
    data = params.data
    text = data if isinstance(data, str) else json.dumps(data, default=str, ensure_ascii=False)
    level = str(getattr(params.level, "value", params.level))
    CAPTURE.emit("mcp_log", _MCP_LEVELS.get(level, "info"), text, logger=params.logger)


async def _server_progress(progress: float, total: float | None, message: str | None) -> None:
    """``notifications/progress`` for the call in flight: the node's progress."""
    CAPTURE.progress(progress, total, message)


async def _settle_stderr(entry: "_Session", limit_s: float = 0.2) -> None:
    """Let the stderr the server wrote during the call become the call's lines (bounded wait;
    a server that keeps writing does not hold the result longer than ``limit_s``)."""
    stderr = entry.stderr
    if stderr is None:
        return
    deadline = asyncio.get_running_loop().time() + limit_s
    while stderr.unread() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.001)


class _WatchedStream:
    """The transport's read stream, noticing when it ends (the public way to know a
    transport closed: the SDK keeps that state private)."""

    def __init__(self, stream: Any, on_end: Any) -> None:
        self._stream = stream
        self._on_end = on_end

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def __aenter__(self) -> "_WatchedStream":
        await self._stream.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        self._on_end()
        return await self._stream.__aexit__(*exc)

    def __aiter__(self) -> "_WatchedStream":
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._stream.__anext__()
        except BaseException:
            self._on_end()
            raise

    async def receive(self) -> Any:
        try:
            return await self._stream.receive()
        except BaseException:
            self._on_end()
            raise


class _Session:
    """One live MCP session, owned by a runner task on the pool's loop."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.server_id: str = spec["id"]
        self.key = _spec_key(spec)
        self.session: Any = None  # mcp.ClientSession once initialized
        self.stderr: _StderrTail | None = None
        self.secrets: list[str] = []
        self.stop = asyncio.Event()
        self.ended = asyncio.Event()
        self.runner: asyncio.Task | None = None
        self.end_error: BaseException | None = None
        self.tools: dict[str, dict[str, Any]] | None = None  # name -> {name, description, input_schema}
        self.lost = False
        self.transport_closed = False
        """Set when the transport's read stream ends (the server closed it or went away)."""
        self.traceparent: str | None = None
        """The W3C trace context of the call in flight (sent as an HTTP header)."""

    # health ----------------------------------------------------------------
    def alive(self) -> bool:
        if self.lost or self.session is None or self.ended.is_set() or self.stop.is_set():
            return False
        if self.stderr is not None and self.stderr.eof.is_set():
            return False  # the stdio server process (and its children) went away
        return not self.transport_closed  # the transport reached EOF / was closed

    def tail(self, wait: float = 0.0) -> list[str]:
        return self.stderr.tail(wait) if self.stderr is not None else []

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def with_tail(self, message: str, wait: float = 0.0) -> str:
        lines = self.tail(wait)
        if not lines:
            return self.redact(message)
        return self.redact(message) + "\n--- last stderr lines of the server ---\n" + "\n".join(lines)

    # lifecycle -------------------------------------------------------------
    async def run(self, ready: asyncio.Future) -> None:
        from mcp import ClientSession
        from mcp.types import Implementation

        try:
            async with AsyncExitStack() as stack:
                read, write = await self._open_transport(stack)
                session = await stack.enter_async_context(
                    ClientSession(_WatchedStream(read, self._transport_ended), write, logging_callback=_server_log,
                                  client_info=Implementation(name=_CLIENT_NAME, version=_CLIENT_VERSION))
                )
                await session.initialize()
                self.session = session
                if not ready.done():
                    ready.set_result(self)
                await self.stop.wait()
        except BaseException as exc:  # noqa: BLE001 - reported through `ready` / end_error
            self.end_error = exc
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(_describe_exc(exc)))
            if not isinstance(exc, Exception):
                raise
        finally:
            if self.stderr is not None:
                self.stderr.close_writer()
            self.ended.set()

    def _transport_ended(self) -> None:
        self.transport_closed = True

    def _http_request_hook(self) -> Any:
        async def add_trace_context(request: Any) -> None:
            if self.traceparent:
                request.headers["traceparent"] = self.traceparent

        return add_trace_context

    async def _open_transport(self, stack: AsyncExitStack) -> tuple[Any, Any]:
        spec = self.spec
        transport = transport_of(spec)
        if transport == "stdio":
            from mcp.client.stdio import StdioServerParameters, stdio_client

            extra_env = expand_env_refs(spec.get("env"), server_id=self.server_id, field="env")
            self.secrets = secret_values(extra_env)
            env = {**os.environ, **extra_env}
            self.stderr = _StderrTail(self.server_id, self.secrets)
            params = StdioServerParameters(
                command=spec["command"],
                args=[str(a) for a in spec.get("args") or []],
                env=env,
                cwd=spec.get("cwd") or None,
            )
            try:
                streams = await stack.enter_async_context(stdio_client(params, errlog=self.stderr.writer))
            finally:
                self.stderr.close_writer()  # the child holds its own copy now
            return streams
        headers = expand_env_refs(spec.get("headers"), server_id=self.server_id, field="headers")
        self.secrets = secret_values(headers)
        url = spec["url"]
        if transport == "http":
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            client = await stack.enter_async_context(httpx2.AsyncClient(
                headers=headers or None, timeout=httpx2.Timeout(_HTTP_TIMEOUT_S, read=_HTTP_READ_TIMEOUT_S),
                event_hooks={"request": [self._http_request_hook()]}))
            return await stack.enter_async_context(
                streamable_http_client(url, http_client=client, max_sse_event_size=_MAX_SSE_EVENT_SIZE)
            )
        from mcp.client.sse import sse_client

        # The legacy SSE client makes its own HTTP client: trace context goes in ``_meta`` only.
        return await stack.enter_async_context(sse_client(url, headers=headers or None))

    async def aclose(self, timeout: float = 10.0) -> None:
        self.stop.set()
        if self.runner is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.ended.wait()), timeout)
        except asyncio.TimeoutError:
            self.runner.cancel()
            try:
                await asyncio.wait_for(asyncio.shield(self.ended.wait()), 5.0)
            except asyncio.TimeoutError:
                log.warning("MCP server %s did not shut down", self.server_id)


# -------------------------------------------------------------------------- pool


class MCPSessionPool:
    """One MCP session per server id, shared by every call made through this pool.

    ``connect_timeout`` bounds starting a server and the ``initialize`` handshake; the
    per-call ``timeout`` bounds the tool call itself (including the one-time ``tools/list``
    the pool makes on a fresh session to learn the input schemas).
    """

    def __init__(self, *, connect_timeout: float = 30.0, validate_arguments: bool = True) -> None:
        self.connect_timeout = connect_timeout
        self.validate_arguments = validate_arguments
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="mcp-session-pool", daemon=True)
        self._sessions: dict[str, _Session] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._inflight: set[asyncio.Task] = set()
        self._inflight_lock = threading.Lock()
        self._closed = False
        self._thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    # -- public, blocking ------------------------------------------------------
    def call_tool(self, server: dict, tool: str, arguments: dict, *, timeout: float = 60.0,
                  traceparent: str | None = None) -> ToolCallResult:
        """Call ``tool`` on ``server`` (a spec dict) and return its :class:`ToolCallResult`.

        ``traceparent`` (W3C trace context) travels with the request. Raises
        :class:`MCPToolError`; see its ``error_type`` values.
        """
        sid = str(server.get("id") or "?") if isinstance(server, Mapping) else "?"
        deadline = timeout + self.connect_timeout + 15.0
        return self._submit(self._call_tool(server, tool, arguments or {}, timeout, traceparent), deadline, sid, tool)

    def list_tools(self, server: dict, *, timeout: float = 30.0) -> list[dict]:
        """``[{name, description, input_schema}]`` for every tool the server offers."""
        sid = str(server.get("id") or "?") if isinstance(server, Mapping) else "?"
        deadline = timeout + self.connect_timeout + 15.0
        return self._submit(self._list_tools(server, timeout), deadline, sid, None)

    def cancel(self) -> None:
        """Cancel every call in flight on this pool (from any thread).

        The SDK answers the local cancellation by sending ``notifications/cancelled`` for
        the request to the server; the blocked callers get ``MCPToolError(ErrorKind.CANCELLED)``.
        """
        with self._inflight_lock:
            tasks = list(self._inflight)
        for task in tasks:
            self._loop.call_soon_threadsafe(task.cancel)

    def close(self) -> None:
        """Close every session, stop stdio servers and the loop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self._loop.is_closed() and self._loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._close_all(), self._loop)
            try:
                fut.result(timeout=30)
            except Exception as exc:  # pragma: no cover - best effort
                log.warning("closing MCP sessions: %s", _describe_exc(exc))
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> "MCPSessionPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def session_ids(self) -> list[str]:
        """Server ids with a session currently open (for diagnostics and tests)."""
        return [sid for sid, s in list(self._sessions.items()) if s.alive()]

    # -- plumbing --------------------------------------------------------------
    def _submit(self, coro: Any, deadline: float, sid: str, tool: str | None) -> Any:
        if self._closed:
            coro.close()
            raise MCPToolError(ErrorKind.CONNECTION, "the MCP session pool is closed", server_id=sid, tool=tool)
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("MCPSessionPool methods are blocking; do not call them from the pool's own loop")

        async def tracked() -> Any:
            task = asyncio.current_task()
            assert task is not None
            with self._inflight_lock:
                self._inflight.add(task)
            try:
                return await coro
            finally:
                with self._inflight_lock:
                    self._inflight.discard(task)

        fut = asyncio.run_coroutine_threadsafe(tracked(), self._loop)
        try:
            return fut.result(timeout=deadline)
        except concurrent.futures.CancelledError:
            raise MCPToolError(
                ErrorKind.CANCELLED, f"MCP call to server '{sid}' was cancelled", server_id=sid, tool=tool, retryable=False
            ) from None
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise MCPToolError(
                ErrorKind.TIMEOUT, f"MCP call to server '{sid}' did not finish within {deadline:.0f}s", server_id=sid, tool=tool
            ) from None

    def _lock_for(self, sid: str) -> asyncio.Lock:
        lock = self._locks.get(sid)
        if lock is None:
            lock = self._locks[sid] = asyncio.Lock()
        return lock

    async def _get_session(self, server: Mapping[str, Any], tool: str | None) -> _Session:
        if not isinstance(server, Mapping):
            raise MCPToolError(ErrorKind.CONNECTION, f"server spec must be a mapping, got {type(server).__name__}", tool=tool)
        problems = validate_spec(server)
        sid = str(server.get("id") or "?")
        if problems:
            raise MCPToolError(ErrorKind.CONNECTION, "\n".join(problems), server_id=sid, tool=tool, retryable=False)
        spec = dict(server)
        async with self._lock_for(sid):
            current = self._sessions.get(sid)
            if current is not None:
                if current.key == _spec_key(spec) and current.alive():
                    return current
                self._sessions.pop(sid, None)
                await current.aclose()
            entry = _Session(spec)
            loop = asyncio.get_running_loop()
            ready: asyncio.Future = loop.create_future()
            entry.runner = loop.create_task(entry.run(ready), name=f"mcp-session-{sid}")
            try:
                await asyncio.wait_for(asyncio.shield(ready), self.connect_timeout)
            except asyncio.TimeoutError:
                await entry.aclose(timeout=5.0)
                raise MCPToolError(
                    ErrorKind.CONNECTION,
                    entry.with_tail(
                        f"server '{sid}' ({describe_spec(spec)}) did not complete the MCP handshake "
                        f"within {self.connect_timeout:.0f}s"
                    ),
                    server_id=sid,
                    tool=tool,
                    stderr_tail=entry.tail(),
                ) from None
            except asyncio.CancelledError:
                await entry.aclose(timeout=5.0)
                raise
            except ServerSpecError as exc:
                await entry.aclose(timeout=5.0)
                raise MCPToolError(ErrorKind.CONNECTION, str(exc), server_id=sid, tool=tool, retryable=False) from None
            except Exception as exc:
                await entry.aclose(timeout=5.0)
                flat = _flatten(exc)
                if isinstance(flat, ServerSpecError):
                    raise MCPToolError(ErrorKind.CONNECTION, str(flat), server_id=sid, tool=tool, retryable=False) from None
                retryable = not isinstance(flat, FileNotFoundError | PermissionError | NotADirectoryError)
                reason = _describe_exc(exc)
                if getattr(flat, "code", None) == -32000 and transport_of(spec) == "stdio":  # CONNECTION_CLOSED
                    reason = "the server process exited or closed its stdout before completing the MCP handshake"
                raise MCPToolError(
                    ErrorKind.CONNECTION,
                    entry.with_tail(
                        f"could not connect to MCP server '{sid}' ({describe_spec(spec)}): {reason}",
                        wait=0.5,
                    ),
                    server_id=sid,
                    tool=tool,
                    retryable=retryable,
                    stderr_tail=entry.tail(),
                ) from None
            self._sessions[sid] = entry
            return entry

    async def _drop(self, entry: _Session) -> None:
        entry.lost = True
        if self._sessions.get(entry.server_id) is entry:
            self._sessions.pop(entry.server_id, None)
        await entry.aclose(timeout=5.0)

    async def _tools_of(self, entry: _Session) -> dict[str, dict[str, Any]]:
        if entry.tools is None:
            tools: dict[str, dict[str, Any]] = {}
            cursor = None
            from mcp.types import PaginatedRequestParams

            for _ in range(100):
                params = PaginatedRequestParams(cursor=cursor) if cursor else None
                result = await entry.session.list_tools(params=params)
                for t in result.tools:
                    tools[t.name] = {
                        "name": t.name,
                        "description": t.description or "",
                        "input_schema": t.input_schema or {},
                    }
                cursor = result.next_cursor
                if not cursor:
                    break
            entry.tools = tools
        return entry.tools

    async def _lost(self, entry: _Session, exc: BaseException, tool: str | None, what: str) -> MCPToolError:
        await self._drop(entry)
        sid = entry.server_id
        cause = _flatten(entry.end_error) if entry.end_error is not None else None
        if cause is not None and "byte limit" in str(cause):
            # The SDK's legacy SSE client caps one event at 1 MiB (not configurable): the
            # server is fine, the result is too big for this transport. Retrying won't help.
            return MCPToolError(
                ErrorKind.TOOL_ERROR,
                f"the result of {what} on MCP server '{sid}' is larger than the SSE transport allows "
                f"({_describe_exc(cause)}); use transport 'http' (streamable HTTP) for large results",
                server_id=sid,
                tool=tool,
                retryable=False,
            )
        return MCPToolError(
            ErrorKind.SERVER_LOST,
            entry.with_tail(f"MCP server '{sid}' was lost during {what}: {_describe_exc(exc)}", wait=0.5),
            server_id=sid,
            tool=tool,
            stderr_tail=entry.tail(),
        )

    async def _call_tool(self, server: Mapping[str, Any], tool: str, arguments: dict, timeout: float,
                         traceparent: str | None = None) -> ToolCallResult:
        from mcp.shared.exceptions import MCPError
        from mcp_types import CONNECTION_CLOSED, INVALID_PARAMS, REQUEST_TIMEOUT

        if not isinstance(arguments, Mapping):
            raise MCPToolError(ErrorKind.INVALID_ARGUMENTS, "tool arguments must be an object", tool=tool, retryable=False)
        entry = await self._get_session(server, tool)
        sid = entry.server_id
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            # The SDK's own per-request timeout (below) fires first and sends
            # notifications/cancelled; this outer bound also covers the tools/list.
            async with asyncio.timeout(timeout + 1.0):
                if self.validate_arguments:
                    tools = await self._tools_of(entry)
                    if tool not in tools:
                        raise MCPToolError(
                            ErrorKind.TOOL_ERROR,
                            f"tool '{tool}' not found on MCP server '{sid}' "
                            f"(available: {', '.join(sorted(tools)) or 'none'})",
                            server_id=sid,
                            tool=tool,
                            retryable=False,
                        )
                    arguments = coerce_arguments(tools[tool].get("input_schema"), arguments)
                    problems = check_arguments(tools[tool].get("input_schema"), dict(arguments))
                    if problems:
                        raise MCPToolError(
                            ErrorKind.INVALID_ARGUMENTS,
                            f"invalid arguments for {sid}/{tool}: " + "; ".join(problems),
                            server_id=sid,
                            tool=tool,
                            retryable=False,
                        )
                remaining = max(0.001, timeout - (loop.time() - started))
                entry.traceparent = traceparent
                try:
                    result = await entry.session.call_tool(
                        tool, dict(arguments), read_timeout_seconds=remaining, progress_callback=_server_progress,
                        meta={"traceparent": traceparent} if traceparent else None)
                finally:
                    entry.traceparent = None
        except MCPToolError:
            raise
        except TimeoutError:
            raise MCPToolError(
                ErrorKind.TIMEOUT,
                f"MCP tool {sid}/{tool} timed out after {timeout:g}s (the request was cancelled on the server)",
                server_id=sid,
                tool=tool,
            ) from None
        except MCPError as exc:
            if exc.code == REQUEST_TIMEOUT:
                raise MCPToolError(
                    ErrorKind.TIMEOUT,
                    f"MCP tool {sid}/{tool} timed out after {timeout:g}s (the request was cancelled on the server)",
                    server_id=sid,
                    tool=tool,
                ) from None
            if exc.code == CONNECTION_CLOSED:
                raise await self._lost(entry, exc, tool, f"tool call '{tool}'") from None
            error_type = "invalid_arguments" if exc.code == INVALID_PARAMS else "tool_error"
            raise MCPToolError(
                error_type,
                entry.redact(f"MCP server '{sid}' rejected {tool}: {exc.message} (JSON-RPC error {exc.code})"),
                server_id=sid,
                tool=tool,
                retryable=False,
            ) from None
        except asyncio.CancelledError:
            raise
        except RuntimeError as exc:
            if entry.alive():
                text = str(exc).split("\n", 1)[0]
                if "structured content" in text or "output schema" in text or "Invalid schema" in text:
                    text = (f"the result of {sid}/{tool} does not match the tool's outputSchema: {text}. "
                            f"The server's tool is at fault (its result or its declared schema)")
                else:
                    text = f"{sid}/{tool}: {text}"
                raise MCPToolError(ErrorKind.TOOL_ERROR, entry.redact(text), server_id=sid, tool=tool,
                                   retryable=False) from None
            raise await self._lost(entry, exc, tool, f"tool call '{tool}'") from None
        except Exception as exc:
            raise await self._lost(entry, exc, tool, f"tool call '{tool}'") from None

        await _settle_stderr(entry)
        raw = result.model_dump(by_alias=True, mode="json", exclude_none=True)
        raw.setdefault("content", [])
        raw.setdefault("isError", False)
        try:
            value = tool_result_value(raw)
        except MCPToolError as exc:
            exc.server_id, exc.tool = sid, tool
            raise
        return ToolCallResult(value=value, raw=raw)

    async def _list_tools(self, server: Mapping[str, Any], timeout: float) -> list[dict]:
        from mcp.shared.exceptions import MCPError
        from mcp_types import CONNECTION_CLOSED

        entry = await self._get_session(server, None)
        entry.tools = None  # always ask the server
        try:
            async with asyncio.timeout(timeout):
                tools = await self._tools_of(entry)
        except TimeoutError:
            raise MCPToolError(
                ErrorKind.TIMEOUT, f"MCP server '{entry.server_id}' did not list its tools within {timeout:g}s",
                server_id=entry.server_id,
            ) from None
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED:
                raise await self._lost(entry, exc, None, "tools/list") from None
            raise MCPToolError(
                ErrorKind.TOOL_ERROR, entry.redact(f"MCP server '{entry.server_id}' failed tools/list: {exc.message}"),
                server_id=entry.server_id, retryable=False,
            ) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise await self._lost(entry, exc, None, "tools/list") from None
        return [dict(t) for t in tools.values()]

    async def _close_all(self) -> None:
        sessions = list(self._sessions.values())
        self._sessions.clear()
        with self._inflight_lock:
            tasks = list(self._inflight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(s.aclose() for s in sessions), return_exceptions=True)


if sys.version_info < (3, 11):  # pragma: no cover
    raise ImportError("goflow.workers.executors.mcp needs Python 3.11+")
