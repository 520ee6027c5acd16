"""Client side of the event stream: :class:`Monitor`.

``Monitor.subscribe`` yields :class:`~goflow.events.types.Event` objects. In reliable
mode (the default) every event of the selected stream is delivered exactly once and in
order, or its loss is counted in ``monitor.stats["lost"]`` and described in
``monitor.losses``; see ``docs/events.md`` for the protocol.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, AsyncIterator, Callable, Generator, Iterator, Literal

import zmq

from goflow.control.framing import AsyncControlClient, ControlClient, ControlError, ControlTimeout
from goflow.events.codec import decode_event, topic_for
from goflow.events.filter import EventFilter
from goflow.events.snapshots import ExecutionSnapshot
from goflow.events.types import EXECUTION_SCOPED_TYPES, HEARTBEAT, TERMINAL_TYPES, Event

Since = Literal["now", "start"] | int
_FAR = 2 ** 62           # "after everything": used to ask for the latest eseq/seq only
_POLL_MS = 500
DEFAULT_RCVHWM = 100_000
_NOBLOCK = int(zmq.NOBLOCK)

Request = tuple[str, dict]


class _Reliable:
    """Gap detection and repair state for one subscription.

    ``initial`` and ``process`` are generators that yield control requests
    ``(op, fields)``, receive the reply dict (or a thrown :class:`ControlError`) and
    return the list of events to deliver, so the same logic drives the blocking and the
    asyncio subscriber.
    """

    def __init__(self, filt: EventFilter, stats: dict, losses: deque, can_repair: bool):
        self.filter = filt
        self.stats = stats
        self.losses = losses
        self.can_repair = can_repair
        self.per_execution = bool(filt.executions)
        self.executions = frozenset(filt.executions or ())
        self.epoch: str | None = None
        self.expected: dict[str, int] = {}      # per-execution mode: next eseq
        self.next_seq: int | None = None         # all-executions mode: next seq
        self.snapshots: dict[str, ExecutionSnapshot] = {}   # running executions' variables

    def prefixes(self) -> list[str]:
        if self.per_execution:   # the whole stream of each execution, plus heartbeats
            return [f"{t}/{e}/" for e in self.filter.executions for t in EXECUTION_SCOPED_TYPES] \
                + ["heartbeat/"]
        return [""]

    # -- bookkeeping ------------------------------------------------------------------
    def _loss(self, count: int, reason: str, **where: Any) -> None:
        if count <= 0:
            return
        key = "truncated" if reason == "evicted before subscribe" else "lost"
        self.stats[key] += count
        self.losses.append({"count": count, "reason": reason, "epoch": self.epoch, **where})

    # -- fetching -----------------------------------------------------------------------
    def _fetch_execution(self, eid: str, start: int, end: int | None
                         ) -> Generator[Request, dict, tuple[list[Event], int | None]]:
        """Events ``start..end`` of one execution (paged). Returns (events, last_eseq)."""
        out: list[Event] = []
        last: int | None = None
        cur = start
        while end is None or cur <= end:
            fields = {"execution_id": eid, "from_eseq": cur}
            if end is not None:
                fields["to_eseq"] = end
            try:
                reply = yield ("replay", fields)
            except ControlError as exc:
                if exc.type == "not_found":
                    return out, None
                self.losses.append({"count": 0, "reason": f"replay failed: {exc}",
                                    "execution_id": eid})
                return out, last
            if self.epoch is None:
                self.epoch = reply.get("epoch")
            if reply.get("epoch") not in (None, self.epoch):
                return out, last     # the coordinator restarted; the live stream will say so
            last = reply.get("last_eseq")
            events = []
            for p in reply.get("events") or ():
                ev = decode_event(b"", p)
                ev.topic = topic_for(ev.type, ev.execution_id, ev.node_id)
                events.append(ev)
            if not events:
                break
            out.extend(events)
            cur = events[-1].eseq + 1
            if reply.get("complete"):
                break
        return out, last

    def _fetch_global(self, start: int, end: int | None
                      ) -> Generator[Request, dict, tuple[list[Event], int | None]]:
        out: list[Event] = []
        last: int | None = None
        cur = start
        while end is None or cur <= end:
            try:
                reply = yield ("replay_seq", {"from_seq": cur})
            except ControlError as exc:
                self.losses.append({"count": 0, "reason": f"replay_seq failed: {exc}"})
                return out, last
            if self.epoch is None:
                self.epoch = reply.get("epoch")
            if reply.get("epoch") not in (None, self.epoch):
                return out, last
            last = reply.get("last_seq")
            events = [decode_event(t, p) for t, p in reply.get("events") or ()]
            events = [e for e in events if end is None or e.seq <= end]
            if not events:
                break
            out.extend(events)
            cur = events[-1].seq + 1
        return out, last

    # -- repair ------------------------------------------------------------------------
    def _repair_execution(self, eid: str, start: int, end: int | None, reason: str,
                          counter: str = "repaired", truncated: bool = False
                          ) -> Generator[Request, dict, list[Event]]:
        deliver: list[Event] = []
        events, last = ([], None)
        if self.can_repair:
            events, last = yield from self._fetch_execution(eid, start, end)
        if end is None:
            end = last if last is not None else start - 1
        exp = start
        for ev in events:
            if ev.eseq is None or ev.eseq < exp or ev.eseq > end:
                continue
            if ev.eseq > exp:
                self._loss(ev.eseq - exp, "evicted before subscribe" if truncated
                           else "not in replay log", execution_id=eid,
                           from_eseq=exp, to_eseq=ev.eseq - 1)
            self.stats[counter] += 1
            exp = ev.eseq + 1
            yield from self._accept(ev, deliver)
        if exp <= end:
            self._loss(end - exp + 1, reason if self.can_repair else f"{reason} (no control "
                       f"endpoint to repair from)", execution_id=eid, from_eseq=exp, to_eseq=end)
            exp = end + 1
        self.expected[eid] = max(self.expected.get(eid, 1), exp)
        return deliver

    def _repair_global(self, start: int, end: int | None, reason: str,
                       counter: str = "repaired", truncated: bool = False
                       ) -> Generator[Request, dict, list[Event]]:
        deliver: list[Event] = []
        events, last = ([], None)
        if self.can_repair:
            events, last = yield from self._fetch_global(start, end)
        if end is None:
            end = max(last if last is not None else start - 1,
                      events[-1].seq if events else start - 1)
        exp = start
        for ev in events:
            if ev.seq < exp or ev.seq > end:
                continue
            if ev.seq > exp:
                self._loss(ev.seq - exp, "evicted before subscribe" if truncated
                           else "not in replay ring", from_seq=exp, to_seq=ev.seq - 1)
            self.stats[counter] += 1
            exp = ev.seq + 1
            yield from self._accept(ev, deliver)
        if exp <= end:
            self._loss(end - exp + 1, reason if self.can_repair else f"{reason} (no control "
                       f"endpoint to repair from)", from_seq=exp, to_seq=end)
            exp = end + 1
        self.next_seq = max(self.next_seq or 1, exp)
        return deliver

    # -- entry points -------------------------------------------------------------------
    def initial(self, since: Since) -> Generator[Request, dict, list[Event]]:
        """Position the stream: replay history (``start``/int) or learn the latest seq."""
        if not self.can_repair:
            return []
        out: list[Event] = []
        if self.per_execution:
            for eid in self.filter.executions:
                if since == "now":
                    try:
                        reply = yield ("replay", {"execution_id": eid, "from_eseq": _FAR})
                        self.epoch = self.epoch or reply.get("epoch")
                        self.expected[eid] = int(reply.get("last_eseq") or 0) + 1
                    except ControlTimeout:
                        # Whether it runs is unknown: its first live event (or heartbeat) positions
                        # it, as a failed replay_seq does for the whole stream. Assuming "not
                        # started" would replay its past and count what cannot be fetched as lost.
                        continue
                    except ControlError:
                        self.expected[eid] = 1   # not started yet: its first event is eseq 1
                        continue
                    if self.expected[eid] > 1:   # running: start from its snapshot, then live
                        snap = yield from self._snapshot_base(eid)
                        if snap.known:
                            self.snapshots[eid] = snap
                            self.expected[eid] = snap.last_eseq + 1
                else:
                    start = 1 if since == "start" else max(1, int(since))
                    out += yield from self._repair_execution(eid, start, None, "replay failed",
                                                             counter="replayed",
                                                             truncated=since == "start")
        else:
            start = None if since == "now" else 1 if since == "start" else max(1, int(since))
            try:
                reply = yield ("replay_seq", {"from_seq": _FAR})
            except ControlError as exc:
                if start is not None:
                    # Resuming: the stream still starts at ``start``. The first live event
                    # (or heartbeat) then repairs [start, its seq) or counts it lost; taking
                    # it as the base would hide that hole.
                    self.next_seq = start
                    self.losses.append({"count": 0, "reason": f"replay_seq failed: {exc}"})
                return out
            self.epoch = reply.get("epoch")
            if start is None:
                self.next_seq = int(reply.get("last_seq") or 0) + 1
            else:
                out += yield from self._repair_global(start, int(reply.get("last_seq") or 0),
                                                      "replay failed", counter="replayed",
                                                      truncated=since == "start")
        return out

    def process(self, ev: Event) -> Generator[Request, dict, list[Event]]:
        """One live event in; the events to deliver (repaired ones first) out."""
        out: list[Event] = []
        if ev.epoch != self.epoch:
            if self.epoch is not None:
                self.stats["epoch_changes"] += 1
                self.losses.append({"count": None, "reason": "coordinator restarted (epoch "
                                    f"{self.epoch} -> {ev.epoch}); events of the old epoch "
                                    "after the last one received are unknown",
                                    "epoch": ev.epoch})
                # A new coordinator numbers from 1 again: replay its stream from the start.
                self.expected = {eid: 1 for eid in self.executions}
                self.next_seq = 1
                self.snapshots.clear()
            self.epoch = ev.epoch
        if ev.type == HEARTBEAT:
            self.stats["heartbeats"] += 1
            if self.per_execution:
                executions = ev.meta.get("executions") or {}
                for eid in self.filter.executions:
                    last = executions.get(eid)
                    if last is None:
                        continue
                    exp = self.expected.get(eid)
                    if exp is None:
                        self.expected[eid] = last + 1
                    elif last >= exp:
                        self.stats["gaps"] += 1
                        out += yield from self._repair_execution(eid, exp, last, "tail lost")
            else:
                if self.next_seq is None:
                    self.next_seq = ev.seq + 1
                elif ev.seq >= self.next_seq:
                    self.stats["gaps"] += 1
                    out += yield from self._repair_global(self.next_seq, ev.seq, "tail lost")
            if self.filter.matches(ev):
                out.append(ev)
            return out
        if self.per_execution:
            eid, eseq = ev.execution_id, ev.eseq
            if eid is None or eseq is None:
                return out
            exp = self.expected.get(eid)
            if exp is None:
                exp = eseq
            if eseq < exp:
                self.stats["duplicates_dropped"] += 1
                return out
            if eseq > exp:
                self.stats["gaps"] += 1
                out += yield from self._repair_execution(eid, exp, eseq - 1, "gap")
            self.expected[eid] = eseq + 1
        else:
            seq = ev.seq
            exp = self.next_seq if self.next_seq is not None else seq
            if seq < exp:
                self.stats["duplicates_dropped"] += 1
                return out
            if seq > exp:
                self.stats["gaps"] += 1
                out += yield from self._repair_global(exp, seq - 1, "gap")
            self.next_seq = seq + 1
        yield from self._accept(ev, out)
        return out

    # -- variables snapshots --------------------------------------------------------------
    def _accept(self, ev: Event, deliver: list[Event]) -> Generator[Request, dict, None]:
        """Take one event in stream order: apply it to its execution's snapshot, give it its
        snapshot view, and append it to ``deliver`` if the filter wants it."""
        eid, eseq = ev.execution_id, ev.eseq
        if eid is not None and eseq is not None:
            snap = self.snapshots.get(eid)
            if snap is None or eseq != snap.last_eseq + 1:
                snap = self.snapshots[eid] = (ExecutionSnapshot({}, 0, 0) if eseq == 1
                                              else (yield from self._snapshot_base(eid)))
            snap.apply(eseq, ev.vseq, ev.type, ev.meta)
            if ev.type in TERMINAL_TYPES:
                del self.snapshots[eid]    # views already handed out keep what they need
            if self.filter.matches(ev):
                ev._snapshot = snap.view(ev.vseq)
                deliver.append(ev)
        elif self.filter.matches(ev):
            deliver.append(ev)

    def _snapshot_base(self, eid: str) -> Generator[Request, dict, ExecutionSnapshot]:
        """A base for an execution joined mid-stream or after a loss: the ``variables`` op's
        snapshot and version (unknown when the coordinator no longer holds the execution)."""
        if self.can_repair:
            try:
                reply = yield ("variables", {"execution_id": eid})
            except ControlError:
                reply = None
            if reply and isinstance(reply.get("vseq"), int) and isinstance(reply.get("variables"), dict):
                return ExecutionSnapshot(reply["variables"], reply["vseq"], int(reply.get("eseq") or 0))
        return ExecutionSnapshot(None, 0, 0)


def _new_stats() -> dict[str, int]:
    return {"received": 0, "delivered": 0, "repaired": 0, "replayed": 0, "lost": 0,
            "truncated": 0, "duplicates_dropped": 0, "gaps": 0, "epoch_changes": 0,
            "heartbeats": 0, "undecodable": 0}


class Monitor:
    """Subscribe to a coordinator's events and query its control socket.

    ``events``: the PUB endpoint; ``control``: the control endpoint (needed for repair,
    ``since`` other than ``"now"`` and the query methods). ``curve``:
    ``{"server_public": key, "public"?: key, "secret"?: key, "control_server_public"?: key}``.
    """

    def __init__(self, events: str, control: str | None = None, *, context: zmq.Context | None = None,
                 curve: dict | None = None, control_timeout: float = 5.0,
                 rcvhwm: int = DEFAULT_RCVHWM):
        self.events_endpoint = events
        self.control_endpoint = control
        self.context = context or zmq.Context.instance()
        self.curve = curve
        self.control_timeout = control_timeout
        self.rcvhwm = rcvhwm
        self.stats: dict[str, int] = _new_stats()
        self.losses: deque[dict] = deque(maxlen=1000)
        self.timed_out = False
        self._client: ControlClient | None = None

    # -- control queries ---------------------------------------------------------------
    def _control_curve(self) -> dict | None:
        if not self.curve:
            return None
        c = dict(self.curve)
        if c.get("control_server_public"):
            c["server_public"] = c["control_server_public"]
        return c

    @property
    def control(self) -> ControlClient:
        if self.control_endpoint is None:
            raise ControlError("bad_request", "this Monitor has no control endpoint")
        if self._client is None:
            self._client = ControlClient(self.control_endpoint, context=self.context,
                                         timeout=self.control_timeout, curve=self._control_curve())
        return self._client

    def request(self, op: str, **fields) -> dict:
        reply = self.control.request(op, **fields)
        return {k: v for k, v in reply.items() if k not in ("id", "ok")}

    def progress(self, execution_id: str) -> dict:
        return self.request("progress", execution_id=execution_id)

    def variables(self, execution_id: str) -> dict:
        return self.request("variables", execution_id=execution_id)

    def execution(self, execution_id: str) -> dict:
        return self.request("execution", execution_id=execution_id)

    def executions(self) -> dict:
        return self.request("executions")

    def replay(self, execution_id: str, from_eseq: int = 1, to_eseq: int | None = None) -> list[Event]:
        """One execution's logged events (paged until complete)."""
        tracker = _Reliable(EventFilter(executions=[execution_id]), _new_stats(), deque(), True)
        return self._drive(tracker._fetch_execution(execution_id, from_eseq, to_eseq))[0]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- subscription ------------------------------------------------------------------
    def _setup_sub(self, sock: zmq.Socket, prefixes: list[str]) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, int(self.rcvhwm))
        if self.curve:
            public, secret = self.curve.get("public"), self.curve.get("secret")
            if not (public and secret):
                public, secret = zmq.curve_keypair()
            sock.curve_serverkey = self.curve["server_public"]
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        for p in prefixes:
            sock.setsockopt(zmq.SUBSCRIBE, p.encode())
        sock.connect(self.events_endpoint)

    def _plan(self, filter: EventFilter | None, reliable: bool, since: Since):
        filt = filter or EventFilter()
        if since != "now":
            if not reliable:
                raise ValueError("since= needs reliable=True (history comes from the replay log)")
            if self.control_endpoint is None:
                raise ValueError("since= needs a control endpoint to replay history from")
            if not (since == "start" or (isinstance(since, int) and not isinstance(since, bool))):
                raise ValueError("since must be 'now', 'start' or an int")
        tracker = _Reliable(filt, self.stats, self.losses, self.control_endpoint is not None) \
            if reliable else None
        prefixes = tracker.prefixes() if tracker else filt.prefixes()
        return filt, tracker, prefixes

    def _decode(self, frames: list[bytes]) -> Event | None:
        if len(frames) != 2:
            self.stats["undecodable"] += 1
            return None
        try:
            ev = decode_event(frames[0], frames[1])
        except Exception:
            self.stats["undecodable"] += 1
            return None
        self.stats["received"] += 1
        return ev

    def _drive(self, gen: Generator[Request, dict, Any]) -> Any:
        """Run ``gen``'s control requests on this thread's client; its result."""
        request, result = _step(gen)
        while request is not None:
            try:
                reply, error = self.control.request(request[0], **request[1]), None
            except ControlError as exc:
                reply, error = None, exc
            request, result = _step(gen, reply, error)
        return result

    def subscribe(self, filter: EventFilter | None = None, reliable: bool = True,
                  since: Since = "now", timeout: float | None = None,
                  until: Callable[[Event], bool] | None = None) -> Iterator[Event]:
        """Iterate over events.

        ``timeout``: end the iteration after this many seconds without an event to
        deliver (heartbeats do not count; ``monitor.timed_out`` is then True). ``until(event)``: stop after yielding the
        first event for which it returns True. The SUB socket is closed when the iterator
        ends, is closed, or is garbage-collected.
        """
        filt, tracker, prefixes = self._plan(filter, reliable, since)
        return self._iterate(filt, tracker, prefixes, since, timeout, until)

    def _iterate(self, filt, tracker, prefixes, since, timeout, until) -> Iterator[Event]:
        sock = self.context.socket(zmq.SUB)
        loop = _Loop(self, filt, tracker, timeout)
        try:
            self._setup_sub(sock, prefixes)       # subscribe FIRST, then replay, then dedupe
            if tracker is not None:
                batch, stop = _upto(self._drive(tracker.initial(since)), until)
                for ev in batch:
                    self.stats["delivered"] += 1
                    yield ev
                if stop:
                    return
            loop.restart_idle()
            while (wait := loop.wait_ms()) is not None:
                if not sock.poll(wait, zmq.POLLIN):
                    continue
                while True:  # drain what is queued without a poll per message
                    try:
                        frames = sock.recv_multipart(_NOBLOCK)
                    except zmq.Again:
                        break
                    batch, stop = _upto(self._drive(loop.receive(frames)), until)
                    for ev in batch:
                        self.stats["delivered"] += 1
                        yield ev
                    if stop:
                        return
        finally:
            sock.close(0)

    async def asubscribe(self, filter: EventFilter | None = None, reliable: bool = True,
                         since: Since = "now", timeout: float | None = None,
                         until: Callable[[Event], bool] | None = None) -> AsyncIterator[Event]:
        """asyncio twin of :meth:`subscribe` (``async for ev in monitor.asubscribe(...)``)."""
        import zmq.asyncio
        filt, tracker, prefixes = self._plan(filter, reliable, since)
        actx = zmq.asyncio.Context.shadow(self.context)
        sock = actx.socket(zmq.SUB)
        client = AsyncControlClient(self.control_endpoint, context=actx,
                                    timeout=self.control_timeout, curve=self._control_curve()) \
            if self.control_endpoint else None

        async def drive(gen: Generator[Request, dict, Any]) -> Any:
            request, result = _step(gen)
            while request is not None:
                try:
                    if client is None:
                        raise ControlError("bad_request", "no control endpoint")
                    reply, error = await client.request(request[0], **request[1]), None
                except ControlError as exc:
                    reply, error = None, exc
                request, result = _step(gen, reply, error)
            return result

        loop = _Loop(self, filt, tracker, timeout)
        try:
            self._setup_sub(sock, prefixes)
            if tracker is not None:
                batch, stop = _upto(await drive(tracker.initial(since)), until)
                for ev in batch:
                    self.stats["delivered"] += 1
                    yield ev
                if stop:
                    return
            loop.restart_idle()
            while (wait := loop.wait_ms()) is not None:
                if not await sock.poll(wait, zmq.POLLIN):
                    continue
                batch, stop = _upto(await drive(loop.receive(await sock.recv_multipart())), until)
                for ev in batch:
                    self.stats["delivered"] += 1
                    yield ev
                if stop:
                    return
        finally:
            sock.close(0)
            if client is not None:
                client.close()


