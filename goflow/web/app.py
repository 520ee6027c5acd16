"""The gateway's HTTP surface: the page, ``/api/events`` (SSE) and the JSON API (Starlette).

Routes (docs/web.md has the contract):

- ``GET /`` and ``/static/...``: the page, shipped inside the package.
- ``GET /api/events?execution=E&types=T,...&nodes=N,...&since=start|now``: Server-Sent Events;
  ``id:`` is ``<epoch>:<seq>``; ``Last-Event-ID`` (or ``last_event_id=``) resumes after it.
- ``GET /api/executions[?status=&workflow=&limit=&offset=]``, ``GET /api/executions/{id}``,
  ``GET /api/executions/{id}/events[?from_eseq=&types=&nodes=]``, ``GET /api/workers``,
  ``GET /api/metrics``.
- ``POST /api/executions`` (submit) and ``POST /api/executions/{id}/cancel`` when the gateway
  fronts a daemon (``allow_control``).

Every request passes :class:`Guard` first: the token when one is configured, the Host check
(DNS rebinding) on loopback, the Origin check on POST, and the security headers (strict CSP,
no inline script) on every response.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from urllib.parse import parse_qs, urlencode

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from goflow.control.framing import ControlClient, ControlError
from goflow.events.codec import decode_payload
from goflow.events.filter import EventFilter
from goflow.events.types import EVENT_TYPES, Event
from goflow.web.hub import DEFAULT_HEARTBEAT_S, Hub, parse_event_id, to_json

log = logging.getLogger("goflow.web")

STATIC = Path(__file__).parent / "static"
TOKEN_COOKIE = "goflow_token"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
#: Executions the gateway remembers from the stream (the history store holds the rest).
INDEX_CAPACITY = 1000
MAX_PAGE = 500
#: A browser whose socket accepts nothing for this long is cut off (it resumes by id).
DEFAULT_STALL_S = 10.0


@dataclass
class GatewayConfig:
    """What a gateway connects to and how it guards itself."""

    events: str
    control: str | None
    curve: dict | None = None
    token: str | None = None
    db: str | None = None
    allow_control: bool = False
    allowed_hosts: tuple[str, ...] = ()
    capacity: int | None = None
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    stall_s: float = DEFAULT_STALL_S


# -- the guard ---------------------------------------------------------------------------
def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def request_token(scope: dict) -> str | None:
    """The token a request presents: ``Authorization: Bearer``, the cookie, or ``?token=``."""
    auth = _header(scope, b"authorization")
    if auth and auth.lower().startswith("bearer "):
        return auth[7:].strip()
    cookie = _header(scope, b"cookie")
    if cookie:
        jar = SimpleCookie()
        try:
            jar.load(cookie)
        except Exception:
            jar = SimpleCookie()
        if TOKEN_COOKIE in jar:
            return jar[TOKEN_COOKIE].value
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
    return values[0] if values else None


class Guard:
    """ASGI middleware: authentication, Host and Origin checks, security headers."""

    def __init__(self, app: Any, config: GatewayConfig):
        self.app = app
        self.token = config.token
        self.allowed_hosts = {h.lower() for h in config.allowed_hosts}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, secured_send)
            return
        if self.token and scope.get("method") == "GET" and "token=" in scope.get("query_string", b"").decode(
                "latin-1") and not scope["path"].startswith("/api/"):
            await self._set_cookie(scope, receive, secured_send)
            return
        await self.app(scope, receive, secured_send)

    def _refusal(self, scope: dict) -> Response | None:
        host = (_header(scope, b"host") or "").lower()
        if self.allowed_hosts and host not in self.allowed_hosts:
            return JSONResponse({"error": {"type": "forbidden", "message": f"unexpected Host {host!r}"}}, 403)
        if self.token:
            presented = request_token(scope)
            if presented is None or not hmac.compare_digest(presented.encode(), self.token.encode()):
                return JSONResponse({"error": {"type": "unauthorized", "message": "a valid token is required "
                                               "(Authorization: Bearer TOKEN, or open /?token=TOKEN once)"}},
                                    401, headers={"WWW-Authenticate": "Bearer"})
        if scope.get("method") not in ("GET", "HEAD"):
            origin = _header(scope, b"origin")
            if origin is not None and origin.lower() not in {f"http://{host}", f"https://{host}"}:
                return JSONResponse({"error": {"type": "forbidden", "message": "cross-origin request refused"}},
                                    403)
            if not (_header(scope, b"content-type") or "").startswith("application/json"):
                return JSONResponse({"error": {"type": "bad_request", "message": "send application/json"}}, 415)
        return None

    async def _set_cookie(self, scope: dict, receive: Callable, send: Callable) -> None:
        """``/?token=T`` (checked above): keep the token in an HttpOnly cookie and drop it
        from the address bar, so the page and its EventSource authenticate without it."""
        query = {k: v for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()
                 if k != "token"}
        target = scope["path"] + (("?" + urlencode(query, doseq=True)) if query else "")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(TOKEN_COOKIE, self.token or "", httponly=True, samesite="strict", path="/")
        await response(scope, receive, send)


# -- the gateway state -------------------------------------------------------------------
class ExecutionIndex:
    """Execution summaries folded from the stream (last ``INDEX_CAPACITY``), for the list."""

    def __init__(self, capacity: int = INDEX_CAPACITY):
        self.capacity = capacity
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def observe(self, ev: Event) -> None:
        eid = ev.execution_id
        if eid is None:
            return
        if ev.type == "execution.started" or ev.type == "execution.resumed" or ev.is_terminal \
                or ev.type == "progress.update":
            with self._lock:
                item = self._items.get(eid)
                if item is None:
                    item = self._items[eid] = {"execution_id": eid, "workflow": ev.workflow, "status": "running",
                                               "started_at": ev.ts, "finished_at": None, "error": None,
                                               "progress": None}
                    while len(self._items) > self.capacity:
                        self._items.popitem(last=False)
                if ev.type == "progress.update":
                    item["progress"] = ev.meta
                elif ev.is_terminal:
                    item.update(status=ev.status, finished_at=ev.ts, error=ev.error)
                elif ev.type == "execution.resumed":
                    item["status"] = "running"

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(item) for item in self._items.values()]


class Gateway:
    """The hub, the execution index, control clients (one per worker thread) and the store."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.index = ExecutionIndex()
        self.hub = Hub(config.events, config.control, curve=config.curve, on_event=self.index.observe,
                       **({"capacity": config.capacity} if config.capacity else {}))
        self._local = threading.local()
        self._clients: list[ControlClient] = []
        self._clients_lock = threading.Lock()
        self.store = None
        if config.db:
            from goflow.history.store import Store

            self.store = Store(config.db, readonly=True)

    def _client(self) -> ControlClient:
        client = getattr(self._local, "client", None)
        if client is None:
            if not self.config.control:
                raise ControlError("unavailable", "this gateway has no control endpoint")
            curve = None
            if self.config.curve:
                curve = dict(self.config.curve)
                if curve.get("control_server_public"):
                    curve["server_public"] = curve["control_server_public"]
            client = self._local.client = ControlClient(self.config.control, curve=curve, timeout=5.0)
            with self._clients_lock:
                self._clients.append(client)
        return client

    async def request(self, op: str, **fields: Any) -> dict:
        """A control request, off the event loop (ControlClient is blocking)."""
        def call() -> dict:
            reply = self._client().request(op, **fields)
            return {k: v for k, v in reply.items() if k not in ("id", "ok")}
        return await anyio.to_thread.run_sync(call)

    async def history(self, method: str, *args: Any, **kwargs: Any) -> Any:
        assert self.store is not None
        return await anyio.to_thread.run_sync(lambda: getattr(self.store, method)(*args, **kwargs))

    def close(self) -> None:
        self.hub.stop()
        with self._clients_lock:
            for client in self._clients:
                client.close()
        if self.store is not None:
            self.store.close()


