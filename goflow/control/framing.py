"""Request/reply framing of the coordinator's control socket.

Requests and replies are single-frame msgpack maps. A client uses a DEALER (one frame:
the request) or a REQ (the usual empty delimiter frame is accepted and echoed); the
server is a ROUTER.

    request  {"op": str, "id": any, ...fields}
    reply    {"id": same, "ok": True, ...result}
           | {"id": same, "ok": False, "error": {"type": T, "message": str}}

with T one of ``bad_request``, ``unknown_op``, ``not_found``, ``internal`` (and, on the
client side only, ``timeout``). The publisher-backed ops ``replay`` and ``replay_seq``
are built by :func:`publisher_handlers`.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from concurrent.futures import Future
from typing import Any, Callable

import msgpack
import zmq

from goflow.errors import GoflowError

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Default and ceiling of the number of events one replay reply carries (clients page).
REPLAY_PAGE = 10_000
_NOBLOCK = int(zmq.NOBLOCK)


class ControlError(GoflowError):
    """An error reply from the control socket (or a timeout reaching it).

    ``type`` is one of :data:`goflow.errors.CONTROL_ERROR_KINDS`.
    """

    def __init__(self, type: str, message: str, *, reply: dict | None = None, details: dict | None = None):
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.reply = reply
        self.details = details or (reply or {}).get("error", {}).get("details") or {}


class ControlTimeout(ControlError):
    """No reply within the client's timeout (the coordinator is down or overloaded)."""

    def __init__(self, message: str):
        super().__init__("timeout", message)


def _error(req_id: Any, type: str, message: str) -> dict:
    return {"id": req_id, "ok": False, "error": {"type": type, "message": message}}


_packb = msgpack.Packer(use_bin_type=True).pack


class ControlServer:
    """Serve control requests on a bound ROUTER socket. Never raises from ``on_readable``.

    ``handlers[op](request) -> dict`` result; raise :class:`ControlError` to reply with
    that error type, anything else becomes an ``internal`` error. A handler may instead
    return a Future of that dict (slow work off the socket's thread, e.g. loading a big
    submission); the reply is sent when it resolves.
    """

    def __init__(self, socket: zmq.Socket, handlers: dict[str, Callable[[dict], Any]], *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 call_soon: Callable[[Callable[[], None]], None] | None = None):
        self.socket = socket
        self.call_soon = call_soon
        """Runs a callable on this socket's thread; needed by handlers that return a Future."""
        self.handlers = dict(handlers)
        self.max_message_bytes = int(max_message_bytes)
        self.stats = {"requests": 0, "replies": 0, "bad_frames": 0, "errors": 0,
                      "unknown_ops": 0, "handler_errors": 0, "reply_dropped": 0}

    def register(self, op: str, handler: Callable[[dict], dict]) -> None:
        self.handlers[op] = handler

    def on_readable(self, max_messages: int = 1000) -> None:
        """Drain up to ``max_messages`` requests, replying to each."""
        for _ in range(max_messages):
            try:
                frames = self.socket.recv_multipart(_NOBLOCK, copy=True)
            except zmq.Again:
                return
            except zmq.ZMQError:  # pragma: no cover - socket closed under us
                log.exception("control socket recv failed")
                return
            try:
                self._handle(frames)
            except Exception:  # pragma: no cover - last line of defence
                self.stats["errors"] += 1
                log.exception("control request handling failed")

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self.stats["bad_frames"] += 1      # no reply address we can trust
            return
        ident = frames[0]
        if len(frames) == 2:
            envelope = [ident]
            payload = frames[1]
        elif len(frames) == 3 and frames[1] == b"":
            envelope = [ident, b""]            # REQ client
            payload = frames[2]
        else:
            self.stats["bad_frames"] += 1
            self._reply(envelope=[ident], reply=_error(
                None, "bad_request", f"expected 1 frame (DEALER) or delimiter + 1 frame (REQ), "
                f"got {len(frames) - 1}"))
            return
        self.stats["requests"] += 1
        if len(payload) > self.max_message_bytes:
            self.stats["bad_frames"] += 1
            self._reply(envelope, _error(None, "bad_request",
                                         f"message of {len(payload)} bytes exceeds the "
                                         f"{self.max_message_bytes}-byte limit"))
            return
        try:
            request = msgpack.unpackb(payload, raw=False)
        except Exception as exc:
            self.stats["bad_frames"] += 1
            self._reply(envelope, _error(None, "bad_request", f"request is not msgpack: {exc}"))
            return
        if not isinstance(request, dict):
            self.stats["bad_frames"] += 1
            self._reply(envelope, _error(None, "bad_request",
                                         f"request must be a msgpack map, got "
                                         f"{type(request).__name__}"))
            return
        req_id = request.get("id")
        op = request.get("op")
        if not isinstance(op, str) or not op:
            self.stats["bad_frames"] += 1
            self._reply(envelope, _error(req_id, "bad_request", "request has no 'op' string"))
            return
        handler = self.handlers.get(op)
        if handler is None:
            self.stats["unknown_ops"] += 1
            self._reply(envelope, _error(req_id, "unknown_op", f"unknown op {op!r}; known: "
                                         f"{', '.join(sorted(self.handlers))}"))
            return
        self._answer(envelope, req_id, op, lambda: handler(request))

    def _answer(self, envelope: list[bytes], req_id: Any, op: str, compute: Callable[[], Any]) -> None:
        """Reply with ``compute()``'s result or error. A handler that returns a
        :class:`~concurrent.futures.Future` (work done off this thread) is answered once it
        resolves, back on this socket's thread through ``call_soon``."""
        try:
            result = compute()
        except ControlError as exc:
            # Its traceback holds this frame, whose ``compute`` may be a Future holding exc: a
            # cycle that kept a refused submission's whole parsed text alive until a collection.
            exc.__traceback__ = None
            reply = _error(req_id, exc.type, exc.message)
            if exc.details:
                reply["error"]["details"] = exc.details
            self._reply(envelope, reply)
            return
        except Exception as exc:
            self.stats["handler_errors"] += 1
            log.exception("control op %r failed", op)
            self._reply(envelope, _error(req_id, "internal", f"{type(exc).__name__}: {exc}"))
            return
        if isinstance(result, Future):
            if self.call_soon is None:
                raise RuntimeError(f"op {op!r} answered later, but the server has no call_soon")
            result.add_done_callback(lambda done: self.call_soon(  # type: ignore[misc]
                lambda: self._answer(envelope, req_id, op, done.result)))
            return
        reply = {"id": req_id, "ok": True}
        if result:
            reply.update(result)
            reply["id"] = req_id
            reply["ok"] = True
        self._reply(envelope, reply)

    def _reply(self, envelope: list[bytes], reply: dict) -> None:
        try:
            data = _packb(reply)
        except Exception as exc:
            self.stats["handler_errors"] += 1
            req_id = reply.get("id")
            if not isinstance(req_id, (str, int, float, bool, bytes, type(None))):
                req_id = None
            data = _packb(_error(req_id, "internal", f"reply cannot be encoded: {exc}"))
        try:
            self.socket.send_multipart([*envelope, data], _NOBLOCK)
            self.stats["replies"] += 1
        except zmq.Again:
            self.stats["reply_dropped"] += 1
        except zmq.ZMQError:  # pragma: no cover - e.g. host unreachable with ROUTER_MANDATORY
            self.stats["reply_dropped"] += 1