def _step(gen: Generator[Request, dict, Any], reply: dict | None = None,
          error: Exception | None = None) -> tuple[Request | None, Any]:
    """Advance a tracker generator with a control reply (or the error it raised): its next
    request and None, or None and its result once it has finished."""
    try:
        return (gen.throw(error) if error is not None else gen.send(reply)), None
    except StopIteration as stop:
        return None, stop.value


def _upto(batch: list[Event], until: Callable[[Event], bool] | None) -> tuple[list[Event], bool]:
    """The events of ``batch`` to deliver, up to and with the first that ``until`` accepts,
    and whether it accepted one (the subscription then ends)."""
    if until is not None:
        for index, ev in enumerate(batch):
            if until(ev):
                return batch[:index + 1], True
    return batch, False


class _Loop:
    """What a subscription loop keeps between messages, the same for :meth:`Monitor.subscribe`
    and :meth:`Monitor.asubscribe`: the idle clock of ``timeout`` and what one message
    delivers (decoded, then filtered or passed through the reliable tracker)."""

    def __init__(self, monitor: Monitor, filt: EventFilter, tracker: _Reliable | None, timeout: float | None):
        self.monitor = monitor
        self.filt = filt
        self.tracker = tracker
        self.timeout = timeout
        self.idle_since = time.monotonic()
        monitor.timed_out = False

    def restart_idle(self) -> None:
        self.idle_since = time.monotonic()

    def wait_ms(self) -> int | None:
        """How long to poll next; None once ``timeout`` passed with nothing to deliver (the
        monitor's ``timed_out`` is then True)."""
        if self.timeout is None:
            return _POLL_MS
        left = self.idle_since + self.timeout - time.monotonic()
        if left <= 0:
            self.monitor.timed_out = True
            return None
        return max(0, min(_POLL_MS, int(left * 1000)))

    def receive(self, frames: list[bytes]) -> Generator[Request, dict, list[Event]]:
        """The events one received message delivers (control requests for repairs on the way)."""
        ev = self.monitor._decode(frames)
        if ev is None:
            return []
        if self.tracker is None:
            batch = [ev] if self.filt.matches(ev) else []
        else:
            batch = yield from self.tracker.process(ev)
        if batch:
            self.idle_since = time.monotonic()
        return batch
