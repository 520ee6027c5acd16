"""Control socket framing: ControlServer / ControlClient over real sockets."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time

import msgpack
import pytest
import zmq

from goflow.control.framing import ControlClient, ControlError, ControlServer, ControlTimeout
from goflow.errors import GoflowError


class Server:
    def __init__(self, endpoint, handlers, ctx, **kw):
        self.stop_flag = threading.Event()
        self.ready = threading.Event()
        self.endpoint, self.handlers, self.ctx, self.kw = endpoint, handlers, ctx, kw
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        self.ready.wait(5)

    def run(self):
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        self.server = ControlServer(sock, self.handlers, **self.kw)
        self.ready.set()
        while not self.stop_flag.is_set():
            if sock.poll(5):
                self.server.on_readable()
        sock.close(0)

    def stop(self):
        self.stop_flag.set()
        self.thread.join(5)


def _boom(req):
    raise RuntimeError("kaput")


def _missing(req):
    raise ControlError("not_found", f"no execution {req.get('execution_id')!r}")


@pytest.fixture
def env():
    d = tempfile.mkdtemp(prefix="gfctl")
    ctx = zmq.Context()
    ep = f"ipc://{d}/control"
    srv = Server(ep, {"echo": lambda r: {"echo": r.get("x")}, "boom": _boom, "missing": _missing,
                      "nothing": lambda r: None}, ctx, max_message_bytes=1 << 20)
    yield ctx, ep, srv
    srv.stop()
    ctx.term()
    shutil.rmtree(d, ignore_errors=True)


def _raw(ctx, ep, frames):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(ep)
    s.send_multipart(frames)
    assert s.poll(5000), "no reply"
    reply = s.recv_multipart()
    s.close(0)
    assert len(reply) == 1
    return msgpack.unpackb(reply[0], raw=False)


def test_request_reply_roundtrip(env):
    ctx, ep, _ = env
    with ControlClient(ep, context=ctx, timeout=5) as c:
        assert c.request("echo", x=[1, "two", b"\x00"])["echo"] == [1, "two", b"\x00"]
        r = c.request("nothing")
        assert r["ok"] is True and "id" in r


@pytest.mark.parametrize("frames,kind", [
    ([os.urandom(64)], "bad_request"),                       # random bytes
    ([b""], "bad_request"),                                  # empty frame
    ([b"a", b"b", b"c", b"d", b"e"], "bad_request"),         # 5 frames
    ([msgpack.packb([1, 2, 3])], "bad_request"),             # msgpack list
    ([msgpack.packb({"id": 7, "x": 1})], "bad_request"),     # map without op
    ([msgpack.packb({"id": 7, "op": 5})], "bad_request"),    # op not a string
    ([b"\x00" * (2 << 20)], "bad_request"),                  # huge message (> limit)
    ([msgpack.packb({"id": 7, "op": "nope"})], "unknown_op"),
    ([msgpack.packb({"id": 7, "op": "boom"})], "internal"),
    ([msgpack.packb({"id": 7, "op": "missing", "execution_id": "E"})], "not_found"),
])
def test_garbage_gets_an_error_reply_and_the_server_keeps_serving(env, frames, kind):
    ctx, ep, srv = env
    reply = _raw(ctx, ep, frames)
    assert reply["ok"] is False and reply["error"]["type"] == kind
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    with ControlClient(ep, context=ctx, timeout=5) as c:
        assert c.request("echo", x=1)["echo"] == 1
    assert srv.thread.is_alive()


def test_garbage_counted_in_stats(env):
    ctx, ep, srv = env
    for frames in ([b"\xc1"], [b"x", b"y"], [msgpack.packb("str")]):
        _raw(ctx, ep, frames)
    assert srv.server.stats["bad_frames"] >= 3


def test_error_replies_raise_control_error_with_type(env):
    ctx, ep, _ = env
    with ControlClient(ep, context=ctx, timeout=5) as c:
        with pytest.raises(ControlError) as ei:
            c.request("missing", execution_id="E9")
        assert ei.value.type == "not_found" and "E9" in ei.value.message
        assert isinstance(ei.value, GoflowError)
        with pytest.raises(ControlError) as ei:
            c.request("boom")
        assert ei.value.type == "internal"
        with pytest.raises(ControlError) as ei:
            c.request("unknown-op")
        assert ei.value.type == "unknown_op"


def test_req_clients_are_served_too(env):
    ctx, ep, _ = env
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(ep)
    s.send(msgpack.packb({"op": "echo", "id": "r1", "x": 3}))
    assert s.poll(5000)
    assert msgpack.unpackb(s.recv(), raw=False) == {"id": "r1", "ok": True, "echo": 3}
    s.close(0)


def test_timeout_then_reconnect():
    d = tempfile.mkdtemp(prefix="gfctl")
    ctx = zmq.Context()
    ep = f"ipc://{d}/control"
    c = ControlClient(ep, context=ctx, timeout=0.2)
    with pytest.raises(ControlTimeout) as ei:
        c.request("echo", x=1)
    assert ei.value.type == "timeout"
    srv = Server(ep, {"echo": lambda r: {"echo": r["x"]}}, ctx)
    try:
        c.timeout = 5
        assert c.request("echo", x=2)["echo"] == 2   # the stale first request was dropped
        assert srv.server.stats["requests"] == 1
    finally:
        c.close()
        srv.stop()
        ctx.term()
        shutil.rmtree(d, ignore_errors=True)



@pytest.mark.timeout(60)
def test_a_request_after_a_refused_curve_handshake_times_out_instead_of_hanging(tmp_path):
    """A coordinator that refuses this client's key leaves its DEALER with no peer: the
    request must still end after its timeout (a blocking send used to wait forever)."""
    import asyncio

    import zmq.asyncio
    from zmq.auth.thread import ThreadAuthenticator

    from goflow.control.framing import AsyncControlClient

    context = zmq.Context()
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(tmp_path))   # no authorized keys: refuse all
    server_public, server_secret = zmq.curve_keypair()
    public, secret = zmq.curve_keypair()
    server = context.socket(zmq.ROUTER)
    server.curve_server, server.curve_publickey, server.curve_secretkey = True, server_public, server_secret
    endpoint = f"tcp://127.0.0.1:{server.bind_to_random_port('tcp://127.0.0.1')}"
    curve = {"server_public": server_public, "public": public, "secret": secret}

    def without_a_peer(socket: zmq.Socket) -> None:
        """After the refusal the DEALER drops its pipe (~5 ms here): a send would block."""
        deadline = time.monotonic() + 10
        while socket.getsockopt(zmq.EVENTS) & zmq.POLLOUT:
            if time.monotonic() > deadline:
                raise AssertionError("the refused socket stayed writable")
            time.sleep(0.005)

    async def refused_then_asked() -> None:
        client = AsyncControlClient(endpoint, context=zmq.asyncio.Context.shadow(context), timeout=0.5, curve=curve)
        refused = client.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        assert await refused.poll(30_000), "the handshake was never refused"
        refused.close(0)
        without_a_peer(client.socket)
        try:
            with pytest.raises(ControlTimeout):
                await client.request("list")
        finally:
            client.close()

    try:
        client = ControlClient(endpoint, context=context, timeout=0.5, curve=curve)
        refused = client.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        assert refused.poll(30_000), "the handshake was never refused"
        refused.close(0)
        without_a_peer(client.socket)
        with client, pytest.raises(ControlTimeout):
            client.request("list")
        asyncio.run(refused_then_asked())
    finally:
        server.close(0)
        authenticator.stop()
        context.term()