# -- helpers -----------------------------------------------------------------------------
def _json(data: Any, status: int = 200) -> Response:
    return Response(to_json(data), status_code=status, media_type="application/json")


def _error(status: int, type: str, message: str, **extra: Any) -> Response:
    return _json({"error": {"type": type, "message": message, **extra}}, status)


_STATUS_OF_ERROR = {"not_found": 404, "bad_request": 400, "invalid_workflow": 400, "unavailable": 503,
                    "timeout": 504, "unknown_op": 501}


def _control_error(exc: ControlError) -> Response:
    status = _STATUS_OF_ERROR.get(exc.type, 502)
    extra = {"details": exc.details} if getattr(exc, "details", None) else {}
    return _error(status, exc.type, str(exc.args[0]) if exc.args else exc.type, **extra)


def _csv(request: Request, name: str) -> list[str] | None:
    values = [part for raw in request.query_params.getlist(name) for part in raw.split(",") if part]
    return values or None


def _int(request: Request, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be between {minimum} and {maximum}")
    return value


def event_filter(request: Request) -> EventFilter:
    """EventFilter from ``execution``, ``types``, ``nodes`` (repeatable or comma-separated)."""
    types = _csv(request, "types")
    unknown = [t for t in types or () if t not in EVENT_TYPES]
    if unknown:
        raise ValueError(f"unknown event type(s): {', '.join(unknown)}")
    return EventFilter(types=types, executions=_csv(request, "execution"), nodes=_csv(request, "nodes"))


def _decoded(payloads: list[bytes]) -> list[dict]:
    return [decode_payload(p) for p in payloads]


# -- the app -----------------------------------------------------------------------------
def create_app(config: GatewayConfig) -> Any:
    """The ASGI application (Starlette wrapped in :class:`Guard`); ``app.state.gateway``."""
    gateway = Gateway(config)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def executions(request: Request) -> Response:
        try:
            limit = _int(request, "limit", 50, 1, MAX_PAGE)
            offset = _int(request, "offset", 0, 0)
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        status, workflow = request.query_params.get("status"), request.query_params.get("workflow")
        last_event_id = gateway.hub.last_event_id()   # before the index: a stream resumed from it misses nothing
        merged = {item["execution_id"]: item for item in gateway.index.items()}
        if gateway.store is not None:
            for row in await gateway.history("list_executions", workflow=workflow, status=status,
                                             limit=limit + offset):
                merged.setdefault(row["id"], {"execution_id": row["id"], "workflow": row["workflow"],
                                              "status": row["status"], "started_at": row["started_at"],
                                              "finished_at": row["finished_at"], "error": row["error"],
                                              "progress": None})
        items = [item for item in merged.values()
                 if (not status or item["status"] == status) and (not workflow or item["workflow"] == workflow)]
        items.sort(key=lambda item: (-(item["started_at"] or 0), item["execution_id"]))
        return _json({"executions": items[offset:offset + limit], "total": len(items), "offset": offset,
                      "limit": limit, "last_event_id": last_event_id})

    async def execution(request: Request) -> Response:
        eid = request.path_params["id"]
        try:
            detail = await gateway.request("execution", execution_id=eid)
            eid = detail["execution_id"]
            detail["graph"] = await gateway.request("graph", execution_id=eid)
            base = await gateway.request("variables", execution_id=eid)
            # the snapshot and its version: the page's base when the execution's first
            # events have left the ring (docs/events.md §1 "Variables")
            detail["variables"], detail["variables_vseq"] = base.get("variables"), base.get("vseq")
            detail["source"] = "coordinator"
            return _json(detail)
        except ControlError as exc:
            if exc.type != "not_found" or gateway.store is None:
                return _control_error(exc)
        return await _from_history(eid)

    async def _from_history(eid: str) -> Response:
        from goflow.history.store import HistoryError

        try:
            row = await gateway.history("get_execution", eid)
        except HistoryError as exc:
            return _error(404, "not_found", str(exc))
        graph = None
        if row.get("workflow_text"):
            from goflow.language.graph import workflow_graph
            from goflow.language.loader import parse

            loaded = parse(row["workflow_text"], row.get("workflow") or "<history>")
            if loaded.workflow is not None:
                graph = workflow_graph(loaded.workflow)
        row.pop("workflow_text", None)
        return _json({"execution_id": row["id"], "workflow": row["workflow"], "status": row["status"],
                      "started_at": row["started_at"], "finished_at": row["finished_at"], "error": row["error"],
                      "result": row.get("result"), "variables": row.get("variables_out"),
                      "records": row.get("nodes"), "nodes": {}, "graph": graph, "source": "history"})

    async def execution_events(request: Request) -> Response:
        eid = request.path_params["id"]
        try:
            from_eseq = _int(request, "from_eseq", 1, 1)
            limit = _int(request, "limit", 10_000, 1, 10_000)
            filt = event_filter(request)
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        try:
            reply = await gateway.request("replay", execution_id=eid, from_eseq=from_eseq, limit=limit)
            events = [e for e in _decoded(reply["events"]) if filt.matches(e)]
            return _json({"execution_id": eid, "events": events, "complete": reply.get("complete"),
                          "last_eseq": reply.get("last_eseq"), "source": "coordinator"})
        except ControlError as exc:
            if exc.type != "not_found" or gateway.store is None:
                return _control_error(exc)
        if await gateway.history("execution_status", eid) is None:
            return _error(404, "not_found", f"no execution {eid!r}")
        payloads = await gateway.history("events", eid, from_eseq=from_eseq, types=filt.types, nodes=filt.nodes)
        events = _decoded(payloads[:limit])
        return _json({"execution_id": eid, "events": events, "complete": len(payloads) <= limit,
                      "source": "history"})

    async def workers(request: Request) -> Response:
        try:
            return _json(await gateway.request("workers"))
        except ControlError as exc:
            return _control_error(exc)

    async def metrics(request: Request) -> Response:
        counts: dict[str, int] = {}
        for item in gateway.index.items():
            counts[item["status"]] = counts.get(item["status"], 0) + 1
        return _json({"executions": counts, "gateway": dict(gateway.hub.stats),
                      "subscriber": dict(gateway.hub.monitor.stats), "epoch": gateway.hub.epoch,
                      "last_seq": gateway.hub.last_seq(),
                      "ring": {"capacity": gateway.hub.capacity, "held": gateway.hub.next_pos
                               - gateway.hub.oldest_pos},
                      "control": config.allow_control})

    async def submit(request: Request) -> Response:
        if not config.allow_control:
            return _error(403, "forbidden", "this gateway does not front a daemon: submit is off")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "bad_request", "the body must be JSON")
        if not isinstance(body, dict) or not isinstance(body.get("workflow"), str):
            return _error(400, "bad_request", "send {\"workflow\": YAML text, \"variables\"?: {...}, \"name\"?: str}")
        fields = {k: body[k] for k in ("workflow", "variables", "name", "timeout") if body.get(k) is not None}
        try:
            return _json(await gateway.request("submit", **fields), 201)
        except ControlError as exc:
            return _control_error(exc)

    async def cancel(request: Request) -> Response:
        if not config.allow_control:
            return _error(403, "forbidden", "this gateway does not front a daemon: cancel is off")
        try:
            body = await request.json()
        except ValueError:
            body = {}
        reason = body.get("reason") if isinstance(body, dict) else None
        try:
            return _json(await gateway.request("cancel", execution_id=request.path_params["id"],
                                               reason=str(reason or "cancelled from the dashboard")))
        except ControlError as exc:
            return _control_error(exc)

    routes = [
        Route("/", index),
        Route("/api/executions", executions, methods=["GET"]),
        Route("/api/executions", submit, methods=["POST"]),
        Route("/api/executions/{id}", execution),
        Route("/api/executions/{id}/events", execution_events),
        Route("/api/executions/{id}/cancel", cancel, methods=["POST"]),
        Route("/api/workers", workers),
        Route("/api/metrics", metrics),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gateway.hub.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(gateway.close)

    starlette = Starlette(routes=routes, lifespan=lifespan)
    sse = EventStream(gateway, config)

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] == "/api/events":
            await sse(scope, receive, send)
        else:
            await starlette(scope, receive, send)

    guarded = Guard(app, config)
    guarded.gateway = gateway   # type: ignore[attr-defined]
    return guarded