# -- publisher-backed ops -----------------------------------------------------------------
def _int_field(req: dict, name: str, default: Any = ..., minimum: int | None = None) -> Any:
    value = req.get(name, default)
    if value is ...:
        raise ControlError("bad_request", f"'{name}' is required")
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlError("bad_request", f"'{name}' must be an integer")
    if minimum is not None and value < minimum:
        raise ControlError("bad_request", f"'{name}' must be >= {minimum}")
    return value


def replay_handler(publisher) -> Callable[[dict], dict]:
    """``replay {execution_id, from_eseq=1, to_eseq?, limit?}``.

    Reply ``{events: [payload...], oldest_eseq, last_eseq, complete, finished, epoch}``;
    ``complete`` is true when every event in ``[from_eseq, min(to_eseq, last_eseq)]`` is
    in ``events`` (false when older ones were evicted or the page limit cut the reply).
    """
    def replay(req: dict) -> dict:
        eid = req.get("execution_id")
        if not isinstance(eid, str):
            raise ControlError("bad_request", "'execution_id' must be a string")
        from_eseq = _int_field(req, "from_eseq", 1, minimum=1)
        to_eseq = _int_field(req, "to_eseq", None)
        limit = min(_int_field(req, "limit", REPLAY_PAGE, minimum=1), REPLAY_PAGE)
        if not publisher.has_execution(eid):
            raise ControlError("not_found", f"no event log for execution {eid!r} "
                                            f"(unknown or evicted)")
        events = publisher.replay(eid, from_eseq, to_eseq, limit=limit)
        last = publisher.last_eseq(eid)
        oldest = publisher.oldest_eseq(eid)
        target = last if to_eseq is None else min(to_eseq, last)
        wanted = max(0, target - from_eseq + 1)
        return {"events": events, "oldest_eseq": oldest, "last_eseq": last,
                "complete": len(events) == wanted, "finished": publisher.is_finished(eid),
                "epoch": publisher.epoch}
    return replay


def replay_seq_handler(publisher) -> Callable[[dict], dict]:
    """``replay_seq {from_seq, limit?}`` -> ``{events: [[topic, payload]...], oldest_seq, last_seq, epoch}``."""
    def replay_seq(req: dict) -> dict:
        from_seq = _int_field(req, "from_seq", 1, minimum=0)
        limit = min(_int_field(req, "limit", REPLAY_PAGE, minimum=1), REPLAY_PAGE)
        events = publisher.replay_seq(from_seq, limit=limit)
        return {"events": [[t, p] for t, p in events], "oldest_seq": publisher.oldest_seq,
                "last_seq": publisher.last_seq, "epoch": publisher.epoch}
    return replay_seq


def publisher_handlers(publisher) -> dict[str, Callable[[dict], dict]]:
    """The control ops served from an :class:`~goflow.events.publisher.EventPublisher`."""
    return {"replay": replay_handler(publisher), "replay_seq": replay_seq_handler(publisher)}


# -- client -------------------------------------------------------------------------------
def _apply_curve(sock: zmq.Socket, curve: dict | None) -> None:
    """Client-side CURVE: ``{"server_public": ..., "public"?: ..., "secret"?: ...}``."""
    if not curve:
        return
    public, secret = curve.get("public"), curve.get("secret")
    if not (public and secret):
        public, secret = zmq.curve_keypair()
    sock.curve_serverkey = curve["server_public"]
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def _check_reply(reply: Any) -> dict:
    if not isinstance(reply, dict):
        raise ControlError("bad_request", "reply is not a msgpack map")
    if reply.get("ok"):
        return reply
    err = reply.get("error") or {}
    raise ControlError(str(err.get("type", "internal")), str(err.get("message", "")), reply=reply)


class ControlClient:
    """Blocking DEALER client. Not thread-safe: one per thread.

    A request is sent without blocking, within its timeout: a DEALER queues a message only
    for a peer it has, and once a coordinator refused this client's CURVE key (a failed
    handshake) there is none and no reconnection, so a blocking send waited forever
    (``goflow ls`` with an unknown key hung instead of exiting 3 after ``--request-timeout``).
    """

    def __init__(self, endpoint: str, *, context: zmq.Context | None = None,
                 timeout: float = 5.0, curve: dict | None = None):
        self.endpoint = endpoint
        self.context = context or zmq.Context.instance()
        self.timeout = timeout
        self.curve = curve
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        self.socket = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        _apply_curve(sock, self.curve)
        sock.connect(self.endpoint)
        return sock

    def _reconnect(self) -> None:
        self.socket.close(0)
        self.socket = self._connect()

    def request(self, op: str, timeout: float | None = None, **fields) -> dict:
        """Send ``{"op": op, **fields}`` and return the ``ok`` reply (raises ControlError)."""
        req_id = f"{self._prefix}-{next(self._ids)}"
        payload = _packb({**fields, "op": op, "id": req_id})
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            try:
                self.socket.send(payload, zmq.NOBLOCK)
                break
            except zmq.Again:   # no peer to queue it for (see ControlClient)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._reconnect()
                    raise ControlTimeout(f"no reply to {op!r} from {self.endpoint} within {limit:g} s") from None
                self.socket.poll(int(remaining * 1000) + 1, zmq.POLLOUT)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.socket.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                if time.monotonic() < deadline:
                    continue
                self._reconnect()   # drop the queued request and any late reply
                raise ControlTimeout(f"no reply to {op!r} from {self.endpoint} within {limit:g} s")
            frames = self.socket.recv_multipart()
            try:
                reply = msgpack.unpackb(frames[-1], raw=False)
            except Exception as exc:
                raise ControlError("bad_request", f"reply is not msgpack: {exc}") from exc
            if isinstance(reply, dict) and reply.get("id") not in (req_id, None):
                continue   # a stale reply to an earlier, timed-out request
            return _check_reply(reply)

    def close(self) -> None:
        self.socket.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncControlClient:
    """asyncio twin of :class:`ControlClient` (``zmq.asyncio``)."""

    def __init__(self, endpoint: str, *, context=None, timeout: float = 5.0,
                 curve: dict | None = None):
        import zmq.asyncio
        self.endpoint = endpoint
        self.context = context if isinstance(context, zmq.asyncio.Context) else \
            zmq.asyncio.Context.instance()
        self.timeout = timeout
        self.curve = curve
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        self.socket = self._connect()

    def _connect(self):
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        _apply_curve(sock, self.curve)
        sock.connect(self.endpoint)
        return sock

    async def request(self, op: str, timeout: float | None = None, **fields) -> dict:
        req_id = f"{self._prefix}-{next(self._ids)}"
        payload = _packb({**fields, "op": op, "id": req_id})
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            try:
                await self.socket.send(payload, zmq.NOBLOCK)
                break
            except zmq.Again:   # no peer to queue it for (see ControlClient)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.socket.close(0)
                    self.socket = self._connect()
                    raise ControlTimeout(f"no reply to {op!r} from {self.endpoint} within {limit:g} s") from None
                await self.socket.poll(int(remaining * 1000) + 1, zmq.POLLOUT)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self.socket.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                if time.monotonic() < deadline:
                    continue
                self.socket.close(0)
                self.socket = self._connect()
                raise ControlTimeout(f"no reply to {op!r} from {self.endpoint} within {limit:g} s")
            frames = await self.socket.recv_multipart()
            try:
                reply = msgpack.unpackb(frames[-1], raw=False)
            except Exception as exc:
                raise ControlError("bad_request", f"reply is not msgpack: {exc}") from exc
            if isinstance(reply, dict) and reply.get("id") not in (req_id, None):
                continue
            return _check_reply(reply)

    def close(self) -> None:
        self.socket.close(0)