class EventStream:
    """``GET /api/events``: a raw ASGI endpoint, so that a stalled browser can be cut off
    (a send that does not complete within ``stall_s``) and a disconnect ends the stream."""

    def __init__(self, gateway: Gateway, config: GatewayConfig):
        self.gateway = gateway
        self.config = config

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        request = Request(scope, receive)
        try:
            filt = event_filter(request)
        except ValueError as exc:
            await _error(400, "bad_request", str(exc))(scope, receive, send)
            return
        hub = self.gateway.hub
        last = parse_event_id(request.headers.get("last-event-id") or request.query_params.get("last_event_id"))
        if last is not None:
            start = hub.position_after(last)
        elif request.query_params.get("since") == "now":
            start = hub.next_pos
        else:
            start = hub.start_position(filt.executions)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})

        async def stream() -> None:
            hello = {"epoch": hub.epoch, "oldest": hub.oldest_pos, "resumed": last is not None}
            frames = f"retry: 1000\nevent: hello\ndata: {json.dumps(hello)}\n\n"
            await self._send(send, frames.encode())
            async for chunk in hub.follow(filt, start, after=last, heartbeat_s=self.config.heartbeat_s):
                await self._send(send, chunk)

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        streaming = asyncio.ensure_future(stream())
        watching = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, watching):
                task.cancel()
        # Overtaken by the ring: end the response, the browser reconnects by id. Stalled: return
        # without ending it (a socket that accepts nothing cannot take the last chunk either),
        # and uvicorn closes the connection; the browser reconnects by id as well.
        if streaming in done and not streaming.cancelled() and streaming.exception() is None:
            try:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except Exception:
                pass

    async def _send(self, send: Callable, body: bytes) -> None:
        try:
            await asyncio.wait_for(send({"type": "http.response.body", "body": body, "more_body": True}),
                                   self.config.stall_s)
        except asyncio.TimeoutError:
            self.gateway.hub.stats["cut_off"] += 1
            raise _Stalled() from None


class _Stalled(Exception):
    """A browser that accepted nothing for ``stall_s``."""
